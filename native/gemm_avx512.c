/* Realm native kernels: blocked F32 GEMM for AVX-512 (x86 only).
 *
 * y (m, n) = a (m, k) . b (n, k)^T, i.e. activations times the transpose of a weight matrix
 * stored row by row, as the matmul entry point sees them; b may be F32, F16 or BF16.
 *
 * The register tile broadcasts weights and multiplies them with activation vectors: 14 weight
 * rows x 32 activation rows (28 zmm accumulators), y's transpose, per step of k. So
 *  - the weights are packed row by row (a panel of NP rows x KC columns, row stride KC,
 *    widened to F32): no transpose, and a tile reads each of its rows' values with one
 *    broadcast at an immediate offset from a single pointer;
 *  - the activations are transposed once per call, in chunks of at most 512 rows (each thread
 *    packs each chunk it works on: k-major slivers of 32 rows, a last sliver of 16 where the
 *    chunk leaves 16 or fewer), a small cost beside the weights, which are n / 16 times larger
 *    at prefill shapes;
 *  - a prefill of 32 or 64 rows fills whole tiles (the row count is a multiple of 16 or 32).
 * Tiles accumulate a panel's result transposed (NP x m, in cache) over the KC blocks of k;
 * it is written to y at the end. Pool threads claim panels from a shared counter (a noisy
 * core takes fewer), and prefetch the next packing's weights between tiles.
 * The driver (work items, packing, prefetch, tiles) is gemm_f32.inc, shared with AVX2.
 * (An earlier version broadcast activations against 32 packed weight columns: its packing
 * transposed every weight element, a fifth of the time of a 64-row prefill.)
 */
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define RW 14   /* weight rows per register tile */
#define KC 128  /* depth of a packed block: a sliver's 32 x KC activations (16 KiB) stay in L1 */
#define MCH 512 /* activation rows per chunk: bounds the packed copy (MCH x k floats) */
#define PF_ROWS 16 /* rows ahead that pack_weights fetches into L1 */
#define NP 112  /* weight rows per panel (multiple of RW): 56 KiB packed */

REALM_AVX512
static inline __m512 load16(const void *src, int btype, int64_t p, __mmask16 m) {
    if (btype == REALM_TYPE_F32) return _mm512_maskz_loadu_ps(m, (const float *)src + p);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)src + p);
    if (btype == REALM_TYPE_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  /* BF16 */
}

/* 16 rows of 16 floats -> 16 columns of 16 floats, in registers (3 shuffle stages). */
REALM_AVX512
static inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int k = 0; k < 8; k++) {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    /* u[4k + c], 128-bit lane L: column 4L + c of rows 4k..4k+3 */
    for (int k = 0; k < 4; k++) {
        u[4 * k + 0] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
        u[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
        u[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
        u[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
    }
    for (int c = 0; c < 4; c++) {
        const __m512 p0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
        const __m512 q0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
        const __m512 p1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
        const __m512 q1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_f32x4(p0, p1, 0x88);      /* column c */
        r[8 + c] = _mm512_shuffle_f32x4(p0, p1, 0xDD);  /* column 8 + c */
        r[4 + c] = _mm512_shuffle_f32x4(q0, q1, 0x88);  /* column 4 + c */
        r[12 + c] = _mm512_shuffle_f32x4(q0, q1, 0xDD); /* column 12 + c */
    }
}

/* The activations' slivers: sliver s holds rows 32s.. (width w = 32, or 16 for a last short
 * one), element (i, p) at sliver + p * w + i; rows past m are zeros. */
static inline int64_t sliver_width(int64_t m, int64_t s) { return m - 32 * s > 16 ? 32 : 16; }

REALM_AVX512
static void pack_acts(float *dst, const float *a, int64_t lda, int64_t m, int64_t k) {
    for (int64_t s = 0; 32 * s < m; s++) {
        const int64_t w = sliver_width(m, s);
        float *d = dst + s * 32 * k;
        for (int64_t h = 0; h < w; h += 16) {
            const int64_t i0 = 32 * s + h;
            const int64_t rows = m - i0 < 0 ? 0 : m - i0 > 16 ? 16 : m - i0;
            for (int64_t p = 0; p < k; p += 16) {
                const int64_t cols = k - p < 16 ? k - p : 16;
                const __mmask16 cm = (__mmask16)((1u << cols) - 1u);
                __m512 r[16];
                for (int64_t i = 0; i < 16; i++)
                    r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, a + (i0 + i) * lda + p)
                                    : _mm512_setzero_ps();
                transpose16(r);
                for (int64_t c = 0; c < cols; c++) _mm512_storeu_ps(d + (p + c) * w + h, r[c]);
            }
        }
    }
}

/* Weight rows j0.. (nr of them; up to a whole number of tiles, zeros past nr), columns p0..
 * p0 + kc, widened to F32, row stride KC. */
REALM_AVX512
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
        for (; p + 16 <= kc; p += 16) _mm512_store_ps(d + p, load16(src, btype, p, 0xffff));
        if (p < kc)
            _mm512_store_ps(d + p, load16(src, btype, p, (__mmask16)((1u << (kc - p)) - 1u)));
    }
}

