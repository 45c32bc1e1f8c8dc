/* Realm native kernels: Q8_0 / Q4_0 weights times a large batch of activation rows, AVX-512
 * VNNI (x86 only). The prefill path of realm_matmul for weights in the file's layout (batch >=
 * gemm_q_min_batch), and, at the end, the product of interleaved weight panels (packed.c),
 * which reads panels packed once at load with the same register tile, at every batch size.
 *
 * The row-streaming dots (avx512.c) take one weight block pair against up to 8 activation
 * rows and reduce horizontally at the end; here the weights of 16 output rows are interleaved
 * so that one vpdpbusd computes a 4-byte partial dot for 16 rows at once against a broadcast
 * 4-byte group of one activation row. After a block's 8 groups the 16 int32 lanes are the 16
 * rows' block dots for that activation row: converted, scaled by (16 weight scales) x (the
 * activation block's scale) and added into a 16-row float accumulator with one FMA. No
 * horizontal reductions; y[b, r0 .. r0 + 15] is one 64-byte store.
 *
 * Operands: vpdpbusd multiplies unsigned by signed bytes and only the signed operand can be an
 * embedded {1to16} broadcast from memory, so here the weights are the unsigned side: Q4_0
 * nibbles as they are (q in 0..15, value q - 8), Q8_0 codes plus 128 (0..255). Activations
 * are signed q; the offset comes back with an int32 correction per activation block,
 * -off * sum(q), which starts the accumulator (off = 8 for Q4_0, 128 for Q8_0).
 *
 * Layouts, made per call:
 *   activations: (batch, nb) records of 40 bytes {int32 corr; float d; int8 q[32]} (q8b);
 *     quantized with the same numerics as the other levels (scale amax / 127, round to
 *     nearest even), so results agree with the row-streaming path to rounding order;
 *   weights: a panel of 16 rows x KC blocks is packed at a time (like a GEMM packs B), each
 *     block 576 bytes: 8 x 64 bytes, group g holding elements 4g..4g+3 of rows 0..15 as
 *     unsigned bytes, then the 16 rows' scales as floats. Missing rows of the last panel are
 *     zeros with scale 0, and their outputs are not stored.
 *
 * Loops, per pool thread: panels of 16 weight rows are handed out from an atomic counter; for
 * each, KC blocks at a time are packed (36 KiB, L1-sized) and multiplied into every
 * batch row, NA rows per register tile (16 x NA floats); y is taken up again for the next KC.
 * Each output element is summed block by block in order whatever the thread count, so results
 * do not depend on it.
 */
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define INLINE REALM_AVX512_VNNI static inline __attribute__((always_inline))

#define PR 16            /* weight rows per panel: one zmm of int32 lanes */
#define KC 64            /* blocks per packed panel: 64 x 576 B = 36 KiB, mostly in L1 */
#define NA 8             /* activation rows per register tile */
#define WBLK 576         /* packed bytes per block of a panel: 8 x 64 groups + 16 floats */
#define XREC 40          /* bytes per quantized activation block */

/* ---- activations ---- */

typedef struct {
    int32_t corr;  /* -off * sum(q) */
    float d;       /* scale */
    int8_t q[QK];
} q8b;
_Static_assert(sizeof(q8b) == XREC && sizeof(q8b) == sizeof(realm_pq8), "q8b is 40 bytes");

REALM_AVX512_VNNI
static void quantize_row(q8b *out, const float *src, int64_t nb, int32_t off) {
    for (int64_t i = 0; i < nb; i++) {
        const float *v = src + i * QK;
        const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float d = amax / 127.0f;
        const __m512 id = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
        const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
        _mm_storeu_si128((__m128i *)out[i].q, _mm512_cvtsepi32_epi8(i0));
        _mm_storeu_si128((__m128i *)(out[i].q + 16), _mm512_cvtsepi32_epi8(i1));
        out[i].d = d;
        out[i].corr = -off * _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    }
}

/* ---- weights ---- */

/* In-lane 4 x 4 transpose of dwords: lane L of z[a] holds dwords 0..3 of row 4L + a; on return
 * lane L of g[k] holds dword k of rows 4L .. 4L + 3, i.e. g[k] is group k of all 16 rows. */
INLINE void transpose4(const __m512i z[4], __m512i g[4]) {
    const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
    g[0] = _mm512_unpacklo_epi64(t0, t2);
    g[1] = _mm512_unpackhi_epi64(t0, t2);
    g[2] = _mm512_unpacklo_epi64(t1, t3);
    g[3] = _mm512_unpackhi_epi64(t1, t3);
}

