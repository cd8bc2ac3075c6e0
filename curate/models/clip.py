"""CLIP image and text embeddings through open_clip, and the CLIP score.

The CLIP score follows LAION and DataComp: the cosine similarity of the
L2-normalised image and caption embeddings, in float32, not multiplied by 100.
Images are preprocessed with open_clip's validation transform of the checkpoint
(for the usual models: shortest side resized to the input size, bicubic, center
crop, the checkpoint's mean and std).

Weights never come from the network here: `check_clip_available` finds them in a
local file, the Hugging Face cache or open_clip's URL cache, and `load_clip` loads
exactly that file. Importing this module registers the project's tiny model
(``curate-tiny``, see curate/models/tiny/README.md) with open_clip.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from PIL import Image

from curate.models.tiny_notice import notice_tiny_model
from curate.models.weights import ModelUnavailable, local_file, verify_sha256
from curate.stage import Params, RecipeError

__all__ = [
    "TINY_CLIP",
    "ClipModel",
    "ClipSpec",
    "ModelUnavailable",
    "check_clip_available",
    "clip_scores",
    "load_clip",
]

log = logging.getLogger(__name__)

TINY_DIR = Path(__file__).parent / "tiny"
TINY_MODEL = "curate-tiny"
TINY_CLIP_WEIGHTS = TINY_DIR / "curate-tiny.safetensors"
TINY_CLIP_SHA256 = "6d66d66bfc7afb6cb3b5868ce6f2d33d9a527716a5c578137f21481d0f30356c"
HF_HUB_PREFIX = "hf-hub:"
HF_CONFIG_NAME = "open_clip_config.json"
CROP_BY_RESIZE_MODE = {"shortest": "center", "longest": "pad", "squash": "none"}

if TINY_MODEL not in open_clip.list_models():
    open_clip.add_model_config(TINY_DIR / f"{TINY_MODEL}.json")

_cpu_warned = False


class ClipSpec(Params):
    """Which CLIP model to use, where its weights are, and how to run it."""

    model: str = TINY_MODEL  # open_clip model name (ViT-B-32, ViT-L-14, ...) or "hf-hub:org/name"
    pretrained: str | None = None  # open_clip pretrained tag (e.g. "openai", "laion2b_s34b_b79k")
    checkpoint: str | None = None  # local checkpoint file; takes precedence over `pretrained`
    sha256: str | None = None  # a checkpoint whose sha256 differs is refused
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp32 on CPU, bf16 (else fp16) on CUDA
    batch_size: int = 256


TINY_CLIP = ClipSpec(model=TINY_MODEL, checkpoint=str(TINY_CLIP_WEIGHTS), sha256=TINY_CLIP_SHA256)


@dataclass
class _Weights:
    """A spec resolved to one local weights file and how to build the model around it."""

    spec: ClipSpec
    path: Path
    sha256: str
    source: str  # checkpoint, pretrained_file, hf_cache, url_cache, shipped
    arch: str  # the open_clip model name to build (a built-in name or local-dir:<folder>)
    tag_cfg: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "model": self.spec.model,
            "pretrained": self.spec.pretrained,
            "checkpoint": self.spec.checkpoint,
            "sha256": self.sha256,
            "source": self.source,
            "weights": str(self.path),
        }


def check_clip_available(spec: ClipSpec) -> dict:
    """Check, offline and without building the model, that the weights of `spec` are local.

    Raises ModelUnavailable when they are not (or fail the sha256 pin), RecipeError for
    an unknown model or tag. Returns {model, pretrained, checkpoint, sha256, source, weights}.
    """
    return _resolve(spec).describe()


def _resolve(spec: ClipSpec) -> _Weights:
    if spec.model.startswith(HF_HUB_PREFIX):
        return _resolve_hf_hub(spec)
    arch = spec.model.replace("/", "-")
    if open_clip.get_model_config(arch) is None:
        raise RecipeError(f"{spec.model!r} is not an open_clip model name (see open_clip.list_models())")
    if arch == TINY_MODEL:
        notice_tiny_model()
    if spec.checkpoint:
        # A local copy of a tagged checkpoint keeps the tag's preprocessing and activation.
        tag_cfg = open_clip.get_pretrained_cfg(arch, spec.pretrained) if spec.pretrained else {}
        return _from_file(spec, spec.checkpoint, "checkpoint", arch, tag_cfg)
    if spec.pretrained:
        return _resolve_pretrained(spec, arch)
    if arch == TINY_MODEL:
        path = local_file(str(TINY_CLIP_WEIGHTS), "the shipped curate-tiny weights", "reinstall curate")
        sha = verify_sha256(path, spec.sha256 or TINY_CLIP_SHA256, "curate-tiny weights")
        return _Weights(spec, path, sha, "shipped", arch)
    raise ModelUnavailable(
        f"CLIP model {spec.model} has no weights: set `pretrained:` to one of its tags "
        f"({', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none known'}) or `checkpoint:` to a local file"
    )


def _from_file(spec: ClipSpec, location: str, source: str, arch: str, tag_cfg: dict | None = None) -> _Weights:
    what = f"CLIP checkpoint for {spec.model}"
    path = local_file(location, what, "set `checkpoint:` to an existing weights file")
    return _Weights(spec, path, verify_sha256(path, spec.sha256, what), source, arch, tag_cfg or {})


def _resolve_pretrained(spec: ClipSpec, arch: str) -> _Weights:
    tag = spec.pretrained
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        if os.path.isfile(tag):
            return _from_file(spec, tag, "pretrained_file", arch)
        known = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise RecipeError(f"{tag!r} is neither a pretrained tag of {arch} (known: {known}) nor an existing file")
    found, looked = _find_cached_tag(tag_cfg)
    if found is None:
        raise ModelUnavailable(
            f"CLIP weights {arch} pretrained={tag!r} are not available offline (looked for {' and '.join(looked)}); "
            f"set `checkpoint:` to a local copy of the weights file (e.g. checkpoint: /path/to/{arch}-{tag}.pt), "
            "or fetch them once into the Hugging Face cache on a machine with internet access"
        )
    path, source = found
    sha = verify_sha256(path, spec.sha256, f"CLIP weights {arch} pretrained={tag!r}")
    return _Weights(spec, path, sha, source, arch, tag_cfg)


def _find_cached_tag(tag_cfg: dict) -> tuple[tuple[Path, str] | None, list[str]]:
    """The cached file of an open_clip pretrained config, and what was looked for."""
    looked: list[str] = []
    if tag_cfg.get("file"):
        looked.append(tag_cfg["file"])
        if os.path.isfile(tag_cfg["file"]):
            return (Path(tag_cfg["file"]), "pretrained_file"), looked
    if tag_cfg.get("hf_hub"):
        # open_clip's form: "org/repo/filename", or "org/repo/" for the default weights file
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        for name in _safe_alternatives(filename):
            looked.append(f"{repo}/{name} in the Hugging Face cache {hf_cache_dir()}")
            path = _hf_cached(repo, name)
            if path is not None:
                return (path, "hf_cache"), looked
    if tag_cfg.get("url"):
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(tag_cfg["url"])
        looked.append(str(path))
        if path.is_file():
            return (path, "url_cache"), looked
    return None, looked


def _safe_alternatives(filename: str) -> list[str]:
    """`filename` preceded by the safetensors file open_clip prefers over it."""
    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def hf_cache_dir() -> str:
    """The Hugging Face hub cache folder, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hf_cached(repo: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir())
    return Path(found) if isinstance(found, str) else None


