/* Realm CUDA kernels: one forward step of a llama-family transformer over a batch of
 * sequences, on the device (native/forward.c's algorithm and contract, kernel for kernel).
 *
 * Weights and KV caches live in device memory; the step's small host-side inputs (token ids,
 * positions, the row -> sequence map and every (layer, sequence) cache view) go up in one
 * copy, and the logits come back in one copy. All tokens of all sequences go through each
 * projection as one matmul batch (the weights are read once per step), and attention covers
 * every sequence in one launch per layer. With a pager (acquire / release), release is called
 * only after the device has finished with the layer.
 *
 *   x = embed(tokens) (* embd_scale)
 *   per layer:  h = rmsnorm(x) * attn_norm;  q, k, v = h W (+ b);  (QK-norm);  rope(q, k)
 *               cache[pos..] = k, v;  a = attention(q, cache);  x += (norm)(a Wo)
 *               h = rmsnorm(x) * ffn_norm;  x += (norm)((act(h Wgate) * h Wup) Wdown)
 *   logits = rmsnorm(x[last rows]) * output_norm . Woutput (soft-capped)
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"

// --- small kernels of the step ----------------------------------------------------------

__global__ void scale_kernel(float *x, int64_t n, float s) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] *= s;
}

__global__ void bias_kernel(float *y, const float *b, int64_t rows, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] += b[i % n];
}

/* row t of k / v (kvd wide) into its sequence's layer cache at position pos[t] */
__global__ void store_kv_kernel(const realm_cu_kv_view *views, const int32_t *row_seq,
                                const int32_t *pos, const float *k, const float *v, int64_t T,
                                int64_t kvd, int kv_type) {
    for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < T * kvd;
         u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = u / kvd, c = u % kvd;
        const realm_cu_kv_view vw = views[row_seq[t]];
        const int64_t dst = (int64_t)pos[t] * kvd + c;
        if (kv_type == REALM_TYPE_F16) {
            ((uint16_t *)vw.k)[dst] = f32_to_f16(k[u]);
            ((uint16_t *)vw.v)[dst] = f32_to_f16(v[u]);
        } else {
            ((float *)vw.k)[dst] = k[u];
            ((float *)vw.v)[dst] = v[u];
        }
    }
}

__global__ void gather_rows_kernel(float *out, const float *x, const int32_t *rows, int64_t n) {
    const float *src = x + (int64_t)rows[blockIdx.x] * n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[blockIdx.x * n + i] = src[i];
}

/* out[j] = mean over rows of x[r, j] */
__global__ void mean_rows_kernel(float *out, const float *x, int64_t rows, int64_t n) {
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n;
         j += (int64_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int64_t r = 0; r < rows; r++) s += x[r * n + j];
        out[j] = s / (float)rows;
    }
}

// --- checks (host fields only: device pointers are never dereferenced here) --------------

static int check_model(const realm_model *m) {
    if (!m || m->n_layers <= 0 || m->n_embd <= 0 || m->n_heads <= 0 || m->n_kv_heads <= 0 ||
        m->n_heads % m->n_kv_heads != 0 || m->head_dim <= 0 || m->head_dim > 256 ||
        m->head_dim % 2 != 0 || m->n_ff <= 0 || m->n_vocab <= 0 || m->n_rot <= 0 ||
        m->n_rot > m->head_dim || m->n_rot % 2 != 0 || !m->tok_embd || !m->output_norm ||
        !m->output || (!m->layers && !m->acquire) ||
        (m->kv_type != REALM_TYPE_F16 && m->kv_type != REALM_TYPE_F32) ||
        (m->act != REALM_ACT_SILU && m->act != REALM_ACT_GELU) || !(m->embd_scale >= 0.0f) ||
        !(m->attn_scale >= 0.0f) || !(m->attn_softcap >= 0.0f) || !(m->final_softcap >= 0.0f) ||
        !isfinite(m->embd_scale) || !isfinite(m->attn_scale) || !isfinite(m->attn_softcap) ||
        !isfinite(m->final_softcap))
        return REALM_EINVAL;
    for (int32_t l = 0; l < m->n_layers; l++) {
        if (m->window && m->window[l] < 0) return REALM_EINVAL;
        if (m->layer_rope_base && !(m->layer_rope_base[l] > 0.0f)) return REALM_EINVAL;
        if (m->layer_rope_scale && !(m->layer_rope_scale[l] > 0.0f)) return REALM_EINVAL;
    }
    return REALM_OK;
}

