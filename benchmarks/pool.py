"""Pool benchmark: the engine of an earlier source tree against this one, same images, same machine, one run.

The earlier engine rewrites every surviving sample (image bytes included) into a work folder per
phase; the pool engine stores the fetched images once under OUT/_pool/ (the input split and one
annotation table per stage), selects over annotations only (OUT/_work/) and writes the output
shards once from the pool and the selection. Each tree runs in its own subprocess with
PYTHONPATH set to it (`curate.__file__` is checked), from the work folder, so that the tree in
the current directory is never imported by accident.

Images: `--images` distinct JPEGs made from the real COCO photos of
/work/shared/data/real/captioned-images (the CC BY / BY-SA ones, as in benchmarks/photos.py),
each by a seeded random crop (50-100% of each side), a scale to a longest side of 200-800 px,
a left-right flip half of the time and a JPEG quality of 70-95, with its COCO caption. Every
image differs from every other in more than 12 bits of curate's 64-bit perceptual hash (the
recipe's perceptual dedup joins images within 6 bits), so only the planted copies are
duplicates: 1.5% exact copies (the same bytes at another URL) and 1.5% re-encoded copies
(scaled to 80-95% and saved at another quality, within 4 bits of the original), plus 1% URLs
that answer 404. Rows are shuffled; all are served on 127.0.0.1 by
curate.demo.server.LoopbackServer from a subprocess. Cached in the work folder.

Two recipes, each tree's own pipelines/<name>.yaml, both with `engine.rows_per_work_shard`
(`--rows-per-work-shard`, 100):

- demo.yaml: fetch, basic_filter, clip_score and aesthetic on the tiny models, exact and
  perceptual dedup, watermark; Parquet + WebDataset. The thresholds (basic_filter.min_side,
  clip_score.min_score, aesthetic.min_score) come from one calibration run of the --old tree
  with those filters off (cached in the work folder): min_side is the 10th percentile of the
  images' shortest side; clip_score and aesthetic are both cut at their quantile q, the q that
  keeps about half of the input rows. watermark.max_score is 1.0: the tiny watermark head
  scores nearly every real photo at 1.0 (the recipe's 0.5 would drop ~97%), so the stage runs
  and drops nothing. Both trees get the same thresholds. (The tiny models' scores mean nothing
  on real photos; they only make every stage do its work and drop rows.)
- download.yaml: fetch + write WebDataset, per-host limits lifted (everything is on one host).

Per run: the wall time of `execute` (from the compiled plan to the manifest, Ray's start
included) and of the whole subprocess; the CPU time of its process tree (benchmarks/measure.py)
and of every other process meanwhile; the peak size of the output folder during the run
(allocated bytes, as `du`, walked every `--poll` s from a thread of this process; also a bound
from above that merges each two consecutive walks) and its parts at that moment; at the end the
bytes of the output shards (parquet/ + webdataset/), of the pool (_pool/; none in the earlier
engine) and of the rest; kept rows and drops by reason (manifest.json). Before each run it waits
(at most `--quiet-wait` s) for the rest of the machine to use at most `--quiet-threshold` cores.
Runs alternate between the trees, `--repeats` times each; the tables show medians. Raw numbers:
WORKDIR/results.json (and `--json`).

    .venv/bin/python benchmarks/pool.py --images 1000 --repeats 2              # old: /tmp/curate-old, new: this repo
    .venv/bin/python benchmarks/pool.py --images 200 --repeats 1               # smoke
    .venv/bin/python benchmarks/pool.py --old /tmp/curate-old --new /tmp/curate-old --images 200 --repeats 1

Linux (reads /proc for CPU times and the load average).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import TICKS, TreeSampler, busy_ticks, finish_results, loadavg, proc_stat  # noqa: E402
from photos import SOURCE_DIR, sources  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MIN_LONGEST, MAX_LONGEST = 200, 800  # px, longest side of a generated image
MIN_QUALITY, MAX_QUALITY = 70, 95
DISTINCT_BITS = 12  # distinct images differ in more than this many perceptual-hash bits
COPY_BITS = 4  # a re-encoded copy is within this many bits of its original
EXACT_SHARE, REENCODED_SHARE, MISSING_SHARE = 0.015, 0.015, 0.01
MIN_SIDE_QUANTILE = 0.10  # basic_filter.min_side: this quantile of the shortest sides
KEEP_TARGET = 0.50  # the calibrated thresholds aim to keep this share of the input rows
# The tiny watermark head scores nearly every real photo at (or within 1e-4 of) 1.0, so no limit below
# 1.0 keeps a useful share: the stage runs and fills scores.watermark, and drops nothing.
WATERMARK_MAX = 1.0
SHARD_FOLDERS = ("parquet", "webdataset")
POOL, WORK = "_pool", "_work"

RUNNER = r"""
import json, os, sys, time
started = time.perf_counter()
tree, recipe, result = sys.argv[1:4]
import curate
where = os.path.realpath(curate.__file__)
assert where.startswith(os.path.realpath(tree) + os.sep), f"curate imported from {where}, not from {tree}"
from rich.console import Console
from curate.engine import cluster
from curate.engine.run import compile_plan, execute
from curate.recipe import load_recipe
connect, ray_start = cluster.connect, []
def timed_connect(*args, **kwargs):
    began = time.perf_counter()
    try:
        return connect(*args, **kwargs)
    finally:
        ray_start.append(time.perf_counter() - began)
