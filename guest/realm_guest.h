/*
 * realm_guest.h — the Realm guest SDK for C (guest ABI v1), as one header.
 *
 * A Realm guest is a WebAssembly module (wasm32, freestanding, no libc) that *is* a tenant's
 * runtime: it decides how prompts are built, how tokens are sampled, what is remembered between
 * calls. The host only dispatches calls to it and offers coarse host functions (tokenize, one
 * batched forward pass per step, streaming detokenizer, emit). The ABI is the table in
 * realm/sandbox/_abi.py (rendered as docs/guest-abi.md); this header declares the same imports.
 *
 * Writing your own runtime
 * ------------------------
 *   1. One C file; include this header once (it defines the exported allocator, memcpy/memset
 *      and the ABI version export). In any further translation unit of the same module,
 *      `#define REALM_GUEST_DECLS_ONLY` before including it.
 *   2. Describe each callable function with an `rg_function`: its name, a description, whether
 *      it streams, its parameters (`rg_param`: type, default, range — the JSON schema of the
 *      metadata *and* the guest-side validation are both generated from this one table) and
 *      the C function that implements it: `int impl(rg_call *c)`.
 *   3. List the functions in an `rg_module` and write `RG_MODULE(my_module)` (exports the
 *      metadata) and `RG_EXPORT_FUNCTION(name, my_module, my_function)` for each function
 *      (exports `realm_fn_<name>`). The name token must equal the rg_function's name.
 *   4. In `impl`, read parameters with rg_param_str/int/num/bool/get (validated, defaults
 *      applied), call the host through the `realm_*` imports or the helpers below, stream text
 *      with realm_emit, and finish with `rg_result(c, &buf)` (a JSON object built with rg_buf)
 *      and `return 0`, or `return rg_fail(c, REALM_EINVAL, "why %d", n)` (negative status,
 *      result {"error": "why ..."}). Memory from `c->arena` is freed when the call returns;
 *      state that must outlive the call (conversations, caches) goes in globals with rg_malloc.
 *   5. Build: `python guest/build.py` builds the default guest; for your own file,
 *      `from guest.build import build; build(Path("my.c"), Path("my.wasm"))`, or by hand:
 *        python -m ziglang cc --target=wasm32-freestanding -O2 -nostdlib -Wl,--no-entry \
 *          -Wl,--export-memory -Wl,-z,stack-size=1048576 -I guest -o my.wasm my.c
 *
 * Minimal example:
 *
 *     #include "realm_guest.h"
 *     static const rg_param echo_params[] = {
 *         {.name = "text", .type = RG_P_STRING, .required = 1, .description = "what to echo"},
 *     };
 *     static int echo(rg_call *c) {
 *         int n;
 *         const char *s = rg_param_str(c, "text", &n);
 *         realm_emit(s, n);                                  // one streamed chunk
 *         rg_buf out = rg_buf_in(c->arena);
 *         rg_buf_fmt(&out, "{\"text\":%.*q}", n, s);         // %q: a JSON string literal
 *         return rg_result(c, &out);
 *     }
 *     static const rg_function fn_echo = {"echo", "Echo the text back.", 1, echo_params,
 *                                         RG_COUNT(echo_params), echo};
 *     static const rg_function *const fns[] = {&fn_echo};
 *     static const rg_module mod = {"echo-guest", "1", "An example.", fns, RG_COUNT(fns)};
 *     RG_MODULE(mod)
 *     RG_EXPORT_FUNCTION(echo, mod, fn_echo)
 *
 * Rules of the road (see docs/guest-abi.md): every import returns a status (>= 0 success,
 * negative REALM_E*); outputs are snprintf-style (the count needed is returned, at most `cap`
 * written: retry with a bigger buffer); ECANCELLED means "stop now and return"; a guest that
 * keeps ignoring errors is stopped by the host. Never trap on purpose: a trap breaks the
 * instance (and the conversations it holds).
 */
#ifndef REALM_GUEST_H
#define REALM_GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define REALM_ABI_VERSION 1

/* ---------------------------------------------------------------------------------------------
 * Status codes (realm/sandbox/_abi.py: Status)
 * ------------------------------------------------------------------------------------------- */
#define REALM_OK 0
#define REALM_EINVAL (-1)     /* a bad argument (value, flag, JSON) */
#define REALM_EBOUNDS (-2)    /* a pointer/length outside the guest's memory: the guest is stopped */
#define REALM_ENOENT (-3)     /* no such session, model or function */
#define REALM_ECANCELLED (-4) /* the call was cancelled or its deadline passed: return promptly */
#define REALM_ELIMIT (-5)     /* a limit was reached (KV memory, sessions, tokens, output size) */
#define REALM_ENOTSUP (-6)    /* not supported by this host or model */
#define REALM_EINTERNAL (-7)  /* the host failed; details are in the call's error */

/* tokenize flags */
#define REALM_TOKENIZE_ADD_SPECIAL 1   /* add BOS/EOS as the model does */
#define REALM_TOKENIZE_PARSE_SPECIAL 2 /* parse special-token text such as <|im_start|> */
/* forward modes */
#define REALM_FORWARD_NO_LOGITS 0
#define REALM_FORWARD_LAST 1
#define REALM_FORWARD_ALL 2
#define REALM_FORWARD_VERIFY 3 /* every position's, bit-identical to one-token steps (speculative) */
/* detokenize pseudo-tokens */
#define REALM_DETOK_TAKE (-1)  /* push nothing, take pending text */
#define REALM_DETOK_FLUSH (-2) /* end the sequence: also flush held-back bytes */
/* log levels */
#define REALM_LOG_DEBUG 0
#define REALM_LOG_INFO 1
#define REALM_LOG_WARNING 2
#define REALM_LOG_ERROR 3
/* pager hints */
#define REALM_PAGER_PREFETCH 1
#define REALM_PAGER_PIN 2
#define REALM_PAGER_UNPIN 3

/* ---------------------------------------------------------------------------------------------
 * Host imports, module "realm" — the ABI v1 table, in its order, with its parameter order.
 * Every pointer is an offset into this module's memory (i32 on wasm32).
 * ------------------------------------------------------------------------------------------- */
#define RG_IMPORT(n) __attribute__((import_module("realm"), import_name(n)))

/* Log UTF-8 text at level 0 debug, 1 info, 2 warning, 3 error (rate-limited). */
RG_IMPORT("log") int32_t realm_log(int32_t level, const void *ptr, int32_t len);
/* Milliseconds since this call began (monotonic). */
RG_IMPORT("clock_ms") int64_t realm_clock_ms(void);
/* Fill [ptr, ptr+len) with bytes from the call's PRNG (seeded from the call's `seed`). */
RG_IMPORT("random") int32_t realm_random(void *ptr, int32_t len);
/* JSON describing a model (model_len 0: the default model). Returns bytes needed. */
RG_IMPORT("model_info")
int32_t realm_model_info(const char *model_ptr, int32_t model_len, char *out_ptr, int32_t out_cap);
/* Encode UTF-8 text to i32 token ids (flags: REALM_TOKENIZE_*). Returns the number of ids. */
RG_IMPORT("tokenize")
int32_t realm_tokenize(const char *model_ptr, int32_t model_len, const char *text_ptr,
                       int32_t text_len, int32_t flags, int32_t *out_ptr, int32_t out_cap);
/* Decode i32 token ids to UTF-8 text. Returns bytes needed. */
RG_IMPORT("decode")
int32_t realm_decode(const char *model_ptr, int32_t model_len, const int32_t *ids_ptr,
                     int32_t n_ids, char *out_ptr, int32_t out_cap);
/* Render a JSON array of {role, content} messages with the model's chat template. */
RG_IMPORT("chat_template")
int32_t realm_chat_template(const char *model_ptr, int32_t model_len, const char *messages_ptr,
                            int32_t messages_len, int32_t add_generation_prompt, char *out_ptr,
                            int32_t out_cap);
/* Open a sequence (KV cache) of up to capacity positions (0: the model's context). It outlives
 * a call that returns; one that traps, is cancelled or passes its deadline loses it unless
 * realm_session_keep kept it. At the tenant's session limit the host waits for a session
 * another call will give back, or returns REALM_ELIMIT. */
RG_IMPORT("session_open")
int32_t realm_session_open(const char *model_ptr, int32_t model_len, int32_t capacity);
/* Close a session and free its KV cache. */
RG_IMPORT("session_close") int32_t realm_session_close(int32_t session);
/* Forget positions >= pos. Returns the session's position. */
RG_IMPORT("session_rewind") int32_t realm_session_rewind(int32_t session, int32_t pos);
/* The number of positions a session holds. */
RG_IMPORT("session_pos") int32_t realm_session_pos(int32_t session);
/* Keep a session beyond the call that opened it, however that call ends (a conversation's
 * cache). Otherwise the host closes the sessions a call opened when the call traps, is
 * cancelled or passes its deadline. */
RG_IMPORT("session_keep") int32_t realm_session_keep(int32_t session);
/* Append tokens and run the model (mode REALM_FORWARD_*). Returns the number of floats written. */
RG_IMPORT("forward")
int32_t realm_forward(int32_t session, const int32_t *tokens_ptr, int32_t n_tokens,
                      float *logits_ptr, int32_t logits_cap, int32_t mode);
/* Streaming detokenizer: push a token (or REALM_DETOK_*), take complete UTF-8. Bytes written. */
RG_IMPORT("detokenize")
int32_t realm_detokenize(int32_t session, int32_t token, char *out_ptr, int32_t out_cap);
/* Stream a UTF-8 chunk to the caller (one token event). REALM_ECANCELLED means stop;
 * REALM_ELIMIT: the chunk or the call's output is over the tenant's limit. It waits while the
 * caller has not taken what was sent (backpressure). */
