"""
HTTPS end to end (PUBLIC_SCHEME=https) in all three topologies: the native runtime's own
CA and certificate, nginx's TLS, redirect and HSTS, Secure cookies, wss:// sockets and
https:// origins; Python clients that verify the certificate, and Chromium that trusts
this stack's certificate alone.
"""

import datetime
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys

import pytest
import requests
import trustme
from cryptography import x509
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.test import RequestFactory
from playwright.sync_api import sync_playwright

from deploy.certs import ensure_certificate, spki_hash
from shared_settings.topology import Topology
from tests.stack import DEMO_PASSWORD, DEMO_USER, ROOT, Stack
from tests.test_browser import CHROMIUM_ARGS, log_in, new_context, socket_rows
from wsgi_site import views

MODES = ["cross-domain", "same-domain", "subdomain"]
HSTS = "max-age=31536000"
# What each topology's panel shows once logged in, every row as expected.
PANEL = {
    "cross-domain": [
        ("Realtime host, cookie only", "anonymous", "ok"),
        ("Ticket in Sec-WebSocket-Protocol (recommended)", "demo (auth: ticket)", "ok"),
        ("Ticket in the query string", "demo (auth: ticket)", "ok"),
        ("Session key in the query string (?session_key=)", "demo (auth: session_key)", "ok"),
        ("Session key in Sec-WebSocket-Protocol", "demo (auth: session_key)", "ok"),
    ],
    # Daphne's own port speaks plain ws://, which an https:// page may not open: no such row.
    "same-domain": [("Through nginx: /ws/ on the app host", "demo (auth: cookie)", "ok")],
    "subdomain": [("Realtime subdomain, cookie for .split.localhost", "demo (auth: cookie)", "ok")],
}
SCREENSHOTS, COMMITTED = ROOT / "var" / "screenshots", ROOT / "docs" / "screenshots"


@pytest.fixture(scope="module", params=MODES)
def stack(request, tmp_path_factory):
    """One HTTPS stack per topology, one at a time, shared by this module's tests."""
    mode = request.param
    with Stack(mode, tmp_path_factory.mktemp(mode), asgi_processes=1, scheme="https") as stack:
        yield stack
    assert stack.leftover_processes() == []
    stack.assert_no_secrets_logged()


def post_login(stack, headers=None):
    """POST the login form (no Origin or Referer unless given); return session and response."""
    session = requests.Session()
    page = stack.http(session, "GET", "/accounts/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    response = stack.http(
        session,
        "POST",
        "/accounts/login/",
        data={"username": DEMO_USER, "password": DEMO_PASSWORD, "csrfmiddlewaretoken": token},
        headers=headers or {},
    )
    if "sessionid" in session.cookies:
        stack.secrets.add(session.cookies["sessionid"])
    return session, response


def set_cookies(response):
    """The Set-Cookie headers of a response, by cookie name, as raw text."""
    raw = response.raw.headers.getlist("Set-Cookie")
    return {line.split("=", 1)[0]: line for line in raw}


def cookie_header(session, url):
    """The Cookie header the session's jar would send to `url`: a browser's domain rules."""
    prepared = requests.Request("GET", url).prepare()
    prepared.prepare_cookies(session.cookies)
    return prepared.headers.get("Cookie")


# Python clients: they verify the certificate against this stack's CA.


def test_login_over_https_sets_secure_cookies_and_hsts(stack):
    session, response = post_login(stack, {"Referer": f"{stack.app_origin}/accounts/login/"})
    assert response.status_code == 302
    cookies = set_cookies(response)
    assert {"sessionid", "csrftoken"} <= set(cookies)
    for name in ("sessionid", "csrftoken"):
        assert "; Secure" in cookies[name], cookies[name]
    assert "; HttpOnly" in cookies["sessionid"]
    if stack.mode == "subdomain":
        assert "Domain=.split.localhost" in cookies["sessionid"]
        assert "Domain" not in cookies["csrftoken"]  # the CSRF cookie stays on the app host
    else:
        assert "Domain" not in cookies["sessionid"]
    assert response.headers["Strict-Transport-Security"] == HSTS
    page = stack.http(session, "GET", "/")
    assert "You are <strong>demo</strong>" in page.text
    assert page.headers["Strict-Transport-Security"] == HSTS
    health = stack.http(session, "GET", "/ws/healthz", host=stack.realtime_host)
    assert health.status_code == 200
    assert health.headers["Strict-Transport-Security"] == HSTS


