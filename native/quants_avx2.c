/* Realm native kernels: the dots of quants.c's types with AVX2 (x86 only), for the AVX2 table
 * and, for the types quants_avx512.c leaves to it, the AVX-512 one. The specification is
 * quants_dot.inc (the portable level): every 32 weights of a row are integers q with
 * weight = a_h * q + b_h per half h of 16; here they are unpacked with vector shifts and masks,
 * 32 at once, and dotted with vpmaddubsw (unsigned x signed bytes into saturating int16 pairs),
 * so each type's q is made unsigned and small first (q' = q + off, a pair at most
 * 2 x 63 x 127 < 32767) or, where it is signed and large (IQ4's levels reach 127), the dot
 * takes |q| and the activations with q's sign, as llama.cpp does.
 *
 * Blocks of 32 (Q4_1, Q5_0, Q5_1, IQ4_NL) meet the plain q8x activations (unsigned bytes
 * q + 128, xor 0x80 makes them signed; a float scale per 32): per block the int32 lanes are
 * converted and accumulated with the scales, and so are IQ4_XS's sub-blocks of 32 (each with
 * its own scale, as llama.cpp's IQ4_XS dot uses one per 32 too). Super-blocks of 256 (Q2_K ..
 * Q6_K) meet
 * the Q8_K activations (signed, one scale per 256, sums of 16): the whole super-block's dot is
 * integer, sub-block scales included, and takes one float multiply per activation row. The
 * results agree with the portable level to float32 rounding of the sums' order.
 */
#include "internal.h"
#include "simd_avx2.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define F REALM_AVX2
#define INLINE static inline __attribute__((always_inline)) REALM_AVX2
#define PREFETCH 2048  /* bytes ahead in the weights: a thread's rows are contiguous */

/* IQ4_NL / IQ4_XS's 16 levels (ggml's kvalues_iq4nl), twice: one copy per 128-bit lane */
static const int8_t iq4_levels32[32] = {-127, -104, -83, -65, -49, -35, -22, -10, 1,  13, 25,
                                        38,   53,   69,  89,  113, -127, -104, -83, -65, -49, -35,
                                        -22,  -10,  1,   13,  25,  38,   53,   69,  89,  113};

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

/* ---- the types of 32-element blocks against the plain q8x activations ----
 *
 * As avx2.c's Q8_0 and Q4_0 dots, one activation row at a time (the weight row comes again
 * from L1 for the next rows of the batch): per block, the int32 lanes of vpmaddubsw +
 * vpmaddwd are converted and accumulated with the block's scales. Q5_0's q = q' - 16 and
 * IQ4_NL's levels are signed: |q| x (x with q's sign), exact in integers. Q4_1 / Q5_1's
 * minimum m adds m * sum(x), an eighth in each lane of the block's term, so that it meets
 * the block's dot before the row's sum (the two nearly cancel: summed apart over a row,
 * float32 would lose the difference). */

/* Q5_0 / Q5_1: the nibbles with the 5th bits of qh */
INLINE __m256i five_bits(const uint8_t *qs, const uint8_t *qh) {
    return _mm256_or_si256(realm_nibbles32(qs),
                           _mm256_and_si256(bits_to_bytes(load_u32(qh)), _mm256_set1_epi8(0x10)));
}

/* Q5_0's q = (nibble | 5th bit << 4) - 16: the nibble where the bit is set, else nibble - 16,
 * which is the nibble with the top four bits set */
INLINE __m256i five_bits_signed(const uint8_t *qs, const uint8_t *qh) {
    return _mm256_or_si256(realm_nibbles32(qs), _mm256_andnot_si256(bits_to_bytes(load_u32(qh)),
                                                            _mm256_set1_epi8((char)0xf0)));
}

/* The int32 lanes of maddubs(u, s) as floats */
INLINE __m256 dot_us(__m256i u, __m256i s) {
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

INLINE __m256i signed_x(const realm_q8x *x, int64_t b, int64_t i) {
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)realm_q8x_block(x, b, i)),
                            _mm256_set1_epi8((char)0x80));
}

