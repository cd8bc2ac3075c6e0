"""Files beside the WebDataset tars that describe the whole output: `sizes.json`, and img2dataset's side files.

`sizes.json`         {"part-00000.tar": 10000, ...}: samples per tar, the file open_clip_train reads
                     (`get_dataset_size`) when `--train-num-samples` is not given. Always written.

With `output.webdataset.img2dataset_files: true`, per tar `part-NNNNN.tar`, as img2dataset writes:

`part-NNNNN_stats.json`  count, successes, failed_to_download, failed_to_resize, start_time, end_time,
                         duration, status_dict; plus `filtered` (rows a later stage dropped), so that
                         count = successes + failed_to_download + failed_to_resize + filtered.
`part-NNNNN.parquet`     one row per input row the tar accounts for: its samples (status "success")
                         and its share of the drop log's dropped samples (status "failed_to_download",
                         "failed_to_resize" or "filtered", error_message "<reason>: <detail>"); the
                         drop log's image rows (images removed from kept documents) are not input rows.

How this differs from img2dataset (docs/architecture.md says it too): img2dataset cuts input rows
into shards before downloading, so a shard's failures are the failures of its own input rows;
curate cuts its output shards from the samples it kept, so the drop log's rows (in input order)
are shared out over the tars in order, as evenly as possible. Names carry the `part-` prefix
of curate's shards. Timing fields are the run's, not the shard's. `exif` is not kept.

Everything here is derived from the finished output (the tars' `.json` records and the drop log),
so a run and `curate retry` rewrite the files the same way.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate import storage
from curate.drop_log import IMAGE, count_rows, iter_drops, sample_drops
from curate.files import write_json
from curate.storage import Location

SIZES_FILE = "sizes.json"
SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_RESIZE = "failed_to_resize"
FILTERED = "filtered"
DOWNLOAD_STAGES = ("source", "fetch")  # drops of these stages are img2dataset's download / resize failures
DECODE_REASONS = frozenset({"not_image", "decompression_bomb", "corrupt"})  # curate/fetch/image.py

SHARD_METADATA_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("uid", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("original_width", pa.int64()),
    ("original_height", pa.int64()),
    ("sha256", pa.string()),
])
RECORD_COLUMNS = [name for name in SHARD_METADATA_SCHEMA.names if name not in ("status", "error_message")]


def write_sizes(root: Location, shards: list[dict[str, Any]]) -> None:
    """`sizes.json` in each folder of tars: tar file name -> samples."""
    by_folder: dict[str, dict[str, int]] = {}
    for shard in shards:
        folder, _, name = shard["path"].rpartition("/")
        by_folder.setdefault(folder, {})[name] = int(shard["rows"])
    for folder, sizes in by_folder.items():
        write_json((root / folder if folder else root) / SIZES_FILE, dict(sorted(sizes.items())))


def write_img2dataset_files(root: Location, shards: list[dict[str, Any]], drops: Location,
                            started_at: float, seconds: float) -> None:
    """img2dataset's `NNNNN_stats.json` and `NNNNN.parquet` beside every tar in `shards` (in shard order)."""
    if not shards:
        return
    # Only whole-sample drops are failed input rows; an image removed from a kept document (an image row) is
    # part of a sample that succeeded.
    total, _ = count_rows(drops)
    batches = (sample_drops(table).to_pylist()
               for table in iter_drops(drops, ["key", "url", "stage", "reason", "detail", IMAGE], batch_size=8192))
    pending: list[dict[str, Any]] = []
    for index, shard in enumerate(shards):
        lo, hi = share(total, len(shards), index)
        while len(pending) < hi - lo:  # the drop log is read once, in order, a batch at a time
            pending.extend(next(batches))
        tar = root / shard["path"]
        rows = shard_metadata(tar, pending[: hi - lo])
        del pending[: hi - lo]
        stem = tar.name.removesuffix(".tar")
        with storage.atomic_output(tar.parent / f"{stem}.parquet") as temporary:
            columns = [{name: row[name] for name in SHARD_METADATA_SCHEMA.names} for row in rows]
            pq.write_table(pa.Table.from_pylist(columns, schema=SHARD_METADATA_SCHEMA), temporary,
                           compression="zstd")
        write_json(tar.parent / f"{stem}_stats.json", shard_stats(rows, started_at, seconds))


def share(total: int, parts: int, index: int) -> tuple[int, int]:
    """Rows [lo, hi) of `total` that part `index` of `parts` gets, in order, as evenly as possible."""
    return total * index // parts, total * (index + 1) // parts


def shard_metadata(tar: Location, drops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tar's samples (status success), then the given drop-log rows: img2dataset's columns plus `reason`."""
    rows = [{**{name: record[name] for name in RECORD_COLUMNS}, "status": SUCCESS, "error_message": "",
             "reason": SUCCESS} for record in tar_records(tar)]
    for drop in drops:
        rows.append({"key": drop["key"], "uid": None, "url": drop["url"], "caption": None,
                     "status": failure_status(drop["stage"], drop["reason"]),
                     "error_message": drop["reason"] + (f": {drop['detail']}" if drop["detail"] else ""),
                     "width": None, "height": None, "original_width": None, "original_height": None,
                     "sha256": None, "reason": drop["reason"]})
    return rows


def failure_status(stage: str, reason: str) -> str:
    """img2dataset's status of a dropped row: download or resize failure, or `filtered` by a later stage."""
    if stage not in DOWNLOAD_STAGES:
        return FILTERED
    return FAILED_TO_RESIZE if reason in DECODE_REASONS else FAILED_TO_DOWNLOAD


def shard_stats(rows: list[dict[str, Any]], started_at: float, seconds: float) -> dict[str, Any]:
    """img2dataset's stats of one shard from its metadata rows; status_dict counts curate's drop reasons."""
    statuses = Counter(row["status"] for row in rows)
    return {
        "count": len(rows),
        "successes": statuses[SUCCESS],
        "failed_to_download": statuses[FAILED_TO_DOWNLOAD],
        "failed_to_resize": statuses[FAILED_TO_RESIZE],
        "filtered": statuses[FILTERED],
        "duration": round(seconds, 3),
        "start_time": round(started_at, 3),
        "end_time": round(started_at + seconds, 3),
        "status_dict": dict(sorted(Counter(row["reason"] for row in rows).items())),
    }


def tar_records(tar: Location) -> list[dict[str, Any]]:
    """The `.json` records of a tar, in order (image members are skipped, not read)."""
    from curate.sinks.webdataset import read_samples  # the sink module imports this one

    return [json.loads(members["json"]) for _, members in read_samples(tar, lambda suffix: suffix == "json")]
