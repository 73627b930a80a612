"""A fault-injecting HTTP proxy on loopback, in front of the moto S3 server.

Point boto3 at `proxy.endpoint_url` and a seeded share of requests is answered with a fault
instead of (or part-way through) the real answer:

- "slowdown":      503 SlowDown (S3's throttling answer)
- "internal":      500 InternalError
- "reset_headers": the real status and headers, then a TCP reset before any body byte
- "reset_body":    the real headers and half the body, then a TCP reset
- "delay":         the real answer after `delay_s`
- "trickle":       the real headers, then one body byte per `trickle_interval_s` (until the
                   client gives up or `trickle_max_s` passes; then a reset)

Faults come from `script` first (a list consumed in order, for exact tests), then at `rate`
from the seeded random stream, and at 100% while a `burst` lasts. Reset faults only apply to
answers with a body. Everything is bounded: `max_requests`, socket timeouts, daemon threads.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "reset_headers", "reset_body", "delay", "trickle")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_INTERNAL = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


class FaultProxy:
    """A threaded reverse proxy to `upstream` that injects faults; use as a context manager."""

    def __init__(
        self,
        upstream: str,
        rate: float = 0.0,
        faults: tuple[str, ...] = FAULTS,
        seed: int = 0,
        delay_s: float = 0.3,
        trickle_interval_s: float = 0.5,
        trickle_max_s: float = 20.0,
        max_requests: int = 20_000,
        only_methods: tuple[str, ...] | None = None,
        matches: Callable[[str, str], bool] | None = None,
    ):
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.rate = rate
        self.faults = faults
        self.delay_s = delay_s
        self.trickle_interval_s = trickle_interval_s
        self.trickle_max_s = trickle_max_s
        self.max_requests = max_requests
        self.only_methods = only_methods
        self.matches = matches  # (method, path) -> whether faults may hit this request
        self.script: list[str | None] = []  # consumed first; None means "pass this one"
        self.counts: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._burst_until = 0.0
        self._burst_faults: tuple[str, ...] = ("slowdown",)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- control

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def burst(self, seconds: float, faults: tuple[str, ...] = ("slowdown",)) -> None:
        """Answer every request with one of `faults` for the next `seconds`."""
        with self._lock:
            self._burst_until = time.monotonic() + seconds
            self._burst_faults = faults

    def choose(self, method: str, path: str = "") -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if self.counts["requests"] > self.max_requests:
                raise RuntimeError("fault proxy: request limit reached")
            if self.only_methods and method not in self.only_methods:
                return None
            if self.matches is not None and not self.matches(method, path):
                return None
            if self.script:
                fault = self.script.pop(0)
            elif time.monotonic() < self._burst_until:
                fault = self._random.choice(self._burst_faults)
            elif self.rate and self._random.random() < self.rate:
                fault = self._random.choice(self.faults)
            else:
                fault = None
            if fault:
                self.counts[fault] += 1
            return fault

    def __enter__(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle client connection is closed, never held forever

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        owner = self.owner
        body = self._body()
        fault = owner.choose(self.command, self.path)
        if fault == "slowdown":
            return self._error(503, _SLOWDOWN)
        if fault == "internal":
            return self._error(500, _INTERNAL)
        if fault == "delay":
            time.sleep(owner.delay_s)
        # The client's Host header stays: it is part of the request signature.
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            status, reply_headers = response.status, response.getheaders()
        finally:
            upstream.close()
        has_body = self.command != "HEAD" and len(data) > 1
        if fault in ("reset_headers", "reset_body", "trickle") and not has_body:
            fault = None  # nothing to cut: answer normally
        self.send_response(status)
        for key, value in reply_headers:
            # A HEAD answer keeps the object's Content-Length; others get the body's.
            if key.lower() not in _HOP or (
                self.command == "HEAD" and key.lower() == "content-length"
            ):
                self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "reset_headers":
            return self._reset()
        if fault == "reset_body":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._reset()
        if fault == "trickle":
            started = time.monotonic()
            for i in range(len(data)):
                if time.monotonic() - started > owner.trickle_max_s:
                    return self._reset()
                try:
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                except OSError:
                    self.close_connection = True
                    return None
                time.sleep(owner.trickle_interval_s)
            return None
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends a TCP RST, as a dropped connection does.
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (OSError, ValueError):
            self.close_connection = True

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET
