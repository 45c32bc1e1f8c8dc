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
#define SPEC_MAX_K 16        /* drafted tokens per verify step (the host's bound is k + 1 = 17) */
#define SPEC_K_LOOKUP 8      /* default k: prompt lookup drafts cost nothing */
#define SPEC_K_DRAFT 4       /* default k: each draft token costs a draft-model step */
#define SPEC_NGRAM_MAX 3     /* prompt lookup: the longest n-gram matched first */
#define SPEC_NGRAM_MIN 1     /* ... down to this one */
#define SPEC_P_MIN "0.3"     /* draft model: stop drafting below this top probability */

/* ---------------------------------------------------------------------------------------------
 * Parameters (the metadata's JSON schemas and the guest's validation both come from these)
 * ------------------------------------------------------------------------------------------- */
#define MODEL_PARAM                                                                            \
    {.name = "model",                                                                          \
     .type = RG_P_STRING,                                                                      \
     .max_length = 256,                                                                        \
     .description = "Which loaded model to use (default: the host's default model)."}

#define ADAPTER_PARAM                                                                          \
    {.name = "adapter",                                                                        \
     .type = RG_P_STRING,                                                                      \
     .max_length = 256,                                                                        \
     .description = "One of this tenant's LoRA adapters, applied to the model it adapts "     \
                    "(default: none, the base model)."}

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
        MODEL_PARAM, ADAPTER_PARAM

#define SPECULATIVE_PARAM                                                                      \
    {.name = "speculative",                                                                    \
     .type = RG_P_JSON,                                                                        \
     .schema =                                                                                 \
         "{\"type\":\"object\",\"properties\":{"                                                 \
         "\"mode\":{\"enum\":[\"lookup\",\"draft\"]},"                                            \
         "\"k\":{\"type\":\"integer\",\"minimum\":1,\"maximum\":16},"                              \
         "\"draft_model\":{\"type\":\"string\",\"minLength\":1,\"maxLength\":256},"                \
         "\"ngram_min\":{\"type\":\"integer\",\"minimum\":1,\"maximum\":8},"                      \
         "\"ngram_max\":{\"type\":\"integer\",\"minimum\":1,\"maximum\":8},"                      \
         "\"p_min\":{\"type\":\"number\",\"minimum\":0,\"maximum\":1}},"                           \
         "\"required\":[\"mode\"],\"additionalProperties\":false,"                              \
         "\"description\":\"Speculative decoding: a draft proposes k tokens, the model checks "    \
         "them in one step; the output is the model's own (greedy: the same tokens; sampled: "  \
         "the same distribution). mode lookup: drafts copied from n-gram matches in the "      \
         "context (k default 8, ngram_max 3 down to ngram_min 1); mode draft: drafts sampled " \
         "from draft_model, a loaded model with the same vocabulary (k default 4), which "    \
         "stops drafting where its most likely token has less than p_min (default "         \
         SPEC_P_MIN ").\"}"}

#define MAX_TOP_LOGPROBS 20
#define MAX_LOGPROBS_BYTES (768 << 10) /* the result stays under the host's 1 MiB */
#define LOGPROBS_PARAMS                                                                        \
    {.name = "logprobs",                                                                       \
     .type = RG_P_BOOL,                                                                        \
     .def = "false",                                                                           \
     .description = "Report each generated token's log-probability in the result's "          \
                    "`logprobs` (no speculative decoding for the call)."},                     \
        {.name = "top_logprobs",                                                               \
         .type = RG_P_INT,                                                                     \
         .def = "0",                                                                           \
         .minimum = "0",                                                                       \
         .maximum = "20",                                                                      \
         .description = "With logprobs: also list this many most likely tokens per step."}

