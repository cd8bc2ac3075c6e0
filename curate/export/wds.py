"""`wds`: WebDataset tars of image-text pairs, `KEY.jpg` / `KEY.json` / `KEY.txt` for every sample.

The layout open_clip_train, Show-o (`jpg;png;jpeg;webp` + `txt`) and BLIP3-o (`load_dataset(
"webdataset")`, `jpg` + `txt`) read. Every image is JPEG (other formats are re-encoded), so every
sample has exactly the same three members. `KEY.json` is the stable record every curate
WebDataset output carries (curate/sinks/wds_record.py): `caption` is the exported text (the
`.txt`), `width`/`height` the exported size, `original_width`/`original_height` the size as
fetched, before any resize; plus `bucket` when the role has buckets. `sizes.json` beside the tars
gives each tar's sample count (open_clip_train reads it).
"""

from __future__ import annotations

from typing import Any, ClassVar

from curate.export.base import ExportContext, Exporter
from curate.export.common import KIND_NOT_SUPPORTED, Skip, sample_images
from curate.export.shards import FileEntry, TarShards
from curate.sinks.wds_record import StoredSize, record_bytes, sample_record


class WdsExporter(Exporter):
    """Pairs into `shard-NNNNNN.tar` files of `shard_rows` samples."""

    name: ClassVar[str] = "wds"

    def __init__(self, context: ExportContext):
        super().__init__(context)
        self.shards = TarShards(context.root, "", context.options.shard_rows)

    def prepare(self, row: dict[str, Any]) -> tuple[str, list[tuple[str, bytes]]]:
        """The members of one pair; Skip for other kinds, a missing caption or a broken image."""
        if row["kind"] != "pair":
            raise Skip(KIND_NOT_SUPPORTED, f"a {row['kind']} sample is not an image-text pair")
        _, text = self.policy.captions.choose(row.get("captions"))
        image = sample_images(row, self.policy.resolution, force_jpeg=True, indices=[0])[0]
        record = sample_record(row, text, StoredSize(image.width, image.height))
        if self.policy.resolution is not None and self.policy.resolution.mode == "buckets":
            record["bucket"] = list(image.bucket)
        return row["key"], [("jpg", image.data), ("json", record_bytes(record)), ("txt", text.encode("utf-8"))]

    def write(self, prepared: tuple[str, list[tuple[str, bytes]]]) -> None:
        self.shards.add(*prepared)
        self.images_written += 1

    def finish(self) -> list[FileEntry]:
        return self.shards.close()

    def describe(self) -> dict[str, Any]:
        count = len(self.shards.entries)
        pattern = f"shard-{{000000..{count - 1:06d}}}.tar" if count else None
        return {"members": ["jpg", "json", "txt"], "shards": pattern, "sizes": "sizes.json" if count else None}
