// The demo panel: open /ws/whoami/ each way the config lists and show what the server says,
// and a live feed that keeps itself connected. Every socket is a RealtimeSocket
// (realtime.js): this file only shows what they report. Text reaches the page through
// textContent only.

import { RealtimeSocket, SESSION_ENDED, fetchTicket } from "./realtime.js";

const config = JSON.parse(document.getElementById("demo-config").textContent);
const csrfToken = () => document.querySelector("[name=csrfmiddlewaretoken]").value;
const secretParams = ["ticket", config.secret_param];
const NOT_SENT = "—"; // a whoami field the server did not send

// Where a socket's credential travels, without the credential.
function describe({ url, protocols }) {
  return protocols.length > 1 ? `${url}  Sec-WebSocket-Protocol: ${protocols.join(", ")}` : url;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

// The socket of a panel row, opened once: {url, expect, ticket: "header"|"query"|undefined,
// protocols}. A ticket in the header is the module's own way; in the query string the page
// puts it there itself, to show that way: the module never puts a credential in a URL.
async function rowSocket(spec) {
  const options = { reconnect: false, protocols: spec.protocols || [], secretParams };
  let url = spec.url;
  if (spec.ticket === "header") Object.assign(options, { ticketUrl: config.ticket_url, csrfToken });
  if (spec.ticket === "query") {
    const query = new URL(url);
    query.searchParams.set("ticket", await fetchTicket(config.ticket_url, query.pathname, csrfToken()));
    url = query.toString();
  }
  return new RealtimeSocket(url, options);
}

async function probe(spec) {
  const row = document.querySelector("#sockets tbody").insertRow();
  row.dataset.state = "pending";
  cell(row, spec.name, "name");
  const where = cell(row, "").appendChild(document.createElement("code"));
  cell(row, spec.expect, "expect");
  const result = cell(row, "connecting…", "result");
  const cookies = cell(row, "", "cookies");
  const origin = cell(row, "", "origin");
  const verdict = cell(row, "", "verdict");

  function refused(text) {
    row.dataset.state = "refused";
    result.textContent = text;
    verdict.textContent = "✗";
  }

  let socket;
  try {
    socket = await rowSocket(spec);
  } catch (error) {
    return refused(`cannot connect: ${error.message}`);
  }
  socket.addEventListener("open", ({ detail }) => { where.textContent = describe(detail.endpoint); });
  socket.addEventListener("error", ({ detail }) => {
    if (row.dataset.state === "pending") refused(`cannot connect: ${detail.error}`);
  });
  socket.addEventListener("message", ({ detail: who }) => {
    const seen = who.authenticated ? "you" : "anonymous";
    result.textContent = who.authenticated ? `${who.user} (auth: ${who.auth})` : "anonymous";
    // What reached the server: cookie names (never values) and the Origin header.
    cookies.textContent = Array.isArray(who.cookies) ? who.cookies.join(", ") || "none" : NOT_SENT;
    origin.textContent = who.origin === undefined ? NOT_SENT : who.origin ?? "none";
    row.dataset.state = seen === spec.expect ? "ok" : "mismatch";
    verdict.textContent = seen === spec.expect ? "✓ as expected" : "✗ not as expected";
  });
  socket.addEventListener("close", ({ detail: { code, endpoint } }) => {
    where.textContent = describe(endpoint);
    row.dataset.closed = code;
    if (row.dataset.state === "pending") return refused(`refused (close code ${code})`);
    const why = code === SESSION_ENDED ? "session ended" : "closed";
    verdict.textContent += ` · ${why} (close code ${code})`;
  });
}

// What the live feed's status line says in each state.
function statusText({ state, code, reason, delay }) {
  const closed = code === null ? reason || "not connected" : `closed (close code ${code})`;
  if (state === "open") return "connected";
  if (state === "connecting") return "connecting…";
  if (state === "reconnecting") return `${closed}, reconnecting in ${(delay / 1000).toFixed(1)} s`;
  if (state === "ended") return `${closed}: your session ended, log in again`;
  return closed;
}

function liveFeed() {
  const status = document.getElementById("live-status");
  const feed = document.getElementById("feed");
  const form = document.getElementById("live-form");
  const socket = new RealtimeSocket(config.live.url, {
    ticketUrl: config.live.ticket ? config.ticket_url : null,
    csrfToken,
    secretParams,
  });

  function note(type, text) {
    const li = feed.appendChild(document.createElement("li"));
    li.dataset.type = type;
    li.textContent = text;
    return li;
  }

  socket.addEventListener("statechange", ({ detail }) => { status.textContent = statusText(detail); });
  socket.addEventListener("message", ({ detail: msg }) => {
    note(msg.type, msg.type === "error" ? `error: ${msg.error}` : `${msg.type} from ${msg.user}: ${msg.text}`);
  });
  // The server no longer holds everything since the last id seen: say so, and offer a reload.
  socket.addEventListener("gap", () => {
    const li = note("gap", "Some messages were missed while disconnected. ");
    const reload = li.appendChild(document.createElement("a"));
    reload.href = "";
    reload.textContent = "Reload the page";
    reload.addEventListener("click", (event) => { event.preventDefault(); location.reload(); });
  });
  socket.addEventListener("too-big", ({ detail }) => note("error", `error: message too big (${detail.reason})`));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = form.elements.text.value;
    if (event.submitter && event.submitter.value === "socket") {
      if (!socket.send({ text })) note("error", "error: not connected, nothing sent");
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
}

config.rows.forEach(probe);
liveFeed();
