/* Realm native kernels: blocked F32 GEMM for AVX2 + FMA + F16C (x86 only).
 *
 * The AVX2 counterpart of gemm_avx512.c, with the same contract: y (m, n) = a (m, k) . b (n, k)^T,
 * b F32, F16 or BF16 (widened to F32 while its panels are packed). Goto-style blocking with
 * sizes for the smaller caches of AVX2 parts: a KC x NC panel of b is packed into 16-wide
 * slivers (k-major) and kept in L2, an MC x KC block of a into 6-row slivers, and a 6 x 16
 * register tile (12 ymm accumulators, two for b, one broadcast) consumes one sliver of each per
 * step. Pool threads split n; each packs its own panels.
 */
#include <stdlib.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define MR 6    /* rows of a per register tile */
#define NR 16   /* rows of b (columns of y) per register tile: two ymm */
#define KC 256  /* depth of a packed panel */
#define MC 72   /* rows of a per packed block (multiple of MR) */
#define NC 256  /* rows of b per packed panel (multiple of NR): 256 KiB packed */

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

/* Pack b[j0 + j, p0 + p] for j < nc, p < kc into slivers of NR: (ceil(nc/NR), kc, NR),
 * zero-padded. 8 rows x 8 columns at a time are loaded row-wise (each source row contiguous)
 * and transposed in registers; a tail of fewer than 8 columns is copied element by element. */
REALM_AVX2
static void pack_b(float *dst, const void *b, int btype, int64_t ldb, int64_t j0, int64_t nc,
                   int64_t p0, int64_t kc) {
    const int64_t es = btype == REALM_TYPE_F32 ? 4 : 2;
    for (int64_t js = 0; js < nc; js += NR) {
        float *d = dst + js * kc;
        for (int64_t h = 0; h < NR; h += 8) {
            const uint8_t *rows[8];
            int64_t nrows = nc - js - h;
            nrows = nrows < 0 ? 0 : nrows > 8 ? 8 : nrows;
            for (int64_t j = 0; j < nrows; j++)
                rows[j] = (const uint8_t *)b + ((j0 + js + h + j) * ldb + p0) * es;
            int64_t p = 0;
            for (; p + 8 <= kc; p += 8) {
                __m256 r[8];
                for (int64_t j = 0; j < 8; j++)
                    r[j] = j < nrows ? load_row8(rows[j], btype, p) : _mm256_setzero_ps();
                transpose8(r);
                for (int64_t c = 0; c < 8; c++) _mm256_storeu_ps(d + (p + c) * NR + h, r[c]);
            }
            for (; p < kc; p++)
                for (int64_t j = 0; j < 8; j++)
                    d[p * NR + h + j] = j < nrows ? load_one(rows[j], btype, p) : 0.0f;
        }
    }
}

/* Pack a[i0 + i, p0 + p] for i < mc, p < kc into slivers of MR: (ceil(mc/MR), kc, MR),
 * zero-padded. */
REALM_AVX2
static void pack_a(float *dst, const float *a, int64_t lda, int64_t i0, int64_t mc, int64_t p0,
                   int64_t kc) {
    for (int64_t is = 0; is < mc; is += MR) {
        const int64_t in = mc - is < MR ? mc - is : MR;
        float *d = dst + is * kc;
        for (int64_t i = 0; i < MR; i++) {
            if (i < in) {
                const float *src = a + (i0 + is + i) * lda + p0;
                for (int64_t p = 0; p < kc; p++) d[p * MR + i] = src[p];
            } else {
                for (int64_t p = 0; p < kc; p++) d[p * MR + i] = 0.0f;
            }
        }
    }
}

/* y tile (mr x nr at c, row stride ldc) (+)= ap sliver . bp sliver */
REALM_AVX2
static void tile_6x16(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc,
                      int accumulate, int64_t mr, int64_t nr) {
    __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) c0[i] = c1[i] = _mm256_setzero_ps();
    for (int64_t p = 0; p < kc; p++) {
        const __m256 b0 = _mm256_load_ps(bp + p * NR), b1 = _mm256_load_ps(bp + p * NR + 8);
        const float *a = ap + p * MR;
#pragma GCC unroll 6
        for (int i = 0; i < MR; i++) {
            const __m256 av = _mm256_broadcast_ss(a + i);
            c0[i] = _mm256_fmadd_ps(av, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(av, b1, c1[i]);
        }
    }
    if (nr == NR) {
#pragma GCC unroll 6
        for (int i = 0; i < MR; i++) {
            if (i >= mr) continue;
            float *row = c + i * ldc;
            if (accumulate) {
                c0[i] = _mm256_add_ps(c0[i], _mm256_loadu_ps(row));
                c1[i] = _mm256_add_ps(c1[i], _mm256_loadu_ps(row + 8));
            }
            _mm256_storeu_ps(row, c0[i]);
            _mm256_storeu_ps(row + 8, c1[i]);
        }
        return;
    }
    float tmp[NR];
    /* unrolled like every loop over the accumulators: one indexed with a variable makes gcc
     * keep the arrays in memory and store all 12 after every step of the loop above (measured:
     * the F16 GEMM at 40% of the FMA peak, then about 80%) */
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        if (i >= mr) continue;
        _mm256_storeu_ps(tmp, c0[i]);
        _mm256_storeu_ps(tmp + 8, c1[i]);
        float *row = c + i * ldc;
        for (int64_t j = 0; j < nr; j++) row[j] = accumulate ? row[j] + tmp[j] : tmp[j];
    }
}

REALM_AVX2
int realm_gemm_f32_avx2(float *y, int64_t ldy, const float *a, int64_t lda, const void *b,
                        int btype, int64_t ldb, int64_t m, int64_t n, int64_t k, int ith,
                        int nth, atomic_int_fast64_t *next) {
    (void)next;  /* a static split: NC-wide panels, too few at hidden 576 to claim */
    const int64_t tiles = (n + NR - 1) / NR;  /* this thread's share of n, in whole tiles */
    int64_t t0, t1;
    realm_split(tiles, ith, nth, &t0, &t1);
    const int64_t j_begin = t0 * NR, j_end = t1 * NR < n ? t1 * NR : n;
    if (j_begin >= j_end) return REALM_OK;
    const int64_t es = btype == REALM_TYPE_F32 ? 4 : 2;
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
            /* fetch the next packing's weights between the tiles of this panel */
            realm_prefetcher pf;
            realm_pf_next_panel(&pf, b, es, ldb, jc, nc, pc, kc, k, j_end, NC, KC);
            const int64_t n_tiles = (nc + NR - 1) / NR * (m / MC * (MC / MR) + (m % MC + MR - 1) / MR);
            const int64_t per = realm_pf_lines(&pf) / n_tiles + 1;
            for (int64_t ic = 0; ic < m; ic += MC) {
                const int64_t mc = m - ic < MC ? m - ic : MC;
                pack_a(ap, a, lda, ic, mc, pc, kc);
                for (int64_t jr = 0; jr < nc; jr += NR) {
                    const int64_t nr = nc - jr < NR ? nc - jr : NR;
                    for (int64_t ir = 0; ir < mc; ir += MR) {
                        const int64_t mr = mc - ir < MR ? mc - ir : MR;
                        realm_pf_step(&pf, per);
                        tile_6x16(kc, ap + ir * kc, bp + jr * kc, y + (ic + ir) * ldy + jc + jr,
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
