"""Train the tiny CLIP and the tiny aesthetic head shipped in curate/models/tiny/.

    .venv/bin/python scripts/train_tiny_models.py [--out curate/models/tiny] [--seed 0] [--steps 800]

Both are trained on CPU (2 threads, fixed seed, deterministic algorithms) on scenes
drawn by curate.demo.web:

1. CLIP (``curate-tiny``, config curate-tiny.json): contrastive loss on drawn scenes
   and their true captions; images go through the model's own validation transform.
   Half the images are degraded (blur, noise, low contrast, JPEG, tiny images
   upscaled) and captioned as such ("a blurry image of two red circles on ..."); a
   batch holds each of its scenes once clean and once degraded, so the image embedding has
   to carry image quality. Saved as float16 safetensors.
2. Aesthetic head (d -> 32 -> 1, MSE) on the saved CLIP's normalised image
   embeddings: clean renders score 7.5, degraded ones 7.5 - 5 x level, level in [0, 1].

Evaluation uses held-out draws (another seed), through curate.models exactly as the
pipeline loads the shipped files. The script writes curate-tiny.safetensors,
curate-tiny-aesthetic.safetensors and calibration.json to --out, and prints the
held-out accuracies, score distributions, the calibrated threshold and the sha256 of
both files (pinned as TINY_CLIP_SHA256 in curate/models/clip.py and
TINY_AESTHETIC_SHA256 in curate/models/aesthetic.py).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from curate.demo.web import Scene, all_scenes, draw_scene  # noqa: E402

MODEL = "curate-tiny"
DEGRADATIONS = ("blur", "noise", "contrast", "jpeg", "upscale")
CLEAN_SCORE = 7.5
SCORE_DROP = 5.0
DEGRADED_MIN_LEVEL = 0.7  # "degraded" in the pairwise evaluation: target score <= 4
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
EVAL_SEED = 1
# CLIP training: half the images are degraded and captioned as such ("a blurry image of ..."),
# so that the image embedding carries the quality signal the aesthetic head reads.
CAPTIONED_MIN_LEVEL = 0.4
QUALITY_WORDS = {"blur": "blurry", "noise": "noisy", "contrast": "faded", "jpeg": "blocky", "upscale": "pixelated"}


def rng_for(seed: int, purpose: str) -> random.Random:
    """A random stream named by `seed` and `purpose` (string seeding is stable across runs)."""
    return random.Random(f"{seed}:{purpose}")


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw `scene` at a random size and layout like the demo web's (scaled down), maybe as JPEG."""
    width = rng.randint(96, 160)
    height = min(200, max(80, round(width * rng.uniform(0.6, 1.6))))
    image = draw_scene(scene, width, height, rng.getrandbits(32))
    if rng.random() < 2 / 3:
        image = _jpeg(image, rng.choice((85, 90, 95)))
    return image


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def degrade(image: Image.Image, kind: str, level: float, rng: random.Random) -> Image.Image:
    """`image` degraded by `kind` at `level` (0: unchanged ... 1: heavy), sized for 64 px models."""
    short = min(image.size)
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(level * 2.5 * short / 64))
    if kind == "noise":
        pixels = np.asarray(image, dtype=np.float32)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 90.0 * level, pixels.shape)
        return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    if kind == "contrast":
        return ImageEnhance.Contrast(image).enhance(1.0 - 0.85 * level)
    if kind == "jpeg":
        return _jpeg(image, max(1, round(50 * (1.0 - level) ** 1.5)))
    if kind == "upscale":
        scale = max(8, round(64 * (1.0 - 0.85 * level))) / short
        small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BOX)
        return small.resize(image.size, rng.choice((Image.NEAREST, Image.BICUBIC)))
    raise ValueError(f"unknown degradation {kind!r}")


def aesthetic_target(level: float) -> float:
    """The synthetic aesthetic score of an image degraded at `level`."""
    return CLEAN_SCORE - SCORE_DROP * level


def clip_eval_set(n: int, seed: int) -> list[tuple[Image.Image, str, str, str]]:
    """`n` held-out (image, true caption, a different random scene's caption, an unrelated scene's caption).

    An unrelated scene differs in colour, shape and background, like the demo web's
    planted mismatched captions.
    """
    rng = rng_for(seed, "clip-eval")
    scenes = all_scenes()
    examples = []
    for _ in range(n):
        scene = rng.choice(scenes)
        other = rng.choice([s for s in scenes if s != scene])
        unrelated = rng.choice([s for s in scenes if s.colour != scene.colour and s.shape != scene.shape
                                and s.background != scene.background])
        examples.append((render(scene, rng), scene.caption(), other.caption(), unrelated.caption()))
    return examples


