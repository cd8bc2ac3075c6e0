"""The `fetch` stage: download every image of a batch, decode, resize and re-encode it."""

from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pyarrow as pa

from curate.extract.document import KIND as DOCUMENT_KIND
from curate.extract.document import record_removed, remove_images, removed_counter
from curate.fetch.admission import ADMISSION_PARAMS, readmitted
from curate.fetch.config import FetchParams
from curate.fetch.http import FetchResult, HttpFetcher
from curate.fetch.image import ImageError, ProcessedImage, process_image
from curate.fetch.resolver import (
    InvalidHost,
    ResolveError,
    forbidden_address,
    ip_literal,
    normalise_host,
    system_lookup,
)
from curate.schema import SAMPLE_SCHEMA
from curate.stage import Resources, ServiceSpec, Stage, StageContext, with_drops

POLITENESS_SERVICE = "curate.fetch.politeness_service:PolitenessService"


class _Failure(NamedTuple):
    reason: str
    detail: str | None


class _Slot(NamedTuple):
    """One image of one row that still needs its bytes."""

    row: int
    index: int
    url: str | None


# Calls the politeness service may hold at once: a worker holds at most one per host its threads wait for.
SERVICE_CALLS = 20_000


class FetchStage(Stage):
    """Fill `images[i].bytes` and `image_meta[i]` of every row from `image_meta[i].url`.

    A row with any image that cannot be fetched or decoded is dropped with the
    reason of its first failing image, unless `on_image_failure: drop_image` and the row is an
    interleaved document: then only the failing images are removed (segments renumbered, each
    recorded in meta.removed_images with url, reason and detail). Images that already have
    bytes are kept as they are.

    One step (`process`): a failed image leaves nothing to annotate, so every drop is a hard
    one, and every parameter is an annotation param. Of those, `threads` and the caches only set
    the pace (speed_params); the address guard, limits, timeouts, retries, robots and opt-out
    settings decide which URLs are admitted (admission_params: changing them fetches again only
    the rows they may now admit); resize and encode define the pool's images (pool_params).
    """

    name = "fetch"
    Params = FetchParams
    phase = "prepare"
    resources = Resources(cpus=1.0)
    fetches_urls = True
    fingerprints_images = "fetched"  # as configured: fingerprinted_images()
    fingerprints_switch = "fingerprints"
    reads = frozenset({"kind", "images", "image_meta", "segments", "meta"})
    provides = frozenset({"images", "image_meta", "segments", "meta"})  # segments, meta: with drop_image
    reads_images = True  # images that already have bytes are kept as they are
    annotation_params = frozenset(FetchParams.model_fields)
    selection_params = frozenset()
    speed_params = frozenset({"threads", "dns_cache_ttl", "host_cache_size"})
    admission_params = ADMISSION_PARAMS  # curate/fetch/admission.py: which earlier drops a change may cure
    pool_params = frozenset({"resize", "encode"})

    def __init__(self, params: FetchParams, context: StageContext | None = None):
        super().__init__(params, context)
        self._fetcher: HttpFetcher | None = None

    def fingerprinted_images(self) -> str | None:
        """Downloaded images get pixel_sha256 and phash unless `fingerprints: false`."""
        return "fetched" if self.params.fingerprints else None

    def check_input(self, sample: pa.Table) -> list[str]:
        """Warn when the first URLs point at non-public addresses that the address guard will refuse."""
        if self.params.allow_private_addresses:
            return []
        urls = [meta.get("url") for metas in sample.column("image_meta").to_pylist() for meta in metas or []
                if meta and meta.get("url")]
        blocked = [url for url in urls if _points_at_private_address(url, self.params.resolve)]
        if not blocked:
            return []
        return [f"{len(blocked)} of the first {len(urls)} image URLs point at non-public addresses (e.g. "
                f"{blocked[0]}): fetch refuses them (drop reason blocked_address) unless "
                "--set stages.fetch.allow_private_addresses=true"]

    def readmits(self, before: dict) -> frozenset[str] | None:
        """The drop reasons whose rows the current admission settings may now admit (None: they admit fewer)."""
        return readmitted(before, self.admission())

    def min_batch_rows(self) -> int:
        """Two rows per download thread: a batch is downloaded at once, so a smaller one leaves threads idle."""
        return 2 * self.params.threads

    def services(self) -> dict[str, ServiceSpec]:
        """One politeness service per run: per-host limits and robots.txt answers shared by every fetch worker."""
        params = self.params
        request = params.total_timeout + params.connect_timeout  # longest a request holds its slot
        return {"politeness": ServiceSpec(POLITENESS_SERVICE, {
            "concurrency": params.host_concurrency,
            "rate": params.host_rate,
            "max_wait": params.max_retry_after,
            "max_failures": params.host_max_failures,
            "failure_cooldown": params.host_failure_cooldown,
            "max_hosts": params.host_cache_size,
            "slot_lease": request + 60.0,  # a slot its worker never gave back (the worker died) is reclaimed then
            # a robots.txt fetch not answered by then (its worker died, or it is that slow) is left to the next asker
            "robots_claim_lease": (params.retries + 1) * request + params.max_retry_after,
        }, max_concurrency=SERVICE_CALLS)}

    def setup(self) -> None:
        """Create the HTTP fetcher (its connection pool and worker threads), sharing the run's politeness service."""
        self._fetcher = HttpFetcher(self.params, politeness=self.service("politeness"))

    def teardown(self) -> None:
        """Close the HTTP fetcher."""
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None

    def process(self, batch: pa.Table) -> pa.Table:
        """Download and process all missing images of `batch` concurrently; drop rows (or images) that fail."""
        if self._fetcher is None:
            self.setup()
        raw_images = batch.column("images").to_pylist()
        raw_metas = batch.column("image_meta").to_pylist()
        images = [list(row or []) for row in raw_images]
        metas = [list(row or []) for row in raw_metas]
        slots = _missing(images, metas)
        urls = list(dict.fromkeys(slot.url for slot in slots if slot.url))
        outcomes = dict(zip(urls, self._fetcher.fetch_many(urls, after=self._decode)))

        per_image = self.params.on_image_failure == "drop_image"
        kinds = batch.column("kind").to_pylist()
        reasons: list[str | None] = [None] * batch.num_rows
        details: list[str | None] = [None] * batch.num_rows
        failed: dict[int, list[tuple[_Slot, _Failure]]] = {}
        for slot in slots:
            outcome = outcomes[slot.url] if slot.url else _Failure("invalid_url", "image has neither bytes nor URL")
            if not isinstance(outcome, _Failure):
                continue
            if per_image and kinds[slot.row] == DOCUMENT_KIND:
                failed.setdefault(slot.row, []).append((slot, outcome))
            elif reasons[slot.row] is None:
                reasons[slot.row] = outcome.reason
                details[slot.row] = _row_detail(slot, outcome.detail, len(metas[slot.row]))
        failed_slots = {(slot.row, slot.index) for row in failed.values() for slot, _ in row}
        filled = set()
        for slot in slots:
            if reasons[slot.row] is None and (slot.row, slot.index) not in failed_slots:
                processed = outcomes[slot.url]
                images[slot.row][slot.index] = {"bytes": processed.data, "path": None}
                metas[slot.row][slot.index] = _meta(slot.url, processed)
                filled.add(slot.row)

        rows = range(batch.num_rows)
        batch = _replace(batch, "images", [images[i] if i in filled else raw_images[i] for i in rows])
        batch = _replace(batch, "image_meta", [metas[i] if i in filled else raw_metas[i] for i in rows])
        if failed:
            batch = self._remove_failed(batch, failed)
        return with_drops(batch, reasons, details)

    def _remove_failed(self, batch: pa.Table, failed: dict[int, list[tuple[_Slot, _Failure]]]) -> pa.Table:
        """Remove the images that failed from their documents, recording each in meta.removed_images."""
        images = batch.column("images").to_pylist()
        metas = batch.column("image_meta").to_pylist()
        segments = batch.column("segments").to_pylist()
        meta_json = batch.column("meta").to_pylist()
        for row, failures in failed.items():
            removed = [{"index": slot.index, "url": slot.url, "stage": self.name, "reason": failure.reason,
                        "detail": failure.detail} for slot, failure in failures]
            images[row], metas[row], segments[row] = remove_images(
                images[row] or [], metas[row] or [], segments[row], [slot.index for slot, _ in failures])
            meta_json[row] = record_removed(meta_json[row], removed)
            for entry in removed:  # the funnel's per-image counts: counters images_removed.<reason>
                self.count(removed_counter(entry["reason"]))
        batch = _replace(batch, "images", images)
        batch = _replace(batch, "image_meta", metas)
        batch = _replace(batch, "segments", segments)
        return _replace(batch, "meta", meta_json)

    def _decode(self, result: FetchResult) -> ProcessedImage | _Failure:
        """Runs in the fetch worker thread right after the download."""
        if not result.ok:
            return _Failure(result.reason, result.detail)
        params = self.params
        try:
            return process_image(result.body, params.resize, params.encode, params.max_pixels, params.fingerprints)
        except ImageError as exc:
            return _Failure(exc.reason, exc.detail)


