/* Realm native kernels: blocked F32 GEMM for AVX2 + FMA + F16C (x86 only).
 *
 * The AVX2 counterpart of gemm_avx512.c, with the same contract and scheme: y (m, n) =
 * a (m, k) . b (n, k)^T, b F32, F16 or BF16. A 6 x 16 register tile (12 ymm accumulators, two
 * activation vectors, one broadcast) multiplies 6 weight rows, packed row by row and widened
 * to F32 (no transpose), with 16 activation rows, transposed once per call into k-major
 * slivers (a last one of 8 where m leaves 8 or fewer). The driver, shared with the AVX-512
 * level, is gemm_f32.inc.
 */
#include <stdlib.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define RW 6    /* weight rows per register tile */
#define KC 128  /* depth of a packed block: a sliver's 16 x KC activations (8 KiB) stay in L1 */
#define MCH 512 /* activation rows per chunk: bounds the packed copy (MCH x k floats) */
#define PF_ROWS 16 /* rows ahead that pack_weights fetches into L1 */
#define NP 96   /* weight rows per panel (multiple of RW): 48 KiB packed */

/* 8 rows of 8 floats -> 8 columns, in registers */
REALM_AVX2
static inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* 8 elements p.. of a row of b, widened to F32 */
REALM_AVX2
static inline __m256 load_row8(const void *src, int btype, int64_t p) {
    if (btype == REALM_TYPE_F32) return _mm256_loadu_ps((const float *)src + p);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + p));
    if (btype == REALM_TYPE_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); /* BF16 */
}

REALM_AVX2
static inline float load_one(const void *src, int btype, int64_t p) {
    if (btype == REALM_TYPE_F32) return ((const float *)src)[p];
    const uint16_t h = ((const uint16_t *)src)[p];
    return btype == REALM_TYPE_F16 ? realm_f16_to_f32(h) : realm_bf16_to_f32(h);
}

/* The activations' slivers: sliver s holds rows 16s.. (width w = 16, or 8 for a last short
 * one), element (i, p) at sliver + p * w + i; rows past m are zeros. */
static inline int64_t sliver_width(int64_t m, int64_t s) { return m - 16 * s > 8 ? 16 : 8; }

REALM_AVX2
static void pack_acts(float *dst, const float *a, int64_t lda, int64_t m, int64_t k) {
    for (int64_t s = 0; 16 * s < m; s++) {
        const int64_t w = sliver_width(m, s);
        float *d = dst + s * 16 * k;
        for (int64_t h = 0; h < w; h += 8) {
            const int64_t i0 = 16 * s + h;
            const int64_t rows = m - i0 < 0 ? 0 : m - i0 > 8 ? 8 : m - i0;
            int64_t p = 0;
            for (; p + 8 <= k; p += 8) {
                __m256 r[8];
                for (int64_t i = 0; i < 8; i++)
                    r[i] = i < rows ? _mm256_loadu_ps(a + (i0 + i) * lda + p) : _mm256_setzero_ps();
                transpose8(r);
                for (int64_t c = 0; c < 8; c++) _mm256_storeu_ps(d + (p + c) * w + h, r[c]);
            }
            for (; p < k; p++)
                for (int64_t i = 0; i < 8; i++) d[p * w + h + i] = i < rows ? a[(i0 + i) * lda + p] : 0.0f;
        }
    }
}

/* Weight rows j0.. (nr of them; up to a whole number of tiles, zeros past nr), columns p0..
 * p0 + kc, widened to F32, row stride KC. */
