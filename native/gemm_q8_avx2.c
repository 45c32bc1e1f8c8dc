/* Realm native kernels: Q8_0 / Q4_0 weights times a large batch of activation rows, AVX2 (x86
 * CPUs without AVX-512: no VNNI). The prefill path of realm_matmul at the AVX2 level, and, at
 * the end, the product of interleaved weight panels (packed.c) at every batch size.
 *
 * The scheme is gemm_q8_avx512.c's with 8 weight rows per panel (one ymm of int32 lanes): the
 * weights of 8 output rows are interleaved so that one product instruction computes a 4-byte
 * partial dot for the 8 rows at once against a broadcast 4-byte group of one activation row.
 * After a block's 8 groups the 8 int32 lanes are the 8 rows' block dots for that activation
 * row: converted, scaled by (8 weight scales) x (the activation block's scale) and added into
 * an 8-row float accumulator. No horizontal reductions.
 *
 * Products without VNNI: vpmaddubsw multiplies unsigned by signed bytes into saturating int16
 * pairs, then vpmaddwd by ones widens pairs to int32.
 *   Q4_0: the nibbles q (0..15) are the unsigned side and the activations the signed one, so
 *     a pair is at most 2 x 15 x 127 and the 8 groups of a block can be summed in int16
 *     (8 x 3810 < 32767) before one widening; the weights' offset 8 comes back with an int32
 *     correction per activation block, -8 * sum(q), that starts the accumulator.
 *   Q8_0: codes are signed on both sides; the unsigned side is |w| and the signed one the
 *     activation with w's sign (vpsignb), as llama.cpp does, so a pair is at most
 *     2 x 128 x 127 < 32767. Each group is widened on its own (two groups could overflow).
 *     The packed panel holds w and |w|.
 *
 * Layouts, made per call:
 *   activations: (batch, nb) records of 40 bytes {int32 corr; float d; int8 q[32]}, quantized
 *     with the numerics of every level (scale amax / 127, round to nearest even);
 *   weights: panels of 8 rows x KC blocks, each block WBLK bytes: 8 groups of 32 bytes (group g
 *     holds elements 4g..4g+3 of rows 0..7; Q8_0: signed codes, then 8 more groups of |codes|;
 *     Q4_0: nibbles), then the 8 rows' scales as floats. Missing rows of a short last panel are
 *     zeros with scale 0; their outputs are not stored.
 *
 * Each output element is summed block by block in order whatever the thread count.
 */
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"
#include "simd_avx2.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define AVX2_FN REALM_AVX2
#define INLINE static inline __attribute__((always_inline)) REALM_AVX2

#define PR 8             /* weight rows per panel: one ymm of int32 lanes */
#define KC 64            /* blocks per packed panel: at most 64 x 544 B = 34 KiB */
#define NA 8             /* activation rows per register tile */
#define WBLK_Q8 544      /* 8 groups of codes + 8 groups of |codes| + 8 scales */
#define WBLK_Q4 288      /* 8 groups of nibbles + 8 scales */
#define XREC 40          /* bytes per quantized activation block */

typedef struct {
    int32_t corr;  /* -8 * sum(q) for Q4_0, 0 for Q8_0 */
    float d;       /* scale */
    int8_t q[QK];
} q8b;
_Static_assert(sizeof(q8b) == XREC, "q8b is 40 bytes");

AVX2_FN static void quantize_row(q8b *out, const float *src, int64_t nb, int32_t off) {
    for (int64_t i = 0; i < nb; i++) {
        int32_t sums[2];
        out[i].d = realm_q8_block32(src + i * QK, out[i].q, sums);
        out[i].corr = -off * (sums[0] + sums[1]);
    }
}

/* ---- weights ---- */