static const rg_param generate_params[] = {
    {.name = "prompt",
     .type = RG_P_STRING,
     .required = 1,
     .description = "The prompt text (tokenized with the model's BOS, special-token text is "
                    "not parsed)."},
    SAMPLING_PARAMS,
    SPECULATIVE_PARAM,
    LOGPROBS_PARAMS,
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
    SPECULATIVE_PARAM,
    LOGPROBS_PARAMS,
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
    int mode;                /* 0 off, SPEC_LOOKUP, SPEC_DRAFT */
    int k;                   /* drafted tokens per verify step */
    int ngram_min, ngram_max;
    const char *draft_model; /* SPEC_DRAFT: the draft's name */
    int draft_model_len;
    float p_min; /* SPEC_DRAFT: drafting stops at a draft token of lower draft probability */
} spec_cfg;
enum { SPEC_LOOKUP = 1, SPEC_DRAFT = 2 };

typedef struct {
    rg_call *c;
    const char *model;
    int model_len;
    rg_model_info mi;
    spec_cfg spec;
    rg_sampling sp;
    int64_t max_tokens;
    const char *stop[MAX_STOP];
    int stop_len[MAX_STOP];
    int n_stop, max_stop_len;
    int32_t stop_ids[MAX_STOP_IDS];
    int n_stop_ids;
    rg_rng rng;
    int top_logprobs; /* -1: no logprobs; else the alternatives reported per token */
} gen_cfg;

typedef struct {
    rg_buf text;  /* everything generated so far (cut at a stop string) */
    int emitted;  /* bytes of text streamed with emit */
    int completion_tokens;
    const char *finish;
    int stop_hit; /* a stop string matched */
    int64_t t_start, t_prompt_done, t_end;
    int spec_steps, spec_drafted, spec_accepted; /* speculative: verify steps, drafts, kept */
    rg_buf lp;                                   /* logprobs: the result's array, inside [] */
} gen_out;

