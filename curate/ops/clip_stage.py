"""What every CLIP-based stage shares: weights checked at plan time, the model loaded once per
worker, torch threads sized to the worker, and a decode thread pool."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ClassVar

import pyarrow as pa

from curate import schema
from curate.models.clip import ClipSpec, ModelUnavailable, check_clip_available, load_clip
from curate.stage import Params, Resources, Stage, StageContext


def model_id(spec: ClipSpec, info: dict) -> str:
    """A short identity for embeddings: model name and pretrained tag or weights hash."""
    tag = spec.pretrained or (info.get("sha256") or "")[:12] or "default"
    return f"{spec.model}/{tag}"


def set_struct_column(batch: pa.Table, name: str, values: list) -> pa.Table:
    """Replace column `name` with `values` typed as in the sample schema."""
    field = schema.SAMPLE_SCHEMA.field(name)
    return batch.set_column(batch.schema.get_field_index(name), field, pa.array(values, field.type))


def merge_scores(batch: pa.Table, name: str, values: list[float | None]) -> pa.Table:
    """Set one field of the `scores` struct, keeping the others."""
    previous = batch.column("scores").to_pylist()
    return set_struct_column(batch, "scores", [{**(old or {}), name: value} for old, value in zip(previous, values)])


def local_path(location: str | None, recipe_dir: str) -> str | None:
    """A relative file path from a recipe, made absolute against the recipe's folder (URLs unchanged)."""
    if not location or "://" in location or os.path.isabs(os.path.expanduser(location)):
        return os.path.expanduser(location) if location else location
    return os.path.abspath(os.path.join(recipe_dir, location))


def torch_threads(requested: int | None) -> int:
    """Threads for torch: as asked, else what Ray's CPU share says (OMP_NUM_THREADS), at least 1."""
    if requested:
        return requested
    return max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1)


class ClipModelStage(Stage):
    """Base of stages that run a CLIP model. `clip_field` names the ClipSpec in the stage's Params,
    which also has `torch_threads` and `decode_threads`."""

    clip_field: ClassVar[str]
    phase = "model"
    resources = Resources(cpus=1.0, gpus=1.0)  # the GPU is asked for only when the cluster has one

    def __init__(self, params: Params, context: StageContext | None = None):
        super().__init__(params, context)
        spec = getattr(params, self.clip_field)
        resolved = spec.model_copy(update={"checkpoint": local_path(spec.checkpoint, self.context.recipe_dir)})
        self.params = params.model_copy(update={self.clip_field: resolved})

    @property
    def clip_spec(self) -> ClipSpec:
        return getattr(self.params, self.clip_field)

    def preflight(self) -> None:
        """Refuse, before any work, weights that are not available locally or do not match the pin."""
        try:
            self._clip_info = check_clip_available(self.clip_spec)
        except ModelUnavailable as error:
            error.path = error.path or f"stages.{self.name}.{self.clip_field}"
            raise

    def clip_info(self) -> dict:
        """The CLIP model as loaded (device, precision, preprocessing) or, before loading, its weights."""
        if hasattr(self, "model"):
            return self.model.describe()
        return getattr(self, "_clip_info", None) or check_clip_available(self.clip_spec)

    def model_info(self) -> list[dict]:
        """What the manifest records about the models."""
        return [{"stage": self.name, "role": "clip", **self.clip_info()}]

    def setup(self) -> None:
        """Size torch's threads, load the model once per worker, start the decode threads."""
        import torch

        torch.set_num_threads(torch_threads(self.params.torch_threads))
        self.model = load_clip(self.clip_spec, device="auto")
        self.model_name = model_id(self.clip_spec, self.model.describe())
        self.pool = ThreadPoolExecutor(self.params.decode_threads, thread_name_prefix=f"{self.name}-decode")

    def teardown(self) -> None:
        """Stop the decode threads."""
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown()
            self.pool = None


class ClipHeadStage(ClipModelStage):
    """Base of stages that put a small head on the CLIP image embedding (aesthetic, watermark).

    The stage's Params have `clip` (the ClipSpec) and `head` (a spec with a local `path`);
    `check_head` checks the head's weights and returns their description for the manifest,
    where they are recorded with role `head_role`.
    """

    clip_field = "clip"
    head_role: ClassVar[str]
    check_head: ClassVar[Callable[[Any], dict]]

    def __init__(self, params: Params, context: StageContext | None = None):
        super().__init__(params, context)
        head = self.params.head.model_copy(update={"path": local_path(self.params.head.path, self.context.recipe_dir)})
        self.params = self.params.model_copy(update={"head": head})

    def preflight(self) -> None:
        """Refuse missing or mismatched CLIP or head weights before any work."""
        super().preflight()
        try:
            self._head_info = type(self).check_head(self.params.head)
        except ModelUnavailable as error:
            error.path = error.path or f"stages.{self.name}.head"
            raise

    def model_info(self) -> list[dict]:
        """What the manifest records about the CLIP model and the head."""
        head = getattr(self, "_head_info", None) or type(self).check_head(self.params.head)
        return [*super().model_info(), {"stage": self.name, "role": self.head_role, **head}]