/* g[k] = dword k of each of the 8 rows (row r's 16 bytes at q + r * rb): 4 groups of 8 rows */
AVX2_FN static inline void gather_groups(const uint8_t *q, int64_t rb, __m256i g[4]) {
    __m256i z[4];
    for (int a = 0; a < 4; a++)  /* lane 0: row a, lane 1: row 4 + a */
        z[a] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(q + a * rb))),
                                       _mm_loadu_si128((const __m128i *)(q + (4 + a) * rb)), 1);
    const __m256i t0 = _mm256_unpacklo_epi32(z[0], z[1]), t1 = _mm256_unpackhi_epi32(z[0], z[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(z[2], z[3]), t3 = _mm256_unpackhi_epi32(z[2], z[3]);
    /* lane L of g[k]: dword k of rows 4L .. 4L + 3, so dword 4L + i is row 4L + i: row order */
    g[0] = _mm256_unpacklo_epi64(t0, t2);
    g[1] = _mm256_unpackhi_epi64(t0, t2);
    g[2] = _mm256_unpacklo_epi64(t1, t3);
    g[3] = _mm256_unpackhi_epi64(t1, t3);
}

AVX2_FN static inline __m256 scales8(const uint8_t *q, int64_t rb) {
    uint16_t h[PR];
    for (int r = 0; r < PR; r++) memcpy(&h[r], q + r * rb, 2);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}

/* Pack kc blocks of 8 rows (row r's first block at src + r * rb) into dst. */
AVX2_FN static void pack_panel(uint8_t *dst, const uint8_t *src, int64_t rb, int wtype, int64_t kc) {
    if (wtype == REALM_TYPE_Q8_0) {
        for (int64_t i = 0; i < kc; i++) {
            const uint8_t *q = src + i * (int64_t)sizeof(block_q8_0);
            uint8_t *o = dst + i * WBLK_Q8;
            for (int h = 0; h < 2; h++) {  /* elements 16h .. 16h + 15: groups 4h .. 4h + 3 */
                __m256i g[4];
                gather_groups(q + 2 + 16 * h, rb, g);
                for (int k = 0; k < 4; k++) {
                    _mm256_store_si256((__m256i *)(o + (4 * h + k) * 32), g[k]);
                    _mm256_store_si256((__m256i *)(o + 256 + (4 * h + k) * 32), _mm256_abs_epi8(g[k]));
                }
            }
            _mm256_store_ps((float *)(o + 512), scales8(q, rb));
        }
    } else {
        const __m256i lo4 = _mm256_set1_epi8(0x0f);
        for (int64_t i = 0; i < kc; i++) {
            const uint8_t *q = src + i * (int64_t)sizeof(block_q4_0);
            uint8_t *o = dst + i * WBLK_Q4;
            __m256i g[4];
            gather_groups(q + 2, rb, g);
            for (int k = 0; k < 4; k++) {
                _mm256_store_si256((__m256i *)(o + k * 32), _mm256_and_si256(g[k], lo4));  /* 0..15 */
                _mm256_store_si256((__m256i *)(o + (4 + k) * 32),                          /* 16..31 */
                                   _mm256_and_si256(_mm256_srli_epi16(g[k], 4), lo4));
            }
            _mm256_store_ps((float *)(o + 256), scales8(q, rb));
        }
    }
}

/* ---- the register tiles: 8 weight rows x n activation rows over kc blocks ---- */

INLINE int32_t load_i32(const void *p) { int32_t v; memcpy(&v, p, 4); return v; }
INLINE float load_f32(const void *p) { float v; memcpy(&v, p, 4); return v; }

/* y[j * ldy + r] for j < n, r < nr (+)= packed Q4_0 panel . x rows j */
INLINE void tile_q4(float *f_out, int64_t ldy, int nr, int accumulate, const uint8_t *wp,
                    const uint8_t *x, int64_t xs, int64_t kc, const int n) {
    __m256 f[NA];
    for (int j = 0; j < n; j++) f[j] = accumulate ? realm_load_rows8(f_out + j * ldy, nr) : _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t i = 0; i < kc; i++) {
        const uint8_t *wb = wp + i * WBLK_Q4;
        const __m256 dw = _mm256_load_ps((const float *)(wb + 256));
        for (int j = 0; j < n; j++) {
            const uint8_t *xb = x + j * xs + i * XREC;
            __m256i p = _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)wb),
                                             _mm256_set1_epi32(load_i32(xb + 8)));
            for (int g = 1; g < 8; g++)
                p = _mm256_add_epi16(p, _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)(wb + g * 32)),
                                                             _mm256_set1_epi32(load_i32(xb + 8 + 4 * g))));
            const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(p, ones), _mm256_set1_epi32(load_i32(xb)));
            f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_mul_ps(dw, _mm256_set1_ps(load_f32(xb + 4))), f[j]);
        }
    }
    for (int j = 0; j < n; j++) realm_store_rows8(f_out + j * ldy, nr, f[j]);
}

