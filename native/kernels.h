/* Realm native kernels: the one declaration of the C ABI.
 *
 * build_ffi.py feeds this file to cffi's ffi.cdef (lines starting with '#' other than
 * integer '#define's are dropped), so every declaration here is written once.
 *
 * Conventions (docs/kernels.md):
 *   - every exported symbol starts with realm_; the output pointer comes first;
 *   - every function returns an int status: 0 (REALM_OK) or a negative REALM_E* code,
 *     and never aborts, prints or exits;
 *   - arrays are dense row-major; weight rows use GGML's block layouts bit for bit;
 *   - work is split across the persistent thread pool; callers release the GIL.
 */
#ifndef REALM_KERNELS_H
#define REALM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* ---- status codes ---- */
#define REALM_OK 0
#define REALM_EINVAL -1        /* a bad argument: null pointer, size, type, mode */
#define REALM_ENOMEM -2        /* an allocation failed */
#define REALM_EUNSUPPORTED -3  /* valid, but not supported by this build or CPU */
#define REALM_ETHREAD -4       /* the thread pool could not start its threads */

/* ---- element / block types: GGML's type ids ---- */
#define REALM_TYPE_F32 0
#define REALM_TYPE_F16 1
#define REALM_TYPE_Q4_0 2
#define REALM_TYPE_Q4_1 3
#define REALM_TYPE_Q5_0 6
#define REALM_TYPE_Q5_1 7
#define REALM_TYPE_Q8_0 8
#define REALM_TYPE_Q2_K 10
#define REALM_TYPE_Q3_K 11
#define REALM_TYPE_Q4_K 12
#define REALM_TYPE_Q5_K 13
#define REALM_TYPE_Q6_K 14
#define REALM_TYPE_IQ4_NL 20
#define REALM_TYPE_IQ4_XS 23
#define REALM_TYPE_BF16 30

/* ---- instruction-set levels ---- */
#define REALM_ISA_SCALAR 0     /* portable C: the reference every other level is tested against */
#define REALM_ISA_AVX2 1       /* AVX2 + FMA + F16C */
#define REALM_ISA_AVX512 2     /* AVX-512 F/BW/VL + VNNI */

/* ---- RoPE modes (GGML's numbering) ---- */
#define REALM_ROPE_NORMAL 0    /* rotate adjacent pairs (x[2i], x[2i+1]): llama */
#define REALM_ROPE_NEOX 2      /* rotate half-split pairs (x[i], x[i + n_rot/2]): NeoX, qwen2 */

/* ---- feed-forward activations ---- */
#define REALM_ACT_SILU 0       /* silu(gate) * up: llama, qwen, phi3 */
#define REALM_ACT_GELU 1       /* gelu(gate) * up, GELU's tanh form: gemma */

/* ---- runtime configuration ---- */
const char *realm_status_message(int status);
int realm_isa_detected(void);              /* best level this CPU supports */
int realm_isa_active(void);                /* level in use */
int realm_isa_set(int isa);                /* use a level <= detected (tests, benchmarks) */
int realm_threads_set(int n_threads);      /* resize the pool; n <= 0 means all online cores */
int realm_threads_get(void);

/* ---- block formats ---- */
int64_t realm_type_block_elems(int type);  /* elements per block (1 for float types) */
int64_t realm_type_block_bytes(int type);  /* bytes per block */
int64_t realm_row_bytes(int type, int64_t n);  /* bytes of a row of n elements; < 0 if invalid */
int realm_quantize(void *out, int type, const float *x, int64_t n);
int realm_dequantize(float *out, const void *src, int type, int64_t n);

/* ---- linear algebra ----
 * y[b, r] = sum_c w[r, c] * x[b, c]    w: (n_rows, n_cols) of wtype; x: (batch, n_cols) f32;
 * y: (batch, n_rows) f32. batch == 1 is decode; batch > 1 is prefill or batched decode, and
 * reads the weights once for all rows of x. Quantized weights quantize x to 8 bits and use
 * integer dot products.
 */
