"""The session-key fallback and the Origin check, through Channels' WebsocketCommunicator.

Tests are sync and drive the socket with async_to_sync, so the middleware's database
work runs on this thread, inside the test's transaction and its query counter.
"""

from datetime import timedelta

import pytest
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from asgi_site.auth import SessionAuthMiddlewareStack, SessionKeyAuthMiddlewareStack
from tests.sockets import whoami

pytestmark = pytest.mark.django_db


def test_cookie_authenticates(session_key):
    assert whoami(cookie=f"sessionid={session_key}") == {
        "type": "whoami",
        "user": "alice",
        "authenticated": True,
        "auth": "cookie",
        "cookies": ["sessionid"],  # names only, never values
        "origin": "http://app.localhost:8000",
    }


def test_session_key_authenticates_without_cookie(session_key):
    frame = whoami(query=f"session_key={session_key}")
    assert (frame["user"], frame["auth"]) == ("alice", "session_key")


def test_no_cookie_no_key_is_anonymous():
    assert whoami() == {
        "type": "whoami",
        "user": None,
        "authenticated": False,
        "auth": "none",
        "cookies": [],
        "origin": "http://app.localhost:8000",
    }


def test_cookie_wins_over_key(session_key):
    frame = whoami(query=f"session_key={session_key}", cookie=f"sessionid={session_key}")
    assert frame["auth"] == "cookie"


def test_stale_cookie_does_not_hide_a_valid_key(session_key):
    stale = "0" * 32  # well formed, no such session
    frame = whoami(query=f"session_key={session_key}", cookie=f"sessionid={stale}")
    assert (frame["user"], frame["auth"]) == ("alice", "session_key")


def test_anonymous_cookie_session_does_not_hide_a_valid_key(session_key):
    anonymous = Client()
    anonymous.get("/accounts/login/")  # a session without a user, like a visitor's
    session = anonymous.session
    session["seen"] = True
    session.save()
    frame = whoami(query=f"session_key={session_key}", cookie=f"sessionid={session.session_key}")
    assert frame["auth"] == "session_key"


@pytest.mark.parametrize(
    "bad_key",
    [
        "abc",
        "A" * 32,
        "x" * 41,
        "0123456789abcdef0123456789abcdef%00",
        "ключ" * 8,
        "",
        "a b c d e f g h",
    ],
)
def test_malformed_key_is_refused_before_any_query(bad_key):
    with CaptureQueriesContext(connection) as queries:
        frame = whoami(query=f"session_key={bad_key}")
    assert frame["authenticated"] is False
    assert [q["sql"] for q in queries] == []


def test_well_formed_key_makes_one_query(session_key):
    made_up = "q" * 32
    with CaptureQueriesContext(connection) as queries:
        whoami(query=f"session_key={made_up}")
    assert len(queries) == 1 and "django_session" in queries[0]["sql"]


def test_unknown_key_is_anonymous_and_creates_no_session(session_key):
    made_up = "k" * 32
    before = Session.objects.count()
    assert whoami(query=f"session_key={made_up}")["authenticated"] is False
    assert not Session.objects.filter(session_key=made_up).exists()
    assert Session.objects.count() == before


def test_expired_key_is_anonymous(session_key):
    Session.objects.filter(session_key=session_key).update(
        expire_date=timezone.now() - timedelta(seconds=1)
    )
    assert whoami(query=f"session_key={session_key}")["authenticated"] is False


def test_key_of_an_anonymous_session_is_anonymous():
    client = Client()
    session = client.session
    session["seen"] = True
    session.save()
    assert whoami(query=f"session_key={session.session_key}")["authenticated"] is False


def test_repeated_key_is_refused(session_key):
    query = f"session_key={session_key}&session_key={session_key}"
    assert whoami(query=query)["authenticated"] is False


def test_fallback_can_be_switched_off(session_key, settings):
    settings.WS_SESSION_KEY_FALLBACK = False
    assert whoami(query=f"session_key={session_key}")["authenticated"] is False


def test_parameter_name_comes_from_settings(session_key, settings):
    settings.WS_SESSION_KEY_PARAM = "sk"
    assert whoami(query=f"session_key={session_key}")["authenticated"] is False
    assert whoami(query=f"sk={session_key}")["auth"] == "session_key"


