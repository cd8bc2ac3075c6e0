"""A loopback HTTP server that serves a table of routes, with fault modes.

Used by `curate demo` to serve its synthetic web and by the tests to exercise the
fetcher against real HTTP. It only ever binds to 127.0.0.1.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    """What the server answers for one path.

    fault modes:
      - ``fail_times`` / ``fail_status``: the first N requests answer `fail_status`
        (with `fail_headers`), later ones the normal answer;
      - ``delay``: seconds to sleep before answering (a timeout when above the client's);
      - ``truncate_to``: send only this many body bytes while announcing the full length;
      - ``redirect_to``: answer 302 to that path;
      - ``chunked``: send the body with chunked transfer encoding (no Content-Length);
      - ``trickle``: send the whole answer (status line, headers, body) one byte every
        `trickle` seconds (a slow-loris host);
      - ``endless``: after the headers, send `body` again and again (without a length)
        until the client hangs up, pausing `trickle` seconds (else 0.01 s) between copies.

    A `headers` value may be a list to send the same header several times.
    `hits` counts the requests, `hit_times` keeps when each arrived (time.monotonic()),
    `request_headers` the headers of each, and `max_in_flight` the most requests
    answered at the same time.
    """

    body: bytes = b""
    status: int = 200
    content_type: str = "image/jpeg"
    headers: dict[str, str | list[str]] = field(default_factory=dict)
    fail_times: int = 0
    fail_status: int = 500
    fail_headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    truncate_to: int | None = None
    redirect_to: str | None = None
    chunked: bool = False
    trickle: float = 0.0
    endless: bool = False
    hits: int = 0
    hit_times: list[float] = field(default_factory=list)
    request_headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    def do_GET(self):  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            route = self.server.routes.get(path)
            if route is not None:
                route.hits += 1
                route.hit_times.append(time.monotonic())
                route.request_headers.append(dict(self.headers.items()))
                hit = route.hits
                route.in_flight += 1
                route.max_in_flight = max(route.max_in_flight, route.in_flight)
        if route is None:
            self._answer(404, b"not found", "text/plain", {})
            return
        try:
            self._answer_route(route, hit)
        finally:
            with self.server.lock:
                route.in_flight -= 1

    def _answer_route(self, route, hit):
        if route.delay:
            time.sleep(route.delay)
        if hit <= route.fail_times:
            self._answer(route.fail_status, b"temporary failure", "text/plain", route.fail_headers)
            return
        if route.redirect_to is not None:
            self._answer(302, b"", "text/plain", {"Location": route.redirect_to})
            return
        if route.trickle and not route.endless:
            self._trickle(route)
            return
        if route.endless:
            self._endless(route)
            return
        self._answer(route.status, route.body, route.content_type, route.headers, route.truncate_to, route.chunked)

    def _trickle(self, route):
        head = f"HTTP/1.1 {route.status} OK\r\nContent-Type: {route.content_type}\r\n"
        head += f"Content-Length: {len(route.body)}\r\nConnection: close\r\n\r\n"
        self.close_connection = True
        try:
            for byte in head.encode("latin-1") + route.body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(route.trickle)
        except OSError:
            pass

    def _endless(self, route):
        self.close_connection = True
        try:
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Connection", "close")
            self.end_headers()
            while True:
                self.wfile.write(route.body or b"x")
                self.wfile.flush()
                time.sleep(route.trickle or 0.01)
        except OSError:
            pass

    def _answer(self, status, body, content_type, headers, truncate_to=None, chunked=False):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(len(body)))
            for name, values in headers.items():
                for value in [values] if isinstance(values, str) else values:
                    self.send_header(name, value)
            if truncate_to is not None:
                self.send_header("Connection", "close")
            self.end_headers()
            if chunked:
                self._write_chunked(body)
            else:
                self.wfile.write(body if truncate_to is None else body[:truncate_to])
            self.wfile.flush()
            if truncate_to is not None:
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _write_chunked(self, body, chunk_size=16384):
        for start in range(0, len(body), chunk_size):
            chunk = body[start : start + chunk_size]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client hanging up early (e.g. refusing an oversized body) is not an error.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class LoopbackServer:
    """Serve `routes` (path -> Route) on 127.0.0.1 in a background thread.

    Use as a context manager; `url(path)` gives the absolute URL of a path.
    """

    def __init__(self, routes: dict[str, Route] | None = None, port: int = 0):
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.routes = dict(routes or {})
        self._server.lock = threading.Lock()
        self._thread = threading.Thread(target=self._server.serve_forever, name="curate-loopback", daemon=True)

    @property
    def routes(self) -> dict[str, Route]:
        return self._server.routes

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def start(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
