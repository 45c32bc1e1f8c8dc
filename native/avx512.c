/* Realm native kernels: AVX-512 (F, BW, VL, VNNI) primitives (x86 only).
 *
 * Selected at run time when the CPU has all four; the integer dot products use VNNI's
 * vpdpbusd, two 32-element blocks per 512-bit register.
 */
#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

REALM_AVX512_VNNI
static inline __mmask16 tail16(int64_t r) { return (__mmask16)((1u << r) - 1u); }

REALM_AVX512_VNNI
static inline __m512 load_f32x16(const float *p) { return _mm512_loadu_ps(p); }
REALM_AVX512_VNNI
static inline __m512 load_f32x16_tail(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
REALM_AVX512_VNNI
static inline __m512 load_f16x16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
REALM_AVX512_VNNI
static inline __m512 load_f16x16_tail(const uint16_t *p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
REALM_AVX512_VNNI
static inline __m512 load_bf16x16(const uint16_t *p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
REALM_AVX512_VNNI
static inline __m512 load_bf16x16_tail(const uint16_t *p, __mmask16 m) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

#define GROUP 8 /* batch rows per pass over a weight row: accumulators stay in registers */
#define INLINE REALM_AVX512_VNNI static inline __attribute__((always_inline))

/* Float weights (F32, F16, BF16), row-streaming: up to 4 weight rows (ws elements apart)
 * against up to 4 batch rows (x in the panel layout) at a time, so each loaded activation
 * vector meets 4 weight rows and each weight vector (loaded and converted once) up to 4
 * activation rows; one weight row at a time had each weight row re-read a few batch rows'
 * activations (several times the weights' bytes, from L1/L2), and a 4-row F16 step cost 2.5x a
 * one-row step on a Zen 4. A lone batch row (decode) takes one weight row at a time: a single
 * sequential stream, which the hardware prefetchers follow best (4 interleaved rows read at
 * 15-25 GB/s where one reads 30-35). Every (weight row, batch row) pair is one accumulator
 * summed in the same order whatever the tile's shape, so a row's result does not depend on the
 * rows computed beside it. The next tile's weight rows are prefetched. */
#define FLOAT_TILE_CASE(NAME, R, G)                                                              \
    case R * 16 + G: NAME##_tile(y + r, ys, w + r * ws, ws, xp, n, batch, b, R, G); break;
#define FLOAT_TILE(NAME, WT, LOAD, LOAD_TAIL)                                                    \
    INLINE void NAME##_tile(float *y, int64_t ys, const WT *w, int64_t ws, const float *xp,    \
                            int64_t n, int64_t batch, int64_t b0, const int R, const int G) {  \
        __m512 acc[4][4];                                                                        \
        for (int r = 0; r < R; r++)                                                              \
            for (int k = 0; k < G; k++) acc[r][k] = _mm512_setzero_ps();                         \
        const int64_t full = n / 16;                                                             \
        for (int64_t c = 0; c < full; c++) {                                                     \
            const float *x0 = xp + (c * batch + b0) * 16;                                        \
            __m512 xv[4];                                                                        \
            for (int k = 0; k < G; k++) xv[k] = _mm512_loadu_ps(x0 + k * 16);                    \
            for (int r = 0; r < R; r++) {                                                        \
                /* the next tile's rows (R rows on), at the same column: rows are short (a few    \
                 * KiB at hidden 576-2048), too short for the hardware prefetchers to ramp up */ \
                _mm_prefetch((const char *)(w + (R + r) * ws + c * 16), _MM_HINT_T0);            \
                const __m512 wv = LOAD(w + r * ws + c * 16);                                     \
                for (int k = 0; k < G; k++) acc[r][k] = _mm512_fmadd_ps(wv, xv[k], acc[r][k]);   \
            }                                                                                    \
        }                                                                                        \
        if (full * 16 < n) {                                                                     \
            const float *x0 = xp + (full * batch + b0) * 16;                                     \
            const __mmask16 m = tail16(n - full * 16);                                           \
            for (int r = 0; r < R; r++) {                                                        \
                const __m512 wv = LOAD_TAIL(w + r * ws + full * 16, m);                          \
                for (int k = 0; k < G; k++)                                                      \
                    acc[r][k] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + k * 16), acc[r][k]);    \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < R; r++)                                                              \
            for (int k = 0; k < G; k++) y[(b0 + k) * ys + r] = _mm512_reduce_add_ps(acc[r][k]);  \
    }                                                                                            \
    REALM_AVX512_VNNI                                                                            \
    static void NAME##_rows(float *y, int64_t ys, const WT *w, int64_t ws, int nr,             \
                            const float *xp, int64_t n, int64_t batch, int64_t b0,             \
                            int64_t nbat) {                                                      \
        if (nbat == 1) { /* decode: one weight row at a time, a single sequential stream */    \
            for (int r = 0; r < nr; r++) NAME##_tile(y + r, ys, w + r * ws, ws, xp, n, batch, b0, 1, 1); \
            return;                                                                              \
        }                                                                                        \
        /* groups of at most 4 batch rows, as even as can be (5 = 3 + 2); a group meets 4      \
         * weight rows at once (the 4 rows' weights, 8-16 KiB, stay in L1 for the next group) */ \
        const int64_t groups = (nbat + 3) / 4;                                                   \
        for (int64_t i = 0, b = b0; i < groups; i++) {                                           \
            const int g = (int)((nbat - (b - b0) + (groups - i) - 1) / (groups - i));           \
            const int rstep = 4;                                                                 \
            for (int r = 0; r < nr; r += rstep) {                                                \
                const int rr = nr - r < rstep ? nr - r : rstep;                                  \
                switch (rr * 16 + g) {                                                           \
                FLOAT_TILE_CASE(NAME, 1, 1) FLOAT_TILE_CASE(NAME, 1, 2)                          \
                FLOAT_TILE_CASE(NAME, 1, 3) FLOAT_TILE_CASE(NAME, 1, 4)                          \
                FLOAT_TILE_CASE(NAME, 2, 1) FLOAT_TILE_CASE(NAME, 2, 2)                          \
                FLOAT_TILE_CASE(NAME, 2, 3) FLOAT_TILE_CASE(NAME, 2, 4)                          \
                FLOAT_TILE_CASE(NAME, 3, 1) FLOAT_TILE_CASE(NAME, 3, 2)                          \
                FLOAT_TILE_CASE(NAME, 3, 3) FLOAT_TILE_CASE(NAME, 3, 4)                          \
                FLOAT_TILE_CASE(NAME, 4, 1) FLOAT_TILE_CASE(NAME, 4, 2)                          \
                FLOAT_TILE_CASE(NAME, 4, 3) FLOAT_TILE_CASE(NAME, 4, 4)                          \
                default: break;                                                                  \
                }                                                                                \
            }                                                                                    \
            b += g;                                                                              \
        }                                                                                        \
    }

