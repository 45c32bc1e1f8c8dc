"""A loaded model: shared weights, sessions with their KV caches, batched forward steps.

One ``Model`` holds one memory-mapped copy of the weights, shared by every session (and so
every tenant). A ``Session`` is one sequence's state: its tokens and KV cache. ``Model.step``
runs one forward step for many sessions at once, in one native call: the basis of batching
across tenants.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

from .._errors import KVMemoryExhausted, ModelError
from ..kernels import LayerWeights, NativeTransformer, SeqStep, TransformerSpec
from ._gguf import ModelFile, ModelInfo, layer_tensor_names, open_model_file, rope_mode

if TYPE_CHECKING:
    from ._lora import Adapter
    from ._pager import LayerPager, PagingBudget
    from ._tokenizer import Tokenizer

KV_GROWTH: Final = 256  # positions: caches start this small and double up to capacity
# "verify": every position's logits, computed so that they do not depend on the rest of the
# batch: bit-identical to one-token steps of the same sequence (speculative decoding's check)
LogitsMode = Literal["last", "all", "none", "verify"]


class Model:
    """A GGUF model loaded for inference (use ``load_model``)."""

    def __init__(
        self,
        mf: ModelFile,
        *,
        kv_dtype: type = np.float16,
        max_kv_bytes: int | None = None,
        max_resident_bytes: int | PagingBudget | None = None,
        device: str = "cpu",
        max_device_bytes: int | None = None,
        pack: bool | None = None,
    ) -> None:
        if pack is not None and not isinstance(pack, bool):
            raise ModelError(f"pack must be True, False or None, got {pack!r}")
        self._file = mf
        self.device = _check_device(device, max_device_bytes)
        self.info: ModelInfo = mf.info
        i = mf.info
        self.spec = TransformerSpec(
            n_layers=i.n_layers, n_embd=i.n_embd, n_heads=i.n_heads, n_kv_heads=i.n_kv_heads,
            head_dim=i.head_dim, n_ff=i.n_ff, n_vocab=i.vocab_size, n_rot=i.n_rot,
            rope_mode=rope_mode(i), rope_base=i.rope_base, rope_scale=i.rope_scale,
            rms_eps=i.rms_eps, kv_dtype=kv_dtype, **mf.graph.as_spec_kwargs(),
        )  # fmt: skip
        tok_embd = mf.matrix("token_embd.weight")
        output = mf.matrix("output.weight") if mf.has("output.weight") else tok_embd
        self.pager: LayerPager | None = None
        make: Any = NativeTransformer
        if self.device != "cpu":  # weights uploaded once, shared by every session
            from ..kernels import CudaTransformer

            make = functools.partial(CudaTransformer, device=self.device,
                                     max_device_bytes=max_device_bytes)  # fmt: skip
        if max_resident_bytes is None:
            layers = [self.layer_weights(n) for n in range(i.n_layers)]
            packing = {} if self.device != "cpu" else {"pack": pack}
            self._native = make(
                self.spec, tok_embd=tok_embd, output_norm=mf.vector("output_norm.weight"),
                output=output, layers=layers, **packing,
            )  # fmt: skip
            if getattr(self._native, "packed_sources", None):
                # the packing read the file's pages; the steps read the packed copy: the pages
                # leave the process (resident memory stays about one copy of the weights)
                from ._pager import release_pages

                release_pages(mf.reader.data, self._native.packed_sources)
        else:
            from ._pager import LayerPager

            self.pager = LayerPager(self, max_resident_bytes=max_resident_bytes)
            self._native = make(
                self.spec, tok_embd=tok_embd, output_norm=mf.vector("output_norm.weight"),
                output=output, acquire=self.pager.acquire, release=self.pager.release,
            )  # fmt: skip
        if max_kv_bytes is not None and (isinstance(max_kv_bytes, bool) or max_kv_bytes < 0):
            raise ModelError(f"max_kv_bytes must be a non-negative int, got {max_kv_bytes!r}")
        self.max_kv_bytes = max_kv_bytes
        self._kv_bytes = 0
        self._kv_lock = threading.Lock()
        self._tokenizer: Tokenizer | None = None

    # --- weights ---------------------------------------------------------------------------

    def layer_weights(self, n: int) -> LayerWeights:
        """Block ``n``'s weights as views into the memory-mapped file."""
        mf = self._file
        names = layer_tensor_names(n, self.info.arch)
        if "wqkv" in names:  # fused (phi3): row ranges of one tensor, as views
            qd, kvd = self.spec.n_heads * self.spec.head_dim, self.spec.kv_dim
            wq = mf.matrix(names["wqkv"], (0, qd))
            wk = mf.matrix(names["wqkv"], (qd, qd + kvd))
            wv = mf.matrix(names["wqkv"], (qd + kvd, qd + 2 * kvd))
            ff = self.spec.n_ff
            w_gate, w_up = mf.matrix(names["w_up"], (0, ff)), mf.matrix(names["w_up"], (ff, 2 * ff))
        else:
            wq, wk, wv = mf.matrix(names["wq"]), mf.matrix(names["wk"]), mf.matrix(names["wv"])
            w_gate, w_up = mf.matrix(names["w_gate"]), mf.matrix(names["w_up"])

        def opt(role: str) -> np.ndarray | None:
            return mf.vector(names[role]) if role in names else None

        return LayerWeights(
            attn_norm=mf.vector(names["attn_norm"]), wq=wq, wk=wk, wv=wv,
            wo=mf.matrix(names["wo"]), ffn_norm=mf.vector(names["ffn_norm"]),
            w_gate=w_gate, w_up=w_up, w_down=mf.matrix(names["w_down"]),
            bq=opt("bq"), bk=opt("bk"), bv=opt("bv"), q_norm=opt("q_norm"), k_norm=opt("k_norm"),
            post_attn_norm=opt("post_attn_norm"), post_ffn_norm=opt("post_ffn_norm"),
        )  # fmt: skip

    @property
    def path(self) -> str:
        return self.info.path

    def load_adapter(self, path: str | os.PathLike[str], *, scale: float = 1.0) -> Adapter:
        """Load a LoRA adapter GGUF file for this model (``realm.model.load_adapter``)."""
        from ._lora import load_adapter

        return load_adapter(path, self, scale=scale)

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer from the file's metadata (loaded on first use)."""
        if self._tokenizer is None:
            from ._tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_reader(self._file.reader, path=self._file.path)
        return self._tokenizer

    # --- KV memory ---------------------------------------------------------------------------

    def kv_bytes_per_position(self) -> int:
        return 2 * self.spec.n_layers * self.spec.kv_dim * np.dtype(self.spec.kv_dtype).itemsize

    @property
    def kv_bytes_used(self) -> int:
        return self._kv_bytes

    def _reserve_kv(self, n: int) -> None:
        with self._kv_lock:
            if self.max_kv_bytes is not None and self._kv_bytes + n > self.max_kv_bytes:
                raise KVMemoryExhausted(
                    f"KV cache memory cap reached: {self._kv_bytes} of {self.max_kv_bytes} bytes "
                    f"in use, {n} more requested"
                )
            self._kv_bytes += n

    def _new_kv(self, capacity: int) -> Any:
        """A zeroed KV cache of ``capacity`` positions on this model's device."""
        if self.device != "cpu":
            return self._native.new_kv(capacity)
        return np.zeros(self.spec.kv_shape(capacity), self.spec.kv_dtype)

    def _copy_kv(self, dst: Any, src: Any, n: int) -> None:
        """Copy the first ``n`` positions of every layer from cache ``src`` to ``dst``."""
        if self.device != "cpu":
            self._native.copy_kv(dst, src, n)
        else:
            dst[:, :, :n] = src[:, :, :n]

    def _free_kv(self, n: int) -> None:
        with self._kv_lock:
            self._kv_bytes -= n

    # --- sessions and steps -------------------------------------------------------------------

    def open_session(
        self, *, capacity: int | None = None, adapter: Adapter | None = None
    ) -> Session:
        """A new, empty sequence of up to ``capacity`` positions (default: the context),
        with a LoRA ``adapter`` of this model applied to its steps (None: the base model)."""
        cap = self.info.context_length if capacity is None else capacity
        if isinstance(cap, bool) or not isinstance(cap, int) or not 0 < cap <= (1 << 24):
            raise ModelError(f"capacity must be a positive int, got {capacity!r}")
        session = Session(self, cap)
        session.adapter = adapter
        return session

    def step(
        self, work: Sequence[tuple[Session, Sequence[int] | np.ndarray, LogitsMode]]
    ) -> list[np.ndarray | None]:
        """One forward step for many sessions in one native call.

        ``work`` holds (session, tokens, logits mode) triples; the sessions must be distinct.
        Returns each session's logits: ``(n_tokens, vocab)`` for "all" and "verify",
        ``(vocab,)`` for "last", None for "none". A "verify" sequence's logits are those its
        tokens get one at a time in steps of their own (the whole step then takes the
        row-invariant kernel path; docs/speculative.md). On error no session changes.
        """
        if not work:
            raise ModelError("step needs at least one session")
        sessions = [w[0] for w in work]
        if len({id(s) for s in sessions}) != len(sessions):
            raise ModelError("a session appears twice in one step")
        steps: list[SeqStep] = []
        outs: list[np.ndarray | None] = []
        prepared: list[tuple[Session, np.ndarray]] = []
        try:
            for session, tokens, mode in work:
                if not isinstance(session, Session) or session.model is not self:
                    raise ModelError("step: a session of another model")
                ids = session._check_tokens(tokens)
                session._acquire()
                prepared.append((session, ids))
                session._ensure_capacity(session.pos + len(ids))
                n_logits = {"all": len(ids), "verify": len(ids), "last": 1, "none": 0}.get(mode)
                if n_logits is None:
                    raise ModelError(
                        f"logits must be 'last', 'all', 'verify' or 'none', got {mode!r}"
                    )
                out = np.empty((n_logits, self.spec.n_vocab), np.float32) if n_logits else None
                outs.append(out)
                step = SeqStep(ids, session.pos, session._kv, out, exact=mode == "verify")
                if session._adapter is not None:
                    step.adapter = session._adapter.native
                steps.append(step)
            self._native.forward(steps)
            for session, ids in prepared:
                session._tokens.extend(int(t) for t in ids)
        finally:
            for session, _ in prepared:
                session._busy = False
        return [
            None if o is None else (o[0] if mode == "last" else o)
            for o, (_, _, mode) in zip(outs, work, strict=True)
        ]

    def logits(
        self, ids: Sequence[int] | np.ndarray, *, adapter: Adapter | None = None
    ) -> np.ndarray:
        """float32 logits ``(len(ids), vocab)`` for every position of a fresh context (with
        a LoRA ``adapter`` of this model applied, when given)."""
        n = len(ids)
        if n == 0:
            raise ModelError("logits needs at least one token")
        with self.open_session(capacity=n, adapter=adapter) as s:
            out = s.extend(ids, logits="all")
        assert out is not None
        return out

    def embed(
        self, ids: Sequence[int] | np.ndarray, *, adapter: Adapter | None = None
    ) -> np.ndarray:
        """An embedding of a token sequence (fresh context): the mean over its positions of the
        final normalised hidden state (the output projection's input), L2-normalised; float32
        ``(n_embd,)``; with a LoRA ``adapter`` of this model applied, when given."""
        if len(ids) == 0:
            raise ModelError("embed needs at least one token")
        with self.open_session(capacity=len(ids), adapter=adapter) as s:
            tokens = s._check_tokens(ids)
            s._acquire()
            try:
                s._ensure_capacity(len(tokens))
                out = np.empty(self.spec.n_embd, np.float32)
                ad = None if adapter is None else adapter.native
                self._native.forward([SeqStep(tokens, 0, s._kv, None, out, adapter=ad)])
            finally:
                s._busy = False
        norm = float(np.linalg.norm(out))
        return out / norm if norm > 0 else out

    def close(self) -> None:
        """Drop this model's references to the mapping (sessions must be closed first); a
        paged model gives its resident blocks back and leaves its budget; a CUDA model frees
        its device memory."""
        if self.device != "cpu" and self._native is not None:
            self._native.close()
        self._native = None  # type: ignore[assignment]
        if self.pager is not None:
            self.pager.close()

    def __repr__(self) -> str:
        i = self.info
        return f"<Model {i.name!r} {i.arch} {i.file_type} {i.n_params / 1e6:.1f}M params>"