/* 8 half-precision fields at the same offset of 8 consecutive blocks, as floats */
#define HALVES8(w, i, field)                                                                    \
    _mm256_cvtph_ps(_mm_setr_epi16((short)w[i].field, (short)w[i + 1].field,                  \
                                   (short)w[i + 2].field, (short)w[i + 3].field,              \
                                   (short)w[i + 4].field, (short)w[i + 5].field,              \
                                   (short)w[i + 6].field, (short)w[i + 7].field))

/* Lane j of v in every lane */
INLINE __m256 lane(__m256 v, int j) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j)); }

/* BLOCK: the block type; Q(i): q of block w[i], signed (SIGNED) or unsigned with minimum
 * field m (HAS_MIN). Blocks are taken eight at a time: their scales (and minimum terms) are
 * converted as vectors, and each block takes its own lane with one permute, instead of the
 * scalar conversions and broadcasts per block that bounded the one-block loop (AVX2 Q4_1
 * matvec at 0.5 of the bandwidth). Every block still adds the same float terms in the same
 * order, so the result is the same bits as the one-block loop's, which the last blocks of a
 * row (fewer than eight) take. (Two accumulators, for even and odd blocks, measured no faster:
 * the per-block work, not the accumulator's latency, bounds these dots.) */
#define DEFINE_DOT32(T, BLOCK, SIGNED, Q, HAS_MIN)                                                \
    INLINE __m256 bstep_##T(__m256 acc, const BLOCK *w, const realm_q8x *x, int64_t b,          \
                            int64_t i, __m256 d, __m256 dx, __m256 mterm) {                      \
        const __m256i q = Q(i);                                                                   \
        const __m256i xs = signed_x(x, b, i);                                                     \
        if (SIGNED) {                                                                             \
            const __m256 p = dot_us(_mm256_abs_epi8(q), _mm256_sign_epi8(xs, q));                 \
            return _mm256_fmadd_ps(_mm256_mul_ps(d, dx), p, acc);                                 \
        }                                                                                         \
        (void)mterm;                                                                              \
        const __m256 t = _mm256_fmadd_ps(d, dot_us(q, xs), mterm);                               \
        return _mm256_fmadd_ps(dx, t, acc);                                                       \
    }                                                                                             \
    F static void dot_##T(float *y, int64_t ys, const uint8_t *row, const realm_q8x *x,           \
                          int64_t b0, int64_t nbat) {                                             \
        const BLOCK *w = (const BLOCK *)row;                                                      \
        const int64_t nb = x->nb;                                                                 \
        for (int64_t b = b0; b < b0 + nbat; b++) {                                                \
            const float *dx = x->d + b * nb;                                                      \
            const int32_t *sx = x->sum + b * nb;                                                  \
            __m256 acc = _mm256_setzero_ps();                                                     \
            int64_t i = 0;                                                                        \
            for (; i + 8 <= nb; i += 8) {                                                         \
                /* ahead of the hardware prefetcher, which restarts at every page (measured:   \
                 * without it, these dots ran 3x slower once the weights left L2) */            \
                for (int64_t o = 0; o < 8 * (int64_t)sizeof(BLOCK); o += 64)                      \
                    _mm_prefetch((const char *)(w + i) + PREFETCH + o, _MM_HINT_T0);              \
                const __m256 d8 = HALVES8(w, i, d), dx8 = _mm256_loadu_ps(dx + i);                \
                __m256 m8 = _mm256_setzero_ps();                                                  \
                if (HAS_MIN)                                                                      \
                    m8 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.125f), HALVES8(w, i, MINF)),  \
                                       _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(sx + i)))); \
                _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++)                               \
                    acc = bstep_##T(acc, w, x, b, i + j, lane(d8, j), lane(dx8, j),                \
                                    HAS_MIN ? lane(m8, j) : m8);                                  \
            }                                                                                     \
            for (; i < nb; i++) {                                                                 \
                const float mi = HAS_MIN ? 0.125f * MIN_OF(i) * (float)sx[i] : 0.0f;              \
                acc = bstep_##T(acc, w, x, b, i, _mm256_set1_ps(h2f(w[i].d)),                     \
                                _mm256_set1_ps(dx[i]), _mm256_set1_ps(mi));                       \
            }                                                                                     \
            y[b * ys] = realm_hsum8(acc);                                                         \
        }                                                                                         \
    }