def aesthetic_eval_pairs(n: int, seed: int) -> list[tuple[Image.Image, Image.Image, str]]:
    """`n` held-out (clean, heavily degraded copy, degradation kind) triples."""
    rng = rng_for(seed, "aesthetic-eval")
    scenes = all_scenes()
    pairs = []
    for index in range(n):
        clean = render(rng.choice(scenes), rng)
        kind = DEGRADATIONS[index % len(DEGRADATIONS)]
        pairs.append((clean, degrade(clean, kind, rng.uniform(DEGRADED_MIN_LEVEL, 1.0), rng), kind))
    return pairs


def aesthetic_examples(n_base: int, seed: int, purpose: str) -> tuple[list[Image.Image], list[float]]:
    """Clean renders and one graded degradation of each per kind, with their target scores."""
    rng = rng_for(seed, purpose)
    scenes = all_scenes()
    images, targets = [], []
    for _ in range(n_base):
        clean = render(rng.choice(scenes), rng)
        images.append(clean)
        targets.append(CLEAN_SCORE)
        for kind in DEGRADATIONS:
            level = rng.uniform(0.0, 1.0)
            images.append(degrade(clean, kind, level, rng))
            targets.append(aesthetic_target(level))
    return images, targets


# ---- CLIP training -------------------------------------------------------------------------


def build_tiny_clip(seed: int):
    """A freshly initialised curate-tiny model, its validation transform and tokenizer."""
    import open_clip

    import curate.models.clip  # noqa: F401  (registers curate-tiny with open_clip)

    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    return model, preprocess, open_clip.get_tokenizer(MODEL)


def quality_caption(scene: Scene, kind: str | None) -> str:
    """The scene's caption, prefixed with how the image is degraded (`kind`), if it is."""
    return scene.caption() if kind is None else f"a {QUALITY_WORDS[kind]} image of {scene.caption()}"


