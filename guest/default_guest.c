/*
 * default_guest.c — Realm's default guest runtime (ABI v1): generate, chat, tokenize,
 * count_tokens, embed. Built to realm/sandbox/guests/default.wasm by `python guest/build.py`.
 *
 * Policy decisions, in one place:
 *  - Sampling follows llama.cpp: penalties over the last 64 tokens of the sequence (prompt
 *    included), then top-k, top-p, min-p at temperature 1, then temperature, then a draw.
 *    presence/frequency penalties use OpenAI's formula over the same window. Every penalty is
 *    off by default (repeat_penalty 1, as llama.cpp's default), so temperature 0 is the model's
 *    argmax at every step.
 *  - `seed` seeds the guest's PRNG directly (same seed + params + model = same text on any
 *    host); without one the PRNG is seeded from the host's `random` import.
 *  - completion_tokens counts every sampled token, including the end-of-generation or stop
 *    token that ended it (whose text is never part of the output).
 *  - Stop strings: text that could be the start of a stop string is held back until it is not;
 *    a stop string and what follows it are never emitted nor returned.
 *  - Prompts are prefilled in chunks of PREFILL_CHUNK tokens so that one tenant's long prompt
 *    does not hold a batched step for long, and a cancel is seen between chunks.
 *  - chat keeps conversations in this instance (table below): the history, the session (KV
 *    cache) and the tokens it holds. Each call renders the whole history with the model's chat
 *    template, tokenizes it, rewinds the session to the common prefix and forwards only the
 *    rest. When the host refuses a new session (ELIMIT), the least recently used other
 *    conversation gives up its session (its history stays; it is re-prefilled when used).
 *    A conversation that outgrows the context drops its oldest non-system messages.
 *    A cancelled or failed chat call leaves the history as it was.
 */
#include "realm_guest.h"

#define PENALTY_LAST_N 64
#define PREFILL_CHUNK 512
#define MAX_STOP 16
#define MAX_STOP_IDS 256
#define DETOK_CAP 256
#define MAX_CONVS 64

/* ---------------------------------------------------------------------------------------------
 * Parameters (the metadata's JSON schemas and the guest's validation both come from these)
 * ------------------------------------------------------------------------------------------- */
#define MODEL_PARAM                                                                            \
    {.name = "model",                                                                          \
     .type = RG_P_STRING,                                                                      \
     .max_length = 256,                                                                        \
     .description = "Which loaded model to use (default: the host's default model)."}

#define SAMPLING_PARAMS                                                                        \
    {.name = "max_tokens",                                                                     \
     .type = RG_P_INT,                                                                         \
     .def = "128",                                                                             \
     .minimum = "1",                                                                           \
     .description = "Generate at most this many tokens (the context also ends generation)."},  \
        {.name = "temperature",                                                                \
         .type = RG_P_NUMBER,                                                                  \
         .def = "0.8",                                                                         \
         .minimum = "0",                                                                       \
         .description = "Sampling temperature; 0 is greedy (always the most likely token)."},  \
        {.name = "top_k",                                                                      \
         .type = RG_P_INT,                                                                     \
         .def = "40",                                                                          \
         .minimum = "0",                                                                       \
         .description = "Sample among the k most likely tokens; 0 disables."},                 \
        {.name = "top_p",                                                                      \
         .type = RG_P_NUMBER,                                                                  \
         .def = "0.95",                                                                        \
         .exclusive_minimum = "0",                                                             \
         .maximum = "1",                                                                       \
         .description = "Nucleus sampling: the smallest set of tokens with this much "         \
                        "probability; 1 disables."},                                           \
        {.name = "min_p",                                                                      \
         .type = RG_P_NUMBER,                                                                  \
         .def = "0.05",                                                                        \
         .minimum = "0",                                                                       \
         .maximum = "1",                                                                       \
         .description = "Drop tokens less likely than min_p times the most likely one; 0 "     \
                        "disables."},                                                          \
        {.name = "repeat_penalty",                                                             \
         .type = RG_P_NUMBER,                                                                  \
         .def = "1.0",                                                                         \
         .exclusive_minimum = "0",                                                             \
         .description = "llama.cpp repetition penalty over the last 64 tokens: positive "      \
                        "logits are divided by it, negative ones multiplied; 1 (the default, " \
                        "as in llama.cpp) disables."},                                         \
        {.name = "presence_penalty",                                                           \
         .type = RG_P_NUMBER,                                                                  \
         .def = "0",                                                                           \
         .minimum = "-2",                                                                      \
         .maximum = "2",                                                                       \
         .description = "OpenAI presence penalty: subtracted from the logit of every token "   \
                        "seen in the last 64 tokens."},                                        \
        {.name = "frequency_penalty",                                                          \
         .type = RG_P_NUMBER,                                                                  \
         .def = "0",                                                                           \
         .minimum = "-2",                                                                      \
         .maximum = "2",                                                                       \
         .description = "OpenAI frequency penalty: subtracted once per occurrence in the "     \
                        "last 64 tokens."},                                                    \
        {.name = "seed",                                                                       \
         .type = RG_P_INT,                                                                     \
         .description = "Random seed: the same seed, parameters and model give the same "      \
                        "text. Without one, each call draws a fresh seed."},                   \
        {.name = "stop",                                                                       \
         .type = RG_P_STRINGS,                                                                 \
         .min_length = 1,                                                                      \
         .max_items = MAX_STOP,                                                                \
         .description = "Stop when the text contains one of these strings; it is not "         \
                        "included in the output."},                                            \
        {.name = "stop_token_ids",                                                             \
         .type = RG_P_INTS,                                                                    \
         .max_items = MAX_STOP_IDS,                                                            \
         .description = "Stop when one of these token ids is sampled (besides the model's "    \
                        "end-of-generation tokens)."},                                         \
        MODEL_PARAM

