/* Realm native kernels: configuration, status messages, ISA dispatch and block formats. */
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"

// --- status ---------------------------------------------------------------------------

const char *realm_status_message(int status) {
    switch (status) {
    case REALM_OK: return "ok";
    case REALM_EINVAL: return "invalid argument";
    case REALM_ENOMEM: return "out of memory";
    case REALM_EUNSUPPORTED: return "not supported by this build or CPU";
    case REALM_ETHREAD: return "the thread pool could not start";
    default: return "unknown status";
    }
}

// --- ISA dispatch -----------------------------------------------------------------------

#ifdef REALM_X86
#include <cpuid.h>

static inline int cpu_has_f16c(void) {
#ifdef __clang__
    /* older clang (14, Debian 12's) rejects "f16c" in __builtin_cpu_supports: CPUID leaf 1,
     * ECX bit 29 (the AVX2 check beside it covers the OS's saving of ymm state) */
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
#else
    return __builtin_cpu_supports("f16c");
#endif
}
#endif

/* AMD Zen 4 (family 0x19 with AVX-512) runs a 512-bit instruction as two 256-bit halves;
 * Zen 5 (family 0x1A) and Intel's AVX-512 parts run it whole. The quantized kernels' row /
 * GEMM thresholds differ between the two kinds (avx512.c). */
static int cpu_split_512(void) {
#ifdef REALM_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d) || b != 0x68747541u /* "Auth" of AuthenticAMD */)
        return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    unsigned family = (a >> 8) & 0xf;
    if (family == 0xf) family += (a >> 20) & 0xff;
    return family == 0x19;
#else
    return 0;
#endif
}

int realm_cpu_split_512(void) {
    /* cpuid is slow (a hypervisor traps it): asked once; a race stores the same answer */
    static atomic_int known = -1;
    int v = atomic_load_explicit(&known, memory_order_relaxed);
    if (v < 0) atomic_store_explicit(&known, v = cpu_split_512(), memory_order_relaxed);
    return v;
}

static int detect_isa(void) {
#ifdef REALM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return REALM_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c())
        return REALM_ISA_AVX2;
#endif
    return REALM_ISA_SCALAR;
}

static atomic_int active_isa = -1;  /* -1: not chosen yet */

static const realm_isa_ops *table_for(int isa) {
#ifdef REALM_X86
    if (isa == REALM_ISA_AVX512) return &realm_ops_avx512;
    if (isa == REALM_ISA_AVX2) return &realm_ops_avx2;
#endif
    (void)isa;
    return &realm_ops_scalar;
}

int realm_isa_detected(void) {
    static atomic_int detected = -1;
    int d = atomic_load(&detected);
    if (d < 0) {
        d = detect_isa();
        atomic_store(&detected, d);
    }
    return d;
}

int realm_isa_active(void) {
    int a = atomic_load(&active_isa);
    if (a < 0) {
        a = realm_isa_detected();
        atomic_store(&active_isa, a);
    }
    return a;
}

int realm_isa_set(int isa) {
    if (isa < REALM_ISA_SCALAR || isa > REALM_ISA_AVX512) return REALM_EINVAL;
    if (isa > realm_isa_detected()) return REALM_EUNSUPPORTED;
    atomic_store(&active_isa, isa);
    return REALM_OK;
}

const realm_isa_ops *realm_ops(void) { return table_for(realm_isa_active()); }

// --- block formats ----------------------------------------------------------------------

void realm_quantize_row_q8_0(block_q8_0 *out, const float *x, int64_t nb);
void realm_quantize_row_q4_0(block_q4_0 *out, const float *x, int64_t nb);
void realm_dequantize_row_q8_0(float *out, const block_q8_0 *b, int64_t nb);
void realm_dequantize_row_q4_0(float *out, const block_q4_0 *b, int64_t nb);

int64_t realm_type_block_elems(int type) {
    switch (type) {
    case REALM_TYPE_F32: case REALM_TYPE_F16: case REALM_TYPE_BF16: return 1;
    case REALM_TYPE_Q8_0: case REALM_TYPE_Q4_0: return QK;
    default: return realm_other_block_elems(type);
    }
}

