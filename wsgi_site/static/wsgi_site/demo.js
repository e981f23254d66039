// The demo panel: open /ws/whoami/ each way the config lists and show what the server says.
// Every text reaches the page through textContent, never as HTML.
"use strict";

const config = JSON.parse(document.getElementById("demo-config").textContent);

// Show a URL without the secret it may carry.
function masked(url) {
  const u = new URL(url);
  for (const name of [config.secret_param, "ticket"]) {
    if (u.searchParams.has(name)) u.searchParams.set(name, "***");
  }
  return u.toString();
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function probe(spec) {
  const row = document.querySelector("#sockets tbody").insertRow();
  row.dataset.state = "pending";
  cell(row, spec.name, "name");
  cell(row, "").appendChild(document.createElement("code")).textContent = masked(spec.url);
  cell(row, spec.expect, "expect");
  const result = cell(row, "connecting…", "result");
  const verdict = cell(row, "", "verdict");

  const ws = new WebSocket(spec.url);
  ws.onmessage = (event) => {
    const who = JSON.parse(event.data);
    const seen = who.authenticated ? "you" : "anonymous";
    result.textContent = who.authenticated ? `${who.user} (auth: ${who.auth})` : "anonymous";
    row.dataset.state = seen === spec.expect ? "ok" : "mismatch";
    verdict.textContent = seen === spec.expect ? "✓ as expected" : "✗ not as expected";
  };
  ws.onclose = (event) => {
    if (row.dataset.state !== "pending") return;
    row.dataset.state = "refused";
    result.textContent = `refused (close code ${event.code})`;
    verdict.textContent = "✗";
  };
}

function liveFeed() {
  const status = document.getElementById("live-status");
  const feed = document.getElementById("feed");
  const form = document.getElementById("live-form");
  const ws = new WebSocket(config.live);
  ws.onopen = () => { status.textContent = "connected"; };
  ws.onclose = (event) => { status.textContent = `closed (code ${event.code})`; };
  ws.onmessage = (event) => {
    const msg = JSON.parse(event.data);
    const li = feed.appendChild(document.createElement("li"));
    li.dataset.type = msg.type;
    li.textContent = msg.type === "error" ? `error: ${msg.error}` : `${msg.type} from ${msg.user}: ${msg.text}`;
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = form.elements.text.value;
    if (event.submitter && event.submitter.value === "socket") {
      ws.send(JSON.stringify({ text }));
    } else {
      const response = await fetch("/announce/", {
        method: "POST",
        headers: { "Content-Type": "application/json",
                   "X-CSRFToken": form.elements.csrfmiddlewaretoken.value },
        body: JSON.stringify({ text }),
      });
      if (!response.ok) {
        const li = feed.appendChild(document.createElement("li"));
        li.dataset.type = "error";
        li.textContent = `announce failed: ${response.status} ${(await response.json()).error}`;
      }
    }
    form.elements.text.value = "";
  });
}

config.rows.forEach(probe);
liveFeed();
