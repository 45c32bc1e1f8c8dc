/* Realm native kernels: AVX2 + FMA + F16C primitives (x86 only).
 *
 * Compiled for the baseline target; REALM_AVX2 (a function target attribute) enables the ISA
 * for this file's functions only, and kernels.c selects this table at run time when the CPU
 * supports it, so one build runs on any x86-64 CPU.
 */
#include "internal.h"
#include "simd_avx2.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

REALM_AVX2
static float vdot_f32(int64_t n, const float *w, const float *x) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float s = realm_hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

REALM_AVX2
static inline __m256 load_bf16x8(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

REALM_AVX2
static float vdot_f16(int64_t n, const uint16_t *w, const float *x) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(realm_load_f16x8(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(realm_load_f16x8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(realm_load_f16x8(w + i), _mm256_loadu_ps(x + i), a0);
    float s = realm_hsum8(_mm256_add_ps(a0, a1));
    for (; i < n; i++) s += realm_f16_to_f32(w[i]) * x[i];
    return s;
}

/* 32 unsigned x 32 signed bytes -> 8 int32 partial sums (no overflow for |u| <= 128, |s| <= 127) */
REALM_AVX2
static inline __m256 dot_u8s8_ps(__m256i u, __m256i s) {
    const __m256i p16 = _mm256_maddubs_epi16(u, s);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

/* one weight row against every batch row (panel layout): 8-wide, one weight load per 8 */
#define AVX2_FLOAT_DOT(NAME, WT, LOAD, TO_F32)                                                   \
    REALM_AVX2                                                                                   \
    static void NAME(float *y, int64_t ys, const WT *w, const float *xp, int64_t n, int64_t batch, \
                     int64_t b0, int64_t nbat) {                                                 \
        for (int64_t b = b0; b < b0 + nbat; b++) {                                               \
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                           \
            int64_t i = 0;                                                                       \
            for (; i + 16 <= n; i += 16) {                                                       \
                const float *xb = xp + ((i / 16) * batch + b) * 16;                              \
                a0 = _mm256_fmadd_ps(LOAD(w + i), _mm256_loadu_ps(xb), a0);                      \
                a1 = _mm256_fmadd_ps(LOAD(w + i + 8), _mm256_loadu_ps(xb + 8), a1);              \
            }                                                                                    \
            float s = realm_hsum8(_mm256_add_ps(a0, a1));                                            \
            for (; i < n; i++) s += TO_F32(w[i]) * xp[((i / 16) * batch + b) * 16 + i % 16];     \
            y[b * ys] = s;                                                                       \
        }                                                                                        \
    }

REALM_AVX2
static inline float id_f32(float v) { return v; }
AVX2_FLOAT_DOT(dot_f32, float, _mm256_loadu_ps, id_f32)
AVX2_FLOAT_DOT(dot_f16, uint16_t, realm_load_f16x8, realm_f16_to_f32)
AVX2_FLOAT_DOT(dot_bf16, uint16_t, load_bf16x8, realm_bf16_to_f32)

/* Up to 2 weight rows (ws elements apart) against up to 2 batch rows at a time, as avx512.c's
 * float tiles: each activation vector meets 2 weight rows, each weight vector (loaded and
 * converted once) 2 activation rows, and the next tile's rows are prefetched. Every (weight
 * row, batch row) pair is summed exactly as the one-row dot above sums it (the low and high
 * halves of each 16 into two accumulators, then one horizontal sum and the scalar tail), and a
 * lone batch row (decode) takes that dot itself, so a row's result does not depend on the rows
 * computed beside it. */
#define AVX2_TILE_CASE(NAME, R, G)                                                               \
    case R * 4 + G: NAME##_tile(y + r, ys, w + r * ws, ws, xp, n, batch, b, R, G); break;
#define AVX2_FLOAT_TILE(NAME, DOT, WT, LOAD, TO_F32)                                             \
    static inline __attribute__((always_inline)) REALM_AVX2 void NAME##_tile(                    \
        float *y, int64_t ys, const WT *w, int64_t ws, const float *xp, int64_t n,             \
        int64_t batch, int64_t b0, const int R, const int G) {                                   \
        __m256 a0[2][2], a1[2][2];                                                               \
        for (int r = 0; r < R; r++)                                                              \
            for (int k = 0; k < G; k++) a0[r][k] = a1[r][k] = _mm256_setzero_ps();               \
        const int64_t full = n / 16;                                                             \
        for (int64_t c = 0; c < full; c++) {                                                     \
            const float *x0 = xp + (c * batch + b0) * 16;                                        \
            __m256 xv[2];                                                                        \
            for (int k = 0; k < G; k++) xv[k] = _mm256_loadu_ps(x0 + k * 16);                    \
            for (int r = 0; r < R; r++) {                                                        \
                _mm_prefetch((const char *)(w + (R + r) * ws + c * 16), _MM_HINT_T0);            \
                const __m256 wv = LOAD(w + r * ws + c * 16);                                     \
                for (int k = 0; k < G; k++) a0[r][k] = _mm256_fmadd_ps(wv, xv[k], a0[r][k]);     \
            }                                                                                    \
            for (int k = 0; k < G; k++) xv[k] = _mm256_loadu_ps(x0 + k * 16 + 8);                \
            for (int r = 0; r < R; r++) {                                                        \
                const __m256 wv = LOAD(w + r * ws + c * 16 + 8);                                 \
                for (int k = 0; k < G; k++) a1[r][k] = _mm256_fmadd_ps(wv, xv[k], a1[r][k]);     \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < R; r++)                                                              \
            for (int k = 0; k < G; k++) {                                                        \
                float s = realm_hsum8(_mm256_add_ps(a0[r][k], a1[r][k]));                        \
                for (int64_t i = full * 16; i < n; i++)                                          \
                    s += TO_F32(w[r * ws + i]) * xp[((i / 16) * batch + b0 + k) * 16 + i % 16];  \
                y[(b0 + k) * ys + r] = s;                                                        \
            }                                                                                    \
    }                                                                                            \
    REALM_AVX2                                                                                   \
    static void NAME##_rows(float *y, int64_t ys, const WT *w, int64_t ws, int nr,             \
                            const float *xp, int64_t n, int64_t batch, int64_t b0,             \
                            int64_t nbat) {                                                      \
        if (nbat == 1) { /* decode: two weight rows at once (four FMA chains in flight) */     \
            int r = 0;                                                                           \
            for (; r + 2 <= nr; r += 2) NAME##_tile(y + r, ys, w + r * ws, ws, xp, n, batch, b0, 2, 1); \
            if (r < nr) DOT(y + r, ys, w + r * ws, xp, n, batch, b0, 1);                         \
            return;                                                                              \
        }                                                                                        \
        for (int64_t b = b0; b < b0 + nbat; b += 2) {                                            \
            const int g = b0 + nbat - b < 2 ? 1 : 2;                                             \
            for (int r = 0; r < nr; r += 2) {                                                    \
                switch ((nr - r < 2 ? 1 : 2) * 4 + g) {                                          \
                AVX2_TILE_CASE(NAME, 1, 1) AVX2_TILE_CASE(NAME, 1, 2)                            \
                AVX2_TILE_CASE(NAME, 2, 1) AVX2_TILE_CASE(NAME, 2, 2)                            \
                default: break;                                                                  \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    }

AVX2_FLOAT_TILE(rows_f32, dot_f32, float, _mm256_loadu_ps, id_f32)
AVX2_FLOAT_TILE(rows_f16, dot_f16, uint16_t, realm_load_f16x8, realm_f16_to_f32)
AVX2_FLOAT_TILE(rows_bf16, dot_bf16, uint16_t, load_bf16x8, realm_bf16_to_f32)

REALM_AVX2
static void dot_rows_float(float *y, int64_t ys, const void *w, int wtype, int64_t ws, int nr,
                           const float *xp, int64_t n, int64_t batch, int64_t b0, int64_t nbat) {
    switch (wtype) {
    case REALM_TYPE_F32: rows_f32_rows(y, ys, w, ws, nr, xp, n, batch, b0, nbat); break;
    case REALM_TYPE_F16: rows_f16_rows(y, ys, w, ws, nr, xp, n, batch, b0, nbat); break;
    default: rows_bf16_rows(y, ys, w, ws, nr, xp, n, batch, b0, nbat); break;
    }
}

/* bytes ahead in the weights that the quantized dots prefetch: a thread's rows are contiguous,
 * and the hardware prefetcher restarts at every page (measured on a shared Sapphire Rapids:
 * Q8_0 matvec 11008 x 4096 at 6.5 GB/s a thread without, against the AVX-512 level's 17 with) */
#define PREFETCH 2048

REALM_AVX2
static inline __m256i load_signed_x(const uint8_t *q) {
    /* stored as q + 128: flipping the top bit gives the signed value */
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)q), _mm256_set1_epi8((char)0x80));
}

/* One Q8_0 weight row against batch rows b0.. (nbat of them), up to 4 at a time: each weight
 * block is loaded, its magnitudes taken and its scale converted once for the 4 rows (one row
 * at a time redid that work per row: an 8-row step cost 5.6x a one-row step). Each row's
 * blocks are summed exactly as a lone row's, so a row's result does not depend on the rows
 * beside it. */
REALM_AVX2
static void dot_q8_0(float *y, int64_t ys, const block_q8_0 *w, const realm_q8x *x, int64_t b0,
                     int64_t nbat) {
    const int64_t nb = x->nb;
    for (int64_t b = b0; b < b0 + nbat; b += 4) {
        const int g = b0 + nbat - b < 4 ? (int)(b0 + nbat - b) : 4;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                         _mm256_setzero_ps()};
        for (int64_t i = 0; i < nb; i++) {
            _mm_prefetch((const char *)(w + i) + PREFETCH, _MM_HINT_T0);
            const __m256i qw = _mm256_loadu_si256((const __m256i *)w[i].qs);
            const __m256i aw = _mm256_sign_epi8(qw, qw); /* |w|: maddubs needs one unsigned side */
            const float wd = _cvtsh_ss(w[i].d);
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                if (r >= g) break;
                const __m256i qx = load_signed_x(realm_q8x_block(x, b + r, i));
                const __m256 p = dot_u8s8_ps(aw, _mm256_sign_epi8(qx, qw));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(wd * x->d[(b + r) * nb + i]), p, acc[r]);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++)
            if (r < g) y[(b + r) * ys] = realm_hsum8(acc[r]);
    }
}

/* Blocks are taken eight at a time: their eight scales (weight x activation) in one vector,
 * each block's broadcast from it with one permute, and the offset term (8 x scale x sum of the
 * block's activation codes) as one FMA per eight blocks. The scalar scale and offset work per
 * block (about a third of the instructions) kept the one-block loop at 0.4-0.6 of the
 * bandwidth. Batch rows go two at a time, sharing each block's unpacking and weight scales
 * (two rows' two accumulators each, scales and offsets fill the 16 registers); each row's blocks
 * are summed exactly as a lone row's, so a row's result does not depend on the rows beside it. */
static inline __attribute__((always_inline)) REALM_AVX2 void q4_0_rows(
    float *y, int64_t ys, const block_q4_0 *w, const realm_q8x *x, int64_t b, const int G) {
    const int64_t nb = x->nb;
    __m256 acc0[2], acc1[2], off[2];  /* per row: even and odd blocks, the offset term */
    for (int r = 0; r < G; r++) acc0[r] = acc1[r] = off[r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= nb; i += 8) {
        _mm_prefetch((const char *)(w + i) + PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + i) + PREFETCH + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + i) + PREFETCH + 128, _MM_HINT_T0);
        const __m128i h = _mm_setr_epi16((short)w[i].d, (short)w[i + 1].d, (short)w[i + 2].d,
                                         (short)w[i + 3].d, (short)w[i + 4].d, (short)w[i + 5].d,
                                         (short)w[i + 6].d, (short)w[i + 7].d);
        const __m256 dw = _mm256_cvtph_ps(h);
        __m256 sc[2];
        for (int r = 0; r < G; r++) {
            sc[r] = _mm256_mul_ps(dw, _mm256_loadu_ps(x->d + (b + r) * nb + i));
            off[r] = _mm256_fmadd_ps(
                sc[r], _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(x->sum + (b + r) * nb + i))),
                off[r]);
        }
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m256i qw = realm_nibbles32(w[i + j].qs);
            const __m256i lane = _mm256_set1_epi32(j);
            for (int r = 0; r < G; r++) {
                const __m256 p = dot_u8s8_ps(qw, load_signed_x(realm_q8x_block(x, b + r, i + j)));
                const __m256 s = _mm256_permutevar8x32_ps(sc[r], lane);
                if (j % 2 == 0)
                    acc0[r] = _mm256_fmadd_ps(s, p, acc0[r]);
                else
                    acc1[r] = _mm256_fmadd_ps(s, p, acc1[r]);
            }
        }
    }
    for (int r = 0; r < G; r++) {
        const float *d = x->d + (b + r) * nb;
        const int32_t *sum = x->sum + (b + r) * nb;
        float offset = 8.0f * realm_hsum8(off[r]);  /* sum over blocks of scale * 8 * sum(x) */
        __m256 a = acc0[r];
        for (int64_t t = i; t < nb; t++) {
            const float sct = _cvtsh_ss(w[t].d) * d[t];
            a = _mm256_fmadd_ps(_mm256_set1_ps(sct),
                                dot_u8s8_ps(realm_nibbles32(w[t].qs),
                                            load_signed_x(realm_q8x_block(x, b + r, t))),
                                a);
            offset += sct * (float)(8 * sum[t]);
        }
        y[(b + r) * ys] = realm_hsum8(_mm256_add_ps(a, acc1[r])) - offset;
    }
}

