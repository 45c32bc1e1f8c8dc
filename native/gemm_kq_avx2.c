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
