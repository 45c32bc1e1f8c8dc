/* Realm native kernels: one forward step of a llama-family transformer.
 *
 * A batch of sequences, each appending n_tokens at its own position to its own KV cache,
 * runs through every layer in this one call: Python never loops over layers per token.
 * Projections and the FFN take all tokens of all sequences as one matmul batch (weights are
 * read once per step); attention runs per sequence over that sequence's cache.
 *
 *   x = embed(tokens) (* embd_scale)
 *   per layer:  h = rmsnorm(x) * attn_norm
 *               q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)
 *               (q, k = rmsnorm per head * q_norm, k_norm);  rope(q, k)
 *               cache[pos..] = k, v;  a = attention(q, cache) (windowed, soft-capped)
 *               x += (rmsnorm(a Wo) * post_attn_norm)   -- the norm only where given
 *               h = rmsnorm(x) * ffn_norm
 *               x += (rmsnorm((act(h Wgate) * h Wup) Wdown) * post_ffn_norm)
 *   logits = rmsnorm(x[last rows]) * output_norm . Woutput (soft-capped)
 *
 * act is silu (llama, qwen, phi3) or GELU (gemma). The optional parts are what llama.cpp's
 * graphs for qwen3 (QK-norm), gemma2 (post norms, soft-capping, every other layer windowed)
 * and gemma3 (post norms, QK-norm, five windowed layers with their own RoPE base in six) add.
 */
#include <stdlib.h>

#include "internal.h"

typedef struct {
    float *x;       /* (T, n_embd) residual stream */
    float *h;       /* (T, n_embd) normalised */
    float *q;       /* (T, n_heads * head_dim) */
    float *k, *v;   /* (T, n_kv_heads * head_dim) */
    float *att;     /* (T, n_heads * head_dim) */
    float *gate;    /* (T, n_ff) */
    float *up;      /* (T, n_ff) */
    float *tmp;     /* (T, n_embd) */
    int32_t *ids;   /* (T) */
    int32_t *pos;   /* (T) */
    int lora;       /* some sequence of the step has a LoRA adapter (native/lora.c) */
} scratch;

static int check_model(const realm_model *m) {
    if (!m || m->n_layers <= 0 || m->n_embd <= 0 || m->n_heads <= 0 || m->n_kv_heads <= 0 ||
        m->n_heads % m->n_kv_heads != 0 || m->head_dim <= 0 || m->head_dim > 256 ||
        m->head_dim % 2 != 0 || m->n_ff <= 0 || m->n_vocab <= 0 || m->n_rot <= 0 ||
        m->n_rot > m->head_dim || m->n_rot % 2 != 0 || !m->tok_embd || !m->output_norm ||
        !m->output || (!m->layers && !m->acquire) ||
        (m->kv_type != REALM_TYPE_F16 && m->kv_type != REALM_TYPE_F32) ||
        (m->act != REALM_ACT_SILU && m->act != REALM_ACT_GELU) || !(m->embd_scale >= 0.0f) ||
        !(m->attn_scale >= 0.0f) || !(m->attn_softcap >= 0.0f) || !(m->final_softcap >= 0.0f) ||
        !isfinite(m->embd_scale) || !isfinite(m->attn_scale) || !isfinite(m->attn_softcap) ||
        !isfinite(m->final_softcap))
        return REALM_EINVAL;
    for (int32_t l = 0; l < m->n_layers; l++) {
        if (m->window && m->window[l] < 0) return REALM_EINVAL;
        if (m->layer_rope_base && !(m->layer_rope_base[l] > 0.0f)) return REALM_EINVAL;
        if (m->layer_rope_scale && !(m->layer_rope_scale[l] > 0.0f)) return REALM_EINVAL;
    }
    if (m->rope_freqs)
        for (int32_t i = 0; i < m->n_rot / 2; i++)
            if (!(m->rope_freqs[i] > 0.0f)) return REALM_EINVAL;
    return REALM_OK;
}

