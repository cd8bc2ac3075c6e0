"""The address guard, the DNS cache and `resolve` pins; no test here ever connects to a non-loopback address."""

import io
import ipaddress
import json
import socket
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError
from rich.console import Console

from curate.demo.server import LoopbackServer, Route
from curate.fetch.config import FetchParams
from curate.fetch.http import HttpFetcher
from curate.fetch.resolver import ResolveError, Resolver, forbidden_address

BODY = b"\xff\xd8" + bytes(range(256)) * 4
PUBLIC = "93.184.216.34"  # a public address the stub resolver hands out; never connected to


@pytest.fixture(autouse=True)
def only_loopback_connections(request, monkeypatch):
    """Fail the test on any connection (or system lookup) beyond loopback.

    Not for the engine run: there the fetching happens in Ray worker processes, and Ray's
    own start-up in this process has its own network habits.
    """
    if "local_ray" in request.fixturenames:
        return
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(sock, address):
        if isinstance(address, tuple) and not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"a connection to {address[0]} was attempted")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("localhost", None) and not _is_ip_literal(host):
            raise AssertionError(f"a system lookup of {host} was attempted")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def _is_ip_literal(host) -> bool:
    try:
        ipaddress.ip_address(str(host).strip("[]"))
    except ValueError:
        return False
    return True


class StubDns:
    """A resolver stub: host -> addresses; counts lookups."""

    def __init__(self, table):
        self.table = table
        self.lookups = []

    def __call__(self, host):
        self.lookups.append(host)
        if host not in self.table:
            raise ResolveError(f"cannot resolve {host}: Name or service not known")
        return list(self.table[host])


DNS = {
    "public.example": [PUBLIC],
    "metadata.internal": ["169.254.169.254"],
    "intranet.example": ["10.1.2.3"],
    "mixed.example": [PUBLIC, "192.168.0.10"],
    "v6.example": ["fd00:ec2::254"],
    "nat64-loopback.example": ["64:ff9b::7f00:1"],
    "localhost": ["::1", "127.0.0.1"],
}


@pytest.fixture
def fetcher():
    """A factory of strict fetchers (private addresses refused) with the stub resolver."""
    made = []

    def make(dns=None, **overrides):
        values = dict(threads=4, retries=0, connect_timeout=2.0, read_timeout=2.0, host_rate=None)
        values.update(overrides)
        made.append(HttpFetcher(FetchParams(**values), lookup=dns or StubDns(DNS)))
        return made[-1]

    yield make
    for item in made:
        item.close()


def port_of(server) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.jpg",
        "http://10.0.0.1/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://168.63.129.16/machine",
        "http://[::1]/a.jpg",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::ffff:10.0.0.1]/a.jpg",
        "http://0.0.0.0/a.jpg",
        "https://192.168.1.1:8443/a.jpg",
        "http://metadata.internal/computeMetadata/v1/",
        "http://intranet.example/a.jpg",
        "http://mixed.example/a.jpg",
        "http://v6.example/a.jpg",
        "http://nat64-loopback.example/a.jpg",
        "http://localhost/a.jpg",
    ],
)
def test_private_targets_are_refused_without_connecting(fetcher, url):
    result = fetcher().fetch(url)
    assert result.reason == "blocked_address"
    assert result.attempts == 0 and result.url == url


@pytest.mark.parametrize(
    "url",
    ["ftp://public.example/a.jpg", "file:///etc/passwd", "gopher://public.example/", "data:image/png;base64,AAAA",
     "javascript:alert(1)", "//public.example/a.jpg", "http:///a.jpg"],
)
def test_only_http_and_https(fetcher, url):
    result = fetcher().fetch(url)
    assert result.reason == "invalid_url" and result.attempts == 0


def test_unknown_host_is_a_dns_error(fetcher):
    assert fetcher().fetch("http://no-such-host.example/a.jpg").reason == "dns_error"


@pytest.fixture
def pinned(loopback):
    """The loopback server as images.example.org (pinned), with redirects to forbidden places."""
    port = port_of(loopback)
    loopback.routes["/a.jpg"] = Route(body=BODY)
    loopback.routes["/to-metadata"] = Route(redirect_to="http://metadata.internal/latest/meta-data/")
    loopback.routes["/to-loopback"] = Route(redirect_to=f"http://127.0.0.1:{port}/a.jpg")
    loopback.routes["/to-file"] = Route(redirect_to="file:///etc/passwd")
    loopback.routes["/to-public"] = Route(redirect_to="http://public.example/a.jpg")
    return loopback, f"http://images.example.org:{port}", {"images.example.org": "127.0.0.1"}


