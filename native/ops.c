/* Realm native kernels: normalisation, RoPE, softmax, SwiGLU, residual add, embedding rows,
 * and attention over a KV cache.
 *
 * The element-wise kernels are memory-trivial next to the matmuls (one pass over a hidden
 * vector) and are written as plain loops the compiler vectorises; attention's inner dot
 * products and weighted sums go through the per-ISA table.
 */
#include <stdlib.h>

#include "internal.h"

void realm_dequantize_row(float *out, const void *src, int type, int64_t n);

int realm_rmsnorm(float *out, const float *x, const float *weight, int64_t n_rows, int64_t n,
                  float eps) {
    if (!out || !x || n_rows <= 0 || n <= 0 || !(eps >= 0.0f)) return REALM_EINVAL;
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        double ss = 0.0;
        for (int64_t i = 0; i < n; i++) ss += (double)xr[i] * (double)xr[i];
        const float scale = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
        if (weight)
            for (int64_t i = 0; i < n; i++) o[i] = xr[i] * scale * weight[i];
        else
            for (int64_t i = 0; i < n; i++) o[i] = xr[i] * scale;
    }
    return REALM_OK;
}

int realm_rope(float *x, const int32_t *pos, int64_t n_tokens, int32_t n_heads,
               int32_t head_dim, int32_t n_rot, int32_t mode, float freq_base, float freq_scale) {
    return realm_rope_factors(x, pos, n_tokens, n_heads, head_dim, n_rot, mode, freq_base,
                              freq_scale, NULL);
}

int realm_rope_factors(float *x, const int32_t *pos, int64_t n_tokens, int32_t n_heads,
                       int32_t head_dim, int32_t n_rot, int32_t mode, float freq_base,
                       float freq_scale, const float *factors) {
    if (!x || !pos || n_tokens <= 0 || n_heads <= 0 || head_dim <= 0 || n_rot <= 0 ||
        n_rot > head_dim || n_rot % 2 != 0 || !(freq_base > 0.0f) || !(freq_scale > 0.0f) ||
        (mode != REALM_ROPE_NORMAL && mode != REALM_ROPE_NEOX))
        return REALM_EINVAL;
    const int32_t half = n_rot / 2;
    float cs[2 * 256], *cos_sin = cs;  /* per token: cos, sin of each pair's angle */
    if (half > 256) {
        cos_sin = malloc(sizeof(float) * 2 * (size_t)half);
        if (!cos_sin) return REALM_ENOMEM;
    }
    for (int64_t t = 0; t < n_tokens; t++) {
        const double p = (double)pos[t] * (double)freq_scale;
        for (int32_t i = 0; i < half; i++) {
            double theta = p * pow((double)freq_base, -2.0 * i / (double)n_rot);
            if (factors) theta /= (double)factors[i];  /* llama 3's rope_freqs */
            cos_sin[2 * i] = (float)cos(theta);
            cos_sin[2 * i + 1] = (float)sin(theta);
        }
        for (int32_t h = 0; h < n_heads; h++) {
            float *v = x + (t * n_heads + h) * (int64_t)head_dim;
            for (int32_t i = 0; i < half; i++) {
                /* normal: adjacent pairs; neox: first half paired with second half */
                const int32_t a = mode == REALM_ROPE_NORMAL ? 2 * i : i;
                const int32_t b = mode == REALM_ROPE_NORMAL ? 2 * i + 1 : i + half;
                const float c = cos_sin[2 * i], s = cos_sin[2 * i + 1];
                const float x0 = v[a], x1 = v[b];
                v[a] = x0 * c - x1 * s;
                v[b] = x0 * s + x1 * c;
            }
        }
    }
    if (cos_sin != cs) free(cos_sin);
    return REALM_OK;
}

