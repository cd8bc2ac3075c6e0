"""Free disk before a run: estimate what a run will write and refuse to start when it clearly cannot fit.

The estimate (`estimate_run_bytes`) is the peak a local output folder reaches, with the pool
(curate/engine/pool.py) complete and every output shard written:

  copies      the pool's copies of the image bytes: one per per-sample stage that provides images
              (fetch, decode: their annotation tables hold the bytes), plus one file per output
              format; plus the split itself when the source's images are stored (a URL list's
              split holds URLs only and is not counted). Annotation tables without images,
              selection steps and decisions hold no image bytes and are not counted
  per copy    input rows x bytes per sample. A sample's image, when resized and re-encoded (fetch,
              or decode without keep_bytes): size^2 x 3 bytes x an encoding factor (jpg 0.12,
              webp 0.06, png 0.5: typical web photos at the default qualities); resize mode
              `none` counts as 1024 x 1024. Stored images kept as they are count their file size.
  input rows  the source's `count_rows()` (Parquet footers), else the lines of a text list
              extrapolated from its first MiB, else the image files of an image folder; the
              stored bytes of image shards stand in when rows are unknown.

One image per input row is assumed (documents with many images are underestimated). When nothing
can be estimated the check is skipped. `check_free_disk` compares the estimate, less what the
output folder already holds (a resumed run), with `shutil.disk_usage` of the filesystem the output
goes to: above free space x `REFUSE_ABOVE` it refuses (`InsufficientDisk`, a RecipeError, before
any work); above free space x `WARN_ABOVE` it warns. Outputs on object stores are not checked;
`engine.check_disk: false` turns the check off.
"""

from __future__ import annotations

import glob
import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from curate import storage
from curate.stage import RecipeError

if TYPE_CHECKING:
    from curate.engine.run import Plan

ENCODING_FACTOR = {"jpg": 0.12, "webp": 0.06, "png": 0.5}  # encoded bytes / raw RGB bytes
UNRESIZED_SIDE = 1024  # resize mode `none`: the side a typical web image is assumed to have
REFUSE_ABOVE = 1.2  # refuse when the estimate is above free space x this (the estimate is rough)
WARN_ABOVE = 0.8  # warn when it is above free space x this
SAMPLE_BYTES = 1 << 20  # how much of a text list is read to extrapolate its line count
TEXT_FORMATS = ("csv", "tsv", "jsonl")


class InsufficientDisk(RecipeError):
    """The output's filesystem has clearly too little free space for the run's estimate."""


@dataclass
class DiskEstimate:
    """What a run is expected to write at its peak, and how that was worked out."""

    total_bytes: int
    rows: int | None
    bytes_per_sample: int | None
    copies: int
    how: str  # one line for people