/* Read the speculative param (validated by the host against its schema; checked again). */
static int spec_setup(rg_call *c, gen_cfg *g) {
    const rg_json *sp = rg_json_get(c->params, "speculative");
    spec_cfg *x = &g->spec;
    if (!sp || sp->type == RG_JNULL) return 0;
    const char *fn = c->fn->name;
    if (sp->type != RG_JOBJ)
        return rg_fail(c, REALM_EINVAL, "%s: speculative must be an object", fn);
    const rg_json *mode = rg_json_get(sp, "mode");
    if (mode && mode->type == RG_JSTR && rg_streq(mode->str, mode->len, "lookup"))
        x->mode = SPEC_LOOKUP;
    else if (mode && mode->type == RG_JSTR && rg_streq(mode->str, mode->len, "draft"))
        x->mode = SPEC_DRAFT;
    else
        return rg_fail(c, REALM_EINVAL, "%s: speculative.mode must be \"lookup\" or \"draft\"",
                       fn);
    const rg_json *k = rg_json_get(sp, "k");
    x->k = x->mode == SPEC_LOOKUP ? SPEC_K_LOOKUP : SPEC_K_DRAFT;
    if (k) {
        int64_t v = rg_json_int(k, -1);
        if (k->type != RG_JNUM || v < 1 || v > SPEC_MAX_K)
            return rg_fail(c, REALM_EINVAL, "%s: speculative.k must be an integer in [1, %d]", fn,
                           SPEC_MAX_K);
        x->k = (int)v;
    }
    x->ngram_min = SPEC_NGRAM_MIN, x->ngram_max = SPEC_NGRAM_MAX;
    const rg_json *lo = rg_json_get(sp, "ngram_min"), *hi = rg_json_get(sp, "ngram_max");
    if (lo) x->ngram_min = (int)rg_json_int(lo, 0);
    if (hi) x->ngram_max = (int)rg_json_int(hi, 0);
    if (hi && !lo && x->ngram_min > x->ngram_max) x->ngram_min = x->ngram_max;
    if (lo && !hi && x->ngram_max < x->ngram_min) x->ngram_max = x->ngram_min;
    if (x->ngram_min < 1 || x->ngram_max > 8 || x->ngram_min > x->ngram_max)
        return rg_fail(c, REALM_EINVAL,
                       "%s: speculative: need 1 <= ngram_min <= ngram_max <= 8, got %d and %d", fn,
                       x->ngram_min, x->ngram_max);
    const rg_json *dm = rg_json_get(sp, "draft_model");
    const rg_json *pm = rg_json_get(sp, "p_min");
    if (x->mode == SPEC_LOOKUP) {
        if (dm || pm)
            return rg_fail(c, REALM_EINVAL,
                           "%s: speculative.%s is for mode \"draft\", not \"lookup\"", fn,
                           dm ? "draft_model" : "p_min");
        return 0;
    }
    x->p_min = (float)rg_json_num(pm, 0.3); /* SPEC_P_MIN */
    if (pm && (pm->type != RG_JNUM || !(x->p_min >= 0.0f && x->p_min <= 1.0f)))
        return rg_fail(c, REALM_EINVAL, "%s: speculative.p_min must be a number in [0, 1]", fn);
    if (!dm || dm->type != RG_JSTR || dm->len == 0)
        return rg_fail(c, REALM_EINVAL,
                       "%s: speculative.draft_model: mode \"draft\" needs the name of a loaded "
                       "model",
                       fn);
    x->draft_model = dm->str, x->draft_model_len = dm->len;
    rg_model_info dmi;
    int st = rg_get_model_info(c->arena, dm->str, dm->len, &dmi);
    if (st == REALM_ENOENT)
        return rg_fail(c, REALM_EINVAL, "%s: speculative.draft_model: no model %.*q on this host",
                       fn, dm->len, dm->str);
    if (st < 0) return import_failed(c, "model_info", st);
    const rg_json *h1 = rg_json_get(g->mi.json, "vocab_hash");
    const rg_json *h2 = rg_json_get(dmi.json, "vocab_hash");
    if (dmi.vocab_size != g->mi.vocab_size || !h1 || !h2 || h1->type != RG_JSTR ||
        h2->type != RG_JSTR || h1->len != h2->len || memcmp(h1->str, h2->str, (size_t)h1->len))
        return rg_fail(c, REALM_EINVAL,
                       "%s: speculative.draft_model: %.*q has a different vocabulary from the "
                       "model (%d and %d tokens%s): a draft must share the model's vocabulary",
                       fn, dm->len, dm->str, dmi.vocab_size, g->mi.vocab_size,
                       dmi.vocab_size == g->mi.vocab_size ? ", different token texts" : "");
    return 0;
}

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
    int alen = 0;
    const char *adapter = rg_param_str(c, "adapter", &alen);
    if (adapter && alen > 0) {
        /* the host resolves an adapter's name within this tenant, wherever a model's name
         * goes: the session then runs the adapter's model with the adapter applied */
        rg_model_info ai;
        st = rg_get_model_info(c->arena, adapter, alen, &ai);
        if (st == REALM_ENOENT || (st >= 0 && !rg_json_get(ai.json, "adapter")))
            return rg_fail(c, REALM_EINVAL, "%s: adapter: this tenant has no adapter %.*q",
                           c->fn->name, alen, adapter);
        if (st < 0) return import_failed(c, "model_info", st);
        const rg_json *base = rg_json_get(ai.json, "model");
        const rg_json *mine = rg_json_get(g->mi.json, "model");
        if (g->model_len > 0 && base && mine && base->type == RG_JSTR &&
            mine->type == RG_JSTR && !rg_streq(base->str, base->len, mine->str))
            return rg_fail(c, REALM_EINVAL, "%s: adapter: %.*q adapts model %.*q, not %.*q",
                           c->fn->name, alen, adapter, base->len, base->str, mine->len, mine->str);
        g->model = adapter, g->model_len = alen, g->mi = ai;
    }
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
    st = spec_setup(c, g);
    if (st < 0) return st;
    g->top_logprobs = -1;
    if (rg_param_bool(c, "logprobs")) { /* each step's logits: no speculation for this call */
        g->spec.mode = 0;
        g->top_logprobs = clamp_int(rg_param_int(c, "top_logprobs"), 0, MAX_TOP_LOGPROBS);
    }
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
/* A log-probability as JSON can carry it (never NaN or infinite). */
static double lp_value(float x) {
    return x == x && x > -1e30f ? (double)x : -1e30;
}