static const rg_param generate_params[] = {
    {.name = "prompt",
     .type = RG_P_STRING,
     .required = 1,
     .description = "The prompt text (tokenized with the model's BOS, special-token text is "
                    "not parsed)."},
    SAMPLING_PARAMS,
};

static const rg_param chat_params[] = {
    {.name = "message",
     .type = RG_P_STRING,
     .description = "A user message appended to the conversation's history."},
    {.name = "messages",
     .type = RG_P_JSON,
     .schema = "{\"type\":\"array\",\"items\":{\"type\":\"object\",\"properties\":{"
               "\"role\":{\"type\":\"string\",\"minLength\":1},\"content\":{\"type\":\"string\"}},"
               "\"required\":[\"role\",\"content\"]},"
               "\"description\":\"The whole conversation as [{role, content}, ...]: replaces "
               "the stored history (the cached prefix is still reused).\"}"},
    {.name = "conversation",
     .type = RG_P_STRING,
     .def = "\"default\"",
     .min_length = 1,
     .max_length = 256,
     .description = "Conversation id: history and KV cache persist across calls under it."},
    {.name = "reset",
     .type = RG_P_BOOL,
     .def = "false",
     .description = "Forget the conversation first (history and cache)."},
    SAMPLING_PARAMS,
};

#define TOKENIZE_PARAMS                                                                        \
    {.name = "text", .type = RG_P_STRING, .required = 1, .description = "The text."},          \
        {.name = "add_special",                                                                \
         .type = RG_P_BOOL,                                                                    \
         .def = "false",                                                                       \
         .description = "Add BOS/EOS as the model does."},                                     \
        {.name = "parse_special",                                                              \
         .type = RG_P_BOOL,                                                                    \
         .def = "false",                                                                       \
         .description = "Read special-token text (such as <|im_start|>) as those tokens."},    \
        MODEL_PARAM

static const rg_param tokenize_params[] = {TOKENIZE_PARAMS};
static const rg_param count_tokens_params[] = {TOKENIZE_PARAMS};
static const rg_param embed_params[] = {
    {.name = "text", .type = RG_P_STRING, .required = 1, .description = "The text."},
    MODEL_PARAM,
};

/* ---------------------------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------------------------- */
static const char *status_name(int st) {
    switch (st) {
    case REALM_EINVAL: return "EINVAL";
    case REALM_EBOUNDS: return "EBOUNDS";
    case REALM_ENOENT: return "ENOENT";
    case REALM_ECANCELLED: return "ECANCELLED";
    case REALM_ELIMIT: return "ELIMIT";
    case REALM_ENOTSUP: return "ENOTSUP";
    case REALM_EINTERNAL: return "EINTERNAL";
    default: return "error";
    }
}
/* An import failed: the error result names it (the host's log/errors hold its details). */
static int import_failed(rg_call *c, const char *what, int st) {
    return rg_fail(c, st, "%s: %s failed: %s (%d)", c->fn->name, what, status_name(st), st);
}
static int contains(const int32_t *a, int n, int32_t x) {
    for (int i = 0; i < n; i++)
        if (a[i] == x) return 1;
    return 0;
}
static int clamp_int(int64_t v, int lo, int hi) {
    return v < lo ? lo : v > hi ? hi : (int)v;
}

/* ---------------------------------------------------------------------------------------------
 * Conversations (chat): kept across calls of this instance
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    const char *role;
    int role_len;
    const char *content;
    int content_len;
} msg;

typedef struct {
    int used;
    char *id;
    int id_len;
    char *model;
    int model_len;
    int session;    /* -1: none */
    rg_ivec tokens; /* what the session holds (heap) */
    msg *msgs;      /* owned strings (heap) */
    int n_msgs;
    uint64_t last_used;
    int detok_dirty; /* the session's detokenizer may hold bytes from an unfinished call */
} conv;

static conv g_convs[MAX_CONVS];
static uint64_t g_tick;

/* Sessions whose close failed (a cancelled call's imports all return ECANCELLED): closed at
 * the start of the next call, so that cancelled calls do not leak the tenant's sessions. */
#define MAX_DEFERRED 64
static int32_t g_deferred[MAX_DEFERRED];
static int g_n_deferred;

static void close_session(int32_t s) {
    if (s < 0) return;
    int st = realm_session_close(s);
    if ((st == REALM_ECANCELLED || st == REALM_EINTERNAL) && g_n_deferred < MAX_DEFERRED)
        g_deferred[g_n_deferred++] = s;
}
static void close_deferred(void) {
    int done = 0;
    while (done < g_n_deferred) {
        /* this call is cancelled too: try again next time (the host stops a guest that keeps
         * ignoring errors, so do not insist) */
        if (realm_session_close(g_deferred[done]) == REALM_ECANCELLED) break;
        done++;
    }
    memmove(g_deferred, g_deferred + done, sizeof(int32_t) * (size_t)(g_n_deferred - done));
    g_n_deferred -= done;
}

