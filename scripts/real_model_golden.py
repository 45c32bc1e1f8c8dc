"""Record llama.cpp's answers on the real models, for tests/model/test_real_models.py.

    python scripts/real_model_golden.py            # needs the [bench] and [real] extras

For each real model (``realm.testing.real_models``) this writes
``tests/model/data/real-<name>.npz`` holding what llama.cpp (llama-cpp-python) gives on the
suite's cases (``realm.testing.real_model_cases``):

* ``tok_<i>``: the ids of TOKENIZE_STRINGS[i] (no BOS/EOS, special tokens not parsed) and
  ``tokspecial_<i>`` with add_special and parse_special both on;
* ``greedy_<i>``: GREEDY_TOKENS argmax continuations of GREEDY_PROMPTS[i] (prompt with BOS),
  and ``greedy_ref_<i>``: the argmax of the float64 forward pass (tests/model/model_reference.py)
  at each of those steps, fed llama.cpp's continuation (absent where the reference does not
  implement the architecture): where llama.cpp and Realm disagree, it says who is right;
  ``greedy_reftop_<i>`` / ``greedy_reftoplogits_<i>``: the float64 pass's best N_REF_TOP ids and
  their logits at each step, so a test can tell a near-tie in exact arithmetic from an error;
* ``logits_ids``: the 64-token logits prompt; ``logits_cols``: the vocabulary ids kept (the
  top 32 of every position and 448 fixed random ids); ``logits``: llama.cpp's logits at
  those columns for every position (float32); ``llama_cpp_version``;
* ``ref_logits`` and ``ref_argmax``: the float64 forward pass's logits at the same columns
  (float32) and its argmax over the whole vocabulary, for every position (where the reference
  implements the architecture): the exact answer both implementations are measured against.

Tests compare Realm against these without needing llama.cpp at test time; regenerate them when
the cases or the llama.cpp version change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from realm.testing import real_model_cases as cases
from realm.testing.real_models import REAL_MODELS, real_model_path

OUT = Path(__file__).resolve().parent.parent / "tests" / "model" / "data"
N_RANDOM_COLS = 448
N_TOP = 32
N_REF_TOP = 5  # float64 candidates recorded per greedy step


def _reference_logits(path: Path, ids: list[int]) -> np.ndarray | None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "model"))
    try:
        from model_reference import reference_logits

        return reference_logits(path, ids)
    except Exception as e:  # an architecture the reference does not implement
        print(f"{path.name}: no float64 reference ({type(e).__name__}: {e})", file=sys.stderr)
        return None
    finally:
        sys.path.pop(0)


def record(name: str) -> Path:
    import llama_cpp

    path = real_model_path(name)
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False
    )
    out: dict[str, np.ndarray] = {}
    for i, s in enumerate(cases.TOKENIZE_STRINGS):
        out[f"tok_{i}"] = np.array(llm.tokenize(s.encode(), add_bos=False, special=False), np.int32)
        out[f"tokspecial_{i}"] = np.array(
            llm.tokenize(s.encode(), add_bos=True, special=True), np.int32
        )
    for i, prompt in enumerate(cases.GREEDY_PROMPTS):
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)
        got: list[int] = []
        for _ in range(cases.GREEDY_TOKENS):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            got.append(nxt)
            llm.eval([nxt])
        out[f"greedy_{i}"] = np.array(got, np.int32)
        ref = _reference_logits(path, ids + got)
        if ref is not None:
            steps = ref[len(ids) - 1 : -1]
            out[f"greedy_ref_{i}"] = steps.argmax(-1).astype(np.int32)
            top = np.argsort(-steps, axis=-1)[:, :N_REF_TOP]
            out[f"greedy_reftop_{i}"] = top.astype(np.int32)
            out[f"greedy_reftoplogits_{i}"] = np.take_along_axis(steps, top, -1).astype(np.float32)
    ids = llm.tokenize(cases.LOGITS_TEXT.encode(), add_bos=True, special=False)
    if len(ids) < cases.LOGITS_TOKENS:
        raise SystemExit(f"{name}: the logits text gives only {len(ids)} tokens")
    ids = ids[: cases.LOGITS_TOKENS]
    llm.reset()
    llm.eval(ids)
    full = np.array(llm.scores[: len(ids)], dtype=np.float32)
    rng = np.random.default_rng(20261205)
    top = np.argsort(-full, axis=1)[:, :N_TOP].reshape(-1)
    cols = np.union1d(top, rng.choice(full.shape[1], N_RANDOM_COLS, replace=False))
    out["logits_ids"] = np.array(ids, np.int32)
    out["logits_cols"] = cols.astype(np.int32)
    out["logits"] = full[:, cols]
    ref = _reference_logits(path, ids)
    if ref is not None:
        out["ref_logits"] = ref[:, cols].astype(np.float32)
        out["ref_argmax"] = ref.argmax(-1).astype(np.int32)
    out["n_vocab"] = np.array(full.shape[1], np.int64)
    out["llama_cpp_version"] = np.array(llama_cpp.__version__)
    llm.close()
    OUT.mkdir(parents=True, exist_ok=True)
    dest = OUT / f"real-{name}.npz"
    np.savez_compressed(dest, **out)
    return dest


def main(argv: list[str]) -> int:
    for name in argv or list(REAL_MODELS):
        print(record(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
