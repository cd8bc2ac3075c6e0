"""A tiny, randomly initialised image-to-text model, to test the captioner plumbing offline.

Not a captioner in any useful sense: a two-layer convolution over a 32 x 32 thumbnail gives the
initial state of a GRU cell that greedily emits words from a 40-word vocabulary. Its weights come
from a seeded numpy generator (float64, CPU), so the same seed gives the same weights, the same
sha256 and the same caption for the same image on any machine.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image
from torch import nn

from curate.models.caption_model import CaptionModel

VOCABULARY = (
    "<end>", "<start>", "a", "the", "photo", "picture", "drawing", "of", "with", "on", "in", "and", "two", "three",
    "red", "green", "blue", "yellow", "white", "black", "orange", "purple", "small", "large", "bright", "dark",
    "circle", "square", "triangle", "star", "shape", "shapes", "background", "scene", "pattern", "sky", "field",
    "room", "street", "tree",
)
END, START = 0, 1
THUMBNAIL = 32
HIDDEN = 32
MIN_WORDS = 3


class TinyCaptionNet(nn.Module):
    """Convolutional image encoder + GRU word decoder, float64."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(64, HIDDEN), nn.Tanh(),
        )
        self.embed = nn.Embedding(len(VOCABULARY), HIDDEN)
        self.cell = nn.GRUCell(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, len(VOCABULARY))


def build_tiny_captioner(seed: int = 0) -> TinyCaptionNet:
    """The tiny network with weights drawn from numpy's generator seeded with `seed`."""
    net = TinyCaptionNet().double()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, parameter in sorted(net.named_parameters()):
            fan_in = parameter.shape[1] if parameter.dim() > 1 else parameter.shape[0]
            if parameter.dim() == 4:
                fan_in = int(np.prod(parameter.shape[1:]))
            scale = 1.0 / np.sqrt(fan_in) if "embed" not in name else 1.0
            values = rng.standard_normal(tuple(parameter.shape)) * scale * 2.0
            parameter.copy_(torch.from_numpy(values))
    return net.eval()


def weights_sha256(net: nn.Module) -> str:
    """sha256 over the parameters (name, shape, float64 bytes, in name order) and the vocabulary."""
    digest = hashlib.sha256("\n".join(VOCABULARY).encode())
    for name, parameter in sorted(net.state_dict().items()):
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(parameter.detach().cpu().numpy().astype("<f8").tobytes())
    return digest.hexdigest()


def thumbnails(images: list[Image.Image]) -> torch.Tensor:
    """Images as a float64 batch of 32 x 32 RGB thumbnails in [-0.5, 0.5]."""
    arrays = [np.asarray(image.convert("RGB").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR),
                         dtype=np.float64) / 255.0 - 0.5 for image in images]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


class TinyCaptioner(CaptionModel):
    """`CaptionModel` over the tiny network: greedy decoding, no word twice in a row, 3 to `max_words` words."""

    def __init__(self, seed: int = 0, max_words: int = 12):
        self.seed = seed
        self.max_words = max_words
        self.net = build_tiny_captioner(seed)
        self.sha256 = weights_sha256(self.net)

    @torch.no_grad()
    def generate(self, images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        state = self.net.encoder(thumbnails(images)) * 3.0
        previous = torch.full((len(images),), START, dtype=torch.long)
        words: list[list[str]] = [[] for _ in images]
        finished = [False] * len(images)
        for step in range(self.max_words):
            state = self.net.cell(self.net.embed(previous), state)
            logits = self.net.out(state)
            logits[:, START] = -torch.inf
            logits[torch.arange(len(images)), previous] = -torch.inf  # no word twice in a row
            if step < MIN_WORDS:
                logits[:, END] = -torch.inf
            previous = logits.argmax(dim=1)
            for index, token in enumerate(previous.tolist()):
                if finished[index] or token == END:
                    finished[index] = True
                    continue
                words[index].append(VOCABULARY[token])
            if all(finished):
                break
        return [" ".join(w) for w in words]

    def describe(self) -> dict:
        return {"name": "curate-tiny-captioner", "weights": f"seed {self.seed} (randomly initialised)",
                "sha256": self.sha256, "device": "cpu", "precision": "fp64", "vocabulary": len(VOCABULARY),
                "max_words": self.max_words}