static void softmax_row(float *x, int64_t n) {
    float m = x[0];
    for (int64_t i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    const float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

int realm_softmax(float *x, int64_t n_rows, int64_t n) {
    if (!x || n_rows <= 0 || n <= 0) return REALM_EINVAL;
    for (int64_t r = 0; r < n_rows; r++) softmax_row(x + r * n, n);
    return REALM_OK;
}

int realm_swiglu(float *out, const float *gate, const float *up, int64_t n) {
    if (!out || !gate || !up || n <= 0) return REALM_EINVAL;
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
    return REALM_OK;
}

int realm_geglu(float *out, const float *gate, const float *up, int64_t n) {
    if (!out || !gate || !up || n <= 0) return REALM_EINVAL;
    /* 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)): the same value without 1 + tanh's cancellation
     * for negative gates */
    const float c2 = 2.0f * 0.7978845608028654f;  /* 2 sqrt(2 / pi) */
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-c2 * (g + 0.044715f * g * g * g))) * up[i];
    }
    return REALM_OK;
}

int realm_softcap(float *x, int64_t n, float cap) {
    if (!x || n <= 0 || !(cap > 0.0f) || !isfinite(cap)) return REALM_EINVAL;
    const float inv = 1.0f / cap;
    for (int64_t i = 0; i < n; i++) x[i] = cap * tanhf(x[i] * inv);
    return REALM_OK;
}

int realm_add(float *out, const float *a, const float *b, int64_t n) {
    if (!out || !a || !b || n <= 0) return REALM_EINVAL;
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
    return REALM_OK;
}

int realm_get_rows(float *out, const void *table, int type, int64_t n_rows, int64_t row_len,
                   const int32_t *ids, int64_t n_ids) {
    if (!out || !table || !ids || n_rows <= 0 || n_ids <= 0) return REALM_EINVAL;
    const int64_t rb = realm_row_bytes(type, row_len);
    if (rb <= 0) return REALM_EINVAL;
    for (int64_t i = 0; i < n_ids; i++)
        if (ids[i] < 0 || ids[i] >= n_rows) return REALM_EINVAL;
    for (int64_t i = 0; i < n_ids; i++)
        realm_dequantize_row(out + i * row_len, (const uint8_t *)table + ids[i] * rb, type, row_len);
    return REALM_OK;
}

// --- attention --------------------------------------------------------------------------

typedef struct {
    float *out;
    const float *q;
    const uint8_t *k, *v;
    int kv_type;
    const int32_t *q_pos;
    int64_t n_q, n_kv;
    int32_t n_heads, n_kv_heads, head_dim;
    float scale, softcap;
    int32_t window;
    int failed;  /* set if a thread could not allocate its score buffer */
    const realm_isa_ops *ops;
} attn_ctx;

/* One work unit is (query i, kv head g) with the group of query heads that share g: each cached
 * K and V row is read once for the whole group (grouped-query attention's memory saving). */