FLOAT_TILE(rows_f32, float, load_f32x16, load_f32x16_tail)
FLOAT_TILE(rows_f16, uint16_t, load_f16x16, load_f16x16_tail)
FLOAT_TILE(rows_bf16, uint16_t, load_bf16x16, load_bf16x16_tail)

/* the table's one-row dots: the tiles with one weight row (matmul calls dot_rows_float) */
#define ONE_ROW_DOT(NAME, ROWS, WT)                                                              \
    REALM_AVX512_VNNI static void NAME(float *y, int64_t ys, const WT *w, const float *xp,     \
                                       int64_t n, int64_t batch, int64_t b0, int64_t nbat) {     \
        ROWS(y, ys, w, n, 1, xp, n, batch, b0, nbat);                                            \
    }
ONE_ROW_DOT(dot_f32, rows_f32_rows, float)
ONE_ROW_DOT(dot_f16, rows_f16_rows, uint16_t)
ONE_ROW_DOT(dot_bf16, rows_bf16_rows, uint16_t)

REALM_AVX512_VNNI
static void dot_rows_float(float *y, int64_t ys, const void *w, int wtype, int64_t ws, int nr,
                           const float *xp, int64_t n, int64_t batch, int64_t b0, int64_t nbat) {
    switch (wtype) {
    case REALM_TYPE_F32: rows_f32_rows(y, ys, w, ws, nr, xp, n, batch, b0, nbat); break;
    case REALM_TYPE_F16: rows_f16_rows(y, ys, w, ws, nr, xp, n, batch, b0, nbat); break;
    default: rows_bf16_rows(y, ys, w, ws, nr, xp, n, batch, b0, nbat); break;
    }
}

