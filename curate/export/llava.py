"""`llava`: understanding SFT as LLaVA conversation JSON plus an image folder.

    llava.json                  [{"id": KEY, "image": "images/ab/KEY.jpg",
                                  "conversations": [{"from": "human", "value": "<image>\\n<prompt>"},
                                                    {"from": "gpt", "value": <caption>}]}, ...]
    images/<2 hex>/KEY.<ext>    one image per pair, resized per the role's resolution

Image paths are relative to the JSON file (LLaVA's `image_folder` is the export folder). The
images are spread over 256 folders by the key's first two hex digits, so no folder holds more
than a few thousand files per million samples. Only pairs are exported.
"""

from __future__ import annotations

import hashlib
import json
from typing import IO, Any, ClassVar

from curate.export.base import ExportContext, Exporter
from curate.export.common import KIND_NOT_SUPPORTED, Skip, sample_images
from curate.export.shards import FileEntry, finish_entry

JSON_FILE = "llava.json"
IMAGE_FOLDER = "images"


class LlavaExporter(Exporter):
    """Pairs into one conversation JSON (written as a stream) and an image folder."""

    name: ClassVar[str] = "llava"

    def __init__(self, context: ExportContext):
        super().__init__(context)
        self.rows = 0
        self.image_bytes = 0
        self.image_digest = hashlib.sha256()  # over "path sha256" lines in write order
        self._json: IO[str] = open(context.root / JSON_FILE, "w", encoding="utf-8")
        self._json.write("[")

    def prepare(self, row: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """One conversation and its image; Skip for other kinds, a missing caption or a broken image."""
        if row["kind"] != "pair":
            raise Skip(KIND_NOT_SUPPORTED, f"a {row['kind']} sample is not an image-text pair")
        _, caption = self.policy.captions.choose(row.get("captions"))
        image = sample_images(row, self.policy.resolution, indices=[0])[0]
        key = row["key"]
        entry = {
            "id": key,
            "image": f"{IMAGE_FOLDER}/{key[:2]}/{key}.{image.ext}",
            "conversations": [
                {"from": "human", "value": f"<image>\n{self.options.prompt}"},
                {"from": "gpt", "value": caption},
            ],
        }
        return entry, image.data

    def write(self, prepared: tuple[dict[str, Any], bytes]) -> None:
        entry, data = prepared
        path = self.context.root / entry["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.image_digest.update(f"{entry['image']} {hashlib.sha256(data).hexdigest()}\n".encode())
        self.image_bytes += len(data)
        self.images_written += 1
        self._json.write(("," if self.rows else "") + "\n" + json.dumps(entry, ensure_ascii=False))
        self.rows += 1

    def finish(self) -> list[FileEntry]:
        self._json.write("\n]\n")
        self._json.close()
        return [finish_entry(self.context.root, FileEntry(JSON_FILE, self.rows))]

    def describe(self) -> dict[str, Any]:
        return {
            "json": JSON_FILE,
            "image_folder": {
                "path": IMAGE_FOLDER,
                "files": self.images_written,
                "bytes": self.image_bytes,
                "listing_sha256": self.image_digest.hexdigest(),  # sha256 of "path sha256\n" lines in JSON order
            },
        }