/* rows 4L + a (L = 0..3) of 16 bytes each at q + (4L + a) * rb -> one zmm */
INLINE __m512i gather4(const uint8_t *q, int64_t rb) {
    __m512i z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)q));
    z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(q + 4 * rb)), 1);
    z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(q + 8 * rb)), 2);
    return _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(q + 12 * rb)), 3);
}

/* the 16 rows' fp16 scales (the first two bytes of each block at q + r * rb) as floats */
INLINE __m512 scales16(const uint8_t *q, int64_t rb, __m512i idx, int gather) {
    if (gather) {  /* the dword at each block's start: its scale and two code bytes */
        const __m512i v = _mm512_i32gather_epi32(idx, (const void *)q, 1);
        return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
    }
    uint16_t h[PR];
    for (int r = 0; r < PR; r++) memcpy(&h[r], q + r * rb, 2);
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
}

/* Pack kc blocks of 16 rows (row r's first block at src + r * rb) into dst (kc x WBLK bytes). */
REALM_AVX512_VNNI
static void pack_panel(uint8_t *dst, const uint8_t *src, int64_t rb, int wtype, int64_t kc) {
    const int gather = 15 * rb <= INT32_MAX - 4;
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(gather ? (int32_t)rb : 0));
    if (wtype == REALM_TYPE_Q8_0) {
        const __m512i bias = _mm512_set1_epi8((char)0x80);
        for (int64_t i = 0; i < kc; i++) {
            const uint8_t *q = src + i * (int64_t)sizeof(block_q8_0);
            uint8_t *o = dst + i * WBLK;
            for (int h = 0; h < 2; h++) {  /* elements 16h .. 16h + 15: groups 4h .. 4h + 3 */
                __m512i z[4], g[4];
                for (int a = 0; a < 4; a++) z[a] = _mm512_xor_si512(gather4(q + a * rb + 2 + 16 * h, rb), bias);
                transpose4(z, g);
                for (int k = 0; k < 4; k++) _mm512_store_si512((void *)(o + (4 * h + k) * 64), g[k]);
            }
            _mm512_store_ps((float *)(o + 512), scales16(q, rb, idx, gather));
        }
    } else {
        const __m512i lo4 = _mm512_set1_epi8(0x0f);
        for (int64_t i = 0; i < kc; i++) {
            const uint8_t *q = src + i * (int64_t)sizeof(block_q4_0);
            uint8_t *o = dst + i * WBLK;
            __m512i zl[4], zh[4], g[4];
            for (int a = 0; a < 4; a++) {
                const __m512i z = gather4(q + a * rb + 2, rb);
                zl[a] = _mm512_and_si512(z, lo4);                         /* elements 0..15 */
                zh[a] = _mm512_and_si512(_mm512_srli_epi16(z, 4), lo4);   /* elements 16..31 */
            }
            transpose4(zl, g);
            for (int k = 0; k < 4; k++) _mm512_store_si512((void *)(o + k * 64), g[k]);
            transpose4(zh, g);
            for (int k = 0; k < 4; k++) _mm512_store_si512((void *)(o + (4 + k) * 64), g[k]);
            _mm512_store_ps((float *)(o + 512), scales16(q, rb, idx, gather));
        }
    }
}

/* ---- the register tile: 16 weight rows x n activation rows over kc blocks ---- */

/* a += w (unsigned bytes) . the dword at p broadcast (signed bytes). The broadcast is folded
 * into the instruction ({1to16}); written as intrinsics, GCC issues a separate vpbroadcastd
 * load per product (about 10% slower). */
#define DPBUSD_BCST(a, w, p) \
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(a) : "v"(w), "m"(*(const int32_t *)(p)))

INLINE int32_t load_i32(const void *p) { int32_t v; memcpy(&v, p, 4); return v; }
INLINE float load_f32(const void *p) { float v; memcpy(&v, p, 4); return v; }

/* f + (block w's 16 rows dotted with the activation record at xb) x dw x its scale: per block
 * 8 vpdpbusd in two chains (the first starting at the record's correction), then convert,
 * scale and accumulate; the one block step of tile() and ptile() */
INLINE __m512 block_row(__m512 f, const __m512i w[8], __m512 dw, const uint8_t *xb) {
    __m512i a0 = _mm512_set1_epi32(load_i32(xb)), a1 = _mm512_setzero_si512();
    for (int g = 0; g < 8; g += 2) {
        DPBUSD_BCST(a0, w[g], xb + 8 + 4 * g);
        DPBUSD_BCST(a1, w[g + 1], xb + 12 + 4 * g);
    }
    const __m512 s = _mm512_mul_ps(dw, _mm512_set1_ps(load_f32(xb + 4)));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1)), s, f);
}