static int check_seqs(const realm_model *m, const realm_seq *seqs, int32_t n_seqs,
                      int64_t *total) {
    if (!seqs || n_seqs <= 0) return REALM_EINVAL;
    int64_t t = 0;
    for (int32_t s = 0; s < n_seqs; s++) {
        const realm_seq *q = &seqs[s];
        if (!q->tokens || q->n_tokens <= 0 || q->pos < 0 || !q->kv || q->capacity <= 0 ||
            (int64_t)q->pos + q->n_tokens > q->capacity || q->n_logits < 0 ||
            q->n_logits > q->n_tokens || (q->n_logits > 0 && !q->logits))
            return REALM_EINVAL;
        if (q->adapter) return REALM_EUNSUPPORTED;  /* LoRA runs on the CPU only, for now */
        for (int32_t i = 0; i < q->n_tokens; i++)
            if (q->tokens[i] < 0 || q->tokens[i] >= m->n_vocab) return REALM_EINVAL;
        t += q->n_tokens;
    }
    *total = t;
    return REALM_OK;
}

// --- the step ---------------------------------------------------------------------------

typedef struct {
    float *x, *h, *tmp;      /* (T, n_embd) */
    float *q, *att;          /* (T, n_heads * head_dim) */
    float *k, *v;            /* (T, n_kv_heads * head_dim) */
    float *gate, *up;        /* (T, n_ff) */
    realm_cu_kv_view *views; /* (n_layers, n_seqs): each sequence's cache of each layer */
    int32_t *ids, *pos, *row_seq;  /* (T) */
    int32_t *logit_rows;     /* (R): rows of x whose logits are asked for */
    int rowwise;             /* a sequence asked for exact (batch-independent) results */
} scratch;

static unsigned grid_for(int64_t n) { return realm_cu_blocks(n, 256); }

