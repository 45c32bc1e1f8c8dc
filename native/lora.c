/* Realm native kernels: LoRA adapters applied at step time, per sequence.
 *
 * The base projection runs once for every row of the step (realm_forward); then, for each
 * adapter named by some sequence of the step, the rows of those sequences are gathered and
 *
 *   y[rows] += scale * B (A x[rows])      A: (rank, n_in), B^T kept as bt: (rank, n_out)
 *
 * is added to them: u = scale * A x is one small matmul per adapter (rows grouped by adapter,
 * as S-LoRA / Punica batch them), and y += bt^T u runs for every adapter's rows in one
 * parallel pass over the output columns (a rank-long dot per output would waste the SIMD
 * width). Tenants with different adapters share a step and the shared weights are never
 * modified; a sequence without an adapter is never touched.
 */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

#define LORA_DOT_ROWS 4 /* a group of at most this many rows (decode) takes the dot path */

static int lora_type_ok(int32_t t) {
    return t == REALM_TYPE_F32 || t == REALM_TYPE_F16 || t == REALM_TYPE_Q8_0;
}

static int check_pair(const realm_lora *p, int64_t n_out, int64_t n_in) {
    if (!p->a) return REALM_OK;
    if (!p->b || p->rank <= 0 || !lora_type_ok(p->type_a) ||
        (p->type_b != REALM_TYPE_F32 && p->type_b != REALM_TYPE_F16) || !isfinite(p->scale) ||
        realm_row_bytes(p->type_a, n_in) < 0 || n_out <= 0)
        return REALM_EINVAL;
    return REALM_OK;
}

/* The (n_out, n_in) of projection `proj` in model m. */
static void proj_dims(const realm_model *m, int32_t proj, int64_t *n_out, int64_t *n_in) {
    const int64_t E = m->n_embd, qd = (int64_t)m->n_heads * m->head_dim;
    const int64_t kvd = (int64_t)m->n_kv_heads * m->head_dim, F = m->n_ff;
    switch (proj) {
    case REALM_LORA_Q: *n_out = qd, *n_in = E; break;
    case REALM_LORA_K:
    case REALM_LORA_V: *n_out = kvd, *n_in = E; break;
    case REALM_LORA_O: *n_out = E, *n_in = qd; break;
    case REALM_LORA_GATE:
    case REALM_LORA_UP: *n_out = F, *n_in = E; break;
    default: *n_out = E, *n_in = F; break; /* REALM_LORA_DOWN */
    }
}

int realm_lora_check(const realm_model *m, const realm_adapter *ad) {
    if (!m || !ad) return REALM_EINVAL;
    if (ad->n_layers != m->n_layers || !ad->layers) return REALM_EINVAL;
    for (int32_t l = 0; l < ad->n_layers; l++)
        for (int32_t p = 0; p < REALM_LORA_PER_LAYER; p++) {
            int64_t n_out, n_in;
            proj_dims(m, p, &n_out, &n_in);
            if (check_pair(&ad->layers[(int64_t)l * REALM_LORA_PER_LAYER + p], n_out, n_in) !=
                REALM_OK)
                return REALM_EINVAL;
        }
    return check_pair(&ad->output, m->n_vocab, m->n_embd);
}

static const realm_lora *pair_of(const realm_adapter *ad, int32_t layer, int32_t proj) {
    if (!ad) return NULL;
    const realm_lora *p =
        layer < 0 ? &ad->output : &ad->layers[(int64_t)layer * REALM_LORA_PER_LAYER + proj];
    return p->a ? p : NULL;
}

/* ---- B: y[rows] += bt^T u, all groups in one parallel pass over output columns ---- */

void realm_lora_up_ref(float *y, const void *bt, int type, int64_t ld, const float *u,
                       int32_t rank, int64_t n) {
    for (int64_t o = 0; o < n; o++) {
        float acc = 0.0f;
        if (type == REALM_TYPE_F16)
            for (int32_t k = 0; k < rank; k++)
                acc += u[k] * realm_f16_to_f32(((const uint16_t *)bt)[k * ld + o]);
        else
            for (int32_t k = 0; k < rank; k++) acc += u[k] * ((const float *)bt)[k * ld + o];
        y[o] += acc;
    }
}

float realm_lora_dot_ref(const void *a, int type, const float *x, int64_t n) {
    float acc = 0.0f;
    if (type == REALM_TYPE_F16)
        for (int64_t i = 0; i < n; i++) acc += realm_f16_to_f32(((const uint16_t *)a)[i]) * x[i];
    else
        for (int64_t i = 0; i < n; i++) acc += ((const float *)a)[i] * x[i];
    return acc;
}

