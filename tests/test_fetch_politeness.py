"""Politeness of HttpFetcher against the loopback server: Retry-After, per-host limits, robots.txt, deadlines."""

import threading
import time

import pytest

from curate.demo.server import Route
from curate.fetch.cache import TtlCache
from curate.fetch.config import FetchParams
from curate.fetch.http import HttpFetcher
from curate.fetch.politeness import HostLimiter, HostRefused
from curate.fetch.reasons import RETRYABLE, is_retryable
from curate.fetch.robots import RobotsRules, normalise, parse_robots, pattern_matches

BODY = b"\xff\xd8" + bytes(range(256)) * 4
EPSILON = 0.02  # clock and scheduling jitter allowed below a minimum duration measured by the client
ARRIVAL_JITTER = 0.06  # the same for spans measured at the server (thread wake-up and send on a loaded machine)


@pytest.fixture
def fetcher():
    """A factory of fetchers on loopback (fast backoff unless overridden), all closed after the test."""
    made = []

    def make(**overrides):
        values = dict(allow_private_addresses=True, threads=8, retries=2, backoff_base=0.01, backoff_max=0.5,
                      connect_timeout=2.0, read_timeout=2.0)
        values.update(overrides)
        made.append(HttpFetcher(FetchParams(**values)))
        return made[-1]

    yield make
    for item in made:
        item.close()


def port_of(loopback) -> int:
    return int(loopback.base_url.rsplit(":", 1)[1])


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:])]


def assert_spaced(arrivals: list[float], interval: float) -> None:
    """Requests arrived at most one per `interval` on average, and never in a burst.

    One request that the loaded machine delivers late shortens the next gap, so single
    gaps are only required to be half the interval (an unlimited client gives ~1 ms).
    """
    assert arrivals[-1] - arrivals[0] >= (len(arrivals) - 1) * interval - ARRIVAL_JITTER
    assert min(gaps(arrivals)) >= interval / 2


# --------------------------------------------------------------------------- Retry-After and backoff


def test_429_with_retry_after_spaces_the_requests_and_is_finally_served(loopback, fetcher):
    loopback.routes["/busy.jpg"] = Route(body=BODY, fail_times=2, fail_status=429, fail_headers={"Retry-After": "1"})
    result = fetcher(host_rate=None).fetch(loopback.url("/busy.jpg"))
    assert result.ok and result.body == BODY
    assert result.attempts == 3
    spacing = gaps(loopback.routes["/busy.jpg"].hit_times)
    assert len(spacing) == 2 and min(spacing) >= 1.0 - EPSILON


def test_retry_after_pauses_every_request_to_that_host(loopback, fetcher):
    loopback.routes["/busy.jpg"] = Route(body=BODY, fail_times=1, fail_status=429, fail_headers={"Retry-After": "1"})
    loopback.routes["/other.jpg"] = Route(body=BODY)
    polite = fetcher(host_rate=None, respect_robots=False)
    first = threading.Thread(target=polite.fetch, args=(loopback.url("/busy.jpg"),))
    first.start()
    while loopback.routes["/busy.jpg"].hits == 0:
        time.sleep(0.01)
    time.sleep(0.1)  # the 429 reaches the fetcher
    assert polite.fetch(loopback.url("/other.jpg")).ok
    first.join()
    paused = loopback.routes["/other.jpg"].hit_times[0] - loopback.routes["/busy.jpg"].hit_times[0]
    assert paused >= 1.0 - EPSILON


def test_retry_after_above_max_retry_after_is_rate_limited_and_the_host_left_alone(loopback, fetcher):
    loopback.routes["/busy.jpg"] = Route(body=BODY, fail_times=5, fail_status=429, fail_headers={"Retry-After": "30"})
    loopback.routes["/other.jpg"] = Route(body=BODY)
    polite = fetcher(max_retry_after=5)
    start = time.monotonic()
    first = polite.fetch(loopback.url("/busy.jpg"))
    assert first.reason == "rate_limited"
    assert "Retry-After 30 s" in first.detail and first.attempts == 1
    second = polite.fetch(loopback.url("/other.jpg"))
    assert second.reason == "rate_limited" and second.attempts == 0
    assert "asked to wait" in second.detail
    assert loopback.routes["/busy.jpg"].hits == 1
    assert loopback.routes["/other.jpg"].hits == 0
    assert time.monotonic() - start < 2.0
    assert is_retryable("rate_limited")