REALM_AVX512_VNNI
static float vdot_f32(int64_t n, const float *a, const float *b) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), a1);
    }
    for (; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail16(n - i);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

REALM_AVX512_VNNI
static float vdot_f16(int64_t n, const uint16_t *a, const float *b) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(load_f16x16(a + i), _mm512_loadu_ps(b + i), a0);
        a1 = _mm512_fmadd_ps(load_f16x16(a + i + 16), _mm512_loadu_ps(b + i + 16), a1);
    }
    for (; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail16(n - i);
        a0 = _mm512_fmadd_ps(load_f16x16_tail(a + i, m), _mm512_maskz_loadu_ps(m, b + i), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

/* Quantized weights: a group of four blocks (two pairs of 64 signed bytes, each pair's 4-byte
 * groups interleaved as in the activations' layout) times G activation rows. VNNI's vpdpbusd
 * multiplies unsigned by signed bytes; activations are stored as q + 128, so each product
 * carries an extra 128 * w: the accumulator starts at -128 * sum(w), computed once per group.
 * Even int32 lanes of a pair's product hold its first block's partial dot, odd lanes the
 * second's; adding the two pairs' 64-bit unpacks leaves [A, B, C, D] in every 128-bit lane,
 * so the float work (convert, scale, accumulate) is done once per four blocks with scales
 * [dA, dB, dC, dD] repeated, for weights and (one 16-byte broadcast) for activations. */
INLINE void int8_quad_step(__m512 *acc, __m512i w01, __m512i w23, __m512 dw, const realm_q8x *x,
                           int64_t b0, int64_t qd, const int G) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i u128 = _mm512_set1_epi8((char)0x80);  /* unsigned 128: 128 * sum(w) in one op */
    const __m512i neg01 = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, u128, w01));
    const __m512i neg23 = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, u128, w23));
    const uint8_t *q = x->qs + (qd * x->batch + b0) * 128;
    const float *d4 = x->d4 + (qd * x->batch + b0) * 4;
    for (int k = 0; k < G; k++) {
        const __m512i p01 = _mm512_dpbusd_epi32(neg01, _mm512_loadu_si512((const void *)(q + k * 128)), w01);
        const __m512i p23 = _mm512_dpbusd_epi32(neg23, _mm512_loadu_si512((const void *)(q + k * 128 + 64)), w23);
        const __m512i r = _mm512_add_epi32(_mm512_unpacklo_epi64(p01, p23), _mm512_unpackhi_epi64(p01, p23));
        const __m512 dx = _mm512_broadcast_f32x4(_mm_loadu_ps(d4 + k * 4));
        acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(r), _mm512_mul_ps(dw, dx), acc[k]);
    }
}

INLINE __m512 quad_scales(uint16_t a, uint16_t b, uint16_t c, uint16_t d) {
    const uint64_t h = (uint64_t)a | ((uint64_t)b << 16) | ((uint64_t)c << 32) | ((uint64_t)d << 48);
    return _mm512_cvtph_ps(_mm256_set1_epi64x((long long)h));
}

