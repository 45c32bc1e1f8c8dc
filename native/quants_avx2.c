/* Realm native kernels: the dots of quants.c's types with AVX2 (x86 only), for the AVX2 and
 * AVX-512 tables. The specification is quants_dot.inc (the portable level): every 32 weights of
 * a row are integers q with weight = a_h * q + b_h per half h of 16; here they are unpacked
 * with vector shifts and masks into 32 bytes at once and dotted with vpmaddubsw.
 *
 * vpmaddubsw multiplies unsigned by signed bytes into saturating int16 pairs, so each type's
 * q is first made unsigned and small: q' = q + off (off: Q5_0 16, Q3_K 4, Q6_K 32; 0 for the
 * types whose q is already 0..31), and a pair is at most 2 x 63 x 127 < 32767; the offset
 * comes back as -off * (sum of the activations of the half). IQ4's levels reach 127 in
 * magnitude: their dot uses |q| and the activations with q's sign, as llama.cpp does. The
 * activations arrive as the plain q8x layout's unsigned bytes (q + 128); xor 0x80 makes them
 * signed.
 *
 * Per block and activation row, the int32 lanes (4 elements each; lanes 0-3 are the first
 * half, 4-7 the second) are converted and accumulated into a float vector with each half's
 * scale, and reduced once per row at the end. The results agree with the portable level to
 * float32 rounding of the sums' order.
 */
#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define F REALM_AVX2
#define INLINE static inline __attribute__((always_inline)) REALM_AVX2

/* IQ4_NL / IQ4_XS's 16 levels (ggml's kvalues_iq4nl), twice: one copy per 128-bit lane */
static const int8_t iq4_levels32[32] = {-127, -104, -83, -65, -49, -35, -22, -10, 1,  13, 25,
                                        38,   53,   69,  89,  113, -127, -104, -83, -65, -49, -35,
                                        -22,  -10,  1,   13,  25,  38,   53,   69,  89,  113};

INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 bytes of nibbles -> 32 bytes: the low nibbles (elements 0..15), then the high ones */
INLINE __m256i nibbles(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    const __m128i m = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

/* 32 bits -> 32 bytes, byte l = 0xff if bit l is set */
INLINE __m256i bits_to_bytes(uint32_t bits) {
    const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2,
                                          2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

INLINE uint32_t load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

INLINE float h2f(uint16_t h) { return _cvtsh_ss(h); }

/* Q4_K / Q5_K's 6-bit scale and min of sub-block j (ggml's get_scale_min_k4) */
INLINE void k4_scale_min(int j, const uint8_t *s, float *sc, float *m) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *m = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4));
        *m = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* The scales of scale-group g (a super-block of 8 sub-blocks for the 256-element types, one
 * block for the others): a[2s + h] multiplies q' of half h of sub-block s and c[2s + h] the
 * half's activation sum (c = b - a * off). */
