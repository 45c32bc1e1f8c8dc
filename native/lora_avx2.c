/* Realm native kernels: the AVX2 (+FMA, F16C) part of LoRA's step-time delta (lora.c).
 *
 * Compiled for the baseline target; REALM_AVX2 (a function target attribute) enables the ISA
 * on the one function here, which lora.c calls only when the CPU has it.
 */
#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/* y[o] += sum_k u[k] * bt[k, o] for o in [0, n); bt: (rank, ld) F16 or F32 (realm_lora_up_ref) */
REALM_AVX2 void realm_lora_up_avx2(float *y, const void *bt, int type, int64_t ld, const float *u,
                                   int32_t rank, int64_t n) {
    int64_t o = 0;
    if (type == REALM_TYPE_F16) {
        const uint16_t *b = bt;
        for (; o + 8 <= n; o += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int32_t k = 0; k < rank; k++) {
                const __m256 w =
                    _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + k * ld + o)));
                acc = _mm256_fmadd_ps(w, _mm256_set1_ps(u[k]), acc);
            }
            _mm256_storeu_ps(y + o, _mm256_add_ps(_mm256_loadu_ps(y + o), acc));
        }
    } else {
        const float *b = bt;
        for (; o + 8 <= n; o += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int32_t k = 0; k < rank; k++)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(b + k * ld + o), _mm256_set1_ps(u[k]), acc);
            _mm256_storeu_ps(y + o, _mm256_add_ps(_mm256_loadu_ps(y + o), acc));
        }
    }
    if (o < n) {
        const uint8_t *base = (const uint8_t *)bt + o * (type == REALM_TYPE_F16 ? 2 : 4);
        realm_lora_up_ref(y + o, base, type, ld, u, rank, n - o);
    }
}
/* sum_i a[i] x[i], a: n of F16 or F32 (realm_lora_dot_ref) */
REALM_AVX2 float realm_lora_dot_avx2(const void *a, int type, const float *x, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    if (type == REALM_TYPE_F16) {
        const uint16_t *h = a;
        for (; i + 16 <= n; i += 16) {
            acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))),
                                   _mm256_loadu_ps(x + i), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i + 8))),
                                   _mm256_loadu_ps(x + i + 8), acc1);
        }
    } else {
        const float *f = a;
        for (; i + 16 <= n; i += 16) {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(f + i), _mm256_loadu_ps(x + i), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(f + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        }
    }
    acc0 = _mm256_add_ps(acc0, acc1);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    float sum = _mm_cvtss_f32(s4);
    if (i < n)
        sum += realm_lora_dot_ref((const uint8_t *)a + i * (type == REALM_TYPE_F16 ? 2 : 4), type,
                                  x + i, n - i);
    return sum;
}
#endif