#define Q4_1_Q(i) realm_nibbles32(w[i].qs)
#define Q5_0_Q(i) five_bits_signed(w[i].qs, w[i].qh)
#define Q5_1_Q(i) five_bits(w[i].qs, w[i].qh)
#define IQ4_NL_Q(i) \
    _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)iq4_levels32), realm_nibbles32(w[i].qs))
#define MIN_OF(i) h2f(w[i].MINF)
#define MINF m
DEFINE_DOT32(q4_1, block_q4_1, 0, Q4_1_Q, 1)
DEFINE_DOT32(q5_1, block_q5_1, 0, Q5_1_Q, 1)
#undef MINF
#define MINF d /* not read: the signed types have no minimum */
DEFINE_DOT32(q5_0, block_q5_0, 1, Q5_0_Q, 0)
DEFINE_DOT32(iq4_nl, block_iq4_nl, 1, IQ4_NL_Q, 0)
#undef MINF
/* IQ4_XS against the same activations: its sub-blocks of 32 each have their own scale
 * d * (ls - 32), as a block of 32 would; super-block g holds sub-blocks 8g .. 8g + 7 */
F static void dot_iq4_xs(float *y, int64_t ys, const uint8_t *row, const realm_q8x *x,
                         int64_t b0, int64_t nbat) {
    const block_iq4_xs *w = (const block_iq4_xs *)row;
    const int64_t nb = x->nb;
    const __m256i levels = _mm256_loadu_si256((const __m256i *)iq4_levels32);
    for (int64_t b = b0; b < b0 + nbat; b++) {
        const float *dx = x->d + b * nb;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t g = 0; g < nb / 8; g++) {
            const block_iq4_xs *blk = w + g;
            _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + PREFETCH + 64, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + PREFETCH + 128, _MM_HINT_T0);
            const float d = h2f(blk->d);
            const uint32_t sl = load_u32(blk->scales_l), sh = blk->scales_h;
            for (int ib = 0; ib < 8; ib++) {
                const int64_t i = 8 * g + ib;
                const int ls = (int)(((sl >> 4 * ib) & 0x0f) | (((sh >> 2 * ib) & 3) << 4));
                const __m256i q = _mm256_shuffle_epi8(levels, realm_nibbles32(blk->qs + 16 * ib));
                const __m256i xs = signed_x(x, b, i);
                const __m256 p = dot_us(_mm256_abs_epi8(q), _mm256_sign_epi8(xs, q));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * (float)(ls - 32) * dx[i]), p, acc);
            }
        }
        y[b * ys] = realm_hsum8(acc);
    }
}

#undef Q4_1_Q
#undef Q5_0_Q
#undef Q5_1_Q
#undef IQ4_NL_Q
#undef MIN_OF
#undef HALVES8
#undef DEFINE_DOT32

/* ---- the super-block types (K-quants) against the Q8_K activations ----
 *
 * Per super-block of 256 and activation row, everything up to one float multiply is integer:
 * vpmaddubsw multiplies the unsigned weight codes q' (q + off, off as above) by the signed
 * activation codes into int16 pairs, vpmaddwd multiplies those by the sub-block's integer
 * scale (broadcast as int16) and adds pairs into int32 lanes, and the lanes of the super-block
 * add up in one int32 vector (bounded: 8 sub-blocks x 16 x 63 x 127 x 127 < 2^31). The offset
 * and the K-quants' minimums are integer dots of the scales with the activations' 16-element
 * sums. Then y += d_w * d_x * (that vector), and one horizontal sum per row at the end. */

