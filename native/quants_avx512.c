/* Realm native kernels: the dots of Q4_K, Q5_K and Q6_K weights with AVX-512 (F, BW, VL; x86
 * only), for the AVX-512 table; its other types of quants.c take quants_avx2.c's dots (two
 * blocks of 32 per zmm, tried for Q4_1 .. IQ4_NL, measured no faster than AVX2's one block per
 * ymm: their per-block scale work, not the integer dot, bounds them).
 *
 * The scheme is quants_avx2.c's for the super-block types (Q8_K activations, integer sums of a
 * whole super-block, one float multiply per super-block and row) with 64 codes per zmm: the
 * 32 bytes that hold two sub-blocks' nibbles are broadcast to both halves of a zmm and one
 * per-lane shift (vpsrlvw) unpacks the first sub-block into the low half and the second into
 * the high half, which then meet 64 consecutive activation codes; vpermw broadcasts each
 * sub-block's scale over its half (or each 16-element scale over its 128-bit lane for Q6_K).
 * This takes about half the instructions per super-block of AVX2's (measured on a 2-core
 * Sapphire Rapids: Q6_K about 10% faster than the AVX2 dots, Q4_K and Q5_K level).
 * vpmaddubsw + vpmaddwd rather than VNNI's vpdpbusd: the scales multiply the int16 pairs, so
 * the two steps are needed anyway.
 */
#include "internal.h"
#include "simd_avx2.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define F REALM_AVX512
#define INLINE static inline __attribute__((always_inline)) REALM_AVX512

INLINE float h2f(uint16_t h) { return _cvtsh_ss(h); }

/* the activation rows of one super-block */
typedef struct {
    const int8_t *q[4];
    const int16_t *sums[4];
    float d[4];
} xsb;

/* vpermw indices: word a over the low 256 bits, word b over the high 256 */
INLINE __m512i halves(int a, int b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)a)),
                              _mm256_set1_epi16((short)b), 1);
}

/* vpermw indices: word a + k over 128-bit lane k */
INLINE __m512i lanes(int a) {
    return _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_set_m128i(_mm_set1_epi16((short)(a + 1)), _mm_set1_epi16((short)a))),
        _mm256_set_m128i(_mm_set1_epi16((short)(a + 3)), _mm_set1_epi16((short)(a + 2))), 1);
}

/* scale (int16 lanes) x maddubs(q', 64 activation codes) */
INLINE __m512i sdot(__m512i q, const int8_t *x, __m512i scale) {
    return _mm512_madd_epi16(_mm512_maddubs_epi16(q, _mm512_loadu_si512(x)), scale);
}

/* the 16 int32 lanes of v added down to 8 */
INLINE __m256i fold(__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

/* y_r += d_w * d_x(r) * sumi_r - dmin * d_x(r) * sum_k mins_k * (sum of sub-block k's codes) */
INLINE void finish_k4(__m256 *acc, const __m256i *sumi, __m256i sm, const uint16_t *ddmin,
                      const xsb *xs, const int n) {
    const __m128i mins = _mm256_extracti128_si256(sm, 1);
    const float d = h2f(ddmin[0]), dmin = h2f(ddmin[1]);
    for (int r = 0; r < n; r++) {
        const __m128i s0 = _mm_loadu_si128((const __m128i *)xs->sums[r]);
        const __m128i s1 = _mm_loadu_si128((const __m128i *)(xs->sums[r] + 8));
        const __m128i p = _mm_madd_epi16(mins, _mm_hadd_epi16(s0, s1));
        const __m256 m = _mm256_castps128_ps256(_mm_cvtepi32_ps(p));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xs->d[r]), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        acc[r] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * xs->d[r]),
                                  _mm256_insertf128_ps(m, _mm_setzero_ps(), 1), acc[r]);
    }
}

INLINE void sb_q4_K(const block_q4_K *b, const xsb *xs, const int n, __m256 *acc) {
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    const __m512i shift = halves(0, 4);
    const __m256i sm = _mm256_cvtepu8_epi16(realm_k4_scales_mins(b->scales));
    const __m512i sc = _mm512_castsi256_si512(sm);
    __m512i sumi[4];
    for (int r = 0; r < n; r++) sumi[r] = _mm512_setzero_si512();
    for (int j = 0; j < 4; j++) {
        const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->qs + 32 * j)));
        const __m512i q = _mm512_and_si512(_mm512_srlv_epi16(v, shift), lo4);
        const __m512i s = _mm512_permutexvar_epi16(halves(2 * j, 2 * j + 1), sc);
        for (int r = 0; r < n; r++) sumi[r] = _mm512_add_epi32(sumi[r], sdot(q, xs->q[r] + 64 * j, s));
    }
    __m256i folded[4];
    for (int r = 0; r < n; r++) folded[r] = fold(sumi[r]);
    finish_k4(acc, folded, sm, &b->d, xs, n);
}

