/**
 * JavaScript/TypeScript client of Realm's WebSocket protocol v1 (docs/protocol.md), mirroring
 * the Python client `realm.client`.
 *
 * One WebSocket carries any number of calls at once, multiplexed by `id`. A connection that has
 * closed (the server's idle timeout, a restart) is opened again, with exponential backoff, when
 * the next call starts; calls in flight when a connection drops fail with `ConnectionLost` (a
 * call is not idempotent, so it is never silently sent twice).
 *
 * Zero runtime dependencies: it uses the global `WebSocket` (browsers, Node >= 22), or the one
 * given in `connect(url, {WebSocket})`, or else imports the `ws` package (Node 20).
 *
 * The API key goes in the `Sec-WebSocket-Protocol` list (`realm.v1, realm.bearer.KEY`): what a
 * browser can send, and never in the URL (proxies and logs keep URLs). A key that is not a
 * valid subprotocol token falls back to `?api_key=`, as does `keyInUrl: true`.
 *
 * Behind a balancer (docs/deploy.md) the key routes the connection, and `tenant` (sent as
 * `?realm_tenant=`, since a browser cannot set headers on a WebSocket) routes every key of a
 * tenant to the same server. An error's `retryable` says whether the call may be sent again.
 */

// --- protocol -------------------------------------------------------------------------------

export const PROTOCOL_VERSION = 1;
/** The WebSocket subprotocol of protocol v1. */
export const SUBPROTOCOL = "realm.v1";
/** `realm.bearer.KEY`: a browser's API key, offered as a subprotocol. */
export const BEARER_SUBPROTOCOL = "realm.bearer.";

/** The error codes of protocol v1: the whole list, nothing else is sent. */
export const ErrorCode = {
  INVALID_REQUEST: "INVALID_REQUEST",
  UNKNOWN_FUNCTION: "UNKNOWN_FUNCTION",
  INVALID_PARAMS: "INVALID_PARAMS",
  UNAUTHORIZED: "UNAUTHORIZED",
  RATE_LIMITED: "RATE_LIMITED",
  OVERLOADED: "OVERLOADED",
  TENANT_UNAVAILABLE: "TENANT_UNAVAILABLE",
  GUEST_TRAP: "GUEST_TRAP",
  CANCELLED: "CANCELLED",
  TIMEOUT: "TIMEOUT",
  INTERNAL: "INTERNAL",
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

/** The message of the errors that end calls because the server is shutting down (retryable). */
export const SHUTDOWN_REASON = "the server is shutting down";
/** What a `ConnectionLost` of a call in flight adds to its message. */
export const RETRY_HINT = "the call may not have finished: it may be retried";

/** The WebSocket close codes a Realm server sends. */
export const CloseCode = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  INVALID_DATA: 1007,
  POLICY: 1008,
  TOO_BIG: 1009,
} as const;

export type CallId = string | number;
export type Params = Record<string, unknown>;
export type ResultData = Record<string, any>;

/** A streamed call's events: `token` events (`data`: `{token, index}`), then one `result`. */
export type StreamEvent =
  | { kind: "token"; data: { token: string; index: number } & Record<string, unknown> }
  | { kind: "result"; data: ResultData };

interface ServerMessage {
  type: "stream" | "result" | "error";
  id: CallId | null;
  data: Record<string, any>;
  error: Record<string, any>;
}

/** A server message, or null for anything that is not one (ignored, as the Python client does). */
export function readServerMessage(text: string): ServerMessage | null {
  let msg: any;
  try {
    msg = JSON.parse(text);
  } catch {
    return null;
  }
  if (msg === null || typeof msg !== "object" || Array.isArray(msg)) return null;
  if (msg.type !== "stream" && msg.type !== "result" && msg.type !== "error") return null;
  const id = msg.id ?? null;
  if (id !== null && typeof id !== "string" && typeof id !== "number") return null;
  const obj = (v: unknown) => (v && typeof v === "object" && !Array.isArray(v) ? v : {});
  return { type: msg.type, id, data: obj(msg.data), error: obj(msg.error) };
}

// --- errors ---------------------------------------------------------------------------------