cluster.connect = timed_connect  # both trees start Ray through cluster.connect
imported = time.perf_counter()
plan = compile_plan(load_recipe(recipe, sys.argv[4:]))
compiled = time.perf_counter()
manifest = execute(plan, Console(stderr=True), overwrite=True, progress=False, judge=False)
done = time.perf_counter()
with open(result, "w") as handle:
    json.dump({"curate": where, "import_s": imported - started, "compile_s": compiled - imported,
               "execute_s": done - compiled, "ray_start_s": sum(ray_start), "kept": manifest["outputs"]["rows"],
               "input_rows": manifest["reconciliation"]["input_rows"],
               "drops_by_reason": manifest["drop_log"]["by_reason"],
               "phase_seconds": {p["name"]: p["seconds"] for p in manifest.get("phases", [])}}, handle)
"""


# --------------------------------------------------------------------------- the images

def encode(image: Image.Image, quality: int, icc: bytes | None) -> bytes:
    """Baseline JPEG bytes of `image` at `quality`, with the ICC profile when there is one."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **({"icc_profile": icc} if icc else {}))
    return buffer.getvalue()


def phash_of(data: bytes) -> np.uint64:
    """curate's 64-bit perceptual hash of decoded JPEG bytes, as an unsigned integer."""
    from curate.fetch.image import phash

    with Image.open(io.BytesIO(data)) as im:
        return np.int64(phash(im.convert("RGB"))).view(np.uint64)


def bits_apart(code: np.uint64, codes: np.ndarray) -> np.ndarray:
    """Hamming distances between one hash and an array of hashes."""
    return np.bitwise_count(np.bitwise_xor(codes, code))


