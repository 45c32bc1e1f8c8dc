import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
  Cancelled,
  ConnectionLost,
  InvalidParams,
  KeyRefused,
  RateLimited,
  RemoteError,
  Unauthorized,
  UnknownFunction,
  connect,
  errorFromWire,
} from "../dist/index.js";
import { ACME_KEY, BETA_KEY, startServer, webSocket } from "./server.mjs";

const PROMPT = { prompt: "Once upon a time", max_tokens: 8, temperature: 0 };
let server;
let WebSocket;

before(async () => {
  WebSocket = await webSocket();
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

const open = (options = {}) =>
  connect(server.url, { apiKey: ACME_KEY, WebSocket, retries: 2, ...options });

test("metadata, models and a call", async () => {
  const c = await open();
  try {
    const meta = await c.metadata();
    assert.equal(meta.tenant, "acme");
    assert.equal(meta.protocol, 1);
    assert.ok(meta.functions.some((f) => f.name === "generate"));
    const models = await c.models();
    assert.deepEqual(models.map((m) => m.name), ["tiny"]);
    const r = await c.call("generate", PROMPT);
    assert.equal(typeof r.text, "string");
    assert.ok(r.usage.completion_tokens >= 1 && r.usage.completion_tokens <= 8);
    assert.ok(["length", "stop"].includes(r.finish_reason), r.finish_reason);
    const r2 = await c.call("generate", PROMPT, { model: "tiny" });
    assert.equal(r2.text, r.text); // greedy: the same text
  } finally {
    c.close();
  }
});

test("with no WebSocket given: the global one, else the `ws` package", async () => {
  const c = await connect(server.url, { apiKey: ACME_KEY, retries: 0 });
  try {
    assert.equal((await c.health()).status, "ok");
  } finally {
    c.close();
  }
});

test("a default model goes to the functions that take one, an unknown one is refused", async () => {
  const sent = [];
  const c = await open({ model: "tiny", onMessage: (dir, text) => dir === "out" && sent.push(JSON.parse(text)) });
  try {
    await c.call("count_tokens", { text: "hello" });
    await c.health(); // a system function: no model param
    const calls = sent.filter((m) => m.type === "call");
    assert.equal(calls.find((m) => m.function === "count_tokens").params.model, "tiny");
    assert.equal(calls.find((m) => m.function === "system_health").params.model, undefined);
    await assert.rejects(c.call("generate", PROMPT, { model: "no-such-model" }), RemoteError);
  } finally {
    c.close();
  }
});

test("stream: token events, then the result, whose text is the tokens", async () => {
  const c = await open();
  try {
    const events = [];
    for await (const ev of c.stream("generate", { ...PROMPT, max_tokens: 12 })) events.push(ev);
    const tokens = events.filter((e) => e.kind === "token");
    const last = events.at(-1);
    assert.equal(last.kind, "result");
    assert.ok(tokens.length >= 1 && tokens.length <= 12);
    assert.deepEqual(tokens.map((t) => t.data.index), [...Array(tokens.length).keys()]);
    assert.equal(tokens.map((t) => t.data.token).join(""), last.data.text);
    assert.ok(last.data.timings.time_to_first_token_ms >= 0);
  } finally {
    c.close();
  }
});

test("an AbortSignal cancels the call on the server", async () => {
  const seen = [];
  const c = await open({ onMessage: (dir, text) => seen.push([dir, JSON.parse(text)]) });
  try {
    const controller = new AbortController();
    const stream = c.stream("generate", { prompt: "The", max_tokens: 400 }, { signal: controller.signal });
    let tokens = 0;
    await assert.rejects(
      (async () => {
        for await (const ev of stream) {
          if (ev.kind === "token" && ++tokens === 3) controller.abort();
        }
      })(),
      (e) => e instanceof Cancelled && e.code === "CANCELLED",
    );
    assert.equal(tokens, 3);
    // the server got the cancel and answered CANCELLED (dropped by the client)
    const deadline = Date.now() + 5000;
    const answered = () =>
      seen.some(([dir, m]) => dir === "in" && m.id === stream.id && m.type === "error" && m.error.code === "CANCELLED");
    while (!answered() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.equal(seen.filter(([dir, m]) => dir === "out" && m.type === "cancel" && m.id === stream.id).length, 1);
    assert.ok(answered(), "the server answered the cancel with CANCELLED");
    // a call aborted before it starts never reaches the server
    await assert.rejects(c.call("generate", PROMPT, { signal: AbortSignal.abort() }), Cancelled);
    // the connection still serves calls
    assert.equal((await c.call("count_tokens", { text: "hello" })).count > 0, true);
  } finally {
    c.close();
  }
});

test("stream.cancel() ends the stream with Cancelled from the server", async () => {
  const c = await open();
  try {
    const stream = c.stream("generate", { prompt: "The", max_tokens: 400 });
    await assert.rejects(
      (async () => {
        for await (const ev of stream) if (ev.kind === "token" && ev.data.index === 1) stream.cancel();
      })(),
      (e) => e instanceof Cancelled && /cancel/.test(e.message),
    );
  } finally {
    c.close();
  }
});

test("errors map to their classes", async () => {
  const c = await open();
  try {
    await assert.rejects(c.call("nope"), (e) => e instanceof UnknownFunction && e.code === "UNKNOWN_FUNCTION");
    await assert.rejects(
      c.call("generate", { prompt: "x", max_tokens: "10" }),
      (e) => e instanceof InvalidParams && /max_tokens/.test(e.message) && e instanceof RemoteError,
    );
  } finally {
    c.close();
  }
  const limited = await open({ apiKey: BETA_KEY });
  try {
    // beta may start 0.2 calls/s: the second call in a row is over its rate
    const outcomes = await Promise.allSettled([1, 2, 3].map(() => limited.call("count_tokens", { text: "a" })));
    const refused = outcomes.filter((o) => o.status === "rejected").map((o) => o.reason);
    assert.ok(refused.length >= 1, JSON.stringify(outcomes));
    for (const e of refused) {
      assert.ok(e instanceof RateLimited, String(e));
      assert.equal(e.code, "RATE_LIMITED");
      assert.ok(typeof e.retryAfter === "number" && e.retryAfter > 0, String(e.retryAfter));
    }
  } finally {
    limited.close();
  }
  const e = errorFromWire({ code: "RATE_LIMITED", message: "m", retry_after: 0.5 }, 7);
  assert.ok(e instanceof RateLimited && e.retryAfter === 0.5 && e.callId === 7);
});

test("a wrong API key: KeyRefused (an Unauthorized) with close code 1008", async () => {
  const c = await open({ apiKey: "not-a-key" });
  try {
    await assert.rejects(c.call("system_health"), (e) => {
      assert.ok(e instanceof KeyRefused && e instanceof Unauthorized, String(e));
      assert.equal(e.closeCode, 1008);
      assert.match(e.reason, /^UNAUTHORIZED:/);
      return true;
    });
  } finally {
    c.close();
  }
});

test("50 concurrent calls on one socket", async () => {
  let opened = 0;
  class Counting extends WebSocket {
    constructor(...args) {
      super(...args);
      opened++;
    }
  }
  const c = await open({ WebSocket: Counting });
  try {
    const results = await Promise.all(
      Array.from({ length: 50 }, (_, i) =>
        i % 2 ? c.call("generate", { prompt: "Once", max_tokens: 4, seed: i }) : c.call("count_tokens", { text: `n ${i}` }),
      ),
    );
    assert.equal(results.length, 50);
    results.forEach((r, i) => assert.ok(i % 2 ? r.usage.completion_tokens <= 4 : r.count > 0));
    assert.equal(opened, 1);
  } finally {
    c.close();
  }
});

test("calls in flight fail with ConnectionLost on a restart; the next call reconnects", async () => {
  const own = await startServer();
  let next;
  try {
    const c = await connect(own.url, { apiKey: ACME_KEY, WebSocket, retries: 8, backoffMs: 100 });
    try {
      assert.equal((await c.health()).status, "ok");
      // a call in flight when the server dies fails with ConnectionLost (never sent again)
      const long = c.stream("generate", { prompt: "The", max_tokens: 500, temperature: 0.8 });
      await assert.rejects(
        (async () => {
          for await (const ev of long) if (ev.kind === "token" && ev.data.index === 0) await own.stop("SIGKILL");
        })(),
        (e) =>
          e instanceof ConnectionLost &&
          !(e instanceof KeyRefused) &&
          e.retryable === true &&
          /may be retried/.test(e.message),
      );
      const dead = c.call("system_health"); // while no server listens: retried, then ...
      next = await startServer(own.port); // ... the server is back within the backoff
      assert.equal((await dead).status, "ok");
      assert.equal((await c.health()).status, "ok");
    } finally {
      c.close();
    }
  } finally {
    await own.stop();
    await next?.stop();
  }
});

test("retryable: what may be sent again, and what may not", () => {
  const wire = (code, message = "m") => errorFromWire({ code, message }, 1);
  assert.equal(wire("OVERLOADED").retryable, true);
  assert.equal(wire("RATE_LIMITED").retryable, true);
  assert.equal(wire("CANCELLED", "the server is shutting down").retryable, true);
  assert.equal(wire("CANCELLED", "cancelled by the client").retryable, false);
  for (const code of ["INVALID_PARAMS", "UNKNOWN_FUNCTION", "GUEST_TRAP", "TIMEOUT", "INTERNAL"]) {
    assert.equal(wire(code).retryable, false, code);
  }
  assert.equal(new ConnectionLost("gone").retryable, true);
  assert.equal(new KeyRefused("no", { closeCode: 1008 }).retryable, false);
});

test("tenant: a routing key in the URL (the server ignores it); a bad one is refused", async () => {
  const urls = [];
  class Recording extends WebSocket {
    constructor(url, ...rest) {
      super(url, ...rest);
      urls.push(String(url));
    }
  }
  const c = await open({ WebSocket: Recording, tenant: "acme" });
  try {
    const health = await c.health();
    assert.equal(health.status, "ok");
    assert.equal(typeof health.server, "string");
    assert.equal(new URL(urls[0]).searchParams.get("realm_tenant"), "acme");
    assert.equal(new URL(urls[0]).searchParams.get("api_key"), null); // the key stays out
  } finally {
    c.close();
  }
  await assert.rejects(connect(server.url, { tenant: "no spaces" }), TypeError);
});
