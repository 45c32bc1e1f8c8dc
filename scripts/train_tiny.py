"""Train Realm's built-in default model, ``realm/model/default/realm-tiny.gguf``, on the CPU.

A small llama-architecture model (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied
embeddings) trained on English text that ships with Python: CPython's documentation topics
(``pydoc_data.topics``), the docstrings of the standard library's modules, classes and
functions (read with ``ast``) and its prose comments (read with ``tokenize``). The tokenizer
is a SentencePiece BPE model with byte fallback, written into the GGUF with llama's tokenizer
fields, so Realm and llama.cpp tokenize as SentencePiece does. Each document is trained on as
``<s>`` + its ids + ``</s>``, so the model learns to end a text. About 4% of the documents,
chosen by a hash of their names, are held out; the held-out perplexity is measured here (torch,
float32, on the F16-rounded weights) and recorded with the held-out text so a test recomputes
it with Realm.

Development only; needs the ``[train]`` extra (torch, sentencepiece)::

    pip install -e '.[train]'
    python scripts/train_tiny.py                  # ~28 minutes on one core
    python scripts/train_tiny.py --steps 20 --out /tmp/smoke   # a smoke run

Writes ``realm-tiny.gguf``, ``realm-tiny.json`` (hyper-parameters, corpus, loss curve,
held-out perplexity, samples) and ``heldout.txt`` to ``--out``. Seeds are fixed: a rerun on the
same Python, torch and thread count gives the same tokenizer and, up to floating-point
reduction order, the same weights. See docs/default-model.md.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import math
import platform
import sys
import sysconfig
import tempfile
import time
import tokenize
from pathlib import Path
from typing import Any, Final

import attrs
import numpy as np

try:
    import sentencepiece as spm
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as exc:  # pragma: no cover - development tool
    sys.exit(f"train_tiny.py needs the [train] extra (pip install -e '.[train]'): {exc}")

import gguf

REPO: Final = Path(__file__).resolve().parent.parent
DEFAULT_OUT: Final = REPO / "realm" / "model" / "default"
MODEL_NAME: Final = "realm-tiny"
HELDOUT_FILE: Final = "heldout.txt"
DOC_SEPARATOR: Final = "\f"  # between held-out documents in heldout.txt (never inside one)
# a document is held out when its name's hash is 0 mod this: 4.1% of the bytes on Python 3.11
# (the smallest modulus near 5% that keeps heldout.txt under 200 KB)
HELDOUT_MODULUS: Final = 27
SEED: Final = 1234
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# stdlib trees not read: third-party packages, and the codecs (their comments are code tables)
SKIPPED_DIRS: Final = frozenset({"site-packages", "__pycache__", "encodings"})
MIN_COMMENT_WORDS: Final = 4
MIN_COMMENT_LETTERS: Final = 0.85
SAMPLE_PROMPTS: Final = (
    "The",
    "A list is",
    "Return the",
    "The function",
    "If the",
    "This module provides",
)
SAMPLE_TOKENS: Final = 48  # greedy tokens per sample prompt (fewer when the model stops)
# strings whose SentencePiece ids are recorded; Realm's tokenizer must give the same
TOKENIZER_SAMPLES: Final = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Return a new list containing all items from the iterable in ascending order.",
    "  indented  code:\n    x = f(1, 2)  # comment\n\n",
    "numbers 1234567 and 3.14159, unicode café naïve Ελληνικά 日本語 🙂",
    "",
    " leading space and trailing  ",
    "tabs\tand\r\nCRLF",
)


# --- configuration -------------------------------------------------------------------------


@attrs.frozen
class Config:
    """Hyper-parameters of the model and of its training."""

    vocab_size: int = 4096
    n_embd: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 4
    n_ff: int = 768
    context: int = 256
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    steps: int = 1500
    batch: int = 16  # sequences of `context` tokens per step
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 50
    eval_every: int = 300
    seed: int = SEED
    # torch threads: one keeps the reduction order fixed, and on a shared 2-core machine two
    # OpenMP threads stall at every barrier whenever another process holds a core (measured:
    # 3.7 s/step against 1.4 s/step with one thread, under a load of 4)
    threads: int = 1

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads


# --- corpus --------------------------------------------------------------------------------


@attrs.frozen
class Document:
    name: str  # "pydoc_data.topics:<topic>" or "stdlib:<path relative to the stdlib>"
    text: str


def pydoc_topics() -> list[Document]:
    """CPython's documentation topics, one document each."""
    from pydoc_data.topics import topics

    return [Document(f"pydoc_data.topics:{k}", clean(topics[k])) for k in sorted(topics)]