/* vpshufb controls broadcasting int16 lane k of a 128-bit lane: KSEL[k] for one scale over
 * 32 elements (Q4_K, Q5_K: sub-blocks of 32 with one scale), HSEL[j] for scale 2j in
 * the low 128-bit lane and 2j + 1 in the high one (Q2_K, Q3_K, Q6_K: one scale per 16). */
#define SEL16(a) (char)(2 * (a)), (char)(2 * (a) + 1)
#define SEL8X(a) SEL16(a), SEL16(a), SEL16(a), SEL16(a), SEL16(a), SEL16(a), SEL16(a), SEL16(a)
static const char KSEL[8][32] __attribute__((aligned(32))) = {
    {SEL8X(0), SEL8X(0)}, {SEL8X(1), SEL8X(1)}, {SEL8X(2), SEL8X(2)}, {SEL8X(3), SEL8X(3)},
    {SEL8X(4), SEL8X(4)}, {SEL8X(5), SEL8X(5)}, {SEL8X(6), SEL8X(6)}, {SEL8X(7), SEL8X(7)},
};
static const char HSEL[4][32] __attribute__((aligned(32))) = {
    {SEL8X(0), SEL8X(1)}, {SEL8X(2), SEL8X(3)}, {SEL8X(4), SEL8X(5)}, {SEL8X(6), SEL8X(7)},
};
#undef SEL8X
#undef SEL16

INLINE __m256i sel(__m256i scales16, const char *ctl) {
    return _mm256_shuffle_epi8(scales16, _mm256_load_si256((const __m256i *)ctl));
}

/* sum over the 32 codes of one sub-block: scale (int16 lanes) x maddubs(q', x) */
INLINE __m256i sdot(__m256i q, const int8_t *x, __m256i scale) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)x)),
                             scale);
}

/* Q3_K's 16 6-bit scales minus 32 from their 12 bytes: bytes 0-7 hold the low nibbles of
 * scales 0-7 (low) and 8-15 (high), bytes 8-11 the top 2 bits, scale 4k + j at bits 2k of
 * byte 8 + j. */
INLINE __m128i q3_scales(const uint8_t *s) {
    const uint32_t m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
    const uint32_t a = load_u32(s), b = load_u32(s + 4), h = load_u32(s + 8);
    const __m128i v = _mm_setr_epi32((int)((a & m4) | ((h & m2) << 4)),
                                     (int)((b & m4) | (((h >> 2) & m2) << 4)),
                                     (int)(((a >> 4) & m4) | (((h >> 4) & m2) << 4)),
                                     (int)(((b >> 4) & m4) | (((h >> 6) & m2) << 4)));
    return _mm_sub_epi8(v, _mm_set1_epi8(32));
}

/* The activation rows of one super-block */
typedef struct {
    const int8_t *q[4];
    const int16_t *sums[4];
    __m256 d[4];  /* d_x broadcast */
} xsb;

/* y_r += dw * d_x(r) * sumi_r for the n rows */
INLINE void finish(__m256 *acc, const __m256i *sumi, float dw, const xsb *xs, const int n) {
    const __m256 w = _mm256_set1_ps(dw);
    for (int r = 0; r < n; r++)
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(w, xs->d[r]), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
}

/* the minimums' term: y_r -= dmin * d_x(r) * sum_k m_k * (sum of sub-block k's codes), with
 * 8 mins of 32 elements (m16: int16 lanes 0-7) */
INLINE void minus_mins32(__m256 *acc, __m128i m16, float dmin, const xsb *xs, const int n) {
    const __m256 w = _mm256_set1_ps(dmin);
    for (int r = 0; r < n; r++) {
        const __m128i s0 = _mm_loadu_si128((const __m128i *)xs->sums[r]);
        const __m128i s1 = _mm_loadu_si128((const __m128i *)(xs->sums[r] + 8));
        const __m128i p = _mm_madd_epi16(m16, _mm_hadd_epi16(s0, s1));
        const __m256 pf = _mm256_castps128_ps256(_mm_cvtepi32_ps(p));
        acc[r] = _mm256_fnmadd_ps(_mm256_mul_ps(w, xs->d[r]),
                                  _mm256_insertf128_ps(pf, _mm_setzero_ps(), 1), acc[r]);
    }
}

