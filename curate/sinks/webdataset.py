"""WebDataset tar shards: per sample a fixed set of members, so every reader sees every sample whole.

Two member layouts; `layout: auto` (the default) picks one by the sample's kind:

  members  (pairs)  KEY.<ext> (image 0), KEY.<i>.<ext> (image i >= 1), KEY.json, KEY.txt.
                    The img2dataset / open_clip layout: `jpg` + `txt` loaders read it as is.
  packed   (interleaved, edit)
                    KEY.images.mp   every image of the sample, in order: a msgpack array of
                                    the encoded bytes (webdataset and `datasets` both decode
                                    `.mp` to a list of bytes); formats in the record's image_meta
                    KEY.json        the stable record (curate/sinks/wds_record.py)
                    KEY.txt         the text (all text segments / the first instruction)

Both layouts write the same `.json` record: img2dataset's flat fields and curate's own, every
field in every sample with one type (curate/sinks/wds_record.py).

Why packed: `datasets.load_dataset("webdataset")` infers its features from the first
five samples and then reads only those members (a member first seen in a later sample
is silently left out), so a per-image member cannot carry a variable number of images.

Members of a sample are written contiguously; keys contain no dots (readers split a
member name at the first dot into key and extension). Within one shard every sample
has the same member set.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal

import msgpack
import pyarrow as pa

from curate import schema, storage
from curate.fetch.config import EncodeParams, ResizeParams
from curate.fetch.image import ImageError, process_image
from curate.sinks.base import FinishedOutput, Sink
from curate.sinks.wds_record import record_bytes, record_features, row_from_record, sample_record
from curate.sinks.wds_side_files import write_img2dataset_files, write_sizes
from curate.stage import Params

MTIME = 0
MODE = 0o644
TAR_FORMAT = tarfile.GNU_FORMAT
ROWS_PER_SLICE = 256
PACKED_IMAGES = "images.mp"
PACKED_KINDS = ("interleaved", "edit")
MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit, for images re-encoded to the output's one format


class WebDatasetParams(Params):
    """Which named caption becomes a pair's `.txt`, and which member layout samples get."""

    caption: str = "alt"
    # auto: pairs as members, interleaved and edit samples packed; members / packed: every sample so
    # (packed lets one shard mix kinds; members needs the same image count and formats throughout a shard).
    layout: Literal["auto", "members", "packed"] = "auto"
    # img2dataset's per-shard NNNNN_stats.json and NNNNN.parquet beside the tars (curate/sinks/wds_side_files.py)
    img2dataset_files: bool = False
    # members layout: the one format of every image member; an image in another format is re-encoded to it.
    # None: as stored, unless the output's images come in several formats: then their most common (see `adapt`).
    image_format: Literal["jpg", "png", "webp"] | None = None