/* 64 bytes of blocks a (low 256 bits) and b (high) -> their 4-byte groups interleaved */
INLINE __m512i interleave_pair(__m256i a, __m256i b) {
    const __m512i idx = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    return _mm512_permutexvar_epi32(idx, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}

INLINE __m256i q8_block(const block_q8_0 *w, int64_t i) {  /* 32 signed bytes */
    return _mm256_loadu_si256((const __m256i *)w[i].qs);
}

INLINE __m256i q4_block(const block_q4_0 *w, int64_t i) {
    /* low nibbles are elements 0-15, high nibbles 16-31; minus 8 makes them signed */
    const __m128i q = _mm_loadu_si128((const __m128i *)w[i].qs);
    const __m128i lo4 = _mm_set1_epi8(0x0f);
    const __m256i v = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), lo4), _mm_and_si128(q, lo4));
    return _mm256_sub_epi8(v, _mm256_set1_epi8(8));
}

/* Four whole blocks as two interleaved pairs (the fast path; BLOCK serves a short tail). */
INLINE void q8_quad(const block_q8_0 *v, __m512i *w01, __m512i *w23) {
    const __m512i idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    *w01 = _mm512_permutex2var_epi32(_mm512_castsi256_si512(q8_block(v, 0)), idx,
                                     _mm512_castsi256_si512(q8_block(v, 1)));
    *w23 = _mm512_permutex2var_epi32(_mm512_castsi256_si512(q8_block(v, 2)), idx,
                                     _mm512_castsi256_si512(q8_block(v, 3)));
}

INLINE void q4_quad(const block_q4_0 *v, __m512i *w01, __m512i *w23) {
    /* The four 18-byte blocks are 72 bytes whose scales and nibble runs all start at even
     * offsets: two loads (bytes 0-63 and 8-71, never past the group) and one word permute
     * gather the 4 x 16 nibble bytes; then the nibbles are unpacked to signed values at once:
     * block i's elements 0-15 are dwords 4i..4i+3 of lo, elements 16-31 the same dwords of hi. */
    const __m512i a = _mm512_loadu_si512((const void *)v);
    const __m512i b = _mm512_loadu_si512((const void *)((const char *)v + 8));
    /* block i's nibble bytes are words 9i+1 .. 9i+8 of the group; b holds words 4..35 */
    static const uint16_t gather[32] = {1,  2,  3,  4,  5,  6,  7,  8,  10, 11, 12,
                                        13, 14, 15, 16, 17, 19, 20, 21, 22, 23, 24,
                                        25, 26, 28, 29, 30, 31, 60, 61, 62, 63};
    const __m512i q = _mm512_permutex2var_epi16(a, _mm512_loadu_si512((const void *)gather), b);
    const __m512i m = _mm512_set1_epi8(0x0f), e8 = _mm512_set1_epi8(8);
    const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(q, m), e8);
    const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(q, 4), m), e8);
    const __m512i idx01 = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 16, 20, 17, 21, 18, 22, 19, 23);
    const __m512i idx23 = _mm512_setr_epi32(8, 12, 9, 13, 10, 14, 11, 15, 24, 28, 25, 29, 26, 30, 27, 31);
    *w01 = _mm512_permutex2var_epi32(lo, idx01, hi);
    *w23 = _mm512_permutex2var_epi32(lo, idx23, hi);
}

/* [dA, dB, dC, dD] x 4 of a whole group of Q4_0 blocks: the scales are words 0, 9, 18, 27 */
INLINE __m512 q4_quad_scales(const block_q4_0 *v) {
    static const uint16_t idx[32] = {0, 9, 18, 27, 0, 9, 18, 27, 0, 9, 18, 27, 0, 9, 18, 27,
                                     0, 9, 18, 27, 0, 9, 18, 27, 0, 9, 18, 27, 0, 9, 18, 27};
    const __m512i h = _mm512_permutexvar_epi16(_mm512_loadu_si512((const void *)idx),
                                               _mm512_loadu_si512((const void *)v));
    return _mm512_cvtph_ps(_mm512_castsi512_si256(h));
}