def draw_image(index: int, attempt: int, seed: int, rows: list[dict]) -> tuple[bytes, dict]:
    """Image `index` (draw `attempt`): a random crop of a random photo, scaled, maybe flipped, at a random quality."""
    rng = np.random.default_rng([seed, index, attempt])
    row = rows[int(rng.integers(len(rows)))]
    with Image.open(SOURCE_DIR / row["file_name"]) as im:
        icc = im.info.get("icc_profile")
        image = im.convert("RGB")
    width, height = image.size
    crop_w, crop_h = (round(side * rng.uniform(0.5, 1.0)) for side in (width, height))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    scale = int(rng.integers(MIN_LONGEST, MAX_LONGEST + 1)) / max(crop_w, crop_h)
    image = image.resize((max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.Resampling.LANCZOS)
    flip = bool(rng.random() < 0.5)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    quality = int(rng.integers(MIN_QUALITY, MAX_QUALITY + 1))
    data = encode(image, quality, icc)
    return data, {"source": row["file_name"], "caption": row["caption"].strip(), "width": image.width,
                  "height": image.height, "quality": quality, "flip": flip, "crop": [left, top, crop_w, crop_h],
                  "attempt": attempt}


def distinct_images(count: int, seed: int, folder: Path) -> tuple[list[dict], np.ndarray]:
    """`count` images, each more than DISTINCT_BITS perceptual-hash bits from all others, written to `folder`."""
    rows = sources()
    entries, codes = [], np.zeros(0, dtype=np.uint64)
    for index in range(count):
        attempt = 0
        while True:
            data, meta = draw_image(index, attempt, seed, rows)
            code = phash_of(data)
            if not len(codes) or bits_apart(code, codes).min() > DISTINCT_BITS:
                break
            attempt += 1
        name = f"{index:05d}.jpg"
        (folder / name).write_bytes(data)
        entries.append({"route": f"/img/{name}", "file": name, "kind": "original", "of": None,
                        "bytes": len(data), **meta})
        codes = np.append(codes, code)
    return entries, codes


def reencoded_copy(original: dict, folder: Path, rng: np.random.Generator) -> tuple[bytes, dict] | None:
    """The original scaled to 80-95% and saved at another quality; None if its hash moved too far."""
    with Image.open(folder / original["file"]) as im:
        icc = im.info.get("icc_profile")
        image = im.convert("RGB")
    scale = rng.uniform(0.8, 0.95)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    quality = int(rng.choice([q for q in range(MIN_QUALITY, MAX_QUALITY + 1) if abs(q - original["quality"]) >= 5]))
    data = encode(image, quality, icc)
    source = (folder / original["file"]).read_bytes()
    if bits_apart(phash_of(data), np.array([phash_of(source)])).min() > COPY_BITS:
        return None
    return data, {"width": image.width, "height": image.height, "quality": quality}


def planted_copies(entries: list[dict], seed: int, folder: Path) -> list[dict]:
    """Exact copies, re-encoded copies and 404s, in the shares EXACT_SHARE, REENCODED_SHARE, MISSING_SHARE."""
    rng = np.random.default_rng([seed, 1_000_003])
    count = len(entries)
    picks = iter(rng.permutation(count).tolist())
    copies = []
    for j in range(round(EXACT_SHARE * count)):
        original = entries[next(picks)]
        copies.append({**original, "route": f"/img/copy-{j:04d}.jpg", "kind": "exact_copy", "of": original["file"]})
    made = 0
    while made < round(REENCODED_SHARE * count):
        original = entries[next(picks)]
        copy = reencoded_copy(original, folder, rng)
        if copy is None:
            continue
        data, meta = copy
        name = f"reencoded-{made:04d}.jpg"
        (folder / name).write_bytes(data)
        copies.append({**original, **meta, "route": f"/img/{name}", "file": name, "kind": "reencoded_copy",
                       "of": original["file"], "bytes": len(data)})
        made += 1
    for j in range(round(MISSING_SHARE * count)):
        copies.append({"route": f"/img/missing-{j:04d}.jpg", "file": None, "kind": "missing", "of": None,
                       "caption": entries[j]["caption"], "bytes": 0})
    return copies


def image_set(count: int, seed: int, workdir: Path) -> list[dict]:
    """The URL rows of the benchmark (shuffled), generated into the work folder once, then read from its index."""
    folder = workdir / f"images-n{count}-seed{seed}"
    index = folder / "index.json"
    if not index.exists():
        sys.path.insert(0, str(REPO))  # curate's perceptual hash, to make the images distinct for its dedup
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        entries, _ = distinct_images(count, seed, folder)
        rows = entries + planted_copies(entries, seed, folder)
        order = np.random.default_rng([seed, 7]).permutation(len(rows))
        rows = [rows[i] for i in order]
        temporary = index.with_suffix(".tmp")
        temporary.write_text(json.dumps(rows, indent=0))
        temporary.replace(index)
        print(f"made {len(rows)} URL rows in {folder} ({time.perf_counter() - started:.0f} s)", flush=True)
    return json.loads(index.read_text())


def describe_images(rows: list[dict]) -> dict[str, Any]:
    """Counts and size statistics of the URL rows."""
    served = [r for r in rows if r["file"] is not None]
    sizes = np.array([r["bytes"] for r in served])
    longest = np.array([max(r["width"], r["height"]) for r in served])
    kinds: dict[str, int] = {}
    for row in rows:
        kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
    return {"rows": len(rows), "by_kind": kinds, "sources": len({r["source"] for r in served}),
            "served_mb": round(float(sizes.sum()) / 1e6, 1),
            "kb_p10_median_p90": [round(float(np.percentile(sizes, q)) / 1e3) for q in (10, 50, 90)],
            "longest_side_min_median_max": [int(longest.min()), int(np.median(longest)), int(longest.max())],
            "qualities_min_max": [min(r["quality"] for r in served), max(r["quality"] for r in served)]}


# --------------------------------------------------------------------------- the web

def serve(args: argparse.Namespace) -> None:
    """Subprocess mode: serve the image set, print one JSON line when ready; each line on stdin asks for the
    number of requests answered so far (one JSON line back); stop at EOF on stdin."""
    sys.path.insert(0, str(REPO))
    from curate.demo.server import LoopbackServer, Route

    folder = Path(args.workdir) / f"images-n{args.images}-seed{args.seed}"
    rows = json.loads((folder / "index.json").read_text())
    # the 404s (missing images, robots.txt) as routes answering what an unknown path gets, so they are counted too
    missing = {"body": b"not found", "status": 404, "content_type": "text/plain"}
    routes = {r["route"]: Route(body=(folder / r["file"]).read_bytes()) if r["file"] is not None else Route(**missing)
              for r in rows}
    routes["/robots.txt"] = Route(**missing)
    with LoopbackServer(routes) as server:
        print(json.dumps({"base_url": server.base_url}), flush=True)
        for _ in sys.stdin:
            print(json.dumps({"requests": sum(route.hits for route in routes.values())}), flush=True)


class Server:
    """The loopback server subprocess."""

    def __init__(self, args: argparse.Namespace):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--images", str(args.images), "--seed", str(args.seed),
             "--workdir", str(args.workdir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.base_url = json.loads(self.process.stdout.readline())["base_url"]

    def requests(self) -> int:
        """Requests the server answered so far (images, 404s and robots.txt)."""
        self.process.stdin.write("requests\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["requests"]

    def close(self) -> None:
        """Stop the server (EOF on its stdin)."""
        self.process.stdin.close()
        self.process.wait(timeout=60)


def write_url_list(path: Path, base_url: str, rows: list[dict]) -> Path:
    """The recipe's input: a Parquet file with columns url and caption."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": [base_url + r["route"] for r in rows], "caption": [r["caption"] for r in rows]}),
                   path)
    return path


# --------------------------------------------------------------------------- disk usage

def file_bytes(root: Path) -> dict[tuple[int, int], tuple[str, int]]:
    """Every file under `root`: (device, inode) -> (path relative to `root`, allocated bytes as `du`: st_blocks x 512).

    Keyed by inode, so that a file renamed between two walks (an atomic write) is the same file.
    Files and folders may vanish while it walks (the engine deletes its work files): they count as absent.
    """
    files: dict[tuple[int, int], tuple[str, int]] = {}
    folders = [str(root)]
    while folders:
        folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                else:
                    stat = entry.stat(follow_symlinks=False)
                    files[stat.st_dev, stat.st_ino] = (os.path.relpath(entry.path, root), stat.st_blocks * 512)
            except FileNotFoundError:
                continue
    return files


def by_top_level(files: dict[tuple[int, int], tuple[str, int]]) -> dict[str, int]:
    """Bytes by top-level entry of the folder (parquet, webdataset, _pool, _work, manifest.json, ...)."""
    parts: dict[str, int] = {}
    for path, size in files.values():
        top = path.split(os.sep, 1)[0]
        parts[top] = parts.get(top, 0) + size
    return dict(sorted(parts.items()))


class FolderWatcher(threading.Thread):
    """Polls the size of a folder every `interval` s; keeps the peak and what it was made of.

    `peak` is the largest size measured. A file that lives for less than one interval between two
    polls can be missed, so `peak_bound` also merges each two consecutive polls (every file, by
    inode, seen in either, at the larger of its sizes): at or above the true peak, too high by at
    most what was written and deleted within one interval (unless a deleted file's inode is reused
    within the interval: then the two files count once).
    """

    def __init__(self, root: Path, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak, self.peak_bound, self.at_peak, self.samples, self.longest_poll = 0, 0, {}, 0, 0.0
        self._previous: dict[tuple[int, int], int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(self.interval)
        self.poll()

    def poll(self) -> None:
        """One measurement of the folder."""
        started = time.perf_counter()
        files = file_bytes(self.root)
        sizes = {key: size for key, (_, size) in files.items()}
        total = sum(sizes.values())
        if total > self.peak:
            self.peak, self.at_peak = total, by_top_level(files)
        merged = {**self._previous, **{k: max(v, self._previous.get(k, 0)) for k, v in sizes.items()}}
        self.peak_bound = max(self.peak_bound, sum(merged.values()))
        self._previous = sizes
        self.samples += 1
        self.longest_poll = max(self.longest_poll, time.perf_counter() - started)

    def stop(self) -> None:
        """Take a last measurement and stop."""
        self._halt.set()
        self.join()


# --------------------------------------------------------------------------- runs

def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a run: only `tree` on PYTHONPATH, Ray local and quiet, no network for models."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PYTHONPATH=str(tree), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    return env


def recipe_overrides(recipe: str, urls: Path, out: Path, args: argparse.Namespace,
                     thresholds: dict[str, float] | None) -> list[str]:
    """The --set overrides of one run: input, output, work shard size, and the recipe's own settings."""
    sets = [f"source.path={urls}", f"output.path={out}", f"engine.rows_per_work_shard={args.rows_per_work_shard}"]
    if recipe == "download":
        sets += ["stages.fetch.allow_private_addresses=true", "stages.fetch.host_rate=null",
                 "stages.fetch.host_concurrency=1024"]
    if thresholds is not None:
        sets += [f"stages.basic_filter.min_side={thresholds['min_side']}",
                 f"stages.clip_score.min_score={thresholds['clip_score']}",
                 f"stages.aesthetic.min_score={thresholds['aesthetic']}",
                 f"stages.watermark.max_score={thresholds['watermark']}"]
    return sets


class RunFailed(RuntimeError):
    """A run exited non-zero; the message ends with its log."""


def run_once(name: str, tree: Path, recipe: str, overrides: list[str], out: Path, args: argparse.Namespace,
             server_pid: int, keep_output: bool = False) -> dict[str, Any]:
    """Run `recipe` of `tree` into `out`, watching the folder's size; the measurements."""
    workdir = Path(args.workdir)
    shutil.rmtree(out, ignore_errors=True)
    result_file, log = workdir / f"{name}.result.json", workdir / f"{name}.log"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, "-c", RUNNER, str(tree), str(tree / "pipelines" / f"{recipe}.yaml"), str(result_file),
               *overrides]
    print(f"\n[{name}] PYTHONPATH={tree} {shlex.join([Path(sys.executable).name, '-c', 'RUNNER', *command[3:]])}",
          flush=True)
    waited, cores = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
    watcher = FolderWatcher(out, args.poll)
    run = _run_watched(command, tree, log, watcher, args.timeout, server_pid)
    run.update(waited_for_quiet_s=waited, other_cores_at_start=cores)
    if run["exit_code"] != 0 or not result_file.exists():
        raise RunFailed(f"{name} failed (exit {run['exit_code']}); log {log}:\n"
                        f"{log.read_text(errors='replace')[-4000:]}")
    run.update(json.loads(result_file.read_text()))
    final = by_top_level(file_bytes(out))
    shards = sum(final.get(f, 0) for f in SHARD_FOLDERS)
    run.update(name=name, tree=str(tree), recipe=recipe, overrides=overrides, peak_bytes=watcher.peak,
               peak_bound_bytes=watcher.peak_bound, peak_parts=watcher.at_peak, final_parts=final,
               shard_bytes=shards, pool_bytes=final.get(POOL, 0), work_bytes_end=final.get(WORK, 0),
               final_bytes=sum(final.values()), polls=watcher.samples, longest_poll_s=round(watcher.longest_poll, 3),
               execute_s=round(run["execute_s"], 2))
    run["peak_minus_shards"] = run["peak_bytes"] - shards
    run["after_ray_start_s"] = round(run["execute_s"] - run.get("ray_start_s", 0.0), 2)
    if not keep_output:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({k: run[k] for k in ("execute_s", "process_s", "kept", "peak_bytes", "peak_bound_bytes",
                                          "shard_bytes", "pool_bytes", "peak_minus_shards", "cpu_s", "other_cpu_s",
                                          "load_before")}), flush=True)
    return run


def other_cores(seconds: float = 1.0) -> float:
    """Cores the rest of the machine used over the next `seconds` (everything but this process)."""
    busy, own = busy_ticks(), sum(os.times()[:2])
    time.sleep(seconds)
    return max(0.0, (busy_ticks() - busy) / TICKS - (sum(os.times()[:2]) - own)) / seconds


def wait_for_quiet(threshold: float, patience: float) -> tuple[float, float]:
    """Wait (at most `patience` s) until other processes use at most `threshold` cores; (seconds waited, cores)."""
    started = time.monotonic()
    while True:
        cores = other_cores()
        if cores <= threshold or time.monotonic() - started >= patience:
            return round(time.monotonic() - started, 1), round(cores, 2)


def _run_watched(command: list[str], tree: Path, log: Path, watcher: FolderWatcher, timeout: float,
                 server_pid: int) -> dict[str, Any]:
    """Run `command` from the work folder while `watcher` polls the output folder and a TreeSampler follows
    the process tree (Ray's daemons included); wait until the whole tree is gone. Wall time, CPU, load."""
    load_before, started_at = loadavg(), time.time()
    busy, server, own = busy_ticks(), proc_stat(server_pid)[2], sum(os.times()[:2])
    with log.open("wb") as handle:
        started = time.perf_counter()
        watcher.start()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=tree_env(tree), cwd=log.parent, start_new_session=True)
        sampler = TreeSampler(process.pid, interval=0.5, pss_every=10**9)  # RSS and CPU; PSS once
        sampler.start()
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # only this run's process group
            code = process.wait()
        wall = time.perf_counter() - started
        watcher.stop()
        deadline = time.monotonic() + 30  # Ray's daemons stop after the driver exits
        while sampler.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        lingering = sampler.alive()
        sampler.stop()
    for pid in lingering:  # only processes of this run's tree, by pid
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    cpu = sampler.cpu_seconds()
    machine = (busy_ticks() - busy) / TICKS
    server_cpu = (proc_stat(server_pid)[2] - server) / TICKS
    bench_cpu = sum(os.times()[:2]) - own
    return {"exit_code": code, "process_s": round(wall, 2), "cpu_s": round(cpu, 1),
            "server_cpu_s": round(server_cpu, 1), "bench_cpu_s": round(bench_cpu, 1),
            "other_cpu_s": round(max(0.0, machine - cpu - server_cpu - bench_cpu), 1),
            "peak_rss_mib": round(sampler.peak_rss / 2**20), "lingering_pids": lingering,
            "load_before": load_before, "load_after": loadavg(), "started_at": started_at}