static void conv_drop_session(conv *cv) {
    close_session(cv->session);
    cv->session = -1;
    cv->tokens.len = 0;
    cv->detok_dirty = 0;
}
static void conv_free_msgs(msg *m, int n) {
    for (int i = 0; i < n; i++) {
        rg_free((void *)m[i].role);
        rg_free((void *)m[i].content);
    }
    rg_free(m);
}
static void conv_clear(conv *cv) {
    conv_drop_session(cv);
    conv_free_msgs(cv->msgs, cv->n_msgs);
    cv->msgs = NULL;
    cv->n_msgs = 0;
}
static void conv_remove(conv *cv) {
    conv_clear(cv);
    rg_ivec_free(&cv->tokens);
    rg_free(cv->id);
    rg_free(cv->model);
    memset(cv, 0, sizeof *cv);
    cv->session = -1;
}
static conv *conv_find(const char *id, int n) {
    for (int i = 0; i < MAX_CONVS; i++)
        if (g_convs[i].used && g_convs[i].id_len == n && memcmp(g_convs[i].id, id, (size_t)n) == 0)
            return &g_convs[i];
    return NULL;
}
static conv *conv_create(const char *id, int n) {
    conv *slot = NULL;
    for (int i = 0; i < MAX_CONVS && !slot; i++)
        if (!g_convs[i].used) slot = &g_convs[i];
    if (!slot) { /* full: forget the least recently used conversation */
        slot = &g_convs[0];
        for (int i = 1; i < MAX_CONVS; i++)
            if (g_convs[i].last_used < slot->last_used) slot = &g_convs[i];
        conv_remove(slot);
    }
    memset(slot, 0, sizeof *slot);
    slot->session = -1;
    slot->id = rg_strndup(id, n);
    if (!slot->id) return NULL;
    slot->id_len = n;
    slot->used = 1;
    return slot;
}
/* Free a KV session held by the least recently used conversation other than `keep`. */
static int evict_one_session(conv *keep) {
    conv *victim = NULL;
    for (int i = 0; i < MAX_CONVS; i++) {
        conv *cv = &g_convs[i];
        if (cv->used && cv != keep && cv->session >= 0 &&
            (!victim || cv->last_used < victim->last_used))
            victim = cv;
    }
    if (!victim) return 0;
    conv_drop_session(victim);
    return 1;
}
/* session_open; when the host's session limit is reached, idle conversations give theirs up. */
static int open_session(const char *model, int model_len, int capacity, conv *keep) {
    int s = realm_session_open(model, model_len, capacity);
    while (s == REALM_ELIMIT && evict_one_session(keep))
        s = realm_session_open(model, model_len, capacity);
    return s;
}

/* ---------------------------------------------------------------------------------------------
 * Generation
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    rg_call *c;
    const char *model;
    int model_len;
    rg_model_info mi;
    rg_sampling sp;
    int64_t max_tokens;
    const char *stop[MAX_STOP];
    int stop_len[MAX_STOP];
    int n_stop, max_stop_len;
    int32_t stop_ids[MAX_STOP_IDS];
    int n_stop_ids;
    rg_rng rng;
} gen_cfg;

typedef struct {
    rg_buf text;  /* everything generated so far (cut at a stop string) */
    int emitted;  /* bytes of text streamed with emit */
    int completion_tokens;
    const char *finish;
    int stop_hit; /* a stop string matched */
    int64_t t_start, t_prompt_done, t_end;
} gen_out;

/* Read the model and sampling params (shared by generate and chat). */
static int gen_setup(rg_call *c, gen_cfg *g) {
    memset(g, 0, sizeof *g);
    g->c = c;
    if (g_n_deferred) close_deferred();
    g->model = rg_param_str(c, "model", &g->model_len);
    if (!g->model) g->model = "", g->model_len = 0;
    int st = rg_get_model_info(c->arena, g->model, g->model_len, &g->mi);
    if (st == REALM_ENOENT)
        return rg_fail(c, REALM_EINVAL, "%s: model: no model %.*q on this host", c->fn->name,
                       g->model_len, g->model);
    if (st < 0) return import_failed(c, "model_info", st);
    g->sp.temperature = (float)rg_param_num(c, "temperature");
    g->sp.top_k = clamp_int(rg_param_int(c, "top_k"), 0, 0x7fffffff);
    g->sp.top_p = (float)rg_param_num(c, "top_p");
    g->sp.min_p = (float)rg_param_num(c, "min_p");
    g->sp.repeat_penalty = (float)rg_param_num(c, "repeat_penalty");
    g->sp.presence_penalty = (float)rg_param_num(c, "presence_penalty");
    g->sp.frequency_penalty = (float)rg_param_num(c, "frequency_penalty");
    g->max_tokens = rg_param_int(c, "max_tokens");
    const rg_json *stop = rg_param_get(c, "stop");
    if (stop && stop->type == RG_JARR)
        for (const rg_json *s = stop->child; s && g->n_stop < MAX_STOP; s = s->next) {
            if (s->type != RG_JSTR || s->len == 0) continue;
            g->stop[g->n_stop] = s->str;
            g->stop_len[g->n_stop++] = s->len;
            if (s->len > g->max_stop_len) g->max_stop_len = s->len;
        }
    const rg_json *ids = rg_param_get(c, "stop_token_ids");
    if (ids && ids->type == RG_JARR)
        for (const rg_json *s = ids->child; s && g->n_stop_ids < MAX_STOP_IDS; s = s->next)
            g->stop_ids[g->n_stop_ids++] = (int32_t)clamp_int(rg_json_int(s, -1), -1, 0x7fffffff);
    const rg_json *seed = rg_json_get(c->params, "seed");
    if (seed) rg_rng_seed(&g->rng, (uint64_t)rg_json_int(seed, 0));
    else rg_rng_seed_host(&g->rng);
    return 0;
}