int realm_matmul(float *y, const void *w, int wtype, const float *x,
                 int64_t n_rows, int64_t n_cols, int64_t batch);
/* The kernel path realm_matmul takes for wtype at a batch on the active level (tests,
 * benchmarks), and so what it multiplies the weights with: */
#define REALM_PATH_ROWS 0      /* row-streaming; quantized weights: activations per 32 (Q8_0) */
#define REALM_PATH_ROWS_Q8K 1  /* row-streaming, activations per 256 (ggml's Q8_K) */
#define REALM_PATH_GEMM_F32 2  /* float GEMM on the activations themselves */
#define REALM_PATH_GEMM_DQ 3   /* dequantized weight panels, float GEMM / dots, the same */
#define REALM_PATH_GEMM_Q 4    /* integer GEMM, activations per 32 */
#define REALM_PATH_PACKED 5    /* interleaved weight panels (REALM_PACKED), activations per 32 */
int realm_matmul_path(int wtype, int64_t batch);  /* < 0: a bad type or batch */

/* ---- interleaved weight panels (packed.c) ----
 * Q8_0 / Q4_0 weights rewritten once, at model load, into panels of 16 rows whose blocks'
 * 4-byte groups are interleaved row by row (the layout of the integer GEMM's register tile),
 * so that no product repacks them. realm_matmul takes them with wtype | REALM_PACKED; each
 * activation row's result is the same whatever the batch (exact, as the row-streaming path).
 * Levels without a panel kernel multiply them with the portable one (correct, slower):
 * realm_pack_preferred says whether the active level has its own. */
#define REALM_PACKED 256
#define REALM_PACK_ROWS 16
int64_t realm_packed_bytes(int wtype, int64_t n_rows, int64_t n_cols);  /* < 0: not packable */
/* w: n_rows rows of wtype, row_stride bytes apart; out: realm_packed_bytes bytes */
int realm_pack(void *out, const void *w, int wtype, int64_t n_rows, int64_t n_cols,
               int64_t row_stride);
int realm_pack_preferred(void);

/* ---- element-wise and row operations (all f32) ---- */
/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight; weight may be NULL (no scale). */
int realm_rmsnorm(float *out, const float *x, const float *weight,
                  int64_t n_rows, int64_t n, float eps);
/* In place on x: (n_tokens, n_heads, head_dim); the first n_rot dims of each head rotate by
 * angle pos[t] * freq_scale * freq_base^(-2i / n_rot). */
int realm_rope(float *x, const int32_t *pos, int64_t n_tokens, int32_t n_heads,
               int32_t head_dim, int32_t n_rot, int32_t mode, float freq_base,
               float freq_scale);
int realm_softmax(float *x, int64_t n_rows, int64_t n);                /* in place, per row */
int realm_swiglu(float *out, const float *gate, const float *up, int64_t n);  /* silu(g)*u */
/* out = gelu(gate) * up, gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
int realm_geglu(float *out, const float *gate, const float *up, int64_t n);
/* In place: x = cap * tanh(x / cap) (gemma2's logit soft-capping); cap > 0 */
int realm_softcap(float *x, int64_t n, float cap);
int realm_add(float *out, const float *a, const float *b, int64_t n);
/* out[i] = dequantize(table[ids[i]]): table (n_rows, row_len) of type; out (n_ids, row_len). */
int realm_get_rows(float *out, const void *table, int type, int64_t n_rows, int64_t row_len,
                   const int32_t *ids, int64_t n_ids);

/* ---- attention ----
 * q: (n_q, n_heads, head_dim) f32; k, v: (n_kv, n_kv_heads, head_dim) of kv_type (F32, F16);
 * out: (n_q, n_heads, head_dim) f32. Query i attends to cache positions j <= q_pos[i]
 * (causal) and j < n_kv, and with window > 0 only to j > q_pos[i] - window (a sliding
 * window of `window` positions, its own included); head h reads kv head
 * h / (n_heads / n_kv_heads) (grouped-query). head_dim <= 256. scores are q.k * scale, then
 * softcap * tanh(score / softcap) when softcap > 0 (gemma2); the softmax subtracts the row
 * maximum.
 */