int64_t realm_type_block_bytes(int type) {
    switch (type) {
    case REALM_TYPE_F32: return 4;
    case REALM_TYPE_F16: case REALM_TYPE_BF16: return 2;
    case REALM_TYPE_Q8_0: return (int64_t)sizeof(block_q8_0);
    case REALM_TYPE_Q4_0: return (int64_t)sizeof(block_q4_0);
    default: return realm_other_block_bytes(type);
    }
}

int64_t realm_row_bytes(int type, int64_t n) {
    const int64_t be = realm_type_block_elems(type);
    if (be < 0 || n < 0 || n % be != 0) return REALM_EINVAL;
    const int64_t bb = realm_type_block_bytes(type);
    if (n / be > INT64_MAX / bb) return REALM_EINVAL;
    return n / be * bb;
}

int realm_quantize(void *out, int type, const float *x, int64_t n) {
    if (!out || !x || realm_row_bytes(type, n) < 0) return REALM_EINVAL;
    if (realm_is_other_quant(type)) return REALM_EUNSUPPORTED;  /* read, never written */
    switch (type) {
    case REALM_TYPE_F32: memcpy(out, x, (size_t)n * 4); break;
    case REALM_TYPE_F16:
        for (int64_t i = 0; i < n; i++) ((uint16_t *)out)[i] = realm_f32_to_f16(x[i]);
        break;
    case REALM_TYPE_BF16:
        for (int64_t i = 0; i < n; i++) ((uint16_t *)out)[i] = realm_f32_to_bf16(x[i]);
        break;
    case REALM_TYPE_Q8_0: realm_quantize_row_q8_0(out, x, n / QK); break;
    case REALM_TYPE_Q4_0: realm_quantize_row_q4_0(out, x, n / QK); break;
    }
    return REALM_OK;
}

/* Dequantize n elements of type from src into out; shared with get_rows. */
void realm_dequantize_row(float *out, const void *src, int type, int64_t n) {
    switch (type) {
    case REALM_TYPE_F32: memcpy(out, src, (size_t)n * 4); break;
    case REALM_TYPE_F16:
        for (int64_t i = 0; i < n; i++) out[i] = realm_f16_to_f32(((const uint16_t *)src)[i]);
        break;
    case REALM_TYPE_BF16:
        for (int64_t i = 0; i < n; i++) out[i] = realm_bf16_to_f32(((const uint16_t *)src)[i]);
        break;
    case REALM_TYPE_Q8_0: realm_dequantize_row_q8_0(out, src, n / QK); break;
    case REALM_TYPE_Q4_0: realm_dequantize_row_q4_0(out, src, n / QK); break;
    default: realm_dequantize_other(out, src, type, n); break;
    }
}

int realm_dequantize(float *out, const void *src, int type, int64_t n) {
    if (!out || !src || realm_row_bytes(type, n) < 0) return REALM_EINVAL;
    realm_dequantize_row(out, src, type, n);
    return REALM_OK;
}

// --- machine limits -----------------------------------------------------------------------

typedef struct {
    const uint64_t *buf;
    int64_t n_words;
    _Atomic uint64_t sink;
} bw_ctx;

static void bw_task(void *p, int ith, int nth) {
    bw_ctx *c = p;
    int64_t b, e;
    realm_split(c->n_words / 8, ith, nth, &b, &e);
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    for (int64_t i = b * 8; i < e * 8; i += 8) {  /* independent chains: loads are the limit */
        a0 ^= c->buf[i]; a1 ^= c->buf[i + 1]; a2 ^= c->buf[i + 2]; a3 ^= c->buf[i + 3];
        a4 ^= c->buf[i + 4]; a5 ^= c->buf[i + 5]; a6 ^= c->buf[i + 6]; a7 ^= c->buf[i + 7];
    }
    atomic_fetch_xor(&c->sink, a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7);
}

#include <time.h>
static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int realm_read_bandwidth(double *seconds, const void *buf, int64_t n_bytes, int32_t iters) {
    if (!seconds || !buf || n_bytes < 64 || iters < 1 || ((uintptr_t)buf & 7u)) return REALM_EINVAL;
    bw_ctx c = {.buf = buf, .n_words = n_bytes / 8};
    double best = 1e300;
    for (int32_t it = 0; it < iters; it++) {
        const double t0 = now_seconds();
        int rc = realm_parallel(bw_task, &c, 0);
        if (rc != REALM_OK) return rc;
        const double dt = now_seconds() - t0;
        if (dt < best) best = dt;
    }
    *seconds = best;
    return REALM_OK;
}