/* Stream text[emitted..upto). */
static int emit_upto(gen_out *o, int upto) {
    if (upto <= o->emitted) return 0;
    int st = realm_emit(o->text.p + o->emitted, upto - o->emitted);
    if (st < 0) return st;
    o->emitted = upto;
    return 0;
}

/* Look for a stop string in the unemitted text; stream what is safe. Returns 1 when a stop
 * string matched (the text is cut before it), 0 otherwise, or a negative status from emit.
 * `final`: the sequence is over, nothing needs holding back. */
static int settle(const gen_cfg *g, gen_out *o, int final) {
    const char *t = o->text.p;
    int len = o->text.len;
    int cut = -1;
    for (int k = 0; k < g->n_stop; k++) { /* the earliest match wins */
        int sl = g->stop_len[k];
        int last = (cut >= 0 ? cut : len - sl);
        if (last > len - sl) last = len - sl;
        for (int i = o->emitted; i <= last; i++)
            if (t[i] == g->stop[k][0] && memcmp(t + i, g->stop[k], (size_t)sl) == 0) {
                cut = i;
                break;
            }
    }
    if (cut >= 0) {
        o->text.len = cut;
        o->stop_hit = 1;
        int st = emit_upto(o, cut);
        return st < 0 ? st : 1;
    }
    int hold = 0;
    if (!final && g->n_stop) { /* the longest tail that could start a stop string */
        int k = len - o->emitted;
        if (k > g->max_stop_len - 1) k = g->max_stop_len - 1;
        for (; k > 0 && !hold; k--)
            for (int s = 0; s < g->n_stop; s++)
                if (g->stop_len[s] > k && memcmp(t + len - k, g->stop[s], (size_t)k) == 0) {
                    hold = k;
                    break;
                }
    }
    return emit_upto(o, len - hold);
}

/* Push a token (or REALM_DETOK_*) to the session's detokenizer and append the text it gives. */
static int take_text(int session, int token, rg_buf *out) {
    char buf[DETOK_CAP];
    int n = realm_detokenize(session, token, buf, DETOK_CAP);
    for (int rounds = 0; n >= 0; rounds++) {
        rg_buf_put(out, buf, n);
        /* a full buffer (less up to 3 bytes: the host never splits a character) may mean more */
        if (n < DETOK_CAP - 3 || rounds > 1 << 16) return 0;
        n = realm_detokenize(session, REALM_DETOK_TAKE, buf, DETOK_CAP);
    }
    return n;
}
static void discard_detok(int session) {
    rg_arena a = {0};
    rg_buf junk = rg_buf_in(&a);
    take_text(session, REALM_DETOK_FLUSH, &junk);
    rg_arena_free(&a);
}

/* Forward tokens[0..n) in chunks; the last chunk's last logits land in `logits`. Each chunk is
 * appended to `hist` once the host has taken it. Returns 0 or a negative status. */
static int prefill(int session, const int32_t *tokens, int n, float *logits, int n_vocab,
                   rg_ivec *hist) {
    for (int off = 0; off < n; off += PREFILL_CHUNK) {
        int k = n - off < PREFILL_CHUNK ? n - off : PREFILL_CHUNK;
        int last = off + k == n;
        int st = realm_forward(session, tokens + off, k, last ? logits : NULL, last ? n_vocab : 0,
                               last ? REALM_FORWARD_LAST : REALM_FORWARD_NO_LOGITS);
        if (st < 0) return st;
        rg_ivec_append(hist, tokens + off, k);
        if (hist->oom) return REALM_ELIMIT;
    }
    return 0;
}

/* Sample until a stop condition. The session holds hist (its last logits are in `logits`);
 * capacity bounds the session's positions. Returns 0 (o->finish set) or a failed status with
 * the error result set. */
