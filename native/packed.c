/* Realm native kernels: interleaved weight panels of Q8_0 / Q4_0 weights (kernels.h,
 * "interleaved weight panels"), and their portable product.
 *
 * The integer GEMM (gemm_q8_avx512.c) multiplies 16 weight rows at once: one vpdpbusd takes a
 * 4-byte group of each of the 16 rows against one broadcast 4-byte group of an activation row.
 * Laid out as GGUF stores them the rows' groups are 16 row lengths apart, so the GEMM used to
 * repack every panel on every call: at the batch sizes of batched decode (5 .. 16 rows) that
 * packing cost as much as the products (30% of a TinyLlama-shaped 8-row step on a Zen 4). A
 * model's resident weights are now packed once, at load, into that layout:
 *
 *   panel p (rows 16p .. 16p + 15; missing rows of the last panel are zero, scale 0), nb
 *   blocks of 32 columns, nb x (CB + 32) bytes, in pairs of blocks: the 16 rows' fp16 scales
 *   of block 2k (32 bytes) and of block 2k + 1, then the codes of block 2k (CB bytes) and of
 *   block 2k + 1 (an odd last block: its scales, 32 bytes of zeros, its codes). One sequential
 *   stream per panel, every 64-byte load aligned (the panel's start is when nb is even).
 *   A block's codes:
 *     Q8_0 (CB = 512): 8 groups of 64 bytes; group g holds bytes 4g .. 4g + 3 of rows 0 .. 15
 *       (elements 4g .. 4g + 3), each code plus 128 (an unsigned byte; vpdpbusd's unsigned
 *       operand);
 *     Q4_0 (CB = 256): 4 chunks of 64 bytes; chunk k holds bytes 4k .. 4k + 3 of rows 0 .. 15
 *       as stored (low nibbles: elements 4k .. 4k + 3, high nibbles: elements 16 + 4k ..),
 *       unpacked by the kernel with a mask and a shift.
 *   The same bytes as the GGUF rows (16 x 34 / 16 x 18 per block of 16 rows; 32 more per
 *   panel when nb is odd), so a packed model reads as much memory per token as before.
 *
 * The product (here and in the levels' kernels): activations quantized per 32 to int8 with the
 * numerics of every level (scale amax / 127, round to nearest even), each block's integer dot
 * taken exactly (the codes' offset, 128 or 8, comes back as -offset * sum(q)), then per block
 * in column order y += (float)dot * (d_w * d_x) as one fused multiply-add. So each output
 * element is computed by the same operations whatever the batch, the tile or the thread
 * count: packed products are exact in the sense of realm_matmul_rowwise.
 */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

#define PR REALM_PACK_ROWS

/* code bytes per block of a panel; < 0 if the type has no packed form */
int64_t realm_packed_code_bytes(int wtype) {
    return wtype == REALM_TYPE_Q8_0 ? 512 : wtype == REALM_TYPE_Q4_0 ? 256 : -1;
}

int64_t realm_packed_bytes(int wtype, int64_t n_rows, int64_t n_cols) {
    const int64_t cb = realm_packed_code_bytes(wtype);
    if (cb < 0 || n_rows <= 0 || n_cols <= 0 || n_cols % QK != 0) return REALM_EINVAL;
    const int64_t panels = (n_rows + PR - 1) / PR, per = realm_packed_panel_bytes(n_cols / QK, cb);
    if (per > INT64_MAX / panels) return REALM_EINVAL;
    return panels * per;
}

int realm_pack_preferred(void) { return realm_ops()->matmul_packed != NULL; }

typedef struct {
    uint8_t *out;
    const uint8_t *w;
    int wtype;
    int64_t n_rows, nb, stride;
} pack_ctx;

static void pack_task(void *p, int ith, int nth) {
    const pack_ctx *c = p;
    const int64_t cb = realm_packed_code_bytes(c->wtype), panels = (c->n_rows + PR - 1) / PR;
    const int64_t bb = realm_type_block_bytes(c->wtype);
    const uint32_t bias = c->wtype == REALM_TYPE_Q8_0 ? 0x80808080u : 0;
    int64_t p0, p1;
    realm_split(panels, ith, nth, &p0, &p1);
    for (int64_t pi = p0; pi < p1; pi++) {
        const int64_t pb = realm_packed_panel_bytes(c->nb, cb);
        uint8_t *panel = c->out + pi * pb;
        const int rows = c->n_rows - pi * PR < PR ? (int)(c->n_rows - pi * PR) : PR;
        if (rows < PR || c->nb % 2) memset(panel, 0, (size_t)pb);  /* missing rows, padding */
        for (int r = 0; r < rows; r++) {
            const uint8_t *row = c->w + (pi * PR + r) * c->stride;
            for (int64_t i = 0; i < c->nb; i++) {
                const uint8_t *blk = row + i * bb;
                uint8_t *o = panel + realm_packed_codes_at(i, cb) + 4 * r;
                memcpy(panel + realm_packed_scales_at(i, cb) + 2 * r, blk, 2);
                for (int64_t g = 0; g < cb / 64; g++) {  /* a row's 4-byte group at a time */
                    uint32_t v;
                    memcpy(&v, blk + 2 + 4 * g, 4);
                    v ^= bias;
                    memcpy(o + g * 64, &v, 4);
                }
            }
        }
    }
}

