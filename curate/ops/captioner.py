"""Generate a caption per sample image with a captioning model (`captioner`, phase model).

The stage decodes image `image` (default 0) of each sample of the chosen `kinds`, hands the images
to a `CaptionModel` (curate/models/caption_model.py) `batch_size` at a time, and writes each
caption as variant `name`. A sample without that image (or its bytes) is left unchanged; an image
that does not decode drops the sample as `corrupt`, as in the other model stages. The GPU is asked
for only when the cluster has one.
"""

from __future__ import annotations

import io

import pyarrow as pa
from PIL import Image
from pydantic import Field

from curate.models.caption_model import CaptionModelSpec, check_caption_model, load_caption_model
from curate.ops.caption_variants import OnExisting, with_caption_variant
from curate.ops.clip_stage import torch_threads
from curate.stage import Params, Resources, Stage, with_drops

CORRUPT = "corrupt"


class CaptionerParams(Params):
    """Which model, which image of which samples, and the caption variant written."""

    model: CaptionModelSpec  # {type: tiny, seed: 0} or {type: transformers, path: ..., sha256: ...}
    name: str = Field("generated", min_length=1)
    image: int = Field(0, ge=0)  # which image of a sample is captioned
    kinds: list[str] = Field(default_factory=lambda: ["pair"], min_length=1)
    on_existing: OnExisting = "replace"  # "keep": samples that already have variant `name` are not captioned
    batch_size: int = Field(16, ge=1)  # images per model call
    torch_threads: int | None = Field(None, ge=1)


class Captioner(Stage):
    """Writes caption variant `name` from a captioning model."""

    name = "captioner"
    Params = CaptionerParams
    phase = "model"
    resources = Resources(cpus=1.0, gpus=1.0)  # the GPU is asked for only when the cluster has one
    reads = frozenset({"kind", "images", "captions"})
    provides = frozenset({"captions"})
    reads_images = True
    # batch_size and torch_threads only set the pace; they are annotation params all the same
    annotation_params = frozenset(CaptionerParams.model_fields)
    selection_params = frozenset()
    speed_params = frozenset({"batch_size", "torch_threads"})

    def preflight(self) -> None:
        """Refuse, before any work, a model that is not available locally or does not match its pin."""
        try:
            self._info = check_caption_model(self.params.model, self.context.recipe_dir)
        except Exception as error:
            if hasattr(error, "path") and not error.path:
                error.path = f"stages.{self.name}.model"
            raise

    def setup(self) -> None:
        """Load the model once per worker."""
        import torch

        torch.set_num_threads(torch_threads(self.params.torch_threads))
        self.model = load_caption_model(self.params.model, self.context.recipe_dir, self.context.device)

    def model_info(self) -> list[dict]:
        """The model as loaded, else as checked at plan time."""
        info = self.model.describe() if hasattr(self, "model") else getattr(self, "_info", None)
        if info is None:
            info = check_caption_model(self.params.model, self.context.recipe_dir)
        return [{"stage": self.name, "role": "captioner", **info}]

    def process(self, batch: pa.Table) -> pa.Table:
        if not hasattr(self, "model"):
            self.setup()
        todo, images, reasons, details = self._decode(batch)
        texts: list[str | None] = [None] * batch.num_rows
        size = self.params.batch_size
        for start in range(0, len(todo), size):
            captions = self.model.generate(images[start:start + size])
            for row, caption in zip(todo[start:start + size], captions):
                texts[row] = caption.strip() or None
        batch = with_caption_variant(batch, self.params.name, texts, self.params.on_existing)
        return with_drops(batch, reasons, details)

    def _decode(self, batch: pa.Table) -> tuple[list[int], list[Image.Image], list[str | None], list[str | None]]:
        """Rows to caption and their decoded images; drop reasons for images that do not decode."""
        index = self.params.image
        reasons: list[str | None] = [None] * batch.num_rows
        details: list[str | None] = [None] * batch.num_rows
        todo, images = [], []
        rows = zip(batch.column("kind").to_pylist(), batch.column("images").to_pylist(),
                   batch.column("captions").to_pylist())
        for row, (kind, sample_images, captions) in enumerate(rows):
            if kind not in self.params.kinds or not sample_images or index >= len(sample_images):
                continue
            data = (sample_images[index] or {}).get("bytes")
            if not data or self._has_variant(captions):
                continue
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
            except Exception as error:  # any decoder failure is the sample's: recorded as its drop reason
                reasons[row], details[row] = CORRUPT, f"image {index}: {type(error).__name__}: {error}"
                continue
            todo.append(row)
            images.append(image)
        return todo, images, reasons, details

    def _has_variant(self, captions: list[dict] | None) -> bool:
        """Whether a kept variant makes captioning this sample useless (on_existing: keep)."""
        if self.params.on_existing != "keep":
            return False
        return any(c["name"] == self.params.name and c["text"] is not None for c in captions or ())
