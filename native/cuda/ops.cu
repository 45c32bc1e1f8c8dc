/* Realm CUDA kernels: normalisation, RoPE, softmax, gated activations, soft-capping, residual
 * add and embedding rows. Each has an *_async form (queued on the calling thread's stream,
 * used by the forward step) and the exported form, which checks its arguments, queues the
 * work and waits for it. Arithmetic follows native/ops.c: sums of squares and softmax
 * normalisers in double, RoPE angles in double, the same GELU form.
 */
#include <math.h>

#include "common.cuh"

// --- RMSNorm: one block per row ---------------------------------------------------------

__global__ void rmsnorm_kernel(float *out, const float *x, const float *weight, int64_t n,
                               float eps) {
    const float *xr = x + blockIdx.x * n;
    float *o = out + blockIdx.x * n;
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += (double)xr[i] * (double)xr[i];
    __shared__ double part[32];
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        double v = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.0;
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (threadIdx.x == 0) part[0] = v;
    }
    __syncthreads();
    const float scale = (float)(1.0 / sqrt(part[0] / (double)n + (double)eps));
    /* out may alias x: every thread has read its elements above, and each writes only its own */
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        o[i] = weight ? xr[i] * scale * weight[i] : xr[i] * scale;
}

int realm_cu_rmsnorm_async(float *out, const float *x, const float *weight, int64_t n_rows,
                           int64_t n, float eps) {
    if (!out || !x || n_rows <= 0 || n <= 0 || !(eps >= 0.0f) || n_rows > 2147483647LL)
        return REALM_EINVAL;
    const int threads = n >= 1024 ? 256 : (n >= 256 ? 128 : 32);
    rmsnorm_kernel<<<(unsigned)n_rows, threads, 0, REALM_STREAM>>>(out, x, weight, n, eps);
    return realm_cuda_check_launch("rmsnorm");
}

extern "C" int realm_cuda_rmsnorm(float *out, const float *x, const float *weight,
                                  int64_t n_rows, int64_t n, float eps) {
    REALM_TRY(realm_cu_rmsnorm_async(out, x, weight, n_rows, n, eps));
    return realm_cuda_sync("rmsnorm");
}

// --- RoPE: one thread per (token, head, pair) -------------------------------------------

__global__ void rope_kernel(float *x, const int32_t *pos, int64_t n_tokens, int32_t n_heads,
                            int32_t head_dim, int32_t n_rot, int32_t mode, float freq_base,
                            float freq_scale, const float *factors) {
    const int32_t half = n_rot / 2;
    const int64_t total = n_tokens * n_heads * half;
    for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < total;
         u += (int64_t)gridDim.x * blockDim.x) {
        const int32_t i = (int32_t)(u % half);
        const int64_t th = u / half;  /* token * n_heads + head */
        const int64_t t = th / n_heads;
        const double p = (double)pos[t] * (double)freq_scale;
        double theta = p * pow((double)freq_base, -2.0 * i / (double)n_rot);
        if (factors) theta /= (double)factors[i];
        const float c = (float)cos(theta), s = (float)sin(theta);
        float *v = x + th * head_dim;
        const int32_t a = mode == REALM_ROPE_NORMAL ? 2 * i : i;
        const int32_t b = mode == REALM_ROPE_NORMAL ? 2 * i + 1 : i + half;
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * c - x1 * s;
        v[b] = x0 * s + x1 * c;
    }
}

int realm_cu_rope_async(float *x, const int32_t *pos, int64_t n_tokens, int32_t n_heads,
                        int32_t head_dim, int32_t n_rot, int32_t mode, float freq_base,
                        float freq_scale, const float *factors) {
    if (!x || !pos || n_tokens <= 0 || n_heads <= 0 || head_dim <= 0 || n_rot <= 0 ||
        n_rot > head_dim || n_rot % 2 != 0 || !(freq_base > 0.0f) || !(freq_scale > 0.0f) ||
        (mode != REALM_ROPE_NORMAL && mode != REALM_ROPE_NEOX))
        return REALM_EINVAL;
    const int64_t total = n_tokens * n_heads * (n_rot / 2);
    rope_kernel<<<realm_cu_blocks(total, 256), 256, 0, REALM_STREAM>>>(
        x, pos, n_tokens, n_heads, head_dim, n_rot, mode, freq_base, freq_scale, factors);
    return realm_cuda_check_launch("rope");
}

extern "C" int realm_cuda_rope(float *x, const int32_t *pos, int64_t n_tokens, int32_t n_heads,
                               int32_t head_dim, int32_t n_rot, int32_t mode, float freq_base,
                               float freq_scale, const float *factors) {
    REALM_TRY(realm_cu_rope_async(x, pos, n_tokens, n_heads, head_dim, n_rot, mode, freq_base,
                                  freq_scale, factors));
    return realm_cuda_sync("rope");
}

// --- softmax: one block per row ---------------------------------------------------------

__global__ void softmax_kernel(float *x, int64_t n) {
    float *r = x + blockIdx.x * n;
    __shared__ float fpart[32];
    __shared__ double dpart[32];
    float m = -INFINITY;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, r[i]);
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) fpart[threadIdx.x / 32] = m;
    __syncthreads();
    m = fpart[0];
    for (unsigned w = 1; w < blockDim.x / 32; w++) m = fmaxf(m, fpart[w]);
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float e = expf(r[i] - m);
        r[i] = e;
        sum += e;
    }
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if ((threadIdx.x & 31) == 0) dpart[threadIdx.x / 32] = sum;
    __syncthreads();
    double total = 0.0;
    for (unsigned w = 0; w < blockDim.x / 32; w++) total += dpart[w];
    const float inv = (float)(1.0 / total);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) r[i] *= inv;
}