REALM_AVX2
static void dot_q4_0(float *y, int64_t ys, const block_q4_0 *w, const realm_q8x *x, int64_t b0,
                     int64_t nbat) {
    int64_t b = b0;
    for (; b + 2 <= b0 + nbat; b += 2) q4_0_rows(y, ys, w, x, b, 2);
    if (b < b0 + nbat) q4_0_rows(y, ys, w, x, b, 1);
}

REALM_AVX2
static void quantize_q8x(const realm_q8x *x, const float *src, int64_t b) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const int64_t nb = x->nb;
    for (int64_t i = 0; i < nb; i++) {
        const float *v = src + i * QK;
        __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
        __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        const float d = amax / 127.0f;
        const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        /* packs works within 128-bit lanes; the permute restores element order */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        p = _mm256_xor_si256(p, _mm256_set1_epi8((char)0x80));  /* + 128 */
        _mm256_storeu_si256((__m256i *)realm_q8x_block(x, b, i), p);
        x->d[b * nb + i] = d;
        x->sum[b * nb + i] = _mm_cvtsi128_si32(s4);
    }
}

REALM_AVX2
static void axpy_f32(int64_t n, float a, const float *x, float *y) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

REALM_AVX2
static void axpy_f16(int64_t n, float a, const uint16_t *x, float *y) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, realm_load_f16x8(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * realm_f16_to_f32(x[i]);
}

