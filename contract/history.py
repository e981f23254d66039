"""
History per broadcast group: every event sent to a group that keeps one is first recorded
in a capped Redis Stream (`history:<group>`), and the stream entry's id travels with the
event. A socket that reconnects with the last id it saw is sent what it missed, in order,
exactly once (asgi_site.consumers.LiveConsumer).

The stream keeps at least the last WS_HISTORY_MAX events, and drops events older than
WS_HISTORY_SECONDS whenever one is added (both approximately, `~`: Redis trims whole
nodes of about 100 entries, so it may hold somewhat more, never fewer). Each entry also
records the id of the entry before it ("prev"), so a reader knows exactly whether anything
between the id it has and the next entry kept is gone (a gap), instead of guessing from the
oldest entry kept.

The HTTP side records with the sync client and the socket side with the async one, the
clients of contract.redis_clients (settings.REDIS_URL).
"""

import contextlib
import json
import re
from typing import cast

from django.conf import settings
from redis.commands.core import AsyncScript, Script

from .layers import LAYER_ERRORS
from .redis_clients import async_client, sync_client

# A stream entry id, as Redis writes it: milliseconds, a dash, a sequence number.
ID_RE = re.compile(r"(\d{1,20})-(\d{1,20})")
MAX_PART = 2**64 - 1  # each part is an unsigned 64-bit integer in Redis

StreamId = tuple[int, int]

# Read the newest entry, add this one after it (recording the newest's id as "prev"),
# trim to MAXLEN ~ ARGV[1] and to entries no older than ARGV[2] ms before this one.
# One script, so that no other add can come between the read and the add.
RECORD = """
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = ''
if newest[1] then prev = newest[1][1] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                      'prev', prev, 'event', ARGV[3])
local max_age = tonumber(ARGV[2])
if max_age > 0 then
  local cutoff = tonumber(string.match(id, '^(%d+)')) - max_age
  if cutoff > 0 then redis.call('XTRIM', KEYS[1], 'MINID', '~', tostring(cutoff)) end
end
return {id, prev}
"""


# Before the first entry: a reader there has missed nothing yet.
BEGINNING: StreamId = (0, 0)


def stream_key(group: str) -> str:
    return f"history:{group}"


def parse_id(value: object) -> StreamId | None:
    """A stream id as (milliseconds, sequence), compared numerically; None if malformed."""
    match = ID_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2])
    return (ms, seq) if ms <= MAX_PART and seq <= MAX_PART else None


def format_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


def _limits() -> list[int]:
    return [settings.WS_HISTORY_MAX, int(settings.WS_HISTORY_SECONDS * 1000)]


def record(group: str, event: dict) -> dict:
    """Record `event` in the group's history; return it with its "id" and "prev". Sync."""
    script = Script(sync_client(), RECORD)
    reply = script(keys=[stream_key(group)], args=[*_limits(), json.dumps(event)])
    return _stamped(event, reply)


async def arecord(group: str, event: dict) -> dict:
    """Record `event` in the group's history; return it with its "id" and "prev". Async."""
    script = AsyncScript(async_client(), RECORD)
    reply = await script(keys=[stream_key(group)], args=[*_limits(), json.dumps(event)])
    return _stamped(event, reply)


def _stamped(event: dict, reply: list[bytes]) -> dict:
    stream_id, prev = reply
    return {**event, "id": stream_id.decode(), "prev": prev.decode()}


def discard(group: str, stream_id: str) -> None:
    """Take back an entry whose event could not be sent (best effort; never raises)."""
    # If Redis fell over between the add and the send, the entry stays.
    with contextlib.suppress(*LAYER_ERRORS):
        sync_client().xdel(stream_key(group), stream_id)


async def adiscard(group: str, stream_id: str) -> None:
    """The async discard()."""
    with contextlib.suppress(*LAYER_ERRORS):
        await async_client().xdel(stream_key(group), stream_id)


async def newest(group: str) -> StreamId | None:
    """The id of the group's newest entry; BEGINNING if it has none."""
    reply = await async_client().xrevrange(stream_key(group), count=1)
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], reply)
    return parse_id(entries[0][0].decode()) if entries else BEGINNING


async def replay(
    group: str, after: StreamId, upto: StreamId | None = None
) -> tuple[bool, list[dict]]:
    """
    The events recorded after `after`, up to and including `upto` (or the newest), oldest
    first, and whether some were lost before them (a gap): `after` is not kept and the
    first entry kept does not follow it, or nothing at all is kept from `after` on (Redis
    lost its data, or the id never was one).
    """
    end = format_id(upto) if upto is not None else "+"
    reply = await async_client().xrange(stream_key(group), min=format_id(after), max=end)
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], reply)
    events = [_event(entry_id, fields) for entry_id, fields in entries]
    if events and parse_id(events[0]["id"]) == after:
        return False, events[1:]
    # The first entry ever recorded follows nothing ("prev" is empty): it follows BEGINNING.
    expected = "" if after == BEGINNING else format_id(after)
    gap = not events or events[0]["prev"] != expected
    return gap, events


def _event(entry_id: bytes, fields: dict[bytes, bytes]) -> dict:
    event = json.loads(fields[b"event"])
    event["id"] = entry_id.decode()
    event["prev"] = fields[b"prev"].decode()
    return event
