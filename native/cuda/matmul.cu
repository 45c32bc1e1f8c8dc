/* Realm CUDA kernels: y[b, r] = sum_c w[r, c] * x[b, c] for every weight type of the CPU
 * library (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS).
 *
 * Two shapes of work, as on the CPU:
 *   - decode and small batches (batch <= MATVEC_MAX_BATCH): one warp per weight row; each
 *     lane walks the row's 32-element blocks (a contiguous chunk of bytes), unpacks them with
 *     the same unpackers as the CPU (common.cuh) and meets every batch row while the block is
 *     in registers, so the weights are read from memory once per call: a memory-bound kernel;
 *   - prefill and large batches: a tiled GEMM; each block dequantizes a 64-row x 32-column
 *     tile of weights into shared memory once and multiplies it against a 64-row tile of
 *     activations (4 x 4 outputs per thread, fp32 FMA).
 * Unlike the CPU, activations stay in float32 (the CPU quantizes them to 8 bits for integer
 * dots): results agree with the CPU within that quantization's error, and are closer to the
 * float product.
 */
#include "common.cuh"

#define MATVEC_MAX_BATCH 8
#define MATVEC_WARPS 4

template <int B>
__global__ void matvec_kernel(float *__restrict__ y, const uint8_t *__restrict__ w, int wtype,
                              const float *__restrict__ x, int64_t n_rows, int64_t n_cols,
                              int64_t row_bytes) {
    const int lane = threadIdx.x & 31;
    const int64_t r = (int64_t)blockIdx.x * MATVEC_WARPS + threadIdx.x / 32;
    if (r >= n_rows) return;  /* whole warps leave together: the shuffles below stay full */
    const uint8_t *row = w + r * row_bytes;
    float acc[B];
#pragma unroll
    for (int b = 0; b < B; b++) acc[b] = 0.0f;
    if (wtype == REALM_TYPE_F32 || wtype == REALM_TYPE_F16 || wtype == REALM_TYPE_BF16) {
        for (int64_t c = lane; c < n_cols; c += 32) {
            const float wv = realm_cu_float_elem(wtype, row, c);
#pragma unroll
            for (int b = 0; b < B; b++) acc[b] += wv * x[b * n_cols + c];
        }
    } else {
        const int64_t nb = n_cols / QK;
        for (int64_t i = lane; i < nb; i += 32) {
            int8_t q[32];
            float a[2], m[2];
            realm_cu_unpack(wtype, row, i, q, a, m);
#pragma unroll
            for (int b = 0; b < B; b++) {
                const float *xb = x + b * n_cols + i * QK;
                float d0 = 0.0f, d1 = 0.0f, s0 = 0.0f, s1 = 0.0f;
#pragma unroll
                for (int l = 0; l < 16; l++) {
                    d0 += (float)q[l] * xb[l];
                    s0 += xb[l];
                    d1 += (float)q[l + 16] * xb[l + 16];
                    s1 += xb[l + 16];
                }
                acc[b] += a[0] * d0 + a[1] * d1 + m[0] * s0 + m[1] * s1;
            }
        }
    }
#pragma unroll
    for (int b = 0; b < B; b++) {
        const float v = warp_sum(acc[b]);
        if (lane == 0) y[b * n_rows + r] = v;
    }
}

#define TILE_R 64   /* weight rows per block */
#define TILE_B 64   /* activation rows per block */
#define TILE_K 32   /* one quant block of columns per step */

