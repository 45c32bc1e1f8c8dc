/* Realm CUDA kernels: declarations shared by the .cu files (never seen by cffi).
 *
 * GGML's block layouts bit for bit (the same structs as native/internal.h), IEEE half and
 * bfloat16 conversions with the CPU's rounding, error plumbing, and the per-32-element
 * unpackers of every block type: the device twins of native/quants_unpack.inc, with the same
 * weight = a * q + b decomposition per half of 16, so the CUDA and CPU libraries read the same
 * numbers out of every block.
 */
#ifndef REALM_CUDA_COMMON_CUH
#define REALM_CUDA_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "realm_cuda.h"

#define QK 32
#define QK_K 256

/* ---- GGML block layouts (as native/internal.h) ---- */
struct block_q8_0 { uint16_t d; int8_t qs[QK]; };
struct block_q4_0 { uint16_t d; uint8_t qs[QK / 2]; };
struct block_q4_1 { uint16_t d, m; uint8_t qs[16]; };
struct block_q5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; };
struct block_q5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; };
struct block_q2_K { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; };
struct block_q3_K { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; };
struct block_q4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; };
struct block_q5_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; };
struct block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; };
struct block_iq4_nl { uint16_t d; uint8_t qs[16]; };
struct block_iq4_xs { uint16_t d, scales_h; uint8_t scales_l[4]; uint8_t qs[128]; };
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must match GGML");
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 must match GGML");
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 must match GGML");
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 must match GGML");
static_assert(sizeof(block_q5_1) == 24, "block_q5_1 must match GGML");
static_assert(sizeof(block_q2_K) == 84, "block_q2_K must match GGML");
static_assert(sizeof(block_q3_K) == 110, "block_q3_K must match GGML");
static_assert(sizeof(block_q4_K) == 144, "block_q4_K must match GGML");
static_assert(sizeof(block_q5_K) == 176, "block_q5_K must match GGML");
static_assert(sizeof(block_q6_K) == 210, "block_q6_K must match GGML");
static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl must match GGML");
static_assert(sizeof(block_iq4_xs) == 136, "block_iq4_xs must match GGML");

/* ---- errors ---- */
/* Record a failed CUDA call's message for realm_cuda_error; returns REALM_ECUDA. */
int realm_cuda_fail(cudaError_t err, const char *what);
/* The launch's own error (bad configuration) or an earlier asynchronous one. */
int realm_cuda_check_launch(const char *what);
/* Wait for the calling thread's stream; its errors become REALM_ECUDA. */
int realm_cuda_sync(const char *what);

#define REALM_STREAM cudaStreamPerThread
#define CUDA_TRY(call, what)                                                  \
    do {                                                                      \
        cudaError_t err_ = (call);                                            \
        if (err_ != cudaSuccess) return realm_cuda_fail(err_, what);          \
    } while (0)
#define REALM_TRY(call)                                                       \
    do {                                                                      \
        int rc_ = (call);                                                     \
        if (rc_ != REALM_OK) return rc_;                                      \
    } while (0)

/* ---- type facts (host and device) ---- */
__host__ __device__ inline int64_t realm_cu_block_elems(int type) {
    switch (type) {
    case REALM_TYPE_F32: case REALM_TYPE_F16: case REALM_TYPE_BF16: return 1;
    case REALM_TYPE_Q8_0: case REALM_TYPE_Q4_0: case REALM_TYPE_Q4_1: case REALM_TYPE_Q5_0:
    case REALM_TYPE_Q5_1: case REALM_TYPE_IQ4_NL: return QK;
    case REALM_TYPE_Q2_K: case REALM_TYPE_Q3_K: case REALM_TYPE_Q4_K: case REALM_TYPE_Q5_K:
    case REALM_TYPE_Q6_K: case REALM_TYPE_IQ4_XS: return QK_K;
    default: return -1;
    }
}

__host__ __device__ inline int64_t realm_cu_block_bytes(int type) {
    switch (type) {
    case REALM_TYPE_F32: return 4;
    case REALM_TYPE_F16: case REALM_TYPE_BF16: return 2;
    case REALM_TYPE_Q8_0: return sizeof(block_q8_0);
    case REALM_TYPE_Q4_0: return sizeof(block_q4_0);
    case REALM_TYPE_Q4_1: return sizeof(block_q4_1);
    case REALM_TYPE_Q5_0: return sizeof(block_q5_0);
    case REALM_TYPE_Q5_1: return sizeof(block_q5_1);
    case REALM_TYPE_Q2_K: return sizeof(block_q2_K);
    case REALM_TYPE_Q3_K: return sizeof(block_q3_K);
    case REALM_TYPE_Q4_K: return sizeof(block_q4_K);
    case REALM_TYPE_Q5_K: return sizeof(block_q5_K);
    case REALM_TYPE_Q6_K: return sizeof(block_q6_K);
    case REALM_TYPE_IQ4_NL: return sizeof(block_iq4_nl);
    case REALM_TYPE_IQ4_XS: return sizeof(block_iq4_xs);
    default: return -1;
    }
}