/* the same for a packed Q8_0 panel */
INLINE void tile_q8(float *f_out, int64_t ldy, int nr, int accumulate, const uint8_t *wp,
                    const uint8_t *x, int64_t xs, int64_t kc, const int n) {
    __m256 f[NA];
    for (int j = 0; j < n; j++) f[j] = accumulate ? realm_load_rows8(f_out + j * ldy, nr) : _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t i = 0; i < kc; i++) {
        const uint8_t *wb = wp + i * WBLK_Q8;
        const __m256 dw = _mm256_load_ps((const float *)(wb + 512));
        for (int j = 0; j < n; j++) {
            const uint8_t *xb = x + j * xs + i * XREC;
            __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
            for (int g = 0; g < 8; g += 2) {
                const __m256i w0 = _mm256_load_si256((const __m256i *)(wb + g * 32));
                const __m256i w1 = _mm256_load_si256((const __m256i *)(wb + (g + 1) * 32));
                const __m256i s0 = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xb + 8 + 4 * g)), w0);
                const __m256i s1 = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xb + 12 + 4 * g)), w1);
                a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)(wb + 256 + g * 32)), s0), ones));
                a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)(wb + 256 + (g + 1) * 32)), s1), ones));
            }
            f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1)),
                                   _mm256_mul_ps(dw, _mm256_set1_ps(load_f32(xb + 4))), f[j]);
        }
    }
    for (int j = 0; j < n; j++) realm_store_rows8(f_out + j * ldy, nr, f[j]);
}

#define TILE_CASES(fn)                                                              \
    switch (n) {                                                                    \
    case 1: fn(y, ldy, nr, accumulate, wp, x, xs, kc, 1); break;                    \
    case 2: fn(y, ldy, nr, accumulate, wp, x, xs, kc, 2); break;                    \
    case 3: fn(y, ldy, nr, accumulate, wp, x, xs, kc, 3); break;                    \
    case 4: fn(y, ldy, nr, accumulate, wp, x, xs, kc, 4); break;                    \
    case 5: fn(y, ldy, nr, accumulate, wp, x, xs, kc, 5); break;                    \
    case 6: fn(y, ldy, nr, accumulate, wp, x, xs, kc, 6); break;                    \
    case 7: fn(y, ldy, nr, accumulate, wp, x, xs, kc, 7); break;                    \
    case 8: fn(y, ldy, nr, accumulate, wp, x, xs, kc, 8); break;                    \
    default: break;                                                                 \
    }

AVX2_FN static void tile(int wtype, float *y, int64_t ldy, int nr, int accumulate,
                         const uint8_t *wp, const uint8_t *x, int64_t xs, int64_t kc, int n) {
    if (wtype == REALM_TYPE_Q8_0) {
        TILE_CASES(tile_q8)
    } else {
        TILE_CASES(tile_q4)
    }
}

/* ---- the call ---- */

