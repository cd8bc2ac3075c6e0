"""Fetch politeness holds for the whole run: rate, Retry-After pauses and robots.txt over 4 workers on 2 nodes.

The engine runs real fetch workers on a two-node local Ray cluster against one loopback host; the
server's request arrival times are the measure. The state logic of the run's limiter is tested
without Ray at the end.
"""

from __future__ import annotations

import asyncio
import bisect
import io
import math
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image
from rich.console import Console

from curate.demo.server import LoopbackServer, Route
from curate.engine.run import compile_plan, execute
from curate.recipe import load_recipe

RATE = 10.0  # host_rate of the rate run: requests per second to the one host, for the whole run
ALLOWED_PER_SECOND = 1.2 * RATE
WORKERS = 4
RETRY_AFTER = 2  # seconds a 429 asks for
ARRIVAL_JITTER = 0.06  # scheduling noise allowed on a span measured at the server
ROBOTS_TXT = b"User-agent: *\nDisallow: /private/\n"


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 60, 40)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def two_nodes():
    """A local Ray cluster of two nodes of 2 CPUs: 4 fetch workers of 0.8 CPU need both."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def socket_owners(inodes: set[str]) -> set[int]:
    """The pids of the processes that hold the sockets of `inodes` (Linux /proc)."""
    owners = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:  # gone, or not ours
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            owners.add(int(pid))
    return owners


def client_sockets(server_port: int) -> set[str]:
    """The inodes of the loopback sockets connected to `server_port` (Linux /proc/net/tcp)."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == server_port and fields[9] != "0":
                inodes.add(fields[9])
    return inodes


class ClientProcesses:
    """Which processes hold connections to the server (sampled while the run goes on)."""

    def __init__(self, port: int):
        self.port = port
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            inodes = client_sockets(self.port)
            if inodes:
                self.pids |= socket_owners(inodes)
            self._stop.wait(0.2)

    def __enter__(self) -> "ClientProcesses":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_fetch(tmp_path: Path, cluster, routes: dict[str, Route], paths: list[str], fetch: str) -> dict:
    """Fetch `paths` from a loopback server of `routes` in a real run (`fetch`: the stage's YAML flow mapping).

    Returns the server's arrival times of every request, the pids that connected, the drops and the routes.
    """
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "source: {type: url_list, path: urls.parquet}\n"
        f"stages:\n  fetch: {{allow_private_addresses: true, backoff_base: 0.01, threads: 4, {fetch}}}\n"
        f"output: {{path: out, formats: [parquet]}}\nengine: {{workers: {WORKERS}, rows_per_work_shard: 4}}\n")
    with LoopbackServer(routes) as server:
        urls = [server.url(path) for path in paths]
        pq.write_table(pa.table({"url": urls, "caption": [f"picture {n}" for n in range(len(urls))]}),
                       tmp_path / "urls.parquet")
        plan = compile_plan(load_recipe(recipe, [f"output.path={tmp_path / 'out'}"]))
        with ClientProcesses(int(server.base_url.rsplit(":", 1)[1])) as clients:
            manifest = execute(plan, Console(file=io.StringIO()), address=cluster.address, progress=False)
    assert manifest["reconciliation"]["ok"] and manifest["reconciliation"]["input_rows"] == len(paths)
    drops = {row["url"].removeprefix(server.base_url): row["reason"]
             for row in pq.read_table(tmp_path / "out" / "drops.parquet").to_pylist()}
    arrivals = sorted(moment for route in routes.values() for moment in route.hit_times)
    return {"arrivals": arrivals, "pids": clients.pids - {os.getpid()}, "drops": drops, "routes": routes}


def busiest_second(arrivals: list[float]) -> int:
    """The most requests that arrived within any 1-second window (sliding over the arrival times)."""
    return max(bisect.bisect_left(arrivals, start + 1.0) - index for index, start in enumerate(arrivals))


# --------------------------------------------------------------------------- a rate limit for the whole run


@pytest.fixture(scope="module")
def rate_run(two_nodes, tmp_path_factory):
    """One host with host_rate RATE, ~11 s of images and a robots.txt that disallows /private/."""
    body = jpeg()
    images = [f"/img/{n}.jpg" for n in range(100)]
    private = [f"/private/{n}.jpg" for n in range(4)]
    routes = {path: Route(body=body) for path in images + private}
    routes["/robots.txt"] = Route(body=ROBOTS_TXT, content_type="text/plain")
    paths = images[:50] + private + images[50:]
    return run_fetch(tmp_path_factory.mktemp("rate"), two_nodes, routes, paths, f"host_rate: {RATE:g}")


