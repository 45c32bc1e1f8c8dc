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
    const float *x;            /* float weights: activations in the panel layout */
    const realm_q8x *xq;       /* quantized activations (quantized weights only) */
    int64_t n_rows, n_cols, batch;
    int64_t row_bytes;
    int64_t chunk;             /* rows per work item */
    atomic_int_fast64_t next;  /* next unclaimed row */
    const realm_isa_ops *ops;
} mm_ctx;

/* Activation bytes one pass over a weight row may touch and still find in L1: larger batches
 * are taken in slices, each slice meeting every row of a chunk before the next slice starts,
 * so the chunk's weights come again from L2 and the slice's activations stay in L1. */
#define SLICE_BYTES (24 * 1024)
#define CHUNK_ROWS 16  /* a sub-chunk's weights stay in L2 across slices */
#define CHUNKS_PER_THREAD 4 /* work items: long runs of rows keep the weight stream sequential
                             * for the prefetchers; several per thread balance a noisy machine */
#define MIN_SLICE 8    /* the SIMD kernels' register group: fewer leaves FMA latency exposed */

static void mm_rows(const mm_ctx *c, int64_t r0, int64_t r1) {
    const realm_isa_ops *ops = c->ops;
    const int64_t n = c->n_cols, ys = c->n_rows, batch = c->batch;
    const int64_t row_act = c->xq ? c->xq->n_quads * 144 : realm_panels(n) * 64;  /* bytes/row */
    int64_t slice = SLICE_BYTES / row_act;
    if (slice < MIN_SLICE) slice = MIN_SLICE;
    for (int64_t s0 = r0; s0 < r1; s0 += CHUNK_ROWS) {
      const int64_t s1 = s0 + CHUNK_ROWS < r1 ? s0 + CHUNK_ROWS : r1;
      for (int64_t b0 = 0; b0 < batch; b0 += slice) {
        const int64_t nbat = batch - b0 < slice ? batch - b0 : slice;
        int64_t r = s0;
        if (ops->dot_rows_float && (c->wtype == REALM_TYPE_F32 || c->wtype == REALM_TYPE_F16 ||
                                    c->wtype == REALM_TYPE_BF16)) {
            const int64_t es = c->wtype == REALM_TYPE_F32 ? 4 : 2;
            for (; r < s1; r += 4) {
                const int nr = s1 - r < 4 ? (int)(s1 - r) : 4;
                ops->dot_rows_float(c->y + r, ys, c->w + r * c->row_bytes, c->wtype,
                                    c->row_bytes / es, nr, c->x, n, batch, b0, nbat);
            }
        }
        for (; r < s1; r++) {
            const void *row = c->w + r * c->row_bytes;
            float *y = c->y + r;
            switch (c->wtype) {
            case REALM_TYPE_F32: ops->dot_f32(y, ys, row, c->x, n, batch, b0, nbat); break;
            case REALM_TYPE_F16: ops->dot_f16(y, ys, row, c->x, n, batch, b0, nbat); break;
            case REALM_TYPE_BF16: ops->dot_bf16(y, ys, row, c->x, n, batch, b0, nbat); break;
            case REALM_TYPE_Q8_0: ops->dot_q8_0(y, ys, row, c->xq, b0, nbat); break;
            case REALM_TYPE_Q4_0: ops->dot_q4_0(y, ys, row, c->xq, b0, nbat); break;
            default: ops->dot_other(y, ys, row, c->wtype, c->xq, b0, nbat); break;
            }
        }
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
    const realm_q8x *xq;
    const float *x;
    int64_t batch;
    void (*quantize)(const realm_q8x *x, const float *src, int64_t b);
} quant_ctx;

static void quant_task(void *p, int ith, int nth) {
    quant_ctx *c = p;
    int64_t b0, b1;
    realm_split(c->batch, ith, nth, &b0, &b1);
    for (int64_t b = b0; b < b1; b++) c->quantize(c->xq, c->x + b * c->xq->nb * QK, b);
}

/* One allocation for the quantized activations of a call; NULL if it cannot be had. */
static void *alloc_q8x(realm_q8x *x, int64_t batch, int64_t nb) {
    const int64_t nq = (nb + 3) / 4;
    const uint64_t per_row = (uint64_t)nq * 128 + (uint64_t)nq * 16 + (uint64_t)nb * 8;
    if ((uint64_t)batch > (SIZE_MAX - 64) / per_row) return NULL;
    uint8_t *mem = malloc((size_t)batch * per_row + 64);
    if (!mem) return NULL;
    x->nb = nb;
    x->n_quads = nq;
    x->batch = batch;
    x->d = (float *)mem;  /* 4-byte aligned sections first */
    x->d4 = x->d + batch * nb;
    x->sum = (int32_t *)(x->d4 + batch * nq * 4);
    x->qs = (uint8_t *)(x->sum + batch * nb);
    /* the Q8_K fields share the space (a call uses one or the other): codes in qs (nb * 32
     * bytes a row), scales in d (nb / 8 a row), 16-element sums in sum (nb * 2 int16 a row) */
    x->nk = nb / 8;
    x->kq = (int8_t *)x->qs;
    x->kd = x->d;
    x->ksum = (int16_t *)x->sum;
    return mem;
}

/* Repack float activations (batch, n) into zero-padded panels (ceil(n/16), batch, 16). */
static float *pack_panels(const float *x, int64_t n, int64_t batch) {
    const int64_t np = realm_panels(n);
    if ((uint64_t)np * 16 > SIZE_MAX / sizeof(float) / (uint64_t)batch) return NULL;
    float *xp = malloc((size_t)(np * batch * 16) * sizeof(float));
    if (!xp) return NULL;
    for (int64_t c = 0; c < np; c++) {
        const int64_t len = n - c * 16 < 16 ? n - c * 16 : 16;
        for (int64_t b = 0; b < batch; b++) {
            float *dst = xp + (c * batch + b) * 16;
            memcpy(dst, x + b * n + c * 16, (size_t)len * sizeof(float));
            for (int64_t l = len; l < 16; l++) dst[l] = 0.0f;
        }
    }
    return xp;
}

typedef struct {
    float *y;
    const void *w;
    int wtype;
    const float *x;
    int64_t n_rows, n_cols, batch;
    const realm_isa_ops *ops;
    atomic_int_fast64_t next;  /* the level's panels, claimed by the threads */
    atomic_int status;  /* first failure of any thread */
} gemm_ctx;

static void gemm_task(void *p, int ith, int nth) {
    gemm_ctx *c = p;
    const int rc = c->ops->gemm_f32(c->y, c->n_rows, c->x, c->n_cols, c->w, c->wtype, c->n_cols,
                                    c->batch, c->n_rows, c->n_cols, ith, nth, &c->next);
    if (rc != REALM_OK) atomic_store(&c->status, rc);
}

/* The types of quants.c at a large batch: each thread dequantizes a panel of DQ_ROWS weight rows
 * to F32 and runs the level's F32 GEMM on it (or its F32 dots, on a level without one), so
 * prefill is compute-bound GEMM work rather than one unpack per block per activation group,
 * and multiplies the activations themselves rather than their 8-bit quantization. */
#define DQ_ROWS 64

typedef struct {
    float *y;
    const uint8_t *w;
    int wtype;
    const float *x;
    int64_t n_rows, n_cols, batch, row_bytes;
    const realm_isa_ops *ops;
    atomic_int_fast64_t next;
    atomic_int status;
} dq_ctx;

static void dq_task(void *p, int ith, int nth) {
    dq_ctx *c = p;
    (void)ith;
    (void)nth;
    float *panel = malloc(sizeof(float) * (size_t)(DQ_ROWS * c->n_cols));
    if (!panel) {
        atomic_store(&c->status, REALM_ENOMEM);
        return;
    }
    for (;;) {
        const int64_t r0 = atomic_fetch_add(&c->next, DQ_ROWS);
        if (r0 >= c->n_rows) break;
        const int64_t nr = c->n_rows - r0 < DQ_ROWS ? c->n_rows - r0 : DQ_ROWS;
        for (int64_t r = 0; r < nr; r++)
            realm_dequantize_row(panel + r * c->n_cols, c->w + (r0 + r) * c->row_bytes, c->wtype,
                                 c->n_cols);
        if (!c->ops->gemm_f32) {  /* the level's F32 dots against the panel-packed batch */
            for (int64_t r = 0; r < nr; r++)
                c->ops->dot_f32(c->y + r0 + r, c->n_rows, panel + r * c->n_cols, c->x, c->n_cols,
                                c->batch, 0, c->batch);
            continue;
        }
        const int rc = c->ops->gemm_f32(c->y + r0, c->n_rows, c->x, c->n_cols, panel,
                                        REALM_TYPE_F32, c->n_cols, c->batch, nr, c->n_cols, 0, 1, NULL);
        if (rc != REALM_OK) {
            atomic_store(&c->status, rc);
            break;
        }
    }
    free(panel);
}

#define GEMM_MIN_BATCH 16  /* below this, the row-streaming path reads the weights once */
/* The quantized GEMM repacks weight panels on every call; below a level's gemm_q_min_batch
 * the row-streaming kernel, which shares each weight block with up to 8
 * activation rows in registers, is faster (avx2.c and avx512.c give the measurements). */

_Thread_local int realm_matmul_rowwise;

/* The path of a product of wtype weights and batch rows on the active level: one decision,
 * which realm_matmul takes and realm_matmul_path reports. */
static int choose_path(const realm_isa_ops *ops, int wtype, int64_t batch) {
    /* row-invariant (exact) steps: the row-streaming path computes each activation row with
     * the same operations in the same order whatever the batch; the GEMM paths do not */
    const int gemm_ok = !realm_matmul_rowwise;
    if (wtype == REALM_TYPE_F32 || wtype == REALM_TYPE_F16 || wtype == REALM_TYPE_BF16)
        return gemm_ok && batch >= GEMM_MIN_BATCH && ops->gemm_f32 ? REALM_PATH_GEMM_F32
                                                                  : REALM_PATH_ROWS;
    /* quantized weights, large batch: interleaved weight panels (gemm_q8_avx512.c) */
    if (wtype == REALM_TYPE_Q8_0 || wtype == REALM_TYPE_Q4_0)
        return gemm_ok && ops->gemm_q8 && batch >= ops->gemm_q_min_batch(wtype) ? REALM_PATH_GEMM_Q
                                                                               : REALM_PATH_ROWS;
    /* the other types: integer GEMM (gemm_kq.inc) where the level takes the type (below its
     * threshold, the row-streaming dots); dequantized panels where it does not */
    const int kq = ops->gemm_kq && ops->gemm_kq_supports(wtype);
    if (gemm_ok && kq && batch >= ops->gemm_kq_min_batch(wtype)) return REALM_PATH_GEMM_Q;
    if (gemm_ok && !kq && batch >= GEMM_MIN_BATCH) return REALM_PATH_GEMM_DQ;
    return realm_uses_q8k(wtype) ? REALM_PATH_ROWS_Q8K : REALM_PATH_ROWS;
}

int realm_matmul_path(int wtype, int64_t batch) {
    if (batch > 0 && (wtype & REALM_PACKED))
        return realm_packed_code_bytes(wtype & ~REALM_PACKED) < 0 ? REALM_EINVAL : REALM_PATH_PACKED;
    if (batch <= 0 || realm_row_bytes(wtype, 256) < 0) return REALM_EINVAL;
    return choose_path(realm_ops(), wtype, batch);
}

int realm_matmul(float *y, const void *w, int wtype, const float *x, int64_t n_rows,
                 int64_t n_cols, int64_t batch) {
    if (!y || !w || !x || n_rows <= 0 || n_cols <= 0 || batch <= 0) return REALM_EINVAL;
    const realm_isa_ops *ops = realm_ops();
    if (wtype & REALM_PACKED) {  /* interleaved panels (packed.c): one kernel for every batch */
        wtype &= ~REALM_PACKED;
        if (realm_packed_bytes(wtype, n_rows, n_cols) < 0) return REALM_EINVAL;
        return ops->matmul_packed ? ops->matmul_packed(y, w, wtype, x, n_rows, n_cols, batch)
                                  : realm_matmul_packed_ref(y, w, wtype, x, n_rows, n_cols, batch);
    }
    const int64_t row_bytes = realm_row_bytes(wtype, n_cols);
    if (row_bytes < 0) return REALM_EINVAL;
    const int path = choose_path(ops, wtype, batch);

    if (path == REALM_PATH_GEMM_F32) {
        gemm_ctx g = {.y = y, .w = w, .wtype = wtype, .x = x, .n_rows = n_rows, .n_cols = n_cols,
                      .batch = batch, .ops = ops};
        atomic_store(&g.status, REALM_OK);
        atomic_store(&g.next, 0);
        const int rc = realm_parallel(gemm_task, &g, 0);
        return rc != REALM_OK ? rc : atomic_load(&g.status);
    }
    if (path == REALM_PATH_GEMM_Q)
        return wtype == REALM_TYPE_Q8_0 || wtype == REALM_TYPE_Q4_0
                   ? ops->gemm_q8(y, w, wtype, x, n_rows, n_cols, batch)
                   : ops->gemm_kq(y, w, wtype, x, n_rows, n_cols, batch);
    if (path == REALM_PATH_GEMM_DQ) {
        /* levels without a GEMM (the portable one) dot the dequantized rows with the float
         * batch: prefill multiplies the activations themselves at every level */
        float *panels = ops->gemm_f32 ? NULL : pack_panels(x, n_cols, batch);
        if (!ops->gemm_f32 && !panels) return REALM_ENOMEM;
        dq_ctx g = {.y = y, .w = w, .wtype = wtype, .x = panels ? panels : x, .n_rows = n_rows,
                    .n_cols = n_cols, .batch = batch, .row_bytes = row_bytes, .ops = ops};
        atomic_store(&g.next, 0);
        atomic_store(&g.status, REALM_OK);
        const int rc = realm_parallel(dq_task, &g, 0);
        free(panels);
        return rc != REALM_OK ? rc : atomic_load(&g.status);
    }

    const int other = realm_is_other_quant(wtype);
    mm_ctx c = {.y = y, .w = w, .wtype = wtype, .x = x, .n_rows = n_rows, .n_cols = n_cols,
                .batch = batch, .row_bytes = row_bytes, .ops = ops};
    realm_q8x xq = {0};
    void *scratch = NULL;  /* quantized activations or float panels */
    if (wtype == REALM_TYPE_Q8_0 || wtype == REALM_TYPE_Q4_0 || other) {
        scratch = alloc_q8x(&xq, batch, n_cols / QK);
        if (!scratch) return REALM_ENOMEM;
        quant_ctx q = {.xq = &xq, .x = x, .batch = batch,
                       .quantize = realm_uses_q8k(wtype) ? ops->quantize_q8k
                                   : other               ? ops->quantize_q8x_plain
                                                         : ops->quantize_q8x};
        int rc = realm_parallel(quant_task, &q, batch >= 8 ? 0 : 1);
        if (rc != REALM_OK) {
            free(scratch);
            return rc;
        }
        c.xq = &xq;
    } else if (batch > 1 || n_cols % 16 != 0) {  /* one row of whole panels is x itself */
        scratch = pack_panels(x, n_cols, batch);
        if (!scratch) return REALM_ENOMEM;
        c.x = scratch;
    }
    /* equal work items, CHUNKS_PER_THREAD per thread (not rounded to CHUNK_ROWS, which would
     * leave a short extra item: hidden 576 on 2 threads made 9 items of 64 rows, one thread
     * doing 5) */
    const int64_t items = (int64_t)realm_threads_get() * CHUNKS_PER_THREAD;
    const int64_t per = (n_rows + items - 1) / items;
    c.chunk = per < CHUNK_ROWS ? CHUNK_ROWS : per;
    atomic_store(&c.next, 0);
    int rc = realm_parallel(mm_task, &c, 0);
    free(scratch);
    return rc;
}
