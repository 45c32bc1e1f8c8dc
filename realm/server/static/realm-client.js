// Realm JavaScript client 0.1.0: a build of clients/js/src/index.ts (npm run bundle).
// Do not edit: regenerate it. source-sha256: 12bb5bf1e3bd30a97f1865c336c15e3a3f645511cfdac7637a22232908daa399
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
};
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
};
/** A server message, or null for anything that is not one (ignored, as the Python client does). */
export function readServerMessage(text) {
    let msg;
    try {
        msg = JSON.parse(text);
    }
    catch {
        return null;
    }
    if (msg === null || typeof msg !== "object" || Array.isArray(msg))
        return null;
    if (msg.type !== "stream" && msg.type !== "result" && msg.type !== "error")
        return null;
    const id = msg.id ?? null;
    if (id !== null && typeof id !== "string" && typeof id !== "number")
        return null;
    const obj = (v) => (v && typeof v === "object" && !Array.isArray(v) ? v : {});
    return { type: msg.type, id, data: obj(msg.data), error: obj(msg.error) };
}
// --- errors ---------------------------------------------------------------------------------
/** The base of every error this client throws. */
export class RealmError extends Error {
    code = ErrorCode.INTERNAL;
    name = "RealmError";
    /** True if the same call may be sent again (the next call opens a new connection, which a
     * balancer gives to a server that is up): the server refused it before it ran, ended it
     * because it is shutting down, or the connection was lost. The client never resends a call
     * by itself (a call is not idempotent). */
    get retryable() {
        return false;
    }
}
/** The server answered a call with an error; `code` is the protocol's error code. */
export class RemoteError extends RealmError {
    static code = ErrorCode.INTERNAL;
    name = "RemoteError";
    callId;
    serverMessage;
    constructor(message, options = {}) {
        const code = new.target.code;
        super(`${code}: ${message}`, options.cause === undefined ? undefined : { cause: options.cause });
        this.code = code;
        this.name = new.target.name;
        this.callId = options.callId ?? null;
        this.serverMessage = message;
    }
}
export class InvalidRequest extends RemoteError {
    static code = ErrorCode.INVALID_REQUEST;
}
export class UnknownFunction extends RemoteError {
    static code = ErrorCode.UNKNOWN_FUNCTION;
}
export class InvalidParams extends RemoteError {
    static code = ErrorCode.INVALID_PARAMS;
}
/** UNAUTHORIZED: a call's `tenant_id` is not the connection's tenant, or (as `KeyRefused`) the
 * server closed the connection because its API key is missing or unknown. */
export class Unauthorized extends RemoteError {
    static code = ErrorCode.UNAUTHORIZED;
}
/** RATE_LIMITED: `retryAfter` is the seconds until the tenant's next call is admitted (null if
 * the server did not say). */
export class RateLimited extends RemoteError {
    static code = ErrorCode.RATE_LIMITED;
    retryAfter;
    constructor(message, options = {}) {
        super(message, options);
        this.retryAfter = options.retryAfter ?? null;
    }
    /** After `retryAfter` seconds. */
    get retryable() {
        return true;
    }
}
/** OVERLOADED: refused before it ran (retryable). */
export class Overloaded extends RemoteError {
    static code = ErrorCode.OVERLOADED;
    get retryable() {
        return true;
    }
}
export class TenantUnavailable extends RemoteError {
    static code = ErrorCode.TENANT_UNAVAILABLE;
}
export class GuestTrap extends RemoteError {
    static code = ErrorCode.GUEST_TRAP;
}
/** CANCELLED: by the server's answer to a cancel, or at once when the call's AbortSignal fires
 * (then `cause` is the signal's reason). */
export class Cancelled extends RemoteError {
    static code = ErrorCode.CANCELLED;
    /** Ended by the server's shutdown, not by the client. */
    get retryable() {
        return this.serverMessage === SHUTDOWN_REASON;
    }
}
export class CallTimeout extends RemoteError {
    static code = ErrorCode.TIMEOUT;
}
export class ServerError extends RemoteError {
    static code = ErrorCode.INTERNAL;
}
/** The connection closed while a call was in flight (its outcome is unknown), or it could not
 * be opened. `closeCode` and `reason` are the server's close frame, if any. Retryable: the
 * next call opens a new connection. */