/** The base of every error this client throws. */
export class RealmError extends Error {
  code: ErrorCode = ErrorCode.INTERNAL;
  override name = "RealmError";
  /** True if the same call may be sent again (the next call opens a new connection, which a
   * balancer gives to a server that is up): the server refused it before it ran, ended it
   * because it is shutting down, or the connection was lost. The client never resends a call
   * by itself (a call is not idempotent). */
  get retryable(): boolean {
    return false;
  }
}

/** The server answered a call with an error; `code` is the protocol's error code. */
export class RemoteError extends RealmError {
  static readonly code: ErrorCode = ErrorCode.INTERNAL;
  override name = "RemoteError";
  readonly callId: CallId | null;
  readonly serverMessage: string;
  constructor(message: string, options: { callId?: CallId | null; cause?: unknown } = {}) {
    const code = (new.target as typeof RemoteError).code;
    super(`${code}: ${message}`, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.name = new.target.name;
    this.callId = options.callId ?? null;
    this.serverMessage = message;
  }
}

export class InvalidRequest extends RemoteError {
  static override readonly code = ErrorCode.INVALID_REQUEST;
}
export class UnknownFunction extends RemoteError {
  static override readonly code = ErrorCode.UNKNOWN_FUNCTION;
}
export class InvalidParams extends RemoteError {
  static override readonly code = ErrorCode.INVALID_PARAMS;
}
/** UNAUTHORIZED: a call's `tenant_id` is not the connection's tenant, or (as `KeyRefused`) the
 * server closed the connection because its API key is missing or unknown. */
export class Unauthorized extends RemoteError {
  static override readonly code = ErrorCode.UNAUTHORIZED;
}
/** RATE_LIMITED: `retryAfter` is the seconds until the tenant's next call is admitted (null if
 * the server did not say). */
export class RateLimited extends RemoteError {
  static override readonly code = ErrorCode.RATE_LIMITED;
  readonly retryAfter: number | null;
  constructor(
    message: string,
    options: { callId?: CallId | null; retryAfter?: number | null; cause?: unknown } = {},
  ) {
    super(message, options);
    this.retryAfter = options.retryAfter ?? null;
  }
  /** After `retryAfter` seconds. */
  override get retryable(): boolean {
    return true;
  }
}
/** OVERLOADED: refused before it ran (retryable). */
export class Overloaded extends RemoteError {
  static override readonly code = ErrorCode.OVERLOADED;
  override get retryable(): boolean {
    return true;
  }
}
export class TenantUnavailable extends RemoteError {
  static override readonly code = ErrorCode.TENANT_UNAVAILABLE;
}
export class GuestTrap extends RemoteError {
  static override readonly code = ErrorCode.GUEST_TRAP;
}
/** CANCELLED: by the server's answer to a cancel, or at once when the call's AbortSignal fires
 * (then `cause` is the signal's reason). */
export class Cancelled extends RemoteError {
  static override readonly code = ErrorCode.CANCELLED;
  /** Ended by the server's shutdown, not by the client. */
  override get retryable(): boolean {
    return this.serverMessage === SHUTDOWN_REASON;
  }
}
export class CallTimeout extends RemoteError {
  static override readonly code = ErrorCode.TIMEOUT;
}
export class ServerError extends RemoteError {
  static override readonly code = ErrorCode.INTERNAL;
}

/** The connection closed while a call was in flight (its outcome is unknown), or it could not
 * be opened. `closeCode` and `reason` are the server's close frame, if any. Retryable: the
 * next call opens a new connection. */
export class ConnectionLost extends RealmError {
  override name = "ConnectionLost";
  readonly closeCode: number | null;
  readonly reason: string;
  constructor(message: string, options: { closeCode?: number | null; reason?: string } = {}) {
    super(message);
    this.closeCode = options.closeCode ?? null;
    this.reason = options.reason ?? "";
  }
  override get retryable(): boolean {
    return true;
  }
}

/** The server closed the connection (1008 UNAUTHORIZED): the API key is missing or unknown.
 * An `Unauthorized`; `closeCode` is 1008 and `reason` the close frame's reason. */
export class KeyRefused extends Unauthorized {
  readonly closeCode: number | null;
  readonly reason: string;
  constructor(message: string, options: { closeCode?: number | null; reason?: string } = {}) {
    super(message);
    this.name = "KeyRefused";
    this.closeCode = options.closeCode ?? null;
    this.reason = options.reason ?? "";
  }
}

/** The error class of each protocol error code (every code has one). */
export const ERROR_CLASSES: Record<ErrorCode, typeof RemoteError> = {
  INVALID_REQUEST: InvalidRequest,
  UNKNOWN_FUNCTION: UnknownFunction,
  INVALID_PARAMS: InvalidParams,
  UNAUTHORIZED: Unauthorized,
  RATE_LIMITED: RateLimited,
  OVERLOADED: Overloaded,
  TENANT_UNAVAILABLE: TenantUnavailable,
  GUEST_TRAP: GuestTrap,
  CANCELLED: Cancelled,
  TIMEOUT: CallTimeout,
  INTERNAL: ServerError,
};

/** The error for an `error` object of a server message (unknown codes: `ServerError`). */
export function errorFromWire(error: unknown, callId: CallId | null = null): RemoteError {
  if (!error || typeof error !== "object") {
    return new ServerError(`malformed error object ${JSON.stringify(error)}`, { callId });
  }
  const e = error as Record<string, unknown>;
  const message = String(e.message ?? "");
  const cls = Object.prototype.hasOwnProperty.call(ERROR_CLASSES, String(e.code))
    ? ERROR_CLASSES[e.code as ErrorCode]
    : ServerError;
  if (cls === RateLimited) {
    const wait = e.retry_after;
    const ok = typeof wait === "number" && Number.isFinite(wait) && wait >= 0;
    return new RateLimited(message, { callId, retryAfter: ok ? wait : null });
  }
  return new cls(message, { callId });
}

// --- WebSocket ------------------------------------------------------------------------------

/** The part of the WHATWG WebSocket this client uses (browsers, Node >= 22, the `ws` package). */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (event: any) => void): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

