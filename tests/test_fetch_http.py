"""HttpFetcher against the loopback server: statuses, retries, redirects, limits, opt-out, address policy."""

import email.utils
import socket
import time

import pytest

from curate.demo.server import Route
from curate.fetch.config import FetchParams
from curate.fetch.http import HttpFetcher, forbidden_address, retry_after_seconds, robots_opt_out

BODY = bytes(range(256)) * 20  # 5120 bytes


def make_params(**overrides):
    values = dict(
        allow_private_addresses=True,
        host_rate=None,  # politeness has its own tests (test_fetch_politeness.py)
        threads=4,
        retries=2,
        backoff_base=0.01,
        backoff_max=0.5,
        connect_timeout=2.0,
        read_timeout=2.0,
    )
    values.update(overrides)
    return FetchParams(**values)


@pytest.fixture
def fetcher():
    """A factory of fetchers (loopback allowed, fast backoff), all closed after the test."""
    made = []

    def make(**overrides):
        made.append(HttpFetcher(make_params(**overrides)))
        return made[-1]

    yield make
    for item in made:
        item.close()


def serve(loopback, path, **route):
    loopback.routes[path] = Route(**route)
    return loopback.url(path)


def test_ok(loopback, fetcher):
    url = serve(loopback, "/img.jpg", body=BODY)
    result = fetcher().fetch(url)
    assert result.ok and result.reason is None
    assert result.body == BODY
    assert (result.status, result.content_type, result.attempts) == (200, "image/jpeg", 1)
    assert result.final_url == url
    assert result.content_length == len(BODY)
    assert loopback.routes["/img.jpg"].hits == 1


def test_user_agent_is_sent(loopback, fetcher):
    url = serve(loopback, "/img.jpg", body=BODY)
    fetcher(user_agent="curate-test/9").fetch(url)
    assert loopback.routes["/img.jpg"].request_headers[0]["User-Agent"] == "curate-test/9"


@pytest.mark.parametrize("status", [404, 403, 410, 400])
def test_client_errors_are_not_retried(loopback, fetcher, status):
    url = serve(loopback, "/gone", body=b"no", status=status, content_type="text/plain")
    result = fetcher().fetch(url)
    assert not result.ok and result.body is None
    assert result.reason == f"http_{status}"
    assert result.status == status
    assert loopback.routes["/gone"].hits == 1
    assert result.attempts == 1


def test_server_error_then_success(loopback, fetcher):
    url = serve(loopback, "/flaky", body=BODY, fail_times=1, fail_status=500)
    result = fetcher().fetch(url)
    assert result.ok and result.body == BODY
    assert result.attempts == 2
    assert loopback.routes["/flaky"].hits == 2


def test_server_error_forever(loopback, fetcher):
    url = serve(loopback, "/down", body=b"down", status=503, content_type="text/plain")
    result = fetcher(retries=2).fetch(url)
    assert result.reason == "http_5xx"
    assert result.status == 503
    assert loopback.routes["/down"].hits == 3
    assert result.attempts == 3
    assert "HTTP 503 after 3 attempts" in result.detail


def test_too_many_requests_forever(loopback, fetcher):
    url = serve(loopback, "/busy", status=429, content_type="text/plain")
    result = fetcher(retries=1).fetch(url)
    assert result.reason == "http_429"
    assert loopback.routes["/busy"].hits == 2


def test_retry_after_seconds_is_honoured(loopback, fetcher):
    url = serve(loopback, "/slowdown", body=BODY, fail_times=1, fail_status=429, fail_headers={"Retry-After": "1"})
    start = time.monotonic()
    result = fetcher(backoff_max=5.0).fetch(url)
    elapsed = time.monotonic() - start
    assert result.ok and result.attempts == 2
    assert 0.9 <= elapsed < 4.0


def test_retry_after_date_is_honoured(loopback, fetcher):
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    url = serve(loopback, "/later", body=BODY, fail_times=1, fail_status=503, fail_headers={"Retry-After": when})
    start = time.monotonic()
    result = fetcher(backoff_max=5.0).fetch(url)
    elapsed = time.monotonic() - start
    assert result.ok
    assert 0.9 <= elapsed < 4.0


def test_retry_after_is_not_cut_by_backoff_max(loopback, fetcher):
    url = serve(loopback, "/later", body=BODY, fail_times=1, fail_status=503, fail_headers={"Retry-After": "1"})
    start = time.monotonic()
    result = fetcher(backoff_max=0.05).fetch(url)
    assert result.ok
    assert time.monotonic() - start >= 0.9