RG_IMPORT("emit") int32_t realm_emit(const void *ptr, int32_t len);
/* Set the call's result: a JSON object (the last call wins). */
RG_IMPORT("result") int32_t realm_result(const void *ptr, int32_t len);
/* Embedding of tokens in a fresh context (mean final hidden state, L2-normalised): floats
 * needed (n_embd); nothing is computed when out_cap is smaller. */
RG_IMPORT("embed")
int32_t realm_embed(const char *model_ptr, int32_t model_len, const int32_t *tokens_ptr,
                    int32_t n_tokens, float *out_ptr, int32_t out_cap);
/* y[b, r] = sum_c w[r, c] x[b, c] on f32 guest buffers. */
RG_IMPORT("matmul_f32")
int32_t realm_matmul_f32(float *y_ptr, const float *w_ptr, const float *x_ptr, int32_t rows,
                         int32_t cols, int32_t batch);
/* Causal grouped-query attention on f32 guest buffers. */
RG_IMPORT("attention_f32")
int32_t realm_attention_f32(float *out_ptr, const float *q_ptr, const float *k_ptr,
                            const float *v_ptr, const int32_t *pos_ptr, int32_t n_q, int32_t n_kv,
                            int32_t n_heads, int32_t n_kv_heads, int32_t head_dim);
/* Layer paging hints (REALM_PAGER_*). ENOTSUP when the model is not paged. */
RG_IMPORT("pager_hint")
int32_t realm_pager_hint(const char *model_ptr, int32_t model_len, int32_t layer, int32_t hint);

#define RG_EXPORT(n) __attribute__((export_name(n)))
#define RG_COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))
#define RG_UNUSED __attribute__((unused))
#define RG_S static RG_UNUSED

/* ---------------------------------------------------------------------------------------------
 * Memory: libc replacements, allocator (exported as realm_alloc/realm_free), arenas
 * ------------------------------------------------------------------------------------------- */
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);

RG_S size_t rg_strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}
RG_S int rg_streq(const char *a, int alen, const char *b) { /* b NUL-terminated */
    int blen = (int)rg_strlen(b);
    return alen == blen && memcmp(a, b, (size_t)alen) == 0;
}

/* The heap: power-of-two size classes with one free list each, carved from a bump pointer that
 * grows the memory with memory.grow. Each block has an 8-byte header (magic|class, size). */
void *rg_malloc(size_t n);
void rg_free(void *p);
void *rg_realloc(void *p, size_t n);
RG_S void *rg_calloc(size_t n) {
    void *p = rg_malloc(n);
    if (p) memset(p, 0, n);
    return p;
}
RG_S char *rg_strndup(const char *s, int n) {
    char *p = (char *)rg_malloc((size_t)n + 1);
    if (p) {
        memcpy(p, s, (size_t)n);
        p[n] = 0;
    }
    return p;
}

/* An arena: many small allocations, freed at once (every call gets one: c->arena). */
typedef struct rg_arena_chunk {
    struct rg_arena_chunk *next;
    size_t used, cap;
} rg_arena_chunk;
typedef struct {
    rg_arena_chunk *head;
} rg_arena;

RG_S void *rg_arena_alloc(rg_arena *a, size_t n) {
    n = (n + 7) & ~(size_t)7;
    rg_arena_chunk *h = a->head;
    if (!h || h->cap - h->used < n) {
        size_t cap = n > 65536 - 64 ? n : 65536 - 64;
        rg_arena_chunk *c = (rg_arena_chunk *)rg_malloc(sizeof(rg_arena_chunk) + cap);
        if (!c) return NULL;
        c->used = 0;
        c->cap = cap;
        if (h && n > 4096) { /* a big block: keep filling the current small chunk afterwards */
            c->next = h->next;
            h->next = c;
        } else {
            c->next = h;
            a->head = c;
        }
        h = c;
    }
    void *p = (char *)(h + 1) + h->used;
    h->used += n;
    return p;
}
RG_S void rg_arena_free(rg_arena *a) {
    rg_arena_chunk *c = a->head;
    while (c) {
        rg_arena_chunk *next = c->next;
        rg_free(c);
        c = next;
    }
    a->head = NULL;
}
RG_S char *rg_arena_strndup(rg_arena *a, const char *s, int n) {
    char *p = (char *)rg_arena_alloc(a, (size_t)n + 1);
    if (p) {
        memcpy(p, s, (size_t)n);
        p[n] = 0;
    }
    return p;
}

/* ---------------------------------------------------------------------------------------------
 * Growable byte buffer (text, JSON) and int32 vector. With an arena they grow inside it and need
 * no freeing; with arena == NULL they live on the heap: rg_buf_free / rg_ivec_free.
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    char *p;
    int len, cap;
    int oom; /* an allocation failed: the content is truncated */
    rg_arena *arena;
} rg_buf;