static int layer_step(const realm_model *m, const realm_layer *L, int32_t l, int32_t n_seqs,
                      int64_t T, const scratch *s) {
    const int64_t E = m->n_embd, D = m->head_dim;
    const int64_t qd = (int64_t)m->n_heads * D, kvd = (int64_t)m->n_kv_heads * D;
#define MATMUL(y, w, type, x, n_out, n_in) \
    realm_cu_matmul_ex_async(y, w, type, x, n_out, n_in, T, s->rowwise)
    REALM_TRY(realm_cu_rmsnorm_async(s->h, s->x, L->attn_norm, T, E, m->rms_eps));
    REALM_TRY(MATMUL(s->q, L->wq, L->type_q, s->h, qd, E));
    REALM_TRY(MATMUL(s->k, L->wk, L->type_k, s->h, kvd, E));
    REALM_TRY(MATMUL(s->v, L->wv, L->type_v, s->h, kvd, E));
    if (L->bq) bias_kernel<<<grid_for(T * qd), 256, 0, REALM_STREAM>>>(s->q, L->bq, T, qd);
    if (L->bk) bias_kernel<<<grid_for(T * kvd), 256, 0, REALM_STREAM>>>(s->k, L->bk, T, kvd);
    if (L->bv) bias_kernel<<<grid_for(T * kvd), 256, 0, REALM_STREAM>>>(s->v, L->bv, T, kvd);
    REALM_TRY(realm_cuda_check_launch("bias"));
    if (L->q_norm)
        REALM_TRY(realm_cu_rmsnorm_async(s->q, s->q, L->q_norm, T * m->n_heads, D, m->rms_eps));
    if (L->k_norm)
        REALM_TRY(realm_cu_rmsnorm_async(s->k, s->k, L->k_norm, T * m->n_kv_heads, D, m->rms_eps));
    const float base = m->layer_rope_base ? m->layer_rope_base[l] : m->rope_base;
    const float rscale = m->layer_rope_scale ? m->layer_rope_scale[l] : m->rope_scale;
    REALM_TRY(realm_cu_rope_async(s->q, s->pos, T, m->n_heads, m->head_dim, m->n_rot,
                                  m->rope_mode, base, rscale, m->rope_freqs));
    REALM_TRY(realm_cu_rope_async(s->k, s->pos, T, m->n_kv_heads, m->head_dim, m->n_rot,
                                  m->rope_mode, base, rscale, m->rope_freqs));
    const realm_cu_kv_view *views = s->views + (int64_t)l * n_seqs;
    store_kv_kernel<<<grid_for(T * kvd), 256, 0, REALM_STREAM>>>(views, s->row_seq, s->pos, s->k,
                                                                  s->v, T, kvd, m->kv_type);
    REALM_TRY(realm_cuda_check_launch("store kv"));
    const float scale = m->attn_scale > 0.0f ? m->attn_scale : 1.0f / sqrtf((float)D);
    const int32_t window = m->window ? m->window[l] : 0;
    REALM_TRY(realm_cu_attention_async(s->att, s->q, views, s->row_seq, s->pos, m->kv_type, T,
                                       m->n_heads, m->n_kv_heads, m->head_dim, scale, window,
                                       m->attn_softcap));
    REALM_TRY(MATMUL(s->tmp, L->wo, L->type_o, s->att, E, qd));
    if (L->post_attn_norm)
        REALM_TRY(realm_cu_rmsnorm_async(s->tmp, s->tmp, L->post_attn_norm, T, E, m->rms_eps));
    REALM_TRY(realm_cu_add_async(s->x, s->x, s->tmp, T * E));
    REALM_TRY(realm_cu_rmsnorm_async(s->h, s->x, L->ffn_norm, T, E, m->rms_eps));
    REALM_TRY(MATMUL(s->gate, L->w_gate, L->type_gate, s->h, m->n_ff, E));
    REALM_TRY(MATMUL(s->up, L->w_up, L->type_up, s->h, m->n_ff, E));
    REALM_TRY(realm_cu_glu_async(s->gate, s->gate, s->up, T * m->n_ff, m->act));
    REALM_TRY(MATMUL(s->tmp, L->w_down, L->type_down, s->gate, E, m->n_ff));
    if (L->post_ffn_norm)
        REALM_TRY(realm_cu_rmsnorm_async(s->tmp, s->tmp, L->post_ffn_norm, T, E, m->rms_eps));
#undef MATMUL
    return realm_cu_add_async(s->x, s->x, s->tmp, T * E);
}

