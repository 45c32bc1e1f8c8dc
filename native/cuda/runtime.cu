/* Realm CUDA kernels: devices, memory, errors, and the copy kernel that measures the device's
 * memory bandwidth for the benchmarks.
 *
 * Linked with CUDA's static runtime: loading the extension needs no CUDA library, and the
 * runtime opens the driver (libcuda) only at the first call, so a machine without a driver
 * gets REALM_ECUDA and a message from realm_cuda_device_count instead of an import error.
 */
#include <stdio.h>
#include <string.h>

#include "common.cuh"

static thread_local char last_error[512];

extern "C" const char *realm_cuda_error(void) { return last_error; }

int realm_cuda_fail(cudaError_t err, const char *what) {
    snprintf(last_error, sizeof last_error, "%s: %s (%s)", what, cudaGetErrorString(err),
             cudaGetErrorName(err));
    return REALM_ECUDA;
}

int realm_cuda_check_launch(const char *what) {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? REALM_OK : realm_cuda_fail(err, what);
}

int realm_cuda_sync(const char *what) {
    const cudaError_t err = cudaStreamSynchronize(REALM_STREAM);
    return err == cudaSuccess ? REALM_OK : realm_cuda_fail(err, what);
}

extern "C" int realm_cuda_device_count(int32_t *count) {
    if (!count) return REALM_EINVAL;
    int n = 0;
    *count = 0;
    CUDA_TRY(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
    *count = n;
    return REALM_OK;
}

extern "C" int realm_cuda_set_device(int32_t device) {
    if (device < 0) return REALM_EINVAL;
    CUDA_TRY(cudaSetDevice(device), "cudaSetDevice");
    return REALM_OK;
}

extern "C" int realm_cuda_device_info(char *name, int64_t *total_bytes, int32_t *n_sm,
                                      int32_t *cc_major, int32_t *cc_minor, int32_t device) {
    if (!name || !total_bytes || !n_sm || !cc_major || !cc_minor || device < 0)
        return REALM_EINVAL;
    cudaDeviceProp p;
    CUDA_TRY(cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties");
    snprintf(name, 256, "%s", p.name);
    *total_bytes = (int64_t)p.totalGlobalMem;
    *n_sm = p.multiProcessorCount;
    *cc_major = p.major;
    *cc_minor = p.minor;
    return REALM_OK;
}

extern "C" int realm_cuda_mem_info(int64_t *free_bytes, int64_t *total_bytes) {
    if (!free_bytes || !total_bytes) return REALM_EINVAL;
    size_t f = 0, t = 0;
    CUDA_TRY(cudaMemGetInfo(&f, &t), "cudaMemGetInfo");
    *free_bytes = (int64_t)f;
    *total_bytes = (int64_t)t;
    return REALM_OK;
}

extern "C" int realm_cuda_malloc(void **d_out, int64_t n_bytes) {
    if (!d_out || n_bytes <= 0) return REALM_EINVAL;
    *d_out = nullptr;
    const cudaError_t err = cudaMalloc(d_out, (size_t)n_bytes);
    if (err == cudaErrorMemoryAllocation) {
        realm_cuda_fail(err, "cudaMalloc");
        cudaGetLastError();  /* not sticky: clear it */
        return REALM_ENOMEM;
    }
    if (err != cudaSuccess) return realm_cuda_fail(err, "cudaMalloc");
    return REALM_OK;
}

extern "C" int realm_cuda_free(void *d_ptr) {
    if (!d_ptr) return REALM_OK;
    CUDA_TRY(cudaFree(d_ptr), "cudaFree");
    return REALM_OK;
}

static int copy(void *dst, const void *src, int64_t n, cudaMemcpyKind kind, const char *what) {
    if (!dst || !src || n < 0) return REALM_EINVAL;
    if (n == 0) return REALM_OK;
    CUDA_TRY(cudaMemcpyAsync(dst, src, (size_t)n, kind, REALM_STREAM), what);
    return realm_cuda_sync(what);
}

extern "C" int realm_cuda_upload(void *d_dst, const void *src, int64_t n_bytes) {
    return copy(d_dst, src, n_bytes, cudaMemcpyHostToDevice, "upload");
}

extern "C" int realm_cuda_download(void *dst, const void *d_src, int64_t n_bytes) {
    return copy(dst, d_src, n_bytes, cudaMemcpyDeviceToHost, "download");
}

extern "C" int realm_cuda_copy(void *d_dst, const void *d_src, int64_t n_bytes) {
    return copy(d_dst, d_src, n_bytes, cudaMemcpyDeviceToDevice, "device copy");
}

extern "C" int realm_cuda_memset(void *d_dst, int32_t value, int64_t n_bytes) {
    if (!d_dst || n_bytes < 0) return REALM_EINVAL;
    if (n_bytes == 0) return REALM_OK;
    CUDA_TRY(cudaMemsetAsync(d_dst, value, (size_t)n_bytes, REALM_STREAM), "memset");
    return realm_cuda_sync("memset");
}

extern "C" int realm_cuda_copy_2d(void *d_dst, int64_t dst_pitch, const void *d_src,
                                  int64_t src_pitch, int64_t row_bytes, int64_t n_rows) {
    if (!d_dst || !d_src || row_bytes < 0 || n_rows < 0 || dst_pitch < row_bytes ||
        src_pitch < row_bytes)
        return REALM_EINVAL;
    if (row_bytes == 0 || n_rows == 0) return REALM_OK;
    CUDA_TRY(cudaMemcpy2DAsync(d_dst, (size_t)dst_pitch, d_src, (size_t)src_pitch,
                               (size_t)row_bytes, (size_t)n_rows, cudaMemcpyDeviceToDevice,
                               REALM_STREAM),
             "2-D device copy");
    return realm_cuda_sync("2-D device copy");
}

// --- machine limits ---------------------------------------------------------------------

__global__ void copy_kernel(int4 *__restrict__ dst, const int4 *__restrict__ src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = src[i];
}

extern "C" int realm_cuda_copy_bandwidth(double *seconds, void *d_dst, const void *d_src,
                                         int64_t n_bytes, int32_t iters) {
    if (!seconds || !d_dst || !d_src || n_bytes <= 0 || n_bytes % 16 || iters <= 0)
        return REALM_EINVAL;
    int device = 0, n_sm = 1;
    CUDA_TRY(cudaGetDevice(&device), "cudaGetDevice");
    CUDA_TRY(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute");
    const int64_t n = n_bytes / 16;
    const unsigned blocks = (unsigned)(n_sm * 8);
    cudaEvent_t start, stop;
    CUDA_TRY(cudaEventCreate(&start), "cudaEventCreate");
    CUDA_TRY(cudaEventCreate(&stop), "cudaEventCreate");
    double best = 1e30;
    int rc = REALM_OK;
    for (int32_t it = 0; it <= iters && rc == REALM_OK; it++) {  /* pass 0 warms up */
        cudaEventRecord(start, REALM_STREAM);
        copy_kernel<<<blocks, 512, 0, REALM_STREAM>>>((int4 *)d_dst, (const int4 *)d_src, n);
        cudaEventRecord(stop, REALM_STREAM);
        rc = realm_cuda_check_launch("copy kernel");
        if (rc == REALM_OK) rc = realm_cuda_sync("copy kernel");
        float ms = 0.0f;
        if (rc == REALM_OK) {
            const cudaError_t err = cudaEventElapsedTime(&ms, start, stop);
            if (err != cudaSuccess) rc = realm_cuda_fail(err, "cudaEventElapsedTime");
        }
        if (rc == REALM_OK && it > 0 && ms / 1e3 < best) best = ms / 1e3;
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    if (rc == REALM_OK) *seconds = best;
    return rc;
}

/* 8 independent FMA chains per thread, in registers: the device's float32 FMA throughput */
__global__ void fma_kernel(float *out, int32_t n_iter, float a, float b) {
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = (float)(threadIdx.x + i);
    for (int32_t it = 0; it < n_iter; it++) {
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = fmaf(v[i], a, b);
    }
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) s += v[i];
    if (s == 12345.678f) out[0] = s;  /* never true in practice; keeps the chains alive */
}

extern "C" int realm_cuda_fma_peak(double *flops, int32_t iters) {
    if (!flops || iters <= 0) return REALM_EINVAL;
    int device = 0, n_sm = 1;
    CUDA_TRY(cudaGetDevice(&device), "cudaGetDevice");
    CUDA_TRY(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute");
    float *sink = nullptr;
    CUDA_TRY(cudaMallocAsync((void **)&sink, sizeof(float), REALM_STREAM), "cudaMallocAsync");
    cudaEvent_t start, stop;
    CUDA_TRY(cudaEventCreate(&start), "cudaEventCreate");
    CUDA_TRY(cudaEventCreate(&stop), "cudaEventCreate");
    const int32_t n_iter = 4096;
    const unsigned blocks = (unsigned)(n_sm * 16), threads = 256;
    double best = 1e30;
    int rc = REALM_OK;
    for (int32_t it = 0; it <= iters && rc == REALM_OK; it++) {
        cudaEventRecord(start, REALM_STREAM);
        fma_kernel<<<blocks, threads, 0, REALM_STREAM>>>(sink, n_iter, 0.999f, 0.001f);
        cudaEventRecord(stop, REALM_STREAM);
        rc = realm_cuda_check_launch("fma kernel");
        if (rc == REALM_OK) rc = realm_cuda_sync("fma kernel");
        float ms = 0.0f;
        if (rc == REALM_OK) {
            const cudaError_t err = cudaEventElapsedTime(&ms, start, stop);
            if (err != cudaSuccess) rc = realm_cuda_fail(err, "cudaEventElapsedTime");
        }
        if (rc == REALM_OK && it > 0 && ms / 1e3 < best) best = ms / 1e3;
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    cudaFreeAsync(sink, REALM_STREAM);
    if (rc == REALM_OK) *flops = 2.0 * 8.0 * n_iter * (double)blocks * threads / best;
    return rc;
}

extern "C" int realm_cuda_time_matmul(double *seconds, float *y, const void *w, int wtype,
                                      const float *x, int64_t n_rows, int64_t n_cols,
                                      int64_t batch, int32_t iters) {
    if (!seconds || iters <= 0) return REALM_EINVAL;
    cudaEvent_t start, stop;
    CUDA_TRY(cudaEventCreate(&start), "cudaEventCreate");
    CUDA_TRY(cudaEventCreate(&stop), "cudaEventCreate");
    double best = 1e30;
    int rc = REALM_OK;
    for (int32_t it = 0; it <= iters && rc == REALM_OK; it++) {
        cudaEventRecord(start, REALM_STREAM);
        rc = realm_cu_matmul_async(y, w, wtype, x, n_rows, n_cols, batch);
        cudaEventRecord(stop, REALM_STREAM);
        if (rc == REALM_OK) rc = realm_cuda_sync("matmul");
        float ms = 0.0f;
        if (rc == REALM_OK) {
            const cudaError_t err = cudaEventElapsedTime(&ms, start, stop);
            if (err != cudaSuccess) rc = realm_cuda_fail(err, "cudaEventElapsedTime");
        }
        if (rc == REALM_OK && it > 0 && ms / 1e3 < best) best = ms / 1e3;
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    if (rc == REALM_OK) *seconds = best;
    return rc;
}