INLINE void group_scales(const uint8_t *row, int wtype, int64_t g, float *a, float *c) {
    switch (wtype) {
    case REALM_TYPE_Q4_1: {
        const block_q4_1 *b = (const block_q4_1 *)row + g;
        a[0] = a[1] = h2f(b->d);
        c[0] = c[1] = h2f(b->m);
        break;
    }
    case REALM_TYPE_Q5_0: {
        const block_q5_0 *b = (const block_q5_0 *)row + g;
        a[0] = a[1] = h2f(b->d);
        c[0] = c[1] = -16.0f * a[0];
        break;
    }
    case REALM_TYPE_Q5_1: {
        const block_q5_1 *b = (const block_q5_1 *)row + g;
        a[0] = a[1] = h2f(b->d);
        c[0] = c[1] = h2f(b->m);
        break;
    }
    case REALM_TYPE_IQ4_NL: {
        a[0] = a[1] = h2f(((const block_iq4_nl *)row + g)->d);
        c[0] = c[1] = 0.0f;
        break;
    }
    case REALM_TYPE_Q2_K: {
        const block_q2_K *b = (const block_q2_K *)row + g;
        const float d = h2f(b->d), dmin = h2f(b->dmin);
        for (int k = 0; k < 16; k++) {  /* scales[k]: sub-block k / 2, half k % 2 */
            const int sub = k / 2, n = sub / 4, j = sub % 4;
            const uint8_t sc = b->scales[n * 8 + 2 * j + k % 2];
            a[k] = d * (float)(sc & 0x0f);
            c[k] = -(dmin * (float)(sc >> 4));
        }
        break;
    }
    case REALM_TYPE_Q3_K: {
        const block_q3_K *b = (const block_q3_K *)row + g;
        const float d = h2f(b->d);
        const uint8_t *s = b->scales;
        for (int k = 0; k < 16; k++) {
            const int sub = k / 2, n = sub / 4, j = sub % 4, is = n * 8 + 2 * j + k % 2;
            const int lo = is < 8 ? (s[is] & 0x0f) : (s[is - 8] >> 4);
            const int hi = (s[8 + is % 4] >> (2 * (is / 4))) & 3;
            a[k] = d * (float)((lo | (hi << 4)) - 32);
            c[k] = -4.0f * a[k];
        }
        break;
    }
    case REALM_TYPE_Q4_K:
    case REALM_TYPE_Q5_K: {
        const int k4 = wtype == REALM_TYPE_Q4_K;
        const block_q4_K *b4 = (const block_q4_K *)row + g;
        const block_q5_K *b5 = (const block_q5_K *)row + g;
        const float d = h2f(k4 ? b4->d : b5->d), dmin = h2f(k4 ? b4->dmin : b5->dmin);
        const uint8_t *s = k4 ? b4->scales : b5->scales;
        for (int sub = 0; sub < 8; sub++) {
            float sc, m;
            k4_scale_min(sub, s, &sc, &m);
            a[2 * sub] = a[2 * sub + 1] = d * sc;
            c[2 * sub] = c[2 * sub + 1] = -(dmin * m);
        }
        break;
    }
    case REALM_TYPE_Q6_K: {
        const block_q6_K *b = (const block_q6_K *)row + g;
        const float d = h2f(b->d);
        for (int k = 0; k < 16; k++) {
            const int sub = k / 2, n = sub / 4, gg = sub % 4;
            a[k] = d * (float)b->scales[n * 8 + 2 * gg + k % 2];
            c[k] = -32.0f * a[k];
        }
        break;
    }
    default: {  /* REALM_TYPE_IQ4_XS */
        const block_iq4_xs *b = (const block_iq4_xs *)row + g;
        const float d = h2f(b->d);
        for (int ib = 0; ib < 8; ib++) {
            const int ls = ((b->scales_l[ib / 2] >> 4 * (ib % 2)) & 0x0f) |
                           (((b->scales_h >> 2 * ib) & 3) << 4);
            a[2 * ib] = a[2 * ib + 1] = d * (float)(ls - 32);
            c[2 * ib] = c[2 * ib + 1] = 0.0f;
        }
        break;
    }
    }
}

