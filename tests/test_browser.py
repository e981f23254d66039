"""The walkthrough in a real browser: Debian's Chromium driven by Playwright."""

import http.server
import threading

import pytest
from playwright.sync_api import sync_playwright

from tests.stack import DEMO_PASSWORD, DEMO_USER, Stack, wait_until

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Any name resolves to loopback (www.evil.test too), with real cookie and Origin rules.
    "--host-resolver-rules=MAP * 127.0.0.1",
]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def own_stack(tmp_path):
    """A cross-domain stack for one test that breaks it (its Daphne processes killed)."""
    with Stack("cross-domain", tmp_path) as stack:
        yield stack
    assert stack.leftover_processes() == []
    stack.assert_no_secrets_logged()


def new_context(browser, stack):
    """A browser context whose tickets (minted by the page itself) join stack.secrets."""
    context = browser.new_context()

    def keep_ticket(response):
        if response.url.endswith("/ws-ticket/") and response.ok:
            stack.secrets.add(response.json()["ticket"])

    context.on("response", keep_ticket)
    return context


def new_page(browser, stack):
    return new_context(browser, stack).new_page()


def log_in(page, stack):
    page.goto(f"{stack.app_origin}/accounts/login/")
    page.fill("input[name=username]", DEMO_USER)
    page.fill("input[name=password]", DEMO_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.app_origin}/")
    stack.secrets.add(session_cookie(page, stack))


def session_cookie(page, stack):
    (cookie,) = [c for c in page.context.cookies(stack.app_origin) if c["name"] == "sessionid"]
    return cookie["value"]


def socket_rows(page):
    """Wait until every row has an answer; return (name, result, state) for each."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('#sockets tbody tr')]"
        ".every(row => row.dataset.state !== 'pending')",
        timeout=15000,
    )
    return [
        tuple(row)
        for row in page.eval_on_selector_all(
            "#sockets tbody tr",
            "rows => rows.map(r => [r.querySelector('.name').textContent,"
            " r.querySelector('.result').textContent, r.dataset.state])",
        )
    ]


def feed_after_posting(page, text, via):
    """Post `text` (over HTTP or on the socket); return the feed's answer, the text or an error."""
    page.wait_for_selector("#live-status:text('connected')")
    count = page.eval_on_selector_all("#feed li", "items => items.length")
    page.fill("#live-form input[name=text]", text)
    page.click(f"#live-form button[value={via}]")
    # The first new item that carries the text, or an error ("error: login required").
    handle = page.wait_for_function(
        """([count, text]) => [...document.querySelectorAll('#feed li')].slice(count)
            .map(li => li.textContent)
            .find(t => t.includes(text) || t.startsWith('error') || t.startsWith('announce failed'))
        """,
        arg=[count, text],
        timeout=10000,
    )
    return handle.json_value()


def test_cross_domain_panel(browser, cross_stack):
    page = new_page(browser, cross_stack)
    page.goto(f"{cross_stack.app_origin}/")
    assert socket_rows(page) == [("Realtime host, cookie only", "anonymous", "ok")]
    known = set(cross_stack.secrets)
    log_in(page, cross_stack)
    assert page.text_content("#http-user") == "You are demo."
    assert socket_rows(page) == [
        ("Realtime host, cookie only", "anonymous", "ok"),
        ("Ticket in Sec-WebSocket-Protocol (recommended)", "demo (auth: ticket)", "ok"),
        ("Ticket in the query string", "demo (auth: ticket)", "ok"),
        ("Session key in the query string (?session_key=)", "demo (auth: session_key)", "ok"),
        ("Session key in Sec-WebSocket-Protocol", "demo (auth: session_key)", "ok"),
    ]
    # The tickets the page minted (two rows, the live feed) joined the secrets, with the cookie.
    page.wait_for_selector("#live-status:text('connected')")
    assert len(cross_stack.secrets - known) >= 4
    # The page shows where each credential travels, never the credential itself.
    shown = page.text_content("#sockets")
    assert "?ticket=***" in shown and "Sec-WebSocket-Protocol: realtime, ticket.***" in shown
    assert "?session_key=***" in shown and "realtime, session_key.***" in shown
    assert not any(
        secret in shown for secret in cross_stack.secrets | {session_cookie(page, cross_stack)}
    )
    assert feed_after_posting(page, "over http", "http") == "announcement from demo: over http"
    assert feed_after_posting(page, "on the socket", "socket") == "message from demo: on the socket"
    page.close()