static int check_seqs(const realm_model *m, const realm_seq *seqs, int32_t n_seqs, int64_t *total) {
    if (!seqs || n_seqs <= 0) return REALM_EINVAL;
    int64_t t = 0;
    for (int32_t s = 0; s < n_seqs; s++) {
        const realm_seq *q = &seqs[s];
        if (!q->tokens || q->n_tokens <= 0 || q->pos < 0 || !q->kv || q->capacity <= 0 ||
            (int64_t)q->pos + q->n_tokens > q->capacity || q->n_logits < 0 ||
            q->n_logits > q->n_tokens || (q->n_logits > 0 && !q->logits) ||
            (q->adapter && realm_lora_check(m, q->adapter) != REALM_OK))
            return REALM_EINVAL;
        for (int32_t i = 0; i < q->n_tokens; i++)
            if (q->tokens[i] < 0 || q->tokens[i] >= m->n_vocab) return REALM_EINVAL;
        t += q->n_tokens;
    }
    *total = t;
    return REALM_OK;
}

static void add_bias(float *y, const float *b, int64_t rows, int64_t n) {
    if (!b) return;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i++) y[r * n + i] += b[i];
}

/* Store T rows of k/v (f32) at the sequence's positions in layer l's cache. */
static void store_kv(const realm_model *m, const realm_seq *q, int32_t l, const float *k,
                     const float *v) {
    const int64_t kvd = (int64_t)m->n_kv_heads * m->head_dim;
    const int64_t es = m->kv_type == REALM_TYPE_F16 ? 2 : 4;
    uint8_t *base = q->kv;
    uint8_t *kc = base + ((int64_t)l * 2 * q->capacity + q->pos) * kvd * es;
    uint8_t *vc = base + (((int64_t)l * 2 + 1) * q->capacity + q->pos) * kvd * es;
    const int64_t n = (int64_t)q->n_tokens * kvd;
    if (m->kv_type == REALM_TYPE_F16) {
        for (int64_t i = 0; i < n; i++) ((uint16_t *)kc)[i] = realm_f32_to_f16(k[i]);
        for (int64_t i = 0; i < n; i++) ((uint16_t *)vc)[i] = realm_f32_to_f16(v[i]);
    } else {
        memcpy(kc, k, (size_t)n * 4);
        memcpy(vc, v, (size_t)n * 4);
    }
}

