/* Realm CUDA kernels: causal grouped-query attention over device-resident KV caches.
 *
 * One block of ATT_WARPS warps per (query row, head). The warps split the visible cache
 * positions between them; each keeps an online softmax (running maximum, normaliser and
 * weighted sum of values, rescaled when the maximum grows), the lanes holding the head's
 * dimensions d = lane + 32 t. The warps' partial results are merged at the end. The masking
 * is native/ops.c's, position for position: causal (j <= q_pos), j < n_kv, and with a window
 * the positions from q_pos + 1 - window on; scores are q.k * scale, soft-capped when asked.
 *
 * Many sequences run in one launch (the forward step): query row t reads sequence row_seq[t]'s
 * cache through a table of views, so a batch of tenants' decode steps costs one launch per
 * layer, not one per tenant.
 */
#include <math.h>

#include "common.cuh"

#define ATT_WARPS 4
#define ATT_MAX_DIMS 8  /* head_dim <= 256 = 32 lanes x 8 */

__device__ __forceinline__ float kv_elem(int kv_type, const void *base, int64_t idx) {
    return kv_type == REALM_TYPE_F16 ? f16_to_f32(((const uint16_t *)base)[idx])
                                     : ((const float *)base)[idx];
}

__global__ void attention_kernel(float *__restrict__ out, const float *__restrict__ q,
                                 const realm_cu_kv_view *__restrict__ views,
                                 const int32_t *__restrict__ row_seq,
                                 const int32_t *__restrict__ q_pos, int kv_type, int32_t n_heads,
                                 int32_t n_kv_heads, int32_t D, float scale, int32_t window,
                                 float softcap) {
    const int64_t i = blockIdx.x;
    const int32_t h = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const realm_cu_kv_view vw = views[row_seq ? row_seq[i] : 0];
    const int32_t g = h / (n_heads / n_kv_heads);
    const int64_t qp = q_pos[i];
    int64_t n = qp + 1;
    if (n > vw.n_kv) n = vw.n_kv;
    const int64_t j0 = window > 0 && n > window ? qp + 1 - window : 0;
    const int64_t row_elems = (int64_t)n_kv_heads * D;
    const float *qv = q + (i * n_heads + h) * D;
    float *o = out + (i * n_heads + h) * D;

    float qr[ATT_MAX_DIMS], acc[ATT_MAX_DIMS];
#pragma unroll
    for (int t = 0; t < ATT_MAX_DIMS; t++) {
        const int d = lane + 32 * t;
        qr[t] = d < D ? qv[d] : 0.0f;
        acc[t] = 0.0f;
    }
    float mx = -INFINITY, l = 0.0f;
    for (int64_t j = j0 + warp; j < n; j += ATT_WARPS) {
        const int64_t base = j * row_elems + (int64_t)g * D;
        float part = 0.0f;
#pragma unroll
        for (int t = 0; t < ATT_MAX_DIMS; t++) {
            const int d = lane + 32 * t;
            if (d < D) part += qr[t] * kv_elem(kv_type, vw.k, base + d);
        }
        float s = warp_sum(part) * scale;
        if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
        const float mnew = fmaxf(mx, s);
        const float corr = expf(mx - mnew);  /* 0 on the first position (mx = -inf) */
        const float p = expf(s - mnew);
        l = l * corr + p;
#pragma unroll
        for (int t = 0; t < ATT_MAX_DIMS; t++) {
            const int d = lane + 32 * t;
            if (d < D) acc[t] = acc[t] * corr + p * kv_elem(kv_type, vw.v, base + d);
        }
        mx = mnew;
    }

    __shared__ float sm_m[ATT_WARPS], sm_l[ATT_WARPS];
    __shared__ float sm_acc[ATT_WARPS][32 * ATT_MAX_DIMS];
    if (lane == 0) {
        sm_m[warp] = mx;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int t = 0; t < ATT_MAX_DIMS; t++) sm_acc[warp][lane + 32 * t] = acc[t];
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm_m[w]);
    float L = 0.0f, f[ATT_WARPS];
    for (int w = 0; w < ATT_WARPS; w++) {
        f[w] = sm_m[w] == -INFINITY ? 0.0f : expf(sm_m[w] - M);
        L += sm_l[w] * f[w];
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) v += sm_acc[w][d] * f[w];
        o[d] = L > 0.0f ? v / L : 0.0f;  /* no visible position: zeros, as the CPU */
    }
}

static int check_common(int kv_type, int64_t n_q, int32_t n_heads, int32_t n_kv_heads,
                        int32_t head_dim, float scale, int32_t window, float softcap) {
    if (n_q <= 0 || n_q > 2147483647LL || n_heads <= 0 || n_heads > 65535 || window < 0 ||
        !(softcap >= 0.0f) || !isfinite(softcap) || n_kv_heads <= 0 ||
        n_heads % n_kv_heads != 0 || head_dim <= 0 || head_dim > 32 * ATT_MAX_DIMS ||
        !(scale > 0.0f) || (kv_type != REALM_TYPE_F32 && kv_type != REALM_TYPE_F16))
        return REALM_EINVAL;
    return REALM_OK;
}

int realm_cu_attention_async(float *out, const float *q, const realm_cu_kv_view *views,
                             const int32_t *row_seq, const int32_t *q_pos, int kv_type,
                             int64_t n_q, int32_t n_heads, int32_t n_kv_heads, int32_t head_dim,
                             float scale, int32_t window, float softcap) {
    if (!out || !q || !views || !q_pos) return REALM_EINVAL;
    REALM_TRY(check_common(kv_type, n_q, n_heads, n_kv_heads, head_dim, scale, window, softcap));
    attention_kernel<<<dim3((unsigned)n_q, (unsigned)n_heads), 32 * ATT_WARPS, 0,
                       REALM_STREAM>>>(out, q, views, row_seq, q_pos, kv_type, n_heads,
                                       n_kv_heads, head_dim, scale, window, softcap);
    return realm_cuda_check_launch("attention");
}

extern "C" int realm_cuda_attention(float *out, const float *q, const void *k, const void *v,
                                    int kv_type, const int32_t *q_pos, int64_t n_q, int64_t n_kv,
                                    int32_t n_heads, int32_t n_kv_heads, int32_t head_dim,
                                    float scale, int32_t window, float softcap) {
    if (!out || !q || !k || !v || !q_pos || n_kv <= 0) return REALM_EINVAL;
    REALM_TRY(check_common(kv_type, n_q, n_heads, n_kv_heads, head_dim, scale, window, softcap));
    realm_cu_kv_view view = {k, v, n_kv};
    realm_cu_kv_view *d_view = nullptr;
    CUDA_TRY(cudaMallocAsync((void **)&d_view, sizeof view, REALM_STREAM), "cudaMallocAsync");
    int rc = REALM_OK;
    cudaError_t err = cudaMemcpyAsync(d_view, &view, sizeof view, cudaMemcpyHostToDevice,
                                      REALM_STREAM);
    if (err != cudaSuccess) rc = realm_cuda_fail(err, "attention view upload");
    if (rc == REALM_OK)
        rc = realm_cu_attention_async(out, q, d_view, nullptr, q_pos, kv_type, n_q, n_heads,
                                      n_kv_heads, head_dim, scale, window, softcap);
    /* the view must outlive the kernel and the copy (pageable host memory): wait, then free */
    const int rs = realm_cuda_sync("attention");
    if (rc == REALM_OK) rc = rs;
    cudaFreeAsync(d_view, REALM_STREAM);
    const int rf = realm_cuda_sync("attention");
    return rc == REALM_OK ? rf : rc;
}