/* q' of sub-block s of scale-group g: 32 bytes in element order (signed only for IQ4) */
INLINE __m256i group_bits(const uint8_t *row, int wtype, int64_t g, int s) {
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    switch (wtype) {
    case REALM_TYPE_Q4_1: return nibbles(((const block_q4_1 *)row + g)->qs);
    case REALM_TYPE_Q5_0: {
        const block_q5_0 *b = (const block_q5_0 *)row + g;
        return _mm256_or_si256(nibbles(b->qs), _mm256_and_si256(bits_to_bytes(load_u32(b->qh)),
                                                                _mm256_set1_epi8(0x10)));
    }
    case REALM_TYPE_Q5_1: {
        const block_q5_1 *b = (const block_q5_1 *)row + g;
        return _mm256_or_si256(nibbles(b->qs), _mm256_and_si256(bits_to_bytes(load_u32(b->qh)),
                                                                _mm256_set1_epi8(0x10)));
    }
    case REALM_TYPE_IQ4_NL:
        return _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)iq4_levels32),
                                   nibbles(((const block_iq4_nl *)row + g)->qs));
    case REALM_TYPE_Q2_K: {
        const block_q2_K *b = (const block_q2_K *)row + g;
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b->qs + (s / 4) * 32));
        return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * (s % 4))), _mm256_set1_epi8(3));
    }
    case REALM_TYPE_Q3_K: {
        const block_q3_K *b = (const block_q3_K *)row + g;
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b->qs + (s / 4) * 32));
        const __m256i m = _mm256_set1_epi8((char)(1u << s));
        const __m256i hb = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)b->hmask), m), m);
        /* q = low - (hbit ? 0 : 4): q' = q + 4 = low + (hbit ? 4 : 0) */
        return _mm256_add_epi8(_mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * (s % 4))), _mm256_set1_epi8(3)),
                               _mm256_and_si256(hb, _mm256_set1_epi8(4)));
    }
    case REALM_TYPE_Q4_K: {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(((const block_q4_K *)row + g)->qs + (s / 2) * 32));
        return _mm256_and_si256(s & 1 ? _mm256_srli_epi16(v, 4) : v, lo4);
    }
    case REALM_TYPE_Q5_K: {
        const block_q5_K *b = (const block_q5_K *)row + g;
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b->qs + (s / 2) * 32));
        const __m256i u = _mm256_set1_epi8((char)(1u << s));
        const __m256i hb = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)b->qh), u), u);
        return _mm256_or_si256(_mm256_and_si256(s & 1 ? _mm256_srli_epi16(v, 4) : v, lo4),
                               _mm256_and_si256(hb, _mm256_set1_epi8(0x10)));
    }
    case REALM_TYPE_Q6_K: {
        const block_q6_K *b = (const block_q6_K *)row + g;
        const int n = s / 4, gg = s % 4;
        const __m256i ql = _mm256_loadu_si256((const __m256i *)(b->ql + n * 64 + (gg & 1) * 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(b->qh + n * 32));
        const __m256i lo = _mm256_and_si256(gg >> 1 ? _mm256_srli_epi16(ql, 4) : ql, lo4);
        const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * gg)), _mm256_set1_epi8(3));
        return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));  /* q + 32, 0..63 */
    }
    default:  /* REALM_TYPE_IQ4_XS */
        return _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)iq4_levels32),
                                   nibbles(((const block_iq4_xs *)row + g)->qs + s * 16));
    }
}

/* One weight row of type WTYPE against batch rows [b0, b0 + nbat), 4 at a time; each scale
 * group (SUBS sub-blocks of 32) is decoded once per group of rows. PER_HALF: the halves of a
 * sub-block have their own scales (Q2_K, Q3_K, Q6_K), so the constant term needs each half's
 * activation sum; otherwise the block's sum (kept with the quantized activations) serves, an
 * eighth added in each lane so that it meets the dot within the block (the two cancel in
 * K-quant rows: summed apart over a row, float32 loses the difference). */
