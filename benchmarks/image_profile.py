"""Per-image cost of curate's decode + resize + encode (`process_image`) on the download benchmark's photos.

For the first --photos photos of the realistic set (benchmarks/photos.py), with the download
benchmark's settings (longest side 512 px, only if bigger; JPEG quality 95):

- ms per image of `process_image`, one thread, and the cumulative ms per image of each step
  (cProfile, by function: Pillow's open / draft / decode, orientation, colour management,
  pixel hash, perceptual hash, resize, encode, sha256 of the bytes);
- images/s of `process_image` in a pool of 1 and of 2 threads over all the photos (the ceiling
  of the per-image work on this machine's cores, without HTTP), best of --rounds;
- the same for img2dataset's resizer (`img2dataset.resizer.Resizer` with the benchmark's settings:
  OpenCV full-size decode, INTER_AREA, imencode), run in its own venv if it exists.

    .venv/bin/python benchmarks/image_profile.py                 # 300 photos, ~3 minutes on 2 cores
    .venv/bin/python benchmarks/image_profile.py --photos 2000 --json profile.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import photo_set  # noqa: E402

SIZE, QUALITY, MAX_PIXELS = 512, 95, 89_478_485
# (label, file suffix, function name) of the steps reported, in the order they happen.
STEPS = [
    ("open + header", "PIL/Image.py", "open"),
    ("draft (JPEG scale)", "PIL/JpegImagePlugin.py", "draft"),
    ("decode", "PIL/ImageFile.py", "load"),
    ("EXIF orientation", "curate/fetch/image.py", "_orientation"),
    ("to RGB + ICC to sRGB", "curate/fetch/image.py", "_to_rgb"),
    ("  ICC: build + apply (profileToProfile)", "PIL/ImageCms.py", "profileToProfile"),
    ("  ICC: build a transform", "PIL/ImageCms.py", "buildTransform"),
    ("  ICC: apply a transform", "PIL/ImageCms.py", "apply"),
    ("pixel_sha256", "curate/fetch/image.py", "pixel_sha256"),
    ("phash", "curate/fetch/image.py", "phash"),
    ("resize", "curate/fetch/image.py", "_resize"),
    ("encode", "curate/fetch/image.py", "_encode"),
    ("sha256 of the bytes", "~", "<built-in method _hashlib.openssl_sha256>"),
]

I2D_SNIPPET = r"""
import json, sys, time, io
from concurrent.futures import ThreadPoolExecutor
from img2dataset.resizer import Resizer
paths = json.loads(sys.stdin.read())
datas = [open(p, "rb").read() for p in paths]
resizer = Resizer(image_size=%d, resize_mode="keep_ratio_largest", resize_only_if_bigger=True,
                  encode_quality=%d, encode_format="jpg")
def one(data):
    out = resizer(io.BytesIO(data))
    assert out[-1] is None, out[-1]
    return out
one(datas[0])
result = {}
for threads in (1, 2):
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, datas))
    result[threads] = len(datas) / (time.perf_counter() - started)