/* sum_k s16_k * (sum of the 16 codes k) into sumi, times -mult (the codes' offset) */
INLINE void minus_offset16(__m256i *sumi, __m256i s16, int shift, const xsb *xs, const int n) {
    for (int r = 0; r < n; r++) {
        const __m256i p =
            _mm256_madd_epi16(s16, _mm256_loadu_si256((const __m256i *)xs->sums[r]));
        sumi[r] = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32(p, shift));
    }
}

INLINE void sb_q4_K(const block_q4_K *b, const xsb *xs, const int n, __m256 *acc) {
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    const __m256i sm = _mm256_cvtepu8_epi16(realm_k4_scales_mins(b->scales));
    const __m256i sc = _mm256_permute2x128_si256(sm, sm, 0x00);
    __m256i sumi[4];
    for (int r = 0; r < n; r++) sumi[r] = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b->qs + 32 * j));
        const __m256i lo = _mm256_and_si256(v, lo4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
        const __m256i s0 = sel(sc, KSEL[2 * j]), s1 = sel(sc, KSEL[2 * j + 1]);
        for (int r = 0; r < n; r++)
            sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(sdot(lo, xs->q[r] + 64 * j, s0),
                                                                 sdot(hi, xs->q[r] + 64 * j + 32, s1)));
    }
    finish(acc, sumi, h2f(b->d), xs, n);
    minus_mins32(acc, _mm256_extracti128_si256(sm, 1), h2f(b->dmin), xs, n);
}

INLINE void sb_q5_K(const block_q5_K *b, const xsb *xs, const int n, __m256 *acc) {
    const __m256i lo4 = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);
    const __m256i sm = _mm256_cvtepu8_epi16(realm_k4_scales_mins(b->scales));
    const __m256i sc = _mm256_permute2x128_si256(sm, sm, 0x00);
    __m256i hb = _mm256_loadu_si256((const __m256i *)b->qh);  /* bit k: sub-block k's 5th bit */
    __m256i sumi[4];
    for (int r = 0; r < n; r++) sumi[r] = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b->qs + 32 * j));
        /* bit 2j to bit 4 of each byte, then bit 2j + 1 (the 16-bit shifts only move bits
         * that the masks drop across byte boundaries) */
        const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, lo4),
                                           _mm256_and_si256(_mm256_slli_epi16(hb, 4), bit4));
        const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), lo4),
                                           _mm256_and_si256(_mm256_slli_epi16(hb, 3), bit4));
        hb = _mm256_srli_epi16(hb, 2);
        const __m256i s0 = sel(sc, KSEL[2 * j]), s1 = sel(sc, KSEL[2 * j + 1]);
        for (int r = 0; r < n; r++)
            sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(sdot(lo, xs->q[r] + 64 * j, s0),
                                                                 sdot(hi, xs->q[r] + 64 * j + 32, s1)));
    }
    finish(acc, sumi, h2f(b->d), xs, n);
    minus_mins32(acc, _mm256_extracti128_si256(sm, 1), h2f(b->dmin), xs, n);
}

INLINE void sb_q6_K(const block_q6_K *b, const xsb *xs, const int n, __m256 *acc) {
    const __m256i lo4 = _mm256_set1_epi8(0x0f), hi2 = _mm256_set1_epi8(0x30);
    const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b->scales));
    __m256i sumi[4];
    for (int r = 0; r < n; r++) sumi[r] = _mm256_setzero_si256();
    for (int h = 0; h < 2; h++) {  /* 128 elements: 64 bytes of ql, 32 of qh */
        const __m256i sc = h ? _mm256_permute2x128_si256(s16, s16, 0x11)
                             : _mm256_permute2x128_si256(s16, s16, 0x00);
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h));
        const __m256i l1 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(b->qh + 32 * h));
        /* q + 32 = low nibble | 2 high bits << 4, the bits of qh at 0, 2, 4, 6 */
        const __m256i q[4] = {
            _mm256_or_si256(_mm256_and_si256(l0, lo4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), hi2)),
            _mm256_or_si256(_mm256_and_si256(l1, lo4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), hi2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), lo4), _mm256_and_si256(qh, hi2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), lo4),
                            _mm256_and_si256(_mm256_srli_epi16(qh, 2), hi2)),
        };
        for (int g = 0; g < 4; g++) {
            const __m256i s = sel(sc, HSEL[g]);
            for (int r = 0; r < n; r++)
                sumi[r] = _mm256_add_epi32(sumi[r], sdot(q[g], xs->q[r] + 128 * h + 32 * g, s));
        }
    }
    minus_offset16(sumi, s16, 5, xs, n);  /* q = q' - 32 */
    finish(acc, sumi, h2f(b->d), xs, n);
}