def test_503_without_retry_after_is_retried_with_growing_backoff(loopback, fetcher):
    loopback.routes["/down.jpg"] = Route(body=BODY, fail_times=3, fail_status=503)
    result = fetcher(retries=3, backoff_base=0.1, backoff_max=5.0, host_rate=None).fetch(loopback.url("/down.jpg"))
    assert result.ok and result.attempts == 4
    spacing = gaps(loopback.routes["/down.jpg"].hit_times)
    for gap, delay in zip(spacing, (0.1, 0.2, 0.4)):
        assert delay - EPSILON <= gap < delay * 1.25 + 0.1  # base * 2**n, jitter adds at most 25%


@pytest.mark.parametrize("status", [404, 403, 410])
def test_final_statuses_are_never_retried(loopback, fetcher, status):
    loopback.routes["/gone.jpg"] = Route(status=status, content_type="text/plain", body=b"no")
    result = fetcher(retries=5).fetch(loopback.url("/gone.jpg"))
    assert result.reason == f"http_{status}" and result.attempts == 1
    assert loopback.routes["/gone.jpg"].hits == 1
    assert not is_retryable(result.reason)


def test_retryable_reasons():
    assert {"timeout", "connection_error", "http_408", "http_429", "http_5xx", "rate_limited"} <= RETRYABLE
    assert not RETRYABLE & {"http_404", "http_403", "http_410", "robots", "opt_out", "blocked_address", "invalid_url"}


# --------------------------------------------------------------------------- per-host limits


def test_rate_limit_spaces_the_requests_to_one_host(loopback, fetcher):
    loopback.routes["/warm.jpg"] = Route(body=BODY)
    loopback.routes["/img.jpg"] = Route(body=BODY)
    polite = fetcher(host_rate=5.0, respect_robots=False)
    assert polite.fetch(loopback.url("/warm.jpg")).ok  # the connection exists before the measured requests
    urls = [loopback.url(f"/img.jpg?n={n}") for n in range(6)]
    start = time.monotonic()
    results = polite.fetch_many(urls)
    elapsed = time.monotonic() - start
    assert all(result.ok for result in results)
    assert elapsed >= (6 - 1) / 5.0 - EPSILON
    assert_spaced(loopback.routes["/img.jpg"].hit_times, 1 / 5.0)


def test_two_hosts_are_limited_separately_and_interleave(loopback, fetcher):
    loopback.routes["/img.jpg"] = Route(body=BODY)
    port = port_of(loopback)
    pins = {"a.example": "127.0.0.1", "b.example": "127.0.0.1"}
    urls = [f"http://a.example:{port}/img.jpg?n={n}" for n in range(4)]
    urls += [f"http://b.example:{port}/img.jpg?n={n}" for n in range(4)]
    polite = fetcher(host_rate=4.0, respect_robots=False, resolve=pins, allow_private_addresses=False)
    loopback.routes["/warm.jpg"] = Route(body=BODY)
    assert all(result.ok for result in polite.fetch_many([f"http://{h}:{port}/warm.jpg" for h in pins]))
    start = time.monotonic()
    results = polite.fetch_many(urls)
    elapsed = time.monotonic() - start
    assert [result.url for result in results] == urls and all(result.ok for result in results)
    assert 3 / 4.0 - EPSILON <= elapsed < 7 / 4.0  # one host's spacing, not both hosts' in a row
    route = loopback.routes["/img.jpg"]
    hosts = [headers["Host"].split(":")[0] for _, headers in sorted(zip(route.hit_times, route.request_headers))]
    assert sorted(hosts[:2]) == ["a.example", "b.example"]
    assert sorted(hosts) == ["a.example"] * 4 + ["b.example"] * 4
    for host in ("a.example", "b.example"):
        times = [t for t, headers in zip(route.hit_times, route.request_headers) if headers["Host"].startswith(host)]
        assert_spaced(sorted(times), 1 / 4.0)


