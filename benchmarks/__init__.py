"""Realm's benchmark suites: run one with ``python -m benchmarks.<suite> [--quick] [--json]``.

Benchmarks are not tests. Each suite measures the machine's limits (read bandwidth, numpy's
BLAS) in the same run as its cases and reports every figure next to its limit and the ratio,
as a table or, with ``--json``, one JSON object per line. Shared helpers live in
``benchmarks._common``; recorded figures go to ``docs/benchmarks.md`` with date and machine.

Suites: ``kernels`` (the native kernels, one at a time), ``models`` (prefill, decode and
batched decode of a TinyLlama-shaped model against the bandwidth bound and llama.cpp),
``sandbox`` (guest calls, host imports and the default guest's sampling cost), ``batching``
(aggregate decode tokens/s of 1-8 tenants through one runtime, fairness, runtime overhead),
``server`` (the WebSocket path against the embedded runtime), ``http`` (the OpenAI-compatible
HTTP front end against the WebSocket path and llama-cpp-python's server), ``balancer`` (nginx's
added latency in front of several servers), ``paging`` (the layer pager under a budget),
``containment`` (a bystander tenant's latency under attacks), ``real_models`` (the published
GGUF files against llama.cpp), ``lora`` (per-tenant adapters in the shared batch),
``speculative`` (prompt lookup and draft models) and ``cuda`` (the GPU backend; needs a GPU).
"""