def test_the_rate_limit_holds_over_all_workers_of_the_run(rate_run):
    print(f"{len(rate_run['pids'])} processes fetched")
    assert len(rate_run["pids"]) >= WORKERS  # every fetch worker (4 processes, 2 per node) sent requests
    arrivals = rate_run["arrivals"]
    busiest = busiest_second(arrivals)
    print(f"busiest 1-s window: {busiest} requests (host_rate {RATE:g}, allowed {ALLOWED_PER_SECOND:g})")
    assert busiest <= ALLOWED_PER_SECOND
    assert arrivals[-1] - arrivals[0] >= (len(arrivals) - math.ceil(0.1 * RATE)) / RATE - ARRIVAL_JITTER
    assert [route.hits for path, route in rate_run["routes"].items() if path.startswith("/img/")] == [1] * 100


def test_robots_txt_is_fetched_once_per_run_and_obeyed_by_every_worker(rate_run):
    assert rate_run["routes"]["/robots.txt"].hits == 1
    assert {path: reason for path, reason in rate_run["drops"].items()} == {
        f"/private/{n}.jpg": "robots" for n in range(4)}
    assert all(rate_run["routes"][f"/private/{n}.jpg"].hits == 0 for n in range(4))


# --------------------------------------------------------------------------- a pause for the whole run


def test_a_429_seen_by_one_worker_pauses_every_worker(two_nodes, tmp_path):
    body = jpeg()
    images = [f"/img/{n}.jpg" for n in range(80)]
    routes = {path: Route(body=body, delay=0.03) for path in images}  # ~2.4 s of requests, one at a time
    busy = routes[images[40]]
    busy.fail_times, busy.fail_status, busy.fail_headers = 1, 429, {"Retry-After": str(RETRY_AFTER)}
    # One request in flight at a time over the whole run: none is under way when the 429 is answered.
    run = run_fetch(tmp_path, two_nodes, routes, images, "host_concurrency: 1, host_rate: null, respect_robots: false")

    assert len(run["pids"]) >= 2 and not run["drops"]
    refused_at = busy.hit_times[0]
    arrivals = run["arrivals"]
    later = arrivals[bisect.bisect_right(arrivals, refused_at):]
    earlier = arrivals[: bisect.bisect_left(arrivals, refused_at)]
    assert earlier and len(later) >= 10  # the 429 came mid-run, with requests before and after it
    quiet = later[0] - refused_at
    print(f"after the 429: no request for {quiet:.2f} s (Retry-After {RETRY_AFTER} s)")
    assert quiet >= RETRY_AFTER - ARRIVAL_JITTER
    assert busy.hits == 2  # asked again after the pause, and served


# --------------------------------------------------------------------------- the run's state, without Ray


@pytest.fixture
def run_politeness():
    import curate.fetch.run_politeness as module

    return module


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_holds_a_tenth_of_the_rate_and_at_least_one_token(run_politeness):
    clock = FakeClock()
    limits = run_politeness.RunHostLimits(concurrency=100, rate=50.0, max_wait=60, clock=clock)
    assert limits.take("h", 100).slots == 5  # a full bucket: capacity 0.1 x rate, not the rate
    refill = limits.take("h", 100)
    assert refill.slots == 0 and not refill.paused and refill.wait == pytest.approx(1 / 50)
    clock.now += 1.0
    window_start, started = clock.now, limits.take("h", 100).slots
    assert started == 5  # a second later: still at most the capacity
    while clock.now + 0.01 < window_start + 1.0:  # asking every 10 ms for the rest of that second
        clock.now += 0.01
        started += limits.take("h", 100).slots
    assert 50 <= started <= 5 + 50  # the rate and the bucket, no more
    assert run_politeness.bucket_capacity(2.0) == 1.0 and run_politeness.bucket_capacity(1000.0) == 100.0


