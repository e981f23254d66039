"""
Hostile handshakes and frames on the real stack, through nginx, each with its outcome
written beside it: "known" or "anonymous" (a 101 and the whoami frame), or the HTTP
status that refused the handshake. The README's "What happens when…" is taken from here.
"""

import asyncio
import contextlib
import json
import re
import time
import urllib.parse
import uuid

import pytest
import requests
import websockets

from tests import raw

FORGED_TICKET = "F" * 43
MADE_UP_KEY = "m" * 32


# (name, expected outcome, how to build the request from ctx). ctx holds a fresh session
# key ("key"), a ticket minter ("ticket"), the app origin and the realtime host:port.
CASES = [
    # Controls: the well-formed requests these variations start from.
    ("session_key valid", "known", lambda c: {"query": f"session_key={c['key']}"}),
    ("ticket valid, query", "known", lambda c: {"query": f"ticket={c['ticket']()}"}),
    ("ticket valid, header", "known", lambda c: {"protocols": f"realtime, ticket.{c['ticket']()}"}),
    ("no credential", "anonymous", lambda c: {}),
    # session_key values.
    ("session_key too short", "anonymous", lambda c: {"query": "session_key=abc"}),
    ("session_key upper case", "anonymous", lambda c: {"query": "session_key=" + c["key"].upper()}),
    ("session_key 41 characters", "anonymous", lambda c: {"query": "session_key=" + "a" * 41}),
    ("session_key 4 KiB", "anonymous", lambda c: {"query": "session_key=" + "a" * 4096}),
    ("session_key made up", "anonymous", lambda c: {"query": f"session_key={MADE_UP_KEY}"}),
    (
        "session_key percent-encoded, valid",
        "known",
        lambda c: {"query": "session_key=" + "".join(f"%{ord(ch):02x}" for ch in c["key"])},
    ),
    (
        "session_key non-ASCII, percent-encoded",
        "anonymous",
        lambda c: {"query": "session_key=" + urllib.parse.quote("ключ" * 8)},
    ),
    # Daphne refuses a request line that is not ASCII.
    (
        "session_key raw UTF-8 bytes",
        400,
        lambda c: {"query": b"session_key=" + "ключ".encode() * 8},
    ),
    ("session_key with %00", "anonymous", lambda c: {"query": f"session_key={c['key']}%00"}),
    (
        "session_key raw NUL byte",
        400,
        lambda c: {"query": b"session_key=" + c["key"].encode() + b"\x00"},
    ),
    (
        "session_key twice",
        "anonymous",
        lambda c: {"query": f"session_key={c['key']}&session_key={c['key']}"},
    ),
    ("session_key empty", "anonymous", lambda c: {"query": "session_key="}),
    ("session_key without =", "anonymous", lambda c: {"query": "session_key"}),
    (
        "session_key with spaces",
        "anonymous",
        lambda c: {"query": "session_key=" + "a+b+c+d+e+f+g+h"},
    ),
    ("session_key with ;", "anonymous", lambda c: {"query": f"session_key={c['key']};x"}),
    ("session_key[] name", "anonymous", lambda c: {"query": f"session_key[]={c['key']}"}),
    ("SESSION_KEY name", "anonymous", lambda c: {"query": f"SESSION_KEY={c['key']}"}),
    (
        "session_key in header and query",
        "anonymous",
        lambda c: {
            "query": f"session_key={c['key']}",
            "protocols": f"realtime, session_key.{c['key']}",
        },
    ),
    # Tickets.
    ("ticket forged", "anonymous", lambda c: {"query": f"ticket={FORGED_TICKET}"}),
    ("ticket too short", "anonymous", lambda c: {"query": "ticket=abc"}),
    ("ticket 44 characters", "anonymous", lambda c: {"query": "ticket=" + "A" * 44}),
    (
        "ticket non-ASCII",
        "anonymous",
        lambda c: {"query": "ticket=" + urllib.parse.quote("é" * 43)},
    ),
    ("ticket with %00", "anonymous", lambda c: {"query": "ticket=" + "A" * 42 + "%00"}),
    ("ticket empty", "anonymous", lambda c: {"query": "ticket="}),
    (
        "ticket twice",
        "anonymous",
        lambda c: {"query": f"ticket={c['ticket']()}&ticket={c['ticket']()}"},
    ),
    ("ticket replayed", "anonymous", lambda c: {"query": f"ticket={c['used_ticket']()}"}),
    ("ticket empty in header", "anonymous", lambda c: {"protocols": "realtime, ticket."}),
    (
        "ticket forged in header",
        "anonymous",
        lambda c: {"protocols": f"realtime, ticket.{FORGED_TICKET}"},
    ),
    (
        "ticket in header and query",
        "anonymous",
        lambda c: (lambda t: {"query": f"ticket={t}", "protocols": f"realtime, ticket.{t}"})(
            c["ticket"]()
        ),
    ),
    ("ticket header without realtime", "known", lambda c: {"protocols": f"ticket.{c['ticket']()}"}),
    (
        "100 subprotocols",
        "anonymous",
        lambda c: {"protocols": ", ".join(f"p{i}" for i in range(100))},
    ),
    # Daphne splits the header on commas; "ticket.a b" is then a malformed ticket.
    ("subprotocol with a space", "anonymous", lambda c: {"protocols": "realtime, ticket.a b"}),
    # Cookies.
    (
        "stale cookie, valid key",
        "known",
        lambda c: {"query": f"session_key={c['key']}", "cookie": f"sessionid={MADE_UP_KEY}"},
    ),
    ("cookie header 64 KiB", 400, lambda c: {"cookie": "x=" + "a" * 65536}),
    ("1000 cookies", "anonymous", lambda c: {"cookie": "; ".join(f"c{i}=1" for i in range(1000))}),
    (
        "cookie sessionid path traversal",
        "anonymous",
        lambda c: {"cookie": "sessionid=../../etc/passwd"},
    ),
    ("cookie with control bytes", "anonymous", lambda c: {"cookie": b"sessionid=\x01\x02\x7f"}),
    # Origins.
    ("origin foreign", 403, lambda c: {"origin": "http://www.evil.test"}),
    ("origin null", 403, lambda c: {"origin": "null"}),
    (
        "origin look-alike",
        403,
        lambda c: {"origin": c["app_origin"].replace("localhost", "localhost.evil.test")},
    ),
    ("origin other port", 403, lambda c: {"origin": "http://app.localhost:9999"}),
    ("origin other scheme", 403, lambda c: {"origin": c["app_origin"].replace("http:", "https:")}),
    ("origin missing", 403, lambda c: {"origin": None}),
    ("origin with userinfo", 403, lambda c: {"origin": c["app_origin"].replace("//", "//user@")}),
    ("origin with path", 403, lambda c: {"origin": c["app_origin"] + "/"}),
    # Daphne's handshake parser refuses these Origin headers before Channels sees them.
    ("origin port overflow", 400, lambda c: {"origin": "http://app.localhost:99999"}),
    ("origin non-ASCII", 403, lambda c: {"origin": "http://äpp.localhost".encode()}),
    ("origin twice, foreign last", 400, lambda c: {"extra": [("Origin", "http://www.evil.test")]}),
    # Browsers serialize an origin in lower case; the check compares it exactly.
    ("origin upper case", 403, lambda c: {"origin": c["app_origin"].upper()}),
    # Paths, methods and the handshake itself.
    ("plain GET on a socket path", 404, lambda c: {"upgrade": False}),
    ("unknown socket path", 403, lambda c: {"path": "/ws/nope/"}),
    ("socket path without slash", 403, lambda c: {"path": "/ws/whoami"}),
    ("socket path with ../", 403, lambda c: {"path": "/ws/../ws/whoami/"}),
    ("POST with Upgrade", 405, lambda c: {"method": "POST"}),
    # Daphne also speaks the hybi-10 draft (version 8); the socket is then simply anonymous.
    ("WebSocket version 8", "anonymous", lambda c: {"version": "8"}),
    ("no Sec-WebSocket-Key", 400, lambda c: {"drop": "Sec-WebSocket-Key"}),
    # Size.
    # asgi_site.auth reads at most 20 query fields (MAX_QUERY_FIELDS): a query string with
    # more is not read at all, so a valid key after the first 20 fields opens nothing.
    (
        "19 query parameters, then a valid session_key",
        "known",
        lambda c: {"query": "a&" * 19 + f"session_key={c['key']}"},
    ),
    (
        "20 query parameters, then a valid session_key",
        "anonymous",
        lambda c: {"query": "a&" * 20 + f"session_key={c['key']}"},
    ),
    (
        "3,000 query parameters (6 KiB), then a valid session_key",
        "anonymous",
        lambda c: {"query": "a&" * 3000 + f"session_key={c['key']}"},
    ),
    ("10,000 query parameters (40 KiB)", 414, lambda c: {"query": "a=1&" * 10000}),
    ("request line of 9 KiB", 414, lambda c: {"query": "x=" + "a" * 9216}),
    ("header of 9 KiB", 400, lambda c: {"extra": [("X-Big", "a" * 9216)]}),
    # Hosts.
    ("unknown Host", 404, lambda c: {"host": "unknown.test"}),
    ("no Host", 400, lambda c: {"host": None}),
]


