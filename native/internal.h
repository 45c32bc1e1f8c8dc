/* Realm native kernels: declarations shared by the .c files, never seen by cffi. */
#ifndef REALM_INTERNAL_H
#define REALM_INTERNAL_H

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define QK 32  /* elements per Q8_0 / Q4_0 block */

/* ---- GGML block layouts, bit for bit ---- */
typedef struct {
    uint16_t d;      /* scale, IEEE half */
    int8_t qs[QK];   /* value = d * qs[i] */
} block_q8_0;        /* 34 bytes */

typedef struct {
    uint16_t d;          /* scale, IEEE half */
    uint8_t qs[QK / 2];  /* element i in the low nibble of qs[i], i+16 in the high; value = d * (q - 8) */
} block_q4_0;            /* 18 bytes */

/* The other GGML block types (quants.c): 32-element blocks with a 5th bit or a minimum, and the
 * 256-element K-quant super-blocks with 6-bit or 4-bit sub-block scales. Layouts as ggml's
 * ggml-common.h; the gguf package's quants module is the reference the tests compare with. */
#define QK_K 256
typedef struct { uint16_t d, m; uint8_t qs[16]; } block_q4_1;                 /* w = d*q + m */
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } block_q5_0;     /* d*(q - 16) */
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; } block_q5_1;  /* d*q + m */
typedef struct { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; } block_q2_K;
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; } block_q3_K;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5_K;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } block_q6_K;
/* IQ4_NL / IQ4_XS: 4-bit indices into a fixed non-linear table of 16 int8 levels; IQ4_XS adds
 * 6-bit sub-block scales (value = d * (ls - 32) * table[q]) */
typedef struct { uint16_t d; uint8_t qs[16]; } block_iq4_nl;
typedef struct { uint16_t d, scales_h; uint8_t scales_l[4]; uint8_t qs[128]; } block_iq4_xs;
_Static_assert(sizeof(block_q4_1) == 20, "block_q4_1 must match GGML");
_Static_assert(sizeof(block_q5_0) == 22, "block_q5_0 must match GGML");
_Static_assert(sizeof(block_q5_1) == 24, "block_q5_1 must match GGML");
_Static_assert(sizeof(block_q2_K) == 84, "block_q2_K must match GGML");
_Static_assert(sizeof(block_q3_K) == 110, "block_q3_K must match GGML");
_Static_assert(sizeof(block_q4_K) == 144, "block_q4_K must match GGML");
_Static_assert(sizeof(block_q5_K) == 176, "block_q5_K must match GGML");
_Static_assert(sizeof(block_q6_K) == 210, "block_q6_K must match GGML");
_Static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl must match GGML");
_Static_assert(sizeof(block_iq4_xs) == 136, "block_iq4_xs must match GGML");

/* Activations quantized on the fly for integer dot products (never stored in files): one
 * buffer per matmul call. Values are stored offset by 128 so they are unsigned, as VNNI's
 * u8 x s8 product wants; the dot then takes 128 * sum(w) back off. The layout of qs belongs
 * to the ISA level whose quantize_q8x wrote it (the same level's dots read it):
 *   scalar, AVX2: (batch, nb, 32), scales in d, sums in sum;
 *   AVX-512: groups of four blocks with the batch rows side by side, (n_quads, batch, 128):
 *     two 64-byte pairs, each with its two blocks' 4-byte groups interleaved, so that even
 *     int32 lanes of a product belong to the pair's first block and odd lanes to its second;
 *     scales in d4 (n_quads, batch, 4). Missing blocks of a short last group are zeros.
 * The AVX-512 layout lets one group of weight blocks meet every batch row in consecutive
 * memory and take the four scales of a row with one 16-byte broadcast. */
typedef struct {
    int64_t nb;       /* blocks per row */
    int64_t n_quads;  /* (nb + 3) / 4 */
    int64_t batch;
    uint8_t *qs;      /* q + 128, n_quads * 128 bytes per row */
    float *d;         /* (batch, nb): block scales */
    float *d4;        /* (n_quads, batch, 4): block scales by group of four */
    int32_t *sum;     /* (batch, nb): sum of the signed q */
    /* Activations for K-quant weights (Q2_K .. Q6_K, 256-element super-blocks), as ggml's
     * block_q8_K: one float scale per 256 elements (amax / 127) and the sums of every 16
     * codes, so that a super-block's dot runs on integers with the weights' sub-block scales
     * applied as integers too and one float multiply per super-block. Set by quantize_q8k into
     * the same allocation as the layouts above (which such a call does not use). */
    int64_t nk;       /* super-blocks per row */
    int8_t *kq;       /* (batch, nk * 256): signed codes, |q| <= 127 */
    float *kd;        /* (batch, nk): scales */
    int16_t *ksum;    /* (batch, nk, 16): sums of 16 consecutive codes */
} realm_q8x;