extern "C" int realm_cuda_softmax(float *x, int64_t n_rows, int64_t n) {
    if (!x || n_rows <= 0 || n <= 0 || n_rows > 2147483647LL) return REALM_EINVAL;
    softmax_kernel<<<(unsigned)n_rows, 256, 0, REALM_STREAM>>>(x, n);
    REALM_TRY(realm_cuda_check_launch("softmax"));
    return realm_cuda_sync("softmax");
}

// --- element-wise -----------------------------------------------------------------------

__global__ void glu_kernel(float *out, const float *gate, const float *up, int64_t n, int act) {
    const float c2 = 2.0f * 0.7978845608028654f;  /* 2 sqrt(2 / pi), as ops.c */
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        const float z = act == REALM_ACT_GELU ? c2 * (g + 0.044715f * g * g * g) : g;
        out[i] = g / (1.0f + expf(-z)) * up[i];
    }
}

int realm_cu_glu_async(float *out, const float *gate, const float *up, int64_t n, int act) {
    if (!out || !gate || !up || n <= 0 || (act != REALM_ACT_SILU && act != REALM_ACT_GELU))
        return REALM_EINVAL;
    glu_kernel<<<realm_cu_blocks(n, 256), 256, 0, REALM_STREAM>>>(out, gate, up, n, act);
    return realm_cuda_check_launch(act == REALM_ACT_GELU ? "geglu" : "swiglu");
}

extern "C" int realm_cuda_swiglu(float *out, const float *gate, const float *up, int64_t n) {
    REALM_TRY(realm_cu_glu_async(out, gate, up, n, REALM_ACT_SILU));
    return realm_cuda_sync("swiglu");
}

extern "C" int realm_cuda_geglu(float *out, const float *gate, const float *up, int64_t n) {
    REALM_TRY(realm_cu_glu_async(out, gate, up, n, REALM_ACT_GELU));
    return realm_cuda_sync("geglu");
}

__global__ void softcap_kernel(float *x, int64_t n, float cap) {
    const float inv = 1.0f / cap;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = cap * tanhf(x[i] * inv);
}

int realm_cu_softcap_async(float *x, int64_t n, float cap) {
    if (!x || n <= 0 || !(cap > 0.0f) || !isfinite(cap)) return REALM_EINVAL;
    softcap_kernel<<<realm_cu_blocks(n, 256), 256, 0, REALM_STREAM>>>(x, n, cap);
    return realm_cuda_check_launch("softcap");
}

extern "C" int realm_cuda_softcap(float *x, int64_t n, float cap) {
    REALM_TRY(realm_cu_softcap_async(x, n, cap));
    return realm_cuda_sync("softcap");
}

__global__ void add_kernel(float *out, const float *a, const float *b, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

int realm_cu_add_async(float *out, const float *a, const float *b, int64_t n) {
    if (!out || !a || !b || n <= 0) return REALM_EINVAL;
    add_kernel<<<realm_cu_blocks(n, 256), 256, 0, REALM_STREAM>>>(out, a, b, n);
    return realm_cuda_check_launch("add");
}

extern "C" int realm_cuda_add(float *out, const float *a, const float *b, int64_t n) {
    REALM_TRY(realm_cu_add_async(out, a, b, n));
    return realm_cuda_sync("add");
}

// --- embedding rows: one block per id ---------------------------------------------------

__global__ void get_rows_kernel(float *out, const uint8_t *table, int type, int64_t row_len,
                                int64_t row_bytes, const int32_t *ids) {
    const uint8_t *row = table + (int64_t)ids[blockIdx.x] * row_bytes;
    float *o = out + blockIdx.x * row_len;
    if (realm_cu_block_elems(type) == 1) {
        for (int64_t c = threadIdx.x; c < row_len; c += blockDim.x)
            o[c] = realm_cu_float_elem(type, row, c);
    } else {
        for (int64_t blk = threadIdx.x; blk < row_len / QK; blk += blockDim.x)
            realm_cu_dequant_block(type, row, blk, o + blk * QK);
    }
}

int realm_cu_get_rows_async(float *out, const void *table, int type, int64_t row_len,
                            const int32_t *ids, int64_t n_ids) {
    const int64_t rb = realm_cu_row_bytes(type, row_len);
    if (!out || !table || !ids || n_ids <= 0 || rb <= 0 || n_ids > 2147483647LL)
        return REALM_EINVAL;
    get_rows_kernel<<<(unsigned)n_ids, 128, 0, REALM_STREAM>>>(out, (const uint8_t *)table,
                                                                type, row_len, rb, ids);
    return realm_cuda_check_launch("get_rows");
}

extern "C" int realm_cuda_get_rows(float *out, const void *table, int type, int64_t n_rows,
                                   int64_t row_len, const int32_t *ids, int64_t n_ids) {
    if (n_rows <= 0) return REALM_EINVAL;
    REALM_TRY(realm_cu_get_rows_async(out, table, type, row_len, ids, n_ids));
    return realm_cuda_sync("get_rows");
}