def test_concurrency_cap_per_host(loopback, fetcher):
    loopback.routes["/slow.jpg"] = Route(body=BODY, delay=0.3)
    urls = [loopback.url(f"/slow.jpg?n={n}") for n in range(6)]
    start = time.monotonic()
    results = fetcher(host_concurrency=2, host_rate=None, respect_robots=False).fetch_many(urls)
    assert all(result.ok for result in results)
    assert loopback.routes["/slow.jpg"].max_in_flight == 2
    assert time.monotonic() - start >= 3 * 0.3 - EPSILON


def test_a_host_that_keeps_failing_is_skipped(fetcher, loopback):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there: connections are refused
    dead = fetcher(retries=0, host_max_failures=2, respect_robots=False, resolve={"dead.example": "127.0.0.1"})
    reasons = [dead.fetch(f"http://dead.example:{port}/{n}.jpg") for n in range(4)]
    assert [result.reason for result in reasons] == ["connection_error"] * 2 + ["host_unreachable"] * 2
    assert [result.attempts for result in reasons] == [1, 1, 0, 0]
    loopback.routes["/img.jpg"] = Route(body=BODY)
    assert dead.fetch(loopback.url("/img.jpg")).ok  # another host is not affected


def test_a_host_whose_bodies_never_end_is_skipped(loopback, fetcher):
    loopback.routes["/endless.jpg"] = Route(body=b"x" * 256, endless=True, trickle=0.02)
    stuck = fetcher(retries=0, total_timeout=0.3, host_max_failures=2, respect_robots=False, host_rate=None)
    start = time.monotonic()
    results = [stuck.fetch(loopback.url(f"/endless.jpg?n={n}")) for n in range(5)]
    assert [result.reason for result in results] == ["timeout"] * 2 + ["host_unreachable"] * 3
    assert loopback.routes["/endless.jpg"].hits == 2
    assert time.monotonic() - start < 2 * 0.3 + 0.5


def test_host_limiter_unit():
    clock = [100.0]
    limiter = HostLimiter(concurrency=1, rate=None, max_wait=10, max_failures=2, failure_cooldown=60,
                          clock=lambda: clock[0])
    limiter.pause("h", 30)
    with pytest.raises(HostRefused) as refused:
        limiter._acquire("h")
    assert refused.value.reason == "rate_limited"
    clock[0] += 31
    with limiter.slot("h"):
        pass
    limiter.record("h", failed=True)
    limiter.record("h", failed=True)
    with pytest.raises(HostRefused) as refused:
        limiter._acquire("h")
    assert refused.value.reason == "host_unreachable"
    clock[0] += 61
    with limiter.slot("h"):  # one more chance after the cooldown
        pass
    limiter.record("h", failed=True)
    with pytest.raises(HostRefused):
        limiter._acquire("h")


# --------------------------------------------------------------------------- robots.txt


ROBOTS = "User-agent: *\nDisallow: /private/\n"


def test_robots_disallow_is_honoured_and_fetched_once(loopback, fetcher):
    loopback.routes["/robots.txt"] = Route(body=ROBOTS.encode(), content_type="text/plain")
    loopback.routes["/private/a.jpg"] = Route(body=BODY)
    loopback.routes["/public/a.jpg"] = Route(body=BODY)
    urls = [loopback.url(p) for p in ("/private/a.jpg", "/public/a.jpg", "/private/a.jpg?x=1", "/public/a.jpg?x=2")]
    results = fetcher().fetch_many(urls)
    assert [result.reason for result in results] == ["robots", None, "robots", None]
    assert "disallows /private/a.jpg for curate" in results[0].detail
    assert results[0].attempts == 0
    assert loopback.routes["/private/a.jpg"].hits == 0
    assert loopback.routes["/robots.txt"].hits == 1
    assert "curate" in loopback.routes["/robots.txt"].request_headers[0]["User-Agent"]