# --------------------------------------------------------------------------- calibration

def calibrate(args: argparse.Namespace, urls: Path, rows: int, server_pid: int) -> dict[str, Any]:
    """Thresholds from one demo run of the --old tree with the size and score filters off (cached)."""
    cache = Path(args.workdir) / f"calibration-n{args.images}-seed{args.seed}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    out = Path(args.workdir) / "out-calibration"
    overrides = recipe_overrides("demo", urls, out, args, None) + [
        "stages.basic_filter.min_side=1", "stages.clip_score.min_score=null", "stages.aesthetic.min_score=null",
        "stages.watermark.max_score=null"]
    run = run_once("calibration", Path(args.old).resolve(), "demo", overrides, out, args, server_pid,
                   keep_output=True)
    scores = read_scores(out)
    shutil.rmtree(out, ignore_errors=True)
    thresholds = choose_thresholds(scores, rows)
    thresholds.update(calibration_kept=run["kept"], calibration_execute_s=run["execute_s"],
                      calibration_drops=run["drops_by_reason"])
    cache.write_text(json.dumps(thresholds, indent=1))
    return thresholds


def read_scores(out: Path) -> dict[str, np.ndarray]:
    """Shortest side (as fetched), clip_score, aesthetic and watermark of every row of the Parquet output."""
    import pyarrow.parquet as pq

    table = pq.read_table(out / "parquet", columns=["image_meta", "scores"]).to_pylist()
    side = [min(r["image_meta"][0]["original_width"], r["image_meta"][0]["original_height"]) for r in table]
    columns = {"min_side": np.array(side, dtype=np.float64)}
    for name in ("clip_score", "aesthetic", "watermark"):
        columns[name] = np.array([r["scores"][name] for r in table], dtype=np.float64)
    return columns


