"""Parameters of the fetch stage (recipe key `fetch` in the stage list)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
    retries: int = Field(2, ge=0, le=20)  # extra attempts, only for retryable failures
    backoff_base: float = Field(1.0, ge=0)  # seconds; attempt n waits base * 2**n (+ jitter)
    backoff_max: float = Field(60.0, ge=0)  # cap on any single wait, Retry-After included
    max_redirects: int = Field(5, ge=0, le=30)
    max_bytes: int = Field(32 * 1024 * 1024, ge=1024)  # response size limit
    max_pixels: int = Field(89_478_485, ge=1)  # decompression-bomb limit (Pillow's default)
    user_agent: str = "curate/0.1 (image dataset builder; honours X-Robots-Tag noai/noimageai)"
    opt_out_directives: list[str] = list(DEFAULT_OPT_OUT)  # X-Robots-Tag values that forbid use
    user_agent_token: str = "curate"  # X-Robots-Tag "curate: noai" applies to us
    allow_private_addresses: bool = False  # loopback / private / link-local hosts refused unless true
    resize: ResizeParams = ResizeParams()
    encode: EncodeParams = EncodeParams()