/* y[j * ldy + r] for j < n, r < 16 (mask m) (+)= packed panel . x rows j; the x rows are xs
 * bytes apart, each starting at the panel's first block. Per block and activation row: 8
 * vpdpbusd in two chains (the first starting at the correction), then convert, scale and
 * accumulate. The float work shares the vector pipes with vpdpbusd: at 8 products per 3 float
 * operations this is about 70% of vpdpbusd's peak, the bound of this scheme. */
INLINE void tile(float *y, int64_t ldy, __mmask16 m, int accumulate, const uint8_t *wp,
                 const uint8_t *x, int64_t xs, int64_t kc, const int n) {
    __m512 f[NA];
    for (int j = 0; j < n; j++)
        f[j] = accumulate ? _mm512_maskz_loadu_ps(m, y + j * ldy) : _mm512_setzero_ps();
    for (int64_t i = 0; i < kc; i++) {
        const uint8_t *wb = wp + i * WBLK;
        __m512i w[8];
        for (int g = 0; g < 8; g++) w[g] = _mm512_load_si512((const void *)(wb + g * 64));
        const __m512 dw = _mm512_load_ps((const float *)(wb + 512));
        for (int j = 0; j < n; j++) f[j] = block_row(f[j], w, dw, x + j * xs + i * XREC);
    }
    for (int j = 0; j < n; j++) _mm512_mask_storeu_ps(y + j * ldy, m, f[j]);
}

/* Every batch row against a packed panel, NA at a time, prefetching for the next packing
 * between tiles. */
REALM_AVX512_VNNI
static void tiles(float *y, int64_t ldy, __mmask16 m, int accumulate, const uint8_t *wp,
                  const uint8_t *x, int64_t xs, int64_t kc, int64_t batch, realm_prefetcher *pf) {
    const int64_t per = realm_pf_lines(pf) / ((batch + NA - 1) / NA) + 1;
    int64_t b = 0;
    for (; b + NA <= batch; b += NA) {
        realm_pf_step(pf, per);
        tile(y + b * ldy, ldy, m, accumulate, wp, x + b * xs, xs, kc, NA);
    }
    realm_pf_step(pf, per);
    float *yb = y + b * ldy;
    const uint8_t *xb = x + b * xs;
    switch (batch - b) {
    case 1: tile(yb, ldy, m, accumulate, wp, xb, xs, kc, 1); break;
    case 2: tile(yb, ldy, m, accumulate, wp, xb, xs, kc, 2); break;
    case 3: tile(yb, ldy, m, accumulate, wp, xb, xs, kc, 3); break;
    case 4: tile(yb, ldy, m, accumulate, wp, xb, xs, kc, 4); break;
    case 5: tile(yb, ldy, m, accumulate, wp, xb, xs, kc, 5); break;
    case 6: tile(yb, ldy, m, accumulate, wp, xb, xs, kc, 6); break;
    case 7: tile(yb, ldy, m, accumulate, wp, xb, xs, kc, 7); break;
    default: break;
    }
}

/* ---- the call ---- */

typedef struct {
    float *y;
    const uint8_t *w;
    const float *x;
    q8b *xq;
    int wtype;
    int64_t n_rows, nb, batch, row_bytes;
    atomic_int_fast64_t next;  /* next unclaimed panel (packed: run of panels) */
} gq_ctx;

REALM_AVX512_VNNI
static void quant_task(void *p, int ith, int nth) {
    gq_ctx *c = p;
    int64_t b0, b1;
    realm_split(c->batch, ith, nth, &b0, &b1);
    const int32_t off = c->wtype == REALM_TYPE_Q8_0 ? 128 : 8;
    for (int64_t b = b0; b < b1; b++) quantize_row(c->xq + b * c->nb, c->x + b * c->nb * QK, c->nb, off);
}

