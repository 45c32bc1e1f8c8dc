/* Realm native kernels: quants_dot.inc built with AVX2 + FMA (x86 only), for the AVX2 and
 * AVX-512 tables; the compiler vectorizes the unpackers and the integer dots. */
#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#define DOT_SUFFIX avx2
#define DOT_TARGET REALM_AVX2  /* on every function of the .inc */
#include "quants_dot.inc"
#endif