def stdlib_modules() -> list[tuple[str, str]]:
    """(path relative to the stdlib, source) of every stdlib module, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_DIRS & set(rel.parts):
            continue
        try:
            out.append((rel.as_posix(), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # deliberately broken test inputs
    return out


def stdlib_docstrings(modules: list[tuple[str, str]]) -> list[Document]:
    """One document per stdlib module: its docstrings (module, classes, functions) in source
    order, each docstring once in the whole corpus."""
    seen: set[str] = set()
    docs = []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for rel, source in modules:
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue  # deliberately broken test inputs
        found = [n for n in ast.walk(tree) if isinstance(n, nodes)]
        found.sort(key=lambda n: getattr(n, "lineno", 0))
        parts = []
        for node in found:
            text = ast.get_docstring(node, clean=True)
            if text and text.strip() and text not in seen:
                seen.add(text)
                parts.append(clean(text))
        if parts:
            docs.append(Document(f"stdlib:{rel}", "\n".join(parts)))
    return docs


def stdlib_comments(modules: list[tuple[str, str]]) -> list[Document]:
    """One document per stdlib module: its prose comments, one line per block of consecutive
    comment lines, each block once in the whole corpus. A block is prose when it has at least
    ``MIN_COMMENT_WORDS`` words and letters and spaces make ``MIN_COMMENT_LETTERS`` of it
    (commented-out code and tables are not)."""
    seen: set[str] = set()
    docs = []
    for rel, source in modules:
        blocks: list[list[str]] = []
        last_line = -2
        try:
            for t in tokenize.generate_tokens(io.StringIO(source).readline):
                if t.type != tokenize.COMMENT:
                    continue
                if t.start[0] != last_line + 1:
                    blocks.append([])
                blocks[-1].append(t.string.lstrip("#").strip())
                last_line = t.start[0]
        except (tokenize.TokenError, SyntaxError):
            continue
        lines = []
        for block in blocks:
            text = " ".join(w for w in block if w).strip()
            letters = sum(c.isalpha() or c == " " for c in text)
            enough = len(text.split()) >= MIN_COMMENT_WORDS
            if enough and letters >= MIN_COMMENT_LETTERS * len(text) and text not in seen:
                seen.add(text)
                lines.append(text)
        if lines:
            docs.append(Document(f"stdlib-comments:{rel}", clean("\n".join(lines))))
    return docs


def clean(text: str) -> str:
    """Text as trained on: no form feeds (the held-out file's separator), no NULs, and not
    ending in blank lines."""
    return text.replace("\f", "").replace("\0", "").rstrip() + "\n"


def is_heldout(doc: Document) -> bool:
    digest = hashlib.blake2b(doc.name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELDOUT_MODULUS == 0


# --- tokenizer -----------------------------------------------------------------------------


def train_tokenizer(docs: list[Document], cfg: Config, workdir: Path) -> spm.SentencePieceProcessor:
    """A llama-style SentencePiece BPE model trained on the lines of ``docs``."""
    lines = [line for d in docs for line in d.text.split("\n") if line.strip()]
    prefix = workdir / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=cfg.vocab_size,
        byte_fallback=True,  # any text encodes: unknown characters become <0xXX> bytes
        character_coverage=0.9995,
        normalization_rule_name="identity",  # llama.cpp does not normalise
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,  # indentation as few tokens
        split_digits=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=cfg.threads,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def token_type(sp: spm.SentencePieceProcessor, i: int) -> int:
    """GGUF's token type (llama.cpp's ``llama_token_type``) of piece ``i``."""
    if sp.IsUnknown(i):
        return int(gguf.TokenType.UNKNOWN)
    if sp.IsControl(i):
        return int(gguf.TokenType.CONTROL)
    if sp.IsByte(i):
        return int(gguf.TokenType.BYTE)
    if sp.IsUnused(i):
        return int(gguf.TokenType.UNUSED)
    return int(gguf.TokenType.NORMAL)


def encode_docs(sp: spm.SentencePieceProcessor, docs: list[Document]) -> list[int]:
    """One token stream: each document as bos + its ids + eos (``encode(add_special=True)``,
    then eos). The eos is what teaches the model to stop; llama's tokenizer fields keep
    ``add_eos_token = false``, so prompts are not ended with it."""
    out: list[int] = []
    for ids in sp.encode([d.text for d in docs]):
        out.append(BOS_ID)
        out.extend(ids)
        out.append(EOS_ID)
    return out


# --- model ---------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(cfg: Config, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``(n, head_dim / 2)``: angle ``pos * base^(-2i / head_dim)`` of pair i."""
    inv = cfg.rope_base ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of each head: GGUF llama's convention (llama.cpp's
    rope mode 0, Realm's ``RopeMode.NORMAL``), so Q/K weights are written as trained, with no
    permutation. ``x``: (batch, time, heads, head_dim)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.wq = nn.Linear(cfg.n_embd, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.n_embd, bias=False)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.w_gate = nn.Linear(cfg.n_embd, cfg.n_ff, bias=False)
        self.w_up = nn.Linear(cfg.n_embd, cfg.n_ff, bias=False)
        self.w_down = nn.Linear(cfg.n_ff, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = apply_rope(self.wq(h).view(b, t, cfg.n_heads, cfg.head_dim), cos, sin)
        k = apply_rope(self.wk(h).view(b, t, cfg.n_kv_heads, cfg.head_dim), cos, sin)
        v = self.wv(h).view(b, t, cfg.n_kv_heads, cfg.head_dim)
        # query head j reads kv head j // (n_heads / n_kv_heads), as llama.cpp does
        rep = cfg.n_heads // cfg.n_kv_heads
        k = k.transpose(1, 2).repeat_interleave(rep, dim=1)
        v = v.transpose(1, 2).repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, cfg.n_heads * cfg.head_dim))
        h = self.ffn_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class Transformer(nn.Module):
    """Llama's graph with tied input/output embeddings (GGUF: no ``output.weight``)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embd = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.output_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        cos, sin = rope_tables(cfg, cfg.context)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02
                if name.endswith(("wo.weight", "w_down.weight")):
                    std /= math.sqrt(2 * cfg.n_layers)  # residual branches (GPT-2's scaling)
                nn.init.normal_(p, 0.0, std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tok_embd(ids)
        for block in self.blocks:
            x = block(x, self.cos[:t], self.sin[:t])
        return self.output_norm(x) @ self.tok_embd.weight.T


# --- training and evaluation ---------------------------------------------------------------


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * ratio


def windows(stream: list[int], context: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of ``context`` tokens (the last may be shorter; one
    of a single token predicts nothing and is dropped). Each window is a fresh context: its
    tokens 1.. are predicted from the window's prefix."""
    out = [stream[i : i + context] for i in range(0, len(stream), context)]
    return [w for w in out if len(w) > 1]