static void attn_task(void *p, int ith, int nth) {
    attn_ctx *c = p;
    int64_t u0, u1;
    realm_split(c->n_q * c->n_kv_heads, ith, nth, &u0, &u1);
    if (u0 >= u1) return;
    const int32_t group = c->n_heads / c->n_kv_heads;
    float *scores = malloc(sizeof(float) * (size_t)c->n_kv * (size_t)group);
    if (!scores) {
        c->failed = 1;
        return;
    }
    const int64_t es = c->kv_type == REALM_TYPE_F16 ? 2 : 4;
    const int64_t kv_row = (int64_t)c->n_kv_heads * c->head_dim * es;  /* bytes per position */
    const int32_t d = c->head_dim;
    float m[256], inv[256];  /* per head of the group (group <= n_heads; checked below) */
    for (int64_t u = u0; u < u1; u++) {
        const int64_t i = u / c->n_kv_heads;
        const int32_t g = (int32_t)(u % c->n_kv_heads);
        const int64_t kvh_off = (int64_t)g * d * es;
        const int64_t h0 = (int64_t)g * group;  /* first query head of the group */
        const float *qv = c->q + (i * c->n_heads + h0) * d;
        float *o = c->out + (i * c->n_heads + h0) * d;
        int64_t n = (int64_t)c->q_pos[i] + 1;  /* causal: positions 0..q_pos */
        if (n > c->n_kv) n = c->n_kv;
        /* a sliding window sees only the last `window` positions: start the rows there */
        const int64_t j0 = c->window > 0 && n > c->window ? (int64_t)c->q_pos[i] + 1 - c->window : 0;
        const uint8_t *kbase = c->k + j0 * kv_row, *vbase = c->v + j0 * kv_row;
        n -= j0;
        if (n <= 0) {  /* the window holds no cached row (the query's own is not stored) */
            memset(o, 0, sizeof(float) * (size_t)d * (size_t)group);
            continue;
        }
        if (c->kv_type == REALM_TYPE_F16 && c->ops->attn_probs_f16 && c->softcap == 0.0f) {
            /* the SIMD level's fused path: probabilities for the group, then values */
            c->ops->attn_probs_f16(scores, n, (const uint16_t *)(kbase + kvh_off), kv_row / 2, n,
                                   qv, group, d, c->scale);
            c->ops->attn_values_f16(o, (const uint16_t *)(vbase + kvh_off), kv_row / 2, n, scores,
                                    n, group, d);
            continue;
        }
        for (int32_t h = 0; h < group; h++) m[h] = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            const uint8_t *kj = kbase + j * kv_row + kvh_off;
            for (int32_t h = 0; h < group; h++) {
                float sc = c->kv_type == REALM_TYPE_F16
                               ? c->ops->vdot_f16(d, (const uint16_t *)kj, qv + h * d)
                               : c->ops->vdot_f32(d, (const float *)kj, qv + h * d);
                sc *= c->scale;
                if (c->softcap > 0.0f) sc = c->softcap * tanhf(sc / c->softcap);
                scores[h * n + j] = sc;
                m[h] = sc > m[h] ? sc : m[h];
            }
        }
        for (int32_t h = 0; h < group; h++) {
            double sum = 0.0;
            float *sh = scores + h * n;
            for (int64_t j = 0; j < n; j++) {
                sh[j] = expf(sh[j] - m[h]);
                sum += sh[j];
            }
            inv[h] = (float)(1.0 / sum);
        }
        memset(o, 0, sizeof(float) * (size_t)d * (size_t)group);
        for (int64_t j = 0; j < n; j++) {
            const uint8_t *vj = vbase + j * kv_row + kvh_off;
            for (int32_t h = 0; h < group; h++) {
                const float w = scores[h * n + j] * inv[h];
                if (c->kv_type == REALM_TYPE_F16)
                    c->ops->axpy_f16(d, w, (const uint16_t *)vj, o + h * d);
                else
                    c->ops->axpy_f32(d, w, (const float *)vj, o + h * d);
            }
        }
    }
    free(scores);
}

int realm_attention(float *out, const float *q, const void *k, const void *v, int kv_type,
                    const int32_t *q_pos, int64_t n_q, int64_t n_kv, int32_t n_heads,
                    int32_t n_kv_heads, int32_t head_dim, float scale, int32_t window,
                    float softcap) {
    if (!out || !q || !k || !v || !q_pos || n_q <= 0 || n_kv <= 0 || n_heads <= 0 ||
        window < 0 || !(softcap >= 0.0f) || !isfinite(softcap) ||
        n_kv_heads <= 0 || n_heads % n_kv_heads != 0 || head_dim <= 0 || head_dim > 256 ||
        !(scale > 0.0f) || (kv_type != REALM_TYPE_F32 && kv_type != REALM_TYPE_F16) ||
        n_heads / n_kv_heads > 256)
        return REALM_EINVAL;
    for (int64_t i = 0; i < n_q; i++)
        if (q_pos[i] < 0) return REALM_EINVAL;
    attn_ctx c = {.out = out, .q = q, .k = k, .v = v, .kv_type = kv_type, .q_pos = q_pos,
                  .n_q = n_q, .n_kv = n_kv, .n_heads = n_heads, .n_kv_heads = n_kv_heads,
                  .head_dim = head_dim, .scale = scale, .softcap = softcap, .window = window,
                  .ops = realm_ops()};
    int rc = realm_parallel(attn_task, &c, n_q * n_kv_heads >= 2 ? 0 : 1);
    if (rc != REALM_OK) return rc;
    return c.failed ? REALM_ENOMEM : REALM_OK;
}
