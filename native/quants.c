/* Realm native kernels: the GGML block types beyond Q8_0 / Q4_0.
 *
 * Q4_1, Q5_0, Q5_1, IQ4_NL (32-element blocks) and the K-quants Q2_K, Q3_K, Q4_K, Q5_K,
 * Q6_K and IQ4_XS (256-element super-blocks), as published files use them (a Q4_K_M file mixes Q4_K, Q5_0,
 * Q6_K and Q8_0). Dequantization is bit for bit ggml's (checked against the gguf package);
 * matmul multiplies them against 8-bit activations (per 32 elements for the blocks of 32, per
 * 256 with 16-element sums, ggml's Q8_K, for the super-blocks: realm_quantize_q8k_scalar below)
 * through the unpackers of quants_dot.inc at the portable level and quants_avx2.c /
 * quants_avx512.c at the SIMD levels. Files are read, never written, in these types:
 * realm_quantize does not produce them.
 */
#include "internal.h"

int realm_is_other_quant(int type) {
    switch (type) {
    case REALM_TYPE_Q4_1: case REALM_TYPE_Q5_0: case REALM_TYPE_Q5_1: case REALM_TYPE_Q2_K:
    case REALM_TYPE_Q3_K: case REALM_TYPE_Q4_K: case REALM_TYPE_Q5_K: case REALM_TYPE_Q6_K:
    case REALM_TYPE_IQ4_NL: case REALM_TYPE_IQ4_XS:
        return 1;
    default: return 0;
    }
}

int64_t realm_other_block_elems(int type) {
    switch (type) {
    case REALM_TYPE_Q4_1: case REALM_TYPE_Q5_0: case REALM_TYPE_Q5_1: case REALM_TYPE_IQ4_NL:
        return QK;
    case REALM_TYPE_Q2_K: case REALM_TYPE_Q3_K: case REALM_TYPE_Q4_K: case REALM_TYPE_Q5_K:
    case REALM_TYPE_Q6_K: case REALM_TYPE_IQ4_XS: return QK_K;
    default: return REALM_EINVAL;
    }
}

int64_t realm_other_block_bytes(int type) {
    switch (type) {
    case REALM_TYPE_Q4_1: return (int64_t)sizeof(block_q4_1);
    case REALM_TYPE_Q5_0: return (int64_t)sizeof(block_q5_0);
    case REALM_TYPE_Q5_1: return (int64_t)sizeof(block_q5_1);
    case REALM_TYPE_Q2_K: return (int64_t)sizeof(block_q2_K);
    case REALM_TYPE_Q3_K: return (int64_t)sizeof(block_q3_K);
    case REALM_TYPE_Q4_K: return (int64_t)sizeof(block_q4_K);
    case REALM_TYPE_Q5_K: return (int64_t)sizeof(block_q5_K);
    case REALM_TYPE_Q6_K: return (int64_t)sizeof(block_q6_K);
    case REALM_TYPE_IQ4_NL: return (int64_t)sizeof(block_iq4_nl);
    case REALM_TYPE_IQ4_XS: return (int64_t)sizeof(block_iq4_xs);
    default: return REALM_EINVAL;
    }
}

int realm_uses_q8k(int type) {
    return type == REALM_TYPE_Q2_K || type == REALM_TYPE_Q3_K || type == REALM_TYPE_Q4_K ||
           type == REALM_TYPE_Q5_K || type == REALM_TYPE_Q6_K;
}

/* ggml's block_q8_K, with Realm's rounding: per 256 elements d = amax / 127 and
 * q = nearest-even(x * (1 / d)) in float32 (q = 0 where d = 0), so |q| <= 127; the sums of
 * every 16 codes go with it. */
void realm_quantize_q8k_scalar(const realm_q8x *x, const float *src, int64_t b) {
    const int64_t nk = x->nk;
    for (int64_t i = 0; i < nk; i++) {
        const float *v = src + i * QK_K;
        float amax = 0.0f;
        for (int j = 0; j < QK_K; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int8_t *q = x->kq + (b * nk + i) * QK_K;
        int16_t *sums = x->ksum + (b * nk + i) * 16;
        for (int k = 0; k < 16; k++) {
            int32_t s = 0;
            for (int j = k * 16; j < k * 16 + 16; j++) {
                q[j] = (int8_t)lrintf(v[j] * id);
                s += q[j];
            }
            sums[k] = (int16_t)s;
        }
        x->kd[b * nk + i] = d;
    }
}

#define DOT_SUFFIX scalar
#include "quants_dot.inc"

/* ggml's dequantization: weight = a * q (+ b for the types with a minimum), in that order of
 * float operations, so the values are bit for bit ggml's (and the gguf package's). */
void realm_dequantize_other(float *out, const void *src, int type, int64_t n) {
    const uint8_t *row = src;
    const int has_min = type == REALM_TYPE_Q4_1 || type == REALM_TYPE_Q5_1 ||
                        type == REALM_TYPE_Q2_K || type == REALM_TYPE_Q4_K ||
                        type == REALM_TYPE_Q5_K;
    for (int64_t i = 0; i < n / QK; i++) {
        int8_t q[32];
        float a[2], b[2];
        switch (type) {
        case REALM_TYPE_Q4_1: unpack_q4_1(row, i, q, a, b); break;
        case REALM_TYPE_Q5_0: unpack_q5_0(row, i, q, a, b); break;
        case REALM_TYPE_Q5_1: unpack_q5_1(row, i, q, a, b); break;
        case REALM_TYPE_Q2_K: unpack_q2_K(row, i, q, a, b); break;
        case REALM_TYPE_Q3_K: unpack_q3_K(row, i, q, a, b); break;
        case REALM_TYPE_Q4_K: unpack_q4_K(row, i, q, a, b); break;
        case REALM_TYPE_Q5_K: unpack_q5_K(row, i, q, a, b); break;
        case REALM_TYPE_Q6_K: unpack_q6_K(row, i, q, a, b); break;
        case REALM_TYPE_IQ4_NL: unpack_iq4_nl(row, i, q, a, b); break;
        case REALM_TYPE_IQ4_XS: unpack_iq4_xs(row, i, q, a, b); break;
        default: return;
        }
        float *o = out + i * QK;
        for (int l = 0; l < 32; l++) {
            const float v = a[l / 16] * (float)q[l];
            o[l] = has_min ? v + b[l / 16] : v;
        }
    }
}
