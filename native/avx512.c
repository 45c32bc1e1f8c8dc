/* Realm native kernels: AVX-512 (F, BW, VL, VNNI) primitives (x86 only).
 *
 * Selected at run time when the CPU has all four; the integer dot products use VNNI's
 * vpdpbusd, two 32-element blocks per 512-bit register.
 */
#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#include <immintrin.h>

static inline __mmask16 tail16(int64_t r) { return (__mmask16)((1u << r) - 1u); }

static float dot_f32(int64_t n, const float *w, const float *x) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
    if (i < n) {
        const __mmask16 m = tail16(n - i);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + i), _mm512_maskz_loadu_ps(m, x + i), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

static inline __m512 load_f16x16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
static inline __m512 load_f16x16_tail(const uint16_t *p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
static inline __m512 load_bf16x16(const uint16_t *p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
static inline __m512 load_bf16x16_tail(const uint16_t *p, __mmask16 m) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

static float dot_f16(int64_t n, const uint16_t *w, const float *x) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(load_f16x16(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(load_f16x16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(load_f16x16(w + i), _mm512_loadu_ps(x + i), a0);
    if (i < n) {
        const __mmask16 m = tail16(n - i);
        a1 = _mm512_fmadd_ps(load_f16x16_tail(w + i, m), _mm512_maskz_loadu_ps(m, x + i), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

static float dot_bf16(int64_t n, const uint16_t *w, const float *x) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(load_bf16x16(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(load_bf16x16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(load_bf16x16(w + i), _mm512_loadu_ps(x + i), a0);
    if (i < n) {
        const __mmask16 m = tail16(n - i);
        a1 = _mm512_fmadd_ps(load_bf16x16_tail(w + i, m), _mm512_maskz_loadu_ps(m, x + i), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

/* lanes 0-7 hold s0, lanes 8-15 hold s1 */
static inline __m512 two_scales(float s0, float s1) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(s0))),
                                               _mm256_castps_pd(_mm256_set1_ps(s1)), 1));
}

static inline __m512i two_blocks(const int8_t *a, const int8_t *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}

static float dot_q8_0(int64_t nb, const block_q8_0 *w, const block_q8x *x) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4) {
        /* VNNI multiplies unsigned by signed bytes: |w| times x with w's sign */
        const __m512i qw0 = two_blocks(w[i].qs, w[i + 1].qs);
        const __m512i qx0 = two_blocks(x[i].qs, x[i + 1].qs);
        const __m512i qw1 = two_blocks(w[i + 2].qs, w[i + 3].qs);
        const __m512i qx1 = two_blocks(x[i + 2].qs, x[i + 3].qs);
        const __m512i sx0 = _mm512_mask_sub_epi8(qx0, _mm512_movepi8_mask(qw0), zero, qx0);
        const __m512i sx1 = _mm512_mask_sub_epi8(qx1, _mm512_movepi8_mask(qw1), zero, qx1);
        const __m512i p0 = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(qw0), sx0);
        const __m512i p1 = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(qw1), sx1);
        const __m512 d0 = two_scales(realm_f16_to_f32(w[i].d) * x[i].d, realm_f16_to_f32(w[i + 1].d) * x[i + 1].d);
        const __m512 d1 = two_scales(realm_f16_to_f32(w[i + 2].d) * x[i + 2].d, realm_f16_to_f32(w[i + 3].d) * x[i + 3].d);
        acc0 = _mm512_fmadd_ps(d0, _mm512_cvtepi32_ps(p0), acc0);
        acc1 = _mm512_fmadd_ps(d1, _mm512_cvtepi32_ps(p1), acc1);
    }
    for (; i < nb; i++) {
        const __m256i qw = _mm256_loadu_si256((const __m256i *)w[i].qs);
        const __m256i qx = _mm256_loadu_si256((const __m256i *)x[i].qs);
        const __m256i sx = _mm256_mask_sub_epi8(qx, _mm256_movepi8_mask(qw), _mm256_setzero_si256(), qx);
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(qw), sx);
        const __m512 d = two_scales(realm_f16_to_f32(w[i].d) * x[i].d, 0.0f);
        acc0 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_zextsi256_si512(p)), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

static inline __m512i nibbles_two_blocks(const uint8_t *a, const uint8_t *b) {
    /* lanes: [low nibbles of a, high nibbles of a, low of b, high of b] = elements in order */
    const __m128i qa = _mm_loadu_si128((const __m128i *)a);
    const __m128i qb = _mm_loadu_si128((const __m128i *)b);
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(qa, qa)),
                                         _mm256_set_m128i(qb, qb), 1);
    const __m512i shifts = _mm512_setr_epi64(0, 0, 0x0004000400040004LL, 0x0004000400040004LL,
                                             0, 0, 0x0004000400040004LL, 0x0004000400040004LL);
    return _mm512_and_si512(_mm512_srlv_epi16(v, shifts), _mm512_set1_epi8(0x0f));
}

static float dot_q4_0(int64_t nb, const block_q4_0 *w, const block_q8x *x) {
    __m512 acc = _mm512_setzero_ps();
    float offset = 0.0f;  /* sum over blocks of d * 8 * sum(x) */
    const __m512i zero = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const __m512i qw = nibbles_two_blocks(w[i].qs, w[i + 1].qs);
        const __m512i qx = two_blocks(x[i].qs, x[i + 1].qs);
        const __m512i p = _mm512_dpbusd_epi32(zero, qw, qx);
        const float d0 = realm_f16_to_f32(w[i].d) * x[i].d;
        const float d1 = realm_f16_to_f32(w[i + 1].d) * x[i + 1].d;
        acc = _mm512_fmadd_ps(two_scales(d0, d1), _mm512_cvtepi32_ps(p), acc);
        offset += d0 * (float)(8 * x[i].sum) + d1 * (float)(8 * x[i + 1].sum);
    }
    float s = _mm512_reduce_add_ps(acc) - offset;
    for (; i < nb; i++) {  /* odd tail block */
        int32_t a = 0;
        for (int j = 0; j < QK / 2; j++) {
            a += (int32_t)(w[i].qs[j] & 0x0f) * x[i].qs[j];
            a += (int32_t)(w[i].qs[j] >> 4) * x[i].qs[j + QK / 2];
        }
        s += realm_f16_to_f32(w[i].d) * x[i].d * (float)(a - 8 * x[i].sum);
    }
    return s;
}

static void quantize_q8x(block_q8x *out, const float *x, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float *v = x + i * QK;
        const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float d = amax / 127.0f;
        const __m512 id = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
        const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
        _mm_storeu_si128((__m128i *)out[i].qs, _mm512_cvtsepi32_epi8(i0));
        _mm_storeu_si128((__m128i *)(out[i].qs + 16), _mm512_cvtsepi32_epi8(i1));
        out[i].d = d;
        out[i].sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    }
}

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

const realm_isa_ops realm_ops_avx512 = {
    .name = "avx512",
    .dot_f32 = dot_f32,
    .dot_f16 = dot_f16,
    .dot_bf16 = dot_bf16,
    .dot_q8_0 = dot_q8_0,
    .dot_q4_0 = dot_q4_0,
    .quantize_q8x = quantize_q8x,
    .axpy_f32 = axpy_f32,
    .axpy_f16 = axpy_f16,
    .gemm_f32 = NULL,
};
#endif
