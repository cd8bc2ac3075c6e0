"""Drop reasons of the HTTP downloader, and which of them a later attempt may cure.

`RETRYABLE` is the one list of reasons that say "the host or the network failed this
time", not "this URL is bad": a later run (e.g. a retry of the dropped rows) may
succeed. Everything else (4xx answers, refusals, opt-outs, bad images) is final.
"""

from __future__ import annotations

INVALID_URL = "invalid_url"  # not an absolute http(s) URL, or a bad host name
DNS_ERROR = "dns_error"  # the host name does not resolve
BLOCKED_ADDRESS = "blocked_address"  # the host resolves to a loopback / private / metadata / ... address
TOO_MANY_REDIRECTS = "too_many_redirects"
TIMEOUT = "timeout"  # connect or read timeout, or no complete answer within total_timeout
CONNECTION_ERROR = "connection_error"  # refused / reset / TLS failure / broken stream
TRUNCATED = "truncated"  # body shorter than its Content-Length
HTTP_5XX = "http_5xx"
TOO_LARGE = "too_large"
OPT_OUT = "opt_out"  # an X-Robots-Tag directive forbids the use
ROBOTS = "robots"  # robots.txt disallows the URL for our user agent
ROBOTS_UNREACHABLE = "robots_unreachable"  # robots.txt answered 5xx or could not be fetched: all disallowed
RATE_LIMITED = "rate_limited"  # the host asked to wait longer than max_retry_after
HOST_UNREACHABLE = "host_unreachable"  # skipped: the host failed too many connections in a row


def http_status(status: int) -> str:
    """The reason of a non-2xx, non-redirect answer: ``http_5xx`` for any 5xx, else ``http_<code>``."""
    return HTTP_5XX if status >= 500 else f"http_{status}"


RETRYABLE = frozenset(
    {
        TIMEOUT,
        CONNECTION_ERROR,
        TRUNCATED,
        HTTP_5XX,
        "http_408",
        "http_429",
        RATE_LIMITED,
        ROBOTS_UNREACHABLE,
        HOST_UNREACHABLE,
    }
)


def is_retryable(reason: str | None) -> bool:
    """True when a later attempt at a URL dropped with `reason` may succeed."""
    return reason in RETRYABLE
