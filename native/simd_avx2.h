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