RG_S rg_buf rg_buf_in(rg_arena *a) {
    rg_buf b = {0, 0, 0, 0, a};
    return b;
}
RG_S int rg_buf_reserve(rg_buf *b, int extra) {
    if (b->oom || extra < 0) return 0;
    if ((int64_t)b->len + extra + 1 <= b->cap) return 1;
    int64_t cap = b->cap ? b->cap : 64;
    while (cap < (int64_t)b->len + extra + 1) cap *= 2;
    if (cap > 0x7fffffff) {
        b->oom = 1;
        return 0;
    }
    char *p;
    if (b->arena) {
        p = (char *)rg_arena_alloc(b->arena, (size_t)cap);
        if (p && b->len) memcpy(p, b->p, (size_t)b->len);
    } else {
        p = (char *)rg_realloc(b->p, (size_t)cap);
    }
    if (!p) {
        b->oom = 1;
        return 0;
    }
    b->p = p;
    b->cap = (int)cap;
    return 1;
}
RG_S void rg_buf_put(rg_buf *b, const void *s, int n) {
    if (n <= 0 || !rg_buf_reserve(b, n)) return;
    memcpy(b->p + b->len, s, (size_t)n);
    b->len += n;
    b->p[b->len] = 0;
}
RG_S void rg_buf_putc(rg_buf *b, char ch) { rg_buf_put(b, &ch, 1); }
RG_S void rg_buf_puts(rg_buf *b, const char *s) { rg_buf_put(b, s, (int)rg_strlen(s)); }
RG_S const char *rg_buf_cstr(rg_buf *b) { /* NUL-terminated view ("" when empty) */
    return (b->p && !b->oom) ? b->p : "";
}
RG_S void rg_buf_free(rg_buf *b) {
    if (!b->arena) rg_free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

typedef struct {
    int32_t *p;
    int len, cap;
    int oom;
    rg_arena *arena;
} rg_ivec;

RG_S int rg_ivec_reserve(rg_ivec *v, int n) {
    if (v->oom) return 0;
    if (n <= v->cap) return 1;
    int64_t cap = v->cap ? v->cap : 16;
    while (cap < n) cap *= 2;
    if (cap > (1 << 28)) {
        v->oom = 1;
        return 0;
    }
    int32_t *p;
    if (v->arena) {
        p = (int32_t *)rg_arena_alloc(v->arena, (size_t)cap * 4);
        if (p && v->len) memcpy(p, v->p, (size_t)v->len * 4);
    } else {
        p = (int32_t *)rg_realloc(v->p, (size_t)cap * 4);
    }
    if (!p) {
        v->oom = 1;
        return 0;
    }
    v->p = p;
    v->cap = (int)cap;
    return 1;
}
RG_S void rg_ivec_push(rg_ivec *v, int32_t x) {
    if (rg_ivec_reserve(v, v->len + 1)) v->p[v->len++] = x;
}
RG_S void rg_ivec_append(rg_ivec *v, const int32_t *x, int n) {
    if (n > 0 && rg_ivec_reserve(v, v->len + n)) {
        memcpy(v->p + v->len, x, (size_t)n * 4);
        v->len += n;
    }
}
RG_S void rg_ivec_free(rg_ivec *v) {
    if (!v->arena) rg_free(v->p);
    v->p = NULL;
    v->len = v->cap = 0;
    v->oom = 0;
}

/* ---------------------------------------------------------------------------------------------
 * UTF-8 and JSON string escaping
 * ------------------------------------------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at s[0..n), or 0 if it is not one (overlong, surrogate,
 * > U+10FFFF, truncated). */
RG_S int rg_utf8_seq(const unsigned char *s, int n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    int len;
    unsigned min;
    if ((c & 0xE0) == 0xC0) len = 2, min = 0x80, c &= 0x1F;
    else if ((c & 0xF0) == 0xE0) len = 3, min = 0x800, c &= 0x0F;
    else if ((c & 0xF8) == 0xF0) len = 4, min = 0x10000, c &= 0x07;
    else return 0;
    if (n < len) return 0;
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        c = (c << 6) | (s[i] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return 0;
    return len;
}
RG_S int rg_utf8_encode(uint32_t cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Append s[0..n) as a JSON string literal (with quotes). Invalid UTF-8 becomes U+FFFD, so the
 * output is always valid JSON in valid UTF-8. */
RG_S void rg_buf_json_str(rg_buf *b, const char *s, int n) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *u = (const unsigned char *)s;
    rg_buf_putc(b, '"');
    int i = 0;
    while (i < n) {
        int start = i;
        while (i < n && u[i] >= 0x20 && u[i] < 0x80 && u[i] != '"' && u[i] != '\\') i++;
        rg_buf_put(b, s + start, i - start);
        if (i >= n) break;
        unsigned c = u[i];
        if (c >= 0x80) {
            int k = rg_utf8_seq(u + i, n - i);
            if (k) rg_buf_put(b, s + i, k), i += k;
            else rg_buf_put(b, "\xEF\xBF\xBD", 3), i++;
            continue;
        }
        char esc[6] = {'\\', 0, 0, 0, 0, 0};
        int len = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        default:
            esc[1] = 'u', esc[2] = '0', esc[3] = '0', esc[4] = hex[c >> 4], esc[5] = hex[c & 15];
            len = 6;
        }
        rg_buf_put(b, esc, len);
        i++;
    }
    rg_buf_putc(b, '"');
}

/* ---------------------------------------------------------------------------------------------
 * Formatting: rg_buf_fmt(b, fmt, ...) understands %% %c %s %.*s %d %i %u %lld %llu %x %g and
 * %q / %.*q (a JSON string literal of a NUL-terminated / counted string). No floats beyond %g.
 * ------------------------------------------------------------------------------------------- */
RG_S void rg_buf_u64(rg_buf *b, uint64_t v) {
    char tmp[24];
    int n = 0;
    do tmp[n++] = (char)('0' + v % 10), v /= 10;
    while (v);
    char out[24];
    for (int i = 0; i < n; i++) out[i] = tmp[n - 1 - i];
    rg_buf_put(b, out, n);
}
RG_S void rg_buf_i64(rg_buf *b, int64_t v) {
    if (v < 0) {
        rg_buf_putc(b, '-');
        rg_buf_u64(b, (uint64_t)0 - (uint64_t)v);
    } else {
        rg_buf_u64(b, (uint64_t)v);
    }
}
/* Shortest-ish decimal for messages and JSON: integers as integers, else up to 6 decimals
 * (or an exponent for tiny/huge values). Not round-trip exact. */
RG_S void rg_buf_double(rg_buf *b, double x) {
    if (x != x) {
        rg_buf_puts(b, "NaN");
        return;
    }
    if (x < 0) {
        rg_buf_putc(b, '-');
        x = -x;
    }
    if (x > 1.7976931348623157e308) {
        rg_buf_puts(b, "Infinity");
        return;
    }
    if (x != 0 && (x >= 1e15 || x < 1e-4)) {
        int e = 0;
        while (x >= 10) x /= 10, e++;
        while (x < 1) x *= 10, e--;
        uint64_t m = (uint64_t)(x * 1e6 + 0.5);
        if (m >= 10000000) m /= 10, e++;
        rg_buf_u64(b, m / 1000000);
        uint64_t f = m % 1000000;
        if (f) {
            char d[7];
            int k = 6;
            for (int i = 5; i >= 0; i--) d[i] = (char)('0' + f % 10), f /= 10;
            while (k > 0 && d[k - 1] == '0') k--;
            rg_buf_putc(b, '.');
            rg_buf_put(b, d, k);
        }
        rg_buf_putc(b, 'e');
        rg_buf_i64(b, e);
        return;
    }
    uint64_t ip = (uint64_t)x;
    uint64_t fp = (uint64_t)((x - (double)ip) * 1e6 + 0.5);
    if (fp >= 1000000) ip++, fp -= 1000000;
    rg_buf_u64(b, ip);
    if (fp) {
        char d[6];
        int k = 6;
        for (int i = 5; i >= 0; i--) d[i] = (char)('0' + fp % 10), fp /= 10;
        while (k > 0 && d[k - 1] == '0') k--;
        rg_buf_putc(b, '.');
        rg_buf_put(b, d, k);
    }
}
RG_S void rg_buf_vfmt(rg_buf *b, const char *f, va_list ap) {
    while (*f) {
        const char *start = f;
        while (*f && *f != '%') f++;
        rg_buf_put(b, start, (int)(f - start));
        if (!*f) break;
        f++;
        int prec = -1, ll = 0;
        if (f[0] == '.' && f[1] == '*') {
            prec = va_arg(ap, int);
            f += 2;
        }
        while (*f == 'l') ll++, f++;
        char conv = *f ? *f++ : 0;
        switch (conv) {
        case '%': rg_buf_putc(b, '%'); break;
        case 'c': rg_buf_putc(b, (char)va_arg(ap, int)); break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s) s = "(null)";
            rg_buf_put(b, s, prec >= 0 ? prec : (int)rg_strlen(s));
            break;
        }
        case 'q': {
            const char *s = va_arg(ap, const char *);
            if (!s) s = "", prec = 0;
            rg_buf_json_str(b, s, prec >= 0 ? prec : (int)rg_strlen(s));
            break;
        }
        case 'd':
        case 'i':
            if (ll >= 2) rg_buf_i64(b, va_arg(ap, long long));
            else if (ll == 1) rg_buf_i64(b, va_arg(ap, long));
            else rg_buf_i64(b, va_arg(ap, int));
            break;
        case 'u':
            if (ll >= 2) rg_buf_u64(b, va_arg(ap, unsigned long long));
            else if (ll == 1) rg_buf_u64(b, va_arg(ap, unsigned long));
            else rg_buf_u64(b, va_arg(ap, unsigned));
            break;
        case 'x': {
            uint64_t v = ll >= 2 ? va_arg(ap, unsigned long long) : va_arg(ap, unsigned);
            char tmp[16];
            int n = 0;
            do tmp[n++] = "0123456789abcdef"[v & 15], v >>= 4;
            while (v);
            while (n) rg_buf_putc(b, tmp[--n]);
            break;
        }
        case 'g':
        case 'f': rg_buf_double(b, va_arg(ap, double)); break;
        default: rg_buf_putc(b, '%'); if (conv) rg_buf_putc(b, conv);
        }
    }
}
RG_S void rg_buf_fmt(rg_buf *b, const char *f, ...) {
    va_list ap;
    va_start(ap, f);
    rg_buf_vfmt(b, f, ap);
    va_end(ap);
}

/* ---------------------------------------------------------------------------------------------
 * JSON reader: parses a whole document into a tree in an arena. Strict RFC 8259 (no trailing
 * commas, no comments, no NaN), strings decoded (escapes, \uXXXX with surrogate pairs → UTF-8;
 * a lone surrogate becomes U+FFFD), nesting limited to RG_JSON_MAX_DEPTH. Numbers are within a
 * couple of ulps (not always correctly rounded); integers that fit int64 are exact.
 * ------------------------------------------------------------------------------------------- */
enum { RG_JNULL, RG_JBOOL, RG_JNUM, RG_JSTR, RG_JARR, RG_JOBJ };
#define RG_JSON_MAX_DEPTH 64

typedef struct rg_json {
    int type;
    int len;         /* RG_JSTR: bytes; RG_JARR/RG_JOBJ: number of items */
    const char *str; /* RG_JSTR: decoded, NUL-terminated (may contain NULs: use len) */
    double num;      /* RG_JNUM */
    int64_t i;       /* RG_JNUM: exact value when is_int */
    int is_int;      /* RG_JNUM written as an integer that fits int64 */
    int b;           /* RG_JBOOL */
    const char *key; /* the member's key when inside an object (decoded, NUL-terminated) */
    int key_len;
    struct rg_json *child, *next; /* first item; next sibling */
} rg_json;

typedef struct {
    const char *s;
    int n, i;
    rg_arena *a;
    const char *err;
    int depth;
} rg__jp;