REALM_AVX512_VNNI
static void panel_task(void *p, int ith, int nth) {
    gq_ctx *c = p;
    (void)ith;
    (void)nth;
    const int64_t bb = c->wtype == REALM_TYPE_Q8_0 ? (int64_t)sizeof(block_q8_0) : (int64_t)sizeof(block_q4_0);
    /* the packed panel, then room for a copy of a short last panel's rows, zero-padded */
    uint8_t *wp = aligned_alloc(64, KC * WBLK + PR * KC * bb);
    if (!wp) return;  /* the other threads take the panels; the caller checks all were done */
    uint8_t *pad = wp + KC * WBLK;
    const int64_t n_panels = (c->n_rows + PR - 1) / PR, xs = c->nb * XREC, rb = c->row_bytes;
    realm_prefetcher pf;
    int64_t pi = atomic_fetch_add(&c->next, 1);
    while (pi < n_panels) {
        const int64_t r0 = pi * PR;
        const int nr = c->n_rows - r0 < PR ? (int)(c->n_rows - r0) : PR;
        const __mmask16 m = (__mmask16)((1u << nr) - 1u);
        int64_t next = pi;
        for (int64_t k0 = 0; k0 < c->nb; k0 += KC) {
            const int64_t kc = c->nb - k0 < KC ? c->nb - k0 : KC;
            /* what the next packing reads: this panel's next blocks or the next panel's first */
            if (k0 + kc < c->nb) {
                const int64_t kn = c->nb - k0 - kc < KC ? c->nb - k0 - kc : KC;
                realm_pf_start(&pf, c->w + r0 * rb + (k0 + kc) * bb, nr, rb, kn * bb);
            } else {
                next = atomic_fetch_add(&c->next, 1);  /* claimed now, to be fetched ahead */
                const int64_t kn = c->nb < KC ? c->nb : KC;
                const int nrn = c->n_rows - next * PR < PR ? (int)(c->n_rows - next * PR) : PR;
                realm_pf_start(&pf, next < n_panels ? c->w + next * PR * rb : NULL, nrn, rb, kn * bb);
            }
            const uint8_t *src = c->w + r0 * rb + k0 * bb;
            int64_t srb = rb;
            if (nr < PR) {  /* a short last panel: its rows, then zeros (scale 0) */
                srb = kc * bb;
                for (int r = 0; r < nr; r++) memcpy(pad + r * srb, src + r * rb, (size_t)srb);
                memset(pad + nr * srb, 0, (size_t)((PR - nr) * srb));
                src = pad;
            }
            pack_panel(wp, src, srb, c->wtype, kc);
            tiles(c->y + r0, c->n_rows, m, k0 > 0, wp, (const uint8_t *)(c->xq + k0), xs, kc,
                  c->batch, &pf);
        }
        pi = next;
    }
    free(wp);
}

/* ---- interleaved weight panels (packed.c): the same tile, reading the panels in place ---- */

/* ptile: tile() over blocks k0 .. k0 + kc of a packed panel (packed.c: pairs of blocks, their
 * scales first; q4: Q4_0's nibbles, unpacked here once for the n activation rows). The
 * per-element operations are tile()'s, block by block in column order: exact whatever the
 * batch. pf (or NULL): where to prefetch, moving through the panel as its blocks are read. */
INLINE void ptile(float *y, int64_t ldy, __mmask16 m, int accumulate, const uint8_t *panel,
                  int64_t k0, const int q4, const uint8_t *x, int64_t xs, int64_t kc,
                  const int n, const uint8_t *pf) {
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    const int64_t cb = q4 ? 256 : 512, rec = cb + 2 * PR;  /* panel bytes per block */
    __m512 f[NA];
    for (int j = 0; j < n; j++)
        f[j] = accumulate ? _mm512_maskz_loadu_ps(m, y + j * ldy) : _mm512_setzero_ps();
    for (int64_t i = 0; i < kc; i++) {
        if (pf)
            for (int64_t off = 0; off < rec; off += 64) _mm_prefetch((const char *)pf + i * rec + off, _MM_HINT_T0);
        const int64_t blk = k0 + i;
        const uint8_t *wb = panel + realm_packed_codes_at(blk, cb);
        __m512i w[8];
        if (q4) {
            for (int k = 0; k < 4; k++) {
                const __m512i v = _mm512_loadu_si512((const void *)(wb + k * 64));
                w[k] = _mm512_and_si512(v, lo4);
                w[k + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
            }
        } else {
            for (int g = 0; g < 8; g++) w[g] = _mm512_loadu_si512((const void *)(wb + g * 64));
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(panel + realm_packed_scales_at(blk, cb))));
        for (int j = 0; j < n; j++) f[j] = block_row(f[j], w, dw, x + j * xs + i * XREC);
    }
    for (int j = 0; j < n; j++) _mm512_mask_storeu_ps(y + j * ldy, m, f[j]);
}

#define PTILE(nn)                                                                                 \
    (q4 ? ptile(yb, ldy, m, acc, panel, k0, 1, xb, xs, kc, nn, pfb)                               \
        : ptile(yb, ldy, m, acc, panel, k0, 0, xb, xs, kc, nn, pfb))

