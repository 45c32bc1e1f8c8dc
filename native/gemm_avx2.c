/* Realm native kernels: blocked F32 GEMM for AVX2 + FMA + F16C (x86 only).
 *
 * The AVX2 counterpart of gemm_avx512.c, with the same contract and scheme: y (m, n) =
 * a (m, k) . b (n, k)^T, b F32, F16 or BF16. A 6 x 16 register tile (12 ymm accumulators, two
 * activation vectors, one broadcast) multiplies 6 weight rows, packed row by row and widened
 * to F32 (no transpose), with 16 activation rows, transposed once per call into k-major
 * slivers (a last one of 8 where m leaves 8 or fewer). Tiles accumulate a panel's result
 * transposed over the KC blocks of k; it is written to y at the end. Pool threads split the
 * panels; the next packing's weights are prefetched between tiles.
 */
#include <stdlib.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define RW 6    /* weight rows per register tile */
#define KC 128  /* depth of a packed block: a sliver's 16 x KC activations (8 KiB) stay in L1 */
#define MCH 512 /* activation rows per chunk: bounds the packed copy (MCH x k floats) */
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

REALM_AVX2
int realm_gemm_f32_avx2(float *y, int64_t ldy, const float *a, int64_t lda, const void *b,
                        int btype, int64_t ldb, int64_t m, int64_t n, int64_t k, int ith,
                        int nth, atomic_int_fast64_t *next) {
    /* work items: (chunk of at most MCH activation rows, panel of NP weight rows) */
    const int64_t panels = (n + NP - 1) / NP, chunks = (m + MCH - 1) / MCH;
    const int64_t items = chunks * panels;
    int64_t q_begin = 0, q_end = items;  /* without a shared counter: a static share */
    if (!next) realm_split(items, ith, nth, &q_begin, &q_end);
    const int64_t es = btype == REALM_TYPE_F32 ? 4 : 2;
    const int64_t mmax = m < MCH ? m : MCH, mpad = (mmax + 15) / 16 * 16;
    float *ap = aligned_alloc(64, sizeof(float) * (size_t)(mpad * k));
    float *wp = aligned_alloc(64, sizeof(float) * NP * KC);
    float *yt = aligned_alloc(64, sizeof(float) * (size_t)(NP * mpad));
    if (!ap || !wp || !yt) {
        free(ap);
        free(wp);
        free(yt);
        return REALM_ENOMEM;
    }
    int64_t packed = -1;  /* the chunk whose activations ap holds */
    int64_t q = next ? atomic_fetch_add(next, 1) : q_begin;
    while (q < (next ? items : q_end)) {
        const int64_t ch = q / panels, pi = q % panels;
        const int64_t i0 = ch * MCH, mc = m - i0 < MCH ? m - i0 : MCH;
        const int64_t slivers = (mc + 15) / 16, ldt = slivers * 16;  /* yt's row stride */
        if (packed != ch) {
            pack_acts(ap, a + i0 * lda, lda, mc, k);
            packed = ch;
        }
        const int64_t j0 = pi * NP, nr = n - j0 < NP ? n - j0 : NP;
        const int64_t tiles_r = (nr + RW - 1) / RW;
        const int64_t qn = next ? atomic_fetch_add(next, 1) : q + 1;  /* claimed now, fetched ahead */
        const int64_t pn = qn % panels;
        for (int64_t pc = 0; pc < k; pc += KC) {
            const int64_t kc = k - pc < KC ? k - pc : KC;
            pack_weights(wp, b, btype, ldb, j0, nr, pc, kc);
            realm_prefetcher pf;  /* what the next packing reads */
            if (pc + kc < k)
                realm_pf_start(&pf, (const uint8_t *)b + (j0 * ldb + pc + kc) * es, nr, ldb * es,
                               (k - pc - kc < KC ? k - pc - kc : KC) * es);
            else if (qn < (next ? items : q_end))
                realm_pf_start(&pf, (const uint8_t *)b + pn * NP * ldb * es,
                               n - pn * NP < NP ? n - pn * NP : NP, ldb * es,
                               (k < KC ? k : KC) * es);
            else
                realm_pf_start(&pf, NULL, 0, 0, 0);
            const int64_t per = realm_pf_lines(&pf) / (tiles_r * slivers) + 1;
            for (int64_t s = 0; s < slivers; s++) {
                const int64_t w = sliver_width(mc, s);
                const float *xs = ap + s * 16 * k + pc * w;
                for (int64_t t = 0; t < tiles_r; t++) {
                    realm_pf_step(&pf, per);
                    float *yts = yt + t * RW * ldt + 16 * s;
                    if (w == 16)
                        tile_2(yts, ldt, wp + t * RW * KC, xs, kc, pc > 0);
                    else
                        tile_1(yts, ldt, wp + t * RW * KC, xs, kc, pc > 0);
                }
            }
        }
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
                        _mm256_storeu_ps(y + (i0 + c0 + i) * ldy + j0 + r0, v[i]);
                } else {
                    for (int64_t i = 0; i < ii; i++)
                        for (int64_t r = 0; r < rr; r++)
                            y[(i0 + c0 + i) * ldy + j0 + r0 + r] = yt[(r0 + r) * ldt + c0 + i];
                }
            }
        }
        q = qn;
    }
    free(ap);
    free(wp);
    free(yt);
    return REALM_OK;
}
#endif