/* [dA, dB, dC, dD] x 4 of a whole group of Q8_0 blocks: the scales are words 0, 17, 34, 51
 * of the group's 136 bytes, gathered from two loads that stay inside the group */
INLINE __m512 q8_quad_scales(const block_q8_0 *v) {
    static const uint16_t idx[32] = {0, 17, 34, 51, 0, 17, 34, 51, 0, 17, 34, 51, 0, 17, 34, 51,
                                     0, 17, 34, 51, 0, 17, 34, 51, 0, 17, 34, 51, 0, 17, 34, 51};
    const __m512i a = _mm512_loadu_si512((const void *)v);
    const __m512i b = _mm512_loadu_si512((const void *)((const char *)v + 64));
    const __m512i h = _mm512_permutex2var_epi16(a, _mm512_loadu_si512((const void *)idx), b);
    return _mm512_cvtph_ps(_mm512_castsi512_si256(h));
}

#define PREFETCH_BYTES 2048

#define INT8_DOT(NAME, BT, BLOCK, QUAD, SCALES)                                                              \
    INLINE void NAME##_group(float *y, int64_t ys, const BT *w, const realm_q8x *x, int64_t b0,  \
                             const int G) {                                                      \
        __m512 acc[GROUP];                                                                       \
        for (int k = 0; k < G; k++) acc[k] = _mm512_setzero_ps();                                \
        const int64_t nb = x->nb;                                                                \
        int64_t qd = 0;                                                                          \
        for (; 4 * qd + 4 <= nb; qd++) {                                                         \
            const BT *v = w + 4 * qd;                                                            \
            /* the next rows follow this one: fetch ahead of the hardware prefetcher, which  */  \
            /* restarts at every page while a big batch keeps the loads slow and sparse      */  \
            for (int off = 0; off < 4 * (int)sizeof(BT); off += 64)                              \
                __builtin_prefetch((const char *)v + PREFETCH_BYTES + off);                      \
            __m512i w01, w23;                                                                    \
            QUAD(v, &w01, &w23);                                                                 \
            int8_quad_step(acc, w01, w23, SCALES(v), x, b0, qd, G);                              \
        }                                                                                        \
        if (4 * qd < nb) { /* a short last group: missing blocks are zeros */                   \
            const BT *v = w + 4 * qd;                                                            \
            const int64_t r = nb - 4 * qd;                                                       \
            const __m256i z = _mm256_setzero_si256();                                            \
            int8_quad_step(acc, interleave_pair(BLOCK(v, 0), r > 1 ? BLOCK(v, 1) : z),           \
                           interleave_pair(r > 2 ? BLOCK(v, 2) : z, z),                          \
                           quad_scales(v[0].d, r > 1 ? v[1].d : 0, r > 2 ? v[2].d : 0, 0), x,    \
                           b0, qd, G);                                                           \
        }                                                                                        \
        for (int k = 0; k < G; k++) y[(b0 + k) * ys] = _mm512_reduce_add_ps(acc[k]);             \
    }                                                                                            \
    REALM_AVX512_VNNI                                                                            \
    static void NAME(float *y, int64_t ys, const BT *w, const realm_q8x *x, int64_t b0,          \
                     int64_t nbat) {                                                             \
        int64_t b = b0;                                                                          \
        const int64_t end = b0 + nbat;                                                           \
        for (; b + GROUP <= end; b += GROUP) NAME##_group(y, ys, w, x, b, GROUP);                \
        switch (end - b) {                                                                       \
        case 1: NAME##_group(y, ys, w, x, b, 1); break;                                          \
        case 2: NAME##_group(y, ys, w, x, b, 2); break;                                          \
        case 3: NAME##_group(y, ys, w, x, b, 3); break;                                          \
        case 4: NAME##_group(y, ys, w, x, b, 4); break;                                          \
        case 5: NAME##_group(y, ys, w, x, b, 5); break;                                          \
        case 6: NAME##_group(y, ys, w, x, b, 6); break;                                          \
        case 7: NAME##_group(y, ys, w, x, b, 7); break;                                          \
        default: break;                                                                          \
        }                                                                                        \
    }

