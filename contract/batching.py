"""
One round trip for many awaiting callers.

A burst of handshakes asks Redis and the database the same kind of question many times at
once: redeem this ticket, count this socket, read this session. Answered one by one, each
costs a round trip (and for the database, a hop to its one thread). A function made with
@batched is called for one item but run for every item waiting at the same time: the first
caller starts a batch on the next turn of the event loop, and whoever comes while it is in
flight waits for the one after. A lone caller waits for nothing; under load a batch grows
to the number of callers waiting, and the cost per caller falls with it.

Where nobody waits on the answer's latency (a closed socket leaving its count), a batch may
linger: it gathers callers for that many seconds before it runs.
"""

import asyncio
import functools
import weakref
from collections.abc import Awaitable, Callable
from typing import Any


class Batch:
    """The callers waiting on one event loop for `run(items)`, which returns one result each."""

    def __init__(self, run: Callable[[list], Awaitable[list]], linger: float = 0.0) -> None:
        self.run = run
        self.linger = linger
        self.waiting: list[tuple[Any, asyncio.Future]] = []
        self.task: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((item, future))
        if self.task is None:
            self.task = asyncio.create_task(self.drain())
        return await future

    async def drain(self) -> None:
        batch: list[tuple[Any, asyncio.Future]] = []
        try:
            if self.linger:
                await asyncio.sleep(self.linger)
            while self.waiting:
                batch, self.waiting = self.waiting, []
                try:
                    results = await self.run([item for item, _ in batch])
                    answers = list(zip(batch, results, strict=True))
                except Exception as exc:  # every caller of the batch gets the same exception
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in answers:
                    if not future.done():  # a caller cancelled meanwhile
                        future.set_result(result)
        finally:
            self.task = None
            # Cancelled (the loop is closing): no caller is left waiting for good.
            for _, future in batch + self.waiting:
                future.cancel()


def batched(run: Callable[[list], Awaitable[list]] | None = None, *, linger: float = 0.0) -> Any:
    """
    Make `async run(items) -> results` callable as `await f(item) -> result` (see above):
    @batched, or @batched(linger=seconds).
    """
    if run is None:
        return functools.partial(batched, linger=linger)
    batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Batch] = (
        weakref.WeakKeyDictionary()
    )

    @functools.wraps(run)
    async def one(item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if loop not in batches:
            batches[loop] = Batch(run, linger)
        return await batches[loop].submit(item)

    return one