export class ConnectionLost extends RealmError {
    name = "ConnectionLost";
    closeCode;
    reason;
    constructor(message, options = {}) {
        super(message);
        this.closeCode = options.closeCode ?? null;
        this.reason = options.reason ?? "";
    }
    get retryable() {
        return true;
    }
}
/** The server closed the connection (1008 UNAUTHORIZED): the API key is missing or unknown.
 * An `Unauthorized`; `closeCode` is 1008 and `reason` the close frame's reason. */
export class KeyRefused extends Unauthorized {
    closeCode;
    reason;
    constructor(message, options = {}) {
        super(message);
        this.name = "KeyRefused";
        this.closeCode = options.closeCode ?? null;
        this.reason = options.reason ?? "";
    }
}
/** The error class of each protocol error code (every code has one). */
export const ERROR_CLASSES = {
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
export function errorFromWire(error, callId = null) {
    if (!error || typeof error !== "object") {
        return new ServerError(`malformed error object ${JSON.stringify(error)}`, { callId });
    }
    const e = error;
    const message = String(e.message ?? "");
    const cls = Object.prototype.hasOwnProperty.call(ERROR_CLASSES, String(e.code))
        ? ERROR_CLASSES[e.code]
        : ServerError;
    if (cls === RateLimited) {
        const wait = e.retry_after;
        const ok = typeof wait === "number" && Number.isFinite(wait) && wait >= 0;
        return new RateLimited(message, { callId, retryAfter: ok ? wait : null });
    }
    return new cls(message, { callId });
}
const OPEN = 1;
async function findWebSocket(given) {
    if (given)
        return given;
    const global = globalThis.WebSocket;
    if (typeof global === "function")
        return global;
    const name = "ws"; // a variable: bundlers leave the optional peer dependency alone
    try {
        const mod = await import(/* @vite-ignore */ name);
        return (mod.WebSocket ?? mod.default);
    }
    catch {
        throw new ConnectionLost("no WebSocket implementation: use Node >= 22 or a browser, install the `ws` package, " +
            "or pass one as connect(url, {WebSocket})");
    }
}
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/; // an HTTP token: what a subprotocol may be
const ROUTING_KEY = /^[A-Za-z0-9._-]{1,128}$/; // a `tenant` routing key
/** A streamed call: `for await (const ev of stream)`; `id` is its protocol id. */
export class CallStream {
    id;
    #client;
    #events;
    constructor(id, events, client) {
        this.id = id;
        this.#events = events;
        this.#client = client;
    }
    [Symbol.asyncIterator]() {
        return this.#events;
    }
    /** Ask the server to cancel this call (the iteration then ends with `Cancelled`). */
    cancel() {
        this.#client.cancel(this.id);
    }
    /** Read the stream to its end; the result data. `onToken` sees each token. */
    async result(onToken) {
        for await (const ev of this) {
            if (ev.kind === "result")
                return ev.data;
            onToken?.(ev.data.token, ev.data.index);
        }
        throw new ConnectionLost("the call ended without a result");
    }
}
/** A connection to a Realm server; open it with `connect`. */
export class RealmClient {
    url;
    /** The model of calls that name none (`null`: the server's default). */
    defaultModel;
    #options;
    #WebSocket = null;
    #ws = null;
    #opening = null;
    #calls = new Map();
    #nextId = 1;
    #closed = false;
    #takesModel = null;
    constructor(url, options = {}) {
        if (options.tenant !== undefined && !ROUTING_KEY.test(options.tenant)) {
            throw new TypeError(`tenant: ${JSON.stringify(options.tenant)} is not a routing key (1-128 letters, digits, '._-')`);
        }
        this.url = url;
        this.#options = options;
        this.defaultModel = options.model ?? null;
    }
    // --- connection ---------------------------------------------------------------------------
    /** The open connection, (re)opened with exponential backoff when it has closed. */
    async connection() {
        if (this.#closed)
            throw new ConnectionLost("the client is closed");
        if (this.#ws && this.#ws.readyState === OPEN)
            return this.#ws;
        this.#opening ??= this.#open().finally(() => {
            this.#opening = null;
        });
        return this.#opening;
    }
    async #open() {
        this.#WebSocket ??= await findWebSocket(this.#options.WebSocket);
        const retries = this.#options.retries ?? 5;
        let delay = this.#options.backoffMs ?? 100;
        let last = "no attempt";
        for (let attempt = 0; attempt <= retries; attempt++) {
            try {
                const ws = await this.#attempt(this.#WebSocket);
                this.#ws = ws;
                return ws;
            }
            catch (e) {
                last = e instanceof Error ? e.message : String(e);
                if (/\b4\d\d\b/.test(last))
                    break; // a refused handshake (403, 429): retrying won't help
            }
            if (attempt < retries && !this.#closed) {
                await new Promise((r) => setTimeout(r, delay));
                delay = Math.min(delay * 2, 5000);
            }
        }
        throw new ConnectionLost(`cannot connect to ${this.url}: ${last}`);
    }
    #attempt(WS) {
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
            }
            else {
                protocols.push(BEARER_SUBPROTOCOL + key);
            }
        }
        return new Promise((resolve, reject) => {
            let ws;
            try {
                ws = new WS(url, protocols);
            }
            catch (e) {
                reject(e);
                return;
            }
            let opened = false;
            const timer = setTimeout(() => {
                if (!opened) {
                    reject(new Error(`no handshake within ${(this.#options.connectTimeoutMs ?? 10000) / 1000} s`));
                    try {
                        ws.close();
                    }
                    catch {
                        /* closing anyway */
                    }
                }
            }, this.#options.connectTimeoutMs ?? 10000);
            ws.addEventListener("open", () => {
                opened = true;
                clearTimeout(timer);
                resolve(ws);
            });
            ws.addEventListener("error", (ev) => {
                if (!opened) {
                    clearTimeout(timer);
                    reject(new Error(ev?.message || ev?.error?.message || "connection failed"));
                }
            });
            ws.addEventListener("message", (ev) => this.#receive(ev.data));
            ws.addEventListener("close", (ev) => {
                clearTimeout(timer);
                if (!opened) {
                    reject(new Error(`connection closed before the handshake (${ev?.code ?? "?"})`));
                    return;
                }
                this.#drop(ws, lostError(ev?.code ?? null, String(ev?.reason ?? "")));
            });
        });
    }
    #receive(data) {
        const text = typeof data === "string"
            ? data
            : data instanceof ArrayBuffer || ArrayBuffer.isView(data)
                ? new TextDecoder().decode(data)
                : String(data);
        this.#options.onMessage?.("in", text);
        const msg = readServerMessage(text);
        if (!msg || msg.id === null)
            return;
        const call = this.#calls.get(String(msg.id));
        if (!call)
            return;
        call.queue.push(msg);
        call.wake?.();
    }
    /** `ws` has closed: the next call opens a new connection; its calls fail with `lost`. */
    #drop(ws, lost) {
        if (this.#ws === ws)
            this.#ws = null;
        for (const call of this.#calls.values()) {
            if (call.ws === ws && !call.failure) {
                call.failure = lost;
                call.wake?.();
            }
        }
    }
    #send(ws, message) {
        const text = JSON.stringify(message);
        this.#options.onMessage?.("out", text);
        ws.send(text);
    }
    /** Close the connection; calls in flight fail with `ConnectionLost`. */
    close() {
        this.#closed = true;
        const ws = this.#ws;
        this.#ws = null;
        if (ws) {
            this.#drop(ws, new ConnectionLost("the client was closed"));
            try {
                ws.close(CloseCode.NORMAL);
            }
            catch {
                /* already closing */
            }
        }
    }
    // --- calls --------------------------------------------------------------------------------
    async #withModel(fn, params, model) {
        const name = model ?? this.defaultModel;
        if (!name || "model" in params)
            return params;
        if (model !== undefined)
            return { ...params, model };
        // the default model goes only to functions that take one (system functions do not)
        this.#takesModel ??= this.metadata().then((m) => new Set((m.functions ?? [])
            .filter((f) => f?.params?.properties && "model" in f.params.properties)
            .map((f) => String(f.name))), () => new Set());
        return (await this.#takesModel).has(fn) ? { ...params, model: name } : params;
    }
    /** Start `fn` and iterate its events: token events, then the result. Breaking out of the
     * loop early cancels the call; so do `stream.cancel()` and the options' `signal`. */
    stream(fn, params = {}, options = {}) {
        const id = `c${this.#nextId++}`;
        return new CallStream(id, this.#events(id, fn, params, options), this);
    }
    async *#events(id, fn, params, options) {
        const { signal } = options;
        const aborted = () => new Cancelled("aborted by the client", { callId: id, cause: signal?.reason });
        if (signal?.aborted)
            throw aborted();
        const sent = fn.startsWith("system_") ? params : await this.#withModel(fn, params, options.model);
        const ws = await this.connection();
        if (signal?.aborted)
            throw aborted();
        const call = { ws, queue: [], wake: null, done: false, failure: null };
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
                if (abortedHere)
                    throw aborted();
                const msg = call.queue.shift();
                if (!msg) {
                    if (call.failure)
                        throw call.failure; // (a ConnectionLost: retryable)
                    await new Promise((r) => (call.wake = r));
                    call.wake = null;
                    continue;
                }
                if (msg.type === "stream") {
                    yield { kind: "token", data: msg.data };
                }
                else if (msg.type === "result") {
                    call.done = true;
                    yield { kind: "result", data: msg.data };
                    return;
                }
                else {
                    call.done = true;
                    throw errorFromWire(msg.error, id);
                }
            }
        }
        finally {
            signal?.removeEventListener("abort", onAbort);
            if (!call.done && !call.failure) {
                // left early (break, abort, an error in the loop): the server's last reply is dropped
                if (!abortedHere)
                    this.cancel(id); // (the abort sent its cancel already)
                if (abortedHere) {
                    // keep reading (and dropping) until the server's reply, so the id stays reserved
                    const drain = () => {
                        if (call.failure || call.queue.some((m) => m.type !== "stream")) {
                            this.#calls.delete(id);
                        }
                        else {
                            call.queue.length = 0;
                            call.wake = drain;
                        }
                    };
                    drain();
                }
                else {
                    this.#calls.delete(id);
                }
            }
            else {
                this.#calls.delete(id);
            }
        }
    }
    /** Call `fn` and return its result data (streamed tokens are not kept). */
    async call(fn, params = {}, options = {}) {
        return this.stream(fn, params, options).result();
    }
    /** Ask the server to cancel a call in flight (its stream then ends with `Cancelled`). */
    cancel(id) {
        const ws = this.#calls.get(String(id))?.ws ?? this.#ws;
        if (ws && ws.readyState === OPEN) {
            try {
                this.#send(ws, { type: "cancel", id });
            }
            catch {
                /* the connection is closing: the call ends anyway */
            }
        }
    }
    /** `system_metadata`: the tenant, its models and the functions it can call (JSON schemas). */
    metadata() {
        return this.call("system_metadata");
    }
    /** `system_health`. */
    health() {
        return this.call("system_health");
    }
    /** `system_metrics`: this tenant's figures. */
    metrics() {
        return this.call("system_metrics");
    }
    /** `system_models`: the models served (`name` is what `model` takes). */
    async models() {
        const r = await this.call("system_models");
        return Array.isArray(r.models) ? r.models : [];
    }
}
function lostError(code, reason) {
    const text = `connection closed (${code ?? "?"}${reason ? " " + reason : ""})`;
    if (code === CloseCode.POLICY && reason.startsWith(`${ErrorCode.UNAUTHORIZED}:`)) {
        return new KeyRefused(text, { closeCode: code, reason });
    }
    return new ConnectionLost(`${text}; ${RETRY_HINT}`, { closeCode: code, reason });
}
/** Open a client: `const c = await connect("ws://127.0.0.1:8080", {apiKey})`. Fails fast on a
 * wrong URL or a refused handshake; a wrong API key is seen by the first call (`KeyRefused`:
 * the server accepts, then closes with 1008). */
export async function connect(url, options = {}) {
    const client = new RealmClient(url, options);
    await client.connection();
    return client;
}