REALM_AVX2
static void pack_weights(float *dst, const void *b, int btype, int64_t ldb, int64_t j0,
                         int64_t nr, int64_t p0, int64_t kc) {
    const int64_t es = btype == REALM_TYPE_F32 ? 4 : 2;
    const int64_t rows = (nr + RW - 1) / RW * RW;
    for (int64_t r = 0; r < rows; r++) {
        float *d = dst + r * KC;
        if (r >= nr) {
            memset(d, 0, sizeof(float) * (size_t)kc);
            continue;
        }
        const uint8_t *src = (const uint8_t *)b + ((j0 + r) * ldb + p0) * es;
        if (r + PF_ROWS < nr)  /* a later row of this packing, in case the L2 prefetch missed */
            for (int64_t o = 0; o < kc * es; o += 64)
                _mm_prefetch((const char *)src + PF_ROWS * ldb * es + o, _MM_HINT_T0);
        int64_t p = 0;
        for (; p + 8 <= kc; p += 8) _mm256_store_ps(d + p, load_row8(src, btype, p));
        for (; p < kc; p++) d[p] = load_one(src, btype, p);
    }
}

/* yt[r * ldt + i] (+)= sum_p w[r * KC + p] * x[p * (8 H) + i] for r < RW, i < 8 H. The loops
 * over the accumulators are unrolled: one indexed with a variable makes gcc keep them in
 * memory (measured: the F16 GEMM at 40% of the FMA peak, then about 80%). */
#define TILE(H)                                                                               \
    REALM_AVX2                                                                                \
    static void tile_##H(float *yt, int64_t ldt, const float *w, const float *x, int64_t kc,  \
                         int accumulate) {                                                    \
        __m256 c[RW][H];                                                                      \
        _Pragma("GCC unroll 6") for (int r = 0; r < RW; r++)                                  \
            _Pragma("GCC unroll 2") for (int h = 0; h < H; h++) c[r][h] =                     \
                accumulate ? _mm256_load_ps(yt + r * ldt + 8 * h) : _mm256_setzero_ps();      \
        for (int64_t p = 0; p < kc; p++) {                                                    \
            __m256 xv[H];                                                                     \
            _Pragma("GCC unroll 2") for (int h = 0; h < H; h++) xv[h] =                       \
                _mm256_load_ps(x + p * 8 * H + 8 * h);                                        \
            _Pragma("GCC unroll 6") for (int r = 0; r < RW; r++) {                            \
                const __m256 wv = _mm256_broadcast_ss(w + r * KC + p);                        \
                _Pragma("GCC unroll 2") for (int h = 0; h < H; h++) c[r][h] =                 \
                    _mm256_fmadd_ps(wv, xv[h], c[r][h]);                                      \
            }                                                                                 \
        }                                                                                     \
        _Pragma("GCC unroll 6") for (int r = 0; r < RW; r++)                                  \
            _Pragma("GCC unroll 2") for (int h = 0; h < H; h++)                               \
                _mm256_store_ps(yt + r * ldt + 8 * h, c[r][h]);                               \
    }
TILE(1)
TILE(2)
#undef TILE

/* The panel's result (yt: nr rows of mc, row stride ldt), transposed back into y (the
 * panel's first element, row stride ldy) */
REALM_AVX2
static void write_back(float *y, int64_t ldy, const float *yt, int64_t ldt, int64_t nr,
                       int64_t mc) {
    /* the panel's result, transposed back: 8 x 8 blocks through registers */
    for (int64_t r0 = 0; r0 < nr; r0 += 8) {
        const int64_t rr = nr - r0 < 8 ? nr - r0 : 8;
        for (int64_t c0 = 0; c0 < mc; c0 += 8) {
            const int64_t ii = mc - c0 < 8 ? mc - c0 : 8;
            if (rr == 8 && ii == 8) {
                __m256 v[8];
                for (int64_t r = 0; r < 8; r++) v[r] = _mm256_load_ps(yt + (r0 + r) * ldt + c0);
                transpose8(v);
                for (int64_t i = 0; i < 8; i++)
                    _mm256_storeu_ps(y + (c0 + i) * ldy + r0, v[i]);
            } else {
                for (int64_t i = 0; i < ii; i++)
                    for (int64_t r = 0; r < rr; r++)
                        y[(c0 + i) * ldy + r0 + r] = yt[(r0 + r) * ldt + c0 + i];
            }
        }
    }
}

#define SW 16  /* activation rows per sliver: two vectors */
#define GEMM_FN realm_gemm_f32_avx2
#define GEMM_ATTR REALM_AVX2
#include "gemm_f32.inc"
#endif