/* yt[r * ldt + i] (+)= sum_p w[r * KC + p] * x[p * (16 H) + i] for r < RW, i < 16 H. */
#define TILE(H)                                                                               \
    REALM_AVX512                                                                              \
    static void tile_##H(float *yt, int64_t ldt, const float *w, const float *x, int64_t kc,  \
                         int accumulate) {                                                    \
        __m512 c[RW][H];                                                                      \
        _Pragma("GCC unroll 14") for (int r = 0; r < RW; r++)                                 \
            _Pragma("GCC unroll 2") for (int h = 0; h < H; h++) c[r][h] =                     \
                accumulate ? _mm512_load_ps(yt + r * ldt + 16 * h) : _mm512_setzero_ps();     \
        for (int64_t p = 0; p < kc; p++) {                                                    \
            __m512 xv[H];                                                                     \
            _Pragma("GCC unroll 2") for (int h = 0; h < H; h++) xv[h] =                       \
                _mm512_load_ps(x + p * 16 * H + 16 * h);                                      \
            _Pragma("GCC unroll 14") for (int r = 0; r < RW; r++) {                           \
                const __m512 wv = _mm512_set1_ps(w[r * KC + p]);                              \
                _Pragma("GCC unroll 2") for (int h = 0; h < H; h++) c[r][h] =                 \
                    _mm512_fmadd_ps(wv, xv[h], c[r][h]);                                      \
            }                                                                                 \
        }                                                                                     \
        _Pragma("GCC unroll 14") for (int r = 0; r < RW; r++)                                 \
            _Pragma("GCC unroll 2") for (int h = 0; h < H; h++)                               \
                _mm512_store_ps(yt + r * ldt + 16 * h, c[r][h]);                              \
    }
TILE(1)
TILE(2)
#undef TILE

/* The panel's result (yt: nr rows of mc, row stride ldt), transposed back into y (the
 * panel's first element, row stride ldy) */
REALM_AVX512
static void write_back(float *y, int64_t ldy, const float *yt, int64_t ldt, int64_t nr,
                       int64_t mc) {
    /* the panel's result, transposed back: 16 x 16 blocks through registers */
    for (int64_t r0 = 0; r0 < nr; r0 += 16) {
        const int64_t rr = nr - r0 < 16 ? nr - r0 : 16;
        const __mmask16 rm = (__mmask16)((1u << rr) - 1u);
        for (int64_t c0 = 0; c0 < mc; c0 += 16) {
            const int64_t ii = mc - c0 < 16 ? mc - c0 : 16;
            __m512 v[16];
            for (int64_t r = 0; r < 16; r++)
                v[r] = r < rr ? _mm512_load_ps(yt + (r0 + r) * ldt + c0) : _mm512_setzero_ps();
            transpose16(v);
            for (int64_t i = 0; i < ii; i++)
                _mm512_mask_storeu_ps(y + (c0 + i) * ldy + r0, rm, v[i]);
        }
    }
}

#define SW 32  /* activation rows per sliver: two vectors */
#define GEMM_FN realm_gemm_f32_avx512
#define GEMM_ATTR REALM_AVX512
#include "gemm_f32.inc"
#endif