def _resolve_hf_hub(spec: ClipSpec) -> _Weights:
    repo = spec.model[len(HF_HUB_PREFIX):]
    if spec.pretrained:
        raise RecipeError(f"`pretrained:` does not apply to {spec.model}: the weights come from that repository")
    hint = (
        f"fetch {repo} once into the Hugging Face cache ({hf_cache_dir()}) on a machine with internet access, "
        "or set `checkpoint:` to a local weights file"
    )
    config = _hf_cached(repo, HF_CONFIG_NAME)
    if config is None:
        raise ModelUnavailable(f"CLIP model {spec.model}: {HF_CONFIG_NAME} is not in the local cache; {hint}")
    arch = f"local-dir:{config.parent}"
    if spec.checkpoint:
        return _from_file(spec, spec.checkpoint, "checkpoint", arch)
    for name in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME):
        path = _hf_cached(repo, name)
        if path is not None:
            sha = verify_sha256(path, spec.sha256, f"CLIP weights {spec.model}")
            return _Weights(spec, path, sha, "hf_cache", arch)
    raise ModelUnavailable(f"CLIP weights of {spec.model} are not in the local cache; {hint}")


@dataclass
class ClipModel:
    """A loaded CLIP model with its preprocessing and tokenizer, ready to embed."""

    name: str
    pretrained: str | None
    checkpoint: str | None
    sha256: str
    device: str
    precision: str
    embed_dim: int
    image_size: int | tuple[int, int]
    preprocess: Callable[[Image.Image], torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int = 256
    weights: str = ""
    source: str = ""
    preprocess_cfg: dict = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, repr=False)
    tokenizer: Callable[[list[str]], torch.Tensor] | None = field(default=None, repr=False)

    def preprocess_images(self, images: list[Image.Image]) -> torch.Tensor:
        """The model's validation transform applied to each image, stacked (n, 3, h, w) on the CPU."""
        if not images:
            return torch.zeros((0, 3, *_pair(self.image_size)))
        return torch.stack([self.preprocess(image) for image in images])

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """L2-normalised float32 image embeddings (n, d) of preprocessed `pixels`."""
        return self._encode(self.model.encode_image, pixels)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 text embeddings (n, d), tokenized with the model's tokenizer."""
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self._encode(self.model.encode_text, self.tokenizer(list(texts)))

    def _encode(self, encoder: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> np.ndarray:
        parts = [np.zeros((0, self.embed_dim), dtype=np.float32)]
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size].to(self.device)
            with torch.inference_mode(), self._autocast():
                features = encoder(chunk)
            parts.append(F.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(parts)

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=torch.device(self.device).type, dtype=dtype)

    def describe(self) -> dict:
        """What the manifest records: model, weights and their sha256, device, precision, preprocessing."""
        resize_mode = self.preprocess_cfg.get("resize_mode", "shortest")
        return {
            "name": self.name,
            "pretrained": self.pretrained,
            "checkpoint": self.checkpoint,
            "weights": self.weights,
            "source": self.source,
            "sha256": self.sha256,
            "device": self.device,
            "precision": self.precision,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "preprocessing": {
                "size": self.image_size,
                "resize_mode": resize_mode,
                "interpolation": self.preprocess_cfg.get("interpolation", "bicubic"),
                "crop": CROP_BY_RESIZE_MODE.get(resize_mode, resize_mode),
                "mean": list(self.mean),
                "std": list(self.std),
            },
        }


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def load_clip(spec: ClipSpec, device: str = "auto") -> ClipModel:
    """Build the model of `spec` on `device` ("auto": CUDA when available) from its local weights."""
    weights = _resolve(spec)
    device = _pick_device(device)
    precision = _pick_precision(spec.precision, device)
    model, _, preprocess = open_clip.create_model_and_transforms(
        weights.arch, device=device, **_build_options(weights)
    )
    if weights.arch.startswith("local-dir:") and weights.source == "checkpoint":
        open_clip.load_checkpoint(model, str(weights.path))
    model.eval()
    cfg = dict(model.visual.preprocess_cfg)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) and size[0] == size[1] else size
    return ClipModel(
        name=spec.model,
        pretrained=spec.pretrained,
        checkpoint=spec.checkpoint,
        sha256=weights.sha256,
        device=device,
        precision=precision,
        embed_dim=_embed_dim(model, size),
        image_size=size,
        preprocess=preprocess,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        batch_size=spec.batch_size,
        weights=str(weights.path),
        source=weights.source,
        preprocess_cfg=cfg,
        model=model,
        tokenizer=open_clip.get_tokenizer(weights.arch),
    )