/* logprobs: append token `tok`'s entry to o->lp: {"id", "logprob", "top": [[id, logprob]...]},
 * log-probabilities under the model (log-softmax of its raw logits `raw`, before penalties and
 * temperature), the g->top_logprobs most likely tokens first to last. One pass over the vocab. */
static void record_logprobs(const gen_cfg *g, gen_out *o, const float *raw, int V, int32_t tok) {
    int k = g->top_logprobs, n_top = 0;
    int32_t top_id[MAX_TOP_LOGPROBS];
    float top_x[MAX_TOP_LOGPROBS];
    float m = raw[0];
    for (int i = 1; i < V; i++)
        if (raw[i] > m) m = raw[i];
    double z = 0;
    for (int i = 0; i < V; i++) {
        float x = raw[i];
        z += rg_expf(x - m);
        if (k && (n_top < k || x > top_x[n_top - 1])) { /* insert; top_x stays descending */
            int j = n_top < k ? n_top++ : k - 1;
            for (; j > 0 && top_x[j - 1] < x; j--) top_x[j] = top_x[j - 1], top_id[j] = top_id[j - 1];
            top_x[j] = x, top_id[j] = i;
        }
    }
    float lse = m + rg_logf((float)z);
    rg_buf_fmt(&o->lp, "%s{\"id\":%d,\"logprob\":%g,\"top\":[", o->lp.len ? "," : "", tok,
               lp_value(raw[tok] - lse));
    for (int j = 0; j < n_top; j++)
        rg_buf_fmt(&o->lp, "%s[%d,%g]", j ? "," : "", top_id[j], lp_value(top_x[j] - lse));
    rg_buf_puts(&o->lp, "]}");
}

/* The end of a generation: the text held back by the detokenizer is emitted (or, after a stop
 * string, dropped with what follows it). Returns 0, or a negative status with *what naming the
 * import that failed. */
static int finish_text(const gen_cfg *g, int session, gen_out *o, const char **what) {
    int st;
    if (o->stop_hit) {
        discard_detok(session);
        return 0;
    }
    if ((st = take_text(session, REALM_DETOK_FLUSH, &o->text)) < 0) {
        *what = "detokenize";
        return st;
    }
    if ((st = settle(g, o, 1)) < 0) {
        *what = "emit";
        return st;
    }
    if (st == 1) o->finish = "stop";
    return 0;
}