def choose_thresholds(scores: dict[str, np.ndarray], input_rows: int) -> dict[str, Any]:
    """basic_filter.min_side at MIN_SIDE_QUANTILE of the shortest sides; then, over the rows it keeps,
    clip_score.min_score and aesthetic.min_score both at their quantile q, for the q that keeps closest
    to KEEP_TARGET of the input rows. watermark.max_score is WATERMARK_MAX (see there)."""
    min_side = int(np.quantile(scores["min_side"], MIN_SIDE_QUANTILE))
    sized = (scores["min_side"] >= min_side) & (scores["watermark"] <= WATERMARK_MAX)
    best: dict[str, Any] = {}
    for q in np.arange(0.0, 0.7, 0.005):
        clip = round(float(np.quantile(scores["clip_score"][sized], q)), 4)
        aesthetic = round(float(np.quantile(scores["aesthetic"][sized], q)), 4)
        kept = int((sized & (scores["clip_score"] >= clip) & (scores["aesthetic"] >= aesthetic)).sum())
        if not best or abs(kept - KEEP_TARGET * input_rows) < abs(best["expected_kept"] - KEEP_TARGET * input_rows):
            best = {"quantile": round(float(q), 3), "clip_score": clip, "aesthetic": aesthetic,
                    "expected_kept": kept}
    spread = {name: [round(float(np.quantile(values, p)), 4) for p in (0.0, 0.1, 0.5, 0.9, 1.0)]
              for name, values in scores.items()}
    return {"min_side": min_side, **best, "watermark": WATERMARK_MAX,
            "watermark_at_1": round(float(np.mean(scores["watermark"] >= 1.0)), 3), "input_rows": input_rows,
            "score_quantiles_0_10_50_90_100": spread}