def _embed_dim(model: torch.nn.Module, image_size: int | tuple[int, int]) -> int:
    """The size of the model's joint embedding space."""
    output_dim = getattr(model.visual, "output_dim", None)
    if isinstance(output_dim, int):
        return output_dim
    device = next(model.parameters()).device
    with torch.inference_mode():
        return int(model.encode_image(torch.zeros((1, 3, *_pair(image_size)), device=device)).shape[-1])


def _build_options(weights: _Weights) -> dict:
    """Keyword arguments of open_clip.create_model_and_transforms for `weights`."""
    if weights.arch.startswith("local-dir:"):
        return {"load_weights": weights.source != "checkpoint"}
    tag = weights.tag_cfg
    return {
        "pretrained": str(weights.path),
        "force_quick_gelu": bool(tag.get("quick_gelu", False)),
        "image_mean": tag.get("mean"),
        "image_std": tag.get("std"),
        "image_interpolation": tag.get("interpolation"),
        "image_resize_mode": tag.get("resize_mode"),
    }


def _pick_device(device: str) -> str:
    global _cpu_warned
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not _cpu_warned:
        _cpu_warned = True
        log.warning("no GPU: CLIP runs on CPU")
    return device


def _pick_precision(precision: str, device: str) -> str:
    if precision != "auto":
        return precision
    if not device.startswith("cuda"):
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of normalised embeddings (dot product), float32, not scaled by 100."""
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image and text embeddings differ in shape: {image_emb.shape} vs {text_emb.shape}")
    return np.einsum("ij,ij->i", image_emb, text_emb).astype(np.float32, copy=False)