@torch.no_grad()
def heldout_nll(model: Transformer, stream: list[int], context: int) -> tuple[float, int]:
    """Mean negative log-likelihood (nats per token) over the windows, and the tokens scored."""
    model.eval()
    total, count = 0.0, 0
    for w in windows(stream, context):
        ids = torch.tensor([w])
        logits = model(ids[:, :-1])
        nll = F.cross_entropy(logits[0].double(), ids[0, 1:], reduction="sum")
        total += float(nll)
        count += len(w) - 1
    model.train()
    return total / count, count


def train(
    model: Transformer, train_ids: torch.Tensor, heldout: list[int], cfg: Config
) -> tuple[list[dict[str, float]], float]:
    """Train in place; return the loss curve and the final train loss (mean of the last
    ``log_every`` steps)."""
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.context
    offsets_max = len(train_ids) - n - 1
    curve: list[dict[str, float]] = []
    recent: list[float] = []
    start = time.monotonic()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        starts = torch.randint(0, offsets_max, (cfg.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + n + 1] for s in starts.tolist()])
        # bfloat16 matmuls (about 3x faster on CPUs with AVX-512 BF16), float32 master weights
        # and residual stream; evaluation runs in float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        recent.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            point: dict[str, float] = {
                "step": done,
                "train_loss": round(sum(recent) / len(recent), 4),
                "lr": round(lr_at(step, cfg), 6),
                "seconds": round(time.monotonic() - start, 1),
            }
            if done % cfg.eval_every == 0 or done == cfg.steps:
                nll, _ = heldout_nll(model, heldout, cfg.context)
                point["heldout_loss"] = round(nll, 4)
            curve.append(point)
            heldout_part = (
                f"  held-out loss {point['heldout_loss']:.4f}" if "heldout_loss" in point else ""
            )
            print(
                f"step {done:5d}  train loss {point['train_loss']:.4f}{heldout_part}"
                f"  lr {point['lr']:.2e}  {point['seconds']:.0f} s",
                flush=True,
            )
            final = point["train_loss"]
            recent = []
    return curve, final