def test_resolve_pin_serves_the_input_url(pinned, fetcher):
    loopback, base, pins = pinned
    dns = StubDns(DNS)
    result = fetcher(dns=dns, resolve=pins).fetch(base + "/a.jpg")
    assert result.ok and result.body == BODY
    assert result.url == result.final_url == base + "/a.jpg"
    assert loopback.routes["/a.jpg"].request_headers[0]["Host"] == base.removeprefix("http://")
    assert dns.lookups == []  # a pinned name is never looked up


@pytest.mark.parametrize(
    ("path", "reason", "final_url"),
    [
        ("/to-metadata", "blocked_address", "http://metadata.internal/latest/meta-data/"),
        ("/to-loopback", "blocked_address", None),
        ("/to-file", "invalid_url", "file:///etc/passwd"),
    ],
)
def test_every_redirect_is_checked_before_connecting(pinned, fetcher, path, reason, final_url):
    loopback, base, pins = pinned
    result = fetcher(resolve=pins).fetch(base + path)
    assert result.reason == reason
    assert result.url == base + path
    if final_url:
        assert result.final_url == final_url
    assert loopback.routes["/a.jpg"].hits == 0
    assert loopback.routes[path].hits == 1


def test_redirect_to_a_public_host_connects_to_its_checked_address(pinned, fetcher, monkeypatch):
    """The redirect target passes the guard; the connection goes to the address the stub gave, nowhere else."""
    loopback, base, pins = pinned
    attempted = []

    def refuse(sock, address):
        attempted.append(address[0])
        raise ConnectionRefusedError("refused by the test")

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda s, a: refuse(s, a) if a[0] == PUBLIC else real_connect(s, a))
    result = fetcher(resolve=pins, respect_robots=False).fetch(base + "/to-public")
    assert result.reason == "connection_error"
    assert attempted == [PUBLIC]


def test_private_addresses_allowed_when_asked(loopback, fetcher):
    loopback.routes["/a.jpg"] = Route(body=BODY)
    assert fetcher(allow_private_addresses=True).fetch(loopback.url("/a.jpg")).ok
    assert fetcher().fetch(loopback.url("/a.jpg")).reason == "blocked_address"
    assert loopback.routes["/a.jpg"].hits == 1


def test_dns_answers_are_cached(pinned, fetcher):
    loopback, base, pins = pinned
    dns = StubDns({**DNS, "cdn.example": ["127.0.0.1"]})
    many = fetcher(dns=dns, allow_private_addresses=True)
    port = port_of(loopback)
    results = many.fetch_many([f"http://cdn.example:{port}/a.jpg?n={n}" for n in range(5)])
    assert all(result.ok for result in results)
    assert dns.lookups == ["cdn.example"]
    assert many.fetch("http://gone.example/a.jpg").reason == "dns_error"
    assert many.fetch("http://gone.example/b.jpg").reason == "dns_error"
    assert dns.lookups.count("gone.example") == 1  # failures are remembered for a while too


def test_resolver_ttl_and_bound():
    clock = [0.0]
    dns = StubDns({"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2"], "c.example": ["192.0.2.3"]})
    resolver = Resolver(ttl=60, max_entries=2, lookup=dns, clock=lambda: clock[0])
    assert resolver.resolve("A.Example.").addresses == ("192.0.2.1",)
    resolver.resolve("a.example")
    assert dns.lookups == ["a.example"]
    clock[0] = 61
    resolver.resolve("a.example")
    assert dns.lookups == ["a.example", "a.example"]
    resolver.resolve("b.example")
    resolver.resolve("c.example")  # the bound evicts a.example
    resolver.resolve("a.example")
    assert dns.lookups.count("a.example") == 3
    assert resolver.resolve("[2001:db8::1]").addresses == ("2001:db8::1",)  # literals need no lookup
    assert dns.lookups.count("2001:db8::1") == 0


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("168.63.129.16", True),  # Azure WireServer: a global address, refused by name
        ("169.254.170.2", True),
        ("64:ff9b::a00:1", True),  # NAT64 of 10.0.0.1
        ("64:ff9b::808:808", False),  # NAT64 of 8.8.8.8
        ("2002:7f00:1::", True),  # 6to4 of 127.0.0.1
        ("2002:0808:0808::", False),  # 6to4 of 8.8.8.8
        ("::ffff:169.254.169.254", True),
        ("198.18.0.1", True),  # benchmarking range
        ("8.8.8.8", False),
    ],
)
def test_forbidden_address_table(address, forbidden):
    assert forbidden_address(address) is forbidden


