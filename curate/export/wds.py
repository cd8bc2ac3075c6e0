"""`wds`: WebDataset tars of image-text pairs, `KEY.jpg` / `KEY.json` / `KEY.txt` for every sample.

The layout open_clip_train, Show-o (`jpg;png;jpeg;webp` + `txt`) and BLIP3-o (`load_dataset(
"webdataset")`, `jpg` + `txt`) read. Every image is JPEG (other formats are re-encoded), so every
sample has exactly the same three members. `KEY.json` holds only fields that are never null
(key, caption variant, exported and original size, and the bucket when the role has buckets):
`datasets` infers the JSON types from the first samples and fails on a field that is null there
and set later. Everything else about a sample stays in the output, joined by key.
"""

from __future__ import annotations

from typing import Any, ClassVar

from curate.export.base import ExportContext, Exporter
from curate.export.common import KIND_NOT_SUPPORTED, Skip, sample_images
from curate.export.shards import FileEntry, TarShards
from curate.sinks.webdataset import compact_json


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
        caption, text = self.policy.captions.choose(row.get("captions"))
        image = sample_images(row, self.policy.resolution, force_jpeg=True, indices=[0])[0]
        record: dict[str, Any] = {
            "key": row["key"],
            "caption": caption,
            "width": image.width,
            "height": image.height,
            "original_width": image.original_width,
            "original_height": image.original_height,
        }
        if self.policy.resolution is not None and self.policy.resolution.mode == "buckets":
            record["bucket"] = list(image.bucket)
        return row["key"], [("jpg", image.data), ("json", compact_json(record)), ("txt", text.encode("utf-8"))]

    def write(self, prepared: tuple[str, list[tuple[str, bytes]]]) -> None:
        self.shards.add(*prepared)
        self.images_written += 1

    def finish(self) -> list[FileEntry]:
        return self.shards.close()

    def describe(self) -> dict[str, Any]:
        count = len(self.shards.entries)
        pattern = f"shard-{{000000..{count - 1:06d}}}.tar" if count else None
        return {"members": ["jpg", "json", "txt"], "shards": pattern}