# Every request of the hostile cases carries this User-Agent, so nginx's log lines of these
# cases, and no others, can be told apart.
USER_AGENT = "hostile-case"


def sent_credentials(spec):
    """The values of session_key/ticket the spec sends (as sent and decoded), to keep from logs."""
    values = set()
    query = spec.get("query")
    if isinstance(query, str):
        for pair in query.split("&"):
            name, _, value = pair.partition("=")
            if name.lower().rstrip("[]") in ("session_key", "ticket"):
                values |= {value, urllib.parse.unquote(value)}
    for protocol in (spec.get("protocols") or "").split(","):
        name, _, value = protocol.strip().partition(".")
        if name in ("session_key", "ticket"):
            values.add(value)
    if isinstance(spec.get("cookie"), str) and spec["cookie"].startswith("sessionid="):
        values.add(spec["cookie"].removeprefix("sessionid="))
    # A value of a few characters ("abc") would match innocent text; anything longer is kept.
    return {v for v in values if len(v) >= 8}


def send(stack, spec):
    stack.secrets.update(sent_credentials(spec))
    path = spec.get("path", "/ws/whoami/")
    query = spec.get("query")
    if query is not None:
        path = (path.encode() + b"?" + query) if isinstance(query, bytes) else f"{path}?{query}"
    host = spec.get("host", f"{stack.realtime_host}:{stack.public_port}")
    origin = spec.get("origin", stack.app_origin)
    if spec.get("upgrade", True):
        headers = raw.handshake_headers(host, origin, spec.get("extra", []))
        if "protocols" in spec:
            headers.append(("Sec-WebSocket-Protocol", spec["protocols"]))
        if "version" in spec:
            headers = [
                (n, spec["version"] if n == "Sec-WebSocket-Version" else v) for n, v in headers
            ]
        headers = [(n, v) for n, v in headers if n != spec.get("drop")]
    else:
        headers = [("Host", host), ("Origin", origin)]
    headers = [(n, v) for n, v in headers if v is not None]
    headers.insert(1, ("User-Agent", USER_AGENT))
    if "cookie" in spec:
        headers.append(("Cookie", spec["cookie"]))
    return raw.request(stack.public_port, path, headers, method=spec.get("method", "GET"))