typedef struct {
    float *y;
    const uint8_t *w;
    const float *x;
    q8b *xq;
    int wtype;
    int64_t n_rows, nb, batch, row_bytes;
    atomic_int_fast64_t next;  /* next unclaimed panel */
    atomic_int failed;         /* a thread could not allocate its panel */
} gq_ctx;

AVX2_FN static void quant_task(void *p, int ith, int nth) {
    gq_ctx *c = p;
    int64_t b0, b1;
    realm_split(c->batch, ith, nth, &b0, &b1);
    const int32_t off = c->wtype == REALM_TYPE_Q8_0 ? 0 : 8;
    for (int64_t b = b0; b < b1; b++) quantize_row(c->xq + b * c->nb, c->x + b * c->nb * QK, c->nb, off);
}

AVX2_FN static void panel_task(void *p, int ith, int nth) {
    gq_ctx *c = p;
    (void)ith;
    (void)nth;
    const int q8 = c->wtype == REALM_TYPE_Q8_0;
    const int64_t bb = q8 ? (int64_t)sizeof(block_q8_0) : (int64_t)sizeof(block_q4_0);
    const int64_t wblk = q8 ? WBLK_Q8 : WBLK_Q4;
    /* the packed panel, then room for a copy of a short last panel's rows, zero-padded */
    uint8_t *wp = aligned_alloc(64, (size_t)(KC * wblk + PR * KC * bb + 63) / 64 * 64);
    if (!wp) {
        atomic_store(&c->failed, 1);
        return;
    }
    uint8_t *pad = wp + KC * wblk;
    const int64_t n_panels = (c->n_rows + PR - 1) / PR, xs = c->nb * XREC, rb = c->row_bytes;
    for (int64_t pi = atomic_fetch_add(&c->next, 1); pi < n_panels; pi = atomic_fetch_add(&c->next, 1)) {
        const int64_t r0 = pi * PR;
        const int nr = c->n_rows - r0 < PR ? (int)(c->n_rows - r0) : PR;
        for (int64_t k0 = 0; k0 < c->nb; k0 += KC) {
            const int64_t kc = c->nb - k0 < KC ? c->nb - k0 : KC;
            const uint8_t *src = c->w + r0 * rb + k0 * bb;
            int64_t srb = rb;
            if (nr < PR) {  /* a short last panel: its rows, then zeros (scale 0) */
                srb = kc * bb;
                for (int r = 0; r < nr; r++) memcpy(pad + r * srb, src + r * rb, (size_t)srb);
                memset(pad + nr * srb, 0, (size_t)((PR - nr) * srb));
                src = pad;
            }
            pack_panel(wp, src, srb, c->wtype, kc);
            const uint8_t *x = (const uint8_t *)(c->xq + k0);
            for (int64_t b = 0; b < c->batch; b += NA) {
                const int n = c->batch - b < NA ? (int)(c->batch - b) : NA;
                tile(c->wtype, c->y + b * c->n_rows + r0, c->n_rows, nr, k0 > 0, wp, x + b * xs,
                     xs, kc, n);
            }
        }
    }
    free(wp);
}

/* ---- interleaved weight panels (packed.c): 16-row panels read in place, 8 rows at a time ----
 *
 * A 64-byte group (or Q4_0 chunk) of a packed panel holds rows 0 .. 7 in its first 32 bytes and
 * rows 8 .. 15 in its second: each half is the tile above's 8-row group, read where it lies.
 * Q8_0 codes are stored + 128 (the AVX-512 kernel's unsigned operand): xor 0x80 gives q back,
 * then |q| and the activations with q's sign, as tile_q8; Q4_0 nibbles as tile_q4. The integer
 * dots are exact and each element takes tile_q8 / tile_q4's float operations block by block, so
 * the results are the portable product's bits. */