def test_slots_in_use_are_bounded_by_the_concurrency_and_come_back_when_released(run_politeness):
    clock = FakeClock()
    limits = run_politeness.RunHostLimits(concurrency=3, rate=None, max_wait=60, slot_lease=50, clock=clock)
    assert limits.take("h", 2).slots == 2
    assert limits.take("h", 5).slots == 1
    assert limits.take("h", 1).wait == math.inf
    assert limits.take("other", 3).slots == 3  # per host
    limits.release("h", 2)
    assert limits.take("h", 5).slots == 2
    clock.now += 51  # never released (its worker died): reclaimed after the lease
    assert limits.take("h", 5).slots == 3


def test_a_pause_makes_every_asker_wait_and_a_long_one_refuses(run_politeness):
    clock = FakeClock()
    limits = run_politeness.RunHostLimits(concurrency=8, rate=None, max_wait=10, clock=clock)
    limits.pause("h", 3)
    grant = limits.take("h", 1)
    assert grant.slots == 0 and grant.paused and grant.wait == pytest.approx(3) and grant.refusal is None
    clock.now += 3
    assert limits.take("h", 1).slots == 1
    limits.pause("h", 30)
    refused = limits.take("h", 1)
    assert refused.refusal == "rate_limited" and refused.wait == pytest.approx(30) and "max_retry_after 10" in \
        refused.detail


def test_a_failing_host_is_refused_as_unreachable_for_its_cooldown(run_politeness):
    clock = FakeClock()
    limits = run_politeness.RunHostLimits(concurrency=8, rate=None, max_wait=60, max_failures=3,
                                          failure_cooldown=20, clock=clock)
    limits.record("h", failures=2)
    limits.record("h", failures=1, succeeded_first=True)  # a success in between: the count starts again
    assert limits.take("h", 1).slots == 1
    limits.record("h", failures=2)
    refused = limits.take("h", 1)
    assert refused.refusal == "host_unreachable" and refused.wait == pytest.approx(20)
    clock.now += 20
    assert limits.take("h", 1).slots == 1  # one more chance after the cooldown...
    limits.record("h", failures=1)
    assert limits.take("h", 1).refusal == "host_unreachable"  # ...and one more failure skips it again


def test_a_host_in_use_is_not_forgotten_when_many_hosts_come(run_politeness):
    clock = FakeClock()
    limits = run_politeness.RunHostLimits(concurrency=1, rate=None, max_wait=60, max_hosts=2, clock=clock)
    assert limits.take("busy", 1).slots == 1
    limits.take("idle", 1)
    limits.release("idle", 1)
    limits.take("new", 1)
    assert limits.take("busy", 1).wait == math.inf  # still in use: not forgotten


def test_robots_txt_is_claimed_by_the_first_asker_and_passed_on_if_never_answered(run_politeness):
    clock = FakeClock()
    board = run_politeness.RobotsBoard(max_origins=10, claim_lease=30, clock=clock)
    origin = ("http", "h", 80)
    assert board.look(origin).fetch
    assert board.look(origin).wait == pytest.approx(30)  # the others wait for the claimant
    board.answer(origin, "rules", ttl=100)
    clock.now += 40
    assert board.look(origin).answer == ("rules", pytest.approx(60))
    clock.now += 60
    assert board.look(origin).fetch  # expired: fetched again
    board.abandon(origin)
    assert board.look(origin).fetch  # abandoned: the next asker claims it
    clock.now += 31
    assert board.look(origin).fetch  # a claim never answered lapses


def test_the_service_holds_an_asker_until_a_slot_is_released_and_robots_waiters_until_the_answer():
    import curate.fetch.politeness_service as service_module

    async def scenario():
        service = service_module.PolitenessService(concurrency=1, rate=None, max_wait=60, max_failures=0,
                                                   failure_cooldown=0, max_hosts=10, slot_lease=60,
                                                   robots_claim_lease=30)
        assert (await service.take("h", 4)).slots == 1
        held = asyncio.create_task(service.take("h", 4))
        await asyncio.sleep(0.05)
        assert not held.done()
        await service.report({"h": (1, 0, False)})
        assert (await asyncio.wait_for(held, 1)).slots == 1
        await service.pause("h", 5)
        paused = await service.take("h", 1)
        assert paused.paused and paused.wait == pytest.approx(5, abs=0.1)

        origin = ("http", "h", 80)
        assert await service.robots(origin) is None  # the first asker fetches
        waiter = asyncio.create_task(service.robots(origin))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await service.robots_answer(origin, "rules", 100)
        rules, ttl = await asyncio.wait_for(waiter, 1)
        assert rules == "rules" and 99 < ttl <= 100

    asyncio.run(scenario())
