/* Realm native kernels: the portable scalar reference.
 *
 * Every SIMD primitive in avx2.c / avx512.c has its specification here; the tests run each
 * kernel at every ISA level and compare. The quantizers reproduce GGML's reference
 * quantization bit for bit (checked against the gguf package's quants module).
 */
#include "internal.h"

/* ---- file formats: quantize / dequantize one row ---- */

void realm_quantize_row_q8_0(block_q8_0 *out, const float *x, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float *v = x + i * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        out[i].d = realm_f32_to_f16(d);
        for (int j = 0; j < QK; j++) out[i].qs[j] = (int8_t)roundf(v[j] * id);
    }
}

void realm_quantize_row_q4_0(block_q4_0 *out, const float *x, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float *v = x + i * QK;
        float amax = 0.0f, max = 0.0f;  /* the value of largest magnitude, first one wins */
        for (int j = 0; j < QK; j++) {
            if (amax < fabsf(v[j])) {
                amax = fabsf(v[j]);
                max = v[j];
            }
        }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        out[i].d = realm_f32_to_f16(d);
        for (int j = 0; j < QK / 2; j++) {
            const float a = truncf(v[j] * id + 8.5f), b = truncf(v[j + QK / 2] * id + 8.5f);
            const uint8_t qa = a > 15.0f ? 15 : (uint8_t)a;
            const uint8_t qb = b > 15.0f ? 15 : (uint8_t)b;
            out[i].qs[j] = (uint8_t)(qa | (qb << 4));
        }
    }
}

void realm_dequantize_row_q8_0(float *out, const block_q8_0 *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = realm_f16_to_f32(b[i].d);
        for (int j = 0; j < QK; j++) out[i * QK + j] = d * (float)b[i].qs[j];
    }
}

void realm_dequantize_row_q4_0(float *out, const block_q4_0 *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = realm_f16_to_f32(b[i].d);
        for (int j = 0; j < QK / 2; j++) {
            out[i * QK + j] = d * (float)((int)(b[i].qs[j] & 0x0f) - 8);
            out[i * QK + j + QK / 2] = d * (float)((int)(b[i].qs[j] >> 4) - 8);
        }
    }
}

/* ---- vector primitives ---- */

/* element i of batch row b in the panel layout */
#define XP(xp, batch, b, i) ((xp)[(((i) / 16) * (batch) + (b)) * 16 + (i) % 16])

static void dot_f32(float *y, int64_t ys, const float *w, const float *xp, int64_t n, int64_t batch,
                    int64_t b0, int64_t nbat) {
    for (int64_t b = b0; b < b0 + nbat; b++) {
        float s = 0.0f;
        for (int64_t i = 0; i < n; i++) s += w[i] * XP(xp, batch, b, i);
        y[b * ys] = s;
    }
}

static void dot_f16(float *y, int64_t ys, const uint16_t *w, const float *xp, int64_t n, int64_t batch,
                    int64_t b0, int64_t nbat) {
    for (int64_t b = b0; b < b0 + nbat; b++) {
        float s = 0.0f;
        for (int64_t i = 0; i < n; i++) s += realm_f16_to_f32(w[i]) * XP(xp, batch, b, i);
        y[b * ys] = s;
    }
}

static void dot_bf16(float *y, int64_t ys, const uint16_t *w, const float *xp, int64_t n, int64_t batch,
                    int64_t b0, int64_t nbat) {
    for (int64_t b = b0; b < b0 + nbat; b++) {
        float s = 0.0f;
        for (int64_t i = 0; i < n; i++) s += realm_bf16_to_f32(w[i]) * XP(xp, batch, b, i);
        y[b * ys] = s;
    }
}

static void dot_q8_0(float *y, int64_t ys, const block_q8_0 *w, const realm_q8x *x, int64_t b0,
                     int64_t nbat) {
    const int64_t nb = x->nb;
    for (int64_t b = b0; b < b0 + nbat; b++) {
        const float *d = x->d + b * nb;
        float s = 0.0f;
        for (int64_t i = 0; i < nb; i++) {
            const uint8_t *q = realm_q8x_block(x, b, i);
            int32_t acc = 0;
            for (int j = 0; j < QK; j++) acc += (int32_t)w[i].qs[j] * ((int32_t)q[j] - 128);
            s += realm_f16_to_f32(w[i].d) * d[i] * (float)acc;
        }
        y[b * ys] = s;
    }
}

static void dot_q4_0(float *y, int64_t ys, const block_q4_0 *w, const realm_q8x *x, int64_t b0,
                     int64_t nbat) {
    const int64_t nb = x->nb;
    for (int64_t b = b0; b < b0 + nbat; b++) {
        const float *d = x->d + b * nb;
        const int32_t *sum = x->sum + b * nb;
        float s = 0.0f;
        for (int64_t i = 0; i < nb; i++) {
            const uint8_t *q = realm_q8x_block(x, b, i);
            int32_t acc = 0;  /* sum of nibble * x, then subtract 8 * sum(x) */
            for (int j = 0; j < QK / 2; j++) {
                acc += (int32_t)(w[i].qs[j] & 0x0f) * ((int32_t)q[j] - 128);
                acc += (int32_t)(w[i].qs[j] >> 4) * ((int32_t)q[j + QK / 2] - 128);
            }
            s += realm_f16_to_f32(w[i].d) * d[i] * (float)(acc - 8 * sum[i]);
        }
        y[b * ys] = s;
    }
}

static void quantize_q8x(const realm_q8x *x, const float *src, int64_t b) {
    const int64_t nb = x->nb;
    for (int64_t i = 0; i < nb; i++) {
        const float *v = src + i * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int32_t sum = 0;
        uint8_t *q = realm_q8x_block(x, b, i);
        for (int j = 0; j < QK; j++) {
            const int32_t v8 = (int32_t)lrintf(v[j] * id);
            q[j] = (uint8_t)(v8 + 128);
            sum += v8;
        }
        x->d[b * nb + i] = d;
        x->sum[b * nb + i] = sum;
    }
}

static float vdot_f32(int64_t n, const float *a, const float *b) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static float vdot_f16(int64_t n, const uint16_t *a, const float *b) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += realm_f16_to_f32(a[i]) * b[i];
    return s;
}

static void axpy_f32(int64_t n, float a, const float *x, float *y) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static void axpy_f16(int64_t n, float a, const uint16_t *x, float *y) {
    for (int64_t i = 0; i < n; i++) y[i] += a * realm_f16_to_f32(x[i]);
}

const realm_isa_ops realm_ops_scalar = {
    .name = "scalar",
    .dot_f32 = dot_f32,
    .dot_f16 = dot_f16,
    .dot_bf16 = dot_bf16,
    .dot_q8_0 = dot_q8_0,
    .dot_q4_0 = dot_q4_0,
    .quantize_q8x = quantize_q8x,
    .vdot_f32 = vdot_f32,
    .vdot_f16 = vdot_f16,
    .axpy_f32 = axpy_f32,
    .axpy_f16 = axpy_f16,
    .gemm_f32 = NULL,
    .dot_other = realm_dot_other_scalar,
    .quantize_q8x_plain = quantize_q8x,
    .quantize_q8k = realm_quantize_q8k_scalar,
};
