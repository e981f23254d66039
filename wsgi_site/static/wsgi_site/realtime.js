// realtime.js: the browser's side of the split deployment, as an ES module with no
// dependencies and no build step.
//
//   import { RealtimeSocket } from "/static/wsgi_site/realtime.js";
//   const socket = new RealtimeSocket("ws://realtime.example.com/ws/live/", {
//     ticketUrl: "/ws-ticket/",                 // omit when the cookie reaches the socket
//     csrfToken: () => document.querySelector("[name=csrfmiddlewaretoken]").value,
//   });
//   socket.addEventListener("message", (event) => show(event.detail));
//
// A RealtimeSocket fetches a fresh single-use ticket before every connection and offers it
// in Sec-WebSocket-Protocol, reconnects with exponential backoff and jitter, resumes from
// the last message id it saw (?since=), and reacts to the server's close codes. It never
// puts a credential in a URL, never logs anything, and shows credentials only masked
// (`endpoint`). The README's "Using the client" documents the API.

export const SUBPROTOCOL = "realtime";

// Close codes the server sends (README, "Close codes").
export const MESSAGE_TOO_BIG = 1009;
export const SERVICE_RESTART = 1012;
export const SESSION_ENDED = 4401;
export const TOO_MANY_SOCKETS = 4409;
export const TOO_MANY_MESSAGES = 4429;

export const DEFAULTS = Object.freeze({
  ticketUrl: null, // POST {"path"} here for a ticket before each connection; null: none
  csrfToken: null, // a string, or a function returning one (read at each ticket request)
  protocols: [], // more subprotocols to offer beside "realtime"
  lastId: null, // resume from this message id on the first connection too
  resume: true, // ask for what was missed (?since=<last id>) when reconnecting
  reconnect: true, // false: one connection, then "closed"
  baseDelay: 500, // ms: the first retry's ceiling; it doubles with each failed attempt...
  maxDelay: 30000, // ...up to this
  restartDelay: 1000, // ms: after 1012, reconnect within this (full jitter)
  slowDownDelay: 15000, // ms: after 4429 or 4409, wait at least this (up to twice it)
  secretParams: ["ticket", "session_key"], // query parameters `endpoint` masks
});

// A connection that stayed open this long starts the backoff again from baseDelay.
const STABLE_MS = 5000;

/** A ticket request the app host refused; `status` is its HTTP status (0: no answer). */
export class TicketError extends Error {
  constructor(status) {
    super(status ? `ticket refused (${status})` : "ticket request failed");
    this.name = "TicketError";
    this.status = status;
  }
}

/** Return a fresh single-use ticket from `ticketUrl` (POST, same origin) for a socket on `path`. */
export async function fetchTicket(ticketUrl, path, csrfToken) {
  let response;
  try {
    response = await fetch(ticketUrl, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken || "" },
      body: JSON.stringify({ path }),
    });
  } catch {
    throw new TicketError(0);
  }
  if (!response.ok) throw new TicketError(response.status);
  return (await response.json()).ticket;
}

/** Return {url, protocols} with every credential replaced by "***", fit to show. */
export function masked(url, protocols, secretParams = DEFAULTS.secretParams) {
  const parsed = new URL(url);
  for (const name of secretParams) {
    if (parsed.searchParams.has(name)) parsed.searchParams.set(name, "***");
  }
  const shown = protocols.map((p) => (p === SUBPROTOCOL ? p : p.replace(/\..*/s, ".***")));
  return { url: parsed.toString(), protocols: shown };
}

/**
 * Return how many ms to wait before reconnecting after a close with `code` (null: the
 * ticket request failed), at the `attempt`-th failure in a row. 1012 (the server restarts):
 * soon, anywhere within restartDelay. 4429 and 4409: at least slowDownDelay. Otherwise
 * exponential from baseDelay, capped at maxDelay, with equal jitter: half the ceiling plus
 * a random part, so clients that lost the same server spread out but never hammer it.
 */
export function reconnectDelay(code, attempt, options = DEFAULTS, random = Math.random) {
  if (code === SERVICE_RESTART) return random() * options.restartDelay;
  if (code === TOO_MANY_MESSAGES || code === TOO_MANY_SOCKETS) {
    return options.slowDownDelay * (1 + random());
  }
  const ceiling = Math.min(options.maxDelay, options.baseDelay * 2 ** attempt);
  return ceiling / 2 + (random() * ceiling) / 2;
}

/**
 * A socket that keeps itself connected. States: "connecting" (fetching a ticket, then the
 * handshake), "open", "reconnecting" (waiting to retry), "ended" (the session ended: log in
 * again), "closed" (close() was called, or a one-shot socket closed); "idle" before the
 * first connection. Events, each a CustomEvent with this `detail`: statechange {state,
 * previous, code, reason, delay}, open {protocol, endpoint}, message (the parsed frame),
 * gap {}, session-ended {code, reason}, too-big {code, reason}, close {code, reason,
 * wasClean, endpoint}, error {error}. It connects once the current task ends, so listeners
 * added right after `new` see every event.
 */
export class RealtimeSocket extends EventTarget {
  #options;
  #state = "idle";
  #ws = null;
  #timer = null;
  #generation = 0; // bumped by close(): a ticket arriving after it opens nothing
  #attempt = 0;
  #openedAt = null;
  #endpoint = null;