class WebDatasetSink(Sink):
    """Writes SAMPLE_SCHEMA tables to one deterministic WebDataset tar."""

    name: ClassVar[str] = "webdataset"
    Params: ClassVar[type[Params]] = WebDatasetParams
    extension: ClassVar[str] = ".tar"

    def write(self, tables: Iterable[pa.Table], path: str) -> int:
        """Stream the samples of `tables` into the tar at `path`; return the sample count.

        Raises ValueError for a key with a dot or slash, a sample without a usable
        image, or samples whose member sets differ within the shard.
        """
        count = 0
        suffixes: tuple[str, ...] | None = None
        with tarfile.open(path, "w", format=TAR_FORMAT) as tar:
            for row in iter_rows(tables):
                members = sample_members(row, self.params.caption, self.params.layout, self.params.image_format)
                names = tuple(suffix for suffix, _ in members)
                if suffixes is None:
                    suffixes = names
                elif names != suffixes:
                    raise ValueError(
                        f"sample {row['key']!r} has members {list(names)}, "
                        f"earlier samples of this shard have {list(suffixes)}"
                        + ("; set output.webdataset.layout: packed" if self.params.layout != "packed" else "")
                    )
                for suffix, data in members:
                    add_member(tar, f"{row['key']}.{suffix}", data)
                count += 1
        return count

    def adapt(self, image_formats: dict[str, Counter]) -> dict[str, Any]:
        """One image format for the members layout when the output's images come in several.

        `datasets` reads a tar only if every sample has the member names of the first five
        (KEY.jpg in one sample and KEY.png in another fail), so such outputs are written in
        their most common format (jpg on a tie); Parquet keeps every image as stored.
        """
        if self.params.layout == "packed" or self.params.image_format is not None:
            return {}
        kinds = [kind for kind in image_formats if self.params.layout == "members" or kind not in PACKED_KINDS]
        counts = sum((image_formats[kind] for kind in kinds), Counter())
        if len(counts) <= 1:
            return {}
        return {"image_format": max(counts, key=lambda fmt: (counts[fmt], fmt == "jpg"))}

    def finish(self, output: FinishedOutput) -> None:
        """`sizes.json` beside the tars; img2dataset's side files when asked."""
        write_sizes(output.root, output.shards)
        if self.params.img2dataset_files:
            write_img2dataset_files(output.root, output.shards, output.drops, output.started_at, output.seconds)

    def count_rows(self, path: str) -> int:
        """The number of distinct sample keys among the tar's regular files."""
        keys = set()
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile():
                    keys.add(member_key(member.name))
        return len(keys)


def iter_rows(tables: Iterable[pa.Table]) -> Iterator[dict[str, Any]]:
    """The rows of `tables` as dicts, converting a bounded slice at a time."""
    for table in tables:
        for start in range(0, table.num_rows, ROWS_PER_SLICE):
            yield from table.slice(start, ROWS_PER_SLICE).to_pylist()


def is_packed(row: dict[str, Any], layout: str) -> bool:
    """Whether `row` is written in the packed layout."""
    return layout == "packed" or (layout == "auto" and row["kind"] in PACKED_KINDS)


def sample_members(row: dict[str, Any], caption: str, layout: str = "auto",
                   image_format: str | None = None) -> list[tuple[str, bytes]]:
    """The (suffix, bytes) members of one sample, in the order they are written."""
    key = row["key"]
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
    if image_format is not None and not is_packed(row, layout):
        row = with_images_as(row, image_format)
    text = sample_text(row, caption)
    record = record_bytes(sample_record(row, text))
    images = [(PACKED_IMAGES, packed_images(row))] if is_packed(row, layout) else image_members(row)
    return [*images, ("json", record), ("txt", text.encode("utf-8"))]


def with_images_as(row: dict[str, Any], image_format: str) -> dict[str, Any]:
    """`row` with every image not in `image_format` re-encoded to it (quality 95), its image_meta updated."""
    metas = list(row["image_meta"] or [])
    images = list(row["images"] or [])
    for i, image in enumerate(images):
        meta = metas[i] if i < len(metas) else None
        if not image or image.get("bytes") is None or (meta or {}).get("format") == image_format:
            continue
        try:
            done = process_image(image["bytes"], ResizeParams(mode="none"), EncodeParams(format=image_format),
                                 max_pixels=MAX_PIXELS, fingerprints=False)
        except ImageError as error:
            raise ValueError(f"sample {row['key']!r}: image {i} cannot be re-encoded as {image_format}: "
                             f"{error.detail}") from None
        images[i] = {**image, "bytes": done.data}
        metas[i] = {**(meta or {}), "format": done.format, "width": done.width, "height": done.height,
                    "num_bytes": done.num_bytes}
    return {**row, "images": images, "image_meta": metas}


def image_bytes(row: dict[str, Any]) -> list[bytes]:
    """The encoded bytes of every image of `row`; ValueError if one has none."""
    images = []
    for i, image in enumerate(row["images"] or []):
        if not image or image.get("bytes") is None:
            raise ValueError(f"sample {row['key']!r}: image {i} has no bytes")
        images.append(image["bytes"])
    return images


