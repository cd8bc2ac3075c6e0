"""The HTTP downloader: polite, bounded, retrying, and safe against hostile hosts.

`HttpFetcher.fetch(url)` never raises for a problem of that URL: it returns a
`FetchResult` whose `reason` is a drop reason code (curate/fetch/reasons.py):

  http_<code>          a 4xx answer (http_404, http_403, http_410, ...), never retried
                       except 408 and 429; also any other non-2xx, non-redirect answer
  http_5xx             a 5xx answer, after the retries
  timeout              connect or read timeout, or no complete answer within
                       total_timeout, after the retries
  connection_error     refused / reset / TLS failure / broken stream
  truncated            body shorter than its Content-Length, after the retries
  dns_error            the host name does not resolve
  blocked_address      the host resolves to a loopback / private / link-local / multicast /
                       reserved / metadata address (unless allow_private_addresses)
  invalid_url          not an absolute http(s) URL
  too_many_redirects   more than max_redirects redirects
  too_large            body above max_bytes (by Content-Length or while streaming)
  opt_out              an X-Robots-Tag directive that applies to us forbids the use
  robots               robots.txt disallows the URL for user_agent_token
  robots_unreachable   robots.txt answered 5xx / 429 or could not be fetched
  rate_limited         the host asked to wait longer than max_retry_after
  host_unreachable     the host failed host_max_failures requests in a row and is skipped

Each hop (the URL, then every redirect target) is checked in this order: URL syntax,
resolution (cached) and the address guard, robots.txt of its origin (cached), then the
request takes a slot of the host's politeness limiter and is sent to the checked address
under its total deadline (curate/fetch/deadline.py).

Politeness and robots.txt hold for the whole run: given the run's politeness service
(FetchStage.setup), every fetcher of the run shares its per-host limits and robots.txt answers
(curate/fetch/politeness_client.py). Without it (a fetcher used on its own), they are this
fetcher's own (curate/fetch/politeness.py, curate/fetch/cache.py).
"""

from __future__ import annotations

import email.utils
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
from urllib3.util.connection import create_connection

from curate.fetch import reasons, robots
from curate.fetch.cache import TtlCache
from curate.fetch.config import FetchParams
from curate.fetch.deadline import Watch, Watchdog
from curate.fetch.politeness import HostLimiter, HostRefused
from curate.fetch.politeness_client import SharedHostLimiter, SharedRobotsCache
from curate.fetch.resolver import (
    InvalidHost,
    Resolution,
    ResolveError,
    Resolver,
    blocked_addresses,
    forbidden_address,
    ip_literal,
    normalise_host,
    system_lookup,
)

__all__ = ["FetchResult", "HttpFetcher", "forbidden_address", "retry_after_seconds", "robots_opt_out"]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({408, 429})
OVERLOAD_STATUSES = frozenset({429, 503})  # answers that pause the whole host, not just the URL
HOST_FAILURES = frozenset({reasons.TIMEOUT, reasons.CONNECTION_ERROR})  # counted towards host_max_failures
# Directives of X-Robots-Tag that take a value after a colon; any other
# "token: ..." prefix names the user agent the rest of the header applies to.
VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
CHUNK_SIZE = 64 * 1024
DRAIN_LIMIT = 64 * 1024  # read and discard unwanted bodies up to this size to keep the connection
DEFAULT_PORTS = {"http": 80, "https": 443}


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
    attempts: int = 0  # requests sent, retries and redirect hops included (robots.txt not counted)
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


@dataclass(frozen=True)
class _Target:
    """One hop, checked and ready to request."""

    url: str
    scheme: str
    host: str  # normalised host name: the politeness key
    port: int
    path: str  # path and query, for robots.txt
    addresses: tuple[str, ...]  # where to connect (checked by the guard unless pinned or allowed)


@dataclass(frozen=True)
class _Mode:
    """What a request is for: an image, or a robots.txt.

    An image hop is checked against robots.txt, its answer against X-Robots-Tag, and a
    body above max_bytes is refused. A robots.txt is none of these, and a body above
    its limit is cut there (RFC 9309 asks to parse at least the first 500 KiB).
    """

    robots_txt: bool
    max_bytes: int
    max_redirects: int
    accept: str


ROBOTS_MODE = _Mode(True, robots.MAX_BYTES, robots.MAX_REDIRECTS, "text/plain,*/*;q=0.5")


class _UrlProblem(Exception):
    """A hop refused before any request: invalid, unresolvable, blocked, disallowed or rate limited."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Attempt:
    """What the connection of the current thread's request must honour."""

    addresses: tuple[str, ...]
    watch: Watch


