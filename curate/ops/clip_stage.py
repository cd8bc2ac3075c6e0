"""What every CLIP-based stage shares: weights checked at plan time, the model loaded once per
worker, torch threads sized to the worker, a decode thread pool, and the score range checks
their `select` steps apply to annotated scores."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ClassVar

import numpy as np
import pyarrow as pa

from curate import schema
from curate.models.clip import ClipSpec, ModelUnavailable, check_clip_available, load_clip
from curate.stage import Params, Resources, Stage, StageContext, WeightsUnavailable

CORRUPT = "corrupt"
# Params fields of every CLIP stage that only change how fast values are computed, not the values;
# they are annotation params all the same (only thresholds and policies are selection params).
THROUGHPUT_PARAMS = frozenset({"torch_threads", "decode_threads"})
HEAD_PRECISION = "fp32"  # the heads run in float32 on the CPU


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


def score_values(batch: pa.Table, name: str) -> list[float | None]:
    """One field of the `scores` struct, per row (None where the row has no such score)."""
    return [(scores or {}).get(name) for scores in batch.column("scores").to_pylist()]


def decode_drops(errors: list[str | None]) -> tuple[list[str | None], list[str | None]]:
    """Hard drops (reasons, details) of the rows whose image CLIP could not decode."""
    reasons = [CORRUPT if error else None for error in errors]
    details = [f"cannot decode for CLIP: {error}" if error else None for error in errors]
    return reasons, details


def range_drops(scores: list[float | None], label: str, low: float | None, high: float | None,
                reasons: tuple[str, str], digits: int) -> tuple[list[str | None], list[str | None]]:
    """Drops (reasons, details) of the scores below `low` (reasons[0]) or above `high` (reasons[1]).

    Scores are compared as float32, the precision they are computed and stored in. Rows without a
    score are kept: they were dropped when annotated, or are not this stage's to judge.
    """
    out_reasons: list[str | None] = []
    details: list[str | None] = []
    for score in scores:
        reason = detail = None
        if score is not None:
            value = np.float32(score)
            if low is not None and value < low:
                reason, detail = reasons[0], f"{label} {value:.{digits}f} < {low}"
            elif high is not None and value > high:
                reason, detail = reasons[1], f"{label} {value:.{digits}f} > {high}"
        out_reasons.append(reason)
        details.append(detail)
    return out_reasons, details


def planned_precision(spec: ClipSpec, device: str) -> str:
    """The precision the model will run in, as far as the plan knows: as asked, else fp32 on a CPU
    (on a GPU, "auto" picks bf16 or fp16 by what the device supports)."""
    if spec.precision != "auto":
        return spec.precision
    return "fp32" if device == "cpu" else "auto"


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

    clip_field: ClassVar[str] = "model"
    phase = "model"
    resources = Resources(cpus=1.0, gpus=1.0)  # the GPU is asked for only when the cluster has one
    version = 1
    reads = frozenset({"images"})
    provides = frozenset({"scores"})
    reads_images = True
    annotation_params = frozenset({"model"}) | THROUGHPUT_PARAMS
    selection_params = frozenset()
    speed_params = THROUGHPUT_PARAMS

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
        """The CLIP model as loaded (device, precision, preprocessing) or, before loading, its weights
        and planned precision (without a sha256 when the weights are not available: a dry run)."""
        if hasattr(self, "model"):
            return self.model.describe()
        spec = self.clip_spec
        info = getattr(self, "_clip_info", None)
        if info is None:
            try:
                info = check_clip_available(spec)
            except WeightsUnavailable:
                info = {"model": spec.model, "pretrained": spec.pretrained, "checkpoint": spec.checkpoint,
                        "sha256": spec.sha256}
        return {**info, "precision": planned_precision(spec, self.context.device)}

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
    reads = frozenset({"images", "embeddings"})  # embeddings of the same CLIP are reused
    annotation_params = frozenset({"clip", "head"}) | THROUGHPUT_PARAMS
    speed_params = THROUGHPUT_PARAMS

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

    def head_info(self) -> dict:
        """The head's weights and sha256 (without a sha256 when they are not available: a dry run)."""
        head = getattr(self, "_head_info", None)
        if head is None:
            try:
                head = type(self).check_head(self.params.head)
            except WeightsUnavailable:
                spec = self.params.head
                head = {"head": spec.head, "path": spec.path, "sha256": spec.sha256}
        return {**head, "precision": HEAD_PRECISION}

    def model_info(self) -> list[dict]:
        """What the manifest records about the CLIP model and the head."""
        return [*super().model_info(), {"stage": self.name, "role": self.head_role, **self.head_info()}]
