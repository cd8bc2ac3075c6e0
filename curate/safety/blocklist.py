"""Blocklists and takedowns: drop samples whose URLs, domains or image hashes are listed.

Two stages, both in the `prepare` phase:

- `blocklist` (URLs and domains) goes BEFORE `fetch` in the recipe, so a listed URL is
  never downloaded. It checks every image URL and the sample's `source.url`; a domain
  entry also matches its subdomains (``example.com`` blocks ``cdn.example.com``).
- `blocklist_hashes` (sha256 and perceptual hashes) goes AFTER `fetch`: a sha256 entry
  matches `image_meta.sha256` (the original bytes) or `image_meta.pixel_sha256` (the
  decoded pixels); a perceptual hash entry matches `image_meta.phash` within
  `max_distance` bits. An image with bytes but no hashes (bytes given by the source) is
  hashed here; an image with neither is an error (the stage is placed before fetch).

A matching sample is dropped with reason `blocklist`; the detail names the kind of
list, the list file and the entry number, never the entry, caption or bytes. With
`redact_urls` (default) the dropped sample's URLs are blanked before the drop log is
written, so the log keeps only its key. A sample with several images is dropped
whole when any of them matches.

Both stages have one step (`process`): a match is a hard drop, recorded with the stage's
annotations, so a listed sample reaches no later stage (no model sees a listed image, no
later annotation table holds anything of it), and the blanked URLs are in the columns the
stage provides, which are what the drop log is written from. The annotation fingerprint
includes the sha256 of every list file, so a list edited in place is matched again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate import schema
from curate.fetch.image import phash as perceptual_hash
from curate.safety.images import decode_rgb
from curate.safety.lists import (
    ListFile,
    as_list_file,
    as_unsigned,
    host_suffixes,
    list_path,
    normalise_domain,
    normalise_sha256,
    normalise_url,
    parse_phash,
    read_entries,
    url_host,
)
from curate.stage import Params, RecipeError, Resources, Stage, StageContext, with_drops

BLOCKLIST = "blocklist"
PHASH_CHUNK = 1 << 16  # list entries compared at once with a batch's perceptual hashes


@dataclass(frozen=True)
class Entry:
    """Where a list entry came from: the kind of list, the file as named in the recipe, 1-based entry number."""

    kind: str
    list_name: str
    number: int

    def describe(self, extra: str = "") -> str:
        return f"{self.kind} list {self.list_name}, entry {self.number}{extra}"


ListRef = str | ListFile


def load_index(kind: str, items: list[ListRef], recipe_dir: str, where: str, normalise) -> dict:
    """normalised entry -> Entry over all list files of one kind (the first listing wins)."""
    index: dict = {}
    for position, item in enumerate(items):
        item = as_list_file(item)
        for number, raw in enumerate(read_entries(item, recipe_dir, f"{where}[{position}]"), 1):
            try:
                value = normalise(raw)
            except ValueError as error:
                raise RecipeError(f"{kind} list {item.path}, entry {number}: {error}",
                                  path=f"{where}[{position}]") from None
            index.setdefault(value, Entry(kind, item.path, number))
    return index


def redact(batch: pa.Table, rows: list[int]) -> pa.Table:
    """Blank image_meta[].url, source.url and source.id of `rows`, so the drop log does not keep them.

    (Without any URL the drop log's `url` falls back to `source.id`, e.g. an image folder's file path.)
    """
    if not rows:
        return batch
    metas = batch.column("image_meta").to_pylist()
    sources = batch.column("source").to_pylist()
    for row in rows:
        if metas[row] is not None:
            metas[row] = [{**m, "url": None} if m else m for m in metas[row]]
        if sources[row] is not None:
            sources[row] = {**sources[row], "url": None, "id": None}
    for name, values in (("image_meta", metas), ("source", sources)):
        field = schema.SAMPLE_SCHEMA.field(name)
        batch = batch.set_column(batch.schema.get_field_index(name), field, pa.array(values, field.type))
    return batch


def list_digest(item: ListRef, recipe_dir: str) -> str:
    """sha256 of a list file's bytes (the file as `read_entries` finds it); RecipeError when it is missing."""
    path = list_path(as_list_file(item), recipe_dir)
    if not path.is_file():
        raise RecipeError(f"list file {path} does not exist")
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _BlocklistBase(Stage):
    """Shared by both stages: drop matching rows with reason `blocklist`, redacting their URLs."""

    phase = "prepare"
    resources = Resources(cpus=1.0)
    provides = frozenset({"image_meta", "source"})  # the blanked URLs of the dropped rows
    list_fields: ClassVar[tuple[str, ...]] = ()  # the Params fields holding list files

    def __init__(self, params: Params, context: StageContext | None = None):
        super().__init__(params, context)
        self.loaded = False

    def preflight(self) -> None:
        """Every list file exists and every entry parses."""
        self.setup()

    def _match(self, batch: pa.Table) -> list[str | None]:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """The annotation's fingerprint, with the sha256 of every list file (entries change in place)."""
        lists = {f"{field}[{i}]": list_digest(item, self.context.recipe_dir)
                 for field in self.list_fields for i, item in enumerate(getattr(self.params, field))}
        return {**super().fingerprint(), "lists": lists}

    def forgets_drops(self) -> bool:
        """With `redact_urls`, a listed sample leaves no bytes, URL or caption in the pool either."""
        return self.params.redact_urls

    def process(self, batch: pa.Table) -> pa.Table:
        """Mark listed samples with reason `blocklist`."""
        if not self.loaded:
            self.setup()
        details = self._match(batch)
        reasons = [BLOCKLIST if detail else None for detail in details]
        if self.params.redact_urls:
            batch = redact(batch, [row for row, reason in enumerate(reasons) if reason])
        return with_drops(batch, reasons, details)


