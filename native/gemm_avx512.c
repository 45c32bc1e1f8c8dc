/* Realm native kernels: blocked F32 GEMM for AVX-512 (x86 only).
 *
 * y (m, n) = a (m, k) . b (n, k)^T, i.e. activations times the transpose of a weight matrix
 * stored row by row, as the matmul entry point sees them; b may be F32, F16 or BF16 (widened
 * to F32 while its panels are packed). Goto-style blocking: a KC x NC
 * panel of b is packed (transposed into 32-wide slivers, k-major) and kept in L2; an MC x KC
 * block of a is packed into 12-row slivers; a 12 x 32 register tile (24 zmm accumulators)
 * consumes one sliver of each per step. Pool threads split n; each packs its own panels.
 */
#include <stdlib.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define MR 14   /* rows of a per register tile */
#define NR 32   /* rows of b (columns of y) per register tile: two zmm */
#define KC 256  /* depth of a packed panel */
#define MC 112  /* rows of a per packed block (multiple of MR) */
#define NC 512  /* rows of b per packed panel (multiple of NR): 512 KiB at KC, half of a Zen 4 L2 */

/* Pack b[j0 + j, p0 + p] for j < nc, p < kc into slivers of NR: (nc/NR, kc, NR), zero-padded.
 * Each source row is read contiguously: rows of b lie ldb floats apart (often a power of two),
 * and reading 32 of them in step would put every load in the same L1 set. */
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

REALM_AVX512
static inline __m512 load_row16(const void *src, int btype, int64_t p, __mmask16 m) {
    if (btype == REALM_TYPE_F32) return _mm512_maskz_loadu_ps(m, (const float *)src + p);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)src + p);
    if (btype == REALM_TYPE_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  /* BF16 */
}

/* Pack b[j0 + j, p0 + p] for j < nc, p < kc into slivers of NR: (nc/NR, kc, NR), zero-padded,
 * widening F16/BF16 to F32. 16 rows x 16 columns at a time are loaded row-wise (each source row
 * contiguous) and transposed in registers, so the packed sliver is written 64 bytes at a time. */
REALM_AVX512
static void pack_b(float *dst, const void *b, int btype, int64_t ldb, int64_t j0, int64_t nc,
                   int64_t p0, int64_t kc) {
    const int64_t es = btype == REALM_TYPE_F32 ? 4 : 2;
    for (int64_t js = 0; js < nc; js += NR) {
        float *d = dst + js * kc;
        for (int64_t h = 0; h < NR; h += 16) {
            const uint8_t *rows[16];
            int64_t nrows = nc - js - h;
            nrows = nrows < 0 ? 0 : nrows > 16 ? 16 : nrows;
            for (int64_t j = 0; j < nrows; j++)
                rows[j] = (const uint8_t *)b + ((j0 + js + h + j) * ldb + p0) * es;
            for (int64_t p = 0; p < kc; p += 16) {
                const int64_t cols = kc - p < 16 ? kc - p : 16;
                const __mmask16 m = (__mmask16)((1u << cols) - 1u);
                __m512 r[16];
                for (int64_t j = 0; j < 16; j++)
                    r[j] = j < nrows ? load_row16(rows[j], btype, p, m) : _mm512_setzero_ps();
                transpose16(r);
                for (int64_t c = 0; c < cols; c++) _mm512_storeu_ps(d + (p + c) * NR + h, r[c]);
            }
        }
    }
}

/* Pack a[i0 + i, p0 + p] for i < mc, p < kc into slivers of MR: (mc/MR, kc, MR), zero-padded. */
REALM_AVX512
static void pack_a(float *dst, const float *a, int64_t lda, int64_t i0, int64_t mc, int64_t p0,
                   int64_t kc) {
    for (int64_t is = 0; is < mc; is += MR) {
        const int64_t in = mc - is < MR ? mc - is : MR;
        float *d = dst + is * kc;
        for (int64_t i = 0; i < MR; i++) {
            if (i < in) {
                const float *src = a + (i0 + is + i) * lda + p0;
                for (int64_t p = 0; p < kc; p += 16) __builtin_prefetch(src + lda + p);
                for (int64_t p = 0; p < kc; p++) d[p * MR + i] = src[p];
            } else {
                for (int64_t p = 0; p < kc; p++) d[p * MR + i] = 0.0f;
            }
        }
    }
}

