"""Aesthetic score heads on L2-normalised CLIP image embeddings.

Three heads:

- ``laion_v2``: LAION's improved aesthetic predictor, an MLP 768 -> 1024 -> 128 -> 64
  -> 16 -> 1 on OpenAI CLIP ViT-L/14 embeddings. The dropout layers keep their module
  indices so the public state_dict (``layers.0.weight`` ... ``layers.7.bias``, file
  sac+logos+ava1-l14-linearMSE.pth) loads as published.
- ``laion_v1``: LAION's first predictor, a linear layer d -> 1 (``weight``, ``bias``).
- ``tiny``: the project's head for the tiny CLIP (d -> hidden -> 1), shipped in
  curate/models/tiny/ and trained on a synthetic quality signal (see its README.md).

Weights are a local file or an http(s) URL with a sha256 pin (downloaded once into
the cache, see curate.models.weights); .safetensors or torch state_dict files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from curate.models.tiny_notice import notice_tiny_model
from curate.models.weights import ModelUnavailable, resolve
from curate.stage import Params, RecipeError

__all__ = ["TINY_AESTHETIC", "AestheticHead", "AestheticSpec", "check_aesthetic_available", "load_aesthetic"]

TINY_AESTHETIC_WEIGHTS = Path(__file__).parent / "tiny" / "curate-tiny-aesthetic.safetensors"
TINY_AESTHETIC_SHA256 = "07742a50607fe9e0b0e477997607e78e6809f3df9f95ff3b7119e435b98fa559"

PUBLIC_FILES = {
    "laion_v2": "sac+logos+ava1-l14-linearMSE.pth (christophschuhmann/improved-aesthetic-predictor)",
    "laion_v1": "sa_0_4_vit_l_14_linear.pth (LAION-AI/aesthetic-predictor)",
}
TRAINED_ON = {"laion_v2": "ViT-L/14", "laion_v1": "ViT-L/14 or ViT-B/32", "tiny": "curate-tiny"}


class AestheticSpec(Params):
    """Which aesthetic head to use and where its weights are."""

    head: Literal["laion_v2", "laion_v1", "tiny"] = "tiny"
    path: str | None = None  # local file or http(s) URL; the tiny head defaults to the shipped file
    sha256: str | None = None  # required for a URL; a file whose sha256 differs is refused


TINY_AESTHETIC = AestheticSpec(head="tiny", path=str(TINY_AESTHETIC_WEIGHTS), sha256=TINY_AESTHETIC_SHA256)


class LaionV2(nn.Module):
    """LAION improved aesthetic predictor: the MLP with its dropout layers at the published indices."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TinyHead(nn.Module):
    """The tiny head: d -> hidden -> 1 with a ReLU."""

    def __init__(self, input_size: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass
class AestheticHead:
    """A loaded head: maps normalised CLIP image embeddings (n, embed_dim) to scores (n,)."""

    kind: str
    embed_dim: int
    module: nn.Module
    weights: str
    sha256: str
    spec: AestheticSpec

    def __call__(self, normalised_embeddings: np.ndarray) -> np.ndarray:
        """Float32 aesthetic scores of L2-normalised embeddings."""
        x = torch.as_tensor(np.asarray(normalised_embeddings, dtype=np.float32)).reshape(-1, self.embed_dim)
        with torch.inference_mode():
            return self.module(x).reshape(-1).numpy().astype(np.float32, copy=False)

    def describe(self) -> dict:
        """What the manifest records: head kind, weights and their sha256, input size."""
        return {
            "head": self.kind,
            "path": self.spec.path,
            "weights": self.weights,
            "sha256": self.sha256,
            "embed_dim": self.embed_dim,
        }


def check_aesthetic_available(spec: AestheticSpec) -> dict:
    """Make sure the head's weights are local (downloading a pinned URL into the cache) and match the pin.

    Returns {head, path, weights, sha256}; raises ModelUnavailable or RecipeError.
    """
    path, sha = _weights_file(spec)
    return {"head": spec.head, "path": spec.path, "weights": str(path), "sha256": sha}


def _weights_file(spec: AestheticSpec) -> tuple[Path, str]:
    location, pin = spec.path, spec.sha256
    if spec.head == "tiny":
        notice_tiny_model()
    if spec.head == "tiny" and location is None:
        location, pin = str(TINY_AESTHETIC_WEIGHTS), pin or TINY_AESTHETIC_SHA256
    if location is None:
        raise ModelUnavailable(
            f"the {spec.head} aesthetic head needs its weights: set `path:` to a local copy of "
            f"{PUBLIC_FILES[spec.head]}, or to its http(s) URL together with `sha256:`"
        )
    hint = "set `path:` to an existing weights file or an http(s) URL with `sha256:`"
    return resolve(location, pin, f"{spec.head} aesthetic head", hint)


def load_aesthetic(spec: AestheticSpec, embed_dim: int, clip_name: str | None = None) -> AestheticHead:
    """Load the head of `spec` for a CLIP model whose embeddings have `embed_dim` dimensions.

    A head built for another embedding size is refused with ModelUnavailable naming
    both sizes (`clip_name` only makes the message clearer).
    """
    path, sha = _weights_file(spec)
    state = _load_state_dict(path, spec.head)
    module = _build(spec.head, state, path)
    input_size = _input_size(module)
    if input_size != embed_dim:
        raise ModelUnavailable(
            f"the {spec.head} aesthetic head {path.name} expects {input_size}-d embeddings "
            f"({TRAINED_ON[spec.head]}); CLIP model {clip_name or ''}{' ' if clip_name else ''}gives {embed_dim}-d: "
            "pick the CLIP model the head was trained on"
        )
    module.eval()
    return AestheticHead(spec.head, embed_dim, module, str(path), sha, spec)


def _load_state_dict(path: Path, kind: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the same recipe problem
        raise RecipeError(f"cannot read the {kind} aesthetic head {path}: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RecipeError(f"{path} is not a state_dict of a {kind} aesthetic head")
    return {key: value.float() for key, value in state.items()}


def _build(kind: str, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """The head module of `kind`, sized from `state` and loaded with it."""
    try:
        if kind == "laion_v2":
            module: nn.Module = LaionV2(state["layers.0.weight"].shape[1])
        elif kind == "laion_v1":
            module = nn.Linear(state["weight"].shape[1], 1)
        else:
            hidden, input_size = state["layers.0.weight"].shape
            module = TinyHead(input_size, hidden)
        module.load_state_dict(state)
    except (KeyError, RuntimeError) as error:
        raise RecipeError(f"{path} is not a {kind} aesthetic head: {error}") from error
    return module


def _input_size(module: nn.Module) -> int:
    first = module if isinstance(module, nn.Linear) else module.layers[0]
    return first.in_features
