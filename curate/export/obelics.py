"""`obelics`: interleaved documents as OBELICS-layout Parquet.

One row per document, `data/part-NNNNN.parquet`:

    images            list<struct{bytes, path}>  the image at each image position, null at text positions
    texts             list<string>               the text at each text position, null at image positions
    metadata          string (JSON)              a list aligned with the positions: per image {url, width,
                                                 height, original_width, original_height, format, bucket},
                                                 null at text positions
    general_metadata  string (JSON)              {key, kind, url (the page), source, meta (the sample's meta)}

The positions follow the sample's `segments` (images it does not place, such as edit masks, are
left out). The Parquet schema carries Hugging Face features (`images` a list of Image), so
`datasets` decodes the images; curate's own `obelics` source reads the files back. Pairs become
two-element documents (image, caption) only with `pairs_as_documents`; edits are not documents here.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pyarrow as pa

from curate import schema
from curate.export.base import ExportContext, Exporter
from curate.export.common import KIND_NOT_SUPPORTED, NO_IMAGE, PAIR_NOT_DOCUMENT, ExportedImage, Skip, prepare_image
from curate.export.shards import FileEntry, ParquetShards

OBELICS_SCHEMA = pa.schema([
    pa.field("images", pa.list_(schema.IMAGE)),
    pa.field("texts", pa.list_(pa.string())),
    pa.field("metadata", pa.string()),
    pa.field("general_metadata", pa.string()),
])


class ObelicsExporter(Exporter):
    """Documents into Parquet files of `shard_rows` rows."""

    name: ClassVar[str] = "obelics"

    def __init__(self, context: ExportContext):
        super().__init__(context)
        self.shards = ParquetShards(context.root, "data", schema.with_image_features(OBELICS_SCHEMA),
                                    context.options.shard_rows, context.options.row_group_rows)

    def prepare(self, row: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
        """One OBELICS row, its size in bytes and its image count."""
        if row["kind"] == "pair":
            if not self.options.pairs_as_documents:
                raise Skip(PAIR_NOT_DOCUMENT, "a pair is not a document (export with pairs_as_documents)")
            _, caption = self.policy.captions.choose(row.get("captions"))
            order: list[dict[str, Any]] = [{"text": None, "image": 0}, {"text": caption, "image": None}]
        elif row["kind"] == "interleaved":
            order = [s for s in row.get("segments") or [] if s]
        else:
            raise Skip(KIND_NOT_SUPPORTED, f"a {row['kind']} sample is not a document")
        stored = row.get("images") or []
        metas = row.get("image_meta") or []
        prepared: dict[int, ExportedImage] = {}
        images, texts, metadata = [], [], []
        for segment in order:
            index = segment.get("image")
            if index is None:
                if segment.get("text") is None:
                    continue
                images.append(None)
                texts.append(segment["text"])
                metadata.append(None)
                continue
            if not 0 <= index < len(stored) or stored[index] is None:
                raise Skip(NO_IMAGE, f"segment image {index} is not in the sample")
            if index not in prepared:
                prepared[index] = prepare_image(stored[index].get("bytes"), self.policy.resolution, f"image {index}")
            image = prepared[index]
            meta = metas[index] if index < len(metas) and metas[index] else {}
            images.append({"bytes": image.data, "path": None})
            texts.append(None)
            metadata.append({
                "url": meta.get("url"), "width": image.width, "height": image.height,
                "original_width": image.original_width, "original_height": image.original_height,
                "format": image.ext, "bucket": list(image.bucket) if image.bucket else None,
            })
        source = row.get("source") or {}
        general = {"key": row["key"], "kind": row["kind"], "url": source.get("url"), "source": source,
                   "meta": row.get("meta")}
        document = {
            "images": images,
            "texts": texts,
            "metadata": json.dumps(metadata, ensure_ascii=False),
            "general_metadata": json.dumps(general, ensure_ascii=False, sort_keys=True),
        }
        size = sum(len(i.data) for i in prepared.values()) + sum(len(t or "") for t in texts)
        return document, size, sum(1 for i in images if i is not None)

    def write(self, prepared: tuple[dict[str, Any], int, int]) -> None:
        document, size, image_count = prepared
        self.shards.add(document, size)
        self.images_written += image_count

    def finish(self) -> list[FileEntry]:
        return self.shards.close()

    def describe(self) -> dict[str, Any]:
        return {"data_files": "data/*.parquet", "columns": OBELICS_SCHEMA.names}