REALM_AVX512
static inline __mmask16 mask_n(int64_t nr, int half) {
    int64_t r = nr - 16 * half;
    if (r <= 0) return 0;
    if (r >= 16) return 0xffff;
    return (__mmask16)((1u << r) - 1u);
}

/* y tile (mr x nr at c, row stride ldc) (+)= ap sliver . bp sliver */
REALM_AVX512
static void tile_mr_x32(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc,
                       int accumulate, int64_t mr, int64_t nr) {
    __m512 c0[MR], c1[MR];
#pragma GCC unroll 14
    for (int i = 0; i < MR; i++) c0[i] = c1[i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kc; p++) {
        const __m512 b0 = _mm512_load_ps(bp + p * NR), b1 = _mm512_load_ps(bp + p * NR + 16);
        const float *a = ap + p * MR;
#pragma GCC unroll 14
        for (int i = 0; i < MR; i++) {
            const __m512 av = _mm512_set1_ps(a[i]);
            c0[i] = _mm512_fmadd_ps(av, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(av, b1, c1[i]);
        }
    }
    const __mmask16 m0 = mask_n(nr, 0), m1 = mask_n(nr, 1);
#pragma GCC unroll 14
    for (int i = 0; i < MR; i++) {  /* unrolled: the accumulators stay in registers */
        if (i >= mr) continue;
        float *row = c + i * ldc;
        if (accumulate) {
            c0[i] = _mm512_add_ps(c0[i], _mm512_maskz_loadu_ps(m0, row));
            c1[i] = _mm512_add_ps(c1[i], _mm512_maskz_loadu_ps(m1, row + 16));
        }
        _mm512_mask_storeu_ps(row, m0, c0[i]);
        _mm512_mask_storeu_ps(row + 16, m1, c1[i]);
    }
}

REALM_AVX512
int realm_gemm_f32_avx512(float *y, int64_t ldy, const float *a, int64_t lda, const void *b,
                          int btype, int64_t ldb, int64_t m, int64_t n, int64_t k, int ith,
                          int nth) {
    /* this thread's share of n, in whole register tiles */
    const int64_t tiles = (n + NR - 1) / NR;
    int64_t t0, t1;
    realm_split(tiles, ith, nth, &t0, &t1);
    const int64_t j_begin = t0 * NR, j_end = t1 * NR < n ? t1 * NR : n;
    if (j_begin >= j_end) return REALM_OK;
    float *ap = aligned_alloc(64, sizeof(float) * MC * KC);
    float *bp = aligned_alloc(64, sizeof(float) * NC * KC);
    if (!ap || !bp) {
        free(ap);
        free(bp);
        return REALM_ENOMEM;
    }
    for (int64_t jc = j_begin; jc < j_end; jc += NC) {
        const int64_t nc = j_end - jc < NC ? j_end - jc : NC;
        for (int64_t pc = 0; pc < k; pc += KC) {
            const int64_t kc = k - pc < KC ? k - pc : KC;
            pack_b(bp, b, btype, ldb, jc, nc, pc, kc);
            for (int64_t ic = 0; ic < m; ic += MC) {
                const int64_t mc = m - ic < MC ? m - ic : MC;
                pack_a(ap, a, lda, ic, mc, pc, kc);
                for (int64_t jr = 0; jr < nc; jr += NR) {
                    const int64_t nr = nc - jr < NR ? nc - jr : NR;
                    for (int64_t ir = 0; ir < mc; ir += MR) {
                        const int64_t mr = mc - ir < MR ? mc - ir : MR;
                        tile_mr_x32(kc, ap + ir * kc, bp + jr * kc, y + (ic + ir) * ldy + jc + jr,
                                   ldy, pc > 0, mr, nr);
                    }
                }
            }
        }
    }
    free(ap);
    free(bp);
    return REALM_OK;
}
#endif
