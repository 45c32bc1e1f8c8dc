"""Realm's benchmark suites: run one with ``python -m benchmarks.<suite> [--quick] [--json]``.

Benchmarks are not tests. Each suite measures the machine's limits (read bandwidth, numpy's
BLAS) in the same run as its cases and reports every figure next to its limit and the ratio,
as a table or, with ``--json``, one JSON object per line. Shared helpers live in
``benchmarks._common``; recorded figures go to ``docs/benchmarks.md`` with date and machine.

Suites: ``kernels`` (the native kernels, one at a time), ``models`` (prefill, decode and
batched decode of a TinyLlama-shaped model against the bandwidth bound and llama.cpp),
``sandbox`` (guest calls, host imports and the default guest's sampling cost), ``batching``
(aggregate decode tokens/s of 1-8 tenants through one runtime, fairness, runtime overhead).
"""