class BlocklistParams(Params):
    """URL and domain lists (files: .txt one per line, or .csv / .parquet with `column`)."""

    urls: list[ListRef] = []
    domains: list[ListRef] = []  # an entry matches the host and its subdomains
    redact_urls: bool = True  # blank the dropped samples' URLs so the drop log keeps only their keys

    @model_validator(mode="after")
    def _some_list(self):
        if not self.urls and not self.domains:
            raise ValueError("give at least one `urls` or `domains` list")
        return self


class Blocklist(_BlocklistBase):
    """Drops samples whose image or source URL, or its domain, is listed. Place it before `fetch`."""

    name = "blocklist"
    Params = BlocklistParams
    reads = frozenset({"image_meta", "source"})
    reads_images = False
    list_fields = ("urls", "domains")
    annotation_params = frozenset({"urls", "domains", "redact_urls"})  # redact_urls changes provided columns
    selection_params = frozenset()

    def setup(self) -> None:
        """Read and normalise the lists once per worker."""
        where = f"stages.{self.name}"
        self.urls = load_index("urls", self.params.urls, self.context.recipe_dir, f"{where}.urls", normalise_url)
        self.domains = load_index("domains", self.params.domains, self.context.recipe_dir, f"{where}.domains",
                                  normalise_domain)
        self.loaded = True

    def _match(self, batch: pa.Table) -> list[str | None]:
        details: list[str | None] = []
        for metas, source in zip(batch.column("image_meta").to_pylist(), batch.column("source").to_pylist()):
            urls = [m["url"] for m in metas or [] if m and m.get("url")]
            if source and source.get("url"):
                urls.append(source["url"])
            details.append(self._first_match(urls))
        return details

    def _first_match(self, urls: list[str]) -> str | None:
        for url in urls:
            entry = self.urls.get(normalise_url(url))
            if entry is not None:
                return entry.describe()
        for url in urls:
            host = url_host(url)
            for suffix in host_suffixes(host) if host else ():
                entry = self.domains.get(suffix)
                if entry is not None:
                    return entry.describe()
        return None


class BlocklistHashesParams(Params):
    """sha256 and perceptual-hash lists (files: .txt one per line, or .csv / .parquet with `column`)."""

    sha256: list[ListRef] = []  # matches image_meta.sha256 (original bytes) or image_meta.pixel_sha256
    phash: list[ListRef] = []  # 16 hex digits or a (signed or unsigned) decimal 64-bit integer
    max_distance: int = Field(0, ge=0, le=32)  # perceptual hashes within this many differing bits match
    redact_urls: bool = True

    @model_validator(mode="after")
    def _some_list(self):
        if not self.sha256 and not self.phash:
            raise ValueError("give at least one `sha256` or `phash` list")
        return self


