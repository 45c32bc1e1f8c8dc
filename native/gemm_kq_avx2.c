/* Realm native kernels: the types of quants.c times a large batch, AVX2 (gemm_kq.inc has the
 * scheme and layouts). 8 weight rows per panel: vpmaddubsw multiplies the unsigned weights u
 * by a broadcast 4-byte group of signed activation codes into int16 pairs, which vpmaddwd by
 * ones widens to the 8 rows' int32 partial dots. A pair is at most 2 x umax x 127, so the
 * groups of a block are summed in int16 as far as that stays below 32767 (8 groups for the
 * 4-bit types, 4 for the 5-bit ones, 2 for Q6_K) before one widening. IQ4_NL / IQ4_XS (u up
 * to 255) would overflow a pair: they keep the dequantizing path at this level.
 */
#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define KQ_TARGET REALM_AVX2
#define KQ_PR 8
#define KQ_KC 64        /* 64 blocks x 384 bytes: 24 KiB of packed weights, in L1 */
#define KQ_UMAX 63      /* 2 x 63 x 127 < 32767: one pair never saturates */
#define KQ_GEMM realm_gemm_kq_avx2
#define KQ_SUPPORTS realm_gemm_kq_avx2_supports
#include "gemm_kq.inc"

#define INLINE static inline __attribute__((always_inline)) REALM_AVX2

INLINE int32_t kq_load_i32(const void *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* dwords 0 .. 7 of 8 rows (r[i]) -> o[k]: dword k of the 8 rows */
INLINE void transpose8x8(const __m256i r[8], __m256i o[8]) {
    __m256i t[8], s[8];
    for (int h = 0; h < 2; h++) {
        const __m256i *x = r + 4 * h;
        t[4 * h + 0] = _mm256_unpacklo_epi32(x[0], x[1]);
        t[4 * h + 1] = _mm256_unpackhi_epi32(x[0], x[1]);
        t[4 * h + 2] = _mm256_unpacklo_epi32(x[2], x[3]);
        t[4 * h + 3] = _mm256_unpackhi_epi32(x[2], x[3]);
        /* lane L of s[4h + k]: dword 4L + k of rows 4h .. 4h + 3 */
        s[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h + 0], t[4 * h + 2]);
        s[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h + 0], t[4 * h + 2]);
        s[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        s[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
    for (int k = 0; k < 4; k++) {
        o[k] = _mm256_permute2x128_si256(s[k], s[4 + k], 0x20);
        o[4 + k] = _mm256_permute2x128_si256(s[k], s[4 + k], 0x31);
    }
}

KQ_TARGET static void kq_transpose(uint8_t *dst, const uint8_t *u) {
    __m256i r[8], o[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_load_si256((const __m256i *)(u + 32 * i));
    transpose8x8(r, o);
    for (int g = 0; g < 8; g++) _mm256_store_si256((__m256i *)(dst + 32 * g), o[g]);
}

KQ_TARGET static float kq_quantize_block(const float *v, int8_t q[32], int32_t sums[2]) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
    const __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
    const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    const float d = realm_hmax8(m) / 127.0f;
    const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    /* cvtps rounds to nearest even, as lrintf does in the scalar level */
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id));
    const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id));
    const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
    /* int32 -> int8 in element order: packs interleave 128-bit lanes; a permute undoes it */
    const __m256i p01 = _mm256_packs_epi32(i0, i1), p23 = _mm256_packs_epi32(i2, i3);
    const __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23),
                                                   _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, p);
    sums[0] = realm_hsum8i(_mm256_add_epi32(i0, i1));
    sums[1] = realm_hsum8i(_mm256_add_epi32(i2, i3));
    return d;
}

/* acc + the 8 rows' dots over groups g0 .. g0 + ng - 1 of a block, gpw groups per widening */
INLINE __m256i dots(__m256i acc, const uint8_t *wb, const int8_t *q, const int g0, const int ng,
                    const int gpw) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int g = g0; g < g0 + ng; g += gpw) {
        __m256i p = _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)(wb + g * 32)),
                                         _mm256_set1_epi32(kq_load_i32(q + 4 * g)));
        for (int k = 1; k < gpw; k++)
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(
                                        _mm256_load_si256((const __m256i *)(wb + (g + k) * 32)),
                                        _mm256_set1_epi32(kq_load_i32(q + 4 * (g + k)))));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
    }
    return acc;
}