RG_S void rg__jws(rg__jp *p) {
    while (p->i < p->n) {
        char c = p->s[p->i];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->i++;
    }
}
RG_S int rg__jhex(rg__jp *p, uint32_t *out) {
    if (p->n - p->i < 4) return 0;
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
        char c = p->s[p->i + k];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
        else return 0;
    }
    p->i += 4;
    *out = v;
    return 1;
}
/* p->s[p->i] == '"' on entry. */
RG_S int rg__jstr(rg__jp *p, const char **out, int *out_len) {
    p->i++;
    int start = p->i;
    /* first pass: find the end (the decoded text is never longer than the source) */
    while (p->i < p->n && p->s[p->i] != '"') {
        unsigned char c = (unsigned char)p->s[p->i];
        if (c < 0x20) return p->err = "control character in string", 0;
        if (c == '\\') p->i++;
        p->i++;
    }
    if (p->i >= p->n) return p->err = "unterminated string", 0;
    int end = p->i;
    char *d = (char *)rg_arena_alloc(p->a, (size_t)(end - start) + 1);
    if (!d) return p->err = "out of memory", 0;
    int o = 0;
    for (int j = start; j < end;) {
        char c = p->s[j];
        if (c != '\\') {
            d[o++] = c;
            j++;
            continue;
        }
        j++;
        char e = p->s[j++];
        switch (e) {
        case '"': d[o++] = '"'; break;
        case '\\': d[o++] = '\\'; break;
        case '/': d[o++] = '/'; break;
        case 'b': d[o++] = '\b'; break;
        case 'f': d[o++] = '\f'; break;
        case 'n': d[o++] = '\n'; break;
        case 'r': d[o++] = '\r'; break;
        case 't': d[o++] = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            p->i = j;
            if (!rg__jhex(p, &cp)) return p->err = "bad \\u escape", 0;
            j = p->i;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                int save = j;
                if (j + 1 < end && p->s[j] == '\\' && p->s[j + 1] == 'u') {
                    p->i = j + 2;
                    if (rg__jhex(p, &lo) && lo >= 0xDC00 && lo <= 0xDFFF) {
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        j = p->i;
                    } else {
                        cp = 0xFFFD, j = save;
                    }
                } else {
                    cp = 0xFFFD;
                }
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                cp = 0xFFFD;
            }
            o += rg_utf8_encode(cp, d + o); /* at most 4 bytes for a 6- or 12-byte escape */
            break;
        }
        default: p->i = j - 1; return p->err = "bad escape", 0;
        }
    }
    d[o] = 0;
    p->i = end + 1;
    *out = d;
    *out_len = o;
    return 1;
}
RG_S double rg__pow10(int e) {
    static const double t[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                               1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                               1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    double r = 1; /* e >= 0 */
    while (e > 22) r *= 1e22, e -= 22;
    return r * t[e];
}
RG_S int rg__jnum(rg__jp *p, rg_json *v) {
    const char *s = p->s;
    int i = p->i, neg = 0, digits = 0, dexp = 0, frac = 0, expo = 0;
    uint64_t m = 0;
    int overflow = 0;
    if (s[i] == '-') neg = 1, i++;
    if (i >= p->n || s[i] < '0' || s[i] > '9') return p->err = "bad number", 0;
    if (s[i] == '0') {
        i++;
    } else {
        while (i < p->n && s[i] >= '0' && s[i] <= '9') {
            if (digits < 19) m = m * 10 + (uint64_t)(s[i] - '0'), digits += m != 0;
            else dexp++, overflow = 1;
            i++;
        }
    }
    if (i < p->n && s[i] == '.') {
        frac = 1;
        i++;
        if (i >= p->n || s[i] < '0' || s[i] > '9') return p->err = "bad number", 0;
        while (i < p->n && s[i] >= '0' && s[i] <= '9') {
            if (digits < 19) {
                m = m * 10 + (uint64_t)(s[i] - '0');
                digits += m != 0;
                dexp--;
            }
            i++;
        }
    }
    if (i < p->n && (s[i] == 'e' || s[i] == 'E')) {
        frac = 1;
        i++;
        int eneg = 0, ev = 0;
        if (i < p->n && (s[i] == '+' || s[i] == '-')) eneg = s[i] == '-', i++;
        if (i >= p->n || s[i] < '0' || s[i] > '9') return p->err = "bad number", 0;
        while (i < p->n && s[i] >= '0' && s[i] <= '9') {
            if (ev < 100000) ev = ev * 10 + (s[i] - '0');
            i++;
        }
        expo = eneg ? -ev : ev;
    }
    int e10 = dexp + expo;
    double x = (double)m;
    if (m != 0 && e10 > 0) x *= rg__pow10(e10);
    else if (m != 0 && e10 >= -300) x /= rg__pow10(-e10); /* 0.95 = 95 / 100, exactly rounded */
    else if (m != 0 && e10 < 0) x = x / rg__pow10(300) / rg__pow10(-e10 - 300);
    if (x > 1.7976931348623157e308) return p->err = "number out of range", 0;
    v->type = RG_JNUM;
    v->num = neg ? -x : x;
    v->is_int = !frac && !overflow &&
                (m <= (uint64_t)INT64_MAX || (neg && m == (uint64_t)INT64_MAX + 1));
    if (v->is_int) v->i = neg ? (int64_t)(0 - m) : (int64_t)m;
    p->i = i;
    return 1;
}
RG_S rg_json *rg__jvalue(rg__jp *p);
RG_S rg_json *rg__jnew(rg__jp *p, int type) {
    rg_json *v = (rg_json *)rg_arena_alloc(p->a, sizeof(rg_json));
    if (!v) {
        p->err = "out of memory";
        return NULL;
    }
    memset(v, 0, sizeof *v);
    v->type = type;
    return v;
}
RG_S int rg__jlit(rg__jp *p, const char *lit) {
    int n = (int)rg_strlen(lit);
    if (p->n - p->i < n || memcmp(p->s + p->i, lit, (size_t)n) != 0) return 0;
    p->i += n;
    return 1;
}
RG_S rg_json *rg__jvalue(rg__jp *p) {
    rg__jws(p);
    if (p->i >= p->n) return p->err = "unexpected end of input", (rg_json *)0;
    char c = p->s[p->i];
    rg_json *v;
    if (c == '{' || c == '[') {
        if (++p->depth > RG_JSON_MAX_DEPTH) return p->err = "nested too deeply", (rg_json *)0;
        int obj = c == '{';
        char close = obj ? '}' : ']';
        if (!(v = rg__jnew(p, obj ? RG_JOBJ : RG_JARR))) return NULL;
        p->i++;
        rg__jws(p);
        rg_json **tail = &v->child;
        if (p->i < p->n && p->s[p->i] == close) {
            p->i++;
            p->depth--;
            return v;
        }
        for (;;) {
            const char *key = NULL;
            int key_len = 0;
            if (obj) {
                rg__jws(p);
                if (p->i >= p->n || p->s[p->i] != '"')
                    return p->err = "expected a string key", (rg_json *)0;
                if (!rg__jstr(p, &key, &key_len)) return NULL;
                rg__jws(p);
                if (p->i >= p->n || p->s[p->i] != ':') return p->err = "expected ':'", (rg_json *)0;
                p->i++;
            }
            rg_json *item = rg__jvalue(p);
            if (!item) return NULL;
            item->key = key;
            item->key_len = key_len;
            *tail = item;
            tail = &item->next;
            v->len++;
            rg__jws(p);
            if (p->i < p->n && p->s[p->i] == ',') {
                p->i++;
                continue;
            }
            if (p->i < p->n && p->s[p->i] == close) {
                p->i++;
                break;
            }
            return p->err = obj ? "expected ',' or '}'" : "expected ',' or ']'", (rg_json *)0;
        }
        p->depth--;
        return v;
    }
    if (c == '"') {
        if (!(v = rg__jnew(p, RG_JSTR))) return NULL;
        if (!rg__jstr(p, &v->str, &v->len)) return NULL;
        return v;
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        if (!(v = rg__jnew(p, RG_JNUM))) return NULL;
        return rg__jnum(p, v) ? v : (rg_json *)0;
    }
    if (rg__jlit(p, "true") || rg__jlit(p, "false")) {
        if (!(v = rg__jnew(p, RG_JBOOL))) return NULL;
        v->b = c == 't';
        return v;
    }
    if (rg__jlit(p, "null")) return rg__jnew(p, RG_JNULL);
    return p->err = "unexpected character", (rg_json *)0;
}
/* Parse s[0..n). On failure returns NULL and, if err is given, writes
 * "invalid JSON at byte N: reason" into it. */
RG_S rg_json *rg_json_parse(rg_arena *a, const char *s, int n, rg_buf *err) {
    rg__jp p = {s, n, 0, a, NULL, 0};
    rg_json *v = rg__jvalue(&p);
    if (v) {
        rg__jws(&p);
        if (p.i < p.n) v = NULL, p.err = "trailing characters after the value";
    }
    if (!v && err) rg_buf_fmt(err, "invalid JSON at byte %d: %s", p.i, p.err ? p.err : "error");
    return v;
}
/* The member `key` of an object (the first one), or NULL. */
RG_S const rg_json *rg_json_get(const rg_json *obj, const char *key) {
    if (!obj || obj->type != RG_JOBJ) return NULL;
    int n = (int)rg_strlen(key);
    for (const rg_json *m = obj->child; m; m = m->next)
        if (m->key_len == n && memcmp(m->key, key, (size_t)n) == 0) return m;
    return NULL;
}
RG_S int64_t rg_json_int(const rg_json *v, int64_t dflt) { /* integral numbers, saturating */
    if (!v || v->type != RG_JNUM) return dflt;
    if (v->is_int) return v->i;
    if (v->num >= 9.2233720368547758e18) return INT64_MAX;
    if (v->num <= -9.2233720368547758e18) return INT64_MIN;
    return (int64_t)v->num;
}
RG_S double rg_json_num(const rg_json *v, double dflt) {
    return v && v->type == RG_JNUM ? v->num : dflt;
}
RG_S int rg_json_is_integral(const rg_json *v) {
    if (!v || v->type != RG_JNUM) return 0;
    if (v->is_int) return 1;
    double x = v->num;
    if (x >= 9.2233720368547758e18 || x <= -9.2233720368547758e18) return 1; /* finite: integral */
    return x == (double)(int64_t)x;
}

/* ---------------------------------------------------------------------------------------------
 * Functions, parameters, metadata, dispatch
 * ------------------------------------------------------------------------------------------- */
typedef enum {
    RG_P_STRING,  /* JSON string */
    RG_P_INT,     /* JSON integer */
    RG_P_NUMBER,  /* JSON number */
    RG_P_BOOL,    /* JSON boolean */
    RG_P_STRINGS, /* array of strings */
    RG_P_INTS,    /* array of integers */
    RG_P_JSON,    /* anything: `schema` is its JSON schema; the function validates it */
} rg_ptype;

typedef struct {
    const char *name;
    rg_ptype type;
    const char *description;
    int required;
    /* JSON literals (as text) or NULL: the default, and the range of numbers */
    const char *def;
    const char *minimum, *maximum, *exclusive_minimum, *exclusive_maximum;
    int min_length; /* strings, and the strings of RG_P_STRINGS */
    int max_length; /* strings (0: no limit) */
    int max_items;  /* arrays (0: no limit) */
    const char *schema; /* RG_P_JSON: the property's whole JSON schema */
} rg_param;

typedef struct rg_call rg_call;
typedef struct {
    const char *name;
    const char *description;
    int streams;
    const rg_param *params;
    int n_params;
    int (*impl)(rg_call *c);
} rg_function;

typedef struct {
    const char *name;
    const char *version;
    const char *description;
    const rg_function *const *functions;
    int n_functions;
} rg_module;

struct rg_call {
    const rg_function *fn;
    rg_arena *arena;     /* freed when the call returns */
    const rg_json *params; /* the validated params object */
    int result_set;
};

/* Set the call's result from a JSON object in b. Returns 0 (or a negative status). */
RG_S int rg_result(rg_call *c, rg_buf *b) {
    if (b->oom) {
        static const char oom[] = "{\"error\":\"out of memory building the result\"}";
        realm_result(oom, (int32_t)sizeof oom - 1);
        c->result_set = 1;
        return REALM_ELIMIT;
    }
    int32_t st = realm_result(b->p, b->len);
    c->result_set = 1;
    return st < 0 ? st : 0;
}
/* Fail the call: sets the result {"error": message} and returns status (use: return rg_fail(..)) */
RG_S int rg_fail(rg_call *c, int status, const char *fmt, ...) {
    rg_buf msg = rg_buf_in(c->arena), out = rg_buf_in(c->arena);
    va_list ap;
    va_start(ap, fmt);
    rg_buf_vfmt(&msg, fmt, ap);
    va_end(ap);
    rg_buf_puts(&out, "{\"error\":");
    rg_buf_json_str(&out, rg_buf_cstr(&msg), msg.len);
    rg_buf_putc(&out, '}');
    if (out.oom) {
        static const char oom[] = "{\"error\":\"out of memory\"}";
        realm_result(oom, (int32_t)sizeof oom - 1);
    } else {
        realm_result(out.p, out.len);
    }
    c->result_set = 1;
    return status < 0 ? status : REALM_EINTERNAL;
}
RG_S void rg_log_fmt(int level, const char *fmt, ...) {
    rg_arena a = {0};
    rg_buf b = rg_buf_in(&a);
    va_list ap;
    va_start(ap, fmt);
    rg_buf_vfmt(&b, fmt, ap);
    va_end(ap);
    if (!b.oom) realm_log(level, b.p, b.len);
    rg_arena_free(&a);
}

RG_S const rg_param *rg__param_spec(const rg_function *f, const char *name, int n) {
    for (int i = 0; i < f->n_params; i++)
        if (rg_streq(name, n, f->params[i].name)) return &f->params[i];
    return NULL;
}
/* A parameter's value as sent, or its default (parsed from the spec's `def`), or NULL. */
RG_S const rg_json *rg_param_get(rg_call *c, const char *name) {
    const rg_json *v = rg_json_get(c->params, name);
    if (v) return v;
    const rg_param *p = rg__param_spec(c->fn, name, (int)rg_strlen(name));
    if (!p || !p->def) return NULL;
    return rg_json_parse(c->arena, p->def, (int)rg_strlen(p->def), NULL);
}
RG_S int rg_param_given(rg_call *c, const char *name) { return rg_json_get(c->params, name) != 0; }
RG_S const char *rg_param_str(rg_call *c, const char *name, int *len) {
    const rg_json *v = rg_param_get(c, name);
    if (!v || v->type != RG_JSTR) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = v->len;
    return v->str;
}
RG_S int64_t rg_param_int(rg_call *c, const char *name) {
    return rg_json_int(rg_param_get(c, name), 0);
}
RG_S double rg_param_num(rg_call *c, const char *name) {
    return rg_json_num(rg_param_get(c, name), 0);
}
RG_S int rg_param_bool(rg_call *c, const char *name) {
    const rg_json *v = rg_param_get(c, name);
    return v && v->type == RG_JBOOL && v->b;
}

RG_S const char *rg__ptype_name(rg_ptype t) {
    switch (t) {
    case RG_P_STRING: return "a string";
    case RG_P_INT: return "an integer";
    case RG_P_NUMBER: return "a number";
    case RG_P_BOOL: return "a boolean";
    case RG_P_STRINGS: return "an array of strings";
    case RG_P_INTS: return "an array of integers";
    default: return "a JSON value";
    }
}
RG_S double rg__lit(rg_arena *a, const char *lit) {
    const rg_json *v = rg_json_parse(a, lit, (int)rg_strlen(lit), NULL);
    return v && v->type == RG_JNUM ? v->num : 0;
}
RG_S int rg__utf8_chars(const char *s, int n) {
    int k = 0;
    for (int i = 0; i < n; i++) k += ((unsigned char)s[i] & 0xC0) != 0x80;
    return k;
}
/* Check one value against its spec; writes the reason to err and returns 0 when it fails. */
RG_S int rg__check(rg_arena *a, const rg_param *p, const rg_json *v, rg_buf *err) {
    int ok = 1;
    switch (p->type) {
    case RG_P_STRING:
        ok = v->type == RG_JSTR;
        if (ok && p->min_length && rg__utf8_chars(v->str, v->len) < p->min_length) {
            rg_buf_fmt(err, "'%s' must be at least %d characters long", p->name, p->min_length);
            return 0;
        }
        if (ok && p->max_length && rg__utf8_chars(v->str, v->len) > p->max_length) {
            rg_buf_fmt(err, "'%s' must be at most %d characters long", p->name, p->max_length);
            return 0;
        }
        break;
    case RG_P_INT: ok = rg_json_is_integral(v); break;
    case RG_P_NUMBER: ok = v->type == RG_JNUM; break;
    case RG_P_BOOL: ok = v->type == RG_JBOOL; break;
    case RG_P_STRINGS:
    case RG_P_INTS:
        ok = v->type == RG_JARR;
        if (ok && p->max_items && v->len > p->max_items) {
            rg_buf_fmt(err, "'%s' must have at most %d items", p->name, p->max_items);
            return 0;
        }
        if (ok) {
            int i = 0;
            for (const rg_json *it = v->child; it; it = it->next, i++) {
                int good = p->type == RG_P_STRINGS ? it->type == RG_JSTR : rg_json_is_integral(it);
                if (!good) {
                    rg_buf_fmt(err, "'%s'[%d] must be %s", p->name, i,
                               p->type == RG_P_STRINGS ? "a string" : "an integer");
                    return 0;
                }
                if (p->type == RG_P_STRINGS && p->min_length &&
                    rg__utf8_chars(it->str, it->len) < p->min_length) {
                    rg_buf_fmt(err, "'%s'[%d] must be at least %d characters long", p->name, i,
                               p->min_length);
                    return 0;
                }
            }
        }
        break;
    case RG_P_JSON: break;
    }
    if (!ok) {
        rg_buf_fmt(err, "'%s' must be %s", p->name, rg__ptype_name(p->type));
        return 0;
    }
    if (p->type == RG_P_INT || p->type == RG_P_NUMBER) {
        double x = v->num;
        if (p->minimum && !(x >= rg__lit(a, p->minimum)))
            return rg_buf_fmt(err, "'%s' must be >= %s (got %g)", p->name, p->minimum, x), 0;
        if (p->maximum && !(x <= rg__lit(a, p->maximum)))
            return rg_buf_fmt(err, "'%s' must be <= %s (got %g)", p->name, p->maximum, x), 0;
        if (p->exclusive_minimum && !(x > rg__lit(a, p->exclusive_minimum)))
            return rg_buf_fmt(err, "'%s' must be > %s (got %g)", p->name, p->exclusive_minimum,
                              x),
                   0;
        if (p->exclusive_maximum && !(x < rg__lit(a, p->exclusive_maximum)))
            return rg_buf_fmt(err, "'%s' must be < %s (got %g)", p->name, p->exclusive_maximum,
                              x),
                   0;
    }
    return 1;
}
/* Validate params against the function's spec: an object, known keys only, no duplicates,
 * required keys present, types and ranges. The host checks the same schema first; the guest
 * checks again so that it never relies on its caller. */
RG_S int rg_params_validate(rg_call *c, const rg_json *obj, rg_buf *err) {
    const rg_function *f = c->fn;
    if (obj->type != RG_JOBJ) return rg_buf_puts(err, "params must be a JSON object"), 0;
    for (const rg_json *m = obj->child; m; m = m->next) {
        const rg_param *p = rg__param_spec(f, m->key, m->key_len);
        if (!p) {
            rg_buf_puts(err, "unknown parameter ");
            rg_buf_json_str(err, m->key, m->key_len);
            rg_buf_fmt(err, " (%s takes:", f->name);
            for (int i = 0; i < f->n_params; i++)
                rg_buf_fmt(err, "%s %s", i ? "," : "", f->params[i].name);
            rg_buf_puts(err, ")");
            return 0;
        }
        for (const rg_json *o = obj->child; o != m; o = o->next)
            if (o->key_len == m->key_len && memcmp(o->key, m->key, (size_t)m->key_len) == 0)
                return rg_buf_fmt(err, "duplicate parameter '%s'", p->name), 0;
        if (!rg__check(c->arena, p, m, err)) return 0;
    }
    for (int i = 0; i < f->n_params; i++)
        if (f->params[i].required && !rg_json_get(obj, f->params[i].name))
            return rg_buf_fmt(err, "missing required parameter '%s'", f->params[i].name), 0;
    return 1;
}

/* Run one call: parse + validate the params, run impl, free the call's arena. */
RG_S int rg_dispatch(const rg_function *f, int32_t ptr, int32_t len) {
    rg_arena arena = {0};
    rg_call c = {f, &arena, NULL, 0};
    rg_buf err = rg_buf_in(&arena);
    int ret;
    const rg_json *params = NULL;
    if (len < 0) rg_buf_fmt(&err, "negative length %d", len);
    else params = rg_json_parse(&arena, (const char *)(uintptr_t)(uint32_t)ptr, len, &err);
    if (!params) {
        ret = rg_fail(&c, REALM_EINVAL, "%s: params: %s", f->name, rg_buf_cstr(&err));
    } else if (!rg_params_validate(&c, params, &err)) {
        ret = rg_fail(&c, REALM_EINVAL, "%s: params: %s", f->name, rg_buf_cstr(&err));
    } else {
        c.params = params;
        ret = f->impl(&c);
        if (ret < 0 && !c.result_set)
            rg_fail(&c, ret, "%s failed with status %d", f->name, ret);
    }
    rg_arena_free(&arena);
    return ret;
}

/* The metadata JSON, generated from the module's tables (the host builds system_metadata and
 * validates params from it). */
RG_S void rg__schema_num(rg_buf *b, const rg_param *p) {
    if (p->minimum) rg_buf_fmt(b, ",\"minimum\":%s", p->minimum);
    if (p->maximum) rg_buf_fmt(b, ",\"maximum\":%s", p->maximum);
    if (p->exclusive_minimum) rg_buf_fmt(b, ",\"exclusiveMinimum\":%s", p->exclusive_minimum);
    if (p->exclusive_maximum) rg_buf_fmt(b, ",\"exclusiveMaximum\":%s", p->exclusive_maximum);
}
RG_S void rg_metadata_write(rg_buf *b, const rg_module *m) {
    rg_buf_fmt(b, "{\"name\":%q,\"version\":%q", m->name, m->version);
    if (m->description) rg_buf_fmt(b, ",\"description\":%q", m->description);
    rg_buf_fmt(b, ",\"abi_version\":%d,\"functions\":[", REALM_ABI_VERSION);
    for (int i = 0; i < m->n_functions; i++) {
        const rg_function *f = m->functions[i];
        rg_buf_fmt(b, "%s{\"name\":%q,\"description\":%q,\"streams\":%s,", i ? "," : "", f->name,
                   f->description ? f->description : "", f->streams ? "true" : "false");
        rg_buf_puts(b, "\"params\":{\"type\":\"object\",\"properties\":{");
        for (int j = 0; j < f->n_params; j++) {
            const rg_param *p = &f->params[j];
            rg_buf_fmt(b, "%s%q:", j ? "," : "", p->name);
            if (p->type == RG_P_JSON) {
                rg_buf_puts(b, p->schema ? p->schema : "{}");
                continue;
            }
            static const char *const types[] = {"string", "integer", "number", "boolean"};
            if (p->type == RG_P_STRINGS || p->type == RG_P_INTS) {
                rg_buf_fmt(b, "{\"type\":\"array\",\"items\":{\"type\":\"%s\"",
                           p->type == RG_P_STRINGS ? "string" : "integer");
                if (p->type == RG_P_STRINGS && p->min_length)
                    rg_buf_fmt(b, ",\"minLength\":%d", p->min_length);
                rg_buf_putc(b, '}');
                if (p->max_items) rg_buf_fmt(b, ",\"maxItems\":%d", p->max_items);
            } else {
                rg_buf_fmt(b, "{\"type\":\"%s\"", types[p->type]);
                if (p->type == RG_P_STRING && p->min_length)
                    rg_buf_fmt(b, ",\"minLength\":%d", p->min_length);
                if (p->type == RG_P_STRING && p->max_length)
                    rg_buf_fmt(b, ",\"maxLength\":%d", p->max_length);
                rg__schema_num(b, p);
            }
            if (p->def) rg_buf_fmt(b, ",\"default\":%s", p->def);
            if (p->description) rg_buf_fmt(b, ",\"description\":%q", p->description);
            rg_buf_putc(b, '}');
        }
        rg_buf_puts(b, "}");
        int nreq = 0;
        for (int j = 0; j < f->n_params; j++) {
            if (!f->params[j].required) continue;
            rg_buf_fmt(b, "%s%q", nreq++ ? "," : ",\"required\":[", f->params[j].name);
        }
        if (nreq) rg_buf_putc(b, ']');
        rg_buf_puts(b, ",\"additionalProperties\":false}}");
    }
    rg_buf_puts(b, "]}");
}

/* Export the module's metadata (realm_metadata_ptr / realm_metadata_len). */
#define RG_MODULE(mod)                                                                         \
    static rg_buf rg__metadata;                                                                \
    static void rg__metadata_build(void) {                                                     \
        if (!rg__metadata.len) rg_metadata_write(&rg__metadata, &(mod));                       \
    }                                                                                          \
    RG_EXPORT("realm_metadata_ptr") int32_t realm_metadata_ptr(void) {                         \
        rg__metadata_build();                                                                  \
        return (int32_t)(uintptr_t)rg__metadata.p;                                             \
    }                                                                                          \
    RG_EXPORT("realm_metadata_len") int32_t realm_metadata_len(void) {                         \
        rg__metadata_build();                                                                  \
        return rg__metadata.oom ? 0 : rg__metadata.len;                                        \
    }

/* Export realm_fn_<name>(params_ptr, params_len) -> i32 running function `fnvar`. */
#define RG_EXPORT_FUNCTION(name, mod, fnvar)                                                   \
    RG_EXPORT("realm_fn_" #name) int32_t realm_fn_##name(int32_t ptr, int32_t len) {           \
        (void)&(mod);                                                                          \
        return rg_dispatch(&(fnvar), ptr, len);                                                \
    }

/* ---------------------------------------------------------------------------------------------
 * PRNG: xoshiro256** seeded with splitmix64 — from a seed, or from the host's `random` import
 * (which the host seeds from the call's `seed` parameter when it has one).
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    uint64_t s[4];
} rg_rng;

RG_S uint64_t rg__splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
RG_S void rg_rng_seed(rg_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = rg__splitmix(&seed);
}
/* Seed from the host's `random` import; returns its status (on failure, a clock-based seed). */
RG_S int rg_rng_seed_host(rg_rng *r) {
    uint64_t seed[4] = {0, 0, 0, 0};
    int st = realm_random(seed, (int32_t)sizeof seed);
    if (st < 0) seed[0] = (uint64_t)realm_clock_ms() ^ 0x5DEECE66Dull;
    uint64_t x = seed[0] ^ seed[1] ^ seed[2] ^ seed[3];
    rg_rng_seed(r, x);
    for (int i = 0; i < 4; i++) r->s[i] ^= seed[i];
    if (!(r->s[0] | r->s[1] | r->s[2] | r->s[3])) r->s[0] = 1;
    return st;
}
RG_S uint64_t rg_rng_next(rg_rng *r) {
    uint64_t *s = r->s;
    uint64_t x = s[1] * 5;
    uint64_t res = ((x << 7) | (x >> 57)) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = (s[3] << 45) | (s[3] >> 19);
    return res;
}
RG_S double rg_rng_uniform(rg_rng *r) { /* [0, 1) */
    return (double)(rg_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* ---------------------------------------------------------------------------------------------
 * Math without libc
 * ------------------------------------------------------------------------------------------- */
/* e^x, relative error ~2e-7; 0 below -87.3 (and for NaN), +inf above 88. Branch-free. */
RG_S float rg_expf(float x) {
    float xc = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
    float kf = __builtin_rintf(xc * 1.44269504088896341f);
    float r = xc - kf * 0.693145751953125f - kf * 1.42860682030941723e-6f;
    float p = 1.0f +
              r * (1.0f +
                   r * (0.5f +
                        r * (1.0f / 6 +
                             r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r / 5040))))));
    union {
        uint32_t u;
        float f;
    } s;
    s.u = (uint32_t)((int)kf + 127) << 23;
    float y = p * s.f;
    return x > -87.3f ? (x > 88.0f ? __builtin_inff() : y) : 0.0f;
}