INLINE void ptile(float *y, int64_t ldy, int nr, int accumulate, const uint8_t *panel,
                  int64_t k0, const int q4, const int half, const uint8_t *x, int64_t xs,
                  int64_t kc, const int n, const uint8_t *pf) {
    const int64_t cb = q4 ? 256 : 512, rec = cb + 2 * 16;
    const __m256i ones = _mm256_set1_epi16(1), lo4 = _mm256_set1_epi8(0x0f);
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    __m256 f[NA];
    for (int j = 0; j < n; j++) f[j] = accumulate ? realm_load_rows8(y + j * ldy, nr) : _mm256_setzero_ps();
    for (int64_t i = 0; i < kc; i++) {
        if (pf)
            for (int64_t off = 0; off < rec; off += 64) _mm_prefetch((const char *)pf + i * rec + off, _MM_HINT_T0);
        const int64_t blk = k0 + i;
        const uint8_t *wb = panel + realm_packed_codes_at(blk, cb) + 32 * half;
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(panel + realm_packed_scales_at(blk, cb) + 16 * half)));
        if (q4) {
            __m256i w[8];
            for (int k = 0; k < 4; k++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 64 * k));
                w[k] = _mm256_and_si256(v, lo4);
                w[k + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
            }
            for (int j = 0; j < n; j++) {
                const uint8_t *xb = x + j * xs + i * XREC;
                __m256i p = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(load_i32(xb + 8)));
                for (int g = 1; g < 8; g++)
                    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w[g], _mm256_set1_epi32(load_i32(xb + 8 + 4 * g))));
                const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(p, ones), _mm256_set1_epi32(load_i32(xb)));
                f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_mul_ps(dw, _mm256_set1_ps(load_f32(xb + 4))), f[j]);
            }
        } else {
            __m256i w[8], u[8];
            for (int g = 0; g < 8; g++) {
                w[g] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + 64 * g)), bias);
                u[g] = _mm256_abs_epi8(w[g]);
            }
            for (int j = 0; j < n; j++) {
                const uint8_t *xb = x + j * xs + i * XREC;
                __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
                for (int g = 0; g < 8; g += 2) {
                    const __m256i s0 = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xb + 8 + 4 * g)), w[g]);
                    const __m256i s1 = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xb + 12 + 4 * g)), w[g + 1]);
                    a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(u[g], s0), ones));
                    a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_maddubs_epi16(u[g + 1], s1), ones));
                }
                f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1)),
                                       _mm256_mul_ps(dw, _mm256_set1_ps(load_f32(xb + 4))), f[j]);
            }
        }
    }
    for (int j = 0; j < n; j++) realm_store_rows8(y + j * ldy, nr, f[j]);
}

#define PTILE(nn)                                                                                 \
    (q4 ? ptile(yb, ldy, nr, acc, panel, k0, 1, half, xb, xs, kc, nn, pfb)                        \
        : ptile(yb, ldy, nr, acc, panel, k0, 0, half, xb, xs, kc, nn, pfb))

AVX2_FN static void ptiles(float *y, int64_t ldy, int nr, int acc, const uint8_t *panel,
                           int64_t k0, int q4, int half, const uint8_t *x, int64_t xs,
                           int64_t kc, int64_t batch, const uint8_t *pf) {
    for (int64_t b = 0; b < batch; b += NA) {
        float *yb = y + b * ldy;
        const uint8_t *xb = x + b * xs;
        const uint8_t *pfb = b == 0 ? pf : NULL;  /* the first tile reads from memory */
        switch (batch - b < NA ? (int)(batch - b) : NA) {
        case 1: PTILE(1); break;
        case 2: PTILE(2); break;
        case 3: PTILE(3); break;
        case 4: PTILE(4); break;
        case 5: PTILE(5); break;
        case 6: PTILE(6); break;
        case 7: PTILE(7); break;
        default: PTILE(NA); break;
        }
    }
}
#undef PTILE

#define PP REALM_PACK_ROWS  /* rows per packed panel */

