// The demo panel: open /ws/whoami/ each way the config lists and show what the server says,
// and a live feed that reconnects by itself. Text reaches the page through textContent only.
"use strict";

const config = JSON.parse(document.getElementById("demo-config").textContent);
const SUBPROTOCOL = "realtime";
const SESSION_ENDED = 4401;
const csrfToken = () => document.querySelector("[name=csrfmiddlewaretoken]").value;

// Show where a socket's credential travels, without the credential.
function masked(url, protocols) {
  const u = new URL(url);
  for (const name of [config.secret_param, "ticket"]) {
    if (u.searchParams.has(name)) u.searchParams.set(name, "***");
  }
  const header = protocols.map((p) => (p === SUBPROTOCOL ? p : p.replace(/\..*/, ".***")));
  return header.length > 1 ? `${u}  Sec-WebSocket-Protocol: ${header.join(", ")}` : `${u}`;
}

// A fresh single-use ticket from the app host, for a socket on `path`.
async function ticketFor(path) {
  const response = await fetch(config.ticket_url, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
    body: JSON.stringify({ path }),
  });
  if (!response.ok) throw new Error(`ticket refused: ${response.status}`);
  return (await response.json()).ticket;
}

// Where and how to open a socket described by {url, ticket: "query"|"header"|undefined, protocols}.
async function socketArgs(spec) {
  let url = spec.url;
  const protocols = [SUBPROTOCOL, ...(spec.protocols || [])];
  if (spec.ticket) {
    const ticket = await ticketFor(new URL(url).pathname);
    if (spec.ticket === "query") url += `?ticket=${ticket}`;
    else protocols.push(`ticket.${ticket}`);
  }
  return [url, protocols];
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

async function probe(spec) {
  const row = document.querySelector("#sockets tbody").insertRow();
  row.dataset.state = "pending";
  cell(row, spec.name, "name");
  const where = cell(row, "").appendChild(document.createElement("code"));
  cell(row, spec.expect, "expect");
  const result = cell(row, "connecting…", "result");
  const verdict = cell(row, "", "verdict");

  const [url, protocols] = await socketArgs(spec);
  where.textContent = masked(url, protocols);
  const ws = new WebSocket(url, protocols);
  ws.onmessage = (event) => {
    const who = JSON.parse(event.data);
    const seen = who.authenticated ? "you" : "anonymous";
    result.textContent = who.authenticated ? `${who.user} (auth: ${who.auth})` : "anonymous";
    row.dataset.state = seen === spec.expect ? "ok" : "mismatch";
    verdict.textContent = seen === spec.expect ? "✓ as expected" : "✗ not as expected";
  };
  ws.onclose = (event) => {
    row.dataset.closed = event.code;
    if (row.dataset.state === "pending") {
      row.dataset.state = "refused";
      result.textContent = `refused (close code ${event.code})`;
      verdict.textContent = "✗";
    } else {
      const why = event.code === SESSION_ENDED ? "session ended" : "closed";
      verdict.textContent += ` · ${why} (close code ${event.code})`;
    }
  };
}

function liveFeed() {
  const status = document.getElementById("live-status");
  const feed = document.getElementById("feed");
  const form = document.getElementById("live-form");
  let ws = null;
  let attempt = 0;
  // The id of the last announcement or message shown: a reconnect asks for what came after
  // it (?since=), so nothing is missed or shown twice while the socket was down.
  let lastId = null;

  function note(type, text) {
    const li = feed.appendChild(document.createElement("li"));
    li.dataset.type = type;
    li.textContent = text;
    return li;
  }

  // The server no longer holds everything since lastId: say so, and offer a reload.
  function gap() {
    const li = note("gap", "Some messages were missed while disconnected. ");
    const reload = li.appendChild(document.createElement("a"));
    reload.href = "";
    reload.textContent = "Reload the page";
    reload.addEventListener("click", (event) => { event.preventDefault(); location.reload(); });
  }

  async function connect() {
    try {
      const since = lastId === null ? "" : `?since=${encodeURIComponent(lastId)}`;
      const [url, protocols] = await socketArgs({ ...config.live, url: config.live.url + since });
      ws = new WebSocket(url, protocols);
    } catch (error) {
      status.textContent = `cannot connect: ${error.message}`;
      return;
    }
    ws.onopen = () => { attempt = 0; status.textContent = "connected"; };
    ws.onmessage = (event) => {
      const msg = JSON.parse(event.data);
      if (msg.type === "gap") return gap();
      if (msg.id) lastId = msg.id;
      note(msg.type, msg.type === "error" ? `error: ${msg.error}` : `${msg.type} from ${msg.user}: ${msg.text}`);
    };
    ws.onclose = (event) => {
      if (event.code === SESSION_ENDED) {
        status.textContent = `closed (close code ${event.code}): your session ended, log in again`;
        return;
      }
      // Daphne restarted or the network dropped: back off exponentially, with jitter so a
      // restart does not bring every client back in the same instant.
      const delay = Math.min(30000, 500 * 2 ** attempt++) * (0.5 + Math.random());
      status.textContent = `closed (close code ${event.code}), reconnecting in ${(delay / 1000).toFixed(1)} s`;
      setTimeout(connect, delay);
    };
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = form.elements.text.value;
    if (event.submitter && event.submitter.value === "socket") {
      ws.send(JSON.stringify({ text }));
    } else {
      const response = await fetch("/announce/", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
        body: JSON.stringify({ text }),
      });
      if (!response.ok) note("error", `announce failed: ${response.status} ${(await response.json()).error}`);
    }
    form.elements.text.value = "";
  });
  connect();
}

config.rows.forEach(probe);
liveFeed();