INT8_DOT(dot_q8_0, block_q8_0, q8_block, q8_quad, q8_quad_scales)
INT8_DOT(dot_q4_0, block_q4_0, q4_block, q4_quad, q4_quad_scales)

REALM_AVX512_VNNI
static void quantize_q8x(const realm_q8x *x, const float *src, int64_t b) {
    const int64_t nb = x->nb;
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    for (int64_t qd = 0; qd < x->n_quads; qd++) {
        __m256i blk[4];  /* signed q of the group's four blocks */
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int h = 0; h < 4; h++) {
            const int64_t i = 4 * qd + h;
            if (i >= nb) {  /* pad of a short last group: reads as q = 0 */
                blk[h] = _mm256_setzero_si256();
                continue;
            }
            const float *v = src + i * QK;
            const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            d[h] = amax / 127.0f;
            const __m512 id = _mm512_set1_ps(d[h] != 0.0f ? 1.0f / d[h] : 0.0f);
            const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
            const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
            blk[h] = _mm256_set_m128i(_mm512_cvtsepi32_epi8(i1), _mm512_cvtsepi32_epi8(i0));
            x->d[b * nb + i] = d[h];
            x->sum[b * nb + i] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        }
        uint8_t *q = x->qs + (qd * x->batch + b) * 128;
        _mm512_storeu_si512((void *)q, _mm512_xor_si512(interleave_pair(blk[0], blk[1]), bias));
        _mm512_storeu_si512((void *)(q + 64), _mm512_xor_si512(interleave_pair(blk[2], blk[3]), bias));
        _mm_storeu_ps(x->d4 + (qd * x->batch + b) * 4, _mm_loadu_ps(d));
    }
}

REALM_AVX512_VNNI
static void axpy_f32(int64_t n, float a, const float *x, float *y) {
    const __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        const __mmask16 m = tail16(n - i);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i),
                                                        _mm512_maskz_loadu_ps(m, y + i)));
    }
}

REALM_AVX512_VNNI
static void axpy_f16(int64_t n, float a, const uint16_t *x, float *y) {
    const __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, load_f16x16(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        const __mmask16 m = tail16(n - i);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, load_f16x16_tail(x + i, m),
                                                        _mm512_maskz_loadu_ps(m, y + i)));
    }
}

/* ---- attention over an F16 cache (see internal.h) ---- */

#define ATT_HEADS 8  /* query heads per pass over the values: 8 x 2 accumulators in registers */

REALM_AVX512_VNNI
static void attn_softmax_rows(float *scores, int64_t ss, int64_t n, int32_t group);

REALM_AVX512_VNNI
static void attn_probs_f16(float *scores, int64_t ss, const uint16_t *k, int64_t ks, int64_t n,
                            const float *q, int32_t group, int32_t d, float scale) {
    const int32_t nc = (d + 15) / 16;  /* 16-wide chunks of a row; d <= 256, so nc <= 16 */
    const __mmask16 last = d % 16 ? tail16(d % 16) : (__mmask16)0xffff;
    for (int64_t j = 0; j < n; j++) {
        const uint16_t *kj = k + j * ks;
        __m512 kv[16];  /* the row, converted once for every head of the group */
        for (int32_t c = 0; c < nc; c++)
            kv[c] = c + 1 < nc ? load_f16x16(kj + c * 16) : load_f16x16_tail(kj + c * 16, last);
        for (int32_t h = 0; h < group; h++) {
            const float *qh = q + (int64_t)h * d;
            __m512 acc = _mm512_mul_ps(kv[0], nc > 1 ? _mm512_loadu_ps(qh)
                                                     : _mm512_maskz_loadu_ps(last, qh));
            for (int32_t c = 1; c < nc; c++)
                acc = _mm512_fmadd_ps(kv[c], c + 1 < nc ? _mm512_loadu_ps(qh + c * 16)
                                                        : _mm512_maskz_loadu_ps(last, qh + c * 16),
                                      acc);
            scores[h * ss + j] = scale * _mm512_reduce_add_ps(acc);
        }
    }
    attn_softmax_rows(scores, ss, n, group);
}

