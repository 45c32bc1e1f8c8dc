/* Realm CUDA kernels: the one declaration of the CUDA library's C ABI.
 *
 * build_cuda.py compiles the .cu files of native/cuda with nvcc and links them, with CUDA's
 * static runtime, into a second cffi extension (realm.kernels._cuda_native) that only a model or
 * kernel call with device="cuda" imports; this file is fed to that module's ffi.cdef the way
 * native/kernels.h is fed to the CPU module's (the realm_model / realm_seq / realm_layer types
 * and REALM_* constants come from kernels.h and are shared, not redeclared).
 *
 * Conventions are the CPU library's (docs/kernels.md): realm_cuda_ prefix, output first, an
 * int status (0 or a negative REALM_E*), never abort or print. Pointers named d_* and every
 * array argument of a kernel entry point live in device memory; the kernels use the same
 * contracts (shapes, types, block layouts, RoPE modes, attention masking) as their CPU
 * namesakes. Work is queued on the calling thread's default stream (per-thread stream) and
 * every entry point waits for it before returning, so a status covers the work itself.
 */
#ifndef REALM_CUDA_H
#define REALM_CUDA_H

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

#define REALM_ECUDA -5  /* the CUDA runtime or driver reported an error (see realm_cuda_error) */

/* ---- device, memory, errors ---- */
/* The message of the last CUDA failure in this thread ("" if none). */
const char *realm_cuda_error(void);
/* Number of devices; a driver problem (none installed, too old) gives REALM_ECUDA. */
int realm_cuda_device_count(int32_t *count);
int realm_cuda_set_device(int32_t device);
/* name: at least 256 bytes. bytes of device memory; multiprocessors; compute capability. */
int realm_cuda_device_info(char *name, int64_t *total_bytes, int32_t *n_sm, int32_t *cc_major,
                           int32_t *cc_minor, int32_t device);
int realm_cuda_mem_info(int64_t *free_bytes, int64_t *total_bytes);
int realm_cuda_malloc(void **d_out, int64_t n_bytes);
int realm_cuda_free(void *d_ptr);
int realm_cuda_upload(void *d_dst, const void *src, int64_t n_bytes);
int realm_cuda_download(void *dst, const void *d_src, int64_t n_bytes);
int realm_cuda_copy(void *d_dst, const void *d_src, int64_t n_bytes);
int realm_cuda_memset(void *d_dst, int32_t value, int64_t n_bytes);
/* Strided 2-D copy between device buffers: rows of row_bytes (KV cache growth and forks). */
int realm_cuda_copy_2d(void *d_dst, int64_t dst_pitch, const void *d_src, int64_t src_pitch,
                       int64_t row_bytes, int64_t n_rows);

/* ---- kernels (same contracts as kernels.h; every array in device memory) ---- */
int realm_cuda_matmul(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                      int64_t n_cols, int64_t batch);
int realm_cuda_rmsnorm(float *out, const float *x, const float *weight, int64_t n_rows,
                       int64_t n, float eps);
/* factors: (n_rot / 2) divisors of each pair's angle, or NULL */
int realm_cuda_rope(float *x, const int32_t *pos, int64_t n_tokens, int32_t n_heads,
                    int32_t head_dim, int32_t n_rot, int32_t mode, float freq_base,
                    float freq_scale, const float *factors);
int realm_cuda_softmax(float *x, int64_t n_rows, int64_t n);
int realm_cuda_swiglu(float *out, const float *gate, const float *up, int64_t n);
int realm_cuda_geglu(float *out, const float *gate, const float *up, int64_t n);
int realm_cuda_softcap(float *x, int64_t n, float cap);
int realm_cuda_add(float *out, const float *a, const float *b, int64_t n);
/* ids must be in range: the Python layer checks them on the host before upload */
int realm_cuda_get_rows(float *out, const void *table, int type, int64_t n_rows, int64_t row_len,
                        const int32_t *ids, int64_t n_ids);
int realm_cuda_attention(float *out, const float *q, const void *k, const void *v, int kv_type,
                         const int32_t *q_pos, int64_t n_q, int64_t n_kv, int32_t n_heads,
                         int32_t n_kv_heads, int32_t head_dim, float scale, int32_t window,
                         float softcap);

/* ---- one forward step ----
 * realm_forward's contract, on the device: every weight pointer of the model and its layers
 * (or of what acquire returns), the per-layer arrays window / layer_rope_base /
 * layer_rope_scale excepted (host), and rope_freqs (device), and every sequence's kv are in
 * device memory; the realm_layer array itself, tokens, logits and embedding are host memory.
 * Before release is called for a layer the device has finished every use of it, so a pager
 * may reuse that layer's memory at once. */
int realm_cuda_forward(const realm_model *m, realm_seq *seqs, int32_t n_seqs);

/* ---- machine limits for the benchmarks ---- */
/* Copies n_bytes (a multiple of 16) from d_src to d_dst iters times with a plain copy
 * kernel; *seconds gets the best pass (bandwidth = 2 * n_bytes / seconds: read + write). */
int realm_cuda_copy_bandwidth(double *seconds, void *d_dst, const void *d_src, int64_t n_bytes,
                              int32_t iters);
/* float32 FMA throughput (a multiply-add counts two) of a register-only kernel, best of
 * iters passes: the compute peak prefill is compared with. */
int realm_cuda_fma_peak(double *flops, int32_t iters);
/* Runs realm_cuda_matmul iters times; *seconds gets the best pass (CUDA events). */
int realm_cuda_time_matmul(double *seconds, float *y, const void *w, int wtype, const float *x,
                           int64_t n_rows, int64_t n_cols, int64_t batch, int32_t iters);

#ifdef __cplusplus
}
#endif

#endif