def test_the_certificate_is_verified_against_this_stacks_ca_only(stack, tmp_path):
    session = requests.Session()
    assert stack.http(session, "GET", "/healthz").status_code == 200  # the stack's CA
    with pytest.raises(requests.exceptions.SSLError):
        stack.http(session, "GET", "/healthz", verify=True)  # the system's CAs
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(requests.exceptions.SSLError):
        stack.http(session, "GET", "/healthz", verify=str(other))
    # The certificate names our hosts, not the address we connect to.
    with pytest.raises(requests.exceptions.SSLError):
        stack.http(session, "GET", "/healthz", host="127.0.0.1", verify=str(stack.ca_file))


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3", "TLSv1_1"])
def test_tls_1_2_and_1_3_only(stack, version):
    context = ssl.create_default_context(cafile=stack.ca_file)
    context.minimum_version = context.maximum_version = ssl.TLSVersion[version]
    if version == "TLSv1_1":
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that this client offers it at all
        # nginx answers with an alert (this client did offer it: not NO_PROTOCOLS_AVAILABLE).
        with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"), socket_to(stack) as raw:
            context.wrap_socket(raw, server_hostname=stack.app_host)
        return
    with socket_to(stack) as raw, context.wrap_socket(raw, server_hostname=stack.app_host) as tls:
        assert tls.version() == version.replace("_", ".")


def socket_to(stack):
    return socket.create_connection(("127.0.0.1", stack.public_port), timeout=5)


@pytest.mark.parametrize("host", ["app", "realtime"])
def test_plain_http_redirects_to_https(stack, host):
    name = stack.app_host if host == "app" else stack.realtime_host
    url = f"http://127.0.0.1:{stack.http_port}/accounts/login/?next=/"
    plain = requests.get(url, headers={"Host": name}, allow_redirects=False, timeout=5)
    assert plain.status_code == 301
    assert plain.headers["Location"] == f"https://{name}:{stack.public_port}/accounts/login/?next=/"
    # A client's own X-Forwarded-Proto changes nothing: plain HTTP never reaches Django.
    spoofed = requests.get(
        url,
        headers={"Host": name, "X-Forwarded-Proto": "https"},
        allow_redirects=False,
        timeout=5,
    )
    assert spoofed.status_code == 301
    unknown = requests.get(url, headers={"Host": "unknown.test"}, allow_redirects=False, timeout=5)
    assert unknown.status_code == 404  # no redirect for a host we do not serve