/* e^x for x <= 0 (softmax after subtracting the max): x = n ln2 + r, |r| <= ln2 / 2, a
 * degree-6 Taylor polynomial for e^r (relative error < 2e-7), then scalef by 2^n */
REALM_AVX512_VNNI
static inline __m512 exp_neg512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  /* ln2, high part */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);     /* and the rest */
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* scores -> softmax probabilities, in place, for each of `group` rows of n */
REALM_AVX512_VNNI
static void attn_softmax_rows(float *scores, int64_t ss, int64_t n, int32_t group) {
    for (int32_t h = 0; h < group; h++) {
        float *s = scores + h * ss;
        __m512 vm = _mm512_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(s + j));
        if (j < n) vm = _mm512_mask_max_ps(vm, tail16(n - j), vm, _mm512_maskz_loadu_ps(tail16(n - j), s + j));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
        __m512 sum = _mm512_setzero_ps();
        for (j = 0; j + 16 <= n; j += 16) {
            const __m512 e = exp_neg512(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
            _mm512_storeu_ps(s + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (j < n) {
            const __mmask16 t = tail16(n - j);
            const __m512 e = exp_neg512(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, s + j), m));
            _mm512_mask_storeu_ps(s + j, t, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(t, e));
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (j = 0; j + 16 <= n; j += 16) _mm512_storeu_ps(s + j, _mm512_mul_ps(_mm512_loadu_ps(s + j), inv));
        if (j < n) {
            const __mmask16 t = tail16(n - j);
            _mm512_mask_storeu_ps(s + j, t, _mm512_mul_ps(_mm512_maskz_loadu_ps(t, s + j), inv));
        }
    }
}

REALM_AVX512_VNNI
static void attn_values_f16(float *o, const uint16_t *v, int64_t vs, int64_t n, const float *w,
                            int64_t ws, int32_t group, int32_t d) {
    /* passes of up to 8 heads x 32 columns: the accumulators stay in registers and each pass
     * reads a 64-byte slice of every V row (the rows stay in L2 between passes) */
    for (int32_t h0 = 0; h0 < group; h0 += ATT_HEADS) {
        const int32_t nh = group - h0 < ATT_HEADS ? group - h0 : ATT_HEADS;
        for (int32_t c0 = 0; c0 < d; c0 += 32) {
            const int32_t r0 = d - c0 >= 16 ? 16 : d - c0, r1 = d - c0 - 16;
            const __mmask16 m0 = tail16(r0), m1 = r1 >= 16 ? (__mmask16)0xffff
                                                           : r1 > 0 ? tail16(r1) : 0;
            __m512 a0[ATT_HEADS], a1[ATT_HEADS];
            for (int32_t h = 0; h < nh; h++) a0[h] = a1[h] = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; j++) {
                const uint16_t *vj = v + j * vs + c0;
                const __m512 v0 = r0 == 16 ? load_f16x16(vj) : load_f16x16_tail(vj, m0);
                const __m512 v1 = m1 == 0xffff ? load_f16x16(vj + 16)
                                  : m1 ? load_f16x16_tail(vj + 16, m1) : _mm512_setzero_ps();
                for (int32_t h = 0; h < nh; h++) {
                    const __m512 wh = _mm512_set1_ps(w[(int64_t)(h0 + h) * ws + j]);
                    a0[h] = _mm512_fmadd_ps(wh, v0, a0[h]);
                    a1[h] = _mm512_fmadd_ps(wh, v1, a1[h]);
                }
            }
            for (int32_t h = 0; h < nh; h++) {
                float *oh = o + (int64_t)(h0 + h) * d + c0;
                _mm512_mask_storeu_ps(oh, m0, a0[h]);
                if (m1) _mm512_mask_storeu_ps(oh + 16, m1, a1[h]);
            }
        }
    }
}

