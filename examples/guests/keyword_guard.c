/*
 * keyword_guard.c — an example tenant runtime (guest ABI v1) written with guest/realm_guest.h.
 *
 * What the WebAssembly runtime is for: a tenant's own rules run next to the model, in a sandbox,
 * on every call — here a keyword guard and its own sampling loop. Two functions:
 *
 *   answer(prompt, max_tokens = 32, blocked = [], model)      streams
 *       Business rule: a prompt that contains a blocked word (ASCII case-insensitive substring)
 *       is refused: the call fails (negative status) with the error
 *           answer: refused: the prompt contains the blocked word "..."
 *       Custom sampling: otherwise it generates greedily, but never picks a token whose text
 *       contains a blocked word. Each token is streamed as it is produced (detokenize + emit).
 *       Result: {text, finish_reason (stop|length|cancelled), usage {prompt_tokens,
 *       completion_tokens, total_tokens}, banned_tokens: [ids the guard refused], tokens: [the
 *       generated ids]}.
 *
 *   word_count(text)                                           does not stream, needs no model
 *       A pure business-rule function: {words, characters, longest_word}.
 *
 * How the guard decides whether a token is banned: it asks the host for the candidate's text
 * with the `decode` import, lazily — only for the token it is about to pick (the best one left),
 * remembering the verdict per token id for the rest of the call. A step therefore costs one
 * extra host call in the usual case, whatever the vocabulary size, and every spelling of the
 * word inside a token is caught ("Secret", "▁secret", "secrets" ...). The alternative —
 * tokenizing each blocked word once and banning those ids — is cheaper but not robust: a word
 * has many tokenizations (with and without a leading space, other cases, longer pieces that
 * contain it), and banning the pieces of a word split into several tokens would also ban
 * innocent fragments. Limitation (per-token, by design): a word spelled across several tokens
 * ("sec" + "ret") is not caught by the ban; the prompt check sees the whole prompt.
 *
 * Build: realm guest build examples/guests/keyword_guard.c -o keyword_guard.wasm
 */
#include "realm_guest.h"

#define MAX_BLOCKED 64
#define PREFILL_CHUNK 512
#define DETOK_CAP 256

/* ---------------------------------------------------------------------------------------------
 * Parameters: the metadata's JSON schema and the guest's own validation both come from these.
 * ------------------------------------------------------------------------------------------- */
static const rg_param answer_params[] = {
    {.name = "prompt",
     .type = RG_P_STRING,
     .required = 1,
     .min_length = 1,
     .description = "The prompt (refused when it contains a blocked word)."},
    {.name = "max_tokens",
     .type = RG_P_INT,
     .def = "32",
     .minimum = "1",
     .maximum = "256",
     .description = "Generate at most this many tokens."},
    {.name = "blocked",
     .type = RG_P_STRINGS,
     .def = "[]",
     .min_length = 1,
     .max_items = MAX_BLOCKED,
     .description = "Blocked words (ASCII case-insensitive): a prompt containing one is "
                    "refused, and no generated token's text contains one."},
    {.name = "model",
     .type = RG_P_STRING,
     .max_length = 256,
     .description = "Which loaded model to use (default: the tenant's default model)."},
};

static const rg_param word_count_params[] = {
    {.name = "text", .type = RG_P_STRING, .required = 1, .description = "The text to count."},
};

/* ---------------------------------------------------------------------------------------------
 * Blocked words: ASCII case-insensitive substring search
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    const char *word[MAX_BLOCKED];
    int len[MAX_BLOCKED];
    int n;
} wordlist;

static unsigned char ascii_lower(unsigned char ch) {
    return ch >= 'A' && ch <= 'Z' ? (unsigned char)(ch + ('a' - 'A')) : ch;
}

static int contains_ci(const char *hay, int n, const char *needle, int m) {
    for (int i = 0; i + m <= n; i++) {
        int j = 0;
        while (j < m && ascii_lower((unsigned char)hay[i + j]) ==
                            ascii_lower((unsigned char)needle[j]))
            j++;
        if (j == m) return 1;
    }
    return 0;
}

/* The index of the first blocked word that text[0..n) contains, or -1. */
static int find_blocked(const wordlist *w, const char *text, int n) {
    for (int k = 0; k < w->n; k++)
        if (contains_ci(text, n, w->word[k], w->len[k])) return k;
    return -1;
}