def _missing(images: list[list[Any]], metas: list[list[Any]]) -> list[_Slot]:
    """The images without bytes, padding each row's `images` to the length of its `image_meta`."""
    slots = []
    for row, (row_images, row_metas) in enumerate(zip(images, metas)):
        row_images.extend([None] * (len(row_metas) - len(row_images)))
        for index, meta in enumerate(row_metas):
            image = row_images[index]
            if image is None or image.get("bytes") is None:
                slots.append(_Slot(row, index, (meta or {}).get("url")))
    return slots


def _row_detail(slot: _Slot, detail: str | None, num_images: int) -> str | None:
    if num_images <= 1:
        return detail
    return f"image {slot.index} ({slot.url}): {detail}"


def _meta(url: str, image: ProcessedImage) -> dict[str, Any]:
    return {
        "url": url,
        "width": image.width,
        "height": image.height,
        "original_width": image.original_width,
        "original_height": image.original_height,
        "sha256": image.sha256,
        "format": image.format,
        "original_format": image.original_format,
        "original_mode": image.original_mode,
        "exif_orientation": image.exif_orientation,
        "num_bytes": image.num_bytes,
        "original_num_bytes": image.original_num_bytes,
        "pixel_sha256": image.pixel_sha256,
        "phash": image.phash,
    }


def _replace(batch: pa.Table, name: str, values: list[Any]) -> pa.Table:
    field = SAMPLE_SCHEMA.field(name)
    return batch.set_column(batch.schema.get_field_index(name), field, pa.array(values, field.type))


def _points_at_private_address(url: str, pins: dict[str, str]) -> bool:
    """Whether `url`'s host is, or resolves (pins first, then the system resolver) to, a non-public address."""
    host = normalise_host(urlsplit(url).hostname or "")
    if not host:
        return False
    try:
        addresses = [pins[host]] if host in pins else [ip_literal(host)] if ip_literal(host) else system_lookup(host)
    except (ResolveError, InvalidHost):
        return False  # a name that does not resolve is a dns_error at fetch time, not a guard refusal
    return any(forbidden_address(address) for address in addresses)