typedef struct {
    const realm_adapter *ad;
    int64_t g;           /* rows of the step that name this adapter */
    const int64_t *rows; /* (g): their indices */
} group;

typedef struct {         /* one adapter's pair on one projection */
    const realm_lora *p;
    const group *gr;
    float *y;            /* the projection's output (rows, n_out) */
    int64_t n_out;
    float *u;            /* (g, rank): scale * A x of each row */
    int small;           /* few rows, F16/F32 A: computed by down_task */
} job;

/* A, for the jobs of few rows with F16/F32 A, in one parallel pass: u[r, k] = scale *
 * A[k] . x[row r] (items are (job, k) pairs; a group's rows are read in place) */
typedef struct {
    const float *x;
    int64_t n_in;
    const job *jobs;
    int n_jobs;
    int64_t n_items;
    int avx2;
} down_ctx;

static void down_task(void *ctx, int ith, int nth) {
    const down_ctx *c = ctx;
    int64_t b, e, item = 0;
    realm_split(c->n_items, ith, nth, &b, &e);
    for (int i = 0; i < c->n_jobs && item < e; i++) {
        const job *jb = &c->jobs[i];
        if (!jb->small) continue;
        const int64_t es = jb->p->type_a == REALM_TYPE_F16 ? 2 : 4;
        for (int32_t k = 0; k < jb->p->rank; k++, item++) {
            if (item < b || item >= e) continue;
            const void *a = (const uint8_t *)jb->p->a + (int64_t)k * c->n_in * es;
            for (int64_t r = 0; r < jb->gr->g; r++) {
                const float *xr = c->x + jb->gr->rows[r] * c->n_in;
                float d;
#if defined(__x86_64__) || defined(__i386__)
                if (c->avx2)
                    d = realm_lora_dot_avx2(a, jb->p->type_a, xr, c->n_in);
                else
#endif
                    d = realm_lora_dot_ref(a, jb->p->type_a, xr, c->n_in);
                jb->u[r * jb->p->rank + k] = jb->p->scale * d;
            }
        }
    }
}

/* B: y[rows] += bt^T u for every job, in one parallel pass over all the jobs' output columns
 * (blocks of 8) */
typedef struct {
    const job *jobs;
    int n_jobs;
    int64_t n_blocks;
    int avx2;
} up_ctx;

static void up_task(void *ctx, int ith, int nth) {
    const up_ctx *c = ctx;
    int64_t b, e, first = 0;
    realm_split(c->n_blocks, ith, nth, &b, &e);
    for (int i = 0; i < c->n_jobs && first < e; i++) {
        const job *jb = &c->jobs[i];
        const int64_t blocks = (jb->n_out + 7) / 8;
        const int64_t lo = b > first ? b - first : 0, hi = e - first < blocks ? e - first : blocks;
        first += blocks;
        if (lo >= hi) continue;
        const int64_t ob = lo * 8, oe = hi * 8 < jb->n_out ? hi * 8 : jb->n_out;
        const int64_t es = jb->p->type_b == REALM_TYPE_F16 ? 2 : 4;
        const void *bt = (const uint8_t *)jb->p->b + ob * es;
        for (int64_t r = 0; r < jb->gr->g; r++) {
            float *y = jb->y + jb->gr->rows[r] * jb->n_out + ob;
            const float *u = jb->u + r * jb->p->rank;
#if defined(__x86_64__) || defined(__i386__)
            if (c->avx2) {
                realm_lora_up_avx2(y, bt, jb->p->type_b, jb->n_out, u, jb->p->rank, oe - ob);
                continue;
            }
#endif
            realm_lora_up_ref(y, bt, jb->p->type_b, jb->n_out, u, jb->p->rank, oe - ob);
        }
    }
}