static int gen_run(gen_cfg *g, int session, int capacity, rg_ivec *hist, float *logits,
                   gen_out *o) {
    rg_call *c = g->c;
    int V = g->mi.vocab_size, st = 0;
    const char *what = "";
    int32_t *ids = (int32_t *)rg_arena_alloc(c->arena, (size_t)V * 4);
    float *w = (float *)rg_arena_alloc(c->arena, (size_t)V * 4);
    if (!ids || !w) return rg_fail(c, REALM_ELIMIT, "%s: out of memory", c->fn->name);
    for (;;) {
        if (o->completion_tokens >= g->max_tokens) {
            o->finish = "length";
            break;
        }
        int nl = hist->len < PENALTY_LAST_N ? hist->len : PENALTY_LAST_N;
        rg_apply_penalties(&g->sp, logits, V, hist->p + hist->len - nl, nl);
        int32_t tok = rg_sample(&g->sp, logits, V, ids, w, &g->rng);
        o->completion_tokens++;
        if (contains(g->mi.eog_ids, g->mi.n_eog, tok) ||
            contains(g->stop_ids, g->n_stop_ids, tok)) {
            o->finish = "stop";
            break;
        }
        if ((st = take_text(session, tok, &o->text)) < 0) {
            what = "detokenize";
            goto fail;
        }
        if (o->text.oom) return rg_fail(c, REALM_ELIMIT, "%s: out of memory", c->fn->name);
        if ((st = settle(g, o, 0)) < 0) {
            what = "emit";
            goto fail;
        }
        if (st == 1) {
            o->finish = "stop";
            break;
        }
        if (o->completion_tokens >= g->max_tokens ||
            (capacity > 0 && hist->len + 1 > capacity)) {
            o->finish = "length";
            break;
        }
        if ((st = realm_forward(session, &tok, 1, logits, V, REALM_FORWARD_LAST)) < 0) {
            what = "forward";
            goto fail;
        }
        rg_ivec_push(hist, tok);
        if (hist->oom) return rg_fail(c, REALM_ELIMIT, "%s: out of memory", c->fn->name);
    }
    if (o->stop_hit) {
        discard_detok(session); /* what follows the stop string is dropped */
    } else {
        if ((st = take_text(session, REALM_DETOK_FLUSH, &o->text)) < 0) {
            what = "detokenize";
            goto fail;
        }
        if ((st = settle(g, o, 1)) < 0) {
            what = "emit";
            goto fail;
        }
        if (st == 1) o->finish = "stop";
    }
    return 0;
fail:
    if (st == REALM_ECANCELLED) {
        o->finish = "cancelled";
        return 0;
    }
    return import_failed(c, what, st);
}

static void write_usage_and_text(rg_buf *b, gen_out *o, int prompt_tokens, int cached) {
    int text_len = o->finish && o->finish[0] == 'c' ? o->emitted : o->text.len;
    rg_buf_puts(b, "{\"text\":");
    rg_buf_json_str(b, o->text.p ? o->text.p : "", text_len);
    rg_buf_fmt(b, ",\"finish_reason\":%q", o->finish ? o->finish : "stop");
    rg_buf_fmt(b, ",\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d",
               prompt_tokens, o->completion_tokens, prompt_tokens + o->completion_tokens);
    if (cached >= 0) rg_buf_fmt(b, ",\"cached_tokens\":%d", cached);
    int64_t prompt_ms = o->t_prompt_done - o->t_start, gen_ms = o->t_end - o->t_prompt_done;
    rg_buf_fmt(b, "},\"timings\":{\"prompt_ms\":%lld,\"generation_ms\":%lld}", (long long)prompt_ms,
               (long long)gen_ms);
}

static int64_t now_ms(void) {
    int64_t t = realm_clock_ms();
    return t < 0 ? 0 : t;
}

/* ---------------------------------------------------------------------------------------------
 * generate
 * ------------------------------------------------------------------------------------------- */
static int do_generate(rg_call *c) {
    gen_cfg g;
    int st = gen_setup(c, &g);
    if (st < 0) return st;
    int plen;
    const char *prompt = rg_param_str(c, "prompt", &plen);
    int32_t *toks;
    int n = rg_tokenize(c->arena, g.model, g.model_len, prompt, plen, REALM_TOKENIZE_ADD_SPECIAL,
                        &toks);
    if (n < 0) return import_failed(c, "tokenize", n);
    if (n == 0) return rg_fail(c, REALM_EINVAL, "generate: the prompt has no tokens");
    int ctx = g.mi.context_length;
    if (ctx > 0 && n > ctx)
        return rg_fail(c, REALM_EINVAL,
                       "generate: prompt: the prompt is %d tokens, longer than the model's "
                       "context of %d tokens",
                       n, ctx);
    int64_t want = (int64_t)n + g.max_tokens;
    int capacity = ctx > 0 && want > ctx ? ctx : want > 0x7fffffff ? 0x7fffffff : (int)want;
    int session = open_session(g.model, g.model_len, capacity, NULL);
    if (session < 0) return import_failed(c, "session_open", session);
    gen_out o;
    memset(&o, 0, sizeof o);
    o.text = rg_buf_in(c->arena);
    float *logits = (float *)rg_arena_alloc(c->arena, (size_t)g.mi.vocab_size * 4);
    rg_ivec hist = {0, 0, 0, 0, c->arena};
    if (!logits) {
        close_session(session);
        return rg_fail(c, REALM_ELIMIT, "generate: out of memory");
    }
    o.t_start = now_ms();
    st = prefill(session, toks, n, logits, g.mi.vocab_size, &hist);
    o.t_prompt_done = now_ms();
    if (st == REALM_ECANCELLED) {
        o.finish = "cancelled";
        st = 0;
    } else if (st < 0) {
        close_session(session);
        return import_failed(c, "forward", st);
    } else {
        st = gen_run(&g, session, capacity, &hist, logits, &o);
    }
    o.t_end = now_ms();
    close_session(session);
    if (st < 0) return st;
    rg_buf out = rg_buf_in(c->arena);
    write_usage_and_text(&out, &o, n, -1);
    rg_buf_putc(&out, '}');
    return rg_result(c, &out);
}

/* ---------------------------------------------------------------------------------------------
 * chat
 * ------------------------------------------------------------------------------------------- */