  constructor(url, options = {}) {
    super();
    this.url = url;
    this.#options = { ...DEFAULTS, ...options };
    this.lastId = this.#options.lastId;
    const generation = this.#generation;
    queueMicrotask(() => generation === this.#generation && this.#connect());
  }

  /** The current state (see the class). */
  get state() {
    return this.#state;
  }

  /** Where the latest connection went, credentials masked: {url, protocols}, or null. */
  get endpoint() {
    return this.#endpoint;
  }

  /** Send `data` (a string, or anything JSON can encode) if open; return whether it was sent. */
  send(data) {
    if (this.#state !== "open") return false;
    this.#ws.send(typeof data === "string" ? data : JSON.stringify(data));
    return true;
  }

  /** Close for good: no reconnect. */
  close(code = 1000, reason = "") {
    this.#generation += 1;
    clearTimeout(this.#timer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws) ws.close(code, reason);
    this.#setState("closed", { code, reason });
  }

  async #connect() {
    const generation = this.#generation;
    this.#setState("connecting");
    const protocols = [SUBPROTOCOL, ...this.#options.protocols];
    if (this.#options.ticketUrl) {
      try {
        protocols.push(`ticket.${await this.#ticket()}`);
      } catch (error) {
        if (generation !== this.#generation) return;
        this.#emit("error", { error: error.message });
        // The app host says we are not logged in (or no longer hold a valid CSRF token).
        if (error.status === 401 || error.status === 403) return this.#end(null, error.message);
        if (!this.#options.reconnect) return this.#setState("closed", { reason: error.message });
        // 429: the app host's rate limit; slow down as for 4429.
        const slow = error.status === 429 ? TOO_MANY_MESSAGES : null;
        return this.#retry(null, error.message, this.#delay(slow));
      }
      if (generation !== this.#generation) return;
    }
    let ws;
    try {
      // Inside the try: new URL() in both throws on a malformed URL, quoting it.
      const url = this.#url();
      this.#endpoint = masked(url, protocols, this.#options.secretParams);
      ws = new WebSocket(url, protocols);
    } catch {
      // A malformed URL or subprotocol: no retry can fix it. The browser's message would
      // quote the URL, credentials and all, so ours does not.
      this.#emit("error", { error: "the URL or a subprotocol is malformed" });
      return this.#setState("closed");
    }
    this.#ws = ws;
    ws.onopen = () => this.#opened(ws);
    ws.onmessage = (event) => this.#received(ws, event);
    ws.onclose = (event) => this.#closed(ws, event);
  }

  #ticket() {
    const { ticketUrl, csrfToken } = this.#options;
    const token = typeof csrfToken === "function" ? csrfToken() : csrfToken;
    return fetchTicket(ticketUrl, new URL(this.url).pathname, token);
  }

  // The URL of the next connection: `url`, asking for what came after the last id seen.
  #url() {
    if (!this.#options.resume || this.lastId === null) return this.url;
    const url = new URL(this.url);
    url.searchParams.set("since", this.lastId);
    return url.toString();
  }

  #opened(ws) {
    if (ws !== this.#ws) return;
    this.#openedAt = performance.now();
    this.#setState("open");
    this.#emit("open", { protocol: ws.protocol, endpoint: this.#endpoint });
  }

  #received(ws, event) {
    if (ws !== this.#ws) return;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      this.#emit("error", { error: "a frame that is not JSON" });
      return;
    }
    if (frame.type === "gap") {
      this.#emit("gap", {});
      return;
    }
    if (typeof frame.id === "string") this.lastId = frame.id;
    this.#emit("message", frame);
  }

  #closed(ws, { code, reason, wasClean }) {
    if (ws !== this.#ws) return; // close() was called: already "closed"
    this.#ws = null;
    if (this.#openedAt !== null && performance.now() - this.#openedAt >= STABLE_MS) {
      this.#attempt = 0;
    }
    this.#openedAt = null;
    this.#emit("close", { code, reason, wasClean, endpoint: this.#endpoint });
    if (code === SESSION_ENDED) return this.#end(code, reason);
    if (code === MESSAGE_TOO_BIG) this.#emit("too-big", { code, reason });
    if (!this.#options.reconnect) return this.#setState("closed", { code, reason });
    this.#retry(code, reason, this.#delay(code));
  }

  #delay(code) {
    const delay = reconnectDelay(code, this.#attempt, this.#options);
    if (code !== SERVICE_RESTART) this.#attempt += 1;
    return delay;
  }

  #retry(code, reason, delay) {
    this.#setState("reconnecting", { code, reason, delay });
    const generation = this.#generation;
    this.#timer = setTimeout(() => generation === this.#generation && this.#connect(), delay);
  }

  // The session is over: a new ticket or the same cookie would open only an anonymous socket.
  #end(code, reason) {
    this.#generation += 1;
    this.#setState("ended", { code, reason });
    this.#emit("session-ended", { code, reason });
  }

  #setState(state, detail = {}) {
    const previous = this.#state;
    this.#state = state;
    this.#emit("statechange", { state, previous, code: null, reason: "", delay: null, ...detail });
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