def test_retry_after_above_max_retry_after_drops_at_once(loopback, fetcher):
    url = serve(loopback, "/never", body=BODY, fail_times=1, fail_status=503, fail_headers={"Retry-After": "120"})
    start = time.monotonic()
    result = fetcher().fetch(url)
    assert result.reason == "rate_limited"
    assert "Retry-After 120 s" in result.detail
    assert loopback.routes["/never"].hits == 1
    assert time.monotonic() - start < 1.0


def test_retry_after_parsing():
    now = 1_700_000_000.0
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_timeout(loopback, fetcher):
    url = serve(loopback, "/slow", body=BODY, delay=1.0)
    start = time.monotonic()
    result = fetcher(read_timeout=0.2, retries=1).fetch(url)
    assert result.reason == "timeout"
    assert result.attempts == 2
    assert time.monotonic() - start < 1.5


def test_connection_refused(fetcher):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = fetcher(retries=1, respect_robots=False).fetch(f"http://127.0.0.1:{port}/x.jpg")
    assert result.reason == "connection_error"
    assert result.attempts == 2
    result = fetcher(retries=1).fetch(f"http://127.0.0.1:{port}/x.jpg")  # its robots.txt cannot be fetched either
    assert result.reason == "connection_error"
    assert "robots.txt unreachable" in result.detail


def test_redirect_is_followed(loopback, fetcher):
    target = serve(loopback, "/real.jpg", body=BODY)
    url = serve(loopback, "/moved", redirect_to="/real.jpg")
    result = fetcher().fetch(url)
    assert result.ok and result.body == BODY
    assert result.url == url
    assert result.final_url == target


def test_redirect_loop(loopback, fetcher):
    url = serve(loopback, "/a", redirect_to="/b")
    serve(loopback, "/b", redirect_to="/a")
    result = fetcher(max_redirects=3).fetch(url)
    assert result.reason == "too_many_redirects"
    assert loopback.routes["/a"].hits + loopback.routes["/b"].hits == 4


def test_redirects_can_be_disabled(loopback, fetcher):
    serve(loopback, "/real.jpg", body=BODY)
    url = serve(loopback, "/moved", redirect_to="/real.jpg")
    assert fetcher(max_redirects=0).fetch(url).reason == "too_many_redirects"
    assert loopback.routes["/real.jpg"].hits == 0


def test_every_redirect_hop_is_checked(loopback, fetcher):
    url = serve(loopback, "/moved", redirect_to="ftp://example.com/secret.jpg")
    result = fetcher().fetch(url)
    assert result.reason == "invalid_url"
    assert result.final_url == "ftp://example.com/secret.jpg"


def test_dns_rebinding_cannot_reach_loopback(loopback, fetcher, monkeypatch):
    """The name is resolved once; the connection goes to the checked address, never to a second answer."""
    serve(loopback, "/img.jpg", body=BODY)
    port = int(loopback.base_url.rsplit(":", 1)[1])
    real_getaddrinfo = socket.getaddrinfo
    lookups, connects = [], []

    def rebinding_getaddrinfo(host, *args, **kwargs):
        if host != "rebind.example":
            return real_getaddrinfo(host, *args, **kwargs)
        lookups.append(host)
        address = "93.184.216.34" if len(lookups) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    def no_public_connect(sock, address):
        connects.append(address[0])
        raise ConnectionRefusedError("tests never connect to a public address")

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", no_public_connect)
    result = fetcher(allow_private_addresses=False, retries=1, respect_robots=False).fetch(
        f"http://rebind.example:{port}/img.jpg"
    )
    assert result.reason == "connection_error"
    assert lookups == ["rebind.example"]  # cached: the retry did not resolve again
    assert connects == ["93.184.216.34", "93.184.216.34"]
    assert loopback.routes["/img.jpg"].hits == 0


def test_truncated_body(loopback, fetcher):
    url = serve(loopback, "/cut.jpg", body=BODY, truncate_to=100)
    result = fetcher(retries=1).fetch(url)
    assert result.reason == "truncated"
    assert result.body is None
    assert loopback.routes["/cut.jpg"].hits == 2


def test_too_large_by_content_length(loopback, fetcher):
    url = serve(loopback, "/big.jpg", body=b"x" * 10_000)
    result = fetcher(max_bytes=4096).fetch(url)
    assert result.reason == "too_large"
    assert "Content-Length" in result.detail
    assert loopback.routes["/big.jpg"].hits == 1