def access_log(stack):
    return stack.state_dir / "log" / "nginx-access.log"


@pytest.fixture(scope="module")
def ctx(cross_stack):
    # Where nginx's access log stands before the first case: the scan after them reads on.
    log_offset = access_log(cross_stack).stat().st_size
    session, key = cross_stack.login()
    cross_stack.secrets.update({FORGED_TICKET, MADE_UP_KEY, key.upper()})

    def used_ticket():
        ticket = cross_stack.ticket(session)
        assert cross_stack.whoami(query=f"ticket={ticket}")["auth"] == "ticket"
        return ticket

    return {
        "key": key,
        "ticket": lambda: cross_stack.ticket(session),
        "used_ticket": used_ticket,
        "app_origin": cross_stack.app_origin,
        "answers": [],
        "log_offset": log_offset,
    }


def test_at_least_fifty_cases():
    assert len(CASES) >= 50 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name, expected, build", CASES, ids=[c[0] for c in CASES])
def test_hostile_handshake(cross_stack, ctx, name, expected, build):
    answer = send(cross_stack, build(ctx))
    ctx["answers"].append(answer)
    assert answer.outcome == expected, f"{name}: {answer.outcome} {answer.body[:200]!r}"
    # A refusal answers with a short page, never with a traceback or Django's debug page.
    assert b"Traceback" not in answer.body and b"DEBUG = True" not in answer.body
    if answer.status == 101 and "realtime" in (build(ctx).get("protocols") or ""):
        assert answer.headers.get("sec-websocket-protocol") == "realtime"