class BlocklistHashes(_BlocklistBase):
    """Drops samples whose image hashes are listed. Place it after `fetch`.

    `max_distance` is a threshold (a selection param), but the stage has one step: its
    matches are hard drops, so a changed `max_distance` still needs the stage to run again.
    """

    name = "blocklist_hashes"
    reads_image_fingerprints = True
    Params = BlocklistHashesParams
    reads = frozenset({"images", "image_meta", "source"})
    reads_images = True  # an image that came with bytes but no hashes is hashed here
    list_fields = ("sha256", "phash")
    annotation_params = frozenset({"sha256", "phash", "redact_urls"})  # redact_urls changes provided columns
    selection_params = frozenset({"max_distance"})

    def setup(self) -> None:
        """Read and normalise the lists once per worker."""
        where = f"stages.{self.name}"
        self.sha256 = load_index("sha256", self.params.sha256, self.context.recipe_dir, f"{where}.sha256",
                                 normalise_sha256)
        phashes = load_index("phash", self.params.phash, self.context.recipe_dir, f"{where}.phash", parse_phash)
        self.phash_exact = phashes
        self.phash_values = np.array(list(phashes), dtype=np.uint64)
        self.phash_entries = list(phashes.values())
        self.loaded = True

    def _match(self, batch: pa.Table) -> list[str | None]:
        images = batch.column("images").to_pylist()
        metas = batch.column("image_meta").to_pylist()
        details: list[str | None] = [None] * batch.num_rows
        hashes: list[tuple[int, int]] = []  # (row, unsigned phash) of the rows not matched by sha256
        for row in range(batch.num_rows):
            for index, image in enumerate(images[row] or []):
                meta = (metas[row] or [])[index] if index < len(metas[row] or []) else None
                sha, pixels, phash = _hashes(image, meta or {}, index)
                entry = self.sha256.get(sha) or (self.sha256.get(pixels) if pixels else None)
                if entry is not None:
                    details[row] = entry.describe()
                    break
                if phash is not None:
                    hashes.append((row, int(as_unsigned(phash))))
        for row, detail in self._phash_matches([h for h in hashes if details[h[0]] is None]).items():
            details[row] = detail
        return details

    def _phash_matches(self, hashes: list[tuple[int, int]]) -> dict[int, str]:
        """row -> detail for rows with an image within max_distance bits of a listed perceptual hash."""
        if not hashes or not len(self.phash_values):
            return {}
        found: dict[int, str] = {}
        if self.params.max_distance == 0:
            for row, value in hashes:
                entry = self.phash_exact.get(value)
                if entry is not None and row not in found:
                    found[row] = entry.describe(" (distance 0)")
            return found
        values = np.array([value for _, value in hashes], dtype=np.uint64)
        best = np.full(len(values), 65, dtype=np.int64)
        where = np.zeros(len(values), dtype=np.int64)
        for start in range(0, len(self.phash_values), PHASH_CHUNK):
            chunk = self.phash_values[start:start + PHASH_CHUNK]
            distances = np.bitwise_count(values[:, None] ^ chunk[None, :]).astype(np.int64)
            nearest = distances.argmin(axis=1)
            nearest_distance = distances[np.arange(len(values)), nearest]
            better = nearest_distance < best
            best[better], where[better] = nearest_distance[better], start + nearest[better]
        for (row, _), distance, position in zip(hashes, best, where):
            if distance <= self.params.max_distance and row not in found:
                found[row] = self.phash_entries[position].describe(f" (distance {distance})")
        return found


def _hashes(image: dict | None, meta: dict, index: int) -> tuple[str | None, str | None, int | None]:
    """(sha256, pixel_sha256, phash) of one image: from image_meta, else computed from its bytes."""
    sha, pixels, phash = meta.get("sha256"), meta.get("pixel_sha256"), meta.get("phash")
    if sha or pixels or phash is not None:
        return sha, pixels, phash
    data = (image or {}).get("bytes")
    if data is None:
        raise RecipeError(f"image {index} has neither bytes nor hashes: blocklist_hashes must come after fetch "
                          "in the recipe's stages")
    return hashlib.sha256(data).hexdigest(), None, perceptual_hash(decode_rgb(data))