@pytest.mark.parametrize(
    "pins",
    [{"images.example.org": "not-an-address"}, {"http://images.example.org": "127.0.0.1"},
     {"images.example.org:8080": "127.0.0.1"}, {"": "127.0.0.1"}],
)
def test_bad_resolve_pins_are_refused(pins):
    with pytest.raises(ValidationError):
        FetchParams(resolve=pins)


def test_resolve_pins_are_normalised():
    assert FetchParams(resolve={"Images.Example.ORG.": "[::1]"}).resolve == {"images.example.org": "::1"}


# --------------------------------------------------------------------------- one engine run


def jpeg(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (20, 120, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_engine_run_keeps_input_urls_with_pins_and_records_guard_drops(local_ray, tmp_path):
    from curate.engine.run import compile_plan, execute
    from curate.recipe import load_recipe

    routes = {
        "/robots.txt": Route(body=b"User-agent: *\nDisallow: /private/\n", content_type="text/plain"),
        "/img/1.jpg": Route(body=jpeg(40)),
        "/img/2.jpg": Route(body=jpeg(48)),
        "/private/3.jpg": Route(body=jpeg(56)),
        "/img/moved.jpg": Route(redirect_to="/img/1.jpg"),
    }
    with LoopbackServer(routes) as server:
        port = port_of(server)
        routes_loopback = {"/img/to-loopback.jpg": Route(redirect_to=f"http://127.0.0.1:{port}/img/2.jpg")}
        server.routes.update(routes_loopback)
        base = f"http://images.example.org:{port}"
        paths = ["/img/1.jpg", "/img/2.jpg", "/private/3.jpg", "/img/moved.jpg", "/img/to-loopback.jpg",
                 "/img/missing.jpg"]
        urls = [base + path for path in paths]
        pq.write_table(pa.table({"url": urls, "caption": [f"picture {n}" for n in range(len(urls))]}),
                       tmp_path / "urls.parquet")
        (tmp_path / "recipe.yaml").write_text(
            "source: {type: url_list, path: urls.parquet}\n"
            "stages:\n"
            "  fetch: {resolve: {images.example.org: 127.0.0.1}, retries: 0, host_rate: null}\n"
            "output: {path: out, formats: [parquet, webdataset]}\n"
        )
        plan = compile_plan(load_recipe(tmp_path / "recipe.yaml", [f"output.path={tmp_path / 'out'}"]))
        manifest = execute(plan, Console(file=io.StringIO()), progress=False)
        hits = {path: route.hits for path, route in server.routes.items()}
        hosts = {headers["Host"] for route in server.routes.values() for headers in route.request_headers}

    out = tmp_path / "out"
    assert manifest["reconciliation"]["ok"] and manifest["reconciliation"]["input_rows"] == len(urls)
    kept = pq.read_table(sorted((out / "parquet").glob("*.parquet"))).to_pylist()
    assert sorted(row["image_meta"][0]["url"] for row in kept) == sorted(urls[:2] + [urls[3]])
    assert all(row["images"][0]["bytes"] for row in kept)
    tar_urls = []
    for tar_path in sorted((out / "webdataset").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    tar_urls.append(json.loads(tar.extractfile(member).read())["image_meta"][0]["url"])
    assert sorted(tar_urls) == sorted(urls[:2] + [urls[3]])
    drops = {row["url"]: row["reason"] for row in pq.read_table(out / "drops.parquet").to_pylist()}
    assert drops == {urls[2]: "robots", urls[4]: "blocked_address", urls[5]: "http_404"}
    assert manifest["drop_log"]["by_reason"] == {"robots": 1, "blocked_address": 1, "http_404": 1}
    assert manifest["recipe"]["resolved"]["stages"]["fetch"]["resolve"] == {"images.example.org": "127.0.0.1"}
    assert "127.0.0.1:" not in json.dumps(manifest)  # no URL of the manifest names the pinned address
    assert hits["/private/3.jpg"] == 0 and hits["/robots.txt"] >= 1
    assert hosts == {f"images.example.org:{port}"}