static void read_blocked(rg_call *c, wordlist *w) {
    w->n = 0;
    const rg_json *arr = rg_param_get(c, "blocked"); /* validated: an array of strings */
    if (!arr || arr->type != RG_JARR) return;
    for (const rg_json *it = arr->child; it && w->n < MAX_BLOCKED; it = it->next)
        if (it->type == RG_JSTR && it->len > 0) {
            w->word[w->n] = it->str;
            w->len[w->n++] = it->len;
        }
}

/* ---------------------------------------------------------------------------------------------
 * The token guard: a verdict per token id, asked of the host (`decode`) on first sight
 * ------------------------------------------------------------------------------------------- */
enum { TOKEN_UNSEEN = 0, TOKEN_OK = 1, TOKEN_BANNED = 2 };

typedef struct {
    rg_arena *arena;
    const char *model;
    int model_len;
    const wordlist *words;
    unsigned char *verdict; /* vocab_size entries */
    rg_ivec banned;         /* ids found banned, in the order found */
    char *buf;              /* decode scratch */
    int cap;
} guard;

/* 1 when the text of `tok` contains a blocked word, 0 when not, or a negative status. */
static int token_banned(guard *g, int32_t tok) {
    if (g->verdict[tok] != TOKEN_UNSEEN) return g->verdict[tok] == TOKEN_BANNED;
    int n = realm_decode(g->model, g->model_len, &tok, 1, g->buf, g->cap);
    if (n > g->cap) { /* snprintf-style: retry once with a buffer that fits */
        char *bigger = (char *)rg_arena_alloc(g->arena, (size_t)n + 1);
        if (!bigger) return REALM_ELIMIT;
        g->buf = bigger;
        g->cap = n;
        n = realm_decode(g->model, g->model_len, &tok, 1, g->buf, g->cap);
    }
    if (n < 0) return n;
    if (n > g->cap) return REALM_EINTERNAL;
    int hit = find_blocked(g->words, g->buf, n) >= 0;
    g->verdict[tok] = hit ? TOKEN_BANNED : TOKEN_OK;
    if (hit) {
        rg_ivec_push(&g->banned, tok);
        if (g->banned.oom) return REALM_ELIMIT;
    }
    return hit;
}

/* Greedy with the guard: the most likely token that is not banned (*out = -1 when none is left).
 * Returns 0 or a negative status (REALM_ECANCELLED from `decode` when the call was cancelled). */
