"""The HTTP downloader: polite, bounded, retrying, and safe against hostile hosts.

`HttpFetcher.fetch(url)` never raises for a problem of that URL: it returns a
`FetchResult` whose `reason` is a drop reason code:

  http_<code>          a 4xx answer (http_404, http_403, http_410, ...), never retried
                       except 408 and 429; also any other non-2xx, non-redirect answer
  http_5xx             a 5xx answer, after the retries
  timeout              connect or read timeout, after the retries
  connection_error     refused / reset / TLS failure / broken stream
  truncated            body shorter than its Content-Length, after the retries
  dns_error            the host name does not resolve
  private_address      the host is loopback / private / link-local / multicast /
                       reserved / unspecified (unless allow_private_addresses)
  invalid_url          not an absolute http(s) URL
  too_many_redirects   more than max_redirects redirects
  too_large            body above max_bytes (by Content-Length or while streaming)
  opt_out              an X-Robots-Tag directive that applies to us forbids the use
"""

from __future__ import annotations

import email.utils
import ipaddress
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timezone
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urljoin

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    HTTPError,
    LocationParseError,
    NameResolutionError,
    NewConnectionError,
    ReadTimeoutError,
    SSLError,
)

from curate.fetch.config import FetchParams

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({408, 429})
# Directives of X-Robots-Tag that take a value after a colon; any other
# "token: ..." prefix names the user agent the rest of the header applies to.
VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
CHUNK_SIZE = 64 * 1024
DRAIN_LIMIT = 64 * 1024  # read and discard unwanted bodies up to this size to keep the connection


@dataclass
class FetchResult:
    """The outcome of downloading one URL."""

    url: str
    final_url: str  # after redirects
    ok: bool
    body: bytes | None = None
    status: int | None = None
    content_type: str | None = None
    reason: str | None = None  # drop reason code when not ok
    detail: str | None = None
    attempts: int = 0  # requests sent, retries and redirect hops included
    content_length: int | None = None  # as announced by the host
    elapsed: float = 0.0  # seconds


@dataclass
class _Outcome:
    """What one request (one attempt of one hop) produced."""

    status: int | None = None
    content_type: str | None = None
    content_length: int | None = None
    body: bytes | None = None
    reason: str | None = None
    detail: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    location: str | None = None


class _UrlProblem(Exception):
    """A URL refused before any request: invalid, unresolvable or private."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _ForbiddenPeer(Exception):
    """A connection reached a forbidden address (e.g. DNS changed after our check)."""


def forbidden_address(address: str) -> bool:
    """True for loopback, private, link-local, multicast, reserved, unspecified or non-global IPs."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def robots_opt_out(header_values: Iterable[str], directives: Iterable[str], agent_token: str) -> str | None:
    """The first X-Robots-Tag directive among `directives` that applies to `agent_token`, or None.

    Each header value is a comma list of directives; a ``name: directive`` item
    scopes it and the items after it (in the same header) to user agent `name`.
    Directives scoped to another agent do not apply. Matching is case-insensitive.
    """
    wanted = {d.strip().lower() for d in directives}
    token = agent_token.strip().lower()
    for value in header_values:
        scope = None
        for item in value.split(","):
            name, sep, rest = item.partition(":")
            name = name.strip().lower()
            if sep and name not in VALUED_DIRECTIVES and name and " " not in name:
                scope, item = name, rest
            directive = item.strip().lower()
            if directive in wanted and scope in (None, token):
                return directive
    return None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta seconds or HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class _PeerCheckMixin:
    """Refuse a freshly opened socket whose peer address is forbidden."""

    def _new_conn(self):
        sock = super()._new_conn()
        peer = sock.getpeername()[0]
        if forbidden_address(peer):
            sock.close()
            raise _ForbiddenPeer(f"connected to forbidden address {peer}")
        return sock


class _CheckedHTTPConnection(_PeerCheckMixin, HTTPConnection):
    pass


class _CheckedHTTPSConnection(_PeerCheckMixin, HTTPSConnection):
    pass


class _CheckedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


