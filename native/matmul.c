/* Realm native kernels: y = W x for a batch of activation rows.
 *
 * Rows of W are handed out to pool threads in chunks from a shared counter (the machines are
 * shared and noisy; dynamic chunks keep a slow core from holding up the step). Each thread
 * takes one weight row and multiplies it with every activation row before moving on, so the
 * weights stream from memory once per call whatever the batch size: batched decode across
 * tenants costs about the same memory traffic as one sequence.
 */
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"

typedef struct {
    float *y;
    const uint8_t *w;
    int wtype;
    const float *x;
    const block_q8x *xq;       /* quantized activations (quantized weights only) */
    int64_t n_rows, n_cols, batch;
    int64_t row_bytes;
    int64_t chunk;             /* rows per work item */
    atomic_int_fast64_t next;  /* next unclaimed row */
    const realm_isa_ops *ops;
} mm_ctx;

static void mm_rows(const mm_ctx *c, int64_t r0, int64_t r1) {
    const realm_isa_ops *ops = c->ops;
    const int64_t nb = c->n_cols / QK;
    for (int64_t r = r0; r < r1; r++) {
        const void *row = c->w + r * c->row_bytes;
        for (int64_t b = 0; b < c->batch; b++) {
            const float *xb = c->x + b * c->n_cols;
            float v;
            switch (c->wtype) {
            case REALM_TYPE_F32: v = ops->dot_f32(c->n_cols, row, xb); break;
            case REALM_TYPE_F16: v = ops->dot_f16(c->n_cols, row, xb); break;
            case REALM_TYPE_BF16: v = ops->dot_bf16(c->n_cols, row, xb); break;
            case REALM_TYPE_Q8_0: v = ops->dot_q8_0(nb, row, c->xq + b * nb); break;
            default: v = ops->dot_q4_0(nb, row, c->xq + b * nb); break;
            }
            c->y[b * c->n_rows + r] = v;
        }
    }
}

static void mm_task(void *p, int ith, int nth) {
    mm_ctx *c = p;
    (void)ith;
    (void)nth;
    for (;;) {
        const int64_t r0 = atomic_fetch_add(&c->next, c->chunk);
        if (r0 >= c->n_rows) return;
        mm_rows(c, r0, r0 + c->chunk < c->n_rows ? r0 + c->chunk : c->n_rows);
    }
}

typedef struct {
    block_q8x *xq;
    const float *x;
    int64_t batch, nb;
    const realm_isa_ops *ops;
} quant_ctx;

static void quant_task(void *p, int ith, int nth) {
    quant_ctx *c = p;
    int64_t b0, b1;
    realm_split(c->batch, ith, nth, &b0, &b1);
    for (int64_t b = b0; b < b1; b++)
        c->ops->quantize_q8x(c->xq + b * c->nb, c->x + b * c->nb * QK, c->nb);
}

typedef struct {
    float *y;
    const float *w, *x;
    int64_t n_rows, n_cols, batch;
    const realm_isa_ops *ops;
} gemm_ctx;

static void gemm_task(void *p, int ith, int nth) {
    gemm_ctx *c = p;
    c->ops->gemm_f32(c->y, c->n_rows, c->x, c->n_cols, c->w, c->n_cols, c->batch, c->n_rows,
                     c->n_cols, ith, nth);
}

#define GEMM_MIN_BATCH 16  /* below this, the row-streaming path reads the weights once */

int realm_matmul(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                 int64_t n_cols, int64_t batch) {
    if (!y || !w || !x || n_rows <= 0 || n_cols <= 0 || batch <= 0) return REALM_EINVAL;
    const int64_t row_bytes = realm_row_bytes(wtype, n_cols);
    if (row_bytes < 0) return REALM_EINVAL;
    const realm_isa_ops *ops = realm_ops();

    if (wtype == REALM_TYPE_F32 && batch >= GEMM_MIN_BATCH && ops->gemm_f32) {
        gemm_ctx g = {.y = y, .w = w, .x = x, .n_rows = n_rows, .n_cols = n_cols,
                      .batch = batch, .ops = ops};
        return realm_parallel(gemm_task, &g, 0);
    }

    mm_ctx c = {.y = y, .w = w, .wtype = wtype, .x = x, .n_rows = n_rows, .n_cols = n_cols,
                .batch = batch, .row_bytes = row_bytes, .ops = ops};
    block_q8x *xq = NULL;
    if (wtype == REALM_TYPE_Q8_0 || wtype == REALM_TYPE_Q4_0) {
        const int64_t nb = n_cols / QK;
        if ((uint64_t)batch * (uint64_t)nb > SIZE_MAX / sizeof(block_q8x)) return REALM_ENOMEM;
        xq = malloc((size_t)(batch * nb) * sizeof(block_q8x));
        if (!xq) return REALM_ENOMEM;
        quant_ctx q = {.xq = xq, .x = x, .batch = batch, .nb = nb, .ops = ops};
        int rc = realm_parallel(quant_task, &q, batch >= 8 ? 0 : 1);
        if (rc != REALM_OK) {
            free(xq);
            return rc;
        }
        c.xq = xq;
    }
    const int nth = realm_threads_get();
    int64_t chunk = n_rows / ((int64_t)nth * 16);
    c.chunk = chunk < 1 ? 1 : chunk;
    atomic_store(&c.next, 0);
    int rc = realm_parallel(mm_task, &c, 0);
    free(xq);
    return rc;
}