static void write_messages(rg_buf *b, const msg *m, int n, const int *pick, int n_pick) {
    rg_buf_putc(b, '[');
    for (int k = 0; k < n_pick; k++) {
        const msg *x = &m[pick[k]];
        rg_buf_puts(b, k ? ",{\"role\":" : "{\"role\":");
        rg_buf_json_str(b, x->role, x->role_len);
        rg_buf_puts(b, ",\"content\":");
        rg_buf_json_str(b, x->content, x->content_len);
        rg_buf_putc(b, '}');
    }
    rg_buf_putc(b, ']');
    (void)n;
}

/* Replace the conversation's history with m[pick] + the assistant's reply (copied). */
static int commit_history(conv *cv, const msg *m, const int *pick, int n_pick, const char *reply,
                          int reply_len) {
    msg *nm = (msg *)rg_calloc(sizeof(msg) * (size_t)(n_pick + 1));
    if (!nm) return 0;
    int ok = 1;
    for (int k = 0; k <= n_pick; k++) {
        const char *r = k < n_pick ? m[pick[k]].role : "assistant";
        int rl = k < n_pick ? m[pick[k]].role_len : 9;
        const char *t = k < n_pick ? m[pick[k]].content : reply;
        int tl = k < n_pick ? m[pick[k]].content_len : reply_len;
        nm[k].role = rg_strndup(r, rl);
        nm[k].content = rg_strndup(t ? t : "", tl);
        nm[k].role_len = rl;
        nm[k].content_len = tl;
        ok &= nm[k].role && nm[k].content;
    }
    if (!ok) {
        conv_free_msgs(nm, n_pick + 1);
        return 0;
    }
    conv_free_msgs(cv->msgs, cv->n_msgs);
    cv->msgs = nm;
    cv->n_msgs = n_pick + 1;
    return 1;
}