/* 8 rows x n activation rows over kc blocks; split / has_min / gpw are constants per instance */
INLINE void tile_t(float *y, int64_t ldy, int nr, int accumulate, const uint8_t *wp,
                   const kq_act *x, int64_t xs, int64_t kc, const int n, const int split,
                   const int has_min, const int gpw) {
    __m256 f[KQ_NA];
    for (int j = 0; j < n; j++) f[j] = accumulate ? realm_load_rows8(y + j * ldy, nr) : _mm256_setzero_ps();
    for (int64_t i = 0; i < kc; i++) {
        const uint8_t *wb = wp + i * KQ_WBLK;
        const float *ab = (const float *)(wb + KQ_GROUPS);
        for (int j = 0; j < n; j++) {
            const kq_act *xb = x + j * xs + i;
            const __m256 d = _mm256_set1_ps(xb->d);
            if (split) {
                const __m256i p0 = dots(_mm256_set1_epi32(xb->c0), wb, xb->q, 0, 4, gpw < 4 ? gpw : 4);
                const __m256i p1 = dots(_mm256_set1_epi32(xb->c1), wb, xb->q, 4, 4, gpw < 4 ? gpw : 4);
                f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_mul_ps(_mm256_load_ps(ab), d), f[j]);
                f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_mul_ps(_mm256_load_ps(ab + 8), d), f[j]);
                if (has_min) {
                    f[j] = _mm256_fmadd_ps(_mm256_load_ps(ab + 16), _mm256_set1_ps(xb->s0), f[j]);
                    f[j] = _mm256_fmadd_ps(_mm256_load_ps(ab + 24), _mm256_set1_ps(xb->s1), f[j]);
                }
            } else {
                const __m256i p = dots(_mm256_set1_epi32(xb->c), wb, xb->q, 0, 8, gpw);
                f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(_mm256_load_ps(ab), d), f[j]);
                if (has_min) f[j] = _mm256_fmadd_ps(_mm256_load_ps(ab + 16), _mm256_set1_ps(xb->s), f[j]);
            }
        }
    }
    for (int j = 0; j < n; j++) realm_store_rows8(y + j * ldy, nr, f[j]);
}

#define KQ_TILE_N(split, has_min, gpw)                                                     \
    do {                                                                                   \
        if (n == KQ_NA)                                                                    \
            tile_t(y, ldy, nr, accumulate, wp, x, xs, kc, KQ_NA, split, has_min, gpw);     \
        else                                                                               \
            tile_t(y, ldy, nr, accumulate, wp, x, xs, kc, n, split, has_min, gpw);         \
    } while (0)

KQ_TARGET static void kq_tile(const kq_type *t, float *y, int64_t ldy, int nr, int accumulate,
                              const uint8_t *wp, const kq_act *x, int64_t xs, int64_t kc, int n) {
    /* int16 sums of gpw groups stay below 32767: gpw x 2 x umax x 127 */
    const int gpw = t->umax <= 15 ? 8 : t->umax <= 31 ? 4 : 2;
    if (t->split) {
        if (gpw == 2) KQ_TILE_N(1, 0, 2);        /* Q6_K */
        else if (t->has_min) KQ_TILE_N(1, 1, 4); /* Q2_K */
        else KQ_TILE_N(1, 0, 4);                 /* Q3_K */
    } else if (gpw == 8) {
        if (t->has_min) KQ_TILE_N(0, 1, 8);      /* Q4_1, Q4_K */
        else KQ_TILE_N(0, 0, 8);
    } else {
        if (t->has_min) KQ_TILE_N(0, 1, 4);      /* Q5_1, Q5_K */
        else KQ_TILE_N(0, 0, 4);                 /* Q5_0 */
    }
}
#endif
