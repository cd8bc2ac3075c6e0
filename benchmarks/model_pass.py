"""Model pass benchmark: images/s of the clip_score stage against its ceiling and a naive loop.

For two models, on the same JPEGs in the same run:

- curate-tiny, the project's tiny CLIP (64 px input; its forward is far cheaper
  than decoding a JPEG);
- ViT-B-32 with random weights (built with open_clip, saved to a temporary
  state_dict file and loaded through curate with `ClipSpec(checkpoint=...)`;
  the speed of a forward pass does not depend on the weights' values).

each measured as

- ceiling: for ViT-B-32, the bare `model.encode_image` under torch.no_grad on
  pre-decoded, pre-resized tensors, at the same torch thread count (plus, for
  reference, `encode_image` + `encode_text`, the model work the stage must do);
  for curate-tiny, decoding + preprocessing alone (Pillow open + convert + the
  model's preprocess) in a pool of the same number of decode threads;
- naive: per sample, decode, preprocess, encode_image, encode_text, one at a time,
  with the open_clip model directly (torch threads 2);
- curate: `ClipScoreStage(...).process(table)` on Arrow tables of `--batch-rows`
  rows (the engine's `engine.batch_rows`, 256), for each decode_threads x
  torch_threads setting in `--settings`. The stage is built and set up outside
  the timing; each setting is warmed up on a few rows first;
- curate with `ClipSpec.batch_size` = `--chunk-diagnostic` (32): a smaller model
  batch (decode chunks are already small and independent of it: the stage hands a
  batch's images to the decode threads in chunks of about rows / (4 x threads), and
  the model embeds each chunk as soon as it is decoded, while texts are encoded).

For every curate setting it also splits the time of `process` into: waiting for
decoding (collect_embeddings minus the image forward), image forward, text forward,
and the rest (Arrow conversions, embeddings and scores columns, filtering).

Images: the 36 COCO photos of /work/shared/data/real/captioned-images (640 px,
about 160 KB each) repeated, with their captions (`--images coco`, default), or
scenes drawn by curate.demo.web at 256-640 px, JPEG quality 85-95
(`--images synthetic`).

It also measures the safety stages (`--safety-images`, default 128; 0 skips them):
images/s of `process()` for nsfw (NudeNet on onnxruntime, 2 threads), watermark (the
tiny head reusing stored curate-tiny embeddings, and embedding the images itself) and
faces (Haar cascade detection, and detection + blurring + re-encoding).

Since other processes may share the machine, every measurement records the CPU
cores this process used and the cores used by everything else meanwhile (from
/proc/stat; Linux only); it first waits for the machine to be quiet, and is redone
(`--retries`) when other processes used more than `--quiet-threshold` cores. Numbers
are the best of `--repeat` rounds.

    .venv/bin/python benchmarks/model_pass.py                 # about 4 minutes on 2 cores when quiet
    .venv/bin/python benchmarks/model_pass.py --models "" --safety-images 256   # the safety stages only
    .venv/bin/python benchmarks/model_pass.py --models tiny --tiny-images 2048
    .venv/bin/python benchmarks/model_pass.py --settings 2x2,1x2,2x1,1x1 --repeat 2 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

COCO = Path("/work/shared/data/real/captioned-images")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --------------------------------------------------------------------------- CPU accounting

def _machine_busy_seconds() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / TICKS


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


QUIET = {"threshold": 0.25, "retries": 2, "wait": 30.0}  # set from the command line


def _other_cores(seconds: float = 0.5) -> float | None:
    """Cores used by other processes over the next `seconds`."""
    busy0, own0 = _machine_busy_seconds(), _own_seconds()
    time.sleep(seconds)
    busy1, own1 = _machine_busy_seconds(), _own_seconds()
    return None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds


def _wait_for_quiet() -> None:
    """Wait (at most QUIET['wait'] seconds) until other processes use less than QUIET['threshold'] cores."""
    deadline = time.monotonic() + QUIET["wait"]
    while time.monotonic() < deadline:
        other = _other_cores()
        if other is None or other <= QUIET["threshold"]:
            return


def _measure_once(fn: Callable[[], Any], items: int) -> dict[str, float]:
    busy0, own0, start = _machine_busy_seconds(), _own_seconds(), time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    busy1, own1 = _machine_busy_seconds(), _own_seconds()
    own = (own1 - own0) / seconds
    other = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds
    return {"images_per_s": items / seconds, "seconds": seconds, "own_cores": own, "other_cores": other}


def measure(fn: Callable[[], Any], items: int) -> dict[str, float]:
    """images/s, seconds, cores used by this process and by every other process meanwhile.

    Waits for the machine to be quiet first; a run during which other processes used more
    than QUIET['threshold'] cores is repeated (QUIET['retries'] times at most) and the least
    disturbed run is kept, with the number of attempts.
    """
    attempts = []
    for _ in range(1 + QUIET["retries"]):
        _wait_for_quiet()
        attempts.append(_measure_once(fn, items))
        if (attempts[-1]["other_cores"] or 0.0) <= QUIET["threshold"]:
            break
    kept = min(attempts, key=lambda r: (r["other_cores"] or 0.0, -r["images_per_s"]))
    return {**kept, "attempts": len(attempts)}


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The fastest of repeated runs, with the spread of all of them."""
    top = dict(max(runs, key=lambda r: r["images_per_s"]))
    top["all_images_per_s"] = [round(r["images_per_s"], 2) for r in runs]
    return top