REALM_AVX512_VNNI
static void ptiles(float *y, int64_t ldy, __mmask16 m, int acc, const uint8_t *panel,
                   int64_t k0, int q4, const uint8_t *x, int64_t xs, int64_t kc,
                   int64_t batch, const uint8_t *pf) {
    for (int64_t b = 0; b < batch; b += NA) {
        float *yb = y + b * ldy;
        const uint8_t *xb = x + b * xs;
        const uint8_t *pfb = b == 0 ? pf : NULL;  /* the first tile reads from memory */
        switch (batch - b < NA ? (int)(batch - b) : NA) {
        case 1: PTILE(1); break;
        case 2: PTILE(2); break;
        case 3: PTILE(3); break;
        case 4: PTILE(4); break;
        case 5: PTILE(5); break;
        case 6: PTILE(6); break;
        case 7: PTILE(7); break;
        default: PTILE(NA); break;
        }
    }
}
#undef PTILE

REALM_AVX512_VNNI
static void packed_task(void *p, int ith, int nth) {
    gq_ctx *c = p;
    (void)ith;
    const int64_t cb = realm_packed_code_bytes(c->wtype), nb = c->nb, xs = nb * XREC;
    const int64_t n_panels = (c->n_rows + PR - 1) / PR, pb = realm_packed_panel_bytes(nb, cb);
    /* a batch of at most one tile reads each block once: no need to keep chunks in L1 */
    const int64_t kcmax = c->batch <= NA ? nb : KC, rec = cb + 2 * PR;
    const uint8_t *w_end = c->w + n_panels * pb;
    realm_panel_runs runs = realm_panel_runs_of(n_panels, nth);
    for (int64_t pi; (pi = realm_panel_runs_next(&runs, &c->next)) >= 0;) {
        const int64_t r0 = pi * PR;
        const int nr = c->n_rows - r0 < PR ? (int)(c->n_rows - r0) : PR;
        const __mmask16 m = (__mmask16)((1u << nr) - 1u);
        const uint8_t *panel = c->w + pi * pb;
        for (int64_t k0 = 0; k0 < nb; k0 += kcmax) {
            const int64_t kc = nb - k0 < kcmax ? nb - k0 : kcmax;
            const uint8_t *pf = panel + k0 * rec + REALM_PACKED_PF_AHEAD;
            ptiles(c->y + r0, c->n_rows, m, k0 > 0, panel, k0, c->wtype == REALM_TYPE_Q4_0,
                   (const uint8_t *)(c->xq + k0), xs, kc, c->batch, pf < w_end ? pf : NULL);
        }
    }
}

REALM_AVX512_VNNI
int realm_matmul_packed_avx512(float *y, const void *w, int wtype, const float *x,
                               int64_t n_rows, int64_t n_cols, int64_t batch) {
    const int64_t nb = n_cols / QK;
    if ((uint64_t)nb > (SIZE_MAX / XREC) / (uint64_t)batch) return REALM_ENOMEM;
    gq_ctx c = {.y = y, .w = w, .x = x, .wtype = wtype, .n_rows = n_rows, .nb = nb,
                .batch = batch};
    c.xq = aligned_alloc(64, ((size_t)(batch * nb) * XREC + 63) / 64 * 64);
    if (!c.xq) return REALM_ENOMEM;
    atomic_store(&c.next, 0);
    /* a few rows quantize faster on this thread than the pool wakes */
    int rc = realm_parallel(quant_task, &c, batch >= 8 ? 0 : 1);
    if (rc == REALM_OK) rc = realm_parallel(packed_task, &c, 0);
    free(c.xq);
    return rc;
}

REALM_AVX512_VNNI
int realm_gemm_q8_avx512(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                         int64_t n_cols, int64_t batch) {
    if (wtype != REALM_TYPE_Q8_0 && wtype != REALM_TYPE_Q4_0) return REALM_EINVAL;
    const int64_t nb = n_cols / QK;
    if ((uint64_t)nb > (SIZE_MAX / XREC) / (uint64_t)batch) return REALM_ENOMEM;
    gq_ctx c = {.y = y, .w = w, .x = x, .wtype = wtype, .n_rows = n_rows, .nb = nb,
                .batch = batch, .row_bytes = realm_row_bytes(wtype, n_cols)};
    c.xq = aligned_alloc(64, ((size_t)(batch * nb) * XREC + 63) / 64 * 64);
    if (!c.xq) return REALM_ENOMEM;
    atomic_store(&c.next, 0);
    int rc = realm_parallel(quant_task, &c, 0);
    if (rc == REALM_OK) rc = realm_parallel(panel_task, &c, 0);
    free(c.xq);
    if (rc == REALM_OK && atomic_load(&c.next) < (n_rows + PR - 1) / PR) rc = REALM_ENOMEM;
    return rc;
}
#endif
