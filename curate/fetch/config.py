"""Parameters of the fetch stage (recipe key `fetch` in the stage list)."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator

from curate.stage import Params

DEFAULT_OPT_OUT = ("noai", "noimageai", "noindex", "noimageindex")


class ResizeParams(Params):
    """How fetched images are resized before re-encoding."""

    mode: Literal["keep_ratio", "center_crop", "border", "none"] = "keep_ratio"
    # keep_ratio: scale so that the `side` side equals `size`.
    # center_crop: scale the shortest side to `size`, then crop to size x size.
    # border: fit inside size x size and pad with `border_color`.
    # none: keep the decoded size.
    # only_if_bigger: never upscale. An image already within `size` keeps its scale;
    # center_crop then crops it to a square of its shortest side and border pads it
    # to a square of its longest side.
    side: Literal["longest", "shortest"] = "longest"
    size: int = Field(1024, ge=8, le=16384)
    only_if_bigger: bool = True
    border_color: tuple[int, int, int] = (255, 255, 255)


class EncodeParams(Params):
    """How images are re-encoded after decode and resize."""

    format: Literal["jpg", "webp", "png"] = "jpg"
    quality: int = Field(95, ge=1, le=100)


class FetchParams(Params):
    """Downloading, politeness and decoding limits."""

    threads: int = Field(32, ge=1, le=1024)
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(20.0, gt=0)
    total_timeout: float = Field(30.0, gt=0)  # whole request: connect, headers and body, even trickled
    retries: int = Field(2, ge=0, le=20)  # extra attempts, only for retryable failures
    backoff_base: float = Field(1.0, ge=0)  # seconds; attempt n waits base * 2**n (+ jitter)
    backoff_max: float = Field(60.0, ge=0)  # cap on one backoff wait (Retry-After is bounded by max_retry_after)
    max_retry_after: float = Field(60.0, ge=0)  # a longer Retry-After drops the URL as rate_limited
    max_redirects: int = Field(5, ge=0, le=30)
    max_bytes: int = Field(32 * 1024 * 1024, ge=1024)  # response size limit
    # image_meta.pixel_sha256 and phash (for dedup, decontamination and hash blocklists), about 1 ms per image.
    # A recipe that turns them off cannot have a stage that reads them (checked when the plan is compiled).
    fingerprints: bool = True
    max_pixels: int = Field(89_478_485, ge=1)  # decompression-bomb limit (Pillow's default)
    user_agent: str = "curate/0.1 (image dataset builder; honours robots.txt and X-Robots-Tag noai/noimageai)"
    opt_out_directives: list[str] = list(DEFAULT_OPT_OUT)  # X-Robots-Tag values that forbid use
    user_agent_token: str = "curate"  # robots.txt group "User-agent: curate" and X-Robots-Tag "curate: noai"
    allow_private_addresses: bool = False  # loopback / private / link-local / metadata hosts refused unless true
    resolve: dict[str, str] = {}  # host -> address pins (like curl --resolve); URLs and Host header unchanged
    # Politeness holds for the whole run, over all fetch workers and nodes (curate/fetch/politeness_service.py).
    respect_robots: bool = True  # robots.txt of each origin fetched once per run and obeyed (RFC 9309)
    host_concurrency: int = Field(8, ge=1, le=1024)  # requests in flight to one host, per run
    # request starts per second to one host, per run (a token bucket of max(1, rate / 10) tokens); null: no limit
    host_rate: float | None = Field(10.0, gt=0)
    host_max_failures: int = Field(8, ge=0)  # so many timeouts / connection errors in a row skip a host; 0: never
    host_failure_cooldown: float = Field(300.0, ge=0)  # seconds a failing host is skipped (by every worker)
    dns_cache_ttl: float = Field(300.0, ge=0)  # seconds a resolved host name is reused
    host_cache_size: int = Field(10_000, ge=1)  # hosts remembered (DNS, robots.txt, politeness state)
    # An image that cannot be fetched: drop_sample drops its sample (reason of the first failing image);
    # drop_image removes just that image from an interleaved document, recorded in meta.removed_images
    # (pairs and edits are always dropped: they are nothing without their images).
    on_image_failure: Literal["drop_sample", "drop_image"] = "drop_sample"
    resize: ResizeParams = ResizeParams()
    encode: EncodeParams = EncodeParams()

    @field_validator("resolve")
    @classmethod
    def _pins_map_host_names_to_addresses(cls, pins: dict[str, str]) -> dict[str, str]:
        checked = {}
        for host, address in pins.items():
            name = host.strip().rstrip(".").lower()
            if not name or any(char in name for char in "/:@[] \t"):
                raise ValueError(f"{host!r} is not a host name (no scheme, port or path)")
            try:
                checked[name] = str(ipaddress.ip_address(address.strip().strip("[]")))
            except ValueError:
                raise ValueError(f"{host!r} must map to an IP address, not {address!r}") from None
        return checked