static int layer_step(const realm_model *m, const realm_layer *L, int32_t l, realm_seq *seqs,
                      int32_t n_seqs, int64_t T, scratch *s) {
    const int64_t E = m->n_embd, D = m->head_dim;
    const int64_t qd = (int64_t)m->n_heads * D, kvd = (int64_t)m->n_kv_heads * D;
    int rc;
#define TRY(call)                          \
    do {                                   \
        if ((rc = (call)) != REALM_OK) return rc; \
    } while (0)
    /* LoRA deltas (lora.c): the projections that read the same input, in one call */
#define LORA(n, x, n_in, ...)                                                               \
    do {                                                                                    \
        if (!s->lora) break;                                                                \
        float *ys_[] = {__VA_ARGS__};                                                       \
        TRY(realm_lora_add(ys_, lo_[n].n_out, lo_[n].proj, lo_[n].count, x, n_in, seqs,     \
                           n_seqs, l, 0));                                                  \
    } while (0)
    const struct {
        int64_t n_out[3];
        int32_t proj[3], count;
    } lo_[] = {
        {{qd, kvd, kvd}, {REALM_LORA_Q, REALM_LORA_K, REALM_LORA_V}, 3},
        {{E}, {REALM_LORA_O}, 1},
        {{m->n_ff, m->n_ff}, {REALM_LORA_GATE, REALM_LORA_UP}, 2},
        {{E}, {REALM_LORA_DOWN}, 1},
    };
    /* attention block */
    TRY(realm_rmsnorm(s->h, s->x, L->attn_norm, T, E, m->rms_eps));
    TRY(realm_matmul(s->q, L->wq, L->type_q, s->h, qd, E, T));
    TRY(realm_matmul(s->k, L->wk, L->type_k, s->h, kvd, E, T));
    TRY(realm_matmul(s->v, L->wv, L->type_v, s->h, kvd, E, T));
    LORA(0, s->h, E, s->q, s->k, s->v);
    add_bias(s->q, L->bq, T, qd);
    add_bias(s->k, L->bk, T, kvd);
    add_bias(s->v, L->bv, T, kvd);
    if (L->q_norm) TRY(realm_rmsnorm(s->q, s->q, L->q_norm, T * m->n_heads, D, m->rms_eps));
    if (L->k_norm) TRY(realm_rmsnorm(s->k, s->k, L->k_norm, T * m->n_kv_heads, D, m->rms_eps));
    const float base = m->layer_rope_base ? m->layer_rope_base[l] : m->rope_base;
    const float rscale = m->layer_rope_scale ? m->layer_rope_scale[l] : m->rope_scale;
    TRY(realm_rope_factors(s->q, s->pos, T, m->n_heads, m->head_dim, m->n_rot, m->rope_mode,
                           base, rscale, m->rope_freqs));
    TRY(realm_rope_factors(s->k, s->pos, T, m->n_kv_heads, m->head_dim, m->n_rot, m->rope_mode,
                           base, rscale, m->rope_freqs));
    const float scale = m->attn_scale > 0.0f ? m->attn_scale : 1.0f / sqrtf((float)D);
    const int32_t window = m->window ? m->window[l] : 0;
    int64_t row = 0;
    for (int32_t i = 0; i < n_seqs; i++) {
        realm_seq *q = &seqs[i];
        store_kv(m, q, l, s->k + row * kvd, s->v + row * kvd);
        const int64_t es = m->kv_type == REALM_TYPE_F16 ? 2 : 4;
        const uint8_t *kc = (const uint8_t *)q->kv + (int64_t)l * 2 * q->capacity * kvd * es;
        const uint8_t *vc = kc + (int64_t)q->capacity * kvd * es;
        TRY(realm_attention(s->att + row * qd, s->q + row * qd, kc, vc, m->kv_type, s->pos + row,
                            q->n_tokens, (int64_t)q->pos + q->n_tokens, m->n_heads, m->n_kv_heads,
                            m->head_dim, scale, window, m->attn_softcap));
        row += q->n_tokens;
    }
    TRY(realm_matmul(s->tmp, L->wo, L->type_o, s->att, E, qd, T));
    LORA(1, s->att, qd, s->tmp);
    if (L->post_attn_norm) TRY(realm_rmsnorm(s->tmp, s->tmp, L->post_attn_norm, T, E, m->rms_eps));
    TRY(realm_add(s->x, s->x, s->tmp, T * E));
    /* feed-forward block */
    TRY(realm_rmsnorm(s->h, s->x, L->ffn_norm, T, E, m->rms_eps));
    TRY(realm_matmul(s->gate, L->w_gate, L->type_gate, s->h, m->n_ff, E, T));
    TRY(realm_matmul(s->up, L->w_up, L->type_up, s->h, m->n_ff, E, T));
    LORA(2, s->h, E, s->gate, s->up);
    if (m->act == REALM_ACT_GELU)
        TRY(realm_geglu(s->gate, s->gate, s->up, T * m->n_ff));
    else
        TRY(realm_swiglu(s->gate, s->gate, s->up, T * m->n_ff));
    TRY(realm_matmul(s->tmp, L->w_down, L->type_down, s->gate, E, m->n_ff, T));
    LORA(3, s->gate, m->n_ff, s->tmp);
    if (L->post_ffn_norm) TRY(realm_rmsnorm(s->tmp, s->tmp, L->post_ffn_norm, T, E, m->rms_eps));
    TRY(realm_add(s->x, s->x, s->tmp, T * E));
#undef LORA
#undef TRY
    return REALM_OK;
}

