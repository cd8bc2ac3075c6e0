"""What every exporter shares: reading an output's samples, the role's caption policy, and resizing images.

Samples are read as SAMPLE_SCHEMA rows (python dicts) from the output's Parquet shards, one row
group at a time (without the `embeddings` column), or, when the output has no Parquet shards, from
its WebDataset tars one sample at a time (members and packed layouts).

A role's policy comes from the output's resolved recipe, `recipe.resolved.roles.<role>`:
`captions` (caption variant names in preference order) and `resolution` (how images are resized).
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from curate.files import sha256_file
from curate.report.reader import OutputUnreadable, open_output
from curate.sinks.webdataset import read_samples, row_from_members

ROWS_PER_SLICE = 256
JPEG_QUALITY = 95
PASSTHROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # Pillow format -> file extension
DEFAULT_CAPTIONS = ("alt",)

# Skip reasons: why a sample of the chosen role is not in the export (counted in export.json).
KIND_NOT_SUPPORTED = "kind_not_supported"  # the format has no place for this kind of sample
PAIR_NOT_DOCUMENT = "pair_not_document"  # a pair asked for in a document format (see pairs_as_documents)
NO_CAPTION = "no_caption"  # no caption variant the policy allows
NO_IMAGE = "no_image"  # a sample without images, or an image without bytes
UNDECODABLE_IMAGE = "undecodable_image"  # Pillow cannot decode one of the sample's images
NO_INSTRUCTION = "no_instruction"  # an edit turn without an instruction
EDIT_CHAIN_NOT_LINEAR = "edit_chain_not_linear"  # a turn whose input is not the previous turn's output
DUPLICATE_KEY = "duplicate_key"  # a key already exported (an output listing a sample in two shards)


class ExportError(ValueError):
    """The export cannot start or go on (bad arguments, unreadable output, unknown role)."""


class Skip(Exception):
    """A sample that is left out of the export, and why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- the output to read


@dataclass
class SourceOutput:
    """A finished output folder as an export reads it."""

    root: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    read_from: str  # "parquet" or "webdataset"
    files: list[Path]

    def describe(self) -> dict[str, Any]:
        """Where the export comes from, for export.json."""
        recipe = self.manifest.get("recipe") or {}
        return {
            "path": str(self.root),
            "manifest_sha256": self.manifest_sha256,
            "recipe_name": recipe.get("name"),
            "recipe_sha256": recipe.get("sha256"),
            "rows": (self.manifest.get("outputs") or {}).get("rows"),
            "read_from": self.read_from,
            "files": [str(file.relative_to(self.root)) for file in self.files],
        }


def open_source(path: str | Path) -> SourceOutput:
    """Open the output folder to export; ExportError when it is not a readable, finished output."""
    try:
        output = open_output(path)
    except OutputUnreadable as error:
        raise ExportError(str(error)) from None
    if output.manifest.get("status") not in (None, "complete"):
        raise ExportError(f"{output.root}: the output is not complete (status {output.manifest.get('status')!r})")
    for fmt in ("parquet", "webdataset"):
        if fmt in output.formats:
            listed = [s for s in output.manifest["outputs"].get("shards", []) if s["format"] == fmt]
            files = output.shard_files(fmt)
            if len(files) != len(listed):
                missing = sorted({s["path"] for s in listed} - {str(f.relative_to(output.root)) for f in files})
                raise ExportError(f"{output.root}: shard files listed in the manifest are missing: {missing[:5]}")
            sha = sha256_file(output.root / "manifest.json")
            return SourceOutput(output.root, output.manifest, sha, fmt, files)
    raise ExportError(f"{output.root}: the output has neither Parquet nor WebDataset shards "
                      f"(formats {output.formats})")


def iter_samples(source: SourceOutput) -> Iterator[dict[str, Any]]:
    """Every sample of `source` as a SAMPLE_SCHEMA row without embeddings, in shard order."""
    if source.read_from == "parquet":
        yield from iter_parquet_rows(source.files)
    else:
        yield from iter_tar_rows(source.files)


