"""Watermark probability heads on L2-normalised CLIP image embeddings.

A head maps the embedding of an image to the probability that it carries a
watermark (text or logo overlays of stock-photo sites, "PREVIEW" stamps, ...).
Three kinds:

- ``tiny``: the project's head for the tiny CLIP (d -> hidden -> 1 logit), shipped in
  curate/models/tiny/ and trained on synthetic watermarked and clean scenes
  (scripts/train_tiny_watermark.py; results in tiny/WATERMARK.md);
- ``linear``: a linear probe d -> 1 (sigmoid) or d -> 2 (softmax, class 1 = watermark);
  state_dict keys ``weight``, ``bias``;
- ``mlp``: Linear layers with a ReLU between consecutive ones, keys
  ``layers.<i>.weight`` / ``layers.<i>.bias``; last layer 1 (sigmoid) or 2 (softmax) outputs.

Weights are a local file or an http(s) URL with a sha256 pin (curate.models.weights),
.safetensors or a torch state_dict, as for the aesthetic heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from curate.models.tiny_notice import notice_tiny_model
from curate.models.weights import ModelUnavailable, resolve
from curate.stage import Params, RecipeError

__all__ = ["TINY_WATERMARK", "WatermarkHead", "WatermarkSpec", "check_watermark_available", "load_watermark"]

TINY_WATERMARK_WEIGHTS = Path(__file__).parent / "tiny" / "curate-tiny-watermark.safetensors"
TINY_WATERMARK_SHA256 = "7589f9d0c9e80b41d2dd7ae0f76282c3aa43e22340c13bb37b31c1648581f10f"
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


class WatermarkSpec(Params):
    """Which watermark head to use and where its weights are."""

    head: Literal["tiny", "linear", "mlp"] = "tiny"
    path: str | None = None  # local file or http(s) URL; the tiny head defaults to the shipped file
    sha256: str | None = None  # required for a URL; a file whose sha256 differs is refused


TINY_WATERMARK = WatermarkSpec(head="tiny", path=str(TINY_WATERMARK_WEIGHTS), sha256=TINY_WATERMARK_SHA256)


class MlpHead(nn.Module):
    """Linear layers at the given indices of `layers`, a ReLU at every other index."""

    def __init__(self, shapes: dict[int, tuple[int, int]]):
        super().__init__()
        last = max(shapes)
        self.layers = nn.Sequential(*(
            nn.Linear(shapes[i][1], shapes[i][0]) if i in shapes else nn.ReLU() for i in range(last + 1)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass
class WatermarkHead:
    """A loaded head: maps normalised CLIP image embeddings (n, embed_dim) to probabilities (n,)."""

    kind: str
    embed_dim: int
    module: nn.Module
    weights: str
    sha256: str
    spec: WatermarkSpec

    def __call__(self, normalised_embeddings: np.ndarray) -> np.ndarray:
        """Float32 watermark probabilities in [0, 1] of L2-normalised embeddings."""
        x = torch.as_tensor(np.asarray(normalised_embeddings, dtype=np.float32)).reshape(-1, self.embed_dim)
        with torch.inference_mode():
            logits = self.module(x)
            probs = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)[:, 1]
        return probs.numpy().astype(np.float32, copy=False)

    def describe(self) -> dict:
        """What the manifest records: head kind, weights and their sha256, input size."""
        return {"head": self.kind, "path": self.spec.path, "weights": self.weights, "sha256": self.sha256,
                "embed_dim": self.embed_dim}


def check_watermark_available(spec: WatermarkSpec) -> dict:
    """Make sure the head's weights are local (downloading a pinned URL into the cache) and match the pin.

    Returns {head, path, weights, sha256}; raises ModelUnavailable or RecipeError.
    """
    path, sha = _weights_file(spec)
    return {"head": spec.head, "path": spec.path, "weights": str(path), "sha256": sha}


def _weights_file(spec: WatermarkSpec) -> tuple[Path, str]:
    location, pin = spec.path, spec.sha256
    if spec.head == "tiny":
        notice_tiny_model()
    if spec.head == "tiny" and location is None:
        location, pin = str(TINY_WATERMARK_WEIGHTS), pin or TINY_WATERMARK_SHA256
    if location is None:
        raise ModelUnavailable(
            f"the {spec.head} watermark head needs its weights: set `path:` to a local state_dict "
            "(.safetensors or .pt) of a head on this CLIP model's image embeddings, or to its http(s) URL "
            "together with `sha256:`"
        )
    hint = "set `path:` to an existing weights file or an http(s) URL with `sha256:`"
    return resolve(location, pin, f"{spec.head} watermark head", hint)


def load_watermark(spec: WatermarkSpec, embed_dim: int) -> WatermarkHead:
    """Load the head of `spec` for CLIP embeddings of `embed_dim` dimensions (another size is refused)."""
    path, sha = _weights_file(spec)
    state = _load_state_dict(path, spec.head)
    module = _build(spec.head, state, path)
    first = module if isinstance(module, nn.Linear) else module.layers[0]
    if first.in_features != embed_dim:
        raise ModelUnavailable(
            f"the {spec.head} watermark head {path.name} expects {first.in_features}-d embeddings, but the CLIP "
            f"model gives {embed_dim}-d: pick the CLIP model the head was trained on"
        )
    return WatermarkHead(spec.head, embed_dim, module.eval(), str(path), sha, spec)


def _load_state_dict(path: Path, kind: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the same recipe problem
        raise RecipeError(f"cannot read the {kind} watermark head {path}: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RecipeError(f"{path} is not a state_dict of a {kind} watermark head")
    return {key: value.float() for key, value in state.items()}


def _build(kind: str, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """The head module of `kind`, sized from `state` and loaded with it."""
    try:
        if kind == "linear":
            module: nn.Module = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        else:
            shapes = {int(m.group(1)): tuple(state[key].shape) for key in state
                      if (m := _LAYER_KEY.match(key)) and m.group(2) == "weight"}
            if not shapes:
                raise KeyError("no layers.<i>.weight entries")
            module = MlpHead(shapes)
        module.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError) as error:
        raise RecipeError(f"{path} is not a {kind} watermark head: {error}") from error
    outputs = (module if isinstance(module, nn.Linear) else module.layers[-1]).out_features
    if outputs not in (1, 2):
        raise RecipeError(f"{path}: a watermark head must end in 1 (sigmoid) or 2 (softmax) outputs, not {outputs}")
    return module