_ATTEMPT = threading.local()  # .current: the _Attempt of this thread's request in flight


def _current_attempt() -> _Attempt | None:
    return getattr(_ATTEMPT, "current", None)


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


class _CheckedAddressMixin:
    """Connect only to the addresses the fetcher checked for this request, under its deadline.

    The connection never resolves the host name itself; TLS still verifies the certificate
    against the host name of the URL (SNI and Host header are unchanged).
    """

    def connect(self):
        attempt = _current_attempt()
        if attempt is not None:
            attempt.watch.attach(self)
        super().connect()
        if attempt is not None:
            attempt.watch.attach(self)  # now with its (TLS) socket
            if attempt.watch.expired:
                self.close()
                raise ConnectTimeoutError(self, "total_timeout passed while connecting")

    def request(self, *args, **kwargs):
        attempt = _current_attempt()
        if attempt is not None:
            attempt.watch.attach(self)
        return super().request(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        attempt = _current_attempt()
        if attempt is None or not attempt.addresses:
            raise NewConnectionError(self, f"no checked address to connect to for {self.host}")
        error: Exception | None = None
        for address in attempt.addresses:
            if attempt.watch.expired:
                break
            try:
                return create_connection(
                    (address, self.port), self.timeout, source_address=self.source_address,
                    socket_options=self.socket_options,
                )
            except socket.timeout:
                error = ConnectTimeoutError(self, f"connection to {self.host} ({address}) timed out")
            except OSError as exc:
                error = NewConnectionError(self, f"cannot connect to {self.host} ({address}): {exc}")
        raise error or ConnectTimeoutError(self, "total_timeout passed while connecting")


class _CheckedHTTPConnection(_CheckedAddressMixin, HTTPConnection):
    pass


class _CheckedHTTPSConnection(_CheckedAddressMixin, HTTPSConnection):
    pass


class _CheckedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


class HttpFetcher:
    """Download URLs politely, with deadlines, size limit, retries, manual redirects and opt-out checks.

    Thread-safe: all threads of a fetcher share one urllib3 PoolManager (connections are
    reused per host), one DNS cache, one robots.txt cache and one per-host limiter.
    `lookup(host) -> [address, ...]` replaces the system resolver (tests use it).
    `politeness`: the run's politeness service (a PolitenessService actor), whose per-host limits and
    robots.txt answers every fetcher of the run shares; None: this fetcher keeps its own.
    """

    def __init__(self, params: FetchParams, lookup: Callable[[str], list[str]] | None = None,
                 politeness: Any = None):
        self.params = params
        # The watchdog cannot cut a connect in progress (no socket yet), so connects are bounded here too.
        self._timeout = urllib3.Timeout(
            connect=min(params.connect_timeout, params.total_timeout),
            read=min(params.read_timeout, params.total_timeout),
        )
        self._pool = urllib3.PoolManager(
            num_pools=max(256, 4 * params.threads),
            maxsize=min(params.threads, params.host_concurrency),
            block=False,
            headers={"User-Agent": params.user_agent},
            retries=False,
            timeout=self._timeout,
        )
        self._pool.pool_classes_by_scheme = {"http": _CheckedHTTPPool, "https": _CheckedHTTPSPool}
        self._resolver = Resolver(
            params.resolve, params.dns_cache_ttl, params.host_cache_size, lookup or system_lookup
        )
        self._limiter: HostLimiter | SharedHostLimiter
        self._robots: TtlCache[tuple[str, str, int], robots.RobotsRules] | SharedRobotsCache
        if politeness is None:
            self._limiter = HostLimiter(
                params.host_concurrency,
                params.host_rate,
                params.max_retry_after,
                params.host_max_failures,
                params.host_failure_cooldown,
                params.host_cache_size,
            )
            self._robots = TtlCache(params.host_cache_size)
        else:
            self._limiter = SharedHostLimiter(politeness, params.max_retry_after, params.host_max_failures,
                                              params.host_cache_size)
            self._robots = SharedRobotsCache(politeness, params.host_cache_size)
        self._watchdog = Watchdog()
        self._image_mode = _Mode(False, params.max_bytes, params.max_redirects, "image/*,*/*;q=0.8")
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    def fetch(self, url: str) -> FetchResult:
        """Download `url`, following redirects; problems are reported in the result, never raised."""
        return self._follow(url, self._image_mode)

    def fetch_many(self, urls: Sequence[str], after: Callable[[FetchResult], Any] | None = None) -> list[Any]:
        """Download `urls` concurrently (params.threads); results in input order.

        URLs are started host by host in turn, so that the threads spread over hosts
        instead of queueing behind one host's politeness limits. With `after`, each
        result is passed to `after(result)` in the worker thread right after its
        download, and its return value is what the list holds (so CPU work on a body
        overlaps the other downloads).
        """
        task = self.fetch if after is None else (lambda url: after(self.fetch(url)))
        if len(urls) <= 1:
            return [task(url) for url in urls]
        order = _interleave_hosts(urls)
        results: list[Any] = [None] * len(urls)
        for index, result in zip(order, self._pool_executor().map(task, [urls[i] for i in order])):
            results[index] = result
        return results

    def close(self) -> None:
        """Stop the worker threads and the deadline watchdog, and close every pooled connection."""
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        self._watchdog.close()
        self._limiter.close()
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

    # ------------------------------------------------------------------ hops

    def _follow(self, url: str, mode: _Mode) -> FetchResult:
        """Request `url` and the redirects it leads to, each hop checked before its request."""
        start = time.monotonic()
        current, attempts = url, 0
        for _ in range(mode.max_redirects + 1):
            try:
                target = self._check(current, robots_too=not mode.robots_txt)
            except _UrlProblem as problem:
                outcome = _Outcome(reason=problem.reason, detail=problem.detail)
                return _result(url, current, outcome, attempts, start)
            outcome, tries = self._get_with_retries(target, mode)
            attempts += tries
            if outcome.location is None:
                return _result(url, current, outcome, attempts, start)
            current = urljoin(current, outcome.location)
        detail = f"more than {mode.max_redirects} redirects"
        return _result(url, current, _Outcome(reason=reasons.TOO_MANY_REDIRECTS, detail=detail), attempts, start)

    def _check(self, url: str, robots_too: bool) -> _Target:
        """The checked hop for `url`, or _UrlProblem: syntax, resolution, address guard, robots.txt."""
        try:
            parsed = urllib3.util.parse_url(url)
        except (LocationParseError, ValueError, UnicodeError) as exc:
            raise _UrlProblem(reasons.INVALID_URL, f"cannot parse URL: {exc}") from None
        scheme = (parsed.scheme or "").lower()
        if scheme not in DEFAULT_PORTS or not parsed.host:
            raise _UrlProblem(reasons.INVALID_URL, f"not an absolute http(s) URL: {url[:200]}")
        host = normalise_host(parsed.host)
        try:
            resolution = self._resolver.resolve(host)
        except ResolveError as exc:
            raise _UrlProblem(reasons.DNS_ERROR, str(exc)) from None
        except InvalidHost as exc:
            raise _UrlProblem(reasons.INVALID_URL, str(exc)) from None
        if not self.params.allow_private_addresses:
            blocked = blocked_addresses(resolution)
            if blocked:
                raise _UrlProblem(reasons.BLOCKED_ADDRESS, _blocked_detail(host, resolution, blocked))
        target = _Target(url, scheme, host, parsed.port or DEFAULT_PORTS[scheme], parsed.request_uri,
                         resolution.addresses)
        if robots_too and self.params.respect_robots:
            self._check_robots(target)
        return target

    def _check_robots(self, target: _Target) -> None:
        """Raise _UrlProblem unless the robots.txt of the target's origin allows its path."""
        origin = (target.scheme, target.host, target.port)
        rules = self._robots.get(origin, lambda: self._fetch_robots(origin))
        if rules.allows(target.path):
            return
        robots_url = _origin_url(origin) + "/robots.txt"
        if rules.status == "unreachable":
            raise _UrlProblem(rules.reason, f"{robots_url} unreachable, so nothing may be fetched: {rules.detail}")
        detail = f"{robots_url} disallows {target.path[:200]} for {self.params.user_agent_token}"
        raise _UrlProblem(reasons.ROBOTS, detail)

    def _fetch_robots(self, origin: tuple[str, str, int]) -> tuple[robots.RobotsRules, float]:
        """Fetch and interpret one origin's robots.txt (RFC 9309); returns (rules, seconds to keep them)."""
        result = self._follow(_origin_url(origin) + "/robots.txt", ROBOTS_MODE)
        if result.ok:
            text = (result.body or b"").decode("utf-8", errors="replace")
            return robots.parse_robots(text, self.params.user_agent_token), robots.TTL
        if result.reason in (reasons.RATE_LIMITED, reasons.HOST_UNREACHABLE):
            raise _UrlProblem(result.reason, result.detail or result.reason)  # the host's state, not robots.txt's
        status = result.status
        client_error = status is not None and 400 <= status < 500 and status != 429
        if client_error or result.reason == reasons.TOO_MANY_REDIRECTS:
            return robots.unavailable(f"robots.txt: {result.detail}"), robots.TTL
        detail = f"{result.reason}: {result.detail}"
        if status is None and result.reason in (reasons.TIMEOUT, reasons.CONNECTION_ERROR):
            return robots.unreachable(detail, result.reason), robots.UNREACHABLE_TTL  # the host itself is down
        return robots.unreachable(detail), robots.UNREACHABLE_TTL

    # ------------------------------------------------------------------ requests

    def _get_with_retries(self, target: _Target, mode: _Mode) -> tuple[_Outcome, int]:
        """One hop: request it, retrying retryable failures with backoff. Returns (outcome, requests sent)."""
        params, tries, sent = self.params, self.params.retries + 1, 0
        for attempt in range(tries):
            try:
                with self._limiter.slot(target.host):
                    outcome = self._attempt(target, mode)
                    too_long = outcome.retry_after is not None and outcome.retry_after > params.max_retry_after
                    delay = self._backoff(attempt, outcome.retry_after) if outcome.retryable else 0.0
                    # Paused before the slot is given back, so no other request slips in between.
                    if too_long:
                        self._limiter.pause(target.host, outcome.retry_after)
                    elif outcome.retryable and outcome.status in OVERLOAD_STATUSES:
                        self._limiter.pause(target.host, delay)  # every request to the host waits, not just this URL
            except HostRefused as refused:
                outcome = _Outcome(reason=refused.reason, detail=refused.detail)
                break
            sent += 1
            self._limiter.record(target.host, failed=outcome.reason in HOST_FAILURES)
            if too_long:
                outcome.reason, outcome.retryable = reasons.RATE_LIMITED, False
                outcome.detail = (
                    f"HTTP {outcome.status} with Retry-After {outcome.retry_after:.0f} s "
                    f"(max_retry_after {params.max_retry_after:g} s)"
                )
                break
            if not outcome.retryable:
                break
            if attempt == tries - 1:
                break
            if outcome.status not in OVERLOAD_STATUSES:
                time.sleep(delay)
        if outcome.reason is not None and sent > 1:
            outcome.detail = f"{outcome.detail} after {sent} attempts"
        return outcome, sent

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry number `attempt + 1`: exponential with jitter, at least the Retry-After."""
        delay = min(self.params.backoff_base * 2**attempt * random.uniform(1.0, 1.25), self.params.backoff_max)
        return delay if retry_after is None else max(delay, retry_after)

    def _attempt(self, target: _Target, mode: _Mode) -> _Outcome:
        """Send one GET to the checked address under the total deadline; turn the answer into an outcome."""
        watch = self._watchdog.watch(self.params.total_timeout)
        _ATTEMPT.current = _Attempt(target.addresses, watch)
        response = None
        try:
            response = self._pool.urlopen(
                "GET", target.url, redirect=False, preload_content=False, headers=self._headers(mode)
            )
            outcome = self._read_response(response, mode)
        except (HTTPError, OSError, ValueError) as exc:
            outcome = _request_error(exc)
        finally:
            watch.finish()
            _ATTEMPT.current = None
        if watch.expired:  # the socket was cut: whatever was read may be incomplete
            if response is not None:
                response.close()
            outcome = _Outcome(
                status=outcome.status,
                reason=reasons.TIMEOUT,
                detail=f"no complete answer within total_timeout {self.params.total_timeout:g} s",
                retryable=True,
            )
        elif response is not None:
            response.release_conn()
        return outcome

    def _headers(self, mode: _Mode) -> dict[str, str]:
        return {"User-Agent": self.params.user_agent, "Accept": mode.accept}

    def _read_response(self, response: urllib3.BaseHTTPResponse, mode: _Mode) -> _Outcome:
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
        if not mode.robots_txt:
            directive = robots_opt_out(
                response.headers.getlist("X-Robots-Tag"), self.params.opt_out_directives, self.params.user_agent_token
            )
            if directive is not None:
                _discard(response, outcome.content_length)
                outcome.reason, outcome.detail = reasons.OPT_OUT, f"X-Robots-Tag: {directive}"
                return outcome
        too_long = outcome.content_length is not None and outcome.content_length > mode.max_bytes
        if too_long and not mode.robots_txt:
            response.close()
            outcome.reason = reasons.TOO_LARGE
            outcome.detail = f"Content-Length {outcome.content_length} > max_bytes {mode.max_bytes}"
            return outcome
        return _read_body(response, outcome, mode)


def _read_body(response: urllib3.BaseHTTPResponse, outcome: _Outcome, mode: _Mode) -> _Outcome:
    """Read the body into `outcome`, enforcing the size limit and detecting truncation."""
    chunks, total = [], 0
    encoded = response.headers.get("Content-Encoding", "identity").strip().lower() != "identity"
    try:
        if not encoded and outcome.content_length is not None and outcome.content_length <= mode.max_bytes:
            # Length known and within max_bytes: one read into one buffer, half the CPU of a chunked copy.
            chunks = [response.read(decode_content=False)]
            total = len(chunks[0])
        else:
            for chunk in response.stream(CHUNK_SIZE, decode_content=True):
                total += len(chunk)
                if total > mode.max_bytes:
                    response.close()
                    if mode.robots_txt:
                        chunks.append(chunk[: len(chunk) - (total - mode.max_bytes)])
                        outcome.body = b"".join(chunks)
                        return outcome
                    outcome.reason = reasons.TOO_LARGE
                    outcome.detail = f"body exceeds max_bytes {mode.max_bytes}"
                    return outcome
                chunks.append(chunk)
    except ReadTimeoutError:
        outcome.reason, outcome.detail, outcome.retryable = reasons.TIMEOUT, "read timeout in body", True
        return outcome
    except DecodeError as exc:
        outcome.reason, outcome.detail = reasons.CONNECTION_ERROR, f"bad Content-Encoding: {exc}"
        return outcome
    except (HTTPError, OSError) as exc:
        if outcome.content_length is not None:
            outcome.reason = reasons.TRUNCATED
            outcome.detail = f"body shorter than Content-Length {outcome.content_length}: {_text(exc)}"
        else:
            outcome.reason, outcome.detail = reasons.CONNECTION_ERROR, f"body read failed: {_text(exc)}"
        outcome.retryable = True
        return outcome
    if not encoded and outcome.content_length is not None and total < outcome.content_length:
        outcome.reason, outcome.retryable = reasons.TRUNCATED, True
        outcome.detail = f"body truncated: {total} of {outcome.content_length} bytes"
        return outcome
    outcome.body = b"".join(chunks)
    return outcome


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
        return _Outcome(reason=reasons.DNS_ERROR, detail=f"cannot resolve host: {_text(exc)}")
    if isinstance(exc, NewConnectionError):
        return _Outcome(reason=reasons.CONNECTION_ERROR, detail=_text(exc), retryable=True)
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError, TimeoutError)):
        return _Outcome(reason=reasons.TIMEOUT, detail=f"timeout: {_text(exc)}", retryable=True)
    if isinstance(exc, SSLError):
        return _Outcome(reason=reasons.CONNECTION_ERROR, detail=f"TLS error: {_text(exc)}")
    if isinstance(exc, (LocationParseError, ValueError)):
        return _Outcome(reason=reasons.INVALID_URL, detail=f"invalid URL: {exc}")
    return _Outcome(reason=reasons.CONNECTION_ERROR, detail=f"connection failed: {_text(exc)}", retryable=True)


def _status_failure(outcome: _Outcome, response: urllib3.BaseHTTPResponse) -> _Outcome:
    """Fill the reason of a non-2xx, non-redirect answer."""
    status = outcome.status
    outcome.reason = reasons.http_status(status)
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


def _interleave_hosts(urls: Sequence[str]) -> list[int]:
    """Indexes of `urls` taking one URL of each host in turn (first-seen host order kept)."""
    by_host: dict[str, list[int]] = {}
    for index, url in enumerate(urls):
        try:
            host = normalise_host(urllib3.util.parse_url(url).host or "")
        except (LocationParseError, ValueError, UnicodeError):
            host = ""
        by_host.setdefault(host, []).append(index)
    queues = list(by_host.values())
    order = []
    for position in range(max(len(queue) for queue in queues)):
        order.extend(queue[position] for queue in queues if position < len(queue))
    return order


def _origin_url(origin: tuple[str, str, int]) -> str:
    scheme, host, port = origin
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" if port == DEFAULT_PORTS[scheme] else f"{scheme}://{shown}:{port}"


def _blocked_detail(host: str, resolution: Resolution, blocked: list[str]) -> str:
    if ip_literal(host) is not None:
        return f"{host} is a non-public address"
    return f"{host} resolves to non-public address {blocked[0]}"


def _text(exc: BaseException) -> str:
    """The message of an exception (urllib3 wraps the cause as a second argument)."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