def iter_parquet_rows(files: list[Path]) -> Iterator[dict[str, Any]]:
    """The rows of Parquet shards, read one row group at a time, converted a bounded slice at a time."""
    for file in files:
        try:
            handle = pq.ParquetFile(file)
            columns = [name for name in handle.schema_arrow.names if name != "embeddings"]
            for index in range(handle.metadata.num_row_groups):
                group = handle.read_row_group(index, columns=columns)
                for start in range(0, group.num_rows, ROWS_PER_SLICE):
                    yield from group.slice(start, ROWS_PER_SLICE).to_pylist()
        except (OSError, pa.ArrowException) as error:
            raise ExportError(f"{file}: cannot read this Parquet shard ({error}); run `curate verify`") from None


def iter_tar_rows(files: list[Path]) -> Iterator[dict[str, Any]]:
    """The samples of WebDataset shards written by the webdataset sink, as SAMPLE_SCHEMA rows."""
    for file in files:
        try:
            for key, members in read_samples(file):
                yield row_from_members(key, members)
        except (OSError, tarfile.TarError, ValueError) as error:  # JSON and msgpack errors are ValueErrors
            raise ExportError(f"{file}: cannot read this WebDataset shard ({error}); run `curate verify`") from None


# --------------------------------------------------------------------------- caption policy and resolution


@dataclass(frozen=True)
class CaptionPolicy:
    """Which caption variant a sample is exported with.

    A role's policy (`strict`) allows only the listed variants, first present wins; a sample
    with none of them is skipped. The default policy takes `alt`, else the first caption.
    """

    names: tuple[str, ...] = DEFAULT_CAPTIONS
    strict: bool = False

    def choose(self, captions: list[dict[str, Any]] | None) -> tuple[str, str]:
        """The (name, text) of the caption to use; Skip(no_caption) when there is none."""
        variants = self.variants(captions)
        if not variants:
            wanted = " or ".join(self.names) if self.strict else "any"
            raise Skip(NO_CAPTION, f"no caption variant ({wanted})")
        return variants[0]

    def variants(self, captions: list[dict[str, Any]] | None) -> list[tuple[str, str]]:
        """Every allowed (name, text), preferred first (all captions for the default policy)."""
        present = [(c["name"], c["text"]) for c in captions or [] if c and c.get("text")]
        ranked = [pair for name in self.names for pair in present if pair[0] == name]
        if self.strict:
            return ranked
        return ranked + [pair for pair in present if pair not in ranked]

    def describe(self) -> dict[str, Any]:
        return {"captions": list(self.names), "fallback": None if self.strict else "first caption"}


@dataclass(frozen=True)
class Resolution:
    """How exported images are resized.

    keep_ratio: scale so the `side` (longest or shortest) is `size` (not up when only_if_bigger);
    center_crop: scale the shortest side to `size` and crop the centre to size x size;
    buckets: pick the bucket (width, height) closest in aspect ratio, scale to cover it and crop the centre.
    """

    mode: str
    size: int | None = None
    side: str = "longest"
    only_if_bigger: bool = True
    buckets: tuple[tuple[int, int], ...] = ()

    def describe(self) -> dict[str, Any]:
        if self.mode == "buckets":
            return {"mode": "buckets", "buckets": [list(b) for b in self.buckets]}
        described: dict[str, Any] = {"mode": self.mode, "size": self.size}
        if self.mode == "keep_ratio":
            described.update(side=self.side, only_if_bigger=self.only_if_bigger)
        return described


RESOLUTION_KEYS = {"mode", "size", "side", "only_if_bigger", "buckets"}


