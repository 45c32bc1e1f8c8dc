"""A Trio app embedding Realm: several tenants stream generations concurrently.

    python examples/trio_app.py [--model PATH]

Without --model it uses the built-in model that ships with Realm. Each tenant's calls run its
guest in the sandbox; their forward steps are batched into shared native steps by the
runtime's scheduler.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import trio

import realm


async def tenant_session(rt: realm.actors.Runtime, name: str, prompt: str) -> None:
    pieces: list[str] = []
    async with rt.stream(name, "generate", {"prompt": prompt, "max_tokens": 16, "seed": 1}) as ev:
        async for event in ev:
            if event.kind == "token":
                pieces.append(event.data["token"])
            else:
                usage = event.data["usage"]
                print(f"{name}: {''.join(pieces)!r} ({usage['completion_tokens']} tokens)")


async def main(model: Path) -> None:
    async with realm.open_runtime(models={"default": model}) as rt:
        async with trio.open_nursery() as nursery:
            for i, prompt in enumerate(["The module", "A string is", "In the beginning"]):
                nursery.start_soon(tenant_session, rt, f"tenant-{i}", prompt)
        count = await rt.call("tenant-0", "count_tokens", {"text": "How many tokens is this?"})
        print("count_tokens:", count["count"])
        stats = rt.statistics().batcher
        print(f"batched steps: {stats.steps}, mean batch size {stats.mean_batch_size:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    trio.run(main, args.model or realm.default_model_path())