# --------------------------------------------------------------------------- report

def median(values: list[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def mb(value: float) -> str:
    """Bytes as MB (10^6) with one decimal."""
    return f"{value / 1e6:,.1f}"


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians of one configuration's runs."""
    keys = ("execute_s", "ray_start_s", "after_ray_start_s", "process_s", "kept", "peak_bytes", "peak_bound_bytes",
            "shard_bytes", "pool_bytes",
            "work_bytes_end", "final_bytes", "peak_minus_shards", "cpu_s", "other_cpu_s")
    summary = {key: median([r[key] for r in runs]) for key in keys}
    summary["bound_minus_shards"] = median([r["peak_bound_bytes"] - r["shard_bytes"] for r in runs])
    pool = summary["pool_bytes"]
    summary["overhead_per_pool"] = summary["peak_minus_shards"] / pool if pool else float("nan")
    summary["bound_overhead_per_pool"] = summary["bound_minus_shards"] / pool if pool else float("nan")
    return summary


def quotient(a: float, b: float) -> str:
    """a / b with two decimals, empty when b is 0."""
    return f"{a / b:.2f}" if b else ""


def number(value: float) -> str:
    """Two decimals, n/a for NaN (no pool)."""
    return "n/a" if value != value else f"{value:.2f}"


def common_rows(old: dict[str, float], new: dict[str, float]) -> list[str]:
    """Time, CPU and peak rows shared by both tables."""
    return [
        f"| wall time of `execute` (Ray start included), s | {old['execute_s']:.1f} | {new['execute_s']:.1f} | "
        f"**{quotient(new['execute_s'], old['execute_s'])}** |",
        f"| of which Ray's start (`ray.init`), s | {old['ray_start_s']:.1f} | {new['ray_start_s']:.1f} | |",
        f"| wall time of `execute` after Ray's start, s | {old['after_ray_start_s']:.1f} | "
        f"{new['after_ray_start_s']:.1f} | **{quotient(new['after_ray_start_s'], old['after_ray_start_s'])}** |",
        f"| wall time of the process, s | {old['process_s']:.1f} | {new['process_s']:.1f} | "
        f"{quotient(new['process_s'], old['process_s'])} |",
        f"| CPU time of the run's process tree, s | {old['cpu_s']:.1f} | {new['cpu_s']:.1f} | "
        f"{quotient(new['cpu_s'], old['cpu_s'])} |",
        f"| CPU time of other processes meanwhile, s | {old['other_cpu_s']:.1f} | {new['other_cpu_s']:.1f} | |",
        f"| kept rows | {old['kept']:,.0f} | {new['kept']:,.0f} | |",
        f"| peak size of the output folder (polled), MB | {mb(old['peak_bytes'])} | {mb(new['peak_bytes'])} | "
        f"{quotient(new['peak_bytes'], old['peak_bytes'])} |",
        f"| peak, bound from above (two consecutive polls merged), MB | {mb(old['peak_bound_bytes'])} | "
        f"{mb(new['peak_bound_bytes'])} | {quotient(new['peak_bound_bytes'], old['peak_bound_bytes'])} |",
    ]


def demo_table(old: dict[str, float], new: dict[str, float], repeats: int) -> str:
    """The demo recipe's table (medians)."""
    lines = [f"| demo.yaml (medians of {repeats}) | old | new | new / old |", "| --- | ---: | ---: | ---: |",
             *common_rows(old, new),
             f"| output shards at the end (parquet/ + webdataset/), MB | {mb(old['shard_bytes'])} | "
             f"{mb(new['shard_bytes'])} | |",
             f"| pool at the end (_pool/), MB | {mb(old['pool_bytes'])} | {mb(new['pool_bytes'])} | |",
             f"| **peak − output shards**, MB | {mb(old['peak_minus_shards'])} | {mb(new['peak_minus_shards'])} | "
             f"{quotient(new['peak_minus_shards'], old['peak_minus_shards'])} |",
             f"| **(peak − output shards) ÷ pool** | | **{number(new['overhead_per_pool'])}** | |",
             f"| (bound from above − output shards) ÷ pool | | {number(new['bound_overhead_per_pool'])} | |",
             f"| output folder at the end, MB | {mb(old['final_bytes'])} | {mb(new['final_bytes'])} | |"]
    return "\n".join(lines)


def download_table(old: dict[str, float], new: dict[str, float], repeats: int) -> str:
    """The download recipe's table (medians)."""
    lines = [f"| download.yaml (medians of {repeats}) | old | new | new / old |", "| --- | ---: | ---: | ---: |",
             *common_rows(old, new),
             f"| output shards at the end (webdataset/), MB | {mb(old['shard_bytes'])} | {mb(new['shard_bytes'])} | |",
             f"| pool at the end (_pool/), MB | {mb(old['pool_bytes'])} | {mb(new['pool_bytes'])} | |",
             f"| **bytes on disk at the end** (pool + shards + the rest), MB | {mb(old['final_bytes'])} | "
             f"{mb(new['final_bytes'])} | {quotient(new['final_bytes'], old['final_bytes'])} |",
             f"| new at the end ÷ old's peak | | {quotient(new['final_bytes'], old['peak_bytes'])} | |"]
    return "\n".join(lines)


def runs_table(result: dict[str, Any]) -> str:
    """One line per run, in the order they ran."""
    lines = ["| run | execute s | Ray start s | process s | CPU s | kept | peak MB | bound MB | shards MB | pool MB | "
             "other CPU s | other cores at start (waited s) | load before |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    runs = sorted((r for recipe in result["runs"].values() for group in recipe.values() for r in group),
                  key=lambda r: r["started_at"])
    for r in runs:
        lines.append(f"| {r['name']} | {r['execute_s']:.1f} | {r.get('ray_start_s', 0.0):.1f} | "
                     f"{r['process_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['kept']:,} | {mb(r['peak_bytes'])} | {mb(r['peak_bound_bytes'])} | {mb(r['shard_bytes'])} | "
                     f"{mb(r['pool_bytes'])} | {r['other_cpu_s']:.1f} | {r['other_cores_at_start']} "
                     f"({r['waited_for_quiet_s']}) | {r['load_before']} |")
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    """Markdown: the images, the thresholds and one table per recipe."""
    images, thresholds = result["images"], result["thresholds"]
    parts = [f"Images: {images['rows']:,} URL rows {images['by_kind']}, from {images['sources']} COCO photos; "
             f"{images['served_mb']} MB served; KB p10/median/p90 {images['kb_p10_median_p90']}; longest side "
             f"min/median/max {images['longest_side_min_median_max']} px; JPEG quality {images['qualities_min_max']}.",
             f"Thresholds (calibrated on the old tree): basic_filter.min_side={thresholds['min_side']}, "
             f"clip_score.min_score={thresholds['clip_score']}, aesthetic.min_score={thresholds['aesthetic']}, "
             f"watermark.max_score={thresholds['watermark']} "
             f"(quantile {thresholds['quantile']}; expected kept {thresholds['expected_kept']:,} of "
             f"{thresholds['input_rows']:,}).",
             f"old: {result['old']}; new: {result['new']}; work shards of {result['rows_per_work_shard']} rows."]
    tables = {"demo": demo_table, "download": download_table}
    for recipe, runs in result["runs"].items():
        old, new = summarize(runs["old"]), summarize(runs["new"])
        parts.append(tables[recipe](old, new, len(runs["old"])))
    parts.append(runs_table(result))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="distinct images; 4%% more rows are planted copies "
                        "and 404s (default 1000)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tree per recipe, alternating; medians")
    parser.add_argument("--old", default="/tmp/curate-old", help="the earlier source tree (default /tmp/curate-old)")
    parser.add_argument("--new", default=str(REPO), help="the source tree under test (default: this repository)")
    parser.add_argument("--recipes", default="demo,download", help="comma list of: demo, download")
    parser.add_argument("--rows-per-work-shard", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--poll", type=float, default=0.15, help="seconds between two sizes of the output folder")
    parser.add_argument("--workdir", default="/tmp/curate-bench-pool")
    parser.add_argument("--quiet-threshold", type=float, default=0.25, metavar="CORES",
                        help="before each run, wait until other processes use at most this many cores (default 0.25)")
    parser.add_argument("--quiet-wait", type=float, default=60.0, metavar="SECONDS",
                        help="...but no longer than this (default 60)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    parser.add_argument("--json", help="also write the raw numbers here (always: WORKDIR/results.json)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def tree_state(tree: Path) -> str:
    """The tree's commit, with the number of changed and new files when it is not clean (`git status`)."""
    def git(*command: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *command], capture_output=True, text=True).stdout.strip()

    changed = len(git("status", "--porcelain", "--", "curate", "pipelines").splitlines())
    return git("rev-parse", "--short", "HEAD") + (f" + {changed} changed or new files under curate/ and pipelines/"
                                                  if changed else "")


def run_all(args: argparse.Namespace, urls: Path, thresholds: dict[str, Any],
            server_pid: int) -> dict[str, dict[str, list]]:
    """Every run: per recipe, `--repeats` rounds, alternating which tree goes first."""
    trees = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    runs: dict[str, dict[str, list]] = {}
    for recipe in [r for r in args.recipes.split(",") if r]:
        runs[recipe] = {"old": [], "new": []}
        for repeat in range(args.repeats):
            order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
            for which in order:
                out = Path(args.workdir) / f"out-{recipe}-{which}"
                overrides = recipe_overrides(recipe, urls, out, args, thresholds if recipe == "demo" else None)
                runs[recipe][which].append(run_once(f"{recipe}-{which}-{repeat}", trees[which], recipe, overrides,
                                                    out, args, server_pid))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    if args.serve:
        serve(args)
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = image_set(args.images, args.seed, workdir)
    old, new = Path(args.old).resolve(), Path(args.new).resolve()
    result: dict[str, Any] = {"images": describe_images(rows), "old": f"{old} ({tree_state(old)})",
                              "new": f"{new} ({tree_state(new)})", "rows_per_work_shard": args.rows_per_work_shard,
                              "args": vars(args), "load_before": loadavg()}
    print(f"images: {result['images']}", flush=True)
    server = Server(args)
    try:
        urls = write_url_list(workdir / "urls.parquet", server.base_url, rows)
        result["thresholds"] = calibrate(args, urls, len(rows), server.process.pid)
        print(f"thresholds: {result['thresholds']}", flush=True)
        result["runs"] = run_all(args, urls, result["thresholds"], server.process.pid)
    finally:
        server.close()
    return finish_results(result, workdir, started, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