INLINE void sb_q5_K(const block_q5_K *b, const xsb *xs, const int n, __m256 *acc) {
    const __m512i lo4 = _mm512_set1_epi8(0x0f), bit4 = _mm512_set1_epi8(0x10);
    const __m512i shift = halves(0, 4), hshift = halves(4, 3);
    const __m256i sm = _mm256_cvtepu8_epi16(realm_k4_scales_mins(b->scales));
    const __m512i sc = _mm512_castsi256_si512(sm);
    /* bit k of qh: sub-block k's 5th bits */
    __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)b->qh));
    __m512i sumi[4];
    for (int r = 0; r < n; r++) sumi[r] = _mm512_setzero_si512();
    for (int j = 0; j < 4; j++) {
        const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->qs + 32 * j)));
        /* bit 2j to bit 4 in the low half, bit 2j + 1 in the high (the 16-bit shifts only
         * move bits across bytes that the masks drop) */
        const __m512i q = _mm512_or_si512(_mm512_and_si512(_mm512_srlv_epi16(v, shift), lo4),
                                          _mm512_and_si512(_mm512_sllv_epi16(hb, hshift), bit4));
        hb = _mm512_srli_epi16(hb, 2);
        const __m512i s = _mm512_permutexvar_epi16(halves(2 * j, 2 * j + 1), sc);
        for (int r = 0; r < n; r++) sumi[r] = _mm512_add_epi32(sumi[r], sdot(q, xs->q[r] + 64 * j, s));
    }
    __m256i folded[4];
    for (int r = 0; r < n; r++) folded[r] = fold(sumi[r]);
    finish_k4(acc, folded, sm, &b->d, xs, n);
}

INLINE void sb_q6_K(const block_q6_K *b, const xsb *xs, const int n, __m256 *acc) {
    const __m512i lo4 = _mm512_set1_epi8(0x0f), hi2 = _mm512_set1_epi8(0x30);
    const __m512i sh_a = halves(4, 2), sh_b = halves(0, 2);
    const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b->scales));
    const __m512i sc = _mm512_castsi256_si512(s16);
    __m512i sumi[4];
    for (int r = 0; r < n; r++) sumi[r] = _mm512_setzero_si512();
    for (int h = 0; h < 2; h++) {  /* 128 elements: 64 bytes of ql, 32 of qh */
        const __m512i l = _mm512_loadu_si512(b->ql + 64 * h);
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->qh + 32 * h)));
        /* q + 32 = low nibble | 2 high bits << 4. Elements 0-63 of the 128: the low nibbles
         * of l with qh's bits 0-1 (low half) and 2-3 (high half); 64-127: the high nibbles
         * with bits 4-5 and 6-7 */
        const __m512i qa = _mm512_or_si512(_mm512_and_si512(l, lo4),
                                           _mm512_and_si512(_mm512_sllv_epi16(qh, sh_a), hi2));
        const __m512i qb = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), lo4),
                                           _mm512_and_si512(_mm512_srlv_epi16(qh, sh_b), hi2));
        const __m512i sa = _mm512_permutexvar_epi16(lanes(8 * h), sc);
        const __m512i sb = _mm512_permutexvar_epi16(lanes(8 * h + 4), sc);
        for (int r = 0; r < n; r++)
            sumi[r] = _mm512_add_epi32(sumi[r], _mm512_add_epi32(sdot(qa, xs->q[r] + 128 * h, sa),
                                                                 sdot(qb, xs->q[r] + 128 * h + 64, sb)));
    }
    const float d = h2f(b->d);
    for (int r = 0; r < n; r++) {
        /* q = q' - 32: take 32 * sum_k scale_k * (sum of codes k) back */
        const __m256i off = _mm256_madd_epi16(s16, _mm256_loadu_si256((const __m256i *)xs->sums[r]));
        const __m256i t = _mm256_sub_epi32(fold(sumi[r]), _mm256_slli_epi32(off, 5));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xs->d[r]), _mm256_cvtepi32_ps(t), acc[r]);
    }
}

/* One weight row against batch rows [b0, b0 + nbat), 4 at a time. The next rows' weights
 * are prefetched PREFETCH bytes ahead (a thread's rows are contiguous), as quants_avx2.c does. */
#define PREFETCH 2048
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
                xs.d[r] = x->kd[k];                                                               \
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

DEFINE_KDOT(q4_K)
DEFINE_KDOT(q5_K)
DEFINE_KDOT(q6_K)
#undef DEFINE_KDOT
#undef PREFETCH

F void realm_dot_other_avx512(float *y, int64_t ys, const void *w, int wtype, const realm_q8x *x,
                              int64_t b0, int64_t nbat) {
    const uint8_t *row = w;
    switch (wtype) {
    case REALM_TYPE_Q4_K: dot_q4_K(y, ys, row, x, b0, nbat); break;
    case REALM_TYPE_Q5_K: dot_q5_K(y, ys, row, x, b0, nbat); break;
    case REALM_TYPE_Q6_K: dot_q6_K(y, ys, row, x, b0, nbat); break;
    default: realm_dot_other_avx2(y, ys, w, wtype, x, b0, nbat); break;
    }
}
#endif