def test_after_the_hostile_handshakes_the_stack_still_serves(cross_stack, ctx):
    assert len(ctx["answers"]) == len(CASES), "run with every hostile case"
    # Only documented statuses: nothing 5xx reached a client...
    assert all(a.status < 500 for a in ctx["answers"])
    # ...and nginx logged none, for the requests made since the first case (and only those).
    with access_log(cross_stack).open("rb") as log:
        log.seek(ctx["log_offset"])
        lines = log.read().decode(errors="replace").splitlines()
    logged = [re.search(r'" (\d{3}) \d+ host=', line) for line in lines]
    assert all(logged), [line for line, m in zip(lines, logged, strict=True) if not m][:5]
    statuses = [m.group(1) for m in logged if m]
    hostile = [line for line in lines if line.endswith(f'"{USER_AGENT}"')]
    # The cases nginx logs with their User-Agent: all but the few it refuses before reading
    # headers (request line too long) or without one (no Host).
    assert len(hostile) >= len(CASES) - 5, f"{len(hostile)} of {len(CASES)} cases logged"
    server_errors = [
        line for line, status in zip(lines, statuses, strict=True) if int(status) >= 500
    ]
    assert not server_errors, server_errors
    for port in cross_stack.daphne_ports:  # every Daphne process still answers
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    session, key = cross_stack.login()
    assert cross_stack.whoami(query=f"session_key={key}")["user"] == "demo"


# Hostile frames, on /ws/live/.


async def live_socket(stack, key, **kwargs):
    # max_queue=None: a test that does not read must still see the server's close frame.
    return await stack.connect(
        f"/ws/live/?session_key={key}", max_size=None, max_queue=None, **kwargs
    )


def test_message_over_the_maximum_size_closes_with_1009(cross_stack):
    """
    A socket whose message exceeds --websocket-max-message-size (65536) is closed with 1009,
    message too big (RFC 6455), with its reason, not dropped (1006, stock Daphne; the launcher,
    asgi_site/server.py, sets autobahn's failByDrop=False); sockets open at the same time, on
    the same Daphne process and the other, carry on.
    """
    session, key = cross_stack.login()
    marker = uuid.uuid4().hex

    async def run():
        first, second = cross_stack.daphne_ports
        big = await live_socket(cross_stack, key, port=first)
        others = [await live_socket(cross_stack, key, port=port) for port in (first, second)]
        with contextlib.suppress(websockets.ConnectionClosed):
            await big.send(json.dumps({"text": "x" * (4 * 1024 * 1024)}))  # 4 MiB
        await asyncio.wait_for(big.wait_closed(), 5)
        seen = []
        for n, ws in enumerate(others):
            assert ws.close_code is None, "a socket open beside the oversized one was dropped"
            await ws.send(json.dumps({"text": f"{marker} {n}"}))
        for ws in others:  # each sees both messages: they still send, and still receive
            texts = []
            while not {f"{marker} 0", f"{marker} 1"} <= set(texts):
                texts.append(json.loads(await asyncio.wait_for(ws.recv(), 5)).get("text"))
            seen.append(sorted(t for t in texts if t and t.startswith(marker)))
            await ws.close()
        return big.close_code, big.close_reason, seen

    code, reason, seen = asyncio.run(run())
    assert code == 1009, (code, reason)  # message too big, with a close frame
    assert "exceeds payload limit of 65536 octets" in reason
    assert seen == [[f"{marker} 0", f"{marker} 1"]] * 2
    assert cross_stack.whoami(query=f"session_key={key}")["user"] == "demo"  # new ones too


