/* Realm native kernels: the types of quants.c times a large batch, AVX-512 VNNI (gemm_kq.inc
 * has the scheme and layouts). 16 weight rows per panel: one vpdpbusd gives a 4-element
 * partial dot for the 16 rows against one broadcast 4-byte group of an activation row; the
 * weights u (0 .. 255) are the unsigned operand, the activation codes the signed one.
 */
#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define KQ_TARGET REALM_AVX512_VNNI
#define KQ_PR 16
#define KQ_KC 32        /* 32 blocks x 768 bytes: 24 KiB of packed weights, in L1 */
#define KQ_UMAX 255     /* vpdpbusd takes any unsigned byte */
#define KQ_GEMM realm_gemm_kq_avx512
#define KQ_SUPPORTS realm_gemm_kq_avx512_supports
#include "gemm_kq.inc"

#define INLINE static inline __attribute__((always_inline)) REALM_AVX512_VNNI

/* 16 rows x n activation rows over kc blocks; split / has_min are constants per instance */
INLINE void tile_t(float *y, int64_t ldy, int nr, int accumulate, const uint8_t *wp,
                   const kq_act *x, int64_t xs, int64_t kc, const int n, const int split,
                   const int has_min) {
    const __mmask16 m = (__mmask16)((1u << nr) - 1u);
    __m512 f[KQ_NA];
    for (int j = 0; j < n; j++)
        f[j] = accumulate ? _mm512_maskz_loadu_ps(m, y + j * ldy) : _mm512_setzero_ps();
    for (int64_t i = 0; i < kc; i++) {
        const uint8_t *wb = wp + i * KQ_WBLK;
        __m512i w[8];
        for (int g = 0; g < 8; g++) w[g] = _mm512_load_si512((const void *)(wb + g * 64));
        const float *ab = (const float *)(wb + KQ_GROUPS);
        const __m512 a0 = _mm512_load_ps(ab), b0 = _mm512_load_ps(ab + 32);
        for (int j = 0; j < n; j++) {
            const kq_act *xb = x + j * xs + i;
            const __m512 d = _mm512_set1_ps(xb->d);
            if (split) {
                const __m512 a1 = _mm512_load_ps(ab + 16);
                __m512i p0 = _mm512_set1_epi32(xb->c0), p1 = _mm512_set1_epi32(xb->c1);
                for (int g = 0; g < 4; g++) {
                    p0 = _mm512_dpbusd_epi32(p0, w[g], _mm512_set1_epi32(kq_load_i32(xb->q + 4 * g)));
                    p1 = _mm512_dpbusd_epi32(p1, w[4 + g], _mm512_set1_epi32(kq_load_i32(xb->q + 16 + 4 * g)));
                }
                f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_mul_ps(a0, d), f[j]);
                f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_mul_ps(a1, d), f[j]);
                if (has_min) {
                    f[j] = _mm512_fmadd_ps(b0, _mm512_set1_ps(xb->s0), f[j]);
                    f[j] = _mm512_fmadd_ps(_mm512_load_ps(ab + 48), _mm512_set1_ps(xb->s1), f[j]);
                }
            } else {
                __m512i p = _mm512_set1_epi32(xb->c);
                for (int g = 0; g < 8; g++)
                    p = _mm512_dpbusd_epi32(p, w[g], _mm512_set1_epi32(kq_load_i32(xb->q + 4 * g)));
                f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(a0, d), f[j]);
                if (has_min) f[j] = _mm512_fmadd_ps(b0, _mm512_set1_ps(xb->s), f[j]);
            }
        }
    }
    for (int j = 0; j < n; j++) _mm512_mask_storeu_ps(y + j * ldy, m, f[j]);
}

#define KQ_TILE_N(split, has_min)                                                          \
    do {                                                                                   \
        if (n == KQ_NA)                                                                    \
            tile_t(y, ldy, nr, accumulate, wp, x, xs, kc, KQ_NA, split, has_min);          \
        else                                                                               \
            tile_t(y, ldy, nr, accumulate, wp, x, xs, kc, n, split, has_min);              \
    } while (0)

KQ_TARGET static void kq_tile(const kq_type *t, float *y, int64_t ldy, int nr, int accumulate,
                              const uint8_t *wp, const kq_act *x, int64_t xs, int64_t kc, int n) {
    if (t->split) {
        if (t->has_min) KQ_TILE_N(1, 1);
        else KQ_TILE_N(1, 0);
    } else {
        if (t->has_min) KQ_TILE_N(0, 1);
        else KQ_TILE_N(0, 0);
    }
}
#endif