INLINE void sb_q3_K(const block_q3_K *b, const xsb *xs, const int n, __m256 *acc) {
    const __m256i lo2 = _mm256_set1_epi8(3), bit2 = _mm256_set1_epi8(4);
    const __m256i s16 = _mm256_cvtepi8_epi16(q3_scales(b->scales));
    const __m256i hm = _mm256_loadu_si256((const __m256i *)b->hmask);  /* bit k: sub-block k */
    __m256i sumi[4];
    for (int r = 0; r < n; r++) sumi[r] = _mm256_setzero_si256();
    for (int h = 0; h < 2; h++) {
        const __m256i sc = h ? _mm256_permute2x128_si256(s16, s16, 0x11)
                             : _mm256_permute2x128_si256(s16, s16, 0x00);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b->qs + 32 * h));
        for (int j = 0; j < 4; j++) {
            const int k = 4 * h + j;
            /* q + 4 = 2 low bits + 4 * high bit */
            const __m256i low = _mm256_and_si256(_mm256_srli_epi16(v, 2 * j), lo2);
            const __m256i high = k < 2 ? _mm256_and_si256(_mm256_slli_epi16(hm, 2 - k), bit2)
                                       : _mm256_and_si256(_mm256_srli_epi16(hm, k - 2), bit2);
            const __m256i q = _mm256_or_si256(low, high);
            const __m256i s = sel(sc, HSEL[j]);
            for (int r = 0; r < n; r++)
                sumi[r] = _mm256_add_epi32(sumi[r], sdot(q, xs->q[r] + 128 * h + 32 * j, s));
        }
    }
    minus_offset16(sumi, s16, 2, xs, n);  /* q = q' - 4 */
    finish(acc, sumi, h2f(b->d), xs, n);
}

INLINE void sb_q2_K(const block_q2_K *b, const xsb *xs, const int n, __m256 *acc) {
    const __m256i lo2 = _mm256_set1_epi8(3);
    const __m128i raw = _mm_loadu_si128((const __m128i *)b->scales);
    const __m256i s16 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, _mm_set1_epi8(0x0f)));
    const __m256i m16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0f)));
    __m256i sumi[4], mins[4];
    for (int r = 0; r < n; r++) {
        sumi[r] = _mm256_setzero_si256();
        mins[r] = _mm256_madd_epi16(m16, _mm256_loadu_si256((const __m256i *)xs->sums[r]));
    }
    for (int h = 0; h < 2; h++) {
        const __m256i sc = h ? _mm256_permute2x128_si256(s16, s16, 0x11)
                             : _mm256_permute2x128_si256(s16, s16, 0x00);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b->qs + 32 * h));
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_and_si256(_mm256_srli_epi16(v, 2 * j), lo2);
            const __m256i s = sel(sc, HSEL[j]);
            for (int r = 0; r < n; r++)
                sumi[r] = _mm256_add_epi32(sumi[r], sdot(q, xs->q[r] + 128 * h + 32 * j, s));
        }
    }
    finish(acc, sumi, h2f(b->d), xs, n);
    const __m256 w = _mm256_set1_ps(h2f(b->dmin));
    for (int r = 0; r < n; r++)
        acc[r] = _mm256_fnmadd_ps(_mm256_mul_ps(w, xs->d[r]), _mm256_cvtepi32_ps(mins[r]), acc[r]);
}