static int pick_token(guard *g, float *logits, int vocab, int32_t *out) {
    const float neg_inf = -__builtin_inff();
    for (int i = 0; i < g->banned.len; i++) logits[g->banned.p[i]] = neg_inf;
    for (int tries = 0; tries < vocab; tries++) {
        int32_t t = rg_argmax(logits, vocab);
        if (!(logits[t] > neg_inf)) break; /* everything left is banned (or NaN) */
        int b = token_banned(g, t);
        if (b < 0) return b;
        if (!b) {
            *out = t;
            return 0;
        }
        logits[t] = neg_inf;
    }
    *out = -1;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * answer
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

static int is_eog(const rg_model_info *mi, int32_t tok) {
    for (int i = 0; i < mi->n_eog; i++)
        if (mi->eog_ids[i] == tok) return 1;
    return 0;
}

/* Push `token` (or REALM_DETOK_FLUSH) to the session's streaming detokenizer, stream the text it
 * releases with emit and append it to `text` (so the result's text is exactly what was streamed).
 * Returns 0 or a negative status (REALM_ECANCELLED: the caller went away). */
static int stream_token(int32_t session, int32_t token, rg_buf *text) {
    char buf[DETOK_CAP];
    for (int rounds = 0; rounds < 4096; rounds++) {
        int n = realm_detokenize(session, token, buf, DETOK_CAP);
        if (n < 0) return n;
        if (n > 0) {
            int st = realm_emit(buf, n);
            if (st < 0) return st;
            rg_buf_put(text, buf, n);
        }
        /* a (nearly) full buffer may mean more text is waiting: take it with REALM_DETOK_TAKE */
        if (n < DETOK_CAP - 3) return 0;
        token = REALM_DETOK_TAKE;
    }
    return 0;
}

static int do_answer(rg_call *c) {
    rg_arena *A = c->arena;
    int plen, mlen;
    const char *prompt = rg_param_str(c, "prompt", &plen);
    const char *model = rg_param_str(c, "model", &mlen);
    if (!model) model = "", mlen = 0;
    int max_tokens = (int)rg_param_int(c, "max_tokens"); /* 1..256: validated */
    wordlist words;
    read_blocked(c, &words);

    /* 1. the business rule, before any model work */
    int hit = find_blocked(&words, prompt, plen);
    if (hit >= 0)
        return rg_fail(c, REALM_EINVAL, "answer: refused: the prompt contains the blocked word %.*q",
                       words.len[hit], words.word[hit]);

    /* 2. the model and the prompt's tokens */
    rg_model_info mi;
    int st = rg_get_model_info(A, model, mlen, &mi);
    if (st == REALM_ENOENT) return rg_fail(c, st, "answer: no model %.*q on this host", mlen, model);
    if (st < 0) return rg_fail(c, st, "answer: model_info failed: %s", status_name(st));
    int32_t *toks;
    int n = rg_tokenize(A, model, mlen, prompt, plen, REALM_TOKENIZE_ADD_SPECIAL, &toks);
    if (n < 0) return rg_fail(c, n, "answer: tokenize failed: %s", status_name(n));
    if (n == 0) return rg_fail(c, REALM_EINVAL, "answer: the prompt has no tokens");
    int ctx = mi.context_length;
    if (ctx > 0 && n >= ctx)
        return rg_fail(c, REALM_ELIMIT,
                       "answer: the prompt is %d tokens; the model's context is %d", n, ctx);
    int capacity = n + max_tokens;
    if (ctx > 0 && capacity > ctx) capacity = ctx;

    int V = mi.vocab_size;
    float *logits = (float *)rg_arena_alloc(A, (size_t)V * 4);
    guard g = {A, model, mlen, &words, (unsigned char *)rg_arena_alloc(A, (size_t)V), {0}, 0, 64};
    g.banned.arena = A;
    g.buf = (char *)rg_arena_alloc(A, (size_t)g.cap + 1);
    rg_ivec generated = {0, 0, 0, 0, A};
    rg_buf text = rg_buf_in(A);
    if (!logits || !g.verdict || !g.buf) return rg_fail(c, REALM_ELIMIT, "answer: out of memory");
    memset(g.verdict, TOKEN_UNSEEN, (size_t)V);

    /* 3. a session (KV cache) for this call only; closed on every way out below */
    int32_t session = realm_session_open(model, mlen, capacity);
    if (session < 0)
        return rg_fail(c, session, "answer: session_open failed: %s", status_name(session));

    const char *finish = "length", *what = "forward";
    for (int off = 0; off < n && st >= 0; off += PREFILL_CHUNK) { /* the prompt, in chunks */
        int k = n - off < PREFILL_CHUNK ? n - off : PREFILL_CHUNK;
        int last = off + k == n;
        st = realm_forward(session, toks + off, k, last ? logits : NULL, last ? V : 0,
                           last ? REALM_FORWARD_LAST : REALM_FORWARD_NO_LOGITS);
    }
    int completion = 0;
    while (st >= 0) {
        if (completion >= max_tokens) break; /* finish: length */
        int32_t tok;
        if ((st = pick_token(&g, logits, V, &tok)) < 0) {
            what = "decode";
            break;
        }
        if (tok < 0) { /* the guard refused every token: nothing can be said */
            finish = "stop";
            break;
        }
        completion++;
        if (is_eog(&mi, tok)) {
            finish = "stop";
            break;
        }
        rg_ivec_push(&generated, tok);
        if ((st = stream_token(session, tok, &text)) < 0) {
            what = "detokenize/emit";
            break;
        }
        if (completion >= max_tokens || n + completion > capacity) break; /* length */
        st = realm_forward(session, &tok, 1, logits, V, REALM_FORWARD_LAST);
        what = "forward";
    }
    if (st >= 0) { /* the end of the text: flush what the detokenizer held back */
        st = stream_token(session, REALM_DETOK_FLUSH, &text);
        what = "detokenize/emit";
    }
    realm_session_close(session); /* allowed even after a cancel */
    if (st == REALM_ECANCELLED) {  /* the caller went away: report what was streamed */
        finish = "cancelled";
        st = 0;
    }
    if (st < 0) return rg_fail(c, st, "answer: %s failed: %s", what, status_name(st));
    if (text.oom || generated.oom || g.banned.oom)
        return rg_fail(c, REALM_ELIMIT, "answer: out of memory");

    rg_buf out = rg_buf_in(A);
    rg_buf_puts(&out, "{\"text\":");
    rg_buf_json_str(&out, text.p ? text.p : "", text.len);
    rg_buf_fmt(&out,
               ",\"finish_reason\":%q,\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,"
               "\"total_tokens\":%d},\"banned_tokens\":[",
               finish, n, completion, n + completion);
    for (int i = 0; i < g.banned.len; i++) rg_buf_fmt(&out, i ? ",%d" : "%d", g.banned.p[i]);
    rg_buf_puts(&out, "],\"tokens\":[");
    for (int i = 0; i < generated.len; i++) rg_buf_fmt(&out, i ? ",%d" : "%d", generated.p[i]);
    rg_buf_puts(&out, "]}");
    return rg_result(c, &out);
}

/* ---------------------------------------------------------------------------------------------
 * word_count: plain business logic, no host calls but `result`
 * ------------------------------------------------------------------------------------------- */
static int is_space(unsigned char ch) {
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\f' || ch == '\v';
}

static int do_word_count(rg_call *c) {
    int n;
    const char *s = rg_param_str(c, "text", &n);
    int words = 0, chars = 0;
    int best_start = 0, best_bytes = 0, best_chars = 0; /* the longest word (the first of ties) */
    for (int i = 0; i < n;) {
        if (is_space((unsigned char)s[i])) {
            i++, chars++;
            continue;
        }
        int start = i, len = 0; /* a word: a run of anything but ASCII whitespace */
        while (i < n && !is_space((unsigned char)s[i])) {
            len += ((unsigned char)s[i] & 0xC0) != 0x80; /* code points, not bytes */
            i++;
        }
        words++;
        chars += len;
        if (len > best_chars) best_start = start, best_bytes = i - start, best_chars = len;
    }
    rg_buf out = rg_buf_in(c->arena);
    rg_buf_fmt(&out, "{\"words\":%d,\"characters\":%d,\"longest_word\":%.*q}", words, chars,
               best_bytes, s + best_start);
    return rg_result(c, &out);
}

/* ---------------------------------------------------------------------------------------------
 * The module
 * ------------------------------------------------------------------------------------------- */
static const rg_function fn_answer = {
    "answer",
    "Answer a prompt greedily under a keyword guard: a prompt containing a blocked word is "
    "refused; no generated token's text contains one. Streams the text. Result: {text, "
    "finish_reason, usage, banned_tokens, tokens}.",
    1, answer_params, RG_COUNT(answer_params), do_answer};
static const rg_function fn_word_count = {
    "word_count", "Count the words of a text. Result: {words, characters, longest_word}.", 0,
    word_count_params, RG_COUNT(word_count_params), do_word_count};

static const rg_function *const functions[] = {&fn_answer, &fn_word_count};
static const rg_module module = {"keyword-guard", "1",
                                 "An example tenant runtime: a keyword guard over greedy "
                                 "generation, and a word counter.",
                                 functions, RG_COUNT(functions)};

RG_MODULE(module)
RG_EXPORT_FUNCTION(answer, module, fn_answer)
RG_EXPORT_FUNCTION(word_count, module, fn_word_count)