/* ln x for x > 0 (relative error ~1e-7); -inf for 0, NaN for negative x and NaN. */
RG_S float rg_logf(float x) {
    if (!(x > 0)) return x == 0 ? -__builtin_inff() : __builtin_nanf("");
    if (x == __builtin_inff()) return x;
    union {
        float f;
        uint32_t u;
    } v;
    v.f = x;
    int e = 0;
    if (v.u < 0x00800000u) { /* subnormal */
        v.f *= 8388608.0f;
        e = -23;
    }
    e += (int)((v.u >> 23) & 0xFF) - 127;
    v.u = (v.u & 0x7FFFFFu) | 0x3F800000u; /* mantissa in [1, 2) */
    double m = v.f;
    if (m > 1.4142135623730951) m *= 0.5, e++;
    double t = (m - 1) / (m + 1), t2 = t * t; /* ln m = 2 atanh t, |t| <= 0.172 */
    double r = 2 * t * (1 + t2 * (1.0 / 3 + t2 * (1.0 / 5 + t2 * (1.0 / 7 + t2 * (1.0 / 9)))));
    return (float)(r + e * 0.69314718055994531);
}

/* ---------------------------------------------------------------------------------------------
 * Sampling (llama.cpp order and semantics): penalties, then top-k, top-p, min-p at temperature
 * 1, then temperature and a draw. No full sort: top-k is a bounded min-heap over the vocabulary,
 * top-p pops a max-heap only until the mass is reached, min-p is a linear filter.
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    float temperature;       /* <= 0: greedy (argmax) */
    int top_k;               /* 0: off */
    float top_p;             /* 1: off */
    float min_p;             /* 0: off */
    float repeat_penalty;    /* 1: off; divides positive logits, multiplies negative ones */
    float presence_penalty;  /* subtracted once from every token in the window */
    float frequency_penalty; /* subtracted once per occurrence in the window */
} rg_sampling;