def test_a_handshake_over_plain_http_is_redirected_not_upgraded(stack):
    handshake = {
        "Host": f"{stack.realtime_host}:{stack.http_port}",
        "Origin": stack.app_origin,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    url = f"http://127.0.0.1:{stack.http_port}/ws/whoami/"
    answer = requests.get(url, headers=handshake, allow_redirects=False, timeout=5)
    assert answer.status_code == 301
    assert answer.headers["Location"] == f"{stack.realtime_origin}/ws/whoami/"


def test_sockets_are_wss_with_the_https_origin(stack):
    session, key = stack.login()
    known = {"user": "demo", "authenticated": True}
    if stack.mode == "cross-domain":
        # The cookie stays on the app host; tickets and session keys bring the user.
        assert cookie_header(session, stack.ws_url("/", stack.realtime_host)) is None
        frame = stack.whoami()
        assert (frame["authenticated"], frame["cookies"]) == (False, [])
        ticket = stack.ticket(session)
        frame = stack.whoami(subprotocols=["realtime", f"ticket.{ticket}"])
        assert frame | known == frame and frame["auth"] == "ticket"
        assert stack.whoami(query=f"session_key={key}")["auth"] == "session_key"
    else:
        # The browser's own rules: the jar sends the cookie to the socket host.
        https_url = f"https://{stack.realtime_host}:{stack.public_port}/ws/whoami/"
        cookie = cookie_header(session, https_url)
        assert cookie and f"sessionid={key}" in cookie
        frame = stack.whoami(cookie=cookie)
        assert frame | known == frame and frame["auth"] == "cookie"
        assert "sessionid" in frame["cookies"]
    assert frame["origin"] == stack.app_origin
    assert frame["origin"].startswith("https://")
    # The http:// origin of the same host and port is another origin: refused.
    http_origin = stack.app_origin.replace("https://", "http://")
    assert stack.whoami(origin=http_origin, cookie=f"sessionid={key}") == 403


# Django's CSRF check demands a Referer on a request it believes secure (with no Origin), and
# not otherwise: a login POST with neither tells which scheme Django believes.


def test_a_clients_forwarded_proto_does_not_make_https_look_plain(stack):
    """Over HTTPS nginx replaces a client's "X-Forwarded-Proto: http": Django still sees a
    secure request, and refuses the POST that has no Referer (403), then takes it with one."""
    claim = {"X-Forwarded-Proto": "http"}
    assert post_login(stack, claim)[1].status_code == 403
    referer = {"Referer": f"{stack.app_origin}/accounts/login/"}
    session, response = post_login(stack, claim | referer)
    assert response.status_code == 302
    assert "; Secure" in set_cookies(response)["sessionid"]


def test_a_clients_forwarded_proto_does_not_make_plain_http_look_secure(cross_stack):
    """On a plain-HTTP stack a client claiming HTTPS, in any header Gunicorn knows, is not
    believed: Django sees plain HTTP and asks for no Referer (believed, it would answer 403)."""
    claim = {"X-Forwarded-Proto": "https", "X-Forwarded-Ssl": "on", "X-Forwarded-Protocol": "ssl"}
    session, response = post_login(cross_stack, claim)
    assert response.status_code == 302, response.status_code
    assert "Secure" not in set_cookies(response)["sessionid"]


# Chromium, trusting this stack's certificate alone (its SPKI hash), no blanket ignore.


@pytest.fixture(scope="module")
def chromium(stack):
    spki = spki_hash(stack.state_dir / "tls" / "cert.pem")
    with sync_playwright() as p:
        args = [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki}"]
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        yield browser
        browser.close()


def test_browser_walkthrough_over_https(chromium, stack):
    context = new_context(chromium, stack)
    page = context.new_page()
    sockets, frames = [], []

    def watch(ws):
        sockets.append(ws.url)
        ws.on("framereceived", lambda payload: frames.append(payload))

    page.on("websocket", watch)
    # Typed as http://: nginx redirects (301) to HTTPS, before HSTS is known to this context.
    response = page.goto(f"http://{stack.app_host}:{stack.http_port}/")
    assert page.url == f"{stack.app_origin}/"
    assert response.request.redirected_from.response().status == 301
    assert response.headers["strict-transport-security"] == HSTS
    log_in(page, stack)
    assert socket_rows(page) == PANEL[stack.mode]
    page.wait_for_selector("#live-status:text('connected')")
    cookies = {c["name"]: c for c in context.cookies(stack.app_origin)}
    assert cookies["sessionid"]["secure"] and cookies["csrftoken"]["secure"]
    assert cookies["sessionid"]["httpOnly"]
    if stack.mode == "subdomain":
        assert cookies["sessionid"]["domain"] == ".split.localhost"
    # Every socket the page opened is wss://, and the server saw the https:// origin.
    assert sockets and all(url.startswith("wss://") for url in sockets), sockets
    whoamis = [json.loads(f) for f in frames if isinstance(f, str) and '"whoami"' in f]
    assert whoamis and {w["origin"] for w in whoamis} == {stack.app_origin}
    cookie_seen = any("sessionid" in w["cookies"] for w in whoamis)
    assert cookie_seen is (stack.mode != "cross-domain")
    save_screenshot(page, stack.mode)
    context.close()


def save_screenshot(page, mode):
    """
    Save the panel as var/screenshots/<mode>.png; copy it to docs/screenshots/ (for the
    README) only when the panel's visible text changed, so ports that differ per run never
    churn the committed image.
    """
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    image = SCREENSHOTS / f"{mode}.png"
    page.screenshot(path=str(image), full_page=True)
    text = re.sub(r":\d{2,5}\b", ":PORT", page.inner_text("body")).strip() + "\n"
    (SCREENSHOTS / f"{mode}.txt").write_text(text)
    committed = COMMITTED / f"{mode}.txt"
    if not committed.exists() or committed.read_text() != text:
        COMMITTED.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, COMMITTED / f"{mode}.png")
        committed.write_text(text)


