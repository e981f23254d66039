"""
The browser client, wsgi_site/static/wsgi_site/realtime.js, in Debian's Chromium against the
real stack: through a restart, a logout in another tab, a flood, a message too big and a gap.

Each test opens a page on the app origin with no script of its own (the app's 404 page, served
by the stack itself: a page Playwright made up would count as a public address and Chromium's
local network access checks would block its sockets to loopback), imports the module the app
serves, and records every event each RealtimeSocket dispatches, with its time. The tests
assert on that record, not on how long things take.
"""

import json
import threading
import time
from pathlib import Path

import pytest
import redis
import requests
from playwright.sync_api import sync_playwright

from tests.stack import DEMO_PASSWORD, DEMO_USER, Stack, wait_until
from tests.test_browser import CHROMIUM_ARGS, log_in, new_context, session_cookie, socket_rows

STATIC = Path(__file__).resolve().parent.parent / "wsgi_site" / "static" / "wsgi_site"
HARNESS_PATH = "/client-under-test/"
DRAIN = 1.0  # WS_DRAIN_SECONDS: short, so restarts are too
SLOW_DOWN = 3000  # ms: the slowDownDelay the flood test asks for (the default is 15 s)

# Open a RealtimeSocket named `name` and record every event it dispatches in window.events.
START = """async ([name, url, options]) => {
  const { RealtimeSocket } = await import("/static/wsgi_site/realtime.js");
  const csrfToken = () => document.cookie.match(/(?:^|; )csrftoken=([^;]+)/)[1];
  const socket = new RealtimeSocket(url, { ticketUrl: "/ws-ticket/", csrfToken, ...options });
  const types = ["statechange", "open", "message", "gap", "session-ended", "too-big", "close",
                 "error"];
  window.sockets = window.sockets || {};
  window.events = window.events || {};
  const log = (window.events[name] = []);
  for (const type of types) {
    socket.addEventListener(type, (e) => log.push({ ...e.detail, type, at: performance.now(),
                                                    frame: type === "message" ? e.detail : null }));
  }
  window.sockets[name] = socket;
}"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """
    One cross-domain stack for the module: a short drain, a low message rate for the flood
    (1 a second, a burst of 3) and a short history for the gap (at least 5 kept). The gap test
    runs last: after it, the history is trimmed as soon as a few more messages come.
    """
    env = {
        "WS_DRAIN_SECONDS": DRAIN,
        "WS_MESSAGE_RATE": 1,
        "WS_MESSAGE_BURST": 3,
        "WS_HISTORY_MAX": 5,
    }
    with Stack("cross-domain", tmp_path_factory.mktemp("client"), env=env) as stack:
        yield stack
    assert stack.leftover_processes() == []
    stack.assert_no_secrets_logged()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class ClientPage:
    """A logged-in tab on the app origin that runs RealtimeSockets and records their events."""

    def __init__(self, browser, stack) -> None:
        self.stack = stack
        self.context = new_context(browser, stack)  # tickets minted join stack.secrets
        self.page = self.context.new_page()
        self.tickets: list[str] = []  # every ticket this tab minted, in order
        self.console: list[str] = []
        self.page.on("response", self._keep_ticket)
        self.page.on("console", lambda message: self.console.append(message.text))
        # The login form, as a user fills it in, then straight to the page under test.
        harness = f"{stack.app_origin}{HARNESS_PATH}"
        self.page.goto(f"{stack.app_origin}/accounts/login/?next={HARNESS_PATH}")
        self.page.fill("input[name=username]", DEMO_USER)
        self.page.fill("input[name=password]", DEMO_PASSWORD)
        with self.page.expect_navigation(url=harness) as navigation:
            self.page.click("button[type=submit]")
        assert navigation.value.status == 404  # a page of the app's with no script
        stack.secrets.add(session_cookie(self.page, stack))

    def _keep_ticket(self, response):
        if response.url.endswith("/ws-ticket/") and response.ok:
            self.tickets.append(response.json()["ticket"])

    def start(self, name, path="/ws/live/", **options):
        self.page.evaluate(START, [name, self.stack.ws_url(path), options])
        return name

    def events(self, name, *types):
        events = self.page.evaluate("name => window.events[name]", name)
        return [e for e in events if not types or e["type"] in types]

    def wait(self, name, condition, timeout, message):
        try:
            return wait_until(lambda: condition(self.events(name)), timeout, message, 0.1)
        except AssertionError as exc:  # say what the client did meanwhile
            raise AssertionError(f"{exc}: {[self.brief(e) for e in self.events(name)]}") from None

    @staticmethod
    def brief(event):
        return {k: v for k, v in event.items() if k in ("type", "state", "code", "reason", "error")}

    def wait_open(self, name, times=1, timeout=15):
        self.wait(name, lambda ev: count(ev, "open") >= times, timeout, f"{name}: not open")

    def send(self, name, *messages):
        """Send each message at once, in one task; return what send() returned for each."""
        return self.page.evaluate(
            "([name, messages]) => messages.map(m => window.sockets[name].send(m))",
            [name, messages],
        )

    def texts(self, name):
        return [e["frame"]["text"] for e in self.events(name, "message")]

    def close(self):
        self.context.close()


def count(events, kind):
    return sum(e["type"] == kind for e in events)


def states(events):
    return [(e["state"], e["code"]) for e in events if e["type"] == "statechange"]


def announce(stack, session, text):
    """POST /announce/ as the demo user; return the id the history gave it."""
    response = stack.csrf_post(session, "/announce/", json={"text": text})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def daphne_answers(port):
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
    except requests.RequestException:
        return False


def test_the_demo_page_has_no_socket_logic_of_its_own():
    """Every socket of demo.js is a RealtimeSocket; backoff and close codes live in the module."""
    demo = (STATIC / "demo.js").read_text()
    assert 'from "./realtime.js"' in demo
    for socket_logic in ("new WebSocket", "setTimeout", "onclose", "since=", "Math.random"):
        assert socket_logic not in demo, socket_logic


def test_the_panel_shows_what_each_socket_brought(browser, stack):
    """
    The demo panel's columns from each whoami frame: cross-domain, no cookie of the app host
    reaches the realtime host, whichever way the socket was opened; the Origin is the app's.
    """
    context = new_context(browser, stack)
    page = context.new_page()
    log_in(page, stack)
    rows = socket_rows(page)
    assert [state for _, _, state in rows] == ["ok"] * 5
    shown = page.eval_on_selector_all(
        "#sockets tbody tr",
        "rows => rows.map(r => [r.querySelector('.cookies').textContent,"
        " r.querySelector('.origin').textContent])",
    )
    assert shown == [["none", stack.app_origin]] * 5
    context.close()


def test_a_restart_reconnects_soon_with_a_fresh_ticket_and_misses_nothing(browser, stack):
    """
    Announcements go out at 10/s while each Daphne process is restarted in turn (supervisorctl
    restart: SIGTERM, so 1012). The socket reconnects within restartDelay (1 s), each time with
    a ticket of its own and ?since=<the last id it saw>, and ends with every announcement once,
    in order.
    """
    client = ClientPage(browser, stack)
    live = client.start("live")
    client.wait_open(live)
    session, _ = stack.login()
    sent = []  # (text, id) of each announcement
    failed = []
    stop = threading.Event()

    def announcer():
        try:
            while not stop.is_set():
                text = f"r{len(sent)}"
                sent.append((text, announce(stack, session, text)))
                time.sleep(0.1)
        except BaseException as exc:  # seen by the test, not lost in the thread
            failed.append(exc)

    thread = threading.Thread(target=announcer)
    thread.start()
    try:
        time.sleep(0.5)
        for program, port in zip(stack.daphne_programs, stack.daphne_ports, strict=True):
            stack.supervisorctl("restart", program)
            wait_until(lambda p=port: daphne_answers(p), 15, f"{program} did not come back")
        client.wait(live, lambda ev: count(ev, "close") >= 1, 10, "no close seen")
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    assert failed == [] and len(sent) > 10
    last_id = sent[-1][1]
    client.wait(
        live,
        lambda ev: any(e["type"] == "message" and e["frame"]["id"] == last_id for e in ev),
        15,
        "the last announcement never arrived",
    )
    events = client.events(live)
    received = [(e["frame"]["text"], e["frame"]["id"]) for e in events if e["type"] == "message"]
    assert received == sent  # once each, in order, none lost while reconnecting

    closes = [e for e in events if e["type"] == "close"]
    assert closes and {e["code"] for e in closes} == {1012}
    # Each 1012 is followed by a reconnect within 1 s, then straight to open: no failed try.
    after_close = states(events)
    assert after_close.count(("reconnecting", 1012)) == len(closes)
    for e in events:
        if e["type"] == "statechange" and e["state"] == "reconnecting":
            assert 0 <= e["delay"] < 1000, e
    assert [s for s, _ in after_close] == ["connecting", "open"] + [
        "reconnecting",
        "connecting",
        "open",
    ] * len(closes)
    # Each reconnect asked for what came after the last id it had seen, in the URL; the
    # ticket went in the header, masked in what the page is shown.
    last_seen = None
    for e in events:
        if e["type"] == "message":
            last_seen = e["frame"]["id"]
        if e["type"] == "open":
            url, protocols = e["endpoint"]["url"], e["endpoint"]["protocols"]
            assert protocols == ["realtime", "ticket.***"] and "ticket" not in url
            assert url.endswith("/ws/live/" if last_seen is None else f"?since={last_seen}")
    # A fresh ticket for every connection, none reused, none on the console.
    assert len(client.tickets) == count(events, "open") == len(set(client.tickets))
    assert not any(t in line for t in client.tickets for line in client.console)
    client.close()


def test_a_logout_in_another_tab_ends_the_session_and_stops_reconnecting(browser, stack):
    """
    Logging out in another tab closes the socket with 4401: session-ended, state "ended", and
    no reconnect. A socket started after the logout is refused its ticket (403): session-ended
    too, without a handshake.
    """
    client = ClientPage(browser, stack)
    live = client.start("live")
    client.wait_open(live)
    other = client.context.new_page()  # another tab: same browser, same cookie
    other.goto(f"{stack.app_origin}/")
    other.click("text=Log out")
    client.wait(live, lambda ev: count(ev, "session-ended"), 5, "no session-ended event")
    minted = len(client.tickets)

    late = client.start("late")
    client.wait(late, lambda ev: count(ev, "session-ended"), 5, "no session-ended event")
    # Longer than any retry after a close would wait (at most baseDelay, 0.5 s, the first time).
    time.sleep(2)
    events = client.events(live)
    assert [(e["type"], e.get("code")) for e in events[-3:]] == [
        ("close", 4401),
        ("statechange", 4401),
        ("session-ended", 4401),
    ]
    assert events[-2]["state"] == "ended"
    assert states(events)[-1] == ("ended", 4401)
    assert count(events, "open") == 1  # no reconnect

    late_events = client.events(late)
    assert count(late_events, "open") + count(late_events, "close") == 0  # no handshake at all
    assert late_events[-1]["type"] == "session-ended"
    assert late_events[-1]["reason"] == "ticket refused (403)"
    assert states(late_events) == [("connecting", None), ("ended", None)]
    assert len(client.tickets) == minted  # nothing minted since, and no ticket retried
    client.close()


def test_a_flood_is_closed_with_4429_and_backs_off_longer(browser, stack):
    """
    WS_MESSAGE_RATE=1, WS_MESSAGE_BURST=3: the fourth message at once closes the socket with
    4429. The client waits at least slowDownDelay (3 s here) before its next handshake, where
    any other close would have waited at most baseDelay (0.5 s), then connects again.
    """
    client = ClientPage(browser, stack)
    flood = client.start("flood", slowDownDelay=SLOW_DOWN)
    client.wait_open(flood)
    assert client.send(flood, *({"text": f"flood {n}"} for n in range(6))) == [True] * 6
    client.wait_open(flood, times=2, timeout=SLOW_DOWN / 1000 * 2 + 10)
    events = client.events(flood)
    (closed,) = client.events(flood, "close")
    assert closed["code"] == 4429
    (waiting,) = [e for e in events if e["type"] == "statechange" and e["state"] == "reconnecting"]
    assert waiting["code"] == 4429 and SLOW_DOWN <= waiting["delay"] < 2 * SLOW_DOWN
    reconnected = next(e for e in events if e["type"] == "statechange" and e["at"] > waiting["at"])
    assert reconnected["state"] == "connecting"
    assert reconnected["at"] - closed["at"] >= SLOW_DOWN - 1  # it really waited (1 ms: rounding)
    # The burst got through, and nothing after it: the server closed at the fourth.
    recorded = redis.Redis(port=stack.redis_port).xrange("history:live")
    texts = [json.loads(fields[b"event"])["text"] for _, fields in recorded]
    assert [t for t in texts if t.startswith("flood")] == ["flood 0", "flood 1", "flood 2"]
    client.close()


def test_a_message_too_big_is_reported_and_the_socket_comes_back(browser, stack):
    """
    A message over WS_MAX_MESSAGE_SIZE (64 KiB): the server closes with 1009; the client
    dispatches too-big with the server's reason, then reconnects and works again.
    """
    client = ClientPage(browser, stack)
    big = client.start("big")
    client.wait_open(big)
    assert client.send(big, {"text": "x" * 100_000}) == [True]
    client.wait_open(big, times=2)
    events = client.events(big)
    kinds = [e["type"] for e in events if e["type"] in ("close", "too-big", "open")]
    assert kinds == ["open", "close", "too-big", "open"]
    (too_big,) = client.events(big, "too-big")
    assert too_big["code"] == 1009
    assert "exceeds payload limit of 65536 octets" in too_big["reason"]
    assert ("reconnecting", 1009) in states(events)
    session, _ = stack.login()
    announce(stack, session, "after too big")
    client.wait(big, lambda ev: count(ev, "message"), 10, "the reconnected socket got nothing")
    assert client.texts(big) == ["after too big"]
    client.close()


def test_the_delays_are_jittered_and_capped(browser, stack):
    """reconnectDelay, as the served module computes it: spread out, within its bounds."""
    client = ClientPage(browser, stack)
    samples = client.page.evaluate(
        """async () => {
          const m = await import("/static/wsgi_site/realtime.js");
          const draw = (code, attempt) =>
            Array.from({ length: 200 }, () => m.reconnectDelay(code, attempt, m.DEFAULTS));
          return { restart: draw(1012, 5), first: draw(1006, 0), fourth: draw(1006, 3),
                   capped: draw(1006, 30), flood: draw(4429, 0) };
        }"""
    )
    bounds = {
        "restart": (0, 1000),
        "first": (250, 500),
        "fourth": (2000, 4000),
        "capped": (15000, 30000),
        "flood": (15000, 30000),
    }
    for name, (low, high) in bounds.items():
        values = samples[name]
        assert all(low <= v <= high for v in values), name
        assert len(set(values)) > 150 and max(values) - min(values) > (high - low) / 2, name
    client.close()


def test_messages_missed_beyond_the_history_are_a_gap(browser, stack):
    """
    WS_HISTORY_MAX=5: with both Daphne processes stopped, 250 announcements go out; the
    socket reconnects with ?since=<the last id it saw>, gets a gap event, then what the
    history still holds, in order, then live messages. (Last: it leaves the history full.)
    """
    client = ClientPage(browser, stack)
    live = client.start("live", maxDelay=2000)
    client.wait_open(live)
    session, _ = stack.login()
    seen_id = announce(stack, session, "seen")
    client.wait(live, lambda ev: count(ev, "message"), 10, "the first announcement never came")
    stack.supervisorctl("stop", *stack.daphne_programs)
    try:
        for n in range(250):
            announce(stack, session, f"bulk {n}")
        kept = redis.Redis(port=stack.redis_port).xlen("history:live")
    finally:
        stack.supervisorctl("start", *stack.daphne_programs)
    assert 5 <= kept < 250, kept
    client.wait(live, lambda ev: count(ev, "gap"), 20, "no gap event after reconnecting")
    client.wait(live, lambda ev: count(ev, "message") >= 1 + kept, 10, "what is kept never came")
    announce(stack, session, "live")
    client.wait(live, lambda ev: count(ev, "message") >= 2 + kept, 10, "no live message after")
    events = client.events(live)
    gap_at = next(n for n, e in enumerate(events) if e["type"] == "gap")
    opened = [n for n, e in enumerate(events) if e["type"] == "open"]
    assert events[opened[-1]]["endpoint"]["url"].endswith(f"?since={seen_id}")
    assert opened[-1] < gap_at  # the gap came on the reconnected socket, first
    after = [e["frame"]["text"] for e in events[gap_at:] if e["type"] == "message"]
    assert after == [f"bulk {n}" for n in range(250 - kept, 250)] + ["live"]
    assert client.texts(live)[0] == "seen"
    client.close()