/* Apply the repetition penalties for the tokens last[0..n) (the penalty window). Each distinct
 * token is penalised once (repeat/presence) plus its count times the frequency penalty. */
RG_S void rg_apply_penalties(const rg_sampling *s, float *logits, int n_vocab, const int32_t *last,
                             int n) {
    if (s->repeat_penalty == 1.0f && s->presence_penalty == 0.0f && s->frequency_penalty == 0.0f)
        return;
    for (int i = 0; i < n; i++) {
        int32_t t = last[i];
        if (t < 0 || t >= n_vocab) continue;
        int seen = 0, count = 1;
        for (int j = 0; j < i && !seen; j++) seen = last[j] == t;
        if (seen) continue;
        for (int j = i + 1; j < n; j++) count += last[j] == t;
        float l = logits[t];
        if (s->repeat_penalty != 1.0f) l = l <= 0 ? l * s->repeat_penalty : l / s->repeat_penalty;
        l -= (float)count * s->frequency_penalty + s->presence_penalty;
        logits[t] = l;
    }
}

RG_S int rg_argmax(const float *l, int n) {
    int best = 0;
    float bv = -__builtin_inff();
    int found = 0;
    for (int i = 0; i < n; i++)
        if (l[i] > bv || (!found && l[i] == bv)) bv = l[i], best = i, found = 1;
    return best;
}

/* a better than b: higher value, ties to the lower id (deterministic) */
#define RG__BETTER(va, ia, vb, ib) ((va) > (vb) || ((va) == (vb) && (ia) < (ib)))