/* bytes of a row of n elements, or < 0 if n does not fill whole blocks */
__host__ __device__ inline int64_t realm_cu_row_bytes(int type, int64_t n) {
    const int64_t be = realm_cu_block_elems(type);
    if (be <= 0 || n <= 0 || n % be != 0) return -1;
    return n / be * realm_cu_block_bytes(type);
}

inline bool realm_cu_is_float_type(int type) {
    return type == REALM_TYPE_F32 || type == REALM_TYPE_F16 || type == REALM_TYPE_BF16;
}

/* ---- conversions ---- */
/* The readers below are __host__ __device__: tests compile them into a host program and
 * compare what they decode with the CPU library, bit for bit (test_cuda_build.py). */
__host__ __device__ __forceinline__ float f16_to_f32(uint16_t h) {
    return __half2float(__ushort_as_half(h));
}
/* round to nearest even, as the CPU's realm_f32_to_f16 and numpy */
__device__ __forceinline__ uint16_t f32_to_f16(float f) {
    return __half_as_ushort(__float2half_rn(f));
}
__host__ __device__ __forceinline__ float bf16_to_f32(uint16_t h) {
#ifdef __CUDA_ARCH__
    return __uint_as_float((uint32_t)h << 16);
#else
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

/* Unaligned little-endian loads: blocks of 18, 22, 34... bytes sit at any 2-byte offset. */
__host__ __device__ __forceinline__ uint16_t ld_u16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}
__host__ __device__ __forceinline__ uint32_t ld_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* ---- the unpackers: 32-element block i of a row ----
 * q[32] integers and (a, b) per half of 16, weight = a * q + b; the same arithmetic, in the
 * same order, as native/quants_unpack.inc and quants.c's dequantization. */

#define REALM_IQ4_LEVELS {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113}
__constant__ static const int8_t realm_cu_iq4_levels_dev[16] = REALM_IQ4_LEVELS;
static const int8_t realm_cu_iq4_levels_host[16] = REALM_IQ4_LEVELS;

__host__ __device__ __forceinline__ int8_t iq4_level(int i) {
#ifdef __CUDA_ARCH__
    return realm_cu_iq4_levels_dev[i];
#else
    return realm_cu_iq4_levels_host[i];
#endif
}

__host__ __device__ __forceinline__ int q3_K_scale(const uint8_t *s, int is) {
    const int lo = is < 8 ? (s[is] & 0x0f) : (s[is - 8] >> 4);
    const int hi = (s[8 + is % 4] >> (2 * (is / 4))) & 3;
    return (lo | (hi << 4)) - 32;
}