# A certificate of the user's own.


def test_own_certificate_is_served_and_no_ca_is_made(tmp_path):
    ca = trustme.CA(organization_name="Someone else's CA")
    now = datetime.datetime.now(datetime.UTC)
    leaf = ca.issue_cert(
        "app.localhost", "realtime.localhost", not_after=now + datetime.timedelta(days=30)
    )
    cert, key, ca_file = tmp_path / "own.pem", tmp_path / "own-key.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    env = {"TLS_CERT_FILE": cert, "TLS_KEY_FILE": key}
    state = tmp_path / "state"
    with Stack("cross-domain", state, asgi_processes=1, scheme="https", env=env) as stack:
        assert not (state / "tls").exists()
        session = requests.Session()
        answer = stack.http(session, "GET", "/healthz", verify=str(ca_file))
        assert answer.status_code == 200
        output = "".join(stack.output)
        assert f"your certificate {cert}" in output
    assert stack.leftover_processes() == []


def test_half_a_certificate_is_refused_with_a_message(tmp_path):
    env = {
        "SPLIT_MODE": "cross-domain",
        "PUBLIC_SCHEME": "https",
        "TLS_CERT_FILE": str(tmp_path / "x.pem"),
        "STATE_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-c", "import shared_settings.topology"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "Set both TLS_CERT_FILE and TLS_KEY_FILE, or neither." in result.stderr


# The subdomain topology and the checks on its cookie domain (no stack needed).


def test_subdomain_defaults_scope_the_cookie_to_the_parent_domain():
    topology = Topology.from_env({"SPLIT_MODE": "subdomain", "PUBLIC_SCHEME": "https"})
    assert (topology.app_host, topology.realtime_host) == (
        "app.split.localhost",
        "rt.split.localhost",
    )
    assert topology.cookie_domain == ".split.localhost"
    assert topology.app_origin == "https://app.split.localhost:8443"
    assert topology.socket_base == "wss://rt.split.localhost:8443"
    assert (topology.public_port, topology.public_http_port) == (8443, 8000)
    assert not topology.cross_domain and topology.realtime_apart
    production = {
        "SPLIT_MODE": "subdomain",
        "APP_HOST": "www.example.com",
        "REALTIME_HOST": "rt.example.com",
        "PUBLIC_SCHEME": "https",
        "PUBLIC_PORT": "443",
    }
    topology = Topology.from_env(production)
    assert topology.cookie_domain == ".example.com"
    assert (topology.app_origin, topology.public_http_port) == ("https://www.example.com", 80)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SPLIT_MODE": "cross-domain", "APP_HOST": "app.split.localhost",
             "REALTIME_HOST": "rt.split.localhost", "SESSION_COOKIE_DOMAIN": ".split.localhost"},
            "that is SPLIT_MODE=subdomain",
        ),
        (
            {"SPLIT_MODE": "subdomain", "REALTIME_HOST": "realtime.localhost"},
            "does not cover REALTIME_HOST=realtime.localhost",
        ),
        (
            {"SPLIT_MODE": "subdomain", "SESSION_COOKIE_DOMAIN": ".example.com"},
            "does not cover APP_HOST=app.split.localhost",
        ),
        (
            {"SPLIT_MODE": "subdomain", "REALTIME_HOST": "app.split.localhost"},
            "that is SPLIT_MODE=same-domain",
        ),
        (
            {"SPLIT_MODE": "subdomain", "APP_HOST": "example.com",
             "REALTIME_HOST": "rt.example.com"},
            "SESSION_COOKIE_DOMAIN=.com is a single label",
        ),
        (
            {"SPLIT_MODE": "subdomain", "APP_HOST": "app.localhost",
             "REALTIME_HOST": "rt.localhost"},
            "SESSION_COOKIE_DOMAIN=.localhost is a single label",
        ),
        ({"PUBLIC_SCHEME": "ftp"}, "PUBLIC_SCHEME='ftp' is not one of http, https."),
    ],
)  # fmt: skip
def test_a_cookie_domain_that_contradicts_the_mode_is_refused(env, message):
    with pytest.raises(ImproperlyConfigured, match=re.escape(message)):
        Topology.from_env(env)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SPLIT_MODE": "subdomain"}, [("Realtime subdomain, cookie for .split.localhost", "you")]),
        (
            {"SPLIT_MODE": "same-domain"},
            [("Through nginx: /ws/ on the app host", "you"),
             ("Straight to Daphne: same host, its own port", "you")],
        ),
        # Over HTTPS an https:// page may not open Daphne's plain ws:// port.
        (
            {"SPLIT_MODE": "same-domain", "PUBLIC_SCHEME": "https"},
            [("Through nginx: /ws/ on the app host", "you")],
        ),
    ],
)  # fmt: skip
def test_the_panel_expects_the_cookie_where_it_arrives(settings, alice, env, expected):
    settings.TOPOLOGY = Topology.from_env(env)
    settings.DEMO_DIRECT_DAPHNE = True
    request = RequestFactory().get("/")
    request.user = get_user_model().objects.get(username="alice")
    request.session = alice.session
    rows = views.socket_rows(request)
    assert [(row["name"], row["expect"]) for row in rows] == expected
    assert all(row["url"].startswith(f"{settings.TOPOLOGY.ws_scheme}://") for row in rows)