RG_S void rg__heap_down(int32_t *ids, float *v, int n, int i, int max_heap) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, t = i;
        if (max_heap) {
            if (l < n && RG__BETTER(v[l], ids[l], v[t], ids[t])) t = l;
            if (r < n && RG__BETTER(v[r], ids[r], v[t], ids[t])) t = r;
        } else {
            if (l < n && RG__BETTER(v[t], ids[t], v[l], ids[l])) t = l;
            if (r < n && RG__BETTER(v[t], ids[t], v[r], ids[r])) t = r;
        }
        if (t == i) return;
        float tv = v[i];
        v[i] = v[t], v[t] = tv;
        int32_t ti = ids[i];
        ids[i] = ids[t], ids[t] = ti;
        i = t;
    }
}
RG_S void rg__heap_up_min(int32_t *ids, float *v, int i) {
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!RG__BETTER(v[p], ids[p], v[i], ids[i])) return;
        float tv = v[i];
        v[i] = v[p], v[p] = tv;
        int32_t ti = ids[i];
        ids[i] = ids[p], ids[p] = ti;
        i = p;
    }
}

#define RG__SWAP(i, j)                                                                         \
    do {                                                                                       \
        float tv_ = w[i];                                                                      \
        w[i] = w[j], w[j] = tv_;                                                               \
        int32_t ti_ = ids[i];                                                                  \
        ids[i] = ids[j], ids[j] = ti_;                                                         \
    } while (0)

/* Reorder (ids, w) so that its first k entries are the k best (by w, ties to the lower id),
 * k the smallest count whose mass reaches target; returns k. A quickselect on mass: expected
 * O(n), no sort. */
RG_S int rg__mass_select(int32_t *ids, float *w, int n, double target) {
    int lo = 0, hi = n;
    double acc = 0; /* the mass of [0, lo): all better than the rest, and < target */
    while (lo < hi) {
        int a = lo, b = lo + (hi - lo) / 2, c = hi - 1, p; /* median of three as the pivot */
        if (RG__BETTER(w[a], ids[a], w[b], ids[b]))
            p = RG__BETTER(w[b], ids[b], w[c], ids[c]) ? b
                : RG__BETTER(w[a], ids[a], w[c], ids[c]) ? c
                                                         : a;
        else
            p = RG__BETTER(w[a], ids[a], w[c], ids[c]) ? a
                : RG__BETTER(w[b], ids[b], w[c], ids[c]) ? c
                                                         : b;
        RG__SWAP(p, hi - 1);
        float pv = w[hi - 1];
        int32_t pi = ids[hi - 1];
        int m = lo;
        double mass = 0;
        for (int i = lo; i < hi - 1; i++)
            if (RG__BETTER(w[i], ids[i], pv, pi)) {
                mass += w[i];
                RG__SWAP(i, m);
                m++;
            }
        RG__SWAP(m, hi - 1); /* [lo, m) better than the pivot, now at m; (m, hi) worse */
        if (acc + mass >= target) {
            hi = m; /* m > lo here, since acc < target */
        } else if (acc + mass + w[m] >= target) {
            return m + 1;
        } else {
            acc += mass + w[m];
            lo = m + 1;
        }
    }
    return n; /* rounding: the whole set */
}

/* 0 for w in [1, 2), 1 for [0.5, 1), ... 127 and up for tiny ones and 0: by binary exponent */
RG_S int rg__bucket(float x) {
    union {
        float f;
        uint32_t u;
    } b;
    b.f = x;
    int e = (int)((b.u >> 23) & 0xFF);
    return e >= 127 ? 0 : 127 - e;
}

/* The smallest most-probable set of (ids, w) with mass >= target, moved to the front; returns
 * its size. The w (in (0, 1], the best is 1) are bucketed by binary exponent in one pass, the
 * bucket where the mass crosses the target is found, and only that bucket is quickselected. */
RG_S int rg__top_p_select(int32_t *ids, float *w, int n, double target) {
    double mass[129];
    for (int b = 0; b < 129; b++) mass[b] = 0;
    for (int i = 0; i < n; i++) mass[rg__bucket(w[i])] += w[i];
    double cum = 0;
    int cut = 0;
    while (cut < 128 && cum + mass[cut] < target) cum += mass[cut++];
    if (cut == 128) return n; /* rounding: the whole set */
    int k = 0;
    for (int i = 0; i < n; i++)
        if (rg__bucket(w[i]) < cut) {
            RG__SWAP(i, k);
            k++;
        }
    int k2 = k;
    for (int i = k; i < n; i++)
        if (rg__bucket(w[i]) == cut) {
            RG__SWAP(i, k2);
            k2++;
        }
    return k + rg__mass_select(ids + k, w + k, k2 - k, target - cum);
}

/* The candidates rg_sample draws from: returns n > 0 with ids[0..n) and their weights w[0..n)
 * (*sum their total), or -(token + 1) when the outcome is certain (greedy and its fallbacks). */
RG_S int rg__candidates(const rg_sampling *s, const float *logits, int n_vocab, int32_t *ids,
                        float *w, double *sum_out) {
    const float neg_inf = -__builtin_inff();
    if (n_vocab <= 0) return -1;
    if (!(s->temperature > 0) || s->top_k == 1) return -(rg_argmax(logits, n_vocab) + 1);
    int n = 0, use_k = s->top_k > 0 && s->top_k < n_vocab, need_mass = s->top_p < 1.0f;
    float m = neg_inf;
    if (use_k) { /* a min-heap of the k best, root = the worst of them */
        int k = s->top_k;
        for (int i = 0; i < n_vocab; i++) {
            float x = logits[i];
            if (x != x) continue;
            if (n < k) {
                ids[n] = i, w[n] = x;
                rg__heap_up_min(ids, w, n++);
            } else if (RG__BETTER(x, i, w[0], ids[0])) {
                ids[0] = i, w[0] = x;
                rg__heap_down(ids, w, n, 0, 0);
            }
        }
        for (int i = 0; i < n; i++) m = w[i] > m ? w[i] : m;
    } else {
        for (int i = 0; i < n_vocab; i++) m = logits[i] > m ? logits[i] : m; /* NaN skipped */
    }
    if (m == neg_inf || m == __builtin_inff()) return -(rg_argmax(logits, n_vocab) + 1);
    /* min-p: p >= min_p * p_max  <=>  logit >= max + ln(min_p) */
    float lmin = s->min_p > 0 ? m + rg_logf(s->min_p) : neg_inf;
    double z = 0; /* top-p's normaliser: every candidate, before min-p */
    if (use_k) {
        int kept = 0;
        for (int i = 0; i < n; i++) {
            float x = w[i];
            if (need_mass) z += (x = rg_expf(x - m));
            if (w[i] >= lmin) ids[kept] = ids[i], w[kept++] = x;
        }
        n = kept;
    } else if (need_mass) {
        for (int i = 0; i < n_vocab; i++) {
            float x = logits[i], e = rg_expf(x - m);
            z += e;
            if (x >= lmin) ids[n] = i, w[n++] = e;
        }
    } else {
        for (int i = 0; i < n_vocab; i++)
            if (logits[i] >= lmin) ids[n] = i, w[n++] = logits[i];
    }
    if (n == 0) return -(rg_argmax(logits, n_vocab) + 1);
    if (need_mass && n > 1) n = rg__top_p_select(ids, w, n, (double)s->top_p * z);
    double sum = 0; /* weights at the temperature */
    if (need_mass && s->temperature == 1.0f) {
        for (int i = 0; i < n; i++) sum += w[i];
    } else {
        float inv_t = 1.0f / s->temperature;
        for (int i = 0; i < n; i++) sum += (w[i] = rg_expf((logits[ids[i]] - m) * inv_t));
    }
    if (!(sum > 0)) { /* every weight underflowed: the most likely survivor */
        int best = 0;
        for (int i = 1; i < n; i++)
            if (RG__BETTER(logits[ids[i]], ids[i], logits[ids[best]], ids[best])) best = i;
        return -(ids[best] + 1);
    }
    *sum_out = sum;
    return n;
}

/* Draw from weights w[0..n) of total sum (n > 0). */
RG_S int32_t rg__draw(const int32_t *ids, const float *w, int n, double sum, rg_rng *rng) {
    double r = rg_rng_uniform(rng) * sum;
    for (int i = 0; i < n; i++) {
        r -= w[i];
        if (r < 0) return ids[i];
    }
    for (int i = n - 1; i >= 0; i--)
        if (w[i] > 0) return ids[i];
    return ids[n - 1];
}

/* Draw a token from logits[0..n_vocab) (after penalties). ids/w are scratch of n_vocab entries.
 * The same logits, parameters and rng state always give the same token. */
RG_S int rg_sample(const rg_sampling *s, const float *logits, int n_vocab, int32_t *ids, float *w,
                   rg_rng *rng) {
    double sum = 0;
    int n = rg__candidates(s, logits, n_vocab, ids, w, &sum);
    return n < 0 ? -n - 1 : rg__draw(ids, w, n, sum, rng);
}

/* The distribution rg_sample draws from, as probabilities: returns n and sets ids[0..n),
 * p[0..n) (summing to 1); a certain outcome is n = 1 with p[0] = 1. Speculative decoding's
 * acceptance test compares these. */
RG_S int rg_sample_probs(const rg_sampling *s, const float *logits, int n_vocab, int32_t *ids,
                         float *p) {
    double sum = 0;
    int n = rg__candidates(s, logits, n_vocab, ids, p, &sum);
    if (n < 0) {
        ids[0] = -n - 1, p[0] = 1.0f;
        return 1;
    }
    double inv = 1.0 / sum;
    for (int i = 0; i < n; i++) p[i] = (float)(p[i] * inv);
    return n;
}

/* ---------------------------------------------------------------------------------------------
 * Host helpers: snprintf-style imports retried with a big enough buffer, model info.
 * ------------------------------------------------------------------------------------------- */