def packed_images(row: dict[str, Any]) -> bytes:
    """The `images.mp` member: a msgpack array of the images' bytes, in sample order."""
    return msgpack.packb(image_bytes(row), use_bin_type=True)


def image_members(row: dict[str, Any]) -> list[tuple[str, bytes]]:
    """`<ext>` for the first image, `<i>.<ext>` for the following ones."""
    images = image_bytes(row)
    metas = row["image_meta"] or []
    if not images:
        raise ValueError(f"sample {row['key']!r} has no image")
    members = []
    for i, data in enumerate(images):
        meta = metas[i] if i < len(metas) else None
        ext = (meta or {}).get("format") or ""
        if not ext.isalnum():
            raise ValueError(f"sample {row['key']!r}: image {i} has no usable format ({ext!r})")
        suffix = ext.lower() if i == 0 else f"{i}.{ext.lower()}"
        members.append((suffix, data))
    return members


def sample_text(row: dict[str, Any], caption: str) -> str:
    """The `.txt` content: the caption (pair), all text segments (interleaved), the instruction (edit)."""
    texts = [s["text"] for s in row["segments"] or [] if s and s.get("text") is not None]
    if row["kind"] == "interleaved":
        return "\n\n".join(texts)
    if row["kind"] == "edit":
        return texts[0] if texts else ""
    return schema.caption_text(row["captions"], prefer=(caption,)) or ""


def packed_features():
    """The `datasets.Features` of a packed shard, for `load_dataset("webdataset", ..., features=...)`.

    Not needed to read our shards (their `.json` types never vary), but it skips the inference.
    """
    import datasets  # heavy import, only needed by readers

    return datasets.Features({
        PACKED_IMAGES: datasets.List(datasets.Value("binary")),
        "json": dict(record_features()),
        "txt": datasets.Value("string"),
        "__key__": datasets.Value("string"),
        "__url__": datasets.Value("string"),
    })


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append a regular file with fixed owner, mode and time."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = MTIME
    info.mode = MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def read_samples(path: Any, wanted: Callable[[str], bool] = lambda suffix: True,
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) of every sample of a tar this sink wrote, in order, streamed (a local path or a
    store URL); members whose suffix `wanted` refuses are skipped without being read."""
    with storage.open_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        key, members = None, {}
        for member in tar:
            if not member.isfile():
                continue
            member_key, _, suffix = member.name.rpartition("/")[2].partition(".")
            if key is not None and member_key != key:
                yield key, members
                members = {}
            key = member_key
            if wanted(suffix):
                members[suffix] = tar.extractfile(member).read()
        if key is not None:
            yield key, members


def row_from_members(key: str, members: dict[str, bytes]) -> dict[str, Any]:
    """The SAMPLE_SCHEMA row (without embeddings) of one sample's members: `json` plus `images.mp`, or
    `<ext>` / `<i>.<ext>` (images missing from `members` are left out). ValueError without a `.json`."""
    if "json" not in members:
        raise ValueError(f"sample {key!r} has no .json member")
    if PACKED_IMAGES in members:
        images = list(msgpack.unpackb(members[PACKED_IMAGES], raw=False))
    else:
        numbered = {}
        for suffix, data in members.items():
            head, _, ext = suffix.partition(".")
            if suffix in ("json", "txt"):
                continue
            index = 0 if not ext else int(head) if head.isdigit() else None
            if index is not None:
                numbered[index] = data
        images = [numbered[i] for i in sorted(numbered)]
    return row_from_record({**json.loads(members["json"]), "key": key}, images)


def member_key(name: str) -> str:
    """The sample key of a member name, split as WebDataset does: at the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    key = base.split(".", 1)[0]
    return f"{directory}/{key}" if directory else key