REALM_AVX2
void realm_quantize_q8x_plain_avx2(const realm_q8x *x, const float *src, int64_t b) {
    quantize_q8x(x, src, b);
}

int realm_gemm_f32_avx2(float *y, int64_t ldy, const float *a, int64_t lda, const void *b,
                        int btype, int64_t ldb, int64_t m, int64_t n, int64_t k, int ith,
                        int nth, atomic_int_fast64_t *next);  /* gemm_avx2.c */

/* The smallest batch of Q8_0 / Q4_0 weights that takes the GEMM (see the measurement at
 * .gemm_q8 below; Q8_0's row dots share each weight block among 4 rows since: a TinyLlama-shaped
 * decode step on a Zen 5 at this level, rows / GEMM, 104 / 120 ms at 8 rows, 129 / 131 at 10,
 * 162 / 155 at 12; Q4_0's take two rows at a time: 35 / 60 ms at 2 rows, 60 / 70 at 3, 72 / 90 at
 * 4, 105 / 102 at 6) */
static int64_t gemm_q_min_batch(int wtype) { return wtype == REALM_TYPE_Q8_0 ? 11 : 5; }

/* The smallest batch that takes the integer GEMM, per type (measured, 2048 x 5632, 2-core Zen 4
 * at this level: Q4_K streaming 2.37 ms at 12 rows against the GEMM's 3.30, Q6_K 1.88 against
 * 3.97; Q5_0 4.39 against 3.91 at 8) */