static int do_chat(rg_call *c) {
    rg_arena *A = c->arena;
    int id_len, msg_len;
    const char *id = rg_param_str(c, "conversation", &id_len);
    const char *message = rg_param_str(c, "message", &msg_len);
    const rg_json *messages = rg_json_get(c->params, "messages");
    conv *cv = conv_find(id, id_len);
    if (rg_param_bool(c, "reset") && cv) conv_clear(cv);

    if (!messages && !message) {
        if (!rg_param_bool(c, "reset"))
            return rg_fail(c, REALM_EINVAL,
                           "chat: send 'message' (a user turn) or 'messages' (the whole "
                           "conversation)");
        rg_buf out = rg_buf_in(A);
        rg_buf_fmt(&out, "{\"conversation\":%.*q,\"reset\":true,\"messages\":0}", id_len, id);
        return rg_result(c, &out);
    }
    /* the new history: messages (or the stored one) + message */
    int n_base = messages ? messages->len : cv ? cv->n_msgs : 0;
    int count = n_base + (message ? 1 : 0);
    msg *m = (msg *)rg_arena_alloc(A, sizeof(msg) * (size_t)(count + 1));
    int *pick = (int *)rg_arena_alloc(A, sizeof(int) * (size_t)(count + 1));
    if (!m || !pick) return rg_fail(c, REALM_ELIMIT, "chat: out of memory");
    if (messages) {
        if (messages->type != RG_JARR)
            return rg_fail(c, REALM_EINVAL, "chat: params: 'messages' must be an array");
        int i = 0;
        for (const rg_json *it = messages->child; it; it = it->next, i++) {
            const rg_json *role = rg_json_get(it, "role"), *content = rg_json_get(it, "content");
            if (it->type != RG_JOBJ)
                return rg_fail(c, REALM_EINVAL, "chat: params: 'messages'[%d] must be an object",
                               i);
            if (!role || role->type != RG_JSTR || role->len == 0)
                return rg_fail(c, REALM_EINVAL,
                               "chat: params: 'messages'[%d].role must be a non-empty string", i);
            if (!content || content->type != RG_JSTR)
                return rg_fail(c, REALM_EINVAL,
                               "chat: params: 'messages'[%d].content must be a string", i);
            m[i] = (msg){role->str, role->len, content->str, content->len};
        }
    } else {
        for (int i = 0; i < n_base; i++) m[i] = cv->msgs[i];
    }
    if (message) m[n_base] = (msg){"user", 4, message, msg_len};
    if (count == 0) return rg_fail(c, REALM_EINVAL, "chat: 'messages' is empty");

    gen_cfg g;
    int st = gen_setup(c, &g);
    if (st < 0) return st;
    const rg_json *has_template = rg_json_get(g.mi.json, "has_chat_template");
    if (has_template && has_template->type == RG_JBOOL && !has_template->b)
        return rg_fail(c, REALM_ENOTSUP, "chat: the model has no chat template (use generate)");
    if (!cv && !(cv = conv_create(id, id_len)))
        return rg_fail(c, REALM_ELIMIT, "chat: out of memory");
    cv->last_used = ++g_tick;
    if (!cv->model || !rg_streq(g.model, g.model_len, cv->model)) {
        conv_drop_session(cv);
        rg_free(cv->model);
        cv->model = rg_strndup(g.model, g.model_len);
        cv->model_len = g.model_len;
        if (!cv->model) return rg_fail(c, REALM_ELIMIT, "chat: out of memory");
    }

    /* render and tokenize; drop the oldest non-system messages while it does not fit */
    int ctx = g.mi.context_length;
    int reserve = g.max_tokens < ctx / 4 ? (int)g.max_tokens : ctx / 4;
    int first = 0, dropped = 0, n = 0;
    int32_t *toks = NULL;
    int n_sys = 0;
    while (n_sys < count - 1 && rg_streq(m[n_sys].role, m[n_sys].role_len, "system")) n_sys++;
    for (;;) {
        int n_pick = 0;
        for (int i = 0; i < n_sys; i++) pick[n_pick++] = i;
        for (int i = n_sys + first; i < count; i++) pick[n_pick++] = i;
        rg_buf js = rg_buf_in(A);
        write_messages(&js, m, count, pick, n_pick);
        if (js.oom) return rg_fail(c, REALM_ELIMIT, "chat: out of memory");
        char *prompt;
        int plen = rg_chat_template(A, g.model, g.model_len, js.p, js.len, 1, &prompt);
        if (plen < 0) return import_failed(c, "chat_template", plen);
        n = rg_tokenize(A, g.model, g.model_len, prompt, plen,
                        REALM_TOKENIZE_ADD_SPECIAL | REALM_TOKENIZE_PARSE_SPECIAL, &toks);
        if (n < 0) return import_failed(c, "tokenize", n);
        if (n >= 2 && g.mi.bos_id >= 0 && toks[0] == g.mi.bos_id && toks[1] == g.mi.bos_id)
            toks++, n--; /* the template wrote the BOS the tokenizer also added */
        if (n == 0) return rg_fail(c, REALM_EINVAL, "chat: the rendered prompt has no tokens");
        if (ctx <= 0 || n + reserve <= ctx) break;
        if (count - n_sys - first > 1) { /* keep at least the newest message */
            first++, dropped++;
            continue;
        }
        if (n <= ctx) break; /* only the newest message left: generate what fits */
        return rg_fail(c, REALM_EINVAL,
                       "chat: messages: the conversation is %d tokens, longer than the model's "
                       "context of %d tokens (reset it, or send a shorter message)",
                       n, ctx);
    }
    int n_pick = 0;
    for (int i = 0; i < n_sys; i++) pick[n_pick++] = i;
    for (int i = n_sys + first; i < count; i++) pick[n_pick++] = i;

    /* the session: reconcile what we believe it holds with the host, then reuse the prefix */
    if (cv->session >= 0) {
        int pos = realm_session_pos(cv->session);
        if (pos == REALM_ECANCELLED) return rg_fail(c, pos, "chat: cancelled");
        if (pos < 0) {
            cv->session = -1; /* gone (closed by the host): start afresh */
            cv->tokens.len = 0;
        } else if (pos < cv->tokens.len) {
            cv->tokens.len = pos;
        } else if (pos > cv->tokens.len) {
            int r = realm_session_rewind(cv->session, cv->tokens.len);
            if (r < 0) conv_drop_session(cv);
        }
    }
    if (cv->session < 0) {
        int s = open_session(g.model, g.model_len, 0, cv);
        if (s < 0) return import_failed(c, "session_open", s);
        realm_session_keep(s); /* the conversation's cache outlives this call, however it ends */
        cv->session = s;
        cv->tokens.len = 0;
        cv->detok_dirty = 0;
    }
    int common = 0;
    while (common < cv->tokens.len && common < n && cv->tokens.p[common] == toks[common]) common++;
    if (common >= n) common = n - 1; /* forward at least one token to get logits */
    if (cv->tokens.len > common) {
        int r = realm_session_rewind(cv->session, common);
        if (r == REALM_ECANCELLED) return rg_fail(c, r, "chat: cancelled");
        if (r < 0) return import_failed(c, "session_rewind", r);
        cv->tokens.len = common;
    }
    if (cv->detok_dirty) discard_detok(cv->session);
    cv->detok_dirty = 1;

    gen_out o;
    memset(&o, 0, sizeof o);
    o.text = rg_buf_in(A);
    float *logits = (float *)rg_arena_alloc(A, (size_t)g.mi.vocab_size * 4);
    if (!logits) return rg_fail(c, REALM_ELIMIT, "chat: out of memory");
    o.t_start = now_ms();
    st = prefill(cv->session, toks + common, n - common, logits, g.mi.vocab_size, &cv->tokens);
    o.t_prompt_done = now_ms();
    if (st == REALM_ECANCELLED) {
        o.finish = "cancelled";
        st = 0;
    } else if (st < 0) {
        return import_failed(c, "forward", st);
    } else {
        st = gen_run(&g, cv->session, ctx, &cv->tokens, logits, &o);
    }
    o.t_end = now_ms();
    if (st < 0) return st;
    int cancelled = o.finish[0] == 'c';
    if (!cancelled) {
        cv->detok_dirty = 0;
        if (!commit_history(cv, m, pick, n_pick, o.text.p, o.text.len))
            return rg_fail(c, REALM_ELIMIT, "chat: out of memory");
    }
    rg_buf out = rg_buf_in(A);
    write_usage_and_text(&out, &o, n, common);
    rg_buf_fmt(&out, ",\"conversation\":%.*q,\"messages\":%d", id_len, id,
               cancelled ? cv->n_msgs : n_pick + 1);
    if (dropped) rg_buf_fmt(&out, ",\"dropped_messages\":%d", dropped);
    rg_buf_putc(&out, '}');
    return rg_result(c, &out);
}

/* ---------------------------------------------------------------------------------------------
 * tokenize, count_tokens, embed
 * ------------------------------------------------------------------------------------------- */
