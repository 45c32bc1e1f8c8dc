"""Realm as a server and its Python client, in one script.

    python examples/server_client.py [--model PATH] [--prompt TEXT]

Starts a WebSocket server on a free local port (the built-in model unless --model), then
connects to it with ``realm.client``: lists the tenant's functions, streams a generation, runs
two calls at once on the same connection, and shows a typed error. The same calls from a shell:
``realm serve`` in one terminal, ``realm call ws://127.0.0.1:8080 generate '{"prompt": "..."}'``
in another.
"""

from __future__ import annotations

import argparse
import sys

import trio

import realm
import realm.client
from realm.server import ServerConfig, open_server


async def main(model: str, prompt: str) -> None:
    config = ServerConfig(models={"default": model}, port=0)  # port 0: any free port
    async with open_server(config) as server, realm.client.connect(server.url) as client:
        print(f"server on {server.url}")
        meta = await client.metadata()
        print("functions:", ", ".join(f["name"] for f in meta["functions"]))

        params = {"prompt": prompt, "max_tokens": 40, "temperature": 0.7, "seed": 7}
        async with client.stream("generate", params) as events:
            async for ev in events:
                if ev.kind == "token":
                    sys.stdout.write(ev.data["token"])
                    sys.stdout.flush()
                else:
                    usage, timings = ev.data["usage"], ev.data["timings"]
                    print(
                        f"\n[{ev.data['finish_reason']}: {usage['completion_tokens']} tokens, "
                        f"first after {timings['time_to_first_token_ms']:.0f} ms]"
                    )

        # two calls multiplexed on one connection; their forward steps share batched steps
        results: dict[str, str] = {}

        async def one(p: str) -> None:
            r = await client.call("generate", {"prompt": p, "max_tokens": 16, "temperature": 0})
            results[p] = r["text"]

        async with trio.open_nursery() as nursery:
            for p in ("The function", "A module"):
                nursery.start_soon(one, p)
        for p, text in results.items():
            print(f"{p!r} -> {text!r}")

        try:
            await client.call("generate", {"prompt": prompt, "max_tokens": "ten"})
        except realm.InvalidParams as e:  # the remote error is also realm's own class
            print(f"typed error: {e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the built-in model)")
    parser.add_argument("--prompt", default="The Python interpreter")
    args = parser.parse_args()
    trio.run(main, args.model or str(realm.model.default_model_path()), args.prompt)