open(sys.argv[1], "w").write(json.dumps(result))
"""


def curate_rates(datas: list[bytes], resize, encode) -> dict[int, float]:
    """images/s of process_image in pools of 1 and 2 threads."""
    from curate.fetch.image import process_image

    process_image(datas[0], resize, encode, MAX_PIXELS)
    rates = {}
    for threads in (1, 2):
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda d: process_image(d, resize, encode, MAX_PIXELS), datas))
        rates[threads] = len(datas) / (time.perf_counter() - started)
    return rates


def step_costs(datas: list[bytes], resize, encode) -> tuple[float, dict[str, tuple[float, int]]]:
    """(ms per image without the profiler, {step: (cumulative ms per image, calls)}) under cProfile.

    Runs on one of curate's decode threads (where process_image does its work), so that
    cProfile, which follows one thread, sees every step.
    """
    from curate.fetch import image

    if hasattr(image, "_decoder_pool"):
        return image._decoder_pool().submit(_step_costs, datas, resize, encode).result()
    return _step_costs(datas, resize, encode)


def _step_costs(datas: list[bytes], resize, encode) -> tuple[float, dict[str, tuple[float, int]]]:
    from curate.fetch.image import process_image

    started = time.perf_counter()
    for data in datas:
        process_image(data, resize, encode, MAX_PIXELS)
    plain_ms = (time.perf_counter() - started) * 1000 / len(datas)
    profiler = cProfile.Profile()
    profiler.enable()
    for data in datas:
        process_image(data, resize, encode, MAX_PIXELS)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    costs = {"process_image (profiled)": (0.0, 0)}
    for (file, _, name), (_, calls, _, cumulative, _) in stats.items():
        if name == "process_image" and file.endswith("curate/fetch/image.py"):
            costs["process_image (profiled)"] = (cumulative * 1000 / len(datas), calls)
        for label, suffix, function in STEPS:
            if name == function and file.endswith(suffix):
                before = costs.get(label, (0.0, 0))
                costs[label] = (before[0] + cumulative * 1000 / len(datas), before[1] + calls)
    return plain_ms, costs


def img2dataset_rates(paths: list[Path], venv: Path) -> dict[int, float] | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        # The resizer silences stdout/stderr at the file-descriptor level: the snippet writes to a file.
        subprocess.run([str(python), "-c", I2D_SNIPPET % (SIZE, QUALITY), result.name],
                       input=json.dumps([str(p) for p in paths]), capture_output=True, text=True, check=True)
        return {int(k): v for k, v in json.loads(Path(result.name).read_text()).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=300, help="photos profiled (of the benchmark's set)")
    parser.add_argument("--set-size", type=int, default=2000, help="size of the photo set they are taken from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/curate-bench-download")
    parser.add_argument("--img2dataset-venv", default="/tmp/bench-img2dataset-venv")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the images/s measurement (best is kept)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    from curate.fetch.config import EncodeParams, ResizeParams

    resize = ResizeParams(mode="keep_ratio", side="longest", size=SIZE, only_if_bigger=True)
    encode = EncodeParams(format="jpg", quality=QUALITY)
    photos = photo_set(args.set_size, args.seed, Path(args.workdir))[: args.photos]
    datas = [p.path.read_bytes() for p in photos]
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    plain_ms, costs = step_costs(datas, resize, encode)
    # Best of --rounds, the two tools alternating: other load on the machine only ever slows a round down.
    rates: dict[int, float] = {}
    reference: dict[int, float] | None = {}
    for _ in range(args.rounds):
        for threads, rate in curate_rates(datas, resize, encode).items():
            rates[threads] = max(rate, rates.get(threads, 0.0))
        measured = img2dataset_rates([p.path for p in photos], Path(args.img2dataset_venv))
        if measured is None:
            reference = None
        elif reference is not None:
            for threads, rate in measured.items():
                reference[threads] = max(rate, reference.get(threads, 0.0))
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])

    mean_kb = sum(map(len, datas)) / len(datas) / 1000
    print(f"{len(datas)} photos, mean {mean_kb:.0f} KB; load average {load_before} -> {load_after}\n")
    print(f"process_image, one thread, no profiler: {plain_ms:.1f} ms per image\n")
    print("| step (cProfile, cumulative) | ms per image | calls |\n| --- | ---: | ---: |")
    for label in ["process_image (profiled)"] + [label for label, _, _ in STEPS]:
        if label in costs:
            ms, calls = costs[label]
            print(f"| {label} | {ms:.2f} | {calls:,} |")
    print("\n| images/s (no HTTP) | 1 thread | 2 threads |\n| --- | ---: | ---: |")
    print(f"| curate process_image | {rates[1]:.1f} | {rates[2]:.1f} |")
    if reference:
        print(f"| img2dataset Resizer | {reference[1]:.1f} | {reference[2]:.1f} |")
        print(f"| curate / img2dataset | {rates[1] / reference[1]:.2f} | {rates[2] / reference[2]:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "photos": len(datas), "mean_kb": mean_kb, "plain_ms": plain_ms, "load": [load_before, load_after],
            "steps": costs, "curate_rates": rates, "img2dataset_rates": reference}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