const OPEN = 1;

async function findWebSocket(given?: WebSocketConstructor): Promise<WebSocketConstructor> {
  if (given) return given;
  const global = (globalThis as any).WebSocket;
  if (typeof global === "function") return global as WebSocketConstructor;
  const name = "ws"; // a variable: bundlers leave the optional peer dependency alone
  try {
    const mod: any = await import(/* @vite-ignore */ name);
    return (mod.WebSocket ?? mod.default) as WebSocketConstructor;
  } catch {
    throw new ConnectionLost(
      "no WebSocket implementation: use Node >= 22 or a browser, install the `ws` package, " +
        "or pass one as connect(url, {WebSocket})",
    );
  }
}

const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/; // an HTTP token: what a subprotocol may be
const ROUTING_KEY = /^[A-Za-z0-9._-]{1,128}$/; // a `tenant` routing key

// --- client ---------------------------------------------------------------------------------

export interface ConnectOptions {
  /** The tenant's API key (servers with tenants). */
  apiKey?: string;
  /** A WebSocket constructor (e.g. `ws`'s in Node 20); default: the global one, else `ws`. */
  WebSocket?: WebSocketConstructor;
  /** The model of calls whose function takes a `model` param and that name none. */
  model?: string;
  /** Put the key in the URL (`?api_key=`) instead of the subprotocol list. */
  keyInUrl?: boolean;
  /** A routing key for a balancer that hashes on it (`?realm_tenant=`; docs/deploy.md): the
   * same for every key of a tenant keeps them on one server. The server ignores it. */
  tenant?: string;
  /** Milliseconds to wait for a handshake (default 10000). */
  connectTimeoutMs?: number;
  /** Connection attempts after the first one fails (default 5). */
  retries?: number;
  /** The first wait between attempts, doubling, at most 5 s (default 100 ms). */
  backoffMs?: number;
  /** Every protocol message sent (`"out"`) and received (`"in"`), as its JSON text. */
  onMessage?: (direction: "in" | "out", text: string) => void;
}

