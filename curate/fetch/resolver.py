"""Host name resolution cached inside the process, pinned hosts, and the address guard.

The fetcher resolves each host once per `ttl` here, checks the addresses with
`forbidden_address`, and then connects to exactly those addresses: urllib3 never
resolves the name again, so a name cannot resolve to a public address for the
check and to a private one for the connection (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from curate.fetch.cache import TtlCache

# Cloud metadata and platform endpoints. Most are also link-local, private or shared
# address space, but Azure's WireServer (168.63.129.16) is a global address.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, Oracle, DigitalOcean, OpenStack instance metadata
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata
        "168.63.129.16",  # Azure WireServer
    )
)
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: judged by the embedded IPv4
NEGATIVE_TTL = 30.0  # seconds a failed lookup is remembered


class ResolveError(Exception):
    """The host name does not resolve (a drop with reason dns_error)."""


class InvalidHost(ValueError):
    """The host name cannot be looked up at all (a drop with reason invalid_url)."""


@dataclass(frozen=True)
class Resolution:
    """The addresses of a host, in the order to try them; `pinned` when set by the `resolve` option."""

    addresses: tuple[str, ...]
    pinned: bool = False


def forbidden_address(address: str) -> bool:
    """True for addresses a fetch must not reach unless private addresses are allowed.

    Loopback, private, link-local, shared (CGNAT), multicast, reserved, unspecified or any other
    non-global address, and the cloud metadata endpoints. An IPv6 address that embeds an IPv4
    one (IPv4-mapped, 6to4, well-known NAT64) is judged by the IPv4 address.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip in METADATA_ADDRESSES:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return forbidden_address(str(embedded))
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def ip_literal(host: str) -> str | None:
    """`host` as a normalised IP address if it is one (brackets and IPv6 zone allowed), else None."""
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


def system_lookup(host: str) -> list[str]:
    """The addresses of `host` from the system resolver (getaddrinfo), IPv4 and IPv6, deduplicated."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ResolveError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    except (UnicodeError, ValueError) as exc:
        raise InvalidHost(f"bad host name {host!r}: {exc}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def normalise_host(host: str) -> str:
    """Lower case, without IPv6 brackets or a trailing dot."""
    return host.strip("[]").rstrip(".").lower()


class Resolver:
    """Resolve host names with an in-process cache (bounded LRU with TTL) and fixed pins.

    `pins` maps a host name to an address (like ``curl --resolve``): the name is never
    looked up and the address is used as given. `lookup(host) -> [address, ...]` is
    the real resolver (the system's by default); it raises ResolveError or InvalidHost.
    Failed lookups are remembered for a short while too.
    """

    def __init__(
        self,
        pins: Mapping[str, str] | None = None,
        ttl: float = 300.0,
        max_entries: int = 10_000,
        lookup: Callable[[str], list[str]] = system_lookup,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.pins = {normalise_host(host): ip_literal(address) or address for host, address in (pins or {}).items()}
        self.ttl = ttl
        self._lookup = lookup
        self._cache: TtlCache[str, Resolution | ResolveError] = TtlCache(max_entries, clock)

    def resolve(self, host: str) -> Resolution:
        """The addresses to connect to for `host`; raises ResolveError or InvalidHost."""
        host = normalise_host(host)
        if host in self.pins:
            return Resolution((self.pins[host],), pinned=True)
        literal = ip_literal(host)
        if literal is not None:
            return Resolution((literal,))
        found = self._cache.get(host, lambda: self._lookup_once(host))
        if isinstance(found, ResolveError):
            raise found
        return found

    def _lookup_once(self, host: str) -> tuple[Resolution | ResolveError, float]:
        try:
            addresses = self._lookup(host)
        except ResolveError as exc:
            return exc, min(self.ttl, NEGATIVE_TTL)
        if not addresses:
            return ResolveError(f"{host} has no address"), min(self.ttl, NEGATIVE_TTL)
        return Resolution(tuple(addresses)), self.ttl


def blocked_addresses(resolution: Resolution) -> list[str]:
    """The addresses of `resolution` the guard refuses (none for a pinned host: a pin is trusted)."""
    if resolution.pinned:
        return []
    return [address for address in resolution.addresses if forbidden_address(address)]
