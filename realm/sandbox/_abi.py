"""Guest ABI v1: the one table of host imports, guest exports and status codes.

The linker is built from ``HOST_IMPORTS`` and ``docs/guest-abi.md`` is generated from this
module (``python -m realm.sandbox._abi > docs/guest-abi.md``; a test checks they agree), so
the two cannot drift apart. ``guest/realm_guest.h`` declares the same imports for C guests.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

ABI_VERSION: Final = 1
IMPORT_MODULE: Final = "realm"
FUNCTION_PREFIX: Final = "realm_fn_"  # guest exports realm_fn_<name>(params_ptr, params_len)


class Status(enum.IntEnum):
    """What every host import returns (>= 0 is success, often a count)."""

    OK = 0
    EINVAL = -1  # a bad argument (value, flag, JSON)
    EBOUNDS = -2  # a pointer/length outside the guest's memory: the guest is stopped
    ENOENT = -3  # no such session, model or function
    ECANCELLED = -4  # the call was cancelled or its deadline passed: return promptly
    ELIMIT = -5  # a limit was reached (KV memory, sessions, tokens, output size)
    ENOTSUP = -6  # not supported by this host or model
    EINTERNAL = -7  # the host failed; details are in the call's error


@attrs.frozen
class HostImport:
    name: str
    params: tuple[tuple[str, str], ...]  # (name, wasm type)
    result: str  # wasm type of the single result
    doc: str


def _imp(name: str, params: str, result: str, doc: str) -> HostImport:
    ps = tuple(
        (p.split(":")[0].strip(), p.split(":")[1].strip()) for p in params.split(",") if p.strip()
    )
    return HostImport(name, ps, result, doc)


# Pointers are offsets into the guest's memory (i32 for wasm32 guests), read as unsigned and
# checked with their lengths against the memory's current size before anything touches them.
# Outputs follow snprintf: the import writes at most `cap` units and returns the number the
# full output needs, so a guest retries with a larger buffer when the result exceeds `cap`.
HOST_IMPORTS: Final[tuple[HostImport, ...]] = (
    _imp("log", "level: i32, ptr: i32, len: i32", "i32",
         "Log UTF-8 text at level 0 debug, 1 info, 2 warning, 3 error (rate-limited)."),
    _imp("clock_ms", "", "i64",
         "Milliseconds since this call began (monotonic)."),
    _imp("random", "ptr: i32, len: i32", "i32",
         "Fill [ptr, ptr+len) with bytes from the call's PRNG: seeded from the call's `seed` "
         "parameter when there is one (same seed, same bytes), else from the OS."),
    _imp("model_info", "model_ptr: i32, model_len: i32, out_ptr: i32, out_cap: i32", "i32",
         "JSON object describing a model (model_len 0: the default model): arch, vocab_size, "
         "context_length, bos_id, eos_id, eog_ids, add_bos, add_eos, has_chat_template, "
         "max_tokens_per_forward, max_verify_tokens, vocab_hash (equal for models whose "
         "token ids mean the same: a speculative draft's check), ... Returns bytes needed. "
         "Wherever an import takes a model's name, the name of one of the calling tenant's "
         "LoRA adapters names its model with the adapter applied (`session_open` then runs "
         "the session with it; here `model` is the base model and `adapter` the name)."),
    _imp("tokenize",
         "model_ptr: i32, model_len: i32, text_ptr: i32, text_len: i32, flags: i32, "
         "out_ptr: i32, out_cap: i32", "i32",
         "Encode UTF-8 text to i32 token ids (flags: 1 add BOS/EOS as the model does, 2 parse "
         "special tokens). Returns the number of ids (written up to out_cap)."),
    _imp("decode", "model_ptr: i32, model_len: i32, ids_ptr: i32, n_ids: i32, out_ptr: i32, "
         "out_cap: i32", "i32",
         "Decode i32 token ids to UTF-8 text. Returns bytes needed."),
    _imp("chat_template", "model_ptr: i32, model_len: i32, messages_ptr: i32, messages_len: i32, "
         "add_generation_prompt: i32, out_ptr: i32, out_cap: i32", "i32",
         "Render a JSON array of {role, content} messages with the model's chat template. "
         "Returns bytes needed."),
    _imp("session_open", "model_ptr: i32, model_len: i32, capacity: i32", "i32",
         "Open a sequence (KV cache) of up to capacity positions (0: the model's context). "
         "Returns a handle >= 0 that only this tenant can name and that is never reused. A "
         "session outlives a call that returns, but when the call that opened it ends by a "
         "trap, a cancel or its deadline, the host closes it unless `session_keep` kept it. "
         "At the tenant's session limit the import waits for a session that another running "
         "call will give back, or returns ELIMIT when none will (this call holds one, or "
         "every open session is kept)."),
    _imp("session_close", "session: i32", "i32",
         "Close a session and free its KV cache (works after a cancel too)."),
    _imp("session_rewind", "session: i32, pos: i32", "i32",
         "Forget positions >= pos. Returns the session's position."),
    _imp("session_pos", "session: i32", "i32", "The number of positions a session holds."),
    _imp("session_keep", "session: i32", "i32",
         "Keep a session beyond the call that opened it, however that call ends (a "
         "conversation's cache): the host then closes it only on `session_close` or when the "
         "tenant stops."),
    _imp("forward", "session: i32, tokens_ptr: i32, n_tokens: i32, logits_ptr: i32, "
         "logits_cap: i32, mode: i32", "i32",
         "Append i32 tokens to the session and run the model: the one coarse call on the hot "
         "path, batched by the host with other tenants' steps. mode 0: no logits, 1: the last "
         "position's, 2: every position's, written as f32 to logits_ptr (logits_cap floats); "
         "3 (verify, for speculative decoding): every position's, bit-identical to what "
         "one-token steps of this session would give whatever else the step batches (the "
         "step takes the row-invariant kernel path), at most `max_verify_tokens` (17) tokens. "
         "Returns the number of floats written."),
    _imp("detokenize", "session: i32, token: i32, out_ptr: i32, out_cap: i32", "i32",
         "Streaming detokenizer of the session: push a token (token < 0: push nothing; -2: "
         "also flush held-back bytes) and take the text that is complete UTF-8. Returns bytes "
         "written (not snprintf: up to 3 bytes under out_cap when a character would be split); "
         "text beyond out_cap waits for the next call with token -1."),
    _imp("emit", "ptr: i32, len: i32", "i32",
         "Stream a UTF-8 chunk to the caller (one token event). ECANCELLED means stop. A "
         "chunk over the tenant's `max_emit_chunk_bytes` or past the call's "
         "`max_emit_bytes` is ELIMIT; while the caller has not taken the chunks already "
         "sent, the import waits (backpressure)."),
    _imp("result", "ptr: i32, len: i32", "i32",
         "Set the call's result: a JSON object (the last call wins)."),
    _imp("embed", "model_ptr: i32, model_len: i32, tokens_ptr: i32, n_tokens: i32, out_ptr: i32, "
         "out_cap: i32", "i32",
         "Embedding of i32 tokens in a fresh context: the mean over their positions of the "
         "model's final normalised hidden state, L2-normalised, as f32. Returns the number of "
         "floats (n_embd); when out_cap is smaller, nothing is computed or written."),
    _imp("matmul_f32", "y_ptr: i32, w_ptr: i32, x_ptr: i32, rows: i32, cols: i32, batch: i32",
         "i32",
         "y[b, r] = sum_c w[r, c] x[b, c] on f32 guest buffers (small guest-side compute). "
         "rows x cols and batch x cols are each at most 2^26; y must not overlap w or x. "
         "Runs in chunks between other tenants' forward steps; ECANCELLED when the call is "
         "cancelled or its deadline passes between chunks (y then holds part of the "
         "result)."),
    _imp("attention_f32",
         "out_ptr: i32, q_ptr: i32, k_ptr: i32, v_ptr: i32, pos_ptr: i32, n_q: i32, n_kv: i32, "
         "n_heads: i32, n_kv_heads: i32, head_dim: i32", "i32",
         "Causal grouped-query attention on f32 guest buffers (q: n_q x n_heads x head_dim, "
         "k/v: n_kv x n_kv_heads x head_dim, pos: n_q i32 positions >= 0). "
         "head_dim <= 256, n_kv_heads divides n_heads, and one query's work "
         "(n_heads x head_dim x n_kv) is at most 2^27. Runs in chunks of queries, as "
         "`matmul_f32`."),
    _imp("pager_hint", "model_ptr: i32, model_len: i32, layer: i32, hint: i32", "i32",
         "Layer paging hints for the host-side weight store: 1 prefetch, 2 pin, 3 unpin. "
         "ENOTSUP when the model is not paged."),
)  # fmt: skip

# What a guest module must export.
GUEST_EXPORTS: Final[tuple[tuple[str, str], ...]] = (
    ("memory", "the guest's linear memory (memory64 allowed)"),
    ("realm_abi_version", "() -> i32: the ABI version the guest was built for (1)"),
    ("realm_alloc", "(size: i32) -> i32: allocate size bytes for the host (0 on failure)"),
    ("realm_free", "(ptr: i32, size: i32) -> (): free what realm_alloc returned"),
    ("realm_metadata_ptr", "() -> i32: address of the metadata JSON"),
    ("realm_metadata_len", "() -> i32: its length in bytes"),
    (f"{FUNCTION_PREFIX}<name>", "(params_ptr: i32, params_len: i32) -> i32 (checked when the "
     "module is loaded): a callable function; params are a JSON object; 0 = success (the "
     "result set with `result`), negative = failure (a `result` of {\"error\": message} "
     "explains; the status says whose fault: EINVAL, ENOENT or ENOTSUP are the caller's "
     "params (INVALID_PARAMS), ELIMIT a limit (OVERLOADED), ECANCELLED a cancel "
     "(CANCELLED), anything else the guest's (GUEST_TRAP))"),
)  # fmt: skip


def render_markdown() -> str:
    """docs/guest-abi.md, generated from this table."""
    out = [
        "# Guest ABI v1",
        "",
        "Generated from `realm/sandbox/_abi.py` (`python -m realm.sandbox._abi > "
        "docs/guest-abi.md`); a test checks the two agree. C guests include "
        "`guest/realm_guest.h`.",
        "",
        f"ABI version: **{ABI_VERSION}**. Host imports live in module `{IMPORT_MODULE}`. A module "
        "built for another version is refused at instantiation with an error naming both.",
        "",
        "## Conventions",
        "",
        "- Pointers are offsets into the guest's memory, read as unsigned, and checked with "
        "their lengths (overflow-safe) against the memory's current size before anything reads "
        "or writes them. A bad pointer stops the guest at once (GUEST_TRAP, with the reason).",
        "- Every import returns a status or a count: >= 0 is success, negative is a `Status`.",
        "- Outputs follow snprintf: at most `cap` units are written and the import returns the "
        "number the full output needs; retry with a larger buffer when it exceeds `cap`.",
        "- Imports never raise into the guest. A guest that ignores an error status and keeps "
        "calling is stopped by the host (its fuel is set to zero).",
        "- Every call runs under limits: fuel, an epoch deadline, a memory cap, and a work "
        "budget: every import whose cost grows with its arguments (`tokenize`, `decode`, "
        "`chat_template`, `detokenize`, `forward`, `embed`, `matmul_f32`, `attention_f32`) "
        "charges the call's `max_work_per_call` in proportion to its work, before doing it "
        "(ELIMIT when it does not fit). Sizes and counts are checked before anything is "
        "allocated. Heavy work runs in slices that yield to other tenants' forward steps, "
        "and stops between slices when the call is cancelled or its deadline passes "
        "(ECANCELLED). A cancelled call makes every import "
        "but `result`, `log`, `clock_ms`, `session_close`, `session_keep` and `session_pos` "
        "return ECANCELLED; a guest that does not return is stopped (a passed deadline is "
        "TIMEOUT, a cancel CANCELLED).",
        "- Sessions a call opened are closed by the host when the call ends by a trap, a "
        "cancel or its deadline, unless `session_keep` kept them.",
        "- What a guest returns is checked like client input: `result` must be a JSON object "
        "of at most 1 MiB without NaN, Infinity or numbers that overflow a double; its "
        "`usage` figures must be non-negative integers; a failure while handling it is "
        "GUEST_TRAP with the reason. `log` text is escaped (one line per call of `log`).",
        "- `random` is seeded from the call's `seed` parameter when it has one.",
        "- When a function fails, the host adds what its imports saw go wrong to the guest's "
        "`error` message (a guest cannot read the host's reasons itself).",
        "",
        "## Status codes",
        "",
        "| code | name |",
        "| --- | --- |",
    ]
    out += [f"| {int(s)} | `{s.name}` |" for s in Status]
    out += ["", "## Host imports (module `realm`)", "", "| import | signature | what |",
            "| --- | --- | --- |"]  # fmt: skip
    for imp in HOST_IMPORTS:
        sig = ", ".join(f"{n}: {t}" for n, t in imp.params)
        out.append(f"| `{imp.name}` | `({sig}) -> {imp.result}` | {imp.doc} |")
    out += ["", "## Guest exports", "", "| export | what |", "| --- | --- |"]
    out += [f"| `{name}` | {doc} |" for name, doc in GUEST_EXPORTS]
    out += [
        "",
        "## Metadata",
        "",
        "`realm_metadata_ptr/len` point at a JSON object "
        '`{"name": ..., "version": ..., "functions": [{"name": ..., "description": ..., '
        '"params": <JSON schema>, "streams": bool}]}`. The host validates every call\'s params '
        "against the function's schema before entering the guest (INVALID_PARAMS otherwise) "
        "and builds `system_metadata` from it.",
        "",
        "## The default guest: log-probabilities",
        "",
        "`generate` and `chat` of the default guest (`guest/default_guest.c`) take the opt-in "
        "params `logprobs` (boolean, default false) and `top_logprobs` (0..20, default 0). "
        "With `logprobs`, the result has `logprobs`: one entry per generated token (an "
        'end-of-generation token excluded), `{"id": token id, "logprob": its '
        'log-probability, "top": [[id, logprob], ...]}`, the `top_logprobs` most likely '
        "tokens first. Log-probabilities are the log-softmax of the model's raw logits at that "
        "step (before penalties and temperature). Token events are unchanged (an event is a "
        "piece of text, not always one token: `emit` carries text only). The entries stop at "
        "768 KiB (the result stays under its 1 MiB limit; `logprobs_truncated: true` says so). "
        "With `speculative`, the call runs without speculation (every step's logits are "
        "needed). The cost: one pass over the vocabulary per token, only when asked.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    print(render_markdown(), end="")
