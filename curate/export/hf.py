"""`hf`: Parquet with Hugging Face Image features, loadable with `datasets.load_dataset("parquet", ...)`.

    data/part-NNNNN.parquet    one row per sample:
      key, kind          string
      images             list of Image (HF {bytes, path}; decoded to PIL by `datasets`), resized per role
      text               the caption the policy chose (pair), all text segments joined by a blank line
                         (interleaved), the first instruction (edit)
      captions           list<{name, text}> every caption variant
      segments           list<{text, image}> the sample's order (image indices into `images`)
      image_sizes        list<{width, height, original_width, original_height, bucket}> aligned with images
      scores, source     as in the output
      meta               string (JSON) as in the output

No README is written: `load_dataset("parquet", data_files="EXPORT/data/*.parquet")` reads the
features from the files' `huggingface` schema metadata.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa

from curate import schema
from curate.export.base import ExportContext, Exporter
from curate.export.common import sample_images, text_segments
from curate.export.shards import FileEntry, ParquetShards

IMAGE_SIZE = pa.struct([
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("bucket", pa.list_(pa.int32())),
])

HF_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("kind", pa.string()),
    pa.field("images", pa.list_(schema.IMAGE)),
    pa.field("text", pa.string()),
    pa.field("captions", pa.list_(schema.CAPTION)),
    pa.field("segments", pa.list_(schema.SEGMENT)),
    pa.field("image_sizes", pa.list_(IMAGE_SIZE)),
    pa.field("scores", schema.SCORES),
    pa.field("source", schema.SOURCE),
    pa.field("meta", pa.string()),
])


class HfExporter(Exporter):
    """Samples of every kind into `data/part-NNNNN.parquet`."""

    name: ClassVar[str] = "hf"

    def __init__(self, context: ExportContext):
        super().__init__(context)
        self.shards = ParquetShards(context.root, "data", schema.with_image_features(HF_SCHEMA),
                                    context.options.shard_rows, context.options.row_group_rows)

    def prepare(self, row: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
        """One row, its size and image count; Skip for a pair without caption or a broken image."""
        if row["kind"] == "pair":
            _, text = self.policy.captions.choose(row.get("captions"))
        elif row["kind"] == "edit":
            texts = text_segments(row)
            text = texts[0] if texts else None
        else:
            text = "\n\n".join(text_segments(row))
        images = sample_images(row, self.policy.resolution)
        record = {
            "key": row["key"],
            "kind": row["kind"],
            "images": [{"bytes": image.data, "path": None} for image in images],
            "text": text,
            "captions": row.get("captions") or [],
            "segments": row.get("segments") or [],
            "image_sizes": [{
                "width": image.width, "height": image.height,
                "original_width": image.original_width, "original_height": image.original_height,
                "bucket": list(image.bucket) if image.bucket else None,
            } for image in images],
            "scores": row.get("scores"),
            "source": row.get("source"),
            "meta": row.get("meta"),
        }
        return record, sum(len(image.data) for image in images), len(images)

    def write(self, prepared: tuple[dict[str, Any], int, int]) -> None:
        record, size, image_count = prepared
        self.shards.add(record, size)
        self.images_written += image_count

    def finish(self) -> list[FileEntry]:
        return self.shards.close()

    def describe(self) -> dict[str, Any]:
        return {"data_files": "data/*.parquet", "columns": HF_SCHEMA.names}