def parse_resolution(value: Any, where: str) -> Resolution | None:
    """A role's `resolution` entry as a Resolution (None: images stay as stored); ExportError if malformed."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"size": value}
    if not isinstance(value, dict):
        raise ExportError(f"{where}: expected a mapping (size/mode or buckets), got {value!r}")
    unknown = set(value) - RESOLUTION_KEYS
    if unknown:
        raise ExportError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(RESOLUTION_KEYS)})")
    if value.get("buckets") is not None:
        if value.get("mode", "buckets") != "buckets":
            raise ExportError(f"{where}: `buckets` goes with mode buckets, not {value['mode']!r}")
        buckets = []
        for bucket in value["buckets"]:
            if (not isinstance(bucket, (list, tuple)) or len(bucket) != 2
                    or not all(isinstance(n, int) and n > 0 for n in bucket)):
                raise ExportError(f"{where}: a bucket is [width, height] in pixels, got {bucket!r}")
            buckets.append((int(bucket[0]), int(bucket[1])))
        if not buckets:
            raise ExportError(f"{where}: `buckets` is empty")
        return Resolution("buckets", buckets=tuple(buckets))
    mode = value.get("mode", "keep_ratio")
    if mode not in ("keep_ratio", "center_crop"):
        raise ExportError(f"{where}: mode {mode!r} is not keep_ratio, center_crop or buckets")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ExportError(f"{where}: `size` must be a positive number of pixels, got {size!r}")
    side = value.get("side", "longest")
    if side not in ("longest", "shortest"):
        raise ExportError(f"{where}: side {side!r} is not longest or shortest")
    return Resolution(mode, size=size, side=side, only_if_bigger=bool(value.get("only_if_bigger", True)))


@dataclass(frozen=True)
class ExportPolicy:
    """The role being exported (None: every sample) with its caption policy and resolution."""

    role: str | None
    captions: CaptionPolicy = field(default_factory=CaptionPolicy)
    resolution: Resolution | None = None

    def wants(self, row: dict[str, Any]) -> bool:
        """Whether `row` belongs to the exported role."""
        return self.role is None or self.role in (row.get("roles") or [])


def resolve_policy(manifest: dict[str, Any], role: str | None) -> ExportPolicy:
    """The policy of `role` from the output's resolved recipe; ExportError if the output has no such role."""
    if role is None:
        return ExportPolicy(None)
    roles = ((manifest.get("recipe") or {}).get("resolved") or {}).get("roles")
    if isinstance(roles, dict):
        roles = {name: config for name, config in roles.items() if config is not False}  # false: turned off
    if not roles:
        raise ExportError(f"--role {role}: this output has no roles (its recipe has no `roles:` section, so no "
                          "sample was assigned one); export without --role to take every sample")
    if not isinstance(roles, dict) or role not in roles:
        known = ", ".join(sorted(roles)) if isinstance(roles, dict) else "none"
        raise ExportError(f"--role {role}: not a role of this output (its roles: {known})")
    config = roles[role] or {}
    if not isinstance(config, dict):
        raise ExportError(f"recipe roles.{role}: expected a mapping, got {config!r}")
    names = config.get("captions")
    if isinstance(names, str):
        names = [names]
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ExportError(f"recipe roles.{role}.captions: expected a list of caption names, got {names!r}")
    captions = CaptionPolicy(tuple(names), strict=True) if names else CaptionPolicy()
    return ExportPolicy(role, captions, parse_resolution(config.get("resolution"), f"recipe roles.{role}.resolution"))


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ExportedImage:
    """One image as exported: encoded bytes, extension, size, and the bucket it was fitted to."""

    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int
    bucket: tuple[int, int] | None = None


def decode(data: bytes | None, what: str) -> Image.Image:
    """Decode `data` fully; Skip(no_image / undecodable_image) when it cannot be."""
    if not data:
        raise Skip(NO_IMAGE, f"{what} has no bytes")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise Skip(UNDECODABLE_IMAGE, f"{what}: not an image format Pillow can identify") from None
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        message = re.sub(r" at 0x[0-9a-fA-F]+", "", str(error))  # no object addresses: export.json is deterministic
        raise Skip(UNDECODABLE_IMAGE, f"{what}: {type(error).__name__}: {message}") from None
    return image