#define DEFINE_DOT(T, WTYPE, SUBS, PER_HALF, SIGNED_Q)                                            \
    /* rows g0 .. g0 + n - 1, n a constant after inlining: the accumulators stay in registers */ \
    INLINE void rows_##T(float *y, int64_t ys, const uint8_t *row, const realm_q8x *x,          \
                         int64_t g0, const int n) {                                              \
        const int64_t nb = x->nb;                                                                 \
        const __m256i ones16 = _mm256_set1_epi16(1), ones8 = _mm256_set1_epi8(1);                 \
        const __m256i flip = _mm256_set1_epi8((char)0x80);                                        \
        __m256 acc[8];                                                                            \
        for (int r = 0; r < n; r++) acc[r] = _mm256_setzero_ps();                                 \
        for (int64_t g = 0; g < nb / (SUBS); g++) {                                               \
            float a[2 * (SUBS)], c[2 * (SUBS)];                                                   \
            group_scales(row, WTYPE, g, a, c);                                                    \
            for (int s = 0; s < (SUBS); s++) {                                                    \
                const int64_t i = g * (SUBS) + s;                                                 \
                const __m256i q = group_bits(row, WTYPE, g, s);                                   \
                const __m256i qabs = SIGNED_Q ? _mm256_abs_epi8(q) : q;                           \
                const __m256 av = PER_HALF ? _mm256_set_m128(_mm_set1_ps(a[2 * s + 1]),           \
                                                             _mm_set1_ps(a[2 * s]))               \
                                           : _mm256_set1_ps(a[2 * s]);                            \
                for (int r = 0; r < n; r++) {                                                     \
                    const int64_t b = g0 + r;                                                     \
                    const __m256i xs = _mm256_xor_si256(                                          \
                        _mm256_loadu_si256((const __m256i *)realm_q8x_block(x, b, i)), flip);     \
                    const __m256i dq = _mm256_madd_epi16(                                         \
                        _mm256_maddubs_epi16(qabs, SIGNED_Q ? _mm256_sign_epi8(xs, q) : xs),      \
                        ones16);                                                                  \
                    __m256 t;                                                                     \
                    if (PER_HALF) {                                                               \
                        const __m256i sx =                                                        \
                            _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, xs), ones16);           \
                        const __m256 cv = _mm256_set_m128(_mm_set1_ps(c[2 * s + 1]),              \
                                                          _mm_set1_ps(c[2 * s]));                 \
                        t = _mm256_fmadd_ps(av, _mm256_cvtepi32_ps(dq),                           \
                                            _mm256_mul_ps(cv, _mm256_cvtepi32_ps(sx)));           \
                    } else if (SIGNED_Q) {                                                        \
                        t = _mm256_mul_ps(av, _mm256_cvtepi32_ps(dq));                            \
                    } else {                                                                      \
                        t = _mm256_fmadd_ps(av, _mm256_cvtepi32_ps(dq),                           \
                                            _mm256_set1_ps(0.125f * c[2 * s] *                    \
                                                           (float)x->sum[b * nb + i]));           \
                    }                                                                             \
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(x->d[b * nb + i]), t, acc[r]);        \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        for (int r = 0; r < n; r++) y[(g0 + r) * ys] = hsum8(acc[r]);                             \
    }                                                                                             \
    F static void dot_##T(float *y, int64_t ys, const uint8_t *row, const realm_q8x *x,           \
                          int64_t b0, int64_t nbat) {                                             \
        for (int64_t g0 = b0; g0 < b0 + nbat; g0 += 4) {                                          \
            switch (b0 + nbat - g0 < 4 ? (int)(b0 + nbat - g0) : 4) {                             \
            case 1: rows_##T(y, ys, row, x, g0, 1); break;                                        \
            case 2: rows_##T(y, ys, row, x, g0, 2); break;                                        \
            case 3: rows_##T(y, ys, row, x, g0, 3); break;                                        \
            default: rows_##T(y, ys, row, x, g0, 4); break;                                       \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_DOT(q4_1, REALM_TYPE_Q4_1, 1, 0, 0)
DEFINE_DOT(q5_0, REALM_TYPE_Q5_0, 1, 0, 0)
DEFINE_DOT(q5_1, REALM_TYPE_Q5_1, 1, 0, 0)
DEFINE_DOT(iq4_nl, REALM_TYPE_IQ4_NL, 1, 0, 1)
DEFINE_DOT(q2_K, REALM_TYPE_Q2_K, 8, 1, 0)
DEFINE_DOT(q3_K, REALM_TYPE_Q3_K, 8, 1, 0)
DEFINE_DOT(q4_K, REALM_TYPE_Q4_K, 8, 0, 0)
DEFINE_DOT(q5_K, REALM_TYPE_Q5_K, 8, 0, 0)
DEFINE_DOT(q6_K, REALM_TYPE_Q6_K, 8, 1, 0)
DEFINE_DOT(iq4_xs, REALM_TYPE_IQ4_XS, 8, 0, 1)
#undef DEFINE_DOT

F void realm_dot_other_avx2(float *y, int64_t ys, const void *w, int wtype, const realm_q8x *x,
                            int64_t b0, int64_t nbat) {
    const uint8_t *row = w;
    switch (wtype) {
    case REALM_TYPE_Q4_1: dot_q4_1(y, ys, row, x, b0, nbat); break;
    case REALM_TYPE_Q5_0: dot_q5_0(y, ys, row, x, b0, nbat); break;
    case REALM_TYPE_Q5_1: dot_q5_1(y, ys, row, x, b0, nbat); break;
    case REALM_TYPE_Q2_K: dot_q2_K(y, ys, row, x, b0, nbat); break;
    case REALM_TYPE_Q3_K: dot_q3_K(y, ys, row, x, b0, nbat); break;
    case REALM_TYPE_Q4_K: dot_q4_K(y, ys, row, x, b0, nbat); break;
    case REALM_TYPE_Q5_K: dot_q5_K(y, ys, row, x, b0, nbat); break;
    case REALM_TYPE_Q6_K: dot_q6_K(y, ys, row, x, b0, nbat); break;
    case REALM_TYPE_IQ4_NL: dot_iq4_nl(y, ys, row, x, b0, nbat); break;
    case REALM_TYPE_IQ4_XS: dot_iq4_xs(y, ys, row, x, b0, nbat); break;
    default: break;
    }
}
#endif