class HttpFetcher:
    """Download URLs with timeouts, size limit, retries, manual redirects and opt-out checks.

    Thread-safe: one urllib3 PoolManager is shared by all threads of the fetcher.
    """

    def __init__(self, params: FetchParams):
        self.params = params
        self._timeout = urllib3.Timeout(connect=params.connect_timeout, read=params.read_timeout)
        self._pool = urllib3.PoolManager(
            num_pools=max(64, params.threads),
            maxsize=params.threads,
            block=False,
            headers={"User-Agent": params.user_agent, "Accept": "image/*,*/*;q=0.8"},
            retries=False,
            timeout=self._timeout,
        )
        if not params.allow_private_addresses:
            self._pool.pool_classes_by_scheme = {"http": _CheckedHTTPPool, "https": _CheckedHTTPSPool}
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    def fetch(self, url: str) -> FetchResult:
        """Download `url`, following redirects; problems are reported in the result, never raised."""
        start = time.monotonic()
        current, attempts = url, 0
        for _ in range(self.params.max_redirects + 1):
            try:
                self._check_url(current)
            except _UrlProblem as problem:
                return self._result(
                    url, current, _Outcome(reason=problem.reason, detail=problem.detail), attempts, start
                )
            outcome, tries = self._get_with_retries(current)
            attempts += tries
            if outcome.location is None:
                return self._result(url, current, outcome, attempts, start)
            current = urljoin(current, outcome.location)
        detail = f"more than {self.params.max_redirects} redirects"
        return self._result(url, current, _Outcome(reason="too_many_redirects", detail=detail), attempts, start)

    def fetch_many(self, urls: Sequence[str], after: Callable[[FetchResult], Any] | None = None) -> list[Any]:
        """Download `urls` concurrently (params.threads); results in input order.

        With `after`, each result is passed to `after(result)` in the worker thread right
        after its download, and its return value is what the list holds (so CPU work on a
        body overlaps the other downloads).
        """
        task = self.fetch if after is None else (lambda url: after(self.fetch(url)))
        if len(urls) <= 1:
            return [task(url) for url in urls]
        return list(self._pool_executor().map(task, urls))

    def close(self) -> None:
        """Stop the worker threads and close every pooled connection."""
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        self._pool.clear()

    def __enter__(self) -> "HttpFetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pool_executor(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.params.threads, thread_name_prefix="curate-fetch")
            return self._executor

    def _check_url(self, url: str) -> None:
        """Raise _UrlProblem unless `url` is an absolute http(s) URL of an allowed host."""
        try:
            parsed = urllib3.util.parse_url(url)
        except (LocationParseError, ValueError, UnicodeError) as exc:
            raise _UrlProblem("invalid_url", f"cannot parse URL: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise _UrlProblem("invalid_url", f"not an absolute http(s) URL: {url[:200]}")
        if self.params.allow_private_addresses:
            return
        host = parsed.host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, parsed.port or 80, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise _UrlProblem("dns_error", f"cannot resolve {host}: {exc.strerror or exc}") from None
        except (UnicodeError, ValueError) as exc:
            raise _UrlProblem("invalid_url", f"bad host name {host!r}: {exc}") from None
        for info in infos:
            address = info[4][0]
            if forbidden_address(address):
                raise _UrlProblem("private_address", f"{host} resolves to non-public address {address}")

    def _get_with_retries(self, url: str) -> tuple[_Outcome, int]:
        """One hop: request `url`, retrying retryable failures with backoff. Returns (outcome, tries)."""
        tries = self.params.retries + 1
        for attempt in range(tries):
            outcome = self._attempt(url)
            if not outcome.retryable or attempt == tries - 1:
                break
            time.sleep(self._backoff(attempt, outcome.retry_after))
        if outcome.reason is not None and attempt > 0:
            outcome.detail = f"{outcome.detail} after {attempt + 1} attempts"
        return outcome, attempt + 1

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `attempt + 1`: exponential with jitter, Retry-After honoured."""
        delay = self.params.backoff_base * 2**attempt * random.uniform(1.0, 1.25)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.params.backoff_max)

    def _attempt(self, url: str) -> _Outcome:
        """Send one GET and turn the response (or the failure) into an outcome."""
        try:
            response = self._pool.request("GET", url, redirect=False, preload_content=False)
        except _ForbiddenPeer as exc:
            return _Outcome(reason="private_address", detail=str(exc))
        except (HTTPError, OSError, ValueError) as exc:
            return _request_error(exc)
        try:
            return self._read_response(response)
        finally:
            response.release_conn()

    def _read_response(self, response: urllib3.BaseHTTPResponse) -> _Outcome:
        status = response.status
        outcome = _Outcome(
            status=status,
            content_type=response.headers.get("Content-Type"),
            content_length=_content_length(response),
        )
        location = response.headers.get("Location")
        if status in REDIRECT_STATUSES and location:
            _discard(response, outcome.content_length)
            outcome.location = location
            return outcome
        if not 200 <= status < 300:
            _discard(response, outcome.content_length)
            return _status_failure(outcome, response)
        directive = robots_opt_out(
            response.headers.getlist("X-Robots-Tag"), self.params.opt_out_directives, self.params.user_agent_token
        )
        if directive is not None:
            _discard(response, outcome.content_length)
            outcome.reason, outcome.detail = "opt_out", f"X-Robots-Tag: {directive}"
            return outcome
        if outcome.content_length is not None and outcome.content_length > self.params.max_bytes:
            response.close()
            outcome.reason = "too_large"
            outcome.detail = f"Content-Length {outcome.content_length} > max_bytes {self.params.max_bytes}"
            return outcome
        return self._read_body(response, outcome)

    def _read_body(self, response: urllib3.BaseHTTPResponse, outcome: _Outcome) -> _Outcome:
        """Stream the body into `outcome`, enforcing max_bytes and detecting truncation."""
        chunks, total = [], 0
        try:
            for chunk in response.stream(CHUNK_SIZE, decode_content=True):
                total += len(chunk)
                if total > self.params.max_bytes:
                    response.close()
                    outcome.reason = "too_large"
                    outcome.detail = f"body exceeds max_bytes {self.params.max_bytes}"
                    return outcome
                chunks.append(chunk)
        except ReadTimeoutError:
            outcome.reason, outcome.detail, outcome.retryable = "timeout", "read timeout in body", True
            return outcome
        except DecodeError as exc:
            outcome.reason, outcome.detail = "connection_error", f"bad Content-Encoding: {exc}"
            return outcome
        except (HTTPError, OSError) as exc:
            if outcome.content_length is not None:
                outcome.reason = "truncated"
                outcome.detail = f"body shorter than Content-Length {outcome.content_length}: {_text(exc)}"
            else:
                outcome.reason, outcome.detail = "connection_error", f"body read failed: {_text(exc)}"
            outcome.retryable = True
            return outcome
        encoded = response.headers.get("Content-Encoding", "identity").strip().lower() != "identity"
        if not encoded and outcome.content_length is not None and total < outcome.content_length:
            outcome.reason, outcome.retryable = "truncated", True
            outcome.detail = f"body truncated: {total} of {outcome.content_length} bytes"
            return outcome
        outcome.body = b"".join(chunks)
        return outcome

    @staticmethod
    def _result(url: str, final_url: str, outcome: _Outcome, attempts: int, start: float) -> FetchResult:
        return FetchResult(
            url=url,
            final_url=final_url,
            ok=outcome.reason is None,
            body=outcome.body if outcome.reason is None else None,
            status=outcome.status,
            content_type=outcome.content_type,
            reason=outcome.reason,
            detail=outcome.detail,
            attempts=attempts,
            content_length=outcome.content_length,
            elapsed=time.monotonic() - start,
        )


def _request_error(exc: Exception) -> _Outcome:
    """Classify an exception raised while connecting / sending / reading the status line."""
    # Order matters: NameResolutionError < NewConnectionError < ConnectTimeoutError.
    if isinstance(exc, NameResolutionError):
        return _Outcome(reason="dns_error", detail=f"cannot resolve host: {_text(exc)}")
    if isinstance(exc, NewConnectionError):
        return _Outcome(reason="connection_error", detail=f"cannot connect: {_text(exc)}", retryable=True)
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError, TimeoutError)):
        return _Outcome(reason="timeout", detail=f"timeout: {_text(exc)}", retryable=True)
    if isinstance(exc, SSLError):
        return _Outcome(reason="connection_error", detail=f"TLS error: {_text(exc)}")
    if isinstance(exc, (LocationParseError, ValueError)):
        return _Outcome(reason="invalid_url", detail=f"invalid URL: {exc}")
    return _Outcome(reason="connection_error", detail=f"connection failed: {_text(exc)}", retryable=True)


def _status_failure(outcome: _Outcome, response: urllib3.BaseHTTPResponse) -> _Outcome:
    """Fill the reason of a non-2xx, non-redirect answer."""
    status = outcome.status
    outcome.reason = "http_5xx" if status >= 500 else f"http_{status}"
    outcome.detail = f"HTTP {status}"
    outcome.retryable = status >= 500 or status in RETRY_STATUSES
    if outcome.retryable:
        outcome.retry_after = retry_after_seconds(response.headers.get("Retry-After"))
    return outcome


def _content_length(response: urllib3.BaseHTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


def _discard(response: urllib3.BaseHTTPResponse, content_length: int | None) -> None:
    """Drop an unwanted body: drain a small one (the connection stays reusable), else close."""
    if content_length is not None and content_length <= DRAIN_LIMIT:
        response.drain_conn()
    else:
        response.close()


def _text(exc: BaseException) -> str:
    """The message of an exception (urllib3 wraps the cause as a second argument)."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