int realm_pack(void *out, const void *w, int wtype, int64_t n_rows, int64_t n_cols,
               int64_t row_stride) {
    if (!out || !w || realm_packed_bytes(wtype, n_rows, n_cols) < 0) return REALM_EINVAL;
    if (row_stride < realm_row_bytes(wtype, n_cols)) return REALM_EINVAL;
    pack_ctx c = {.out = out, .w = w, .wtype = wtype, .n_rows = n_rows, .nb = n_cols / QK,
                  .stride = row_stride};
    return realm_parallel(pack_task, &c, 0);
}

/* ---- the portable product ---- */

/* row b's activations quantized per 32 (the numerics of quantize_row in gemm_q8_avx512.c) */
void realm_packed_quantize(realm_pq8 *out, const float *src, int64_t nb, int32_t off) {
    for (int64_t i = 0; i < nb; i++) {
        const float *v = src + i * QK;
        float amax = 0.0f;
        for (int e = 0; e < QK; e++) amax = fmaxf(amax, fabsf(v[e]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int32_t sum = 0;
        for (int e = 0; e < QK; e++) {
            float q = nearbyintf(v[e] * id);
            q = q > 127.0f ? 127.0f : q < -128.0f ? -128.0f : q;
            out[i].q[e] = (int8_t)q;
            sum += out[i].q[e];
        }
        out[i].d = d;
        out[i].corr = -off * sum;
    }
}

typedef struct {
    float *y;
    const uint8_t *w;
    const realm_pq8 *xq;
    int wtype;
    int64_t n_rows, nb, batch;
} ref_ctx;

static void ref_task(void *p, int ith, int nth) {
    const ref_ctx *c = p;
    const int64_t cb = realm_packed_code_bytes(c->wtype), panels = (c->n_rows + PR - 1) / PR;
    const int q4 = c->wtype == REALM_TYPE_Q4_0;
    int64_t p0, p1;
    realm_split(panels, ith, nth, &p0, &p1);
    for (int64_t pi = p0; pi < p1; pi++) {
        const uint8_t *panel = c->w + pi * realm_packed_panel_bytes(c->nb, cb);
        for (int r = 0; r < PR && pi * PR + r < c->n_rows; r++) {
            for (int64_t b = 0; b < c->batch; b++) {
                const realm_pq8 *x = c->xq + b * c->nb;
                float acc = 0.0f;
                for (int64_t i = 0; i < c->nb; i++) {
                    const uint8_t *o = panel + realm_packed_codes_at(i, cb) + 4 * r;
                    int32_t dot = x[i].corr;
                    for (int e = 0; e < QK; e++) {
                        /* element e: group e / 4 (Q8_0); Q4_0: chunk (e % 16) / 4, high
                         * nibble from element 16 on */
                        const int u = q4 ? (o[(e % 16) / 4 * 64 + e % 4] >> (e < 16 ? 0 : 4)) & 15
                                         : o[e / 4 * 64 + e % 4];
                        dot += u * x[i].q[e];
                    }
                    uint16_t h;
                    memcpy(&h, panel + realm_packed_scales_at(i, cb) + 2 * r, 2);
                    acc = fmaf((float)dot, realm_f16_to_f32(h) * x[i].d, acc);
                }
                c->y[b * c->n_rows + pi * PR + r] = acc;
            }
        }
    }
}

int realm_matmul_packed_ref(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                            int64_t n_cols, int64_t batch) {
    const int64_t nb = n_cols / QK;
    if ((uint64_t)nb > (SIZE_MAX / sizeof(realm_pq8)) / (uint64_t)batch) return REALM_ENOMEM;
    realm_pq8 *xq = malloc((size_t)(batch * nb) * sizeof(realm_pq8));
    if (!xq) return REALM_ENOMEM;
    const int32_t off = wtype == REALM_TYPE_Q8_0 ? 128 : 8;
    for (int64_t b = 0; b < batch; b++) realm_packed_quantize(xq + b * nb, x + b * n_cols, nb, off);
    ref_ctx c = {.y = y, .w = w, .xq = xq, .wtype = wtype, .n_rows = n_rows, .nb = nb,
                 .batch = batch};
    const int rc = realm_parallel(ref_task, &c, 0);
    free(xq);
    return rc;
}