def test_no_fixation_a_key_is_never_saved_or_adopted(session_key):
    """A socket never writes a session: not for a made-up key, not for a real one."""
    rows = set(Session.objects.values_list("session_key", "session_data", "expire_date"))
    whoami(query="session_key=" + "f" * 32)
    whoami(query=f"session_key={session_key}")
    whoami(cookie="sessionid=" + "e" * 32)
    assert set(Session.objects.values_list("session_key", "session_data", "expire_date")) == rows


def test_refusal_is_logged_without_the_key(session_key, caplog):
    made_up = "z" * 32
    with caplog.at_level("INFO", logger="asgi_site"):
        whoami(query=f"session_key={made_up}")
        whoami(query="session_key=" + "Q" * 32)
    assert "unknown, expired or anonymous session" in caplog.text
    assert "malformed" in caplog.text
    assert made_up not in caplog.text and "Q" * 32 not in caplog.text


@pytest.mark.parametrize(
    "origin",
    [
        b"http://evil.test",
        b"null",
        b"http://app.localhost.evil.test:8000",
        b"http://app.localhost:8001",
        b"https://app.localhost:8000",
        b"http://app.localhost:99999x",
        b"http://user@app.localhost:8000",
        b"http://app.localhost:8000/",
        b"http://app.localhost:8000?x",
    ],
)
def test_foreign_origin_is_refused(origin):
    assert whoami(origin=origin) is None


def test_missing_origin_is_refused_by_default():
    assert whoami(origin=None) is None


def test_missing_origin_can_be_allowed(settings):
    settings.WS_ALLOW_MISSING_ORIGIN = True
    assert whoami(origin=None)["type"] == "whoami"


def test_realtime_origin_is_refused():
    """Cross-domain, only the app origin opens sockets: the realtime host serves no pages."""
    assert whoami(origin=b"http://realtime.localhost:8000") is None
    assert whoami(origin=b"http://app.localhost:8000")["type"] == "whoami"


@pytest.mark.parametrize("origin", [b"http://app.localhost:8000#", b"http://app.localhost:8000?"])
def test_origin_with_an_empty_fragment_or_query_is_refused(origin):
    assert whoami(origin=origin) is None


@pytest.mark.parametrize("host", [b"evil.test", b"app.localhost.evil.test:8000", b""])
def test_a_handshake_for_another_host_is_refused(host):
    assert whoami(host=host) is None


def test_unknown_path_is_refused():
    assert whoami(path="/ws/nope/") is None


def test_the_old_stack_name_is_an_alias():
    assert SessionKeyAuthMiddlewareStack is SessionAuthMiddlewareStack


def test_fallback_match_never_writes_the_session(session_key, settings):
    """
    README (key rotation): the socket side checks the session auth hash against
    SECRET_KEY_FALLBACKS "as Django's own get_user does", but "never writes to the session
    (Django cycles the key on a fallback match ...)". A handshake known only through the
    fallback hash makes no INSERT, UPDATE or DELETE, and leaves the row as it was.
    """
    from django.contrib.auth import HASH_SESSION_KEY
    from django.contrib.auth.models import User
    from django.contrib.sessions.backends.db import SessionStore

    row = Session.objects.values_list("session_data", "expire_date").get(pk=session_key)
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "a-brand-new-key", [settings.SECRET_KEY]
    # Known through the fallback hash: the current key's hash does not match, an old one does.
    stored = SessionStore(session_key).load()[HASH_SESSION_KEY]
    alice = User.objects.get(username="alice")
    assert stored != alice.get_session_auth_hash()
    assert stored in alice.get_session_auth_fallback_hash()
    for way in ({"cookie": f"sessionid={session_key}"}, {"query": f"session_key={session_key}"}):
        with CaptureQueriesContext(connection) as queries:
            frame = whoami(**way)
        assert frame["user"] == "alice" and queries.captured_queries, "no query was seen"
        writes = [q["sql"] for q in queries if not q["sql"].lstrip().upper().startswith("SELECT")]
        assert writes == []
    assert Session.objects.values_list("session_data", "expire_date").get(pk=session_key) == row
    assert Session.objects.count() == 1