export interface CallOptions {
  /** Aborting it cancels the call (the call rejects at once with `Cancelled`). */
  signal?: AbortSignal;
  /** This call's model (else the client's default model, if the function takes one). */
  model?: string;
}

interface Pending {
  ws: WebSocketLike;
  queue: ServerMessage[];
  wake: (() => void) | null;
  done: boolean;
  failure: RealmError | null;
}

/** A streamed call: `for await (const ev of stream)`; `id` is its protocol id. */
export class CallStream implements AsyncIterable<StreamEvent> {
  readonly id: string;
  readonly #client: RealmClient;
  readonly #events: AsyncGenerator<StreamEvent>;
  constructor(id: string, events: AsyncGenerator<StreamEvent>, client: RealmClient) {
    this.id = id;
    this.#events = events;
    this.#client = client;
  }
  [Symbol.asyncIterator](): AsyncIterator<StreamEvent> {
    return this.#events;
  }
  /** Ask the server to cancel this call (the iteration then ends with `Cancelled`). */
  cancel(): void {
    this.#client.cancel(this.id);
  }
  /** Read the stream to its end; the result data. `onToken` sees each token. */
  async result(onToken?: (token: string, index: number) => void): Promise<ResultData> {
    for await (const ev of this) {
      if (ev.kind === "result") return ev.data;
      onToken?.(ev.data.token, ev.data.index);
    }
    throw new ConnectionLost("the call ended without a result");
  }
}

/** A connection to a Realm server; open it with `connect`. */
export class RealmClient {
  readonly url: string;
  /** The model of calls that name none (`null`: the server's default). */
  defaultModel: string | null;
  readonly #options: ConnectOptions;
  #WebSocket: WebSocketConstructor | null = null;
  #ws: WebSocketLike | null = null;
  #opening: Promise<WebSocketLike> | null = null;
  #calls = new Map<string, Pending>();
  #nextId = 1;
  #closed = false;
  #takesModel: Promise<Set<string>> | null = null;

  constructor(url: string, options: ConnectOptions = {}) {
    if (options.tenant !== undefined && !ROUTING_KEY.test(options.tenant)) {
      throw new TypeError(
        `tenant: ${JSON.stringify(options.tenant)} is not a routing key (1-128 letters, digits, '._-')`,
      );
    }
    this.url = url;
    this.#options = options;
    this.defaultModel = options.model ?? null;
  }

  // --- connection ---------------------------------------------------------------------------

  /** The open connection, (re)opened with exponential backoff when it has closed. */
  async connection(): Promise<WebSocketLike> {
    if (this.#closed) throw new ConnectionLost("the client is closed");
    if (this.#ws && this.#ws.readyState === OPEN) return this.#ws;
    this.#opening ??= this.#open().finally(() => {
      this.#opening = null;
    });
    return this.#opening;
  }