int realm_lora_add(float *const *ys, const int64_t *n_outs, const int32_t *projs, int32_t n_proj,
                   const float *x, int64_t n_in, const realm_seq *seqs, int32_t n_seqs,
                   int32_t layer, int logits_rows) {
    if (!ys || !n_outs || !projs || n_proj <= 0 || !x || !seqs || n_seqs <= 0 || n_in <= 0)
        return REALM_EINVAL;
    for (int32_t q = 0; q < n_proj; q++)
        if (!ys[q] || n_outs[q] <= 0 || projs[q] < 0 || projs[q] >= REALM_LORA_PER_LAYER)
            return REALM_EINVAL;
    /* the groups: one per distinct adapter, its rows in step order; the jobs: each group's
     * pairs among the projections */
    int64_t total = 0;
    for (int32_t j = 0; j < n_seqs; j++)
        total += logits_rows ? seqs[j].n_logits : seqs[j].n_tokens;
    group *gs = calloc((size_t)n_seqs, sizeof(group));
    job *jobs = calloc((size_t)n_seqs * (size_t)n_proj, sizeof(job));
    int64_t *rows = malloc(sizeof(int64_t) * (size_t)(total > 0 ? total : 1));
    float *mem = NULL;
    int rc = REALM_OK;
    if (!gs || !jobs || !rows) {
        rc = REALM_ENOMEM;
        goto done;
    }
    int n_groups = 0, n_jobs = 0;
    int64_t used = 0, u_floats = 0, max_g = 0;
    for (int32_t i = 0; i < n_seqs; i++) {
        const realm_adapter *ad = seqs[i].adapter;
        if (!ad) continue;
        int first = 1;
        for (int32_t j = 0; j < i && first; j++)
            if (seqs[j].adapter == ad) first = 0;
        if (!first) continue;
        group *gr = &gs[n_groups];
        gr->ad = ad;
        gr->rows = rows + used;
        int64_t row = 0;
        for (int32_t j = 0; j < n_seqs; j++) {
            const int64_t n = logits_rows ? seqs[j].n_logits : seqs[j].n_tokens;
            if (seqs[j].adapter == ad)
                for (int64_t t = 0; t < n; t++) rows[used + gr->g++] = row + t;
            row += n;
        }
        if (gr->g == 0) continue;
        used += gr->g;
        if (gr->g > max_g) max_g = gr->g;
        for (int32_t q = 0; q < n_proj; q++) {
            const realm_lora *p = pair_of(ad, layer, projs[q]);
            if (!p) continue;
            jobs[n_jobs++] = (job){.p = p, .gr = gr, .y = ys[q], .n_out = n_outs[q]};
            u_floats += gr->g * p->rank;
        }
        n_groups++;
    }
    if (n_jobs == 0) goto done;
    mem = malloc(sizeof(float) * (size_t)(u_floats + max_g * n_in));
    if (!mem) {
        rc = REALM_ENOMEM;
        goto done;
    }
    /* A: u = scale * A x for each job's rows. Jobs of few rows (decode) with F16/F32 A go in
     * one parallel pass of dot products (down_task); the others (prefill, Q8_0 A) take the
     * matmul kernels, their rows gathered when they are not contiguous */
    const int avx2 = realm_isa_active() >= REALM_ISA_AVX2;
    float *u = mem, *xg = mem + u_floats;
    int64_t n_items = 0, n_blocks = 0;
    for (int i = 0; i < n_jobs; i++) {
        job *jb = &jobs[i];
        jb->u = u;
        u += jb->gr->g * jb->p->rank;
        /* a step that must be row-invariant (realm_matmul_rowwise: speculative verify) takes
         * the dot path at any size: a row's u then never depends on its group's size */
        jb->small = (jb->gr->g <= LORA_DOT_ROWS || realm_matmul_rowwise) &&
                    jb->p->type_a != REALM_TYPE_Q8_0;
        if (jb->small) n_items += jb->p->rank;
        n_blocks += (jb->n_out + 7) / 8;
    }
    if (n_items > 0) {
        down_ctx d = {.x = x, .n_in = n_in, .jobs = jobs, .n_jobs = n_jobs, .n_items = n_items,
                      .avx2 = avx2};
        rc = realm_parallel(down_task, &d, 0);
    }
    for (int i = 0; i < n_jobs && rc == REALM_OK; i++) {
        job *jb = &jobs[i];
        if (jb->small) continue;
        const group *gr = jb->gr;
        int contiguous = 1;
        for (int64_t r = 1; r < gr->g; r++)
            if (gr->rows[r] != gr->rows[0] + r) contiguous = 0;
        const float *xin = x + gr->rows[0] * n_in;
        if (!contiguous) {
            for (int64_t r = 0; r < gr->g; r++)
                memcpy(xg + r * n_in, x + gr->rows[r] * n_in, sizeof(float) * (size_t)n_in);
            xin = xg;
        }
        rc = realm_matmul(jb->u, jb->p->a, jb->p->type_a, xin, jb->p->rank, n_in, gr->g);
        for (int64_t k = 0; k < gr->g * jb->p->rank; k++) jb->u[k] *= jb->p->scale;
    }
    /* B: every job's rows in one pass over the output columns */
    if (rc == REALM_OK) {
        up_ctx c = {.jobs = jobs, .n_jobs = n_jobs, .n_blocks = n_blocks, .avx2 = avx2};
        rc = realm_parallel(up_task, &c, 0);
    }
done:
    free(mem);
    free(rows);
    free(jobs);
    free(gs);
    return rc;
}