def test_too_large_while_streaming(loopback, fetcher):
    url = serve(loopback, "/stream.jpg", body=b"x" * 100_000, chunked=True)
    result = fetcher(max_bytes=4096).fetch(url)
    assert result.reason == "too_large"
    assert result.content_length is None
    assert "exceeds" in result.detail


def test_chunked_body_within_limit(loopback, fetcher):
    url = serve(loopback, "/stream.jpg", body=BODY * 8, chunked=True)
    result = fetcher().fetch(url)
    assert result.ok and result.body == BODY * 8


@pytest.mark.parametrize(
    ("values", "opted_out"),
    [
        ("noai", True),
        ("noimageai", True),
        ("curate: noimageai", True),
        ("CURATE: NoAI", True),
        ("otherbot: noai", False),
        ("nofollow, noarchive", False),
        ("nofollow, NOAI", True),
        (["nofollow", "curate: noai"], True),
        (["otherbot: noai", "nosnippet"], False),
        ("otherbot: noai, noimageai", False),
    ],
)
def test_x_robots_tag(loopback, fetcher, values, opted_out):
    url = serve(loopback, "/tagged.jpg", body=BODY, headers={"X-Robots-Tag": values})
    result = fetcher().fetch(url)
    if opted_out:
        assert result.reason == "opt_out" and result.body is None
    else:
        assert result.ok and result.body == BODY


def test_robots_opt_out_parsing():
    directives = ["noai", "noimageai"]
    assert robots_opt_out(["unavailable_after: Wed, 25 Jun 2010 15:00:00 PST, noai"], directives, "curate") == "noai"
    assert robots_opt_out(["max-image-preview: none"], directives, "curate") is None
    assert robots_opt_out(["otherbot: noai", "curate: noimageai"], directives, "curate") == "noimageai"
    assert robots_opt_out(["otherbot: nofollow, curate: noai"], directives, "Curate") == "noai"
    assert robots_opt_out([], directives, "curate") is None


def test_private_address_refused(loopback, fetcher):
    url = serve(loopback, "/img.jpg", body=BODY)
    strict = fetcher(allow_private_addresses=False)
    result = strict.fetch(url)
    assert result.reason == "blocked_address"
    assert "127.0.0.1 is a non-public address" in result.detail  # refused before connecting
    by_name = strict.fetch(url.replace("127.0.0.1", "localhost"))
    assert by_name.reason == "blocked_address"
    assert "localhost resolves to non-public address" in by_name.detail
    assert loopback.routes["/img.jpg"].hits == 0
    assert fetcher(allow_private_addresses=True).fetch(url).ok


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "224.0.0.1", "0.0.0.0",
     "240.0.0.1", "100.64.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::"],
)
def test_forbidden_addresses(address):
    assert forbidden_address(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111"])
def test_public_addresses(address):
    assert not forbidden_address(address)


@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "not a url", "http://", "", "javascript:alert(1)", "//x/y"])
def test_invalid_url(fetcher, url):
    result = fetcher().fetch(url)
    assert result.reason == "invalid_url"
    assert result.attempts == 0


@pytest.mark.parametrize("allow_private", [True, False])
def test_dns_error(fetcher, allow_private):
    result = fetcher(allow_private_addresses=allow_private, retries=0).fetch("http://no-such-host.invalid/a.jpg")
    assert result.reason == "dns_error"


def test_fetch_many_keeps_order_and_never_raises(loopback, fetcher):
    urls = [
        serve(loopback, "/1.jpg", body=b"one" * 10),
        loopback.url("/nothing-here"),
        "ftp://example.com/x",
        serve(loopback, "/2.jpg", body=b"two" * 10, delay=0.2),
        serve(loopback, "/3.jpg", body=b"three" * 10),
    ]
    results = fetcher().fetch_many(urls)
    assert [r.url for r in results] == urls
    assert [r.reason for r in results] == [None, "http_404", "invalid_url", None, None]
    assert results[3].body == b"two" * 10


def test_fetch_many_after_runs_on_each_result(loopback, fetcher):
    urls = [serve(loopback, f"/{i}.jpg", body=bytes([i]) * 10) for i in range(6)]
    sizes = fetcher().fetch_many(urls, after=lambda result: (result.url, len(result.body)))
    assert sizes == [(url, 10) for url in urls]