__global__ void gemm_kernel(float *__restrict__ y, const uint8_t *__restrict__ w, int wtype,
                            const float *__restrict__ x, int64_t n_rows, int64_t n_cols,
                            int64_t batch, int64_t row_bytes) {
    __shared__ float ws[TILE_K][TILE_R + 1];
    __shared__ float xs[TILE_K][TILE_B + 1];
    const int tid = threadIdx.x;  /* 256 threads */
    const int tx = tid % 16, ty = tid / 16;
    const int64_t r0 = (int64_t)blockIdx.x * TILE_R, b0 = (int64_t)blockIdx.y * TILE_B;
    const bool is_float = realm_cu_block_elems(wtype) == 1;
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < n_cols; k0 += TILE_K) {
        /* weights: float types 8 elements a thread; block types one row's block a thread */
        if (is_float) {
            for (int e = tid; e < TILE_R * TILE_K; e += 256) {
                const int rr = e / TILE_K, kk = e % TILE_K;
                const int64_t r = r0 + rr, c = k0 + kk;
                ws[kk][rr] = (r < n_rows && c < n_cols)
                                 ? realm_cu_float_elem(wtype, w + r * row_bytes, c)
                                 : 0.0f;
            }
        } else if (tid < TILE_R) {
            const int64_t r = r0 + tid;
            float v[32];
            if (r < n_rows) {
                realm_cu_dequant_block(wtype, w + r * row_bytes, k0 / QK, v);
            } else {
#pragma unroll
                for (int l = 0; l < 32; l++) v[l] = 0.0f;
            }
#pragma unroll
            for (int l = 0; l < 32; l++) ws[l][tid] = v[l];
        }
        for (int e = tid; e < TILE_B * TILE_K; e += 256) {
            const int bb = e / TILE_K, kk = e % TILE_K;
            const int64_t b = b0 + bb, c = k0 + kk;
            xs[kk][bb] = (b < batch && c < n_cols) ? x[b * n_cols + c] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < TILE_K; kk++) {
            float wr[4], xr[4];
#pragma unroll
            for (int i = 0; i < 4; i++) wr[i] = ws[kk][tx + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) xr[j] = xs[kk][ty + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += wr[i] * xr[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int64_t r = r0 + tx + 16 * i;
        if (r >= n_rows) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int64_t b = b0 + ty + 16 * j;
            if (b < batch) y[b * n_rows + r] = acc[i][j];
        }
    }
}

static void launch_matvec(float *y, const uint8_t *wb, int wtype, const float *x,
                          int64_t n_rows, int64_t n_cols, int64_t batch, int64_t rb) {
    const dim3 grid((unsigned)((n_rows + MATVEC_WARPS - 1) / MATVEC_WARPS));
    const dim3 threads(32 * MATVEC_WARPS);
    switch (batch) {
#define CASE(B)                                                                               \
    case B:                                                                                   \
        matvec_kernel<B><<<grid, threads, 0, REALM_STREAM>>>(y, wb, wtype, x, n_rows, n_cols, \
                                                              rb);                            \
        break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}

int realm_cu_matmul_ex_async(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                             int64_t n_cols, int64_t batch, int rowwise) {
    const int64_t rb = realm_cu_row_bytes(wtype, n_cols);
    if (!y || !w || !x || n_rows <= 0 || batch <= 0 || rb <= 0) return REALM_EINVAL;
    if ((n_rows + MATVEC_WARPS - 1) / MATVEC_WARPS > 2147483647LL) return REALM_EINVAL;
    const uint8_t *wb = (const uint8_t *)w;
    if (batch <= MATVEC_MAX_BATCH || rowwise) {
        /* a row's result depends only on that row: each lane sums the same blocks in the same
         * order whatever the batch, so chunks of up to 8 rows give row-invariant results */
        for (int64_t b0 = 0; b0 < batch; b0 += MATVEC_MAX_BATCH) {
            const int64_t nb = batch - b0 < MATVEC_MAX_BATCH ? batch - b0 : MATVEC_MAX_BATCH;
            launch_matvec(y + b0 * n_rows, wb, wtype, x + b0 * n_cols, n_rows, n_cols, nb, rb);
        }
        return realm_cuda_check_launch("matmul (matvec)");
    }
    const int64_t gr = (n_rows + TILE_R - 1) / TILE_R, gb = (batch + TILE_B - 1) / TILE_B;
    if (gr > 2147483647LL || gb > 65535) return REALM_EINVAL;
    gemm_kernel<<<dim3((unsigned)gr, (unsigned)gb), 256, 0, REALM_STREAM>>>(
        y, wb, wtype, x, n_rows, n_cols, batch, rb);
    return realm_cuda_check_launch("matmul (gemm)");
}

int realm_cu_matmul_async(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                          int64_t n_cols, int64_t batch) {
    return realm_cu_matmul_ex_async(y, w, wtype, x, n_rows, n_cols, batch, 0);
}

extern "C" int realm_cuda_matmul(float *y, const void *w, int wtype, const float *x,
                                 int64_t n_rows, int64_t n_cols, int64_t batch) {
    REALM_TRY(realm_cu_matmul_async(y, w, wtype, x, n_rows, n_cols, batch));
    return realm_cuda_sync("matmul");
}
