// The playground page in a real browser: Debian's chromium, headless, driven over the DevTools
// protocol. Loads the page (from `realm serve` when it serves GET /, else from a static server
// here: both loopback origins the server allows), connects with a tenant key, streams a
// generation, cancels one, and checks the DOM; a screenshot goes to test-output/.
// Skipped, saying why, where no chromium is installed.
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";

import { ACME_KEY, startServer, webSocket } from "./server.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const STATIC = resolve(HERE, "../../../realm/server/static");
const OUTPUT = resolve(HERE, "../test-output");
const LIMIT = 20000;

function findChromium() {
  for (const name of [process.env.CHROMIUM, "chromium", "chromium-browser", "google-chrome"]) {
    if (name && spawnSync(name, ["--version"], { stdio: "ignore" }).status === 0) return name;
  }
  return null;
}
const chromium = findChromium();
const skip = chromium ? false : "no chromium installed (apt-get install chromium): the playground is not tested in a browser";

let server, page, statics, profile, exited;

async function pageUrl() {
  const http = server.url.replace(/^ws/, "http");
  try {
    const res = await fetch(http + "/");
    if (res.ok && (await res.text()).includes("Realm playground")) return http + "/";
  } catch {
    /* not served there: serve it here */
  }
  statics = createServer((req, res) => {
    const name = req.url === "/" ? "index.html" : req.url.slice(1);
    if (!["index.html", "realm-client.js"].includes(name)) return res.writeHead(404).end();
    res.writeHead(200, { "content-type": name.endsWith(".js") ? "text/javascript" : "text/html" });
    res.end(readFileSync(join(STATIC, name)));
  });
  await new Promise((r) => statics.listen(0, "127.0.0.1", r));
  return `http://127.0.0.1:${statics.address().port}/`;
}

/** A DevTools protocol session on one page target. */
async function openBrowser(url) {
  profile = mkdtempSync(join(tmpdir(), "realm-chromium-"));
  const proc = spawn(chromium, [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
    "--remote-debugging-port=0", `--user-data-dir=${profile}`, "--window-size=1100,900", "about:blank",
  ], { stdio: ["ignore", "ignore", "pipe"] });
  exited = new Promise((r) => proc.on("exit", r));
  let log = "";
  const endpoint = await new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`chromium did not start:\n${log}`)), LIMIT);
    proc.stderr.setEncoding("utf8");
    proc.stderr.on("data", (d) => {
      log += d;
      const m = /DevTools listening on (ws:\/\/\S+)/.exec(log);
      if (m) { clearTimeout(timer); res(m[1]); }
    });
    proc.on("exit", (code) => { clearTimeout(timer); rej(new Error(`chromium exited (${code}):\n${log}`)); });
  });
  const WS = await webSocket();
  const ws = new WS(endpoint);
  await new Promise((res, rej) => { ws.addEventListener("open", res); ws.addEventListener("error", rej); });
  let next = 1;
  const waiting = new Map();
  ws.addEventListener("message", (ev) => {
    const msg = JSON.parse(String(ev.data));
    const w = waiting.get(msg.id);
    if (!w) return;
    waiting.delete(msg.id);
    msg.error ? w.rej(new Error(JSON.stringify(msg.error))) : w.res(msg.result);
  });
  const send = (method, params = {}, sessionId) => new Promise((res, rej) => {
    const id = next++;
    waiting.set(id, { res, rej });
    ws.send(JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) }));
  });
  const { targetId } = await send("Target.createTarget", { url });
  const { sessionId } = await send("Target.attachToTarget", { targetId, flatten: true });
  const session = {
    proc,
    async eval(expression) {
      const r = await send("Runtime.evaluate", { expression, awaitPromise: true, returnByValue: true }, sessionId);
      if (r.exceptionDetails) throw new Error(`in the page: ${JSON.stringify(r.exceptionDetails).slice(0, 500)}`);
      return r.result.value;
    },
    async until(expression, what) {
      const deadline = Date.now() + LIMIT;
      while (Date.now() < deadline) {
        if (await session.eval(expression).catch(() => false)) return;
        await new Promise((r) => setTimeout(r, 15));
      }
      const state = await session.eval(`document.getElementById("status")?.textContent`).catch(() => "?");
      throw new Error(`timed out waiting for ${what} (status: ${state})`);
    },
    async screenshot(path) {
      const { data } = await send("Page.captureScreenshot", { format: "png" }, sessionId);
      writeFileSync(path, Buffer.from(data, "base64"));
    },
    close() { ws.close(); proc.kill("SIGTERM"); },
  };
  return session;
}

before(async () => {
  if (skip) return;
  server = await startServer();
  page = await openBrowser(await pageUrl());
});
after(async () => {
  page?.close();
  if (exited) {
    const timer = setTimeout(() => page?.proc.kill("SIGKILL"), 5000);
    await exited;
    clearTimeout(timer);
  }
  try {
    if (profile) rmSync(profile, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 });
  } catch {
    /* chromium may still be writing its profile: a temporary directory, left behind */
  }
  statics?.close();
  await server?.stop();
});

const $ = (id) => `document.getElementById(${JSON.stringify(id)})`;

test("the playground connects, streams a generation and cancels one", { skip }, async () => {
  await page.until(`${$("connect")} !== null && document.readyState === "complete"`, "the page");
  await page.eval(`${$("url")}.value = ${JSON.stringify(server.url)}; ${$("key")}.value = ${JSON.stringify(ACME_KEY)}; ${$("connect")}.click()`);
  await page.until(`!${$("send")}.disabled`, "the connection");
  assert.match(await page.eval(`${$("status")}.textContent`), /connected: tenant acme/);
  assert.equal(await page.eval(`${$("model")}.value`), "tiny");

  // a whole generation: tokens stream into the output, then the stats line
  await page.eval(`${$("prompt")}.value = "Once upon a time"; ${$("max_tokens")}.value = "24"; ${$("temperature")}.value = "0"; ${$("send")}.click()`);
  await page.until(`${$("status")}.textContent === "done"`, "the result");
  const output = await page.eval(`${$("output")}.textContent`);
  assert.ok(output.startsWith("Once upon a time") && output.length > "Once upon a time".length, output);
  assert.match(await page.eval(`${$("stats")}.textContent`), /time to first token [\d.]+ ms · [\d.]+ tokens\/s/);

  // cancel: after the first token, Cancel; the page says so and the send button is back
  await page.eval(`${$("prompt")}.value = "The"; ${$("max_tokens")}.value = "400"; ${$("temperature")}.value = "0.8"; ${$("send")}.click()`);
  await page.until(`${$("output")}.textContent.length > 3 && !${$("cancel")}.disabled`, "the first token");
  await page.eval(`${$("cancel")}.click()`);
  await page.until(`${$("status")}.textContent === "cancelled"`, "the cancel");
  assert.match(await page.eval(`${$("output")}.textContent`), /\[cancelled\]$/);
  assert.equal(await page.eval(`${$("send")}.disabled`), false);

  // the raw protocol messages: the cancel went out
  const log = await page.eval(`${$("log")}.textContent`);
  assert.match(log, /→ \{"type":"cancel"/);
  assert.match(log, /← \{"type":"stream"/);
  await page.eval(`document.getElementById("raw").open = true`);
  mkdirSync(OUTPUT, { recursive: true });
  await page.screenshot(join(OUTPUT, "playground.png"));
});