class Session:
    """One sequence's state in a model: its tokens and KV cache (use ``Model.open_session``)."""

    def __init__(self, model: Model, capacity: int) -> None:
        self.model = model
        self.capacity = capacity
        self._tokens: list[int] = []
        self._kv = model._new_kv(0)
        self._kv_reserved = 0
        self._busy = False
        self._closed = False
        self._adapter: Adapter | None = None

    @property
    def adapter(self) -> Adapter | None:
        """The LoRA adapter applied to this session's steps (None: the base model)."""
        return self._adapter

    @adapter.setter
    def adapter(self, adapter: Adapter | None) -> None:
        from ._lora import Adapter

        if adapter is not None and not isinstance(adapter, Adapter):
            raise ModelError(f"adapter must be an Adapter or None, not {type(adapter).__name__}")
        if adapter is not None and adapter.model is not self.model:
            raise ModelError("adapter: an adapter loaded for another model")
        if adapter is not self._adapter and self.pos:
            raise ModelError(
                "a session's adapter can change only while it is empty (rewind it to 0): its "
                "cache was computed with the other one"
            )
        self._adapter = adapter

    @property
    def pos(self) -> int:
        """Positions filled (tokens seen)."""
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    @property
    def kv_bytes(self) -> int:
        return self._kv_reserved

    @property
    def closed(self) -> bool:
        return self._closed

    def _acquire(self) -> None:
        if self._closed:
            raise ModelError("session is closed")
        if self._busy:
            raise ModelError("session is in use by another step")
        self._busy = True

    def _check_tokens(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        try:
            ids = np.asarray(tokens)
        except Exception as e:
            raise ModelError(f"tokens must be a sequence of ints: {e}") from e
        if ids.ndim != 1 or ids.size == 0:
            raise ModelError(f"tokens must be a non-empty 1-D sequence, got shape {ids.shape}")
        if ids.dtype.kind not in "iu" or ids.dtype == np.bool_:
            raise ModelError(f"tokens must be ints, got {ids.dtype}")
        vocab = self.model.spec.n_vocab
        bad = (ids < 0) | (ids >= vocab)
        if bad.any():
            raise ModelError(f"token id {int(ids[bad][0])} out of range [0, {vocab})")
        if self.pos + ids.size > self.capacity:
            raise ModelError(
                f"{ids.size} tokens at position {self.pos} exceed the session's capacity "
                f"of {self.capacity}"
            )
        return np.ascontiguousarray(ids, dtype=np.int32)

    def _ensure_capacity(self, n: int) -> None:
        have = self._kv.shape[2]
        if n <= have:
            return
        new = max(n, min(self.capacity, max(KV_GROWTH, 2 * have)))
        extra = (new - have) * self.model.kv_bytes_per_position()
        self.model._reserve_kv(extra)
        try:
            kv = self.model._new_kv(new)
        except MemoryError:
            self.model._free_kv(extra)
            raise KVMemoryExhausted(f"cannot allocate a KV cache of {new} positions") from None
        self.model._copy_kv(kv, self._kv, self.pos)
        self._kv = kv
        self._kv_reserved += extra

    def extend(
        self, tokens: Sequence[int] | np.ndarray, *, logits: LogitsMode = "last"
    ) -> np.ndarray | None:
        """Append tokens (one forward step) and return their logits as asked."""
        return self.model.step([(self, tokens, logits)])[0]

    def rewind(self, pos: int) -> None:
        """Forget every position from ``pos`` on (the cache rows are reused)."""
        if self._closed:
            raise ModelError("session is closed")
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= self.pos:
            raise ModelError(f"rewind position must be an int in [0, {self.pos}], got {pos!r}")
        del self._tokens[pos:]

    truncate = rewind

    def fork(self) -> Session:
        """A new session with a copy of this one's tokens and cache."""
        if self._closed:
            raise ModelError("session is closed")
        child = Session(self.model, self.capacity)
        child._adapter = self._adapter
        if self.pos:
            child._ensure_capacity(self.pos)
            self.model._copy_kv(child._kv, self._kv, self.pos)
            child._tokens = list(self._tokens)
        return child

    def close(self) -> None:
        """Free the KV cache (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.model._free_kv(self._kv_reserved)
        self._kv_reserved = 0
        self._kv = self.model._new_kv(0)
        self._tokens = []

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Session pos={self.pos} capacity={self.capacity} closed={self._closed}>"


def load_model(
    path: str | os.PathLike[str],
    *,
    max_resident_bytes: int | PagingBudget | None = None,
    max_kv_bytes: int | None = None,
    kv_dtype: Any = np.float16,
    device: str = "cpu",
    max_device_bytes: int | None = None,
    pack: bool | None = None,
) -> Model:
    """Open a GGUF model (memory-mapped) for inference.

    Args:
        max_resident_bytes: page the transformer blocks under this byte budget
            (``LayerPager``, docs/models.md "Layer paging"); a ``PagingBudget`` shares one
            budget between several models. None keeps every block mapped and lets the OS
            page.
        max_kv_bytes: cap on the KV cache memory of all sessions of this model.
        kv_dtype: float16 (default) or float32 KV caches.
        device: "cpu" (default), or "cuda" / "cuda:N": weights uploaded once to that GPU and
            shared by every session, KV caches in device memory (docs/kernels.md, "CUDA").
            Raises ``CudaUnavailable`` naming why when it cannot be used (no CUDA build, a
            driver error, no such device).
        max_device_bytes: with a CUDA device, keep at most this many bytes of transformer
            blocks on the GPU, the rest in host memory (docs/kernels.md, "CUDA").
        pack: copy resident Q8_0 / Q4_0 matrices once into interleaved panels, which batched
            steps multiply without repacking (docs/kernels.md, "Interleaved weight panels").
            None (default): where the CPU's ISA level has a kernel for them (AVX-512 VNNI).
            The copy is private memory: False keeps the file's pages, which processes mapping
            the same file share, and which paging (``max_resident_bytes``) always keeps.
    """
    if np.dtype(kv_dtype) not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise ModelError(f"kv_dtype must be float16 or float32, got {kv_dtype!r}")
    return Model(
        open_model_file(path),
        kv_dtype=np.dtype(kv_dtype).type,
        max_kv_bytes=max_kv_bytes,
        max_resident_bytes=max_resident_bytes,
        device=device,
        max_device_bytes=max_device_bytes,
        pack=pack,
    )


def _check_device(device: Any, max_device_bytes: Any) -> str:
    """The canonical device name ("cpu" or "cuda:N"); checks max_device_bytes goes with it."""
    from ..kernels import parse_device

    try:
        index = parse_device(device)
    except ValueError as e:
        raise ModelError(str(e)) from None
    if max_device_bytes is not None:
        if index is None:
            raise ModelError("max_device_bytes needs a CUDA device (device='cuda')")
        if not isinstance(max_device_bytes, int) or isinstance(max_device_bytes, bool):
            raise ModelError(f"max_device_bytes must be a positive int, got {max_device_bytes!r}")
        if max_device_bytes <= 0:
            raise ModelError(f"max_device_bytes must be a positive int, got {max_device_bytes!r}")
    return "cpu" if index is None else f"cuda:{index}"
