"""The interface a captioning model offers the `captioner` stage, and how a recipe names one.

```yaml
captioner:
  model: {type: tiny, seed: 0}                 # the project's tiny random model (plumbing tests)
  # model: {type: transformers, path: /models/blip-large, weights_file: model.safetensors,
  #         sha256: <64 hex>, prompt: null, max_new_tokens: 40}
```

`tiny` is tested. `transformers` is a sketch of the real path (a local Hugging Face
vision-language model, never downloaded, its weights file pinned by sha256): it needs the
`transformers` package, which curate does not depend on, and it has not been run in curate's
tests.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Annotated, Literal

from PIL import Image
from pydantic import Field

from curate.models.weights import ModelUnavailable, local_file, verify_sha256
from curate.stage import Params


class CaptionModel(ABC):
    """Something that writes one caption per image."""

    @abstractmethod
    def generate(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order."""

    @abstractmethod
    def describe(self) -> dict:
        """Name, weights, sha256 and, as loaded, device and precision (for the manifest's `models`)."""


class TinyCaptionerSpec(Params):
    """The tiny random model (curate/models/tiny_captioner.py)."""

    type: Literal["tiny"] = "tiny"
    seed: int = 0
    max_words: int = Field(12, ge=3, le=64)


class TransformersCaptionerSpec(Params):
    """A local Hugging Face image-to-text model (sketch; see the module docstring)."""

    type: Literal["transformers"]
    path: str  # a local model folder (config, processor and weights)
    weights_file: str = "model.safetensors"  # the file the sha256 pins, inside `path`
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    prompt: str | None = None  # text prompt for models that take one
    max_new_tokens: int = Field(40, ge=1, le=1024)


CaptionModelSpec = Annotated[TinyCaptionerSpec | TransformersCaptionerSpec, Field(discriminator="type")]


def check_caption_model(spec: TinyCaptionerSpec | TransformersCaptionerSpec, recipe_dir: str) -> dict:
    """At plan time: what would be loaded; ModelUnavailable when it is not there or does not match its pin."""
    if isinstance(spec, TinyCaptionerSpec):
        from curate.models.tiny_captioner import TinyCaptioner

        return TinyCaptioner(spec.seed, spec.max_words).describe()
    try:
        import transformers  # noqa: F401 - only checking that it is installed
    except ImportError:
        raise ModelUnavailable("the transformers captioner needs the `transformers` package, which is not "
                               "installed") from None
    folder = os.path.join(recipe_dir, os.path.expanduser(spec.path))
    weights = local_file(os.path.join(folder, spec.weights_file), "captioner weights",
                         "point model.path at a local model folder")
    return {"name": os.path.basename(os.path.normpath(folder)), "weights": str(weights),
            "sha256": verify_sha256(weights, spec.sha256, "captioner weights")}


def load_caption_model(spec: TinyCaptionerSpec | TransformersCaptionerSpec, recipe_dir: str,
                       device: str = "cpu") -> CaptionModel:
    """Load the model a recipe names (once per worker)."""
    if isinstance(spec, TinyCaptionerSpec):
        from curate.models.tiny_captioner import TinyCaptioner

        return TinyCaptioner(spec.seed, spec.max_words)
    check_caption_model(spec, recipe_dir)
    return TransformersCaptioner(spec, os.path.join(recipe_dir, os.path.expanduser(spec.path)), device)


class TransformersCaptioner(CaptionModel):
    """A local Hugging Face vision-language model behind `CaptionModel`. Untested sketch."""

    def __init__(self, spec: TransformersCaptionerSpec, folder: str, device: str):
        import torch
        import transformers

        self.spec, self.folder = spec, folder
        self.device = "cuda" if device == "gpu" and torch.cuda.is_available() else "cpu"
        self.processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.model = transformers.AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        self.model.to(self.device).eval()

    def generate(self, images: list[Image.Image]) -> list[str]:
        import torch

        rgb = [image.convert("RGB") for image in images]
        kwargs = {"text": [self.spec.prompt] * len(rgb)} if self.spec.prompt else {}
        inputs = self.processor(images=rgb, return_tensors="pt", **kwargs).to(self.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.spec.max_new_tokens, do_sample=False)
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        prompt = self.spec.prompt or ""
        return [text[len(prompt):].strip() if prompt and text.startswith(prompt) else text.strip() for text in texts]

    def describe(self) -> dict:
        return {"name": os.path.basename(os.path.normpath(self.folder)),
                "weights": os.path.join(self.folder, self.spec.weights_file), "sha256": self.spec.sha256.lower(),
                "device": self.device}