@torch.no_grad()
def round_to_f16(model: Transformer) -> None:
    """Round every matrix to float16 and back: the weights the GGUF file holds."""
    for p in model.parameters():
        if p.dim() == 2:
            p.copy_(p.half().float())


@torch.no_grad()
def greedy(model: Transformer, ids: list[int], n: int) -> tuple[list[int], bool]:
    """Up to ``n`` argmax tokens after ``ids``, and whether generation stopped at eos (which is
    not among the tokens returned)."""
    model.eval()
    out = list(ids)
    stopped = False
    for _ in range(n):
        logits = model(torch.tensor([out[-model.cfg.context :]]))
        nxt = int(logits[0, -1].argmax())
        if nxt == EOS_ID:
            stopped = True
            break
        out.append(nxt)
    model.train()
    return out[len(ids) :], stopped


# --- export --------------------------------------------------------------------------------


def write_gguf(model: Transformer, sp: spm.SentencePieceProcessor, path: Path) -> None:
    """The model as a GGUF llama file: F16 matrices, F32 norms, llama's tokenizer fields."""
    cfg = model.cfg
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(MODEL_NAME)
    w.add_description(
        "Realm's built-in default model: a tiny llama trained on CPython's documentation "
        "topics and standard-library docstrings (scripts/train_tiny.py)"
    )
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    w.add_context_length(cfg.context)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.IdToPiece(i) for i in range(cfg.vocab_size)])
    w.add_token_scores([float(sp.GetScore(i)) for i in range(cfg.vocab_size)])
    w.add_token_types([token_type(sp, i) for i in range(cfg.vocab_size)])
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)

    def matrix(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.detach().numpy().astype(np.float16))  # (n_out, n_in), as GGUF

    def vector(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.detach().numpy().astype(np.float32))

    matrix("token_embd.weight", model.tok_embd.weight)
    for i, b in enumerate(model.blocks):
        vector(f"blk.{i}.attn_norm.weight", b.attn_norm.weight)
        matrix(f"blk.{i}.attn_q.weight", b.wq.weight)
        matrix(f"blk.{i}.attn_k.weight", b.wk.weight)
        matrix(f"blk.{i}.attn_v.weight", b.wv.weight)
        matrix(f"blk.{i}.attn_output.weight", b.wo.weight)
        vector(f"blk.{i}.ffn_norm.weight", b.ffn_norm.weight)
        matrix(f"blk.{i}.ffn_gate.weight", b.w_gate.weight)
        matrix(f"blk.{i}.ffn_up.weight", b.w_up.weight)
        matrix(f"blk.{i}.ffn_down.weight", b.w_down.weight)
    vector("output_norm.weight", model.output_norm.weight)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def check_with_realm(
    path: Path, model: Transformer, heldout_docs: list[Document], heldout: list[int]
) -> dict[str, Any]:
    """Load the file with Realm: its tokenizer must give SentencePiece's ids on the held-out
    text, and its logits must match torch's on a held-out window."""
    sys.path.insert(0, str(REPO))
    import realm

    tok = realm.load_tokenizer(path)
    ours = [t for d in heldout_docs for t in [*tok.encode(d.text, add_special=True), EOS_ID]]
    if ours != heldout:
        pairs = enumerate(zip(ours, heldout, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), min(len(ours), len(heldout)))
        raise SystemExit(f"Realm's tokenizer differs from SentencePiece at held-out token {first}")
    window = heldout[: model.cfg.context]
    with torch.no_grad():
        model.eval()
        theirs = model(torch.tensor([window]))[0].numpy()
    got = realm.load_model(path).logits(window)
    rel = float(np.abs(got - theirs).max() / np.abs(theirs).max())
    agree = float((got.argmax(-1) == theirs.argmax(-1)).mean())
    print(f"Realm vs torch on a held-out window: max rel error {rel:.2e}, argmax agreement {agree}")
    return {"realm_vs_torch_max_rel_error": rel, "realm_vs_torch_argmax_agreement": agree}


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--threads", type=int, choices=(1, 2), default=defaults.threads)
    args = parser.parse_args(argv)
    cfg = Config(
        steps=args.steps,
        log_every=args.log_every,
        eval_every=args.eval_every,
        threads=args.threads,
    )

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.monotonic()

    modules = stdlib_modules()
    docs = pydoc_topics() + stdlib_docstrings(modules) + stdlib_comments(modules)
    train_docs = [d for d in docs if not is_heldout(d)]
    heldout_docs = [d for d in docs if is_heldout(d)]
    n_bytes = sum(len(d.text.encode()) for d in docs)
    heldout_bytes = sum(len(d.text.encode()) for d in heldout_docs)
    print(
        f"corpus: {len(docs)} documents, {n_bytes / 1e6:.2f} MB; held out {len(heldout_docs)} "
        f"documents, {heldout_bytes / 1e3:.0f} KB ({heldout_bytes / n_bytes:.1%})",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp:
        sp = train_tokenizer(train_docs, cfg, Path(tmp))
    train_stream = encode_docs(sp, train_docs)
    heldout = encode_docs(sp, heldout_docs)
    print(
        f"tokenizer: {sp.GetPieceSize()} pieces; {len(train_stream)} train tokens "
        f"({(n_bytes - heldout_bytes) / len(train_stream):.2f} bytes/token), {len(heldout)} "
        f"held-out tokens ({time.monotonic() - t0:.0f} s)",
        flush=True,
    )

    model = Transformer(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters; training {cfg.steps} steps of "
          f"{cfg.batch} x {cfg.context} tokens", flush=True)  # fmt: skip
    t_train = time.monotonic()
    curve, final_loss = train(model, torch.tensor(train_stream), heldout, cfg)
    train_seconds = time.monotonic() - t_train
    nll_f32, _ = heldout_nll(model, heldout, cfg.context)
    round_to_f16(model)
    nll, scored = heldout_nll(model, heldout, cfg.context)
    print(
        f"trained in {train_seconds:.0f} s; held-out perplexity {math.exp(nll):.3f} "
        f"(F16 weights; {math.exp(nll_f32):.3f} before rounding) over {scored} tokens",
        flush=True,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    gguf_path = args.out / f"{MODEL_NAME}.gguf"
    write_gguf(model, sp, gguf_path)
    (args.out / HELDOUT_FILE).write_text(
        DOC_SEPARATOR.join(d.text for d in heldout_docs), encoding="utf-8", newline=""
    )
    checks = check_with_realm(gguf_path, model, heldout_docs, heldout)

    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = [BOS_ID, *sp.encode(prompt)]
        out, stopped = greedy(model, ids, SAMPLE_TOKENS)
        samples.append(
            {
                "prompt": prompt,
                "greedy_ids": out,
                "greedy_text": sp.decode(out),
                "stopped_at_eos": stopped,
            }
        )
        print(f"  {prompt!r} -> {sp.decode(out)!r}{' </s>' if stopped else ''}", flush=True)

    report = {
        "name": MODEL_NAME,
        "file": gguf_path.name,
        "file_bytes": gguf_path.stat().st_size,
        "weights": "F16 matrices, F32 norms",
        "n_params": n_params,
        "hyperparameters": attrs.asdict(cfg) | {"head_dim": cfg.head_dim, "tied_embeddings": True},
        "corpus": {
            "description": (
                "English text that ships with Python: CPython's documentation topics "
                "(pydoc_data.topics, one document per topic); the standard library's "
                "docstrings (one document per module: its module, class and function "
                "docstrings in source order, each distinct docstring once, read with ast); "
                "and its prose comments (one document per module: each block of consecutive "
                f"comment lines as one line, kept when it has >= {MIN_COMMENT_WORDS} words and "
                f">= {MIN_COMMENT_LETTERS:.0%} letters and spaces, each distinct block once, "
                "read with tokenize); from every .py file of the stdlib except site-packages "
                "and encodings"
            ),
            "python": platform.python_version(),
            "documents": len(docs),
            "bytes": n_bytes,
            "train_documents": len(train_docs),
            "train_tokens": len(train_stream),
            "heldout_rule": (
                f"a document is held out when int.from_bytes(blake2b(name, digest_size=8), "
                f"'little') % {HELDOUT_MODULUS} == 0"
            ),
            "heldout_documents": [d.name for d in heldout_docs],
            "heldout_bytes": heldout_bytes,
        },
        "tokenizer": {
            "kind": "SentencePiece BPE, byte fallback, identity normalisation, dummy prefix, "
            "split digits, whitespace-only pieces; trained on the training documents' lines",
            "vocab_size": sp.GetPieceSize(),
            "unk_id": UNK_ID,
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
            "add_bos_token": True,
            "add_eos_token": False,
            "samples": [{"text": s, "ids": sp.encode(s)} for s in TOKENIZER_SAMPLES],
        },
        "training": {
            "seconds": round(train_seconds, 1),
            "total_seconds": round(time.monotonic() - t0, 1),
            "stream": "each training document as bos + its ids + eos, concatenated in corpus "
            "order; batches are random windows of context + 1 tokens of it",
            "tokens_seen": cfg.steps * cfg.batch * cfg.context,
            "epochs": round(cfg.steps * cfg.batch * cfg.context / len(train_stream), 2),
            "final_train_loss": final_loss,
            "loss_curve": curve,
            "optimizer": "AdamW (0.9, 0.95), weight decay on matrices only, grad clip",
            "precision": "bfloat16 autocast (matmuls, attention); float32 weights, optimizer "
            "state, norms and residual stream",
            "torch": torch.__version__,
            "threads": cfg.threads,
            "machine": platform.processor() or platform.machine(),
        },
        "heldout": {
            "file": HELDOUT_FILE,
            "document_separator": DOC_SEPARATOR,
            "tokenization": "each document as bos + its ids + eos, concatenated in file order",
            "windowing": (
                f"consecutive non-overlapping windows of {cfg.context} tokens (the last one "
                "shorter), each a fresh context; every token after a window's first is scored"
            ),
            "tokens": len(heldout),
            "scored_tokens": scored,
            "nll": round(nll, 6),
            "perplexity": round(math.exp(nll), 4),
            "perplexity_before_rounding": round(math.exp(nll_f32), 4),
            "measured_by": "torch float32 on the F16-rounded weights",
        },
        "checks": checks,
        "samples": samples,
    }
    text = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
    (args.out / f"{MODEL_NAME}.json").write_text(text, encoding="utf-8")
    print(f"wrote {gguf_path} ({gguf_path.stat().st_size / 1e6:.1f} MB) and its report "
          f"({time.monotonic() - t0:.0f} s in all)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
