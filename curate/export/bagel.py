"""`bagel`: Parquet for BAGEL-style loaders, which read row group by row group with pyarrow.

    t2i/part-NNNNN.parquet     text-to-image, from pairs:
                                 image    binary  the encoded image (not an HF struct)
                                 captions string  JSON object {variant name: text} of the captions the policy
                                                  allows, preferred first (the loader picks one at random)
                                 key, width, height, bucket ([width, height] when the role has buckets)
    edit/part-NNNNN.parquet    edits, from edit samples (one chain of turns per row):
                                 image_list        list<binary>          the chain: the first input, then each
                                                                         turn's output
                                 instruction_list  list<list<string>>    per turn, every alternative instruction
                                 key
    parquet_info.json          {absolute path of each file: {"num_row_groups": N, "num_rows": N}}

The loaders shard their work by (file, row group) and find a file's row-group count in
parquet_info.json by the file's path as they see it (`data_dir` joined with the file name), so
its keys are the files' absolute paths in the export folder: the one file whose bytes depend on
where the export is written. Rewrite its keys if the files move. Interleaved samples are not
exported; a chain whose turn does not start from the previous turn's output cannot be a BAGEL
image_list and is skipped.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pyarrow as pa

from curate.edit_sample import read_turns
from curate.export.base import ExportContext, Exporter
from curate.export.common import EDIT_CHAIN_NOT_LINEAR, KIND_NOT_SUPPORTED, NO_INSTRUCTION, Skip, sample_images
from curate.export.shards import FileEntry, ParquetShards, finish_entry

T2I_FOLDER = "t2i"
EDIT_FOLDER = "edit"
PARQUET_INFO = "parquet_info.json"

T2I_SCHEMA = pa.schema([
    pa.field("image", pa.binary()),
    pa.field("captions", pa.string()),
    pa.field("key", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("bucket", pa.list_(pa.int32())),
])

EDIT_SCHEMA = pa.schema([
    pa.field("image_list", pa.list_(pa.binary())),
    pa.field("instruction_list", pa.list_(pa.list_(pa.string()))),
    pa.field("key", pa.string()),
])


class BagelExporter(Exporter):
    """Pairs into t2i/, edit chains into edit/, and the row-group index."""

    name: ClassVar[str] = "bagel"

    def __init__(self, context: ExportContext):
        super().__init__(context)
        rows, group_rows = context.options.shard_rows, context.options.row_group_rows
        self.t2i = ParquetShards(context.root, T2I_FOLDER, T2I_SCHEMA, rows, group_rows)
        self.edit = ParquetShards(context.root, EDIT_FOLDER, EDIT_SCHEMA, rows, group_rows)

    def prepare(self, row: dict[str, Any]) -> tuple[str, dict[str, Any], int, int]:
        """(folder, row, bytes, images) of one sample; Skip for interleaved samples and unusable chains."""
        if row["kind"] == "pair":
            return self._pair(row)
        if row["kind"] == "edit":
            return self._edit(row)
        raise Skip(KIND_NOT_SUPPORTED, f"a {row['kind']} sample is neither text-to-image nor an edit")

    def _pair(self, row: dict[str, Any]) -> tuple[str, dict[str, Any], int, int]:
        self.policy.captions.choose(row.get("captions"))  # Skip when the policy allows none
        captions = dict(self.policy.captions.variants(row.get("captions")))
        image = sample_images(row, self.policy.resolution, indices=[0])[0]
        record = {
            "image": image.data,
            "captions": json.dumps(captions, ensure_ascii=False),
            "key": row["key"],
            "width": image.width,
            "height": image.height,
            "bucket": list(image.bucket) if image.bucket else None,
        }
        return T2I_FOLDER, record, len(image.data), 1

    def _edit(self, row: dict[str, Any]) -> tuple[str, dict[str, Any], int, int]:
        turns = read_turns(row.get("segments"), row.get("meta"))
        if not turns:
            raise Skip(NO_INSTRUCTION, "the edit sample has no turn")
        for number, turn in enumerate(turns):
            if not turn.instructions:
                raise Skip(NO_INSTRUCTION, f"turn {number} has no instruction")
            if number and turn.input != turns[number - 1].output:
                raise Skip(EDIT_CHAIN_NOT_LINEAR, f"turn {number} starts from image {turn.input}, "
                                                  f"not from the previous output {turns[number - 1].output}")
        chain = [turns[0].input] + [turn.output for turn in turns]
        images = sample_images(row, self.policy.resolution, indices=chain)
        record = {
            "image_list": [image.data for image in images],
            "instruction_list": [list(turn.instructions) for turn in turns],
            "key": row["key"],
        }
        return EDIT_FOLDER, record, sum(len(image.data) for image in images), len(images)

    def write(self, prepared: tuple[str, dict[str, Any], int, int]) -> None:
        folder, record, size, image_count = prepared
        (self.t2i if folder == T2I_FOLDER else self.edit).add(record, size)
        self.images_written += image_count

    def finish(self) -> list[FileEntry]:
        entries = self.t2i.close() + self.edit.close()
        info = {
            str(self.context.final / entry.path): {"num_row_groups": entry.row_groups, "num_rows": entry.rows}
            for entry in entries
        }
        (self.context.root / PARQUET_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        return entries + [finish_entry(self.context.root, FileEntry(PARQUET_INFO, 0))]

    def describe(self) -> dict[str, Any]:
        return {
            "t2i": {"folder": T2I_FOLDER, "rows": sum(e.rows for e in self.t2i.entries)},
            "edit": {"folder": EDIT_FOLDER, "rows": sum(e.rows for e in self.edit.entries)},
            "parquet_info": PARQUET_INFO,
        }