int realm_attention(float *out, const float *q, const void *k, const void *v, int kv_type,
                    const int32_t *q_pos, int64_t n_q, int64_t n_kv, int32_t n_heads,
                    int32_t n_kv_heads, int32_t head_dim, float scale, int32_t window,
                    float softcap);

/* ---- one forward step of a llama-family model over a batch of sequences ----
 * The architectures differ in optional parts, each NULL or 0 where unused: QK-norm (qwen3,
 * gemma3), post-attention / post-FFN norms (gemma2/3), GELU (gemma), embedding scaling,
 * sliding-window layers with their own RoPE base (gemma2/3, mistral), logit soft-capping
 * (gemma2), per-pair RoPE frequency factors (llama 3's rope_freqs).
 * Shapes use row-major (rows, cols) with cols the contiguous axis; weight matrices are
 * (n_out, n_in) rows of their type, as in GGUF. The whole step (every layer, every sequence)
 * runs in one call; matmuls take all the batch's tokens at once, so weights are read once. */
typedef struct {
    const float *attn_norm;           /* (n_embd) */
    const void *wq;                   /* (n_heads * head_dim, n_embd) */
    const void *wk;                   /* (n_kv_heads * head_dim, n_embd) */
    const void *wv;                   /* (n_kv_heads * head_dim, n_embd) */
    const void *wo;                   /* (n_embd, n_heads * head_dim) */
    const float *bq, *bk, *bv;        /* projection biases, or NULL (qwen2 has them) */
    const float *q_norm, *k_norm;     /* (head_dim): RMSNorm of each q / k head before RoPE,
                                       * or NULL (qwen3, gemma3 have them) */
    const float *post_attn_norm;      /* (n_embd): RMSNorm of the attention output before the
                                       * residual add, or NULL (gemma2/3) */
    const float *post_ffn_norm;       /* (n_embd): the same for the FFN output, or NULL */
    const float *ffn_norm;            /* (n_embd) */
    const void *w_gate;               /* (n_ff, n_embd) */
    const void *w_up;                 /* (n_ff, n_embd) */
    const void *w_down;               /* (n_embd, n_ff) */
    int32_t type_q, type_k, type_v, type_o, type_gate, type_up, type_down;
} realm_layer;

/* Called before layer i is used (fill *out with its resident weights) and after: a layer
 * pager keeps only some layers in memory. Return 0, or a negative status to stop the step. */
typedef int (*realm_layer_fn)(void *ctx, int32_t layer, realm_layer *out);

typedef struct {
    int32_t n_layers, n_embd, n_heads, n_kv_heads, head_dim, n_ff, n_vocab;
    int32_t n_rot, rope_mode;         /* RoPE: dims rotated per head, REALM_ROPE_* */
    float rope_base, rope_scale, rms_eps;
    const void *tok_embd;             /* (n_vocab, n_embd) */
    int32_t type_embd;
    const float *output_norm;         /* (n_embd) */
    const void *output;               /* (n_vocab, n_embd); may be tok_embd (tied) */
    int32_t type_output;
    const realm_layer *layers;        /* n_layers entries, or NULL when acquire is set */
    realm_layer_fn acquire, release;  /* optional layer paging hooks */
    void *pager;                      /* their context */
    int32_t kv_type;                  /* REALM_TYPE_F16 or REALM_TYPE_F32 */
    int32_t act;                      /* REALM_ACT_SILU or REALM_ACT_GELU */
    float embd_scale;                 /* embeddings are multiplied by it (gemma: sqrt(n_embd));
                                       * 0 means 1 */
    float attn_scale;                 /* attention score scale; 0 means 1/sqrt(head_dim) */
    float attn_softcap, final_softcap;  /* cap * tanh(x / cap) on scores / logits; 0: none */
    const int32_t *window;            /* (n_layers): layer l's sliding window in positions
                                       * (0: all positions), or NULL for none */
    const float *layer_rope_base;     /* (n_layers): layer l's RoPE base, or NULL: rope_base */
    const float *layer_rope_scale;    /* (n_layers): layer l's RoPE scale, or NULL */
    const float *rope_freqs;          /* (n_rot / 2): pair i's angle is divided by it, or NULL */
} realm_model;