/* Tokenize into an arena array; returns the count (>= 0) or a negative status. */
RG_S int rg_tokenize(rg_arena *a, const char *model, int model_len, const char *text, int len,
                     int flags, int32_t **out) {
    int cap = len + 8;
    for (int tries = 0; tries < 3; tries++) {
        int32_t *buf = (int32_t *)rg_arena_alloc(a, (size_t)cap * 4);
        if (!buf) return REALM_ELIMIT;
        int n = realm_tokenize(model, model_len, text, len, flags, buf, cap);
        if (n < 0) return n;
        if (n <= cap) {
            *out = buf;
            return n;
        }
        cap = n;
    }
    return REALM_EINTERNAL;
}
/* Call an snprintf-style text import through `fn` into an arena string (NUL-terminated). */
typedef int32_t (*rg_text_fn)(void *ctx, char *out, int32_t cap);
RG_S int rg_text_call(rg_arena *a, rg_text_fn fn, void *ctx, int first_cap, char **out) {
    int cap = first_cap;
    for (int tries = 0; tries < 3; tries++) {
        char *buf = (char *)rg_arena_alloc(a, (size_t)cap + 1);
        if (!buf) return REALM_ELIMIT;
        int n = fn(ctx, buf, cap);
        if (n < 0) return n;
        if (n <= cap) {
            buf[n] = 0;
            *out = buf;
            return n;
        }
        cap = n;
    }
    return REALM_EINTERNAL;
}
typedef struct {
    const char *model;
    int model_len;
    const char *text;
    int text_len;
    int32_t flag;
} rg__text_args;
RG_S int32_t rg__model_info_fn(void *ctx, char *out, int32_t cap) {
    rg__text_args *x = (rg__text_args *)ctx;
    return realm_model_info(x->model, x->model_len, out, cap);
}
RG_S int32_t rg__chat_template_fn(void *ctx, char *out, int32_t cap) {
    rg__text_args *x = (rg__text_args *)ctx;
    return realm_chat_template(x->model, x->model_len, x->text, x->text_len, x->flag, out, cap);
}
/* Render messages_json (a JSON array of {role, content}) with the model's chat template. */
RG_S int rg_chat_template(rg_arena *a, const char *model, int model_len, const char *messages,
                          int len, int add_generation_prompt, char **out) {
    rg__text_args x = {model, model_len, messages, len, add_generation_prompt};
    return rg_text_call(a, rg__chat_template_fn, &x, len + 1024, out);
}

typedef struct {
    int vocab_size;
    int context_length;
    int bos_id, eos_id; /* -1 when the model has none */
    int32_t *eog_ids;
    int n_eog;
    const rg_json *json; /* the whole object */
} rg_model_info;

/* Fetch and parse model_info; returns 0 or a negative status. */
RG_S int rg_get_model_info(rg_arena *a, const char *model, int model_len, rg_model_info *mi) {
    rg__text_args x = {model, model_len, 0, 0, 0};
    char *text;
    int n = rg_text_call(a, rg__model_info_fn, &x, 2048, &text);
    if (n < 0) return n;
    const rg_json *j = rg_json_parse(a, text, n, NULL);
    if (!j || j->type != RG_JOBJ) return REALM_EINTERNAL;
    mi->json = j;
    mi->vocab_size = (int)rg_json_int(rg_json_get(j, "vocab_size"), 0);
    mi->context_length = (int)rg_json_int(rg_json_get(j, "context_length"), 0);
    mi->bos_id = (int)rg_json_int(rg_json_get(j, "bos_id"), -1);
    mi->eos_id = (int)rg_json_int(rg_json_get(j, "eos_id"), -1);
    const rg_json *eog = rg_json_get(j, "eog_ids");
    mi->n_eog = 0;
    mi->eog_ids = NULL;
    if (eog && eog->type == RG_JARR && eog->len > 0) {
        mi->eog_ids = (int32_t *)rg_arena_alloc(a, (size_t)eog->len * 4);
        if (!mi->eog_ids) return REALM_ELIMIT;
        for (const rg_json *it = eog->child; it; it = it->next)
            if (it->type == RG_JNUM) mi->eog_ids[mi->n_eog++] = (int32_t)rg_json_int(it, -1);
    } else if (mi->eos_id >= 0) {
        mi->eog_ids = (int32_t *)rg_arena_alloc(a, 4);
        if (!mi->eog_ids) return REALM_ELIMIT;
        mi->eog_ids[mi->n_eog++] = mi->eos_id;
    }
    if (mi->vocab_size <= 0) return REALM_EINTERNAL;
    return 0;
}

#endif /* REALM_GUEST_H */

/* =============================================================================================
 * Implementation: exactly once per module (skip with REALM_GUEST_DECLS_ONLY in other files)
 * ============================================================================================= */
#if !defined(REALM_GUEST_DECLS_ONLY) && !defined(REALM_GUEST_IMPLEMENTED)
#define REALM_GUEST_IMPLEMENTED

#if defined(__wasm_bulk_memory__) || defined(__wasm_bulk_memory_opt__)
/* memory.copy / memory.fill */
void *memcpy(void *d, const void *s, size_t n) { return __builtin_memcpy(d, s, n); }
void *memmove(void *d, const void *s, size_t n) { return __builtin_memmove(d, s, n); }
void *memset(void *d, int c, size_t n) { return __builtin_memset(d, c, n); }
#else
void *memcpy(void *d, const void *s, size_t n) {
    unsigned char *a = (unsigned char *)d;
    const unsigned char *b = (const unsigned char *)s;
    while (n--) *a++ = *b++;
    return d;
}
void *memmove(void *d, const void *s, size_t n) {
    unsigned char *a = (unsigned char *)d;
    const unsigned char *b = (const unsigned char *)s;
    if (a < b) {
        while (n--) *a++ = *b++;
    } else {
        while (n--) a[n] = b[n];
    }
    return d;
}
void *memset(void *d, int c, size_t n) {
    volatile unsigned char *a = (volatile unsigned char *)d;
    while (n--) *a++ = (unsigned char)c;
    return d;
}
#endif
int memcmp(const void *a, const void *b, size_t n) {
    const unsigned char *x = (const unsigned char *)a, *y = (const unsigned char *)b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i]) return x[i] < y[i] ? -1 : 1;
    return 0;
}

extern unsigned char __heap_base;
#define RG__MAGIC_USED 0xA110C000u
#define RG__MAGIC_FREE 0xF4EE0000u
#define RG__MIN_CLASS 4  /* 16 bytes */
#define RG__MAX_CLASS 31 /* 2 GiB */
static uintptr_t rg__top, rg__end;
static void *rg__free_list[RG__MAX_CLASS + 1];

typedef struct {
    uint32_t magic; /* magic | class */
    uint32_t size;  /* bytes asked for */
} rg__hdr;

void *rg_malloc(size_t n) {
    if (n > ((size_t)1 << 30)) return NULL;
    size_t need = n + sizeof(rg__hdr);
    int cls = RG__MIN_CLASS;
    while (((size_t)1 << cls) < need) cls++;
    rg__hdr *h;
    if (rg__free_list[cls]) {
        h = (rg__hdr *)rg__free_list[cls];
        rg__free_list[cls] = *(void **)(h + 1);
    } else {
        if (!rg__top) {
            rg__top = ((uintptr_t)&__heap_base + 15) & ~(uintptr_t)15;
            rg__end = (uintptr_t)__builtin_wasm_memory_size(0) * 65536;
        }
        uint64_t size = (uint64_t)1 << cls;
        if ((uint64_t)rg__top + size > (uint64_t)rg__end) {
            uint64_t pages = ((uint64_t)rg__top + size - (uint64_t)rg__end + 65535) / 65536;
            if ((uint64_t)rg__end + pages * 65536 > ((uint64_t)1 << 32) - 65536) return NULL;
            if (__builtin_wasm_memory_grow(0, (size_t)pages) == (size_t)-1) return NULL;
            rg__end += (uintptr_t)(pages * 65536);
        }
        h = (rg__hdr *)rg__top;
        rg__top += (uintptr_t)size;
    }
    h->magic = RG__MAGIC_USED | (uint32_t)cls;
    h->size = (uint32_t)n;
    return h + 1;
}

static rg__hdr *rg__header(void *p) {
    uintptr_t a = (uintptr_t)p;
    if (!p || (a & 7) || a < (uintptr_t)&__heap_base + sizeof(rg__hdr) || a > rg__top) return NULL;
    return (rg__hdr *)p - 1;
}

void rg_free(void *p) {
    rg__hdr *h = rg__header(p);
    if (!h || (h->magic & 0xFFFFFF00u) != RG__MAGIC_USED) return; /* not ours, or freed twice */
    int cls = (int)(h->magic & 0xFF);
    if (cls < RG__MIN_CLASS || cls > RG__MAX_CLASS) return;
    h->magic = RG__MAGIC_FREE | (uint32_t)cls;
    *(void **)(h + 1) = rg__free_list[cls];
    rg__free_list[cls] = h;
}

void *rg_realloc(void *p, size_t n) {
    if (!p) return rg_malloc(n);
    rg__hdr *h = rg__header(p);
    if (!h || (h->magic & 0xFFFFFF00u) != RG__MAGIC_USED) return NULL;
    int cls = (int)(h->magic & 0xFF);
    if (n + sizeof(rg__hdr) <= ((size_t)1 << cls)) {
        h->size = (uint32_t)n;
        return p;
    }
    void *q = rg_malloc(n);
    if (!q) return NULL;
    memcpy(q, p, h->size < n ? h->size : n);
    rg_free(p);
    return q;
}

RG_EXPORT("realm_abi_version") int32_t realm_abi_version(void) { return REALM_ABI_VERSION; }
RG_EXPORT("realm_alloc") int32_t realm_alloc(int32_t size) {
    if (size < 0) return 0;
    return (int32_t)(uintptr_t)rg_malloc((size_t)size);
}
RG_EXPORT("realm_free") void realm_free(int32_t ptr, int32_t size) {
    (void)size;
    rg_free((void *)(uintptr_t)(uint32_t)ptr);
}

#endif /* implementation */
