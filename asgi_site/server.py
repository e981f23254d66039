"""
Daphne, as deploy/start-asgi.sh runs it in both runtimes: the daphne command line, with a
Server that

- closes a socket whose message is over --websocket-max-message-size with 1009 (message too
  big, RFC 6455) instead of dropping TCP (the client saw 1006): autobahn's failByDrop=False;
- drains on SIGTERM (supervisord's stop, `docker compose stop`): it stops listening, so nginx
  sends new handshakes to the other processes at once, closes its open sockets with 1012
  (service restart) spread evenly over WS_DRAIN_SECONDS, so their clients come back a few at a
  time, waits for the closes to finish, and only then lets Daphne cancel what is left and exit.

    python -m asgi_site.server <daphne's arguments>
"""

# daphne.server installs the asyncio reactor: it is imported before anything of Twisted's.
from daphne.cli import CommandLineInterface  # isort: skip
from daphne.server import Server  # isort: skip

import asyncio
import logging
import time

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, reactor, task

from shared_settings.topology import DRAIN_SECONDS

logger = logging.getLogger("asgi_site.server")

# RFC 6455 close code 1012: the server is restarting; the client should reconnect.
SERVICE_RESTART = 1012
# After the last 1012, seconds to wait for the close handshakes (autobahn drops a peer that does
# not answer after 1 s) and for the consumers to leave their groups (LEAVE_TIMEOUT is 2 s).
CLOSE_GRACE = 3.0


def close(protocol):
    # autobahn's sendClose (Daphne's serverClose) allows only 1000 and 3000-4999 from an
    # application; 1012 is the server's own to send, so the frame is sent directly.
    protocol.sendCloseFrame(code=SERVICE_RESTART, reasonUtf8=b"service restart")


def sleep(seconds):
    return task.deferLater(reactor, max(seconds, 0.0), lambda: None)


class DrainingServer(Server):
    drain_seconds = DRAIN_SECONDS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ready_callable = self.configure_websockets
        self.ports = []  # the listening ports (daphne's own self.listeners are Deferreds)

    def configure_websockets(self):
        # A failed connection (a message too big: 1009) gets a close frame before TCP goes.
        # allowNullOrigin: autobahn resets it to False unless given, where Daphne set True; the
        # Origin check (origins.py) then answers "null" with its 403, not autobahn's 400.
        self.ws_factory.setProtocolOptions(failByDrop=False, allowNullOrigin=True)

    def listen_success(self, port):
        self.ports.append(port)
        return super().listen_success(port)

    def open_sockets(self):
        return [
            protocol
            for protocol, details in self.connections.items()
            if isinstance(protocol, WebSocketProtocol)
            and "disconnected" not in details
            and protocol.state == WebSocketProtocol.STATE_OPEN
        ]

    async def drain(self):
        # Refuse new connections first: nginx tries the next process at once (socket-location).
        await defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in self.ports], consumeErrors=True
        )
        sockets = self.open_sockets()
        logger.info(
            "Stopping: closing %d socket(s) with %d over %.1f s",
            len(sockets),
            SERVICE_RESTART,
            self.drain_seconds,
        )
        began = time.monotonic()
        step = self.drain_seconds / len(sockets) if sockets else 0.0
        for n, protocol in enumerate(sockets):
            await sleep(began + n * step - time.monotonic())
            if protocol.state == WebSocketProtocol.STATE_OPEN:
                close(protocol)
        for protocol in self.open_sockets():  # any accepted while we drained
            close(protocol)
        deadline = time.monotonic() + CLOSE_GRACE
        while time.monotonic() < deadline and not self.drained():
            await sleep(0.05)
        if not self.drained():
            logger.info(
                "Drain: after %.0f s, %d connection(s) still open or finishing: %s",
                CLOSE_GRACE,
                len(self.connections),
                sorted({type(p).__name__ + str(sorted(d)) for p, d in self.connections.items()}),
            )

    def drained(self):
        """Every connection is gone and its application has finished."""
        return all(
            "disconnected" in details
            and ("application_instance" not in details or details["application_instance"].done())
            for details in self.connections.values()
        )

    def kill_all_applications(self):
        # Daphne registers this as its "before shutdown" trigger: Twisted waits for the
        # Deferred, so the drain runs first and Daphne's own cancelling after it.
        drained = defer.ensureDeferred(self.drain())
        drained.addErrback(lambda failure: logger.error("Drain failed: %s", failure.value))
        drained.addCallback(lambda _: self.cancel_applications())
        return drained

    def cancel_applications(self):
        """Daphne's kill_all_applications, minus its KeyError on a connection with no app."""
        left = [
            details["application_instance"]
            for details in self.connections.values()
            if "application_instance" in details and not details["application_instance"].done()
        ]
        for application in left:
            application.cancel()
        logger.info("Cancelled %d application instance(s) still running", len(left))
        cancelled = defer.Deferred.fromFuture(asyncio.gather(*left))
        cancelled.addErrback(lambda _: None)
        return cancelled


class DrainingCommandLine(CommandLineInterface):
    server_class = DrainingServer


if __name__ == "__main__":
    DrainingCommandLine.entrypoint()