def test_robots_group_of_our_token(loopback, fetcher):
    robots = "User-agent: otherbot\nDisallow:\n\nUser-agent: curate\nDisallow: /\n\nUser-agent: *\nAllow: /\n"
    loopback.routes["/robots.txt"] = Route(body=robots.encode(), content_type="text/plain")
    loopback.routes["/a.jpg"] = Route(body=BODY)
    assert fetcher().fetch(loopback.url("/a.jpg")).reason == "robots"
    assert fetcher(user_agent_token="otherbot").fetch(loopback.url("/a.jpg")).ok
    assert fetcher(respect_robots=False).fetch(loopback.url("/a.jpg")).ok


@pytest.mark.parametrize(
    ("robots_route", "reason"),
    [
        (None, None),  # 404: no robots.txt, everything allowed
        (Route(status=403, content_type="text/plain", body=b"no"), None),  # any 4xx: allowed
        (Route(status=500, content_type="text/plain", body=b"down"), "robots_unreachable"),
        (Route(status=429, content_type="text/plain", body=b"slow down"), "robots_unreachable"),
        (Route(redirect_to="/real-robots.txt"), "robots"),  # redirects followed
        (Route(body=b"User-agent: *\nDisallow: /a", content_type="text/plain", headers={"X-Robots-Tag": "noindex"}),
         "robots"),  # X-Robots-Tag is about the answer it comes with, not about robots.txt's use
    ],
)
def test_robots_fetch_outcomes(loopback, fetcher, robots_route, reason):
    if robots_route is not None:
        loopback.routes["/robots.txt"] = robots_route
    loopback.routes["/real-robots.txt"] = Route(body=b"User-agent: *\nDisallow: /a", content_type="text/plain")
    loopback.routes["/a.jpg"] = Route(body=BODY)
    result = fetcher(retries=1).fetch(loopback.url("/a.jpg"))
    assert result.reason == reason
    assert loopback.routes["/a.jpg"].hits == (1 if reason is None else 0)


def test_robots_redirect_to_a_blocked_address_disallows(loopback, fetcher):
    port = port_of(loopback)
    loopback.routes["/robots.txt"] = Route(redirect_to=f"http://127.0.0.1:{port}/real-robots.txt")
    loopback.routes["/real-robots.txt"] = Route(body=b"User-agent: *\nAllow: /", content_type="text/plain")
    loopback.routes["/a.jpg"] = Route(body=BODY)
    strict = fetcher(allow_private_addresses=False, resolve={"images.example.org": "127.0.0.1"})
    result = strict.fetch(f"http://images.example.org:{port}/a.jpg")
    assert result.reason == "robots_unreachable" and "blocked_address" in result.detail
    assert loopback.routes["/real-robots.txt"].hits == 0 and loopback.routes["/a.jpg"].hits == 0


def test_robots_parser_follows_rfc_9309():
    text = (
        "\ufeffUser-agent: *\nDisallow: /\n\n"
        "user-agent: Curate/2.0  # our group, merged with the next one\n"
        "disallow: /images/\nallow: /images/public/\n"
        "Disallow: /*.gif$\nDisallow: /tmp\n\n"
        "User-agent: curate\nAllow: /images/public/x$\nDisallow: /caf%C3%A9\nDisallow: /%7Euser\n"
    )
    rules = parse_robots(text, "curate")
    assert rules.allows("/") and rules.allows("/index.html")
    assert not rules.allows("/images/a.jpg")
    assert rules.allows("/images/public/a.jpg")  # longer allow wins
    assert not rules.allows("/a.gif") and rules.allows("/a.gif?x=1")  # $ anchors the end
    assert not rules.allows("/tmp") and not rules.allows("/tmp/a") and not rules.allows("/tmpfile")
    assert not rules.allows("/café/a.jpg")  # non-ASCII compared percent-encoded
    assert not rules.allows("/~user/a.jpg")  # %7E is the unreserved "~"
    assert rules.allows("/robots.txt")
    other = parse_robots(text, "otherbot")  # falls back to the * group
    assert not other.allows("/index.html") and other.allows("/robots.txt")
    assert parse_robots("User-agent: otherbot\nDisallow: /\n", "curate").allows("/a")  # no group applies