static int gen_run(gen_cfg *g, int session, int capacity, rg_ivec *hist, float *logits,
                   gen_out *o) {
    rg_call *c = g->c;
    int V = g->mi.vocab_size, st = 0;
    const char *what = "";
    int32_t *ids = (int32_t *)rg_arena_alloc(c->arena, (size_t)V * 4);
    float *w = (float *)rg_arena_alloc(c->arena, (size_t)V * 4);
    if (!ids || !w) return rg_fail(c, REALM_ELIMIT, "%s: out of memory", c->fn->name);
    float *raw = NULL; /* logprobs: the step's logits before penalties */
    if (g->top_logprobs >= 0) {
        raw = (float *)rg_arena_alloc(c->arena, (size_t)V * 4);
        if (!raw) return rg_fail(c, REALM_ELIMIT, "%s: out of memory", c->fn->name);
        o->lp = rg_buf_in(c->arena);
    }
    for (;;) {
        if (o->completion_tokens >= g->max_tokens) {
            o->finish = "length";
            break;
        }
        int nl = hist->len < PENALTY_LAST_N ? hist->len : PENALTY_LAST_N;
        if (raw) memcpy(raw, logits, (size_t)V * 4);
        rg_apply_penalties(&g->sp, logits, V, hist->p + hist->len - nl, nl);
        int32_t tok = rg_sample(&g->sp, logits, V, ids, w, &g->rng);
        o->completion_tokens++;
        if (contains(g->mi.eog_ids, g->mi.n_eog, tok) ||
            contains(g->stop_ids, g->n_stop_ids, tok)) {
            o->finish = "stop";
            break;
        }
        if (raw && o->lp.len < MAX_LOGPROBS_BYTES) {
            record_logprobs(g, o, raw, V, tok);
            if (o->lp.oom) return rg_fail(c, REALM_ELIMIT, "%s: out of memory", c->fn->name);
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
    if ((st = finish_text(g, session, o, &what)) < 0) goto fail;
    return 0;
fail:
    if (st == REALM_ECANCELLED) {
        o->finish = "cancelled";
        return 0;
    }
    return import_failed(c, what, st);
}

/* ---------------------------------------------------------------------------------------------
 * Speculative decoding (docs/speculative.md): a draft proposes up to k tokens after the pending
 * token t; one verify step forwards [t, d1..dk] and returns every position's logits, computed
 * exactly as one-token steps would be (REALM_FORWARD_VERIFY); each draft is accepted by the
 * rejection-sampling rule, so the output follows the model's own sampling distribution (greedy:
 * the same tokens); the first rejected position takes a token from the residual distribution,
 * a fully accepted draft earns one more token from the last position. The session is rewound
 * to what was accepted.
 * ------------------------------------------------------------------------------------------- */

/* Take one generated token (gen_run's loop body): 0 go on, 1 done (o->finish set), < 0 a
 * failed status (*what names it). `room`: the session could still take the token. */
static int take_token(gen_cfg *g, int session, int32_t tok, int room, gen_out *o,
                      const char **what) {
    o->completion_tokens++;
    if (contains(g->mi.eog_ids, g->mi.n_eog, tok) || contains(g->stop_ids, g->n_stop_ids, tok)) {
        o->finish = "stop";
        return 1;
    }
    int st = take_text(session, tok, &o->text);
    if (st < 0) return *what = "detokenize", st;
    if (o->text.oom) return *what = "memory", REALM_ELIMIT;
    if ((st = settle(g, o, 0)) < 0) return *what = "emit", st;
    if (st == 1) {
        o->finish = "stop";
        return 1;
    }
    if (o->completion_tokens >= g->max_tokens || !room) {
        o->finish = "length";
        return 1;
    }
    return 0;
}

/* Penalties for the token after ctx[0..end), as gen_run applies them. */
static void spec_penalize(const gen_cfg *g, float *lg, int V, const int32_t *ctx, int end) {
    int nl = end < PENALTY_LAST_N ? end : PENALTY_LAST_N;
    rg_apply_penalties(&g->sp, lg, V, ctx + end - nl, nl);
}

/* Prompt lookup: the tokens that followed the most recent earlier occurrence of the context's
 * last n tokens (n from ngram_max down to ngram_min), at most k of them. Returns the count. */
static int lookup_drafts(const spec_cfg *x, const int32_t *ctx, int len, int k, int32_t *d) {
    for (int n = x->ngram_max; n >= x->ngram_min; n--) {
        if (len < n + 1) continue;
        const int32_t *pat = ctx + len - n;
        for (int j = len - n - 1; j >= 0; j--) {
            if (ctx[j] != pat[0] || memcmp(ctx + j, pat, (size_t)n * 4) != 0) continue;
            int m = 0;
            for (; m < k && j + n + m < len; m++) d[m] = ctx[j + n + m];
            return m; /* >= 1: the match ends before the context does */
        }
    }
    return 0;
}

/* The most likely token's probability under softmax(logits) (temperature 1). */
static float top_prob(const float *lg, int V) {
    float m = lg[rg_argmax(lg, V)];
    double z = 0;
    for (int i = 0; i < V; i++)
        if (lg[i] > m - 30.0f) z += rg_expf(lg[i] - m); /* e^-30: nothing to the sum */
    return z > 0 ? (float)(1.0 / z) : 0.0f;
}

static float prob_of(const int32_t *ids, const float *p, int n, int32_t tok) {
    for (int i = 0; i < n; i++)
        if (ids[i] == tok) return p[i];
    return 0.0f;
}

/* Draw from w[0..n) (not normalised; entries of token `skip` left out, skip < 0: none). */
static int32_t draw_weights(const int32_t *ids, const float *w, int n, int32_t skip, rg_rng *rng) {
    double sum = 0;
    int best = -1;
    for (int i = 0; i < n; i++)
        if (ids[i] != skip && w[i] > 0) {
            sum += w[i];
            if (best < 0 || w[i] > w[best]) best = i;
        }
    if (best < 0) return ids[0]; /* nothing left (rounding): the only candidate */
    double r = rg_rng_uniform(rng) * sum;
    for (int i = 0; i < n; i++)
        if (ids[i] != skip && w[i] > 0 && (r -= w[i]) < 0) return ids[i];
    return ids[best];
}

/* The residual max(p - q, 0) of a rejected draft, drawn (p: ids/pw, q: qi/qp; qd: a zeroed
 * n_vocab scratch, left zeroed). pw is overwritten. */
static int32_t draw_residual(const int32_t *ids, float *pw, int n, const int32_t *qi,
                             const float *qp, int qn, float *qd, rg_rng *rng) {
    for (int j = 0; j < qn; j++) qd[qi[j]] = qp[j];
    for (int i = 0; i < n; i++) {
        float r = pw[i] - qd[ids[i]];
        pw[i] = r > 0 ? r : 0;
    }
    for (int j = 0; j < qn; j++) qd[qi[j]] = 0;
    return draw_weights(ids, pw, n, -1, rng);
}

/* Forward tokens[0..n) into the draft session in chunks; the last position's logits to lg. */
static int draft_feed(int ds, const int32_t *tokens, int n, float *lg, int V) {
    for (int off = 0; off < n; off += PREFILL_CHUNK) {
        int m = n - off < PREFILL_CHUNK ? n - off : PREFILL_CHUNK, last = off + m == n;
        int st = realm_forward(ds, tokens + off, m, last ? lg : NULL, last ? V : 0,
                               last ? REALM_FORWARD_LAST : REALM_FORWARD_NO_LOGITS);
        if (st < 0) return st;
    }
    return 0;
}

/* gen_run with speculation (g->spec): the same contract, the same tokens (greedy) or the same
 * distribution (sampled). How many tokens a round drafts adapts to how many the last round
 * kept (up to k); like every drafting choice it depends on the past only, so the rule stays
 * exact. */
static int gen_run_spec(gen_cfg *g, int session, int capacity, rg_ivec *hist, float *logits,
                        gen_out *o) {
    rg_call *c = g->c;
    const spec_cfg *x = &g->spec;
    const int V = g->mi.vocab_size, K = x->k;
    const size_t fv = (size_t)V * 4;
    int st = 0, ds = -1, dpos = 0;
    const char *what = "";
    int32_t d[SPEC_MAX_K];
    int32_t *ids = (int32_t *)rg_arena_alloc(c->arena, fv);
    float *pw = (float *)rg_arena_alloc(c->arena, fv);
    float *L = (float *)rg_arena_alloc(c->arena, fv * (size_t)(K + 1));
    float *qd = NULL, *qlog = NULL, *qp = NULL;
    int32_t *qi = NULL;
    int qn[SPEC_MAX_K];
    if (x->mode == SPEC_DRAFT) {
        qd = (float *)rg_arena_alloc(c->arena, fv);
        qlog = (float *)rg_arena_alloc(c->arena, fv);
        qi = (int32_t *)rg_arena_alloc(c->arena, fv * (size_t)K);
        qp = (float *)rg_arena_alloc(c->arena, fv * (size_t)K);
        if (qd) memset(qd, 0, fv);
    }
    if (!ids || !pw || !L || (x->mode == SPEC_DRAFT && (!qd || !qlog || !qi || !qp)))
        return rg_fail(c, REALM_ELIMIT, "%s: out of memory for speculative decoding (k = %d)",
                       c->fn->name, K);
    if (x->mode == SPEC_DRAFT) {
        ds = open_session(x->draft_model, x->draft_model_len, capacity, NULL);
        if (ds < 0) {
            st = ds, what = "session_open (draft model)";
            goto fail;
        }
    }
    /* t: the pending token (drawn, not yet forwarded); none in the first round, where the
     * prompt's logits decide the first draft (so that a draft can start at the first token,
     * and the prompt's last position is never recomputed) */
    int32_t t = -1;
    int kcur = K; /* drafts this round: +2 after a round that kept them all, -1 otherwise */
    spec_penalize(g, logits, V, hist->p, hist->len);
    for (;;) {
        const int base = hist->len, first = t < 0;
        if (!first) {
            st = take_token(g, session, t, capacity <= 0 || base + 1 <= capacity, o, &what);
            if (st < 0) goto fail;
            if (st > 0) break;
            rg_ivec_push(hist, t);
        }
        const int ctx = hist->len; /* the context the drafts continue */
        int kk = kcur; /* an accepted draft that reaches max_tokens ends the generation */
        if (kk > g->max_tokens - o->completion_tokens)
            kk = (int)(g->max_tokens - o->completion_tokens);
        if (capacity > 0 && kk > capacity - ctx) kk = capacity - ctx;
        int nd = 0;
        if (kk > 0 && x->mode == SPEC_LOOKUP) {
            nd = lookup_drafts(x, hist->p, ctx, kk, d);
            rg_ivec_append(hist, d, nd);
        } else if (kk > 0) {
            for (; nd < kk; nd++) { /* the draft catches up with the context, then proposes */
                if (dpos < hist->len &&
                    (st = draft_feed(ds, hist->p + dpos, hist->len - dpos, qlog, V)) < 0) {
                    what = "forward (draft model)";
                    hist->len = base;
                    goto fail;
                }
                dpos = hist->len;
                spec_penalize(g, qlog, V, hist->p, hist->len);
                /* an unsure draft is likely rejected: stop drafting. The test reads the draft's
                 * logits only, before any draw, so every draft still comes from q as the
                 * acceptance rule assumes */
                if (x->p_min > 0 && top_prob(qlog, V) < x->p_min) break;
                int32_t *qi_ = qi + (size_t)nd * V;
                float *qp_ = qp + (size_t)nd * V;
                qn[nd] = rg_sample_probs(&g->sp, qlog, V, qi_, qp_);
                d[nd] = draw_weights(qi_, qp_, qn[nd], -1, &g->rng);
                rg_ivec_push(hist, d[nd]);
            }
        }
        if (hist->oom) {
            st = REALM_ELIMIT, what = "memory";
            goto fail;
        }
        if (first && nd == 0) { /* nothing to check: draw from the prompt's logits */
            t = rg_sample(&g->sp, logits, V, ids, pw, &g->rng);
            continue;
        }
        const int n_fwd = hist->len - base; /* [t,] d[0..nd) */
        st = realm_forward(session, hist->p + base, n_fwd, L, n_fwd * V, REALM_FORWARD_VERIFY);
        if (st < 0) {
            what = "forward";
            hist->len = base;
            goto fail;
        }
        o->spec_steps++;
        o->spec_drafted += nd;
        int a = 0, done = 0;
        int32_t next = -1;
        for (int i = 0; i < nd && !done; i++) {
            /* the logits for d[i]: after t or d[i-1]; the prompt's in the first round */
            float *lg = first ? (i == 0 ? logits : L + (size_t)(i - 1) * V) : L + (size_t)i * V;
            if (!(first && i == 0)) spec_penalize(g, lg, V, hist->p, ctx + i);
            int n = rg_sample_probs(&g->sp, lg, V, ids, pw);
            float p = prob_of(ids, pw, n, d[i]);
            int ok;
            if (x->mode == SPEC_LOOKUP) { /* the draft is certain: accept with probability p */
                ok = p >= 1.0f || (p > 0 && rg_rng_uniform(&g->rng) < p);
                if (!ok) next = draw_weights(ids, pw, n, d[i], &g->rng);
            } else { /* accept with probability min(1, p / q) */
                const int32_t *qi_ = qi + (size_t)i * V;
                const float *qp_ = qp + (size_t)i * V;
                float q = prob_of(qi_, qp_, qn[i], d[i]);
                ok = p >= q || rg_rng_uniform(&g->rng) * q < p;
                if (!ok) next = draw_residual(ids, pw, n, qi_, qp_, qn[i], qd, &g->rng);
            }
            if (!ok) break;
            a++;
            st = take_token(g, session, d[i], 1, o, &what);
            if (st != 0) done = 1 + i; /* ended at d[i]: the session keeps d[0..i) */
        }
        o->spec_accepted += a;
        if (nd > 0) kcur = a == nd ? (kcur + 2 < K ? kcur + 2 : K) : (kcur > 1 ? kcur - 1 : 1);
        if (done) {
            hist->len = ctx + done - 1;
            realm_session_rewind(session, hist->len);
            if (st < 0) goto fail;
            break;
        }
        if (next < 0) { /* every draft accepted: one more token from the last position */
            float *lg = L + (size_t)(n_fwd - 1) * V;
            spec_penalize(g, lg, V, hist->p, ctx + nd);
            next = rg_sample(&g->sp, lg, V, ids, pw, &g->rng);
        }
        hist->len = ctx + a;
        if (a < nd && (st = realm_session_rewind(session, hist->len)) < 0) {
            what = "session_rewind";
            goto fail;
        }
        if (ds >= 0 && dpos > hist->len) {
            if ((st = realm_session_rewind(ds, hist->len)) < 0) {
                what = "session_rewind (draft model)";
                goto fail;
            }
            dpos = hist->len;
        }
        t = next;
    }
    close_session(ds);
    ds = -1;
    if ((st = finish_text(g, session, o, &what)) < 0) goto fail;
    return 0;
fail:
    close_session(ds);
    if (st == REALM_ECANCELLED) {
        o->finish = "cancelled";
        return 0;
    }
    if (st == REALM_ELIMIT && what[0] == 'm')
        return rg_fail(c, REALM_ELIMIT, "%s: out of memory", c->fn->name);
    return import_failed(c, what, st);
}

static int gen_any(gen_cfg *g, int session, int capacity, rg_ivec *hist, float *logits,
                   gen_out *o) {
    return g->spec.mode ? gen_run_spec(g, session, capacity, hist, logits, o)
                        : gen_run(g, session, capacity, hist, logits, o);
}

/* The result's speculative figures (nothing when speculation is off). */
static void write_spec(rg_buf *b, const gen_cfg *g, const gen_out *o) {
    if (!g->spec.mode) return;
    rg_buf_fmt(b, ",\"speculative\":{\"mode\":%q,\"k\":%d,\"steps\":%d,\"drafted\":%d,"
                  "\"accepted\":%d}",
               g->spec.mode == SPEC_LOOKUP ? "lookup" : "draft", g->spec.k, o->spec_steps,
               o->spec_drafted, o->spec_accepted);
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
    if (o->lp.arena) { /* the last entries are left out when they would not fit the result */
        rg_buf_fmt(b, ",\"logprobs\":[%.*s]", o->lp.len, o->lp.p ? o->lp.p : "");
        if (o->lp.len >= MAX_LOGPROBS_BYTES) rg_buf_puts(b, ",\"logprobs_truncated\":true");
    }
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
        st = gen_any(&g, session, capacity, &hist, logits, &o);
    }
    o.t_end = now_ms();
    close_session(session);
    if (st < 0) return st;
    rg_buf out = rg_buf_in(c->arena);
    write_usage_and_text(&out, &o, n, -1);
    write_spec(&out, &g, &o);
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
        st = gen_any(&g, cv->session, ctx, &cv->tokens, logits, &o);
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
    write_spec(&out, &g, &o);
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