def test_the_ca_is_kept_and_the_certificate_follows_the_hosts(tmp_path):
    """A browser told to trust the CA keeps trusting it: only the certificate is made again."""
    env = {"SPLIT_MODE": "cross-domain", "PUBLIC_SCHEME": "https", "STATE_DIR": str(tmp_path)}
    first = Topology.from_env(env)
    ca_file = ensure_certificate(first)
    ca, cert = ca_file.read_bytes(), first.tls_certificate.read_bytes()
    assert oct(first.tls_key.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "tls" / "ca-key.pem").stat().st_mode & 0o777) == "0o600"
    assert ensure_certificate(first) == ca_file and first.tls_certificate.read_bytes() == cert
    moved = Topology.from_env({**env, "REALTIME_HOST": "sockets.localhost"})
    ensure_certificate(moved)
    assert ca_file.read_bytes() == ca and moved.tls_certificate.read_bytes() != cert
    context = ssl.create_default_context(cafile=ca_file)
    context.load_cert_chain(moved.tls_certificate, moved.tls_key)  # the key fits the certificate
    leaf = x509.load_pem_x509_certificate(moved.tls_certificate.read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(names.get_values_for_type(x509.DNSName)) == ["app.localhost", "sockets.localhost"]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= datetime.timedelta(days=398)
