"""
A raw HTTP/WebSocket client for hostile handshakes: it sends exactly the bytes a test
gives, which well-behaved libraries refuse to (NUL bytes, duplicate headers, 64 KiB
cookies), and reports what came back.
"""

import base64
import json
import os
import socket
from dataclasses import dataclass, field


@dataclass
class Answer:
    status: int
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    frame: dict | None = None  # the first text frame, after a 101

    @property
    def outcome(self):
        """'known', 'anonymous' (a 101 and its whoami frame) or the HTTP status."""
        if self.status == 101 and self.frame is not None:
            return "known" if self.frame.get("authenticated") else "anonymous"
        return self.status


def handshake_headers(host, origin, extra=()):
    """The headers a browser sends to open a WebSocket, plus `extra` (name, value) pairs."""
    headers = [
        ("Host", host),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", base64.b64encode(os.urandom(16)).decode()),
        ("Sec-WebSocket-Version", "13"),
    ]
    if origin is not None:
        headers.append(("Origin", origin))
    return headers + list(extra)


def request(port, target, headers, method="GET", timeout=10):
    """Send one request (target and header values as str or bytes); return the Answer."""

    def raw(value):
        return value if isinstance(value, bytes) else value.encode("latin1")

    lines = [raw(method) + b" " + raw(target) + b" HTTP/1.1"]
    lines += [raw(name) + b": " + raw(value) for name, value in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        return read_answer(conn)


def read_answer(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin1").split("\r\n")
    status = int(status_line.split()[1]) if status_line.startswith("HTTP/") else 0
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 101:
        return Answer(status, headers, frame=read_text_frame(conn, rest))
    return Answer(status, headers, body=read_body(conn, headers, rest))


def read_body(conn, headers, body):
    if "content-length" in headers:
        while len(body) < int(headers["content-length"]):
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return body
    chunked = headers.get("transfer-encoding") == "chunked"
    try:
        # A chunked body ends with an empty chunk; anything else, when the server closes.
        while not (chunked and body.endswith(b"0\r\n\r\n")) and (chunk := conn.recv(65536)):
            body += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return body


def read_text_frame(conn, data):
    """Read one unmasked server frame; return its JSON, or None if it is not a text frame."""
    while len(data) < 2:
        data += conn.recv(65536)
    opcode, length = data[0] & 0x0F, data[1] & 0x7F
    offset = 2
    if length == 126:
        length, offset = int.from_bytes(data[2:4], "big"), 4
    while len(data) < offset + length:
        data += conn.recv(65536)
    payload = data[offset : offset + length]
    return json.loads(payload) if opcode == 1 else None