/* Everything after the layers: embeddings and logits, copied back to the host. */
static int finish_step(const realm_model *m, realm_seq *seqs, int32_t n_seqs, int64_t T,
                       int64_t R, const scratch *s) {
    const int64_t E = m->n_embd, V = m->n_vocab;
    int64_t base = 0;
    for (int32_t i = 0; i < n_seqs; i++) {
        const int64_t n = seqs[i].n_tokens;
        if (seqs[i].embedding) {
            float *rows = s->tmp, *mean = s->h;  /* n <= T rows of scratch; one row */
            REALM_TRY(realm_cu_rmsnorm_async(rows, s->x + base * E, m->output_norm, n, E,
                                             m->rms_eps));
            mean_rows_kernel<<<grid_for(E), 256, 0, REALM_STREAM>>>(mean, rows, n, E);
            REALM_TRY(realm_cuda_check_launch("embedding"));
            CUDA_TRY(cudaMemcpyAsync(seqs[i].embedding, mean, sizeof(float) * (size_t)E,
                                     cudaMemcpyDeviceToHost, REALM_STREAM),
                     "embedding download");
        }
        base += n;
    }
    if (R == 0) return realm_cuda_sync("forward");
    float *rows = s->h;  /* R <= T rows of n_embd */
    gather_rows_kernel<<<(unsigned)R, 256, 0, REALM_STREAM>>>(rows, s->x, s->logit_rows, E);
    REALM_TRY(realm_cuda_check_launch("gather rows"));
    REALM_TRY(realm_cu_rmsnorm_async(rows, rows, m->output_norm, R, E, m->rms_eps));
    float *d_out = nullptr;
    CUDA_TRY(cudaMallocAsync((void **)&d_out, sizeof(float) * (size_t)(R * V), REALM_STREAM),
             "cudaMallocAsync (logits)");
    float *h_out = (float *)malloc(sizeof(float) * (size_t)(R * V));
    int rc = h_out ? REALM_OK : REALM_ENOMEM;
    if (rc == REALM_OK)
        rc = realm_cu_matmul_ex_async(d_out, m->output, m->type_output, rows, V, E, R,
                                      s->rowwise);
    if (rc == REALM_OK && m->final_softcap > 0.0f)
        rc = realm_cu_softcap_async(d_out, R * V, m->final_softcap);
    if (rc == REALM_OK) {
        const cudaError_t err = cudaMemcpyAsync(h_out, d_out, sizeof(float) * (size_t)(R * V),
                                                cudaMemcpyDeviceToHost, REALM_STREAM);
        if (err != cudaSuccess) rc = realm_cuda_fail(err, "logits download");
    }
    const int rs = realm_cuda_sync("forward");
    if (rc == REALM_OK) rc = rs;
    if (rc == REALM_OK) {
        int64_t r = 0;
        for (int32_t i = 0; i < n_seqs; i++) {
            if (seqs[i].n_logits == 0) continue;  /* its logits pointer may be NULL */
            memcpy(seqs[i].logits, h_out + r * V, sizeof(float) * (size_t)(seqs[i].n_logits * V));
            r += seqs[i].n_logits;
        }
    }
    free(h_out);
    cudaFreeAsync(d_out, REALM_STREAM);
    return rc;
}

