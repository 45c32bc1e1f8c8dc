/* Realm native kernels: small AVX2 helpers shared by the AVX2 files (x86 only).
 *
 * Horizontal reductions of one ymm and the F16 load. Every function carries REALM_AVX2 (a
 * function target attribute, internal.h), so they inline into the AVX2 and AVX-512 functions
 * of any file built for the baseline target, with gcc and clang alike.
 */
#ifndef REALM_SIMD_AVX2_H
#define REALM_SIMD_AVX2_H

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/* sum of the 8 floats of v */
REALM_AVX2 static inline float realm_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* maximum of the 8 floats of v */
REALM_AVX2 static inline float realm_hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum of the 8 int32 of v (wrapping) */
REALM_AVX2 static inline int32_t realm_hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* 32 floats to 8-bit codes with the numerics of every level (scale amax / 127, round to
 * nearest even as lrintf in the scalar level; codes 0 where the scale is 0), in element order,
 * and the sums of each half's codes. Returns the scale. */
REALM_AVX2 static inline float realm_q8_block32(const float *v, int8_t q[32], int32_t sums[2]) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
    const __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
    const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    const float d = realm_hmax8(m) / 127.0f;
    const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id));
    const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id));
    const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
    /* int32 -> int8 in element order: packs interleave 128-bit lanes; a permute undoes it */
    const __m256i p01 = _mm256_packs_epi32(i0, i1), p23 = _mm256_packs_epi32(i2, i3);
    _mm256_storeu_si256((__m256i *)q,
                        _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23),
                                                    _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    sums[0] = realm_hsum8i(_mm256_add_epi32(i0, i1));
    sums[1] = realm_hsum8i(_mm256_add_epi32(i2, i3));
    return d;
}

/* the first nr of 8 floats (a short panel's rows): zero-filled load, partial store */
REALM_AVX2 static inline __m256 realm_load_rows8(const float *p, int nr) {
    if (nr == 8) return _mm256_loadu_ps(p);
    float t[8] = {0};
    memcpy(t, p, sizeof(float) * (size_t)nr);
    return _mm256_loadu_ps(t);
}

REALM_AVX2 static inline void realm_store_rows8(float *p, int nr, __m256 v) {
    if (nr == 8) {
        _mm256_storeu_ps(p, v);
        return;
    }
    float t[8];
    _mm256_storeu_ps(t, v);
    memcpy(p, t, sizeof(float) * (size_t)nr);
}

/* 8 IEEE halves -> 8 floats */
REALM_AVX2 static inline __m256 realm_load_f16x8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* 16 bytes of nibbles -> 32 bytes: the low nibbles (elements 0..15), then the high ones (the
 * element order of Q4_0 / Q4_1 / IQ4_NL blocks) */
REALM_AVX2 static inline __m256i realm_nibbles32(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    const __m128i m = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

/* Q4_K / Q5_K's 8 6-bit scales (bytes 0-7) and minimums (bytes 8-15) from their 12 bytes s
 * (ggml's get_scale_min_k4, all at once); reads 16 bytes from s (the block's codes follow).
 * In 32-bit words a, b, c of s: bytes of a hold scales 0-3 (low 6 bits) and the top bits of
 * scales 4-7, b likewise minimums 0-3 and 4-7, c the low nibbles of scales 4-7 (low) and of
 * minimums 4-7 (high): the words are a & m6, (c & m4) | top(a), b & m6, (c >> 4 & m4) | top(b)
 * with top(v) = (v >> 6 & 3) << 4 per byte = v >> 2 & 0x30. */
REALM_AVX2 static inline __m128i realm_k4_scales_mins(const uint8_t *s) {
    const __m128i v = _mm_loadu_si128((const __m128i *)s);
    const __m128i lo = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(v, 0x98),   /* a c b c */
                                                    _mm_setr_epi32(0, 0, 0, 4)),
                                     _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    const __m128i hi = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(v, 0x50), 2), /* a a b b */
                                     _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
    return _mm_or_si128(lo, hi);
}

#endif
#endif