def estimate_run_bytes(plan: "Plan") -> DiskEstimate | None:
    """The peak bytes the plan's output folder will hold, or None when it cannot be estimated."""
    source = plan.source
    stored = not getattr(source, "needs_fetch", False)
    rows = estimate_rows(source)
    encoded = _encoded_sample_bytes(plan.stages)
    image_copies = sum(1 for stage in plan.stages if stage.scope == "sample" and "images" in stage.provides)
    copies = image_copies + len(plan.sinks)
    input_bytes = _stored_bytes(getattr(source, "path", None)) if stored else 0
    if stored and input_bytes is None:
        return None
    if stored:
        phases = f"{image_copies} in the pool + {len(plan.sinks)} output format(s)"
        if encoded is None or not rows:  # images kept as stored (or rows unknown): every copy is the input's size
            per_sample = input_bytes // rows if rows else None
            total = input_bytes * (1 + copies)
            how = f"{_size(input_bytes)} of stored images, in the pool's split and {copies} more copies ({phases})"
        else:  # re-encoded: each copy after the split holds images of about the resized size
            per_sample = min(encoded, input_bytes // rows)
            total = input_bytes + rows * per_sample * copies
            how = (f"{_size(input_bytes)} of stored images in the pool's split, then {rows:,} rows x about "
                   f"{_size(per_sample)} per sample x {copies} copies ({phases})")
        return DiskEstimate(total, rows, per_sample, copies + 1, how)
    if rows is None or encoded is None:
        return None
    total = rows * encoded * copies
    how = (f"{rows:,} rows x about {_size(encoded)} per sample x {copies} copies "
           f"({image_copies} in the pool + {len(plan.sinks)} output format(s))")
    return DiskEstimate(total, rows, encoded, copies, how)


def check_free_disk(plan: "Plan", warn: Callable[[str], Any] | None = None,
                    disk_usage: Callable[[str], Any] | None = None) -> DiskEstimate | None:
    """Refuse (InsufficientDisk) a run whose estimate clearly exceeds the free space of its output's filesystem.

    Returns the estimate (None when the output is on an object store or nothing could be estimated).
    `warn(message)` is called when the estimate is close to the free space.
    """
    root = plan.layout.root
    if storage.is_remote(root):
        return None
    estimate = estimate_run_bytes(plan)
    if estimate is None:
        return None
    existing = _existing_folder(Path(root))
    usage = (disk_usage or shutil.disk_usage)(str(existing))
    already = tree_bytes(Path(root)) if Path(root).is_dir() else 0
    needed = max(0, estimate.total_bytes - already)
    if needed > usage.free * REFUSE_ABOVE:
        raise InsufficientDisk(
            f"not enough free disk for this run: it needs about {_size(needed)} ({estimate.how}), and the "
            f"filesystem of {existing} has {_size(usage.free)} free. Free some space, choose another output.path, "
            "or set engine.check_disk: false to run anyway", path="engine.check_disk", file=str(plan.loaded.file))
    if needed > usage.free * WARN_ABOVE and warn is not None:
        warn(f"this run needs about {_size(needed)} ({estimate.how}); the filesystem of {existing} has "
             f"{_size(usage.free)} free: it may run out of disk")
    return estimate


def estimate_rows(source: Any) -> int | None:
    """The source's input rows: counted from metadata, extrapolated from a text list, or its image files."""
    count = getattr(source, "count_rows", None)
    if callable(count):
        try:
            rows = count()
        except Exception:  # noqa: BLE001 - an estimate is optional; the run reports real read errors itself
            rows = None
        if rows is not None:
            return int(rows)
    path = getattr(source, "path", None)
    if not isinstance(path, (str, os.PathLike)) or storage.is_remote(path):
        return None
    fmt = getattr(source, "format", None) if getattr(source, "needs_fetch", False) else None
    try:
        if fmt in TEXT_FORMATS and os.path.isfile(path):
            return _text_lines(str(path))
        if getattr(source, "name", None) == "image_folder" and os.path.isdir(path):
            extensions = {e.lower().lstrip(".") for e in source.params.extensions}
            return sum(1 for file in _files(str(path)) if file.rpartition(".")[2].lower() in extensions)
    except (OSError, RecipeError):
        return None
    return None


def _text_lines(path: str) -> int:
    """Lines of a (possibly gzipped) text file: counted in its first MiB and extrapolated by size."""
    size = os.path.getsize(path)
    if path.lower().endswith(".gz"):
        with open(path, "rb") as raw, gzip.open(raw) as text:
            head = text.read(SAMPLE_BYTES)
            consumed = max(1, raw.tell())
        if len(head) < SAMPLE_BYTES:
            return head.count(b"\n") + (1 if head and not head.endswith(b"\n") else 0)
        return int(head.count(b"\n") * size / consumed)
    with open(path, "rb") as handle:
        head = handle.read(SAMPLE_BYTES)
    lines = head.count(b"\n") + (1 if head and not head.endswith(b"\n") else 0)
    return lines if size <= SAMPLE_BYTES else int(lines * size / max(1, len(head)))


def _encoded_sample_bytes(stages: list[Any]) -> int | None:
    """Bytes of one resized, re-encoded image per the settings of the last stage that provides images (fetch,
    decode); None when images are kept as is."""
    params = next((s.params for s in reversed(stages) if s.scope == "sample" and "images" in s.provides
                   and hasattr(s.params, "resize") and hasattr(s.params, "encode")), None)
    if params is None or getattr(params, "keep_bytes", False):
        return None
    resize, encode = params.resize, params.encode
    side = UNRESIZED_SIDE if resize.mode == "none" else resize.size
    return max(1, int(side * side * 3 * ENCODING_FACTOR.get(encode.format, 0.5)))


def _stored_bytes(path: Any) -> int | None:
    """Total size of the stored input: a file, the files under a folder, or a glob's matches."""
    if not isinstance(path, (str, os.PathLike)) or storage.is_remote(path):
        return None
    path = str(path)
    if os.path.isfile(path):
        return os.path.getsize(path)
    if os.path.isdir(path):
        return tree_bytes(Path(path))
    if glob.has_magic(path):
        return sum(os.path.getsize(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    return None


def _files(root: str):
    for folder, _, names in os.walk(root):
        for name in names:
            yield os.path.join(folder, name)


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under `root` (links not followed)."""
    total = 0
    for file in _files(str(root)):
        try:
            info = os.lstat(file)
        except OSError:
            continue
        if not os.path.islink(file):
            total += info.st_size
    return total


def _existing_folder(path: Path) -> Path:
    """`path` or its nearest existing ancestor (whose filesystem the output will be on)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1024
    return f"{count:,.1f} TiB"