def test_same_domain_panel(browser, same_stack):
    page = new_page(browser, same_stack)
    log_in(page, same_stack)
    assert socket_rows(page) == [
        ("Through nginx: /ws/ on the app host", "demo (auth: cookie)", "ok"),
        ("Straight to Daphne: same host, its own port", "demo (auth: cookie)", "ok"),
    ]
    assert feed_after_posting(page, "same domain", "http") == "announcement from demo: same domain"
    page.close()


FOREIGN_PAGE = """<!doctype html><title>pending</title><script>
const ws = new WebSocket("%s");
ws.onmessage = (e) => { document.title = "open: " + e.data; };
ws.onclose = (e) => { if (document.title === "pending") document.title = "closed " + e.code; };
</script>"""


def test_page_on_a_foreign_domain_is_refused(browser, cross_stack):
    session, key = cross_stack.login()
    url = cross_stack.ws_url(f"/ws/whoami/?session_key={key}")

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (FOREIGN_PAGE % url).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    access_log = cross_stack.state_dir / "log" / "nginx-access.log"
    logged_before = access_log.stat().st_size
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = new_page(browser, cross_stack)
        page.goto(f"http://www.evil.test:{server.server_address[1]}/")
        page.wait_for_function("document.title !== 'pending'", timeout=10000)
        # Even holding a valid key, a foreign page gets no socket: the handshake is refused.
        assert page.title() == "closed 1006"
        page.close()
    finally:
        server.shutdown()

    def refused_and_logged():  # this test's handshake, not an earlier test's
        with access_log.open("rb") as log:
            log.seek(logged_before)
            return '"GET /ws/whoami/ HTTP/1.1" 403' in log.read().decode(errors="replace")

    wait_until(refused_and_logged, 5, "nginx logged no refused handshake")


def test_logout_in_another_tab_closes_this_tabs_sockets(browser, cross_stack):
    context = new_context(browser, cross_stack)
    first = context.new_page()
    log_in(first, cross_stack)
    socket_rows(first)
    first.wait_for_selector("#live-status:text('connected')")
    second = context.new_page()  # another tab: same browser, same cookie
    second.goto(f"{cross_stack.app_origin}/")
    second.click("text=Log out")
    first.wait_for_selector("#live-status:has-text('close code 4401')", timeout=5000)
    assert first.text_content("#live-status") == (
        "closed (close code 4401): your session ended, log in again"
    )
    # Each socket's close arrives on its own, from either Daphne process: wait for the four.
    first.wait_for_function(
        "() => document.querySelectorAll('#sockets tbody tr[data-closed]').length >= 4",
        timeout=5000,
    )
    closed = first.eval_on_selector_all(
        "#sockets tbody tr", "rows => rows.map(r => r.dataset.closed)"
    )
    # The cookie-only row was anonymous: nothing to end. Every logged-in row ended with 4401.
    assert closed == [None, "4401", "4401", "4401", "4401"]
    assert "session ended (close code 4401)" in first.text_content("#sockets")
    context.close()


def test_live_feed_reconnects_with_a_fresh_ticket_when_daphne_dies(browser, own_stack):
    """
    Both Daphne processes SIGKILLed (on a stack of this test's own): the page's live feed
    reconnects, and with a fresh ticket, so logged in: announcements reach anonymous sockets
    too, but only a logged-in socket may send, so its own message proves who it is.
    """
    stack = own_stack
    context = new_context(browser, stack)
    page = context.new_page()
    minted = []
    page.on("response", lambda r: r.url.endswith("/ws-ticket/") and minted.append(r.status))
    log_in(page, stack)
    page.wait_for_selector("#live-status:text('connected')")
    assert feed_after_posting(page, "before", "socket") == "message from demo: before"
    tickets_before = len(minted)
    # SIGKILL both Daphne processes; supervisord starts them again, the page reconnects.
    stack.supervisorctl("signal", "KILL", *stack.daphne_programs)
    page.wait_for_selector("#live-status:has-text('reconnecting')", timeout=10000)
    page.wait_for_selector("#live-status:text('connected')", timeout=20000)
    assert len(minted) > tickets_before and set(minted) == {200}  # a fresh ticket, minted
    assert (
        feed_after_posting(page, "after restart", "http") == "announcement from demo: after restart"
    )
    assert feed_after_posting(page, "on the socket", "socket") == "message from demo: on the socket"
    context.close()