AVX2_FN static void packed_task(void *p, int ith, int nth) {
    gq_ctx *c = p;
    (void)ith;
    const int64_t cb = realm_packed_code_bytes(c->wtype), nb = c->nb, xs = nb * XREC;
    const int64_t rec = cb + 2 * PP, pb = realm_packed_panel_bytes(nb, cb);
    const int64_t n_panels = (c->n_rows + PP - 1) / PP;
    const int64_t kcmax = c->batch <= NA ? nb : KC;
    const uint8_t *w_end = c->w + n_panels * pb;
    const int q4 = c->wtype == REALM_TYPE_Q4_0;
    realm_panel_runs runs = realm_panel_runs_of(n_panels, nth);
    for (int64_t pi; (pi = realm_panel_runs_next(&runs, &c->next)) >= 0;) {
        const uint8_t *panel = c->w + pi * pb;
        for (int half = 0; half < 2; half++) {
            const int64_t r0 = pi * PP + 8 * half;
            const int nr = c->n_rows - r0 < 8 ? (int)(c->n_rows - r0) : 8;
            if (nr <= 0) break;
            for (int64_t k0 = 0; k0 < nb; k0 += kcmax) {
                const int64_t kc = nb - k0 < kcmax ? nb - k0 : kcmax;
                const uint8_t *pf = half == 0 ? panel + k0 * rec + REALM_PACKED_PF_AHEAD : NULL;
                ptiles(c->y + r0, c->n_rows, nr, k0 > 0, panel, k0, q4, half,
                       (const uint8_t *)(c->xq + k0), xs, kc, c->batch, pf && pf < w_end ? pf : NULL);
            }
        }
    }
}

AVX2_FN int realm_matmul_packed_avx2(float *y, const void *w, int wtype, const float *x,
                                     int64_t n_rows, int64_t n_cols, int64_t batch) {
    const int64_t nb = n_cols / QK;
    if ((uint64_t)nb > (SIZE_MAX / XREC) / (uint64_t)batch) return REALM_ENOMEM;
    gq_ctx c = {.y = y, .w = w, .x = x, .wtype = wtype, .n_rows = n_rows, .nb = nb,
                .batch = batch};
    c.xq = aligned_alloc(64, ((size_t)(batch * nb) * XREC + 63) / 64 * 64);
    if (!c.xq) return REALM_ENOMEM;
    atomic_store(&c.next, 0);
    int rc = realm_parallel(quant_task, &c, batch >= 8 ? 0 : 1);
    if (rc == REALM_OK) rc = realm_parallel(packed_task, &c, 0);
    free(c.xq);
    return rc;
}

AVX2_FN int realm_gemm_q8_avx2(float *y, const void *w, int wtype, const float *x,
                               int64_t n_rows, int64_t n_cols, int64_t batch) {
    if (wtype != REALM_TYPE_Q8_0 && wtype != REALM_TYPE_Q4_0) return REALM_EINVAL;
    const int64_t nb = n_cols / QK;
    if ((uint64_t)nb > (SIZE_MAX / XREC) / (uint64_t)batch) return REALM_ENOMEM;
    gq_ctx c = {.y = y, .w = w, .x = x, .wtype = wtype, .n_rows = n_rows, .nb = nb,
                .batch = batch, .row_bytes = realm_row_bytes(wtype, n_cols)};
    c.xq = aligned_alloc(64, ((size_t)(batch * nb) * XREC + 63) / 64 * 64);
    if (!c.xq) return REALM_ENOMEM;
    int rc = realm_parallel(quant_task, &c, batch >= 8 ? 0 : 1);
    if (rc == REALM_OK) {
        atomic_store(&c.next, 0);
        atomic_store(&c.failed, 0);
        rc = realm_parallel(panel_task, &c, 0);
        /* a thread that could not allocate left its panels to the others; if none could, or
         * the counter did not reach the end, the call failed */
        if (rc == REALM_OK && atomic_load(&c.next) < (n_rows + PR - 1) / PR) rc = REALM_ENOMEM;
    }
    free(c.xq);
    return rc;
}
#endif