def target_size(width: int, height: int,
                resolution: Resolution | None) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """The exported (width, height) of a width x height image, and the bucket when fitting one."""
    if resolution is None:
        return (width, height), None
    if resolution.mode == "buckets":
        ratio = math.log(width / height)
        bucket = min(resolution.buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))
        return bucket, bucket
    if resolution.mode == "center_crop":
        return (resolution.size, resolution.size), None
    reference = max(width, height) if resolution.side == "longest" else min(width, height)
    scale = resolution.size / reference
    if resolution.only_if_bigger and scale >= 1:
        return (width, height), None
    return (max(1, round(width * scale)), max(1, round(height * scale))), None


def prepare_image(data: bytes | None, resolution: Resolution | None, what: str,
                  force_jpeg: bool = False) -> ExportedImage:
    """Decode, resize per `resolution` and encode one image.

    Stored bytes are kept as they are when the size does not change and they are JPEG, PNG or
    WebP (JPEG only with `force_jpeg`); anything else is encoded as JPEG (alpha over white).
    """
    image = decode(data, what)
    width, height = image.size
    size, bucket = target_size(width, height, resolution)
    ext = PASSTHROUGH_FORMATS.get(image.format or "")
    if size == (width, height) and ext is not None and (ext == "jpg" or not force_jpeg):
        return ExportedImage(data, ext, width, height, width, height, bucket)
    rgb = to_rgb(image)
    if bucket is not None or (resolution is not None and resolution.mode == "center_crop"):
        resized = ImageOps.fit(rgb, size, Image.Resampling.LANCZOS)
    elif size != (width, height):
        resized = rgb.resize(size, Image.Resampling.LANCZOS)
    else:
        resized = rgb
    return ExportedImage(encode_jpeg(resized), "jpg", size[0], size[1], width, height, bucket)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB; transparent parts over a white background."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def encode_jpeg(image: Image.Image) -> bytes:
    """Baseline JPEG of `image` at JPEG_QUALITY, without metadata (the same pixels give the same bytes)."""
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def sample_images(row: dict[str, Any], resolution: Resolution | None, force_jpeg: bool = False,
                  indices: Iterable[int] | None = None) -> list[ExportedImage]:
    """The images of `row` (all, or those at `indices`) prepared for export; Skip when one is missing or broken."""
    images = row.get("images") or []
    if not images:
        raise Skip(NO_IMAGE, "the sample has no image")
    metas = row.get("image_meta") or []
    chosen = range(len(images)) if indices is None else indices
    prepared = []
    for index in chosen:
        if not 0 <= index < len(images) or images[index] is None:
            raise Skip(NO_IMAGE, f"image {index} is not in the sample")
        image = prepare_image(images[index].get("bytes"), resolution, f"image {index}", force_jpeg)
        prepared.append(with_fetched_size(image, metas[index] if index < len(metas) else None))
    return prepared


def with_fetched_size(image: ExportedImage, meta: dict[str, Any] | None) -> ExportedImage:
    """`image` with its original size taken from `image_meta` (the size as fetched, before the run resized it)."""
    width, height = (meta or {}).get("original_width"), (meta or {}).get("original_height")
    if not width or not height:
        return image
    return dataclasses.replace(image, original_width=int(width), original_height=int(height))


def text_segments(row: dict[str, Any]) -> list[str]:
    """The sample's text segments in order."""
    return [s["text"] for s in row.get("segments") or [] if s and s.get("text") is not None]


# --------------------------------------------------------------------------- running work in order

In = TypeVar("In")
Out = TypeVar("Out")


def ordered_map(function: Callable[[In], Out], items: Iterable[In], workers: int, window: int = 32) -> Iterator[Out]:
    """`function` over `items` on `workers` threads, results in input order, at most `window` in flight.

    Pillow releases the GIL while decoding, resizing and encoding, so threads give real
    parallelism for image work.
    """
    if workers <= 1:
        yield from (function(item) for item in items)
        return
    pending = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
