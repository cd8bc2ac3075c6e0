"""Train the tiny watermark head shipped in curate/models/tiny/.

    .venv/bin/python scripts/train_tiny_watermark.py [--out curate/models/tiny] [--seed 0]

The head (d -> hidden -> 1 logit, binary cross-entropy) reads the shipped tiny CLIP's
L2-normalised image embeddings (curate-tiny, loaded through curate.models.clip exactly
as the pipeline loads it). Training images come from
`curate.demo.watermark.watermark_examples`: scenes of the demo web at its sizes, every
other one under a text or logo watermark, two thirds re-encoded as JPEG. CPU only,
2 threads, fixed seed, deterministic algorithms.

Evaluation uses held-out draws (another seed) through `load_watermark`, and the
demo web itself (`build_synthetic_web(240, seed=0, watermarked=0.1)`). The script
writes curate-tiny-watermark.safetensors and watermark-calibration.json to --out and
prints the held-out accuracy, score distributions and the file's sha256 (pinned as
TINY_WATERMARK_SHA256 in curate/models/watermark.py).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from curate.demo.watermark import watermark_examples  # noqa: E402

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
EVAL_SEED = 1
THRESHOLD = 0.5


def embed(clip, images: list[Image.Image]) -> np.ndarray:
    """Normalised tiny-CLIP embeddings of `images`, as the pipeline computes them."""
    return clip.encode_images(clip.preprocess_images(images))


def labels_of(kinds: list[str | None]) -> np.ndarray:
    return np.array([kind is not None for kind in kinds], dtype=np.float32)


def train_head(x: np.ndarray, y: np.ndarray, args, log) -> torch.nn.Module:
    """Fit the head with full-batch Adam on binary cross-entropy."""
    from curate.models.watermark import MlpHead

    torch.manual_seed(args.seed)
    head = MlpHead({0: (args.hidden, x.shape[1]), 2: (1, args.hidden)})
    optimizer = torch.optim.Adam(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    for step in range(args.steps):
        loss = F.binary_cross_entropy_with_logits(head(inputs).squeeze(-1), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 1000 == 0 or step == args.steps - 1:
            log(f"step {step:4d}  bce {loss.item():.4f}")
    return head.eval()


def save_half(head: torch.nn.Module, path: Path) -> None:
    """Save the head's state_dict as float16 safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in head.state_dict().items()}, str(path))


def distribution(values: np.ndarray) -> dict:
    """Mean and quantiles of `values`, rounded for the calibration file."""
    if len(values) == 0:
        return {"count": 0}
    out = {"count": int(len(values)), "mean": round(float(np.mean(values)), 4)}
    out.update({f"p{round(q * 100)}": round(float(np.quantile(values, q)), 4) for q in QUANTILES})
    return out


def evaluate_held_out(clip, head, n: int, seed: int) -> dict:
    """Accuracy at THRESHOLD on fresh draws, per watermark kind, and the score distributions."""
    images, kinds = watermark_examples(n, seed)
    scores = head(embed(clip, images))
    truth = labels_of(kinds).astype(bool)
    kinds_array = np.array([k or "clean" for k in kinds])
    flagged = scores >= THRESHOLD
    return {
        "n": n,
        "seed": seed,
        "threshold": THRESHOLD,
        "accuracy": round(float(np.mean(flagged == truth)), 4),
        "clean_flagged": round(float(np.mean(flagged[~truth])), 4),
        "recall_by_kind": {k: round(float(np.mean(flagged[kinds_array == k])), 4) for k in ("text", "logo")},
        "clean": distribution(scores[~truth]),
        "watermarked": distribution(scores[truth]),
    }


def evaluate_demo_web(clip, head) -> dict:
    """Scores of the demo web's watermarked rows against its other decodable images."""
    from curate.demo.web import build_synthetic_web

    web = build_synthetic_web(240, seed=0, watermarked=0.1)
    groups: dict[str, list[Image.Image]] = {"watermarked": [], "ok": [], "other": []}
    for row in web.rows:
        route = web.routes.get(row["path"])
        if route is None or row["expect"] in ("corrupt", "not_image", "duplicate_url"):
            continue
        image = Image.open(io.BytesIO(route.body)).convert("RGB")
        groups[row["expect"] if row["expect"] in groups else "other"].append(image)
    scores = {name: head(embed(clip, images)) for name, images in groups.items()}
    return {
        "web": "build_synthetic_web(240, seed=0, watermarked=0.1)",
        "watermarked_flagged": round(float(np.mean(scores["watermarked"] >= THRESHOLD)), 4),
        "ok_flagged": round(float(np.mean(scores["ok"] >= THRESHOLD)), 4),
        "other_flagged": round(float(np.mean(scores["other"] >= THRESHOLD)), 4),
        "watermarked": distribution(scores["watermarked"]),
        "ok": distribution(scores["ok"]),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "curate" / "models" / "tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=8000, help="half of them watermarked")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--eval-images", type=int, default=1000)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    began = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - began:6.1f}s] {message}", flush=True)

    from curate.models.clip import TINY_CLIP, load_clip
    from curate.models.watermark import WatermarkSpec, load_watermark
    from curate.models.weights import sha256_file

    args.out.mkdir(parents=True, exist_ok=True)
    head_path = args.out / "curate-tiny-watermark.safetensors"
    clip = load_clip(TINY_CLIP, device="cpu")
    images, kinds = watermark_examples(args.train_images, args.seed)
    x, y = embed(clip, images), labels_of(kinds)
    log(f"drew and embedded {len(images)} training images")
    head = train_head(x, y, args, log)
    train_seconds = time.time() - began
    save_half(head, head_path)

    loaded = load_watermark(WatermarkSpec(head="tiny", path=str(head_path)), clip.embed_dim)
    calibration = {
        "model": "curate-tiny",
        "clip_sha256": clip.sha256,
        "watermark_sha256": sha256_file(head_path),
        "held_out": evaluate_held_out(clip, loaded, args.eval_images, EVAL_SEED),
        "demo_web": evaluate_demo_web(clip, loaded),
        "training": {"seed": args.seed, "images": args.train_images, "hidden": args.hidden, "steps": args.steps,
                     "lr": args.lr, "weight_decay": args.weight_decay, "train_accuracy": round(float(
                         np.mean((loaded(x) >= THRESHOLD) == y.astype(bool))), 4),
                     "seconds": round(train_seconds)},
    }
    (args.out / "watermark-calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    print(json.dumps({k: calibration[k] for k in ("held_out", "demo_web")}, indent=1))
    print(f"{head_path.name}: {head_path.stat().st_size} bytes, sha256 {calibration['watermark_sha256']}")
    print(f"total {time.time() - began:.0f}s")


if __name__ == "__main__":
    main()