__host__ __device__ __forceinline__ void k4_scale_min(int j, const uint8_t *s, uint8_t *sc,
                                                     uint8_t *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (uint8_t)((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4));
        *m = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* Returns false for a type without 32-element blocks (float types). has_min: b is used. */
__host__ __device__ inline bool realm_cu_unpack(int type, const uint8_t *row, int64_t i,
                                                int8_t q[32], float a[2], float b[2]) {
    b[0] = b[1] = 0.0f;
    switch (type) {
    case REALM_TYPE_Q8_0: {
        const uint8_t *blk = row + i * 34;
        for (int l = 0; l < 32; l++) q[l] = (int8_t)blk[2 + l];
        a[0] = a[1] = f16_to_f32(ld_u16(blk));
        return true;
    }
    case REALM_TYPE_Q4_0: {
        const uint8_t *blk = row + i * 18;
        for (int l = 0; l < 16; l++) {
            q[l] = (int8_t)((blk[2 + l] & 0x0f) - 8);
            q[l + 16] = (int8_t)((blk[2 + l] >> 4) - 8);
        }
        a[0] = a[1] = f16_to_f32(ld_u16(blk));
        return true;
    }
    case REALM_TYPE_Q4_1: {
        const uint8_t *blk = row + i * 20;
        for (int l = 0; l < 16; l++) {
            q[l] = (int8_t)(blk[4 + l] & 0x0f);
            q[l + 16] = (int8_t)(blk[4 + l] >> 4);
        }
        a[0] = a[1] = f16_to_f32(ld_u16(blk));
        b[0] = b[1] = f16_to_f32(ld_u16(blk + 2));
        return true;
    }
    case REALM_TYPE_Q5_0: {
        const uint8_t *blk = row + i * 22;
        const uint32_t qh = ld_u32(blk + 2);
        const uint8_t *qs = blk + 6;
        for (int l = 0; l < 16; l++) {
            q[l] = (int8_t)((qs[l] & 0x0f) | (((qh >> l) & 1u) << 4)) - 16;
            q[l + 16] = (int8_t)((qs[l] >> 4) | (((qh >> (l + 16)) & 1u) << 4)) - 16;
        }
        a[0] = a[1] = f16_to_f32(ld_u16(blk));
        return true;
    }
    case REALM_TYPE_Q5_1: {
        const uint8_t *blk = row + i * 24;
        const uint32_t qh = ld_u32(blk + 4);
        const uint8_t *qs = blk + 8;
        for (int l = 0; l < 16; l++) {
            q[l] = (int8_t)((qs[l] & 0x0f) | (((qh >> l) & 1u) << 4));
            q[l + 16] = (int8_t)((qs[l] >> 4) | (((qh >> (l + 16)) & 1u) << 4));
        }
        a[0] = a[1] = f16_to_f32(ld_u16(blk));
        b[0] = b[1] = f16_to_f32(ld_u16(blk + 2));
        return true;
    }
    case REALM_TYPE_Q2_K: {
        const uint8_t *blk = row + (i / 8) * 84;  /* scales[16] qs[64] d dmin */
        const int sub = (int)(i % 8), n = sub / 4, j = sub % 4;
        const uint8_t *qs = blk + 16 + n * 32;
        for (int l = 0; l < 32; l++) q[l] = (int8_t)((qs[l] >> (2 * j)) & 3);
        const float d = f16_to_f32(ld_u16(blk + 80)), dmin = f16_to_f32(ld_u16(blk + 82));
        for (int h = 0; h < 2; h++) {
            const uint8_t sc = blk[n * 8 + 2 * j + h];
            a[h] = d * (float)(sc & 0x0f);
            b[h] = -(dmin * (float)(sc >> 4));
        }
        return true;
    }
    case REALM_TYPE_Q3_K: {
        const uint8_t *blk = row + (i / 8) * 110;  /* hmask[32] qs[64] scales[12] d */
        const int sub = (int)(i % 8), n = sub / 4, j = sub % 4;
        const uint8_t *qs = blk + 32 + n * 32;
        const uint8_t m = (uint8_t)(1u << sub);
        for (int l = 0; l < 32; l++)
            q[l] = (int8_t)(((qs[l] >> (2 * j)) & 3) - ((blk[l] & m) ? 0 : 4));
        const float d = f16_to_f32(ld_u16(blk + 108));
        for (int h = 0; h < 2; h++) a[h] = d * (float)q3_K_scale(blk + 96, n * 8 + 2 * j + h);
        return true;
    }
    case REALM_TYPE_Q4_K: {
        const uint8_t *blk = row + (i / 8) * 144;  /* d dmin scales[12] qs[128] */
        const int sub = (int)(i % 8);
        const uint8_t *qs = blk + 16 + (sub / 2) * 32;
        const int shift = (sub & 1) * 4;
        for (int l = 0; l < 32; l++) q[l] = (int8_t)((qs[l] >> shift) & 0x0f);
        uint8_t sc, m;
        k4_scale_min(sub, blk + 4, &sc, &m);
        a[0] = a[1] = f16_to_f32(ld_u16(blk)) * (float)sc;
        b[0] = b[1] = -(f16_to_f32(ld_u16(blk + 2)) * (float)m);
        return true;
    }
    case REALM_TYPE_Q5_K: {
        const uint8_t *blk = row + (i / 8) * 176;  /* d dmin scales[12] qh[32] qs[128] */
        const int sub = (int)(i % 8);
        const uint8_t *qh = blk + 16, *qs = blk + 48 + (sub / 2) * 32;
        const int shift = (sub & 1) * 4;
        const uint8_t u = (uint8_t)(1u << sub);
        for (int l = 0; l < 32; l++)
            q[l] = (int8_t)(((qs[l] >> shift) & 0x0f) + ((qh[l] & u) ? 16 : 0));
        uint8_t sc, m;
        k4_scale_min(sub, blk + 4, &sc, &m);
        a[0] = a[1] = f16_to_f32(ld_u16(blk)) * (float)sc;
        b[0] = b[1] = -(f16_to_f32(ld_u16(blk + 2)) * (float)m);
        return true;
    }
    case REALM_TYPE_Q6_K: {
        const uint8_t *blk = row + (i / 8) * 210;  /* ql[128] qh[64] scales[16] d */
        const int sub = (int)(i % 8), n = sub / 4, g = sub % 4;
        const uint8_t *ql = blk + n * 64 + (g & 1) * 32, *qh = blk + 128 + n * 32;
        const int lshift = (g >> 1) * 4, hshift = 2 * g;
        for (int l = 0; l < 32; l++)
            q[l] = (int8_t)(((ql[l] >> lshift) & 0x0f) | (((qh[l] >> hshift) & 3) << 4)) - 32;
        const float d = f16_to_f32(ld_u16(blk + 208));
        for (int h = 0; h < 2; h++) a[h] = d * (float)(int8_t)blk[192 + n * 8 + 2 * g + h];
        return true;
    }
    case REALM_TYPE_IQ4_NL: {
        const uint8_t *blk = row + i * 18;
        for (int l = 0; l < 16; l++) {
            q[l] = iq4_level(blk[2 + l] & 0x0f);
            q[l + 16] = iq4_level(blk[2 + l] >> 4);
        }
        a[0] = a[1] = f16_to_f32(ld_u16(blk));
        return true;
    }
    case REALM_TYPE_IQ4_XS: {
        const uint8_t *blk = row + (i / 8) * 136;  /* d scales_h scales_l[4] qs[128] */
        const int ib = (int)(i % 8);
        const uint8_t *qs = blk + 8 + ib * 16;
        for (int l = 0; l < 16; l++) {
            q[l] = iq4_level(qs[l] & 0x0f);
            q[l + 16] = iq4_level(qs[l] >> 4);
        }
        const int ls = ((blk[4 + ib / 2] >> 4 * (ib % 2)) & 0x0f) |
                       (((ld_u16(blk + 2) >> 2 * ib) & 3) << 4);
        a[0] = a[1] = f16_to_f32(ld_u16(blk)) * (float)(ls - 32);
        return true;
    }
    default: return false;
    }
}

/* Dequantize 32-element block i into o[32] (quantized types) with the CPU's float order:
 * a * q, then + b for the types with a minimum. */
__host__ __device__ inline void realm_cu_dequant_block(int type, const uint8_t *row, int64_t i,
                                                       float *o) {
    int8_t q[32];
    float a[2], b[2];
    realm_cu_unpack(type, row, i, q, a, b);
    const bool has_min = type == REALM_TYPE_Q4_1 || type == REALM_TYPE_Q5_1 ||
                         type == REALM_TYPE_Q2_K || type == REALM_TYPE_Q4_K ||
                         type == REALM_TYPE_Q5_K;
    for (int l = 0; l < 32; l++) {
        const float v = a[l / 16] * (float)q[l];
        o[l] = has_min ? v + b[l / 16] : v;
    }
}

/* element c of a float-typed row */
__host__ __device__ __forceinline__ float realm_cu_float_elem(int type, const void *row,
                                                             int64_t c) {
    switch (type) {
    case REALM_TYPE_F16: return f16_to_f32(((const uint16_t *)row)[c]);
    case REALM_TYPE_BF16: return bf16_to_f32(((const uint16_t *)row)[c]);
    default: return ((const float *)row)[c];
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* grid size for n elements at `threads` per block, capped for grid-stride loops */
inline unsigned realm_cu_blocks(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    if (b > 65535LL * 16) b = 65535LL * 16;
    return (unsigned)(b < 1 ? 1 : b);
}

/* ---- forward's internal entry points (the same kernels without the final wait) ---- */
int realm_cu_matmul_async(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                          int64_t n_cols, int64_t batch);
/* rowwise: every row's result independent of the others (the small-batch kernel, in chunks) */
int realm_cu_matmul_ex_async(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                             int64_t n_cols, int64_t batch, int rowwise);
int realm_cu_rmsnorm_async(float *out, const float *x, const float *weight, int64_t n_rows,
                           int64_t n, float eps);
int realm_cu_rope_async(float *x, const int32_t *pos, int64_t n_tokens, int32_t n_heads,
                        int32_t head_dim, int32_t n_rot, int32_t mode, float freq_base,
                        float freq_scale, const float *factors);
int realm_cu_glu_async(float *out, const float *gate, const float *up, int64_t n, int act);
int realm_cu_softcap_async(float *x, int64_t n, float cap);
int realm_cu_add_async(float *out, const float *a, const float *b, int64_t n);
int realm_cu_get_rows_async(float *out, const void *table, int type, int64_t row_len,
                            const int32_t *ids, int64_t n_ids);

/* Attention over many sequences' caches in one launch: query row t belongs to sequence
 * seq[t]; sequence s's layer cache starts at k[s] / v[s] (device pointers, in a device
 * array) and holds n_kv[s] valid positions. */
typedef struct {
    const void *k;     /* (capacity, n_kv_heads, head_dim) of kv_type: this layer's K rows */
    const void *v;
    int64_t n_kv;      /* positions valid for this step: pos + n_tokens */
} realm_cu_kv_view;

int realm_cu_attention_async(float *out, const float *q, const realm_cu_kv_view *views,
                             const int32_t *row_seq, const int32_t *q_pos, int kv_type,
                             int64_t n_q, int32_t n_heads, int32_t n_kv_heads, int32_t head_dim,
                             float scale, int32_t window, float softcap);

#endif