int realm_gemm_f32_avx512(float *y, int64_t ldy, const float *a, int64_t lda, const void *b,
                          int btype, int64_t ldb, int64_t m, int64_t n, int64_t k, int ith,
                          int nth, atomic_int_fast64_t *next);
int realm_gemm_q8_avx512(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                         int64_t n_cols, int64_t batch);

/* The smallest batch of Q8_0 / Q4_0 weights that takes the GEMM. Measured on Sapphire Rapids
 * (full-width AVX-512): Q8_0 at batch 8 costs 1.8x batch 1 streaming against 2.5x through the
 * GEMM, the two meet at 10; Q4_0's nibble unpacking makes them meet at 8. On AMD's Zen 4,
 * which runs 512-bit instructions as two halves, the streaming dots are the slower ones
 * (5632 x 2048, 3 alternating runs: Q8_0 at 8 rows 0.92-1.35 ms streaming, 0.68-0.82 through
 * the GEMM; Q4_0 at 4 rows 0.63-0.90 against 0.40-0.48; level at 4 rows for Q8_0). Zen 5 runs
 * them whole and sits with Sapphire Rapids (a TinyLlama-shaped model's decode step, streaming /
 * GEMM: Q8_0 58 / 67 ms at 8 rows, 77 / 67 at 10; Q4_0 38 / 44 at 4, 52 / 52 at 6, 64 / 53 at
 * 8). */
static int64_t gemm_q_min_batch(int wtype) {
    if (realm_cpu_split_512()) return wtype == REALM_TYPE_Q8_0 ? 5 : 3;
    if (__builtin_cpu_is("amd")) return wtype == REALM_TYPE_Q8_0 ? 9 : 7;  /* cpu_init: kernels.c */
    return wtype == REALM_TYPE_Q8_0 ? 11 : 8;
}

/* The smallest batch that takes the integer GEMM, per type: it packs the weights on every call,
 * which the row-streaming dots do not (measured, 2048 x 5632, 2-core Zen 4: Q4_K streaming
 * 1.84 ms at 12 rows against the GEMM's 1.93; Q6_K's streaming dots are cheaper still, 1.40
 * against 2.38 at 12; the types unpacked in scalar code stream slowly: Q5_0 3.07 against 2.82
 * at 6) */
static int64_t gemm_kq_min_batch(int wtype) {
    switch (wtype) {
    case REALM_TYPE_Q4_K: case REALM_TYPE_Q5_K: return 14;
    case REALM_TYPE_Q6_K: return 24;
    default: return 6;
    }
}

const realm_isa_ops realm_ops_avx512 = {
    .name = "avx512",
    .dot_f32 = dot_f32,
    .dot_f16 = dot_f16,
    .dot_bf16 = dot_bf16,
    .dot_rows_float = dot_rows_float,
    .dot_q8_0 = dot_q8_0,
    .dot_q4_0 = dot_q4_0,
    .quantize_q8x = quantize_q8x,
    .vdot_f32 = vdot_f32,
    .vdot_f16 = vdot_f16,
    .axpy_f32 = axpy_f32,
    .axpy_f16 = axpy_f16,
    .attn_probs_f16 = attn_probs_f16,
    .attn_values_f16 = attn_values_f16,
    .gemm_f32 = realm_gemm_f32_avx512,
    .dot_other = realm_dot_other_avx512,
    .quantize_q8x_plain = realm_quantize_q8x_plain_avx2,
    .quantize_q8k = realm_quantize_q8k_avx2,
    .gemm_q8 = realm_gemm_q8_avx512,
    .gemm_q_min_batch = gemm_q_min_batch,
    .gemm_kq = realm_gemm_kq_avx512,
    .gemm_kq_supports = realm_gemm_kq_avx512_supports,
    .gemm_kq_min_batch = gemm_kq_min_batch,
    .matmul_packed = realm_matmul_packed_avx512,
};
#endif