@pytest.mark.parametrize(
    "frame, error",
    [
        (b"\x00\x01binary", "text frames only"),
        ("{not json", "invalid JSON"),
        ('"just a string"', 'send {"text": "..."}'),
        ('{"text": ["a", "list"]}', 'send {"text": "..."}'),
        ('{"text": ""}', 'send {"text": "..."}'),
        ('{"text": "' + "x" * 1001 + '"}', "text longer than 1000 characters"),
    ],
)
def test_bad_frames_get_an_error_frame_and_the_socket_stays(cross_stack, frame, error):
    session, key = cross_stack.login()

    async def run():
        async with await live_socket(cross_stack, key) as ws:
            await ws.send(frame)
            answer = json.loads(await asyncio.wait_for(ws.recv(), 5))
            await ws.send(json.dumps({"text": "still here"}))
            follow_up = json.loads(await asyncio.wait_for(ws.recv(), 5))
            return answer, follow_up

    answer, follow_up = asyncio.run(run())
    assert answer == {"type": "error", "error": error}
    assert re.fullmatch(r"\d+-\d+", follow_up.pop("id"))  # its place in the history
    assert follow_up == {"type": "message", "user": "demo", "text": "still here"}


def test_flooder_is_closed_with_4429_and_others_keep_talking(cross_stack):
    """
    The token bucket lets WS_MESSAGE_BURST (20) messages through at once, then
    WS_MESSAGE_RATE (10) a second: a socket sending 200 as fast as it can is closed with
    4429 after the burst and what refilled meanwhile. A calm socket in the same group sees
    every message the server accepted from the flooder, and still talks afterwards.
    """
    burst, rate, flood = 20, 10, 200
    session, key = cross_stack.login()
    marker = uuid.uuid4().hex

    async def run():
        flooder = await live_socket(cross_stack, key)
        calm = await live_socket(cross_stack, key)
        began = time.monotonic()
        sent = 0  # frames handed to the connection before it was found closed
        for i in range(flood):
            try:
                await flooder.send(json.dumps({"text": f"{marker} flood {i}"}))
            except websockets.ConnectionClosed:
                break
            sent += 1
        await asyncio.wait_for(flooder.wait_closed(), 5)
        took = time.monotonic() - began
        # The calm client, meanwhile, still sends and receives; what it saw of the flood
        # before its own message is every flood message the server accepted.
        await calm.send(json.dumps({"text": f"{marker} calm"}))
        accepted = []
        while (text := json.loads(await asyncio.wait_for(calm.recv(), 5)).get("text")) != (
            f"{marker} calm"
        ):
            if text and text.startswith(f"{marker} flood"):
                accepted.append(text)
        await calm.close()
        return flooder.close_code, sent, accepted, took

    code, sent, accepted, took = asyncio.run(run())
    assert code == 4429
    # The first messages went through, in order, and then none: the burst, plus the tokens
    # that refilled while the flood lasted. Without the limit all 200 would be accepted.
    assert accepted == [f"{marker} flood {i}" for i in range(len(accepted))]
    assert burst <= len(accepted) <= burst + rate * took + 1, (len(accepted), took)
    assert len(accepted) < flood and sent <= flood