/* block i of row b in the plain layout */
static inline uint8_t *realm_q8x_block(const realm_q8x *x, int64_t b, int64_t i) {
    return x->qs + (b * x->nb + i) * 32;
}

/* Float activations for batch > 1 are repacked the same way: (ceil(n/16), batch, 16) floats,
 * zero-padded, so one weight vector meets every row of the batch in one cache line each. */
static inline int64_t realm_panels(int64_t n) { return (n + 15) / 16; }

_Static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must match GGML");
_Static_assert(sizeof(block_q4_0) == 18, "block_q4_0 must match GGML");

/* ---- scalar conversions (IEEE half and bfloat16, round to nearest even) ---- */
static inline float realm_fp32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t realm_fp32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float realm_f16_to_f32(uint16_t h) {
    /* exact: every half is representable as a float */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    if (exp == 0) {  /* zero or subnormal: mant * 2^-24 */
        const float v = (float)mant * 0x1p-24f;
        return sign ? -v : v;
    }
    if (exp == 31) return realm_fp32_from_bits(sign | 0x7f800000u | (mant << 13));
    return realm_fp32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

static inline uint16_t realm_f32_to_f16(float f) {
    /* round to nearest, ties to even: the same bits as numpy's float32 -> float16 cast */
    const uint32_t u = realm_fp32_to_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;         /* NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00u;        /* rounds to infinity */
    if (a < 0x38800000u) {                              /* half subnormal (or zero) */
        return sign | (uint16_t)nearbyintf(fabsf(f) * 0x1p24f);
    }
    uint32_t h = (((a >> 23) - 112u) << 10) | ((a & 0x7fffffu) >> 13);
    const uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return sign | (uint16_t)h;
}

static inline float realm_bf16_to_f32(uint16_t h) { return realm_fp32_from_bits((uint32_t)h << 16); }

static inline uint16_t realm_f32_to_bf16(float f) {
    uint32_t u = realm_fp32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64); /* quiet NaN */
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

/* ---- per-ISA vector primitives: one table per level, chosen at start-up ----
 * The scalar table is the specification; SIMD tables must agree with it within the
 * tolerances named in tests/kernels. */
typedef struct {
    const char *name;
    /* y[b * ys] = dot(w, x_b) for b in [b0, b0 + nbat) of a batch of `batch` rows: one weight
     * row of n elements against those batch rows, x in the panel layout above, so the weight
     * row is read once for all of them */
    void (*dot_f32)(float *y, int64_t ys, const float *w, const float *xp, int64_t n,
                    int64_t batch, int64_t b0, int64_t nbat);
    void (*dot_f16)(float *y, int64_t ys, const uint16_t *w, const float *xp, int64_t n,
                    int64_t batch, int64_t b0, int64_t nbat);
    void (*dot_bf16)(float *y, int64_t ys, const uint16_t *w, const float *xp, int64_t n,
                     int64_t batch, int64_t b0, int64_t nbat);
    /* the same for nr <= 4 float weight rows of wtype (F32, F16, BF16), ws elements apart, the
     * result of row r at y + r: may be NULL (the one-row dots, row by row). A (weight row,
     * batch row) pair's result must not depend on nr or on the other batch rows. */
    void (*dot_rows_float)(float *y, int64_t ys, const void *w, int wtype, int64_t ws, int nr,
                           const float *xp, int64_t n, int64_t batch, int64_t b0, int64_t nbat);
    /* the same for quantized weights against quantized activations (x->nb blocks) */
    void (*dot_q8_0)(float *y, int64_t ys, const block_q8_0 *w, const realm_q8x *x, int64_t b0,
                     int64_t nbat);
    void (*dot_q4_0)(float *y, int64_t ys, const block_q4_0 *w, const realm_q8x *x, int64_t b0,
                     int64_t nbat);
    /* quantize src (x->nb blocks) into row b of x, in this level's layout */
    void (*quantize_q8x)(const realm_q8x *x, const float *src, int64_t b);
    /* plain dot products of contiguous vectors, for attention */
    float (*vdot_f32)(int64_t n, const float *a, const float *b);
    float (*vdot_f16)(int64_t n, const uint16_t *a, const float *b);
    /* y += a * x, for attention's weighted sum over values */
    void (*axpy_f32)(int64_t n, float a, const float *x, float *y);
    void (*axpy_f16)(int64_t n, float a, const uint16_t *x, float *y);
    /* attention over an F16 cache for the `group` query heads that share one KV head (may be
     * NULL: the per-position dots above are used). p[h*ss + j] = softmax over j < n of
     * scale * dot(k_j, q_h), with k_j = k + j*ks elements and q_h = q + h*d. Each K row is
     * converted once for the whole group. */
    void (*attn_probs_f16)(float *p, int64_t ss, const uint16_t *k, int64_t ks, int64_t n,
                           const float *q, int32_t group, int32_t d, float scale);
    /* o[h*d + c] = sum_j w[h*ws + j] * v_j[c] for h < group, v_j = v + j*vs elements */
    void (*attn_values_f16)(float *o, const uint16_t *v, int64_t vs, int64_t n, const float *w,
                            int64_t ws, int32_t group, int32_t d);
    /* y[r*ldy + c] = sum_k a[r*lda + k] * b[c*ldb + k]: blocked GEMM with F32 activations and
     * F32, F16 or BF16 weights b (btype; ldb in elements), run by every pool thread (may be NULL).
     * next: a counter the threads share (zeroed), from which a level may claim its share of n
     * (NULL: the static share ith of nth) */
    int (*gemm_f32)(float *y, int64_t ldy, const float *a, int64_t lda, const void *b, int btype,
                    int64_t ldb, int64_t m, int64_t n, int64_t k, int ith, int nth,
                    atomic_int_fast64_t *next);
    /* y (batch, n_rows) = x (batch, n_cols) . w^T for Q8_0 / Q4_0 weights and a large batch,
     * the whole call (quantization, threads) in one; may be NULL (row-streaming path) */
    int (*gemm_q8)(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                   int64_t n_cols, int64_t batch);
    /* the smallest batch of Q8_0 / Q4_0 weights (wtype) that takes gemm_q8 (measured per
     * level, and per CPU family where they differ) */
    int64_t (*gemm_q_min_batch)(int wtype);
    /* the same in integers for the types of quants.c (gemm_kq.inc), with activations quantized
     * per 32 elements, for the types gemm_kq_supports takes (may be NULL: the dequantizing
     * path), from a batch of gemm_kq_min_batch(wtype) */
    int (*gemm_kq)(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                   int64_t n_cols, int64_t batch);
    int (*gemm_kq_supports)(int wtype);
    int64_t (*gemm_kq_min_batch)(int wtype);  /* below it, a supported type streams rows */
    /* dot_q8_0's contract for the types of quants.c (Q4_1, Q5_0, Q5_1, Q2_K..Q6_K), against
     * activations in the plain q8x layout whatever the level (quantized by quantize_q8x_plain) */
    void (*dot_other)(float *y, int64_t ys, const void *w, int wtype, const realm_q8x *x,
                      int64_t b0, int64_t nbat);
    void (*quantize_q8x_plain)(const realm_q8x *x, const float *src, int64_t b);
    /* quantize src (x->nk super-blocks) into row b of x's Q8_K fields (the same at every
     * level: round to nearest even of src * (127 / amax) computed as src * (1 / (amax / 127))) */
    void (*quantize_q8k)(const realm_q8x *x, const float *src, int64_t b);
    /* y (batch, n_rows) = x . w^T for interleaved weight panels (packed.c) of Q8_0 / Q4_0
     * (wtype without REALM_PACKED), every batch size; may be NULL (the portable product) */
    int (*matmul_packed)(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                         int64_t n_cols, int64_t batch);
} realm_isa_ops;

/* packed.c: interleaved weight panels */
typedef struct {
    int32_t corr;  /* -offset * sum(q): the weight codes' offset (128 Q8_0, 8 Q4_0) taken back */
    float d;       /* scale */
    int8_t q[QK];
} realm_pq8;       /* one block of activations for the panel products */
int64_t realm_packed_code_bytes(int wtype);  /* per block of a panel; < 0: not packable */
/* a panel of nb blocks of cb code bytes: pairs of blocks, their 2 x 32 bytes of fp16 scales
 * first, then their codes (an odd last block's scales are padded to 64 bytes) */
static inline int64_t realm_packed_panel_bytes(int64_t nb, int64_t cb) {
    return nb / 2 * (2 * cb + 64) + nb % 2 * (cb + 64);
}
static inline int64_t realm_packed_codes_at(int64_t i, int64_t cb) {  /* from the panel */
    return (i >> 1) * (2 * cb + 64) + 64 + (i & 1) * cb;
}
static inline int64_t realm_packed_scales_at(int64_t i, int64_t cb) {  /* 16 fp16 scales */
    return (i >> 1) * (2 * cb + 64) + (i & 1) * 32;
}

/* The panel products' threads claim runs of panels, which lie one after another in memory, so
 * each thread reads long sequential streams (prefetched REALM_PACKED_PF_AHEAD bytes ahead by
 * the first tile) and a descheduled core takes fewer runs. */
#define REALM_PACKED_RUNS_PER_THREAD 4
#define REALM_PACKED_PF_AHEAD 4096  /* 2-8 KiB measured level on a Zen 4 */
typedef struct {
    int64_t at, end, run, n;
} realm_panel_runs;

static inline realm_panel_runs realm_panel_runs_of(int64_t n_panels, int nth) {
    const int64_t items = (int64_t)nth * REALM_PACKED_RUNS_PER_THREAD;
    return (realm_panel_runs){0, 0, n_panels > items ? (n_panels + items - 1) / items : 1, n_panels};
}

/* this thread's next panel (claiming a new run from `next` when its run is done), or -1 */
static inline int64_t realm_panel_runs_next(realm_panel_runs *r, atomic_int_fast64_t *next) {
    if (r->at == r->end) {
        r->at = atomic_fetch_add(next, 1) * r->run;
        r->end = r->at + r->run < r->n ? r->at + r->run : r->n;
        if (r->at >= r->n) return -1;
    }
    return r->at++;
}
void realm_packed_quantize(realm_pq8 *out, const float *src, int64_t nb, int32_t off);
int realm_matmul_packed_ref(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                            int64_t n_cols, int64_t batch);

/* quants.c: the types beyond Q8_0 / Q4_0 (Q4_1 .. Q6_K, IQ4_NL, IQ4_XS) */
int realm_is_other_quant(int type);
int64_t realm_other_block_elems(int type);  /* 32 or 256; < 0 if not such a type */
int64_t realm_other_block_bytes(int type);
void realm_dequantize_other(float *out, const void *src, int type, int64_t n);
void realm_dequantize_row(float *out, const void *src, int type, int64_t n);  /* kernels.c */
int realm_uses_q8k(int type);  /* weights whose dots take the Q8_K activations */
void realm_quantize_q8k_scalar(const realm_q8x *x, const float *src, int64_t b);
void realm_dot_other_scalar(float *y, int64_t ys, const void *w, int wtype, const realm_q8x *x,
                            int64_t b0, int64_t nbat);
#if defined(__x86_64__) || defined(__i386__)
void realm_dot_other_avx2(float *y, int64_t ys, const void *w, int wtype, const realm_q8x *x,
                          int64_t b0, int64_t nbat);
void realm_dot_other_avx512(float *y, int64_t ys, const void *w, int wtype, const realm_q8x *x,
                            int64_t b0, int64_t nbat);
void realm_quantize_q8x_plain_avx2(const realm_q8x *x, const float *src, int64_t b);
void realm_quantize_q8k_avx2(const realm_q8x *x, const float *src, int64_t b);
int realm_gemm_q8_avx2(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                       int64_t n_cols, int64_t batch);
int realm_gemm_kq_avx2(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                       int64_t n_cols, int64_t batch);
int realm_gemm_kq_avx2_supports(int wtype);
int realm_gemm_kq_avx512(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                         int64_t n_cols, int64_t batch);
int realm_gemm_kq_avx512_supports(int wtype);
int realm_matmul_packed_avx2(float *y, const void *w, int wtype, const float *x,
                             int64_t n_rows, int64_t n_cols, int64_t batch);
int realm_matmul_packed_avx512(float *y, const void *w, int wtype, const float *x,
                               int64_t n_rows, int64_t n_cols, int64_t batch);
void realm_attn_probs_f16_avx2(float *p, int64_t ss, const uint16_t *k, int64_t ks, int64_t n,
                               const float *q, int32_t group, int32_t d, float scale);
void realm_attn_values_f16_avx2(float *o, const uint16_t *v, int64_t vs, int64_t n,
                                const float *w, int64_t ws, int32_t group, int32_t d);
#endif

extern const realm_isa_ops realm_ops_scalar;
#if defined(__x86_64__) || defined(__i386__)
extern const realm_isa_ops realm_ops_avx2;
extern const realm_isa_ops realm_ops_avx512;
#define REALM_X86 1
/* The ISA-specific files are compiled for the baseline target like the rest; each of their
 * functions (static inline helpers included: clang will not inline an intrinsic, or a helper,
 * into a function built without its features) carries one of these target attributes, which
 * gcc and clang both honour, so one build runs on any x86-64 CPU and kernels.c picks the table
 * at run time. */
#define REALM_AVX2 __attribute__((target("avx2,fma,f16c")))
#define REALM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define REALM_AVX512_VNNI \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#endif

const realm_isa_ops *realm_ops(void);  /* the active table */

/* realm_rope with each pair's angle divided by factors[i] (n_rot / 2 of them), or NULL */
int realm_rope_factors(float *x, const int32_t *pos, int64_t n_tokens, int32_t n_heads,
                       int32_t head_dim, int32_t n_rot, int32_t mode, float freq_base,
                       float freq_scale, const float *factors);

/* ---- LoRA (lora.c, lora_avx2.c) ----
 * y[o] += sum_k u[k] * bt[k * ld + o] for o in [0, n): bt holds rank rows of F16 or F32. */
void realm_lora_up_ref(float *y, const void *bt, int type, int64_t ld, const float *u,
                       int32_t rank, int64_t n);
void realm_lora_up_avx2(float *y, const void *bt, int type, int64_t ld, const float *u,
                        int32_t rank, int64_t n);
/* sum_i a[i] x[i]: a holds n values of F16 or F32 */
float realm_lora_dot_ref(const void *a, int type, const float *x, int64_t n);
float realm_lora_dot_avx2(const void *a, int type, const float *x, int64_t n);

/* ---- thread pool ---- */
typedef void (*realm_task_fn)(void *ctx, int ith, int nth);
/* Runs fn(ctx, ith, nth) for ith in [0, nth) on the pool (the caller is thread 0).
 * max_threads <= 0 means all pool threads. Returns REALM_OK or REALM_ETHREAD. */
int realm_parallel(realm_task_fn fn, void *ctx, int max_threads);

/* Set (on the calling thread) by realm_forward for a step with an exact sequence: every
 * realm_matmul takes the row-streaming path, whose result for an activation row does not
 * depend on the other rows of the batch (matmul.c). */
extern _Thread_local int realm_matmul_rowwise;

/* Nonzero on CPUs that split 512-bit instructions into two halves (AMD Zen 4; kernels.c). */
int realm_cpu_split_512(void);

static inline void realm_split(int64_t n, int ith, int nth, int64_t *begin, int64_t *end) {
    const int64_t per = (n + nth - 1) / nth;
    int64_t b = per * ith, e = b + per;
    if (b > n) b = n;
    if (e > n) e = n;
    *begin = b;
    *end = e;
}

/* Software prefetch (into L2) of the weights a GEMM's next packing will read: rows of `bytes`
 * bytes, rb apart, issued a few lines at a time between the register tiles of the current
 * panel so the memory latency hides behind compute. A packing reads 16 or more row streams at
 * once, too many for the hardware prefetchers to run far ahead (gemm_*.c). */
typedef struct {
    const uint8_t *row;  /* the current row's first line */
    int64_t rb, lines_per_row, rows_left, line;
} realm_prefetcher;

static inline void realm_pf_start(realm_prefetcher *f, const void *p, int64_t rows, int64_t rb,
                                  int64_t bytes) {
    f->row = (const uint8_t *)p;
    f->rb = rb;
    f->lines_per_row = (bytes + 63) / 64 + 1;  /* + 1: the rows need not start on a line */
    f->rows_left = p ? rows : 0;
    f->line = 0;
}

static inline void realm_pf_step(realm_prefetcher *f, int64_t count) {
    for (; count > 0 && f->rows_left > 0; count--) {
        __builtin_prefetch(f->row + f->line * 64, 0, 2);
        if (++f->line == f->lines_per_row) {
            f->line = 0;
            f->row += f->rb;
            f->rows_left--;
        }
    }
}

static inline int64_t realm_pf_lines(const realm_prefetcher *f) {
    return f->rows_left * f->lines_per_row;
}

#endif