/* ---- LoRA adapters, applied at step time (never merged into the shared weights) ----
 * A weight W (n_out, n_in) with an adapter computes y = W x + scale * B (A x) for the rows of
 * the sequences that name the adapter; the other rows of the same step are untouched. */
#define REALM_LORA_Q 0                /* the projections of a layer that may carry one */
#define REALM_LORA_K 1
#define REALM_LORA_V 2
#define REALM_LORA_O 3
#define REALM_LORA_GATE 4
#define REALM_LORA_UP 5
#define REALM_LORA_DOWN 6
#define REALM_LORA_PER_LAYER 7

typedef struct {
    const void *a;                    /* (rank, n_in) rows of type_a, or NULL: no adapter */
    const void *b;                    /* B transposed: (rank, n_out) rows of type_b */
    int32_t type_a, type_b;           /* a: F32, F16 or Q8_0 (n_in % 32 == 0); b: F32 or F16 */
    int32_t rank;
    float scale;                      /* user scale * alpha / rank (user scale when alpha is 0) */
} realm_lora;

typedef struct {
    int32_t n_layers;                 /* the model's */
    const realm_lora *layers;         /* (n_layers, REALM_LORA_PER_LAYER) */
    realm_lora output;                /* the output projection's, a == NULL for none */
} realm_adapter;

typedef struct {
    const int32_t *tokens;            /* n_tokens ids to append */
    int32_t n_tokens;
    int32_t pos;                      /* position of tokens[0]; cache rows < pos are filled */
    void *kv;                         /* (n_layers, 2, capacity, n_kv_heads * head_dim) */
    int32_t capacity;                 /* cache rows; pos + n_tokens <= capacity */
    float *logits;                    /* (n_logits, n_vocab), or NULL when n_logits == 0 */
    int32_t n_logits;                 /* logits of the last n_logits tokens */
    float *embedding;                 /* (n_embd): mean over this step's tokens of the final
                                       * normalised hidden state, or NULL for none */
    const realm_adapter *adapter;     /* this sequence's LoRA adapter, or NULL: the base model */
    int32_t exact;                    /* nonzero: this sequence's logits must not depend on the
                                       * rest of the batch (speculative verify): the whole step
                                       * then takes the row-invariant matmul path */
} realm_seq;

int realm_forward(const realm_model *m, realm_seq *seqs, int32_t n_seqs);

/* 0 when ad fits m (layer count, types, ranks, row lengths), else REALM_EINVAL. */
int realm_lora_check(const realm_model *m, const realm_adapter *ad);
/* For q < n_proj: ys[q] (rows, n_outs[q]) += scale * B (A x) for the rows of every sequence
 * whose adapter has a pair for (layer, projs[q]) (layer < 0: the output projection, projs
 * ignored); x: (rows, n_in), the input of every projection given. A sequence owns its n_tokens
 * rows, or its n_logits rows when logits_rows is set, in order. */
int realm_lora_add(float *const *ys, const int64_t *n_outs, const int32_t *projs, int32_t n_proj,
                   const float *x, int64_t n_in, const realm_seq *seqs, int32_t n_seqs,
                   int32_t layer, int logits_rows);

/* ---- machine limits, measured natively for the benchmarks ---- */
/* Reads n_bytes of buf iters times with every pool thread; *seconds gets the best pass. */
int realm_read_bandwidth(double *seconds, const void *buf, int64_t n_bytes, int32_t iters);

#endif
