// Starts a real `realm serve` (the built-in model, two tenants with the demo keys of
// examples/realm.toml) and reads its URL from its log line.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const ACME_KEY = "demo-acme-key";
export const BETA_KEY = "demo-beta-key";

function python() {
  if (process.env.REALM_PYTHON) return process.env.REALM_PYTHON;
  const venv = join(ROOT, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

const CONFIG = `
[server]
host = "127.0.0.1"
port = 0
max_tokens = 512

[models]
tiny = "builtin"

[tenants.acme]
api_keys = ["sha256:a2fb8545fcd457204e9fee11be92013aa3240b1b146fe262ba608fdfc159041c"]
max_concurrent_calls = 16
max_queued_calls = 256

[tenants.beta]
api_keys = ["sha256:ad8e0319ce0a9c330d2ebd1506b6162f783724d283a193fc7f98dc884709a00c"]
calls_per_second = 0.2
`;

/** Start `realm serve`; resolves to {url, port, stop()}. `port` 0: any free port. */
export async function startServer(port = 0) {
  const dir = mkdtempSync(join(tmpdir(), "realm-js-"));
  const config = join(dir, "realm.toml");
  writeFileSync(config, CONFIG);
  const proc = spawn(
    python(),
    ["-m", "realm.cli", "serve", "--config", config, "--port", String(port)],
    { cwd: ROOT, env: { ...process.env, PYTHONUNBUFFERED: "1" }, stdio: ["ignore", "ignore", "pipe"] },
  );
  let log = "";
  const url = await new Promise((resolveUrl, reject) => {
    const timer = setTimeout(() => reject(new Error(`realm serve did not start:\n${log}`)), 30000);
    proc.stderr.setEncoding("utf8");
    proc.stderr.on("data", (chunk) => {
      log += chunk;
      const m = /serving \S+ on (ws:\/\/127\.0\.0\.1:(\d+))/.exec(log);
      if (m) {
        clearTimeout(timer);
        resolveUrl(m[1]);
      }
    });
    proc.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`realm serve exited (${code}):\n${log}`));
    });
  });
  const exited = new Promise((r) => proc.on("exit", r));
  return {
    url,
    port: Number(new URL(url).port),
    log: () => log,
    async stop(signal = "SIGTERM") {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      const timer = setTimeout(() => proc.kill("SIGKILL"), 10000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/** The WebSocket implementation of this Node: its global one (Node >= 22), else `ws`. */
export async function webSocket() {
  if (typeof globalThis.WebSocket === "function") return globalThis.WebSocket;
  return (await import("ws")).WebSocket;
}