def test_robots_allow_wins_a_tie_and_wildcards_match():
    rules = parse_robots("User-agent: *\nDisallow: /page\nAllow: /page\nDisallow: /a*b*c\n", "curate")
    assert rules.allows("/page")
    assert not rules.allows("/a-x-b-y-c-z") and rules.allows("/a-x-c-b")
    assert pattern_matches("/*" * 50 + "x", "/" + "a/" * 200) is False  # no backtracking blow-up
    assert normalise("/a%2fb%41") == "/a%2Fb" + "A"
    assert RobotsRules("unreachable").allows("/anything") is False


# --------------------------------------------------------------------------- deadlines


def test_slow_loris_host_cannot_hold_a_request_beyond_total_timeout(loopback, fetcher):
    loopback.routes["/trickle.jpg"] = Route(body=BODY, trickle=0.05)  # a byte every 50 ms: no read ever times out
    start = time.monotonic()
    result = fetcher(total_timeout=1.0, read_timeout=2.0, retries=0, respect_robots=False).fetch(
        loopback.url("/trickle.jpg")
    )
    elapsed = time.monotonic() - start
    assert result.reason == "timeout"
    assert "total_timeout 1 s" in result.detail
    assert 1.0 - EPSILON <= elapsed < 1.0 + 0.5


def test_a_body_that_never_ends_times_out(loopback, fetcher):
    loopback.routes["/endless.jpg"] = Route(body=b"x" * 512, endless=True, trickle=0.02)
    start = time.monotonic()
    result = fetcher(total_timeout=0.8, retries=1, respect_robots=False).fetch(loopback.url("/endless.jpg"))
    elapsed = time.monotonic() - start
    assert result.reason == "timeout" and result.attempts == 2
    assert 2 * 0.8 - EPSILON <= elapsed < 2 * 0.8 + 0.6


def test_fetch_many_with_stuck_hosts_finishes(loopback, fetcher):
    loopback.routes["/trickle.jpg"] = Route(body=BODY, trickle=0.1)
    loopback.routes["/ok.jpg"] = Route(body=BODY)
    urls = [loopback.url(f"/trickle.jpg?n={n}") for n in range(3)] + [loopback.url("/ok.jpg")]
    start = time.monotonic()
    results = fetcher(total_timeout=0.7, retries=0, host_rate=None).fetch_many(urls)
    assert [result.reason for result in results] == ["timeout", "timeout", "timeout", None]
    assert time.monotonic() - start < 0.7 + 1.0


# --------------------------------------------------------------------------- the cache


def test_ttl_cache_bounds_expires_and_computes_once():
    clock = [0.0]
    cache = TtlCache(max_entries=2, clock=lambda: clock[0])
    calls = []

    def compute(key, ttl=10.0):
        def run():
            calls.append(key)
            return key.upper(), ttl
        return run

    assert cache.get("a", compute("a")) == "A"
    assert cache.get("a", compute("a")) == "A"
    cache.get("b", compute("b"))
    cache.get("c", compute("c"))  # evicts "a", the least recently used
    assert len(cache) == 2
    cache.get("a", compute("a"))
    assert calls == ["a", "b", "c", "a"]
    clock[0] = 11.0
    cache.get("a", compute("a"))  # expired
    assert calls[-1] == "a" and len(calls) == 5

    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(5)
        calls.append("slow")
        return "S", 10.0

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("s", slow))) for _ in range(4)]
    for thread in threads:
        thread.start()
    started.wait(5)
    time.sleep(0.05)
    release.set()
    for thread in threads:
        thread.join()
    assert results == ["S"] * 4 and calls.count("slow") == 1