int realm_forward(const realm_model *m, realm_seq *seqs, int32_t n_seqs) {
    int rc = check_model(m);
    if (rc != REALM_OK) return rc;
    int64_t T = 0;
    if ((rc = check_seqs(m, seqs, n_seqs, &T)) != REALM_OK) return rc;

    const int64_t E = m->n_embd, qd = (int64_t)m->n_heads * m->head_dim;
    const int64_t kvd = (int64_t)m->n_kv_heads * m->head_dim, F = m->n_ff;
    const int64_t floats = T * (3 * E + 2 * qd + 2 * kvd + 2 * F);
    float *mem = malloc(sizeof(float) * (size_t)floats + sizeof(int32_t) * 2 * (size_t)T);
    if (!mem) return REALM_ENOMEM;
    scratch s;
    s.x = mem;
    s.h = s.x + T * E;
    s.tmp = s.h + T * E;
    s.q = s.tmp + T * E;
    s.att = s.q + T * qd;
    s.k = s.att + T * qd;
    s.v = s.k + T * kvd;
    s.gate = s.v + T * kvd;
    s.up = s.gate + T * F;
    s.ids = (int32_t *)(s.up + T * F);
    s.pos = s.ids + T;
    s.lora = 0;
    for (int32_t i = 0; i < n_seqs; i++) s.lora |= seqs[i].adapter != NULL;
    int exact = 0;
    for (int32_t i = 0; i < n_seqs; i++) exact |= seqs[i].exact != 0;
    realm_matmul_rowwise = exact;
    int64_t row = 0;
    for (int32_t i = 0; i < n_seqs; i++)
        for (int32_t t = 0; t < seqs[i].n_tokens; t++, row++) {
            s.ids[row] = seqs[i].tokens[t];
            s.pos[row] = seqs[i].pos + t;
        }

    rc = realm_get_rows(s.x, m->tok_embd, m->type_embd, m->n_vocab, E, s.ids, T);
    if (rc == REALM_OK && m->embd_scale > 0.0f && m->embd_scale != 1.0f)
        for (int64_t i = 0; i < T * E; i++) s.x[i] *= m->embd_scale;
    for (int32_t l = 0; l < m->n_layers && rc == REALM_OK; l++) {
        realm_layer paged;
        const realm_layer *L = m->layers ? &m->layers[l] : NULL;
        if (m->acquire) {
            rc = m->acquire(m->pager, l, &paged);
            if (rc != REALM_OK) break;
            L = &paged;
        }
        rc = layer_step(m, L, l, seqs, n_seqs, T, &s);
        if (m->release) {
            const int rr = m->release(m->pager, l, &paged);
            if (rc == REALM_OK) rc = rr;
        }
    }

    /* embeddings: the mean over each asking sequence's rows of rmsnorm(x) * output_norm */
    if (rc == REALM_OK) {
        int64_t base = 0;
        for (int32_t i = 0; i < n_seqs && rc == REALM_OK; i++) {
            float *e = seqs[i].embedding;
            const int64_t n = seqs[i].n_tokens;
            if (e) {
                float *row = s.tmp;  /* one row of scratch */
                memset(e, 0, sizeof(float) * (size_t)E);
                for (int64_t t = 0; t < n && rc == REALM_OK; t++) {
                    rc = realm_rmsnorm(row, s.x + (base + t) * E, m->output_norm, 1, E, m->rms_eps);
                    for (int64_t j = 0; j < E; j++) e[j] += row[j];
                }
                for (int64_t j = 0; j < E; j++) e[j] /= (float)n;
            }
            base += n;
        }
    }

    /* logits of each sequence's last n_logits rows, in one batched output matmul */
    int64_t R = 0;
    for (int32_t i = 0; i < n_seqs; i++) R += seqs[i].n_logits;
    if (rc == REALM_OK && R > 0) {
        float *rows = s.h;  /* R <= T rows of n_embd: reuse scratch */
        int64_t r = 0, base = 0;
        for (int32_t i = 0; i < n_seqs; i++) {
            const int64_t first = base + seqs[i].n_tokens - seqs[i].n_logits;
            memcpy(rows + r * E, s.x + first * E, sizeof(float) * (size_t)(seqs[i].n_logits * E));
            r += seqs[i].n_logits;
            base += seqs[i].n_tokens;
        }
        rc = realm_rmsnorm(rows, rows, m->output_norm, R, E, m->rms_eps);
        float *out = NULL;
        if (rc == REALM_OK) {
            out = malloc(sizeof(float) * (size_t)(R * m->n_vocab));
            if (!out) rc = REALM_ENOMEM;
        }
        if (rc == REALM_OK) rc = realm_matmul(out, m->output, m->type_output, rows, m->n_vocab, E, R);
        if (rc == REALM_OK && s.lora) {
            float *ys[] = {out};
            const int64_t n_outs[] = {m->n_vocab};
            const int32_t projs[] = {0};
            rc = realm_lora_add(ys, n_outs, projs, 1, rows, E, seqs, n_seqs, -1, 1);
        }
        if (rc == REALM_OK && m->final_softcap > 0.0f)
            rc = realm_softcap(out, R * m->n_vocab, m->final_softcap);
        if (rc == REALM_OK) {
            r = 0;
            for (int32_t i = 0; i < n_seqs; i++) {
                memcpy(seqs[i].logits, out + r * m->n_vocab,
                       sizeof(float) * (size_t)(seqs[i].n_logits * m->n_vocab));
                r += seqs[i].n_logits;
            }
        }
        free(out);
    }
    realm_matmul_rowwise = 0;
    free(mem);
    return rc;
}