/* One weight row of a super-block type against batch rows [b0, b0 + nbat), 4 at a time. The
 * next rows' weights are prefetched PREFETCH bytes ahead: a thread's rows are contiguous. */
#define DEFINE_KDOT(T)                                                                            \
    INLINE void krows_##T(float *y, int64_t ys, const uint8_t *row, const realm_q8x *x,           \
                          int64_t g0, const int n) {                                              \
        const int64_t nk = x->nk;                                                                 \
        __m256 acc[4];                                                                            \
        for (int r = 0; r < n; r++) acc[r] = _mm256_setzero_ps();                                 \
        for (int64_t g = 0; g < nk; g++) {                                                        \
            const block_##T *blk = (const block_##T *)row + g;                                    \
            for (int off = 0; off < (int)sizeof(block_##T); off += 64)                            \
                _mm_prefetch((const char *)blk + PREFETCH + off, _MM_HINT_T0);                    \
            xsb xs;                                                                               \
            for (int r = 0; r < n; r++) {                                                         \
                const int64_t k = (g0 + r) * nk + g;                                              \
                xs.q[r] = x->kq + k * QK_K;                                                       \
                xs.sums[r] = x->ksum + k * 16;                                                    \
                xs.d[r] = _mm256_set1_ps(x->kd[k]);                                               \
            }                                                                                     \
            sb_##T(blk, &xs, n, acc);                                                             \
        }                                                                                         \
        for (int r = 0; r < n; r++) y[(g0 + r) * ys] = realm_hsum8(acc[r]);                       \
    }                                                                                             \
    F static void dot_##T(float *y, int64_t ys, const uint8_t *row, const realm_q8x *x,           \
                          int64_t b0, int64_t nbat) {                                             \
        for (int64_t g0 = b0; g0 < b0 + nbat; g0 += 4) {                                          \
            switch (b0 + nbat - g0 < 4 ? (int)(b0 + nbat - g0) : 4) {                             \
            case 1: krows_##T(y, ys, row, x, g0, 1); break;                                       \
            case 2: krows_##T(y, ys, row, x, g0, 2); break;                                       \
            case 3: krows_##T(y, ys, row, x, g0, 3); break;                                       \
            default: krows_##T(y, ys, row, x, g0, 4); break;                                      \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_KDOT(q2_K)
DEFINE_KDOT(q3_K)
DEFINE_KDOT(q4_K)
DEFINE_KDOT(q5_K)
DEFINE_KDOT(q6_K)
#undef DEFINE_KDOT

/* internal.h's quantize_q8k, as realm_quantize_q8k_scalar (the same codes and scales) */
F void realm_quantize_q8k_avx2(const realm_q8x *x, const float *src, int64_t b) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const int64_t nk = x->nk;
    for (int64_t i = 0; i < nk; i++) {
        const float *v = src + i * QK_K;
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < QK_K; j += 8)
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + j)));
        const float d = realm_hmax8(m) / 127.0f;
        const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        int8_t *q = x->kq + (b * nk + i) * QK_K;
        int16_t *sums = x->ksum + (b * nk + i) * 16;
        for (int j = 0; j < QK_K; j += 32) {
            const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + j), id));
            const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + j + 8), id));
            const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + j + 16), id));
            const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + j + 24), id));
            /* packs works within 128-bit lanes; the permute restores element order */
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(q + j), p);
            const __m256i t = _mm256_add_epi32(i0, i1), u = _mm256_add_epi32(i2, i3);
            __m128i h = _mm_hadd_epi32(
                _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1)),
                _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
            h = _mm_hadd_epi32(h, h);  /* sum of codes j..j+15, j+16..j+31, repeated */
            sums[j / 16] = (int16_t)_mm_cvtsi128_si32(h);
            sums[j / 16 + 1] = (int16_t)_mm_extract_epi32(h, 1);
        }
        x->kd[b * nk + i] = d;
    }
}

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
