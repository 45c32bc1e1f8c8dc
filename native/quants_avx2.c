/* Realm native kernels: quants_dot.inc built with AVX2 + FMA (x86 only), for the AVX2 and
 * AVX-512 tables; the compiler vectorizes the unpackers and the integer dots. */
#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define DOT_SUFFIX avx2
#include "quants_dot.inc"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