def render_pool(scenes: list[Scene], per_scene: int, preprocess, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images: per scene `per_scene` clean ones, then as many degraded ones.

    Returns uint8 pixels (scenes, 2 * per_scene, 3, 64, 64) after the transform's resize
    and crop, and each image's caption variant: 0 clean, 1 + i degraded by DEGRADATIONS[i].
    """
    resize_crop = type(preprocess)(preprocess.transforms[:3])  # PIL in, PIL out; ToTensor divides by 255
    rng = rng_for(seed, "clip-train")
    pool = torch.empty((len(scenes), 2 * per_scene, 3, 64, 64), dtype=torch.uint8)
    variant = torch.zeros((len(scenes), 2 * per_scene), dtype=torch.long)
    for i, scene in enumerate(scenes):
        for j in range(2 * per_scene):
            image = render(scene, rng)
            if j >= per_scene:
                kind = rng.randrange(len(DEGRADATIONS))
                image = degrade(image, DEGRADATIONS[kind], rng.uniform(CAPTIONED_MIN_LEVEL, 1.0), rng)
                variant[i, j] = kind + 1
            pool[i, j] = torch.from_numpy(np.asarray(resize_crop(image), dtype=np.uint8).transpose(2, 0, 1).copy())
    return pool, variant


def normalise_pixels(pixels: torch.Tensor, preprocess) -> torch.Tensor:
    """uint8 pixels -> the transform's normalised float input (the same arithmetic as Normalize)."""
    norm = preprocess.transforms[-1]
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    return (pixels.float().div(255) - mean) / std


def train_clip(args, log) -> tuple[torch.nn.Module, float]:
    """Train curate-tiny contrastively; return the model and the seconds spent."""
    start = time.time()
    model, preprocess, tokenizer = build_tiny_clip(args.seed)
    scenes = all_scenes()
    pool, variant = render_pool(scenes, args.images_per_scene, preprocess, args.seed)
    kinds = (None, *DEGRADATIONS)
    tokens = torch.stack([tokenizer([quality_caption(scene, kind) for kind in kinds]) for scene in scenes])
    log(f"rendered {pool.shape[0] * pool.shape[1]} training images in {time.time() - start:.0f}s")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, args.steps, warmup=max(1, args.steps // 20))
    generator = torch.Generator().manual_seed(args.seed)
    targets = torch.arange(args.batch_size)
    model.train()
    for step in range(args.steps):
        # Each scene once clean and once degraded, so captions that differ only in quality are negatives.
        chosen = torch.randperm(len(scenes), generator=generator)[: args.batch_size // 2].repeat(2)
        half = len(chosen) // 2
        picks = torch.randint(args.images_per_scene, (len(chosen),), generator=generator)
        picks[half:] += args.images_per_scene
        images = normalise_pixels(pool[chosen, picks], preprocess)
        image_emb = F.normalize(model.encode_image(images), dim=-1)
        text_emb = F.normalize(model.encode_text(tokens[chosen, variant[chosen, picks]]), dim=-1)
        logits = model.logit_scale.exp() * image_emb @ text_emb.T
        loss = (F.cross_entropy(logits, targets[: len(chosen)]) + F.cross_entropy(logits.T, targets[: len(chosen)])) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == args.steps - 1:
            log(f"clip step {step:4d}  loss {loss.item():.3f}  scale {model.logit_scale.exp().item():.1f}")
    model.eval()
    return model, time.time() - start


def _warmup_cosine(optimizer, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_half(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save a state_dict as float16 safetensors (floating tensors only are cast)."""
    from safetensors.torch import save_file

    half = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous() for k, v in state.items()}
    save_file(half, str(path))


# ---- evaluation and calibration --------------------------------------------------------------


def embed_images(clip, images: list[Image.Image]) -> np.ndarray:
    """Normalised embeddings of `images` through the loaded ClipModel."""
    return clip.encode_images(clip.preprocess_images(images))


def evaluate_clip(clip, n: int, seed: int) -> dict:
    """Held-out matched vs mismatched CLIP scores, accuracy and a separating threshold."""
    from curate.models.clip import clip_scores

    examples = clip_eval_set(n, seed)
    image_emb = embed_images(clip, [e[0] for e in examples])
    matched, mismatched, unrelated = (
        clip_scores(image_emb, clip.encode_texts([e[i] for e in examples])) for i in (1, 2, 3)
    )
    threshold = separating_threshold(matched, mismatched)
    return {
        "n": n,
        "accuracy": float(np.mean(matched > mismatched)),
        "clip_score_threshold": threshold,
        "matched_pass_rate": float(np.mean(matched >= threshold)),
        "mismatched_fail_rate": float(np.mean(mismatched < threshold)),
        "unrelated_fail_rate": float(np.mean(unrelated < threshold)),
        "matched": distribution(matched),
        "mismatched": distribution(mismatched),
        "unrelated": distribution(unrelated),
    }


def distribution(values: np.ndarray) -> dict:
    """Mean, std and quantiles of `values`, rounded for the calibration file."""
    out = {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4)}
    out.update({f"p{round(q * 100)}": round(float(np.quantile(values, q)), 4) for q in QUANTILES})
    return out


def separating_threshold(high: np.ndarray, low: np.ndarray) -> float:
    """A threshold passing most of `high` and failing most of `low`.

    The midpoint of the 5th percentile of `high` and the 95th of `low` when they do
    not overlap (then >= 95% of each side is on its side); otherwise the value that
    maximises the smaller of the two rates.
    """
    top_low, bottom_high = float(np.quantile(low, 0.95)), float(np.quantile(high, 0.05))
    if bottom_high > top_low:
        return round((bottom_high + top_low) / 2, 3)
    candidates = np.unique(np.concatenate([high, low]))
    rates = [min(np.mean(high >= t), np.mean(low < t)) for t in candidates]
    return round(float(candidates[int(np.argmax(rates))]), 3)


def train_aesthetic(clip, args, log) -> tuple[torch.nn.Module, float]:
    """Fit the tiny head (MSE) on embeddings of synthetic clean and degraded renders."""
    from curate.models.aesthetic import TinyHead

    start = time.time()
    images, targets = aesthetic_examples(args.aesthetic_images, args.seed, "aesthetic-train")
    x = torch.from_numpy(embed_images(clip, images))
    y = torch.tensor(targets, dtype=torch.float32)
    log(f"embedded {len(images)} aesthetic training images in {time.time() - start:.0f}s")
    torch.manual_seed(args.seed)
    head = TinyHead(x.shape[1], args.aesthetic_hidden)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for step in range(args.aesthetic_steps):
        loss = F.mse_loss(head(x).squeeze(-1), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 1000 == 0 or step == args.aesthetic_steps - 1:
            log(f"aesthetic step {step:4d}  mse {loss.item():.3f}")
    return head.eval(), time.time() - start


def evaluate_aesthetic(clip, head, n: int, seed: int) -> dict:
    """Held-out pairwise ordering clean > degraded, per kind, Spearman on graded levels, distributions."""
    pairs = aesthetic_eval_pairs(n, seed)
    clean = head(embed_images(clip, [p[0] for p in pairs]))
    degraded = head(embed_images(clip, [p[1] for p in pairs]))
    kinds = np.array([p[2] for p in pairs])
    graded_images, graded_targets = aesthetic_examples(max(1, n // 6), seed, "aesthetic-graded")
    graded = head(embed_images(clip, graded_images))
    threshold = separating_threshold(clean, degraded)
    return {
        "n_pairs": n,
        "pairwise_accuracy": float(np.mean(clean > degraded)),
        "pairwise_accuracy_by_kind": {k: float(np.mean((clean > degraded)[kinds == k])) for k in DEGRADATIONS},
        "spearman_graded": spearman(graded, np.array(graded_targets)),
        "score_threshold": threshold,
        "clean_pass_rate": float(np.mean(clean >= threshold)),
        "degraded_fail_rate": float(np.mean(degraded < threshold)),
        "clean": distribution(clean),
        "degraded": distribution(degraded),
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (tied values share their average rank)."""
    return round(float(np.corrcoef(_ranks(a), _ranks(b))[0, 1]), 4)


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, inverse = np.unique(values, return_inverse=True)
    return (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse]


# ---- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "curate" / "models" / "tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--images-per-scene", type=int, default=16, help="clean images per scene (as many degraded)")
    parser.add_argument("--aesthetic-images", type=int, default=1000, help="clean renders; x6 with degradations")
    parser.add_argument("--aesthetic-hidden", type=int, default=32)
    parser.add_argument("--aesthetic-steps", type=int, default=4000)
    parser.add_argument("--eval-images", type=int, default=1000)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    began = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - began:6.1f}s] {message}", flush=True)

    from curate.models.aesthetic import AestheticSpec, load_aesthetic
    from curate.models.clip import ClipSpec, load_clip
    from curate.models.weights import sha256_file

    args.out.mkdir(parents=True, exist_ok=True)
    clip_path = args.out / "curate-tiny.safetensors"
    head_path = args.out / "curate-tiny-aesthetic.safetensors"

    model, clip_seconds = train_clip(args, log)
    save_half(model.state_dict(), clip_path)
    clip = load_clip(ClipSpec(model=MODEL, checkpoint=str(clip_path)), device="cpu")
    clip_eval = evaluate_clip(clip, args.eval_images, EVAL_SEED)

    head, head_seconds = train_aesthetic(clip, args, log)
    save_half(head.state_dict(), head_path)
    head = load_aesthetic(AestheticSpec(head="tiny", path=str(head_path)), clip.embed_dim)
    aesthetic_eval = evaluate_aesthetic(clip, head, args.eval_images // 2, EVAL_SEED)

    calibration = {
        "model": MODEL,
        "clip_sha256": sha256_file(clip_path),
        "aesthetic_sha256": sha256_file(head_path),
        "eval_seed": EVAL_SEED,
        "clip_score_threshold": clip_eval.pop("clip_score_threshold"),
        **clip_eval,
        "aesthetic": aesthetic_eval,
        "training": {"seed": args.seed, "clip_seconds": round(clip_seconds), "aesthetic_seconds": round(head_seconds),
                     "steps": args.steps, "batch_size": args.batch_size},
    }
    (args.out / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    report(calibration, clip_path, head_path, time.time() - began)


def report(calibration: dict, clip_path: Path, head_path: Path, seconds: float) -> None:
    """Print what the README and the pins need."""
    aesthetic = calibration["aesthetic"]
    print(f"\nheld-out CLIP accuracy (matched > mismatched): {calibration['accuracy']:.4f}")
    print(f"matched    {calibration['matched']}")
    print(f"mismatched {calibration['mismatched']}")
    print(f"unrelated  {calibration['unrelated']}")
    print(f"clip_score_threshold {calibration['clip_score_threshold']}: matched pass "
          f"{calibration['matched_pass_rate']:.3f}, mismatched fail {calibration['mismatched_fail_rate']:.3f}, "
          f"unrelated fail {calibration['unrelated_fail_rate']:.3f}")
    print(f"held-out aesthetic pairwise accuracy (clean > degraded): {aesthetic['pairwise_accuracy']:.4f} "
          f"{aesthetic['pairwise_accuracy_by_kind']}; Spearman on graded levels {aesthetic['spearman_graded']}")
    print(f"aesthetic clean    {aesthetic['clean']}")
    print(f"aesthetic degraded {aesthetic['degraded']}")
    print(f"aesthetic threshold {aesthetic['score_threshold']}: clean pass {aesthetic['clean_pass_rate']:.3f}, "
          f"degraded fail {aesthetic['degraded_fail_rate']:.3f}")
    print(f"{clip_path.name}: {clip_path.stat().st_size} bytes, sha256 {calibration['clip_sha256']}")
    print(f"{head_path.name}: {head_path.stat().st_size} bytes, sha256 {calibration['aesthetic_sha256']}")
    print(f"total {seconds:.0f}s")


if __name__ == "__main__":
    main()