  async #open(): Promise<WebSocketLike> {
    this.#WebSocket ??= await findWebSocket(this.#options.WebSocket);
    const retries = this.#options.retries ?? 5;
    let delay = this.#options.backoffMs ?? 100;
    let last = "no attempt";
    for (let attempt = 0; attempt <= retries; attempt++) {
      try {
        const ws = await this.#attempt(this.#WebSocket);
        this.#ws = ws;
        return ws;
      } catch (e) {
        last = e instanceof Error ? e.message : String(e);
        if (/\b4\d\d\b/.test(last)) break; // a refused handshake (403, 429): retrying won't help
      }
      if (attempt < retries && !this.#closed) {
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 5000);
      }
    }
    throw new ConnectionLost(`cannot connect to ${this.url}: ${last}`);
  }

  #attempt(WS: WebSocketConstructor): Promise<WebSocketLike> {
    const key = this.#options.apiKey;
    const protocols = [SUBPROTOCOL];
    let url = this.url;
    if (this.#options.tenant !== undefined) {
      const u = new URL(url);
      u.searchParams.set("realm_tenant", this.#options.tenant);
      url = u.toString();
    }
    if (key) {
      if (this.#options.keyInUrl || !TOKEN.test(key)) {
        const u = new URL(url);
        u.searchParams.set("api_key", key);
        url = u.toString();
      } else {
        protocols.push(BEARER_SUBPROTOCOL + key);
      }
    }
    return new Promise((resolve, reject) => {
      let ws: WebSocketLike;
      try {
        ws = new WS(url, protocols);
      } catch (e) {
        reject(e);
        return;
      }
      let opened = false;
      const timer = setTimeout(() => {
        if (!opened) {
          reject(new Error(`no handshake within ${(this.#options.connectTimeoutMs ?? 10000) / 1000} s`));
          try {
            ws.close();
          } catch {
            /* closing anyway */
          }
        }
      }, this.#options.connectTimeoutMs ?? 10000);
      ws.addEventListener("open", () => {
        opened = true;
        clearTimeout(timer);
        resolve(ws);
      });
      ws.addEventListener("error", (ev: any) => {
        if (!opened) {
          clearTimeout(timer);
          reject(new Error(ev?.message || ev?.error?.message || "connection failed"));
        }
      });
      ws.addEventListener("message", (ev: any) => this.#receive(ev.data));
      ws.addEventListener("close", (ev: any) => {
        clearTimeout(timer);
        if (!opened) {
          reject(new Error(`connection closed before the handshake (${ev?.code ?? "?"})`));
          return;
        }
        this.#drop(ws, lostError(ev?.code ?? null, String(ev?.reason ?? "")));
      });
    });
  }

  #receive(data: unknown): void {
    const text =
      typeof data === "string"
        ? data
        : data instanceof ArrayBuffer || ArrayBuffer.isView(data)
          ? new TextDecoder().decode(data as ArrayBuffer)
          : String(data);
    this.#options.onMessage?.("in", text);
    const msg = readServerMessage(text);
    if (!msg || msg.id === null) return;
    const call = this.#calls.get(String(msg.id));
    if (!call) return;
    call.queue.push(msg);
    call.wake?.();
  }

  /** `ws` has closed: the next call opens a new connection; its calls fail with `lost`. */
  #drop(ws: WebSocketLike, lost: RealmError): void {
    if (this.#ws === ws) this.#ws = null;
    for (const call of this.#calls.values()) {
      if (call.ws === ws && !call.failure) {
        call.failure = lost;
        call.wake?.();
      }
    }
  }

  #send(ws: WebSocketLike, message: Record<string, unknown>): void {
    const text = JSON.stringify(message);
    this.#options.onMessage?.("out", text);
    ws.send(text);
  }

  /** Close the connection; calls in flight fail with `ConnectionLost`. */
  close(): void {
    this.#closed = true;
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      this.#drop(ws, new ConnectionLost("the client was closed"));
      try {
        ws.close(CloseCode.NORMAL);
      } catch {
        /* already closing */
      }
    }
  }

  // --- calls --------------------------------------------------------------------------------

  async #withModel(fn: string, params: Params, model: string | undefined): Promise<Params> {
    const name = model ?? this.defaultModel;
    if (!name || "model" in params) return params;
    if (model !== undefined) return { ...params, model };
    // the default model goes only to functions that take one (system functions do not)
    this.#takesModel ??= this.metadata().then(
      (m) =>
        new Set(
          (m.functions ?? [])
            .filter((f: any) => f?.params?.properties && "model" in f.params.properties)
            .map((f: any) => String(f.name)),
        ),
      () => new Set<string>(),
    );
    return (await this.#takesModel).has(fn) ? { ...params, model: name } : params;
  }

  /** Start `fn` and iterate its events: token events, then the result. Breaking out of the
   * loop early cancels the call; so do `stream.cancel()` and the options' `signal`. */
  stream(fn: string, params: Params = {}, options: CallOptions = {}): CallStream {
    const id = `c${this.#nextId++}`;
    return new CallStream(id, this.#events(id, fn, params, options), this);
  }

  async *#events(id: string, fn: string, params: Params, options: CallOptions): AsyncGenerator<StreamEvent> {
    const { signal } = options;
    const aborted = () =>
      new Cancelled("aborted by the client", { callId: id, cause: signal?.reason });
    if (signal?.aborted) throw aborted();
    const sent = fn.startsWith("system_") ? params : await this.#withModel(fn, params, options.model);
    const ws = await this.connection();
    if (signal?.aborted) throw aborted();
    const call: Pending = { ws, queue: [], wake: null, done: false, failure: null };
    this.#calls.set(id, call);
    let abortedHere = false;
    const onAbort = () => {
      abortedHere = true;
      this.cancel(id);
      call.wake?.();
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      this.#send(ws, { type: "call", id, function: fn, params: sent });
      while (true) {
        if (abortedHere) throw aborted();
        const msg = call.queue.shift();
        if (!msg) {
          if (call.failure) throw call.failure; // (a ConnectionLost: retryable)
          await new Promise<void>((r) => (call.wake = r));
          call.wake = null;
          continue;
        }
        if (msg.type === "stream") {
          yield { kind: "token", data: msg.data as { token: string; index: number } };
        } else if (msg.type === "result") {
          call.done = true;
          yield { kind: "result", data: msg.data };
          return;
        } else {
          call.done = true;
          throw errorFromWire(msg.error, id);
        }
      }
    } finally {
      signal?.removeEventListener("abort", onAbort);
      if (!call.done && !call.failure) {
        // left early (break, abort, an error in the loop): the server's last reply is dropped
        if (!abortedHere) this.cancel(id); // (the abort sent its cancel already)
        if (abortedHere) {
          // keep reading (and dropping) until the server's reply, so the id stays reserved
          const drain = () => {
            if (call.failure || call.queue.some((m) => m.type !== "stream")) {
              this.#calls.delete(id);
            } else {
              call.queue.length = 0;
              call.wake = drain;
            }
          };
          drain();
        } else {
          this.#calls.delete(id);
        }
      } else {
        this.#calls.delete(id);
      }
    }
  }

  /** Call `fn` and return its result data (streamed tokens are not kept). */
  async call(fn: string, params: Params = {}, options: CallOptions = {}): Promise<ResultData> {
    return this.stream(fn, params, options).result();
  }

  /** Ask the server to cancel a call in flight (its stream then ends with `Cancelled`). */
  cancel(id: CallId): void {
    const ws = this.#calls.get(String(id))?.ws ?? this.#ws;
    if (ws && ws.readyState === OPEN) {
      try {
        this.#send(ws, { type: "cancel", id });
      } catch {
        /* the connection is closing: the call ends anyway */
      }
    }
  }

  /** `system_metadata`: the tenant, its models and the functions it can call (JSON schemas). */
  metadata(): Promise<ResultData> {
    return this.call("system_metadata");
  }

  /** `system_health`. */
  health(): Promise<ResultData> {
    return this.call("system_health");
  }

  /** `system_metrics`: this tenant's figures. */
  metrics(): Promise<ResultData> {
    return this.call("system_metrics");
  }

  /** `system_models`: the models served (`name` is what `model` takes). */
  async models(): Promise<ModelInfo[]> {
    const r = await this.call("system_models");
    return Array.isArray(r.models) ? (r.models as ModelInfo[]) : [];
  }
}

export interface ModelInfo {
  name: string;
  arch?: string;
  context_length?: number;
  n_params?: number;
  [key: string]: unknown;
}

function lostError(code: number | null, reason: string): RealmError {
  const text = `connection closed (${code ?? "?"}${reason ? " " + reason : ""})`;
  if (code === CloseCode.POLICY && reason.startsWith(`${ErrorCode.UNAUTHORIZED}:`)) {
    return new KeyRefused(text, { closeCode: code, reason });
  }
  return new ConnectionLost(`${text}; ${RETRY_HINT}`, { closeCode: code, reason });
}

/** Open a client: `const c = await connect("ws://127.0.0.1:8080", {apiKey})`. Fails fast on a
 * wrong URL or a refused handshake; a wrong API key is seen by the first call (`KeyRefused`:
 * the server accepts, then closes with 1008). */
export async function connect(url: string, options: ConnectOptions = {}): Promise<RealmClient> {
  const client = new RealmClient(url, options);
  await client.connection();
  return client;
}
