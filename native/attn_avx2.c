/* Realm native kernels: attention over an F16 KV cache, AVX2 + FMA + F16C.
 *
 * The contract is internal.h's attn_probs_f16 / attn_values_f16 (the AVX-512 level has its
 * own): for the `group` query heads that share one KV head, the softmax probabilities over the
 * cache rows, then the probability-weighted sum of the value rows. Each K row is converted
 * from F16 once for the whole group (into an L1 buffer: AVX2's 16 registers cannot hold a
 * 256-wide row), and the values are summed for up to six heads x 16 columns per pass with the
 * accumulators in registers. head_dim need not be a multiple of 8: the last columns are
 * handled in scalar code.
 */
#include "internal.h"
#include "simd_avx2.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define AVX2_FN REALM_AVX2
#define VAL_HEADS 6  /* heads per pass over the values: 6 x 2 accumulators + 2 rows + 1 weight */

/* e^x for x <= 0 (softmax after subtracting the max): x = n ln2 + r, |r| <= ln2 / 2, a degree-6
 * Taylor polynomial for e^r (relative error < 2e-7), times 2^n built in the exponent bits.
 * x is clamped at -87, where e^x is below float's normal range anyway. */
AVX2_FN static inline __m256 exp_neg8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  /* ln2, high part */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);     /* and the rest */
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* 2^n for n in [-126, 0]: the biased exponent n + 127 in bits 23..30 */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* scores -> softmax probabilities, in place, for each of `group` rows of n */
AVX2_FN static void softmax_rows(float *scores, int64_t ss, int64_t n, int32_t group) {
    for (int32_t h = 0; h < group; h++) {
        float *s = scores + h * ss;
        __m256 vm = _mm256_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + j));
        float m = realm_hmax8(vm);
        for (; j < n; j++) m = s[j] > m ? s[j] : m;
        const __m256 vmax = _mm256_set1_ps(m);
        __m256 vsum = _mm256_setzero_ps();
        for (j = 0; j + 8 <= n; j += 8) {
            const __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmax));
            _mm256_storeu_ps(s + j, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = realm_hsum8(vsum);
        for (; j < n; j++) {
            s[j] = expf(s[j] - m);
            sum += s[j];
        }
        const float inv = 1.0f / sum;
        const __m256 vinv = _mm256_set1_ps(inv);
        for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), vinv));
        for (; j < n; j++) s[j] *= inv;
    }
}

AVX2_FN void realm_attn_probs_f16_avx2(float *scores, int64_t ss, const uint16_t *k, int64_t ks,
                                       int64_t n, const float *q, int32_t group, int32_t d,
                                       float scale) {
    const int32_t d8 = d & ~7;
    float kf[256] __attribute__((aligned(32)));  /* d <= 256 (checked by the caller) */
    for (int64_t j = 0; j < n; j++) {
        const uint16_t *kj = k + j * ks;
        for (int32_t c = 0; c < d8; c += 8) _mm256_store_ps(kf + c, realm_load_f16x8(kj + c));
        for (int32_t c = d8; c < d; c++) kf[c] = realm_f16_to_f32(kj[c]);
        for (int32_t h = 0; h < group; h++) {
            const float *qh = q + (int64_t)h * d;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int32_t c = 0;
            for (; c + 16 <= d8; c += 16) {
                a0 = _mm256_fmadd_ps(_mm256_load_ps(kf + c), _mm256_loadu_ps(qh + c), a0);
                a1 = _mm256_fmadd_ps(_mm256_load_ps(kf + c + 8), _mm256_loadu_ps(qh + c + 8), a1);
            }
            if (c < d8) a0 = _mm256_fmadd_ps(_mm256_load_ps(kf + c), _mm256_loadu_ps(qh + c), a0);
            float s = realm_hsum8(_mm256_add_ps(a0, a1));
            for (c = d8; c < d; c++) s += kf[c] * qh[c];
            scores[h * ss + j] = scale * s;
        }
    }
    softmax_rows(scores, ss, n, group);
}

AVX2_FN void realm_attn_values_f16_avx2(float *o, const uint16_t *v, int64_t vs, int64_t n,
                                        const float *w, int64_t ws, int32_t group, int32_t d) {
    const int32_t d8 = d & ~7;
    for (int32_t h0 = 0; h0 < group; h0 += VAL_HEADS) {
        const int32_t nh = group - h0 < VAL_HEADS ? group - h0 : VAL_HEADS;
        /* passes of 16 columns (8 in the last one if that is all there is) */
        for (int32_t c0 = 0; c0 < d8; c0 += 16) {
            const int two = c0 + 16 <= d8;
            __m256 a0[VAL_HEADS], a1[VAL_HEADS];
            for (int32_t h = 0; h < nh; h++) a0[h] = a1[h] = _mm256_setzero_ps();
            for (int64_t j = 0; j < n; j++) {
                const uint16_t *vj = v + j * vs + c0;
                const __m256 v0 = realm_load_f16x8(vj);
                const __m256 v1 = two ? realm_load_f16x8(vj + 8) : _mm256_setzero_ps();
                for (int32_t h = 0; h < nh; h++) {
                    const __m256 wh = _mm256_broadcast_ss(w + (int64_t)(h0 + h) * ws + j);
                    a0[h] = _mm256_fmadd_ps(wh, v0, a0[h]);
                    a1[h] = _mm256_fmadd_ps(wh, v1, a1[h]);
                }
            }
            for (int32_t h = 0; h < nh; h++) {
                float *oh = o + (int64_t)(h0 + h) * d + c0;
                _mm256_storeu_ps(oh, a0[h]);
                if (two) _mm256_storeu_ps(oh + 8, a1[h]);
            }
        }
        for (int32_t h = 0; h < nh; h++) {  /* columns past the last multiple of 8 */
            float *oh = o + (int64_t)(h0 + h) * d;
            const float *wh = w + (int64_t)(h0 + h) * ws;
            for (int32_t c = d8; c < d; c++) {
                float acc = 0.0f;
                for (int64_t j = 0; j < n; j++) acc += wh[j] * realm_f16_to_f32(v[j * vs + c]);
                oh[c] = acc;
            }
        }
    }
}
#endif