static int tokenize_text(rg_call *c, int32_t **toks) {
    int mlen, tlen;
    const char *model = rg_param_str(c, "model", &mlen);
    const char *text = rg_param_str(c, "text", &tlen);
    int flags = (rg_param_bool(c, "add_special") ? REALM_TOKENIZE_ADD_SPECIAL : 0) |
                (rg_param_bool(c, "parse_special") ? REALM_TOKENIZE_PARSE_SPECIAL : 0);
    int n = rg_tokenize(c->arena, model ? model : "", model ? mlen : 0, text, tlen, flags, toks);
    if (n == REALM_ENOENT)
        return rg_fail(c, n, "%s: no model %.*q on this host", c->fn->name, mlen, model);
    if (n < 0) return import_failed(c, "tokenize", n);
    return n;
}

static int do_tokenize(rg_call *c) {
    int32_t *toks;
    int n = tokenize_text(c, &toks);
    if (n < 0) return n;
    rg_buf out = rg_buf_in(c->arena);
    rg_buf_puts(&out, "{\"tokens\":[");
    for (int i = 0; i < n; i++) rg_buf_fmt(&out, i ? ",%d" : "%d", toks[i]);
    rg_buf_fmt(&out, "],\"count\":%d}", n);
    return rg_result(c, &out);
}

static int do_count_tokens(rg_call *c) {
    int32_t *toks;
    int n = tokenize_text(c, &toks);
    if (n < 0) return n;
    rg_buf out = rg_buf_in(c->arena);
    rg_buf_fmt(&out, "{\"count\":%d}", n);
    return rg_result(c, &out);
}

static int do_embed(rg_call *c) {
    int32_t *toks;
    int n = tokenize_text(c, &toks);
    if (n < 0) return n;
    if (n == 0) return rg_fail(c, REALM_EINVAL, "embed: the text has no tokens");
    int mlen = 0;
    const char *model = rg_param_str(c, "model", &mlen);
    if (!model) mlen = 0;
    int dim = realm_embed(model ? model : "", mlen, toks, n, 0, 0); /* size query */
    if (dim < 0) return import_failed(c, "embed", dim);
    float *vec = (float *)rg_arena_alloc(c->arena, (size_t)dim * sizeof(float));
    if (!vec) return rg_fail(c, REALM_ELIMIT, "embed: out of memory for %d floats", dim);
    int st = realm_embed(model ? model : "", mlen, toks, n, vec, dim);
    if (st < 0) return import_failed(c, "embed", st);
    rg_buf out = rg_buf_in(c->arena);
    rg_buf_puts(&out, "{\"embedding\":[");
    for (int i = 0; i < dim; i++) {
        if (i) rg_buf_puts(&out, ",");
        rg_buf_fmt(&out, "%g", (double)vec[i]);
    }
    rg_buf_fmt(&out, "],\"dim\":%d,\"pooling\":\"mean\",\"normalized\":true,"
                     "\"usage\":{\"prompt_tokens\":%d}}", dim, n);
    return rg_result(c, &out);
}

/* ---------------------------------------------------------------------------------------------
 * The module
 * ------------------------------------------------------------------------------------------- */
static const rg_function fn_generate = {
    "generate",
    "Complete a prompt, streaming the text token by token. Result: {text, finish_reason "
    "(stop|length|cancelled), usage {prompt_tokens, completion_tokens, total_tokens}, timings}.",
    1, generate_params, RG_COUNT(generate_params), do_generate};
static const rg_function fn_chat = {
    "chat",
    "Chat with the model's chat template, streaming the reply. The conversation (history and "
    "KV cache) persists across calls under its id; only the new part of the prompt is "
    "computed. Result: generate's fields plus conversation, messages (the history's length) "
    "and usage.cached_tokens.",
    1, chat_params, RG_COUNT(chat_params), do_chat};
static const rg_function fn_tokenize = {
    "tokenize", "Token ids of a text. Result: {tokens: [...], count}.", 0, tokenize_params,
    RG_COUNT(tokenize_params), do_tokenize};
static const rg_function fn_count_tokens = {
    "count_tokens", "The number of tokens in a text. Result: {count}.", 0, count_tokens_params,
    RG_COUNT(count_tokens_params), do_count_tokens};
static const rg_function fn_embed = {
    "embed",
    "Embedding of a text: the mean over its tokens of the model's final normalised "
    "hidden state, L2-normalised. Result: {embedding: [...], dim, pooling: \"mean\", "
    "normalized: true, usage {prompt_tokens}}.",
    0, embed_params, RG_COUNT(embed_params), do_embed};

static const rg_function *const functions[] = {&fn_generate, &fn_chat, &fn_tokenize,
                                               &fn_count_tokens, &fn_embed};
static const rg_module module = {
    "realm-default", "1",
    "Realm's default runtime: llama.cpp-style sampling, stop strings, streamed generation and "
    "chat with a per-conversation KV cache.",
    functions, RG_COUNT(functions)};

RG_MODULE(module)
RG_EXPORT_FUNCTION(generate, module, fn_generate)
RG_EXPORT_FUNCTION(chat, module, fn_chat)
RG_EXPORT_FUNCTION(tokenize, module, fn_tokenize)
RG_EXPORT_FUNCTION(count_tokens, module, fn_count_tokens)
RG_EXPORT_FUNCTION(embed, module, fn_embed)