static int64_t gemm_kq_min_batch(int wtype) {
    switch (wtype) {
    case REALM_TYPE_Q4_K: case REALM_TYPE_Q5_K: return 24;
    case REALM_TYPE_Q6_K: return 32;
    default: return 8;
    }
}

const realm_isa_ops realm_ops_avx2 = {
    .name = "avx2",
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
    .attn_probs_f16 = realm_attn_probs_f16_avx2,
    .attn_values_f16 = realm_attn_values_f16_avx2,
    .gemm_f32 = realm_gemm_f32_avx2,
    .gemm_q8 = realm_gemm_q8_avx2,
    /* measured (one thread, 2048 x 4096 weights, Sapphire Rapids at the AVX2 level): Q8_0
     * streaming 1.03 / 1.51 ms at batch 2 / 3 against the GEMM's 0.91 / 1.05; Q4_0 1.24 against
     * 0.56 at batch 2 (the GEMM also wins at batch 1, 0.44 against 0.80, but a lone vector
     * keeps the matvec path, which is memory-bound on larger machines) */
    .gemm_q_min_batch = gemm_q_min_batch,
    .dot_other = realm_dot_other_avx2,
    .quantize_q8x_plain = quantize_q8x,
    .quantize_q8k = realm_quantize_q8k_avx2,
    .gemm_kq = realm_gemm_kq_avx2,
    .gemm_kq_supports = realm_gemm_kq_avx2_supports,
    .gemm_kq_min_batch = gemm_kq_min_batch,
    .matmul_packed = realm_matmul_packed_avx2,
};
#endif
