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

static float dot_f32(int64_t n, const float *w, const float *x) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += w[i] * x[i];
    return s;
}

static float dot_f16(int64_t n, const uint16_t *w, const float *x) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += realm_f16_to_f32(w[i]) * x[i];
    return s;
}

static float dot_bf16(int64_t n, const uint16_t *w, const float *x) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += realm_bf16_to_f32(w[i]) * x[i];
    return s;
}

static float dot_q8_0(int64_t nb, const block_q8_0 *w, const block_q8x *x) {
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        int32_t acc = 0;
        for (int j = 0; j < QK; j++) acc += (int32_t)w[i].qs[j] * (int32_t)x[i].qs[j];
        s += realm_f16_to_f32(w[i].d) * x[i].d * (float)acc;
    }
    return s;
}

static float dot_q4_0(int64_t nb, const block_q4_0 *w, const block_q8x *x) {
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        int32_t acc = 0;  /* sum of nibble * x, then subtract 8 * sum(x) */
        for (int j = 0; j < QK / 2; j++) {
            acc += (int32_t)(w[i].qs[j] & 0x0f) * x[i].qs[j];
            acc += (int32_t)(w[i].qs[j] >> 4) * x[i].qs[j + QK / 2];
        }
        s += realm_f16_to_f32(w[i].d) * x[i].d * (float)(acc - 8 * x[i].sum);
    }
    return s;
}

static void quantize_q8x(block_q8x *out, const float *x, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float *v = x + i * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int32_t sum = 0;
        for (int j = 0; j < QK; j++) {
            out[i].qs[j] = (int8_t)lrintf(v[j] * id);
            sum += out[i].qs[j];
        }
        out[i].d = d;
        out[i].sum = sum;
    }
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
    .axpy_f32 = axpy_f32,
    .axpy_f16 = axpy_f16,
    .gemm_f32 = NULL,
};