# --------------------------------------------------------------------------- data

def coco_samples(n: int) -> list[tuple[bytes, str]]:
    """The COCO photos and captions, repeated to n samples."""
    rows = [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines() if line.strip()]
    base = [((COCO / r["file_name"]).read_bytes(), r["caption"]) for r in rows]
    return [base[i % len(base)] for i in range(n)]


def synthetic_samples(n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """Scenes drawn by the demo's synthetic web, 256-640 px, JPEG quality 85-95, with their captions."""
    from curate.demo.web import all_scenes, draw_scene, encode

    rng = random.Random(seed)
    scenes = all_scenes()
    samples = []
    for _ in range(n):
        scene = rng.choice(scenes)
        width = rng.randint(256, 640)
        height = min(640, max(256, round(width * rng.uniform(0.6, 1.6))))
        image = draw_scene(scene, width, height, rng.getrandbits(32))
        samples.append((encode(image, "JPEG", rng.choice((85, 90, 95))), scene.caption()))
    return samples


def sample_tables(samples: list[tuple[bytes, str]], batch_rows: int) -> list[pa.Table]:
    """SAMPLE_SCHEMA tables of batch_rows pair rows (the last may be shorter)."""
    from curate import schema

    tables = []
    for start in range(0, len(samples), batch_rows):
        rows = []
        for index, (data, text) in enumerate(samples[start:start + batch_rows], start):
            url = f"https://bench.invalid/{index}.jpg"
            rows.append({
                "key": schema.sample_key("bench", index, url),
                "kind": "pair",
                "images": [{"bytes": data, "path": None}],
                "image_meta": [{"url": url, "format": "jpg", "num_bytes": len(data)}],
                "segments": [{"image": 0, "text": None}, {"image": None, "text": text}],
                "captions": [{"name": "alt", "text": text}],
            })
        tables.append(schema.from_rows(rows))
    return tables


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


# --------------------------------------------------------------------------- variants

def ceiling_decode(preprocess, samples, decode_threads: int, chunk: int = 16) -> dict:
    """Decode + preprocess alone, in a pool of decode_threads threads (the tiny model's ceiling)."""
    blobs = [data for data, _ in samples]

    def prepare(part):
        return torch.stack([preprocess(decode(data)) for data in part])

    parts = [blobs[i:i + chunk] for i in range(0, len(blobs), chunk)]
    with ThreadPoolExecutor(decode_threads) as pool:
        list(pool.map(prepare, parts[:2]))  # warm-up
        return measure(lambda: list(pool.map(prepare, parts)), len(blobs))


def ceiling_forward(model, pixels: torch.Tensor, tokens: torch.Tensor | None, batch: int) -> dict:
    """The bare encode_image (and encode_text, if tokens) forward on prepared tensors, in batches."""
    def run():
        with torch.no_grad():
            for start in range(0, len(pixels), batch):
                model.encode_image(pixels[start:start + batch])
                if tokens is not None:
                    model.encode_text(tokens[start:start + batch])

    with torch.no_grad():
        model.encode_image(pixels[:4])
        if tokens is not None:
            model.encode_text(tokens[:4])
    return measure(run, len(pixels))


def naive(model, preprocess, tokenizer, samples) -> tuple[dict, np.ndarray]:
    """Per sample: decode, preprocess, encode_image, encode_text, one at a time; returns the scores too."""
    scores = []

    def run():
        scores.clear()
        with torch.no_grad():
            for data, text in samples:
                pixels = preprocess(decode(data)).unsqueeze(0)
                image = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
                caption = torch.nn.functional.normalize(model.encode_text(tokenizer([text])).float(), dim=-1)
                scores.append(float((image * caption).sum()))

    with torch.no_grad():
        sample = samples[0]
        model.encode_image(preprocess(decode(sample[0])).unsqueeze(0))
        model.encode_text(tokenizer([sample[1]]))
    return measure(run, len(samples)), np.asarray(scores)


class Split:
    """Wall time inside ClipScoreStage.process, split by wrapping the functions it calls (curate unchanged)."""

    def __init__(self, stage):
        import curate.ops.clip_score as clip_score

        self.seconds = {"process": 0.0, "embed_images": 0.0, "image_forward": 0.0, "text": 0.0}
        self.patched = [(clip_score, "collect_embeddings", clip_score.collect_embeddings),
                        (clip_score, "embed_texts", clip_score.embed_texts)]
        # time spent waiting for images = collecting embeddings minus the image forward in it
        clip_score.collect_embeddings = self._timed(clip_score.collect_embeddings, "embed_images")
        clip_score.embed_texts = self._timed(clip_score.embed_texts, "text")
        stage.model.encode_images = self._timed(stage.model.encode_images, "image_forward")
        self.stage = stage

    def _timed(self, fn, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
        return wrapper

    def reset(self):
        for key in self.seconds:
            self.seconds[key] = 0.0

    def result(self) -> dict[str, float]:
        s = self.seconds
        return {"decode_wait": s["embed_images"] - s["image_forward"], "image_forward": s["image_forward"],
                "text_forward": s["text"], "other": s["process"] - s["embed_images"] - s["text"]}

    def restore(self):
        for module, name, fn in self.patched:
            setattr(module, name, fn)
        del self.stage.model.encode_images


def curate_stage(spec, tables: list[pa.Table], decode_threads: int,
                 torch_threads: int) -> tuple[dict, dict, np.ndarray]:
    """ClipScoreStage.process over the tables; (measurement, time split, scores)."""
    from curate.ops.clip_score import ClipScoreParams, ClipScoreStage

    stage = ClipScoreStage(ClipScoreParams(model=spec, decode_threads=decode_threads, torch_threads=torch_threads))
    stage.setup()  # sets torch.set_num_threads(torch_threads), loads the model, starts the decode pool
    split = Split(stage)
    outputs: list[pa.Table] = []
    try:
        stage.process(tables[0].slice(0, 8))  # warm-up

        def run():
            outputs.clear()
            split.reset()
            for table in tables:
                start = time.perf_counter()
                outputs.append(stage.process(table))
                split.seconds["process"] += time.perf_counter() - start

        result = measure(run, sum(t.num_rows for t in tables))
    finally:
        split.restore()
        stage.teardown()
    scores = np.asarray([s["clip_score"] for t in outputs for s in t.column("scores").to_pylist()], dtype=np.float64)
    return result, split.result(), scores


# --------------------------------------------------------------------------- safety stages

def safety_stages(samples: list[tuple[bytes, str]], batch_rows: int) -> list[dict]:
    """images/s of each safety stage's process() on the samples, as a worker with 2 threads runs it.

    watermark runs twice: reusing stored curate-tiny embeddings (as after clip_score) and
    embedding the images itself; faces runs once detecting only and once blurring.
    """
    from curate.ops.clip_score import ClipScoreParams, ClipScoreStage
    from curate.safety.faces import FacesParams, FacesStage
    from curate.safety.nsfw import NsfwParams, NsfwStage
    from curate.safety.watermark import WatermarkParams, WatermarkStage

    tables = sample_tables(samples, batch_rows)
    scorer = ClipScoreStage(ClipScoreParams(torch_threads=2))
    scorer.setup()
    with_embeddings = [scorer.process(table).drop_columns(["drop_reason", "drop_detail"]) for table in tables]
    scorer.teardown()
    variants = [
        ("nsfw (NudeNet 320n, onnxruntime 2 threads)", NsfwStage(NsfwParams(threads=2)), tables),
        ("watermark (tiny head, stored embeddings)", WatermarkStage(WatermarkParams(torch_threads=2)),
         with_embeddings),
        ("watermark (tiny head + curate-tiny embedding)", WatermarkStage(WatermarkParams(torch_threads=2)), tables),
        ("faces (Haar cascade, detect)", FacesStage(FacesParams()), tables),
        ("faces (detect + blur + re-encode)", FacesStage(FacesParams(blur=True)), tables),
    ]
    rows = []
    for name, stage, inputs in variants:
        stage.setup()
        stage.process(inputs[0].slice(0, 4))  # warm-up
        result = measure(lambda: [stage.process(table) for table in inputs], sum(t.num_rows for t in inputs))
        stage.teardown()
        rows.append({"stage": name, **result})
    return rows


def print_safety(rows: list[dict]) -> None:
    print("\n| safety stage | img/s | own cores | other cores | attempts |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {fmt(r['images_per_s'], 1)} | {fmt(r['own_cores'])} | {fmt(r['other_cores'])} "
              f"| {r['attempts']} |")


# --------------------------------------------------------------------------- driver

def parse_settings(text: str) -> list[tuple[int, int]]:
    """"2x2,1x2" -> [(decode_threads, torch_threads), ...]."""
    settings = []
    for item in text.split(","):
        decode_threads, torch_threads = item.lower().split("x")
        settings.append((int(decode_threads), int(torch_threads)))
    return settings


def actor_threads() -> str:
    """What a clip_score actor gets from the engine on this machine (plan_workers + Ray's OMP_NUM_THREADS rule)."""
    import math

    from curate.engine.cluster import plan_workers
    from curate.ops.clip_score import ClipScoreStage

    cpus = float(os.cpu_count() or 1)
    plan = plan_workers({"CPU": cpus}, "auto", shards=1000, cpus_per_worker=ClipScoreStage.resources.cpus)
    omp = max(math.floor(plan.cpus_per_worker), 1)
    return (f"engine on this machine ({cpus:g} CPUs, workers auto, no GPU): {plan.workers} actors x "
            f"{plan.cpus_per_worker} CPU -> Ray sets OMP_NUM_THREADS={omp} -> torch_threads={omp} per actor, "
            "decode_threads=2 (default)")


def run_model(name: str, spec, open_clip_model, preprocess, tokenizer, samples, naive_samples, args,
              rounds: int) -> list[dict]:
    """Every variant of one model; rows for the results table."""
    rows: list[dict] = []
    settings = parse_settings(args.settings)
    chunk_settings = parse_settings(args.chunk_settings) if args.chunk_diagnostic else []
    decode_counts = sorted({d for d, _ in settings + chunk_settings})
    torch_counts = sorted({t for _, t in settings + chunk_settings})
    tables = sample_tables(samples, args.batch_rows)

    ceilings: dict[int, dict] = {}
    model_ceilings: dict[int, dict] = {}
    runs: dict[str, list] = {}
    pixels = tokens = None
    if name != "curate-tiny":
        pixels = torch.stack([preprocess(decode(data)) for data, _ in samples])
        tokens = tokenizer([text for _, text in samples])
    naive_scores = curate_scores = None
    splits: dict[tuple[int, int], dict] = {}
    for _ in range(rounds):
        if name == "curate-tiny":
            torch.set_num_threads(2)
            for d in decode_counts:
                runs.setdefault(f"ceiling d{d}", []).append(ceiling_decode(preprocess, samples, d))
        else:
            for t in torch_counts:
                torch.set_num_threads(t)
                runs.setdefault(f"ceiling t{t}", []).append(
                    ceiling_forward(open_clip_model, pixels, None, args.batch_rows))
                runs.setdefault(f"model t{t}", []).append(
                    ceiling_forward(open_clip_model, pixels, tokens, args.batch_rows))
        torch.set_num_threads(2)
        result, naive_scores = naive(open_clip_model, preprocess, tokenizer, naive_samples)
        runs.setdefault("naive", []).append(result)
        for d, t in settings:
            result, split, curate_scores = curate_stage(spec, tables, d, t)
            runs.setdefault(f"curate {d}x{t}", []).append(result)
            previous = splits.get((d, t))
            if previous is None or sum(split.values()) < sum(previous.values()):
                splits[(d, t)] = split
        for d, t in chunk_settings:
            small = spec.model_copy(update={"batch_size": args.chunk_diagnostic})
            result, split, _ = curate_stage(small, tables, d, t)
            runs.setdefault(f"curate chunk {d}x{t}", []).append(result)
            previous = splits.get(("chunk", d, t))
            if previous is None or sum(split.values()) < sum(previous.values()):
                splits[("chunk", d, t)] = split

    measured = {key: best(value) for key, value in runs.items()}
    for d in decode_counts:
        if f"ceiling d{d}" in measured:
            ceilings[d] = measured[f"ceiling d{d}"]
    for t in torch_counts:
        if f"ceiling t{t}" in measured:
            ceilings[t] = measured[f"ceiling t{t}"]
            model_ceilings[t] = measured[f"model t{t}"]
    naive_result = measured["naive"]
    gap = float(np.max(np.abs(curate_scores[:len(naive_scores)] - naive_scores)))

    def row(variant, d, t, result, ceiling=None, model_ceiling=None, split=None):
        return {"model": name, "variant": variant, "decode_threads": d, "torch_threads": t, **result,
                "vs_ceiling": result["images_per_s"] / ceiling["images_per_s"] if ceiling else None,
                "vs_model_ceiling": result["images_per_s"] / model_ceiling["images_per_s"] if model_ceiling else None,
                "vs_naive": result["images_per_s"] / naive_result["images_per_s"],
                "split": split, "images": len(naive_samples) if variant.startswith("naive") else len(samples)}

    if name == "curate-tiny":
        for d in decode_counts:
            rows.append(row("ceiling: decode + preprocess", d, 2, ceilings[d]))
    else:
        for t in torch_counts:
            rows.append(row("ceiling: encode_image", None, t, ceilings[t]))
            rows.append(row("reference: encode_image + encode_text", None, t, model_ceilings[t]))
    rows.append(row("naive loop", None, 2, naive_result))
    for d, t in settings:
        ceiling = ceilings[d] if name == "curate-tiny" else ceilings[t]
        rows.append(row("curate process()", d, t, measured[f"curate {d}x{t}"], ceiling,
                        None if name == "curate-tiny" else model_ceilings[t], splits[(d, t)]))
    for d, t in chunk_settings:
        ceiling = ceilings.get(d) if name == "curate-tiny" else ceilings.get(t)
        rows.append(row(f"curate process(), model batch_size {args.chunk_diagnostic}", d, t,
                        measured[f"curate chunk {d}x{t}"], ceiling,
                        None if name == "curate-tiny" else model_ceilings.get(t), splits[("chunk", d, t)]))
    for r in rows:
        r["max_abs_score_diff_vs_naive"] = gap
    return rows


def fmt(value, digits=2, percent=False):
    if value is None:
        return ""
    return f"{100 * value:.0f}%" if percent else f"{value:.{digits}f}"


def print_tables(rows: list[dict]) -> None:
    print("\n| model | variant | decode threads | torch threads | images | img/s | curate / ceiling "
          "| curate / (image+text) | curate / naive | own cores | other cores | attempts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        disturbed = " *" if (r["other_cores"] or 0) > QUIET["threshold"] else ""
        print(f"| {r['model']} | {r['variant']} | {r['decode_threads'] or ''} | {r['torch_threads'] or ''} "
              f"| {r['images']} | {fmt(r['images_per_s'], 1)} | {fmt(r['vs_ceiling'], percent=True)} "
              f"| {fmt(r['vs_model_ceiling'], percent=True)} "
              f"| {fmt(r['vs_naive'], 2) + 'x' if r['variant'].startswith('curate') else ''} "
              f"| {fmt(r['own_cores'])} | {fmt(r['other_cores'])}{disturbed} | {r['attempts']} |")
    print("\n(own / other cores: CPU used by this process / by every other process during the measurement; "
          f"* other processes used more than {QUIET['threshold']} cores even in the least disturbed attempt: "
          "that row is less reliable)")
    print("\nTime inside process(), seconds (decode wait = embed_images minus the image forward):\n")
    print("| model | variant | decode threads | torch threads | decode wait | image forward | text forward | other |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["split"]:
            s = r["split"]
            print(f"| {r['model']} | {r['variant']} | {r['decode_threads']} | {r['torch_threads']} "
                  f"| {s['decode_wait']:.2f} | {s['image_forward']:.2f} | {s['text_forward']:.2f} | {s['other']:.2f} |")
    gaps = {r["model"]: r["max_abs_score_diff_vs_naive"] for r in rows}
    print("\nmax |clip_score curate - naive| on the naive samples: "
          + ", ".join(f"{m} {g:.1e}" for m, g in gaps.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,vit-b-32", help="comma list of: tiny, vit-b-32")
    parser.add_argument("--images", choices=("coco", "synthetic"), default="coco")
    parser.add_argument("--tiny-images", type=int, default=1024, help="images for curate-tiny (default 1024)")
    parser.add_argument("--vit-images", type=int, default=128, help="images for ViT-B-32 (default 128)")
    parser.add_argument("--naive-vit-images", type=int, default=32,
                        help="samples of the ViT-B-32 naive loop (default 32)")
    parser.add_argument("--batch-rows", type=int, default=256, help="rows per process() call (engine.batch_rows)")
    parser.add_argument("--settings", default="2x2,1x2,2x1,1x1",
                        help="curate settings decode_threads x torch_threads (default 2x2,1x2,2x1,1x1)")
    parser.add_argument("--chunk-diagnostic", type=int, default=32, metavar="N",
                        help="also run curate with ClipSpec.batch_size=N, so that a 256-row batch is decoded in "
                             "several chunks ahead of the model (0: skip; default 32)")
    parser.add_argument("--chunk-settings", default="2x2,2x1",
                        help="decode_threads x torch_threads for --chunk-diagnostic (default 2x2,2x1)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the best round is reported (default 1)")
    parser.add_argument("--quiet-threshold", type=float, default=0.25, metavar="CORES",
                        help="other processes' CPU use (cores) above which a measurement is redone (default 0.25)")
    parser.add_argument("--retries", type=int, default=2,
                        help="times a disturbed measurement is redone; the least disturbed is kept (default 2)")
    parser.add_argument("--quiet-wait", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for a quiet machine before each measurement (default 30)")
    parser.add_argument("--safety-images", type=int, default=128,
                        help="images for the safety stages (nsfw, watermark, faces); 0: skip (default 128)")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args(argv)
    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    QUIET.update(threshold=args.quiet_threshold, retries=args.retries, wait=args.quiet_wait)

    logging.disable(logging.WARNING)  # "no GPU: CLIP runs on CPU", open_clip's "initialized randomly"
    warnings.filterwarnings("ignore")
    import open_clip

    from curate.models.clip import ClipSpec, load_clip

    load_before = os.getloadavg()
    started = time.perf_counter()
    print(f"# model pass: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"open_clip {open_clip.__version__}, Python {platform.python_version()}")
    print(f"# load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    print(f"# {actor_threads()}")
    make = coco_samples if args.images == "coco" else synthetic_samples
    rows: list[dict] = []

    if "tiny" in models:
        samples = make(args.tiny_images)
        spec = ClipSpec(model="curate-tiny")
        loaded = load_clip(spec, device="cpu")
        mean_kb = statistics.mean(len(d) for d, _ in samples) / 1e3
        print(f"# curate-tiny: {len(samples)} {args.images} images, mean {mean_kb:.0f} KB", flush=True)
        rows += run_model("curate-tiny", spec, loaded.model, loaded.preprocess, loaded.tokenizer,
                          samples, samples, args, args.repeat)

    if "vit-b-32" in models:
        samples = make(args.vit_images)
        with tempfile.TemporaryDirectory(prefix="curate-bench-model-") as folder:
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
            model.eval()
            checkpoint = Path(folder) / "vit-b-32-random.pt"
            torch.save(model.state_dict(), checkpoint)
            spec = ClipSpec(model="ViT-B-32", checkpoint=str(checkpoint))
            print(f"# ViT-B-32 (random weights): {len(samples)} {args.images} images, naive on "
                  f"{args.naive_vit_images}", flush=True)
            rows += run_model("ViT-B-32", spec, model, preprocess, open_clip.get_tokenizer("ViT-B-32"),
                              samples, samples[:args.naive_vit_images], args, args.repeat)

    safety_rows: list[dict] = []
    if args.safety_images:
        print(f"# safety stages: {args.safety_images} {args.images} images", flush=True)
        safety_rows = safety_stages(make(args.safety_images), args.batch_rows)

    load_after = os.getloadavg()
    if rows:
        print_tables(rows)
    if safety_rows:
        print_safety(safety_rows)
    print(f"\n# load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
          f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_before": load_before,
                                               "load_after": load_after, "rows": rows,
                                               "safety": safety_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