extern "C" int realm_cuda_forward(const realm_model *m, realm_seq *seqs, int32_t n_seqs) {
    int rc = check_model(m);
    if (rc != REALM_OK) return rc;
    int64_t T = 0;
    if ((rc = check_seqs(m, seqs, n_seqs, &T)) != REALM_OK) return rc;
    int64_t R = 0;
    for (int32_t i = 0; i < n_seqs; i++) R += seqs[i].n_logits;

    const int64_t E = m->n_embd, qd = (int64_t)m->n_heads * m->head_dim;
    const int64_t kvd = (int64_t)m->n_kv_heads * m->head_dim, F = m->n_ff;
    const int64_t n_views = (int64_t)m->n_layers * n_seqs;
    const size_t float_bytes = sizeof(float) * (size_t)(T * (3 * E + 2 * qd + 2 * kvd + 2 * F));
    const size_t view_bytes = sizeof(realm_cu_kv_view) * (size_t)n_views;
    const size_t int_bytes = sizeof(int32_t) * (size_t)(3 * T + R);
    /* host staging of the step's inputs: views, then ids, pos, row_seq, logit_rows */
    char *host = (char *)malloc(view_bytes + int_bytes);
    if (!host) return REALM_ENOMEM;
    realm_cu_kv_view *hv = (realm_cu_kv_view *)host;
    int32_t *hids = (int32_t *)(host + view_bytes), *hpos = hids + T, *hseq = hpos + T;
    int32_t *hrows = hseq + T;
    const int64_t es = m->kv_type == REALM_TYPE_F16 ? 2 : 4;
    int64_t row = 0, r = 0;
    for (int32_t i = 0; i < n_seqs; i++) {
        const realm_seq *q = &seqs[i];
        for (int32_t l = 0; l < m->n_layers; l++) {
            const uint8_t *kc = (const uint8_t *)q->kv + (int64_t)l * 2 * q->capacity * kvd * es;
            hv[(int64_t)l * n_seqs + i] = {kc, kc + (int64_t)q->capacity * kvd * es,
                                           (int64_t)q->pos + q->n_tokens};
        }
        for (int32_t t = 0; t < q->n_tokens; t++, row++) {
            hids[row] = q->tokens[t];
            hpos[row] = q->pos + t;
            hseq[row] = i;
        }
        for (int32_t t = q->n_tokens - q->n_logits; t < q->n_tokens; t++)
            hrows[r++] = (int32_t)(row - q->n_tokens + t);
    }

    char *dev = nullptr;
    cudaError_t err = cudaMallocAsync((void **)&dev, float_bytes + 16 + view_bytes + int_bytes,
                                      REALM_STREAM);
    if (err != cudaSuccess) {
        free(host);
        return realm_cuda_fail(err, "cudaMallocAsync (forward scratch)");
    }
    scratch s;
    s.rowwise = 0;
    for (int32_t i = 0; i < n_seqs; i++) s.rowwise |= seqs[i].exact != 0;
    s.x = (float *)dev;
    s.h = s.x + T * E;
    s.tmp = s.h + T * E;
    s.q = s.tmp + T * E;
    s.att = s.q + T * qd;
    s.k = s.att + T * qd;
    s.v = s.k + T * kvd;
    s.gate = s.v + T * kvd;
    s.up = s.gate + T * F;
    /* the views start at the next 16-byte boundary after the floats (16 spare bytes) */
    char *tail = dev + ((float_bytes + 15) / 16) * 16;
    s.views = (realm_cu_kv_view *)tail;
    s.ids = (int32_t *)(tail + view_bytes);
    s.pos = s.ids + T;
    s.row_seq = s.pos + T;
    s.logit_rows = s.row_seq + T;
    rc = REALM_OK;
    err = cudaMemcpyAsync(tail, host, view_bytes + int_bytes, cudaMemcpyHostToDevice,
                          REALM_STREAM);
    if (err != cudaSuccess) rc = realm_cuda_fail(err, "forward inputs upload");
    /* a copy from pageable memory is staged before cudaMemcpyAsync returns: host is free */

    if (rc == REALM_OK)
        rc = realm_cu_get_rows_async(s.x, m->tok_embd, m->type_embd, E, s.ids, T);
    if (rc == REALM_OK && m->embd_scale > 0.0f && m->embd_scale != 1.0f) {
        scale_kernel<<<grid_for(T * E), 256, 0, REALM_STREAM>>>(s.x, T * E, m->embd_scale);
        rc = realm_cuda_check_launch("embedding scale");
    }
    for (int32_t l = 0; l < m->n_layers && rc == REALM_OK; l++) {
        realm_layer paged;
        const realm_layer *L = m->layers ? &m->layers[l] : nullptr;
        if (m->acquire) {
            rc = m->acquire(m->pager, l, &paged);
            if (rc != REALM_OK) break;
            L = &paged;
        }
        rc = layer_step(m, L, l, n_seqs, T, &s);
        if (m->release) {
            /* the pager may reuse the layer's device memory as soon as release returns */
            const int rs = realm_cuda_sync("forward (layer)");
            if (rc == REALM_OK) rc = rs;
            const int rr = m->release(m->pager, l, &paged);
            if (rc == REALM_OK) rc = rr;
        }
    }
    if (rc == REALM_OK) rc = finish_step(m, seqs, n_seqs, T, R, &s);
    const int rs = realm_cuda_sync("forward");
    if (rc == REALM_OK) rc = rs;
    cudaFreeAsync(dev, REALM_STREAM);
    free(host);
    return rc;
}
