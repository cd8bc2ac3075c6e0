"""Download benchmark: curate vs img2dataset on the same URL list, served on loopback.

Serves the demo's synthetic web (curate.demo.web, fixed seed, the normal images
scaled up 2x, to at most 1280 px) on 127.0.0.1 from a subprocess, then runs each tool,
one at a time and each as its own subprocess, first on a tiny URL list (its fixed
start-up cost; for curate that includes starting and stopping Ray) and then on the
full list, writing WebDataset. This is repeated --repeat times, alternating which
tool goes first; the tables show medians.

Both tools get equivalent settings: resize keeping the ratio so that the longest
side is 512 px, only images bigger than that; JPEG quality 95; 2 processes x 16
threads; 2 retries; drop images under 32 px or with an aspect ratio above 4;
500-row work units and output shards.

For each run it measures wall seconds, the peak over time of the summed RSS and
PSS of the tool's whole process tree (sampled from /proc every 0.2 s), the CPU
seconds of that tree, of the loopback server and of everything else on the machine,
and the HTTP requests the server answered. Success counts come from each tool's
own outputs (curate: manifest.json; img2dataset: *_stats.json), cross-checked by
counting the samples in the tars, and the URLs in the tars are matched back to the
condition planted on each row. Prints markdown tables; writes the raw numbers to
WORKDIR/results.json.

img2dataset runs from its own venv (see benchmarks/README.md):

    python3 -m venv /tmp/bench-img2dataset-venv
    /tmp/bench-img2dataset-venv/bin/pip install -r benchmarks/requirements-img2dataset.txt
    .venv/bin/python benchmarks/bench_download.py

Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import collections
import glob
import io
import json
import os
import pickle
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "pipelines" / "demo.yaml"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
# Planted conditions whose images are scaled up by --scale (the others keep the
# size that makes them what they are: tiny, extremely wide, or no image at all).
SCALED_CONDITIONS = {"ok", "mismatched_caption", "near_duplicate", "server_error_then_ok", "opt_out"}
TINY_ROWS = 10


# --------------------------------------------------------------------------- web

def build_web(images: int, seed: int, scale: float, cache_dir: Path):
    """The synthetic web, images of the normal conditions scaled by `scale`; cached on disk."""
    from PIL import Image

    from curate.demo.web import build_synthetic_web

    cache = cache_dir / f"web-n{images}-seed{seed}-scale{scale:g}.pickle"
    if cache.exists():
        with cache.open("rb") as f:
            return pickle.load(f)
    web = build_synthetic_web(n_images=images, seed=seed)
    if scale != 1:
        for row in web.rows:
            if row["expect"] not in SCALED_CONDITIONS:
                continue
            route = web.routes[row["path"]]
            with Image.open(io.BytesIO(route.body)) as im:
                fmt = im.format
                size = (round(im.width * scale), round(im.height * scale))
                big = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            out = io.BytesIO()
            if fmt == "JPEG":
                big.save(out, format="JPEG", quality=90)
            else:
                big.save(out, format="PNG", compress_level=6)
            route.body = out.getvalue()
            row["width"], row["height"] = size
    cache_dir.mkdir(parents=True, exist_ok=True)
    with cache.open("wb") as f:
        pickle.dump(web, f)
    return web


class CountingRoutes(dict):
    """The server's route table, counting look-ups of paths it does not have (answered 404)."""

    misses = 0

    def get(self, key, default=None):
        if key not in self:
            self.misses += 1
        return super().get(key, default)


def serve(args: argparse.Namespace) -> None:
    """Subprocess mode: build the web, serve it, write the URL lists, then obey stdin.

    Prints one JSON line when ready. Commands on stdin: `reset` (forget every
    route's hits, so fail-once routes fail once again), `stats`, EOF to stop.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.demo.server import LoopbackServer
    from curate.demo.web import write_url_list

    started = time.perf_counter()
    web = build_web(args.images, args.seed, args.scale, Path(args.workdir))
    build_seconds = time.perf_counter() - started
    with LoopbackServer(web.routes) as server:
        server._server.routes = CountingRoutes(server.routes)  # noqa: SLF001 - the bench owns this server
        full = Path(args.workdir) / "urls.parquet"
        tiny = Path(args.workdir) / "urls-tiny.parquet"
        write_url_list(web, server.base_url, str(full))
        table = pq.read_table(full)
        ok_rows = [i for i, e in enumerate(table.column("expect").to_pylist()) if e == "ok"][:TINY_ROWS]
        pq.write_table(table.take(pa.array(ok_rows)), tiny)
        sides = sorted(max(r["width"], r["height"]) for r in web.rows if r["width"] and r["expect"] != "duplicate_url")
        body_bytes = sum(len(r.body) for r in web.routes.values())
        print(json.dumps({
            "base_url": server.base_url, "full": str(full), "tiny": str(tiny), "rows": table.num_rows,
            "build_seconds": round(build_seconds, 1), "served_mb": round(body_bytes / 2**20, 1),
            "longest_side": {"min": sides[0], "median": sides[len(sides) // 2], "max": sides[-1]},
            "share_over_512": round(sum(s > 512 for s in sides) / len(sides), 3),
        }), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "reset":
                with server._server.lock:  # noqa: SLF001 - the bench owns this server
                    for route in server.routes.values():
                        route.hits = 0
                        route.request_headers.clear()
                    server.routes.misses = 0
                print("ok", flush=True)
            elif command == "stats":
                with server._server.lock:  # noqa: SLF001
                    hits = sum(route.hits for route in server.routes.values()) + server.routes.misses
                print(json.dumps({"hits": hits}), flush=True)


# ------------------------------------------------------------------ measurement

def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, starttime, utime+stime ticks) of `pid`, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12])


def _label(pid: int) -> str:
    """A short name for a process: Ray's worker title, the Python script or module, or the program."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0].split(".")[0]
    program = os.path.basename(argv[0].split()[0])
    if program.startswith("python"):
        if "-c" in argv:
            code = " ".join(argv[argv.index("-c") + 1:])
            return "multiprocessing child" if "multiprocessing" in code else "python -c"
        rest = [a for a in argv[1:] if not a.startswith("-")]
        if "-m" in argv[1:2] and rest:
            return f"python -m {rest[0]}"
        return os.path.basename(rest[0]) if rest else program
    return program


def _busy_ticks() -> int:
    """CPU ticks the whole machine spent busy since boot (all CPUs)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


class TreeSampler(threading.Thread):
    """Samples the process tree under `root` every `interval` seconds.

    A process once seen in the tree stays tracked (by pid and start time) even if it
    is re-parented, e.g. a Ray process whose parent exited. RSS is summed every
    sample; PSS (which splits shared pages, e.g. Ray's object store and shared
    libraries, between the processes that map them) every `pss_every` samples.
    """

    def __init__(self, root: int, interval: float = 0.2, pss_every: int = 5):
        super().__init__(daemon=True)
        self.root, self.interval, self.pss_every = root, interval, pss_every
        self.tracked: dict[tuple[int, int], int] = {}  # (pid, start) -> last cpu ticks
        self.labels: dict[tuple[int, int], str] = {}  # (pid, start) -> what the process is
        self.peak_rss = self.peak_pss = self.peak_procs = 0
        self.samples = 0
        self.timeline: list[tuple[float, int]] = []
        self._halt = threading.Event()
        self._t0 = time.perf_counter()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)
        self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def sample(self) -> None:
        stats: dict[int, tuple[int, int, int]] = {}
        children: dict[int, list[int]] = collections.defaultdict(list)
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _stat(int(name))
                if st is not None:
                    stats[int(name)] = st
                    children[st[0]].append(int(name))
        alive_tracked = {pid for (pid, start) in self.tracked if stats.get(pid, (0, -1))[1] == start}
        todo = [self.root] + list(alive_tracked)
        tree: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid in tree or pid not in stats:
                continue
            tree.add(pid)
            todo.extend(children.get(pid, ()))
        rss = 0
        for pid in tree:
            key = (pid, stats[pid][1])
            self.tracked[key] = stats[pid][2]
            label = _label(pid)  # re-read: Ray workers retitle themselves after start
            if label != "?" or key not in self.labels:
                self.labels[key] = label
            rss += _rss(pid)
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(tree))
        self.timeline.append((round(time.perf_counter() - self._t0, 2), rss))
        if self.samples % self.pss_every == 1:
            self.peak_pss = max(self.peak_pss, sum(_pss(pid) for pid in tree))

    def alive(self) -> list[int]:
        out = []
        for (pid, start) in self.tracked:
            st = _stat(pid)
            if st is not None and st[1] == start:
                out.append(pid)
        return out

    def cpu_seconds(self) -> float:
        return sum(self.tracked.values()) / TICKS

    def cpu_by_label(self) -> dict[str, float]:
        totals: collections.Counter = collections.Counter()
        for key, ticks in self.tracked.items():
            totals[self.labels.get(key, "?")] += ticks / TICKS
        return {label: round(seconds, 1) for label, seconds in totals.most_common()}


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_measured(name: str, command: list[str], env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    """Run `command`, sampling its process tree; wait until every process of the tree is gone."""
    load_before = loadavg()
    busy_before, own_before = _busy_ticks(), sum(os.times()[:2])
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=REPO, start_new_session=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        wall = time.perf_counter() - started
        # Count the tree's processes still exiting after the tool returned (e.g. Ray's).
        deadline = time.monotonic() + 30
        while sampler.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        settled = time.perf_counter() - started
        lingering = sampler.alive()
        sampler.stop()
    machine_cpu = (_busy_ticks() - busy_before) / TICKS
    own_cpu = sum(os.times()[:2]) - own_before
    for pid in lingering:  # only processes of this tree, by pid
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return {
        "name": name, "command": command, "exit_code": code, "wall_s": round(wall, 2),
        "until_tree_gone_s": round(settled, 2), "lingering_pids": lingering,
        "peak_rss_mib": round(sampler.peak_rss / 2**20, 1), "peak_pss_mib": round(sampler.peak_pss / 2**20, 1),
        "peak_processes": sampler.peak_procs, "cpu_s": round(sampler.cpu_seconds(), 1),
        "cpu_s_by_process": sampler.cpu_by_label(), "machine_cpu_s": round(machine_cpu, 1),
        "bench_cpu_s": round(own_cpu, 1),
        "samples": sampler.samples, "load_before": load_before, "load_after": loadavg(), "log": str(log),
    }


# ------------------------------------------------------------------- the tools

BENCH_STAGES = ("fetch", "basic_filter")


def curate_command(args: argparse.Namespace, url_list: str, out: Path) -> list[str]:
    """`curate run pipelines/demo.yaml` with overrides; demo stages other than fetch and basic_filter turned off."""
    import yaml

    others = [name for name in yaml.safe_load(RECIPE.read_text())["stages"] if name not in BENCH_STAGES]
    return [
        str(REPO / ".venv" / "bin" / "curate"), "run", str(RECIPE.relative_to(REPO)),
        "--set", f"source.path={url_list}",
        "--set", f"output.path={out}",
        "--set", "output.formats=[webdataset]",
        "--set", f"output.shard_rows={args.shard_rows}",
        "--set", f"engine.rows_per_work_shard={args.shard_rows}",
        "--set", f"stages.fetch.threads={args.threads}",
        "--set", "stages.fetch.retries=2",
        "--set", "stages.fetch.resize.mode=keep_ratio",
        "--set", "stages.fetch.resize.side=longest",
        "--set", "stages.fetch.resize.size=512",
        "--set", "stages.fetch.resize.only_if_bigger=true",
        "--set", "stages.fetch.encode.format=jpg",
        "--set", "stages.fetch.encode.quality=95",
        "--set", "stages.basic_filter.min_side=32",
        "--set", "stages.basic_filter.max_aspect_ratio=4",
        *[arg for name in others for arg in ("--set", f"stages.{name}=false")],
        "--overwrite", "--no-progress",
    ]


def img2dataset_command(args: argparse.Namespace, url_list: str, out: Path) -> list[str]:
    return [
        str(Path(args.img2dataset_venv) / "bin" / "img2dataset"),
        "--url_list", url_list, "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
        "--output_format", "webdataset", "--output_folder", str(out),
        "--processes_count", str(args.processes), "--thread_count", str(args.threads),
        "--number_sample_per_shard", str(args.shard_rows),
        "--resize_mode", "keep_ratio_largest", "--image_size", "512", "--resize_only_if_bigger", "True",
        "--encode_format", "jpg", "--encode_quality", "95",
        "--retries", "2", "--min_image_size", "32", "--max_aspect_ratio", "4",
        "--enable_wandb", "False",
    ]


def tar_urls(out: Path, url_of) -> list[str]:
    """The URL of every sample in the output's tars (read from each sample's .json)."""
    urls = []
    for path in sorted(glob.glob(str(out / "**" / "*.tar"), recursive=True)):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    urls.append(url_of(json.load(tar.extractfile(member))))
    return urls


def curate_results(out: Path) -> dict[str, Any]:
    manifest = json.loads((out / "manifest.json").read_text())
    ran = [stage["name"] for stage in manifest["stages"] if stage.get("phase") != "input"]
    if sorted(ran) != sorted(BENCH_STAGES):
        raise RuntimeError(f"curate ran stages {ran}, expected only {list(BENCH_STAGES)}")
    return {
        "input_rows": manifest["reconciliation"]["input_rows"],
        "successes": manifest["outputs"]["rows"],
        "drops_by_reason": manifest["drop_log"]["by_reason"],
        "internal_seconds": manifest["seconds"],
        "phase_seconds": {phase["name"]: phase["seconds"] for phase in manifest["phases"]},
        "urls": tar_urls(out, lambda record: record["image_meta"][0]["url"]),
    }


def img2dataset_results(out: Path) -> dict[str, Any]:
    count = successes = 0
    reasons: collections.Counter = collections.Counter()
    for path in glob.glob(str(out / "*_stats.json")):
        stats = json.loads(Path(path).read_text())
        count += stats["count"]
        successes += stats["successes"]
        reasons.update({k: v for k, v in stats["status_dict"].items() if k != "success"})
    return {
        "input_rows": count, "successes": successes, "drops_by_reason": dict(sorted(reasons.items())),
        "urls": tar_urls(out, lambda record: record["url"]),
    }


# ---------------------------------------------------------------------- report

def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def kept_by_condition(urls: list[str], expects: dict[str, list[str]]) -> collections.Counter:
    """Written samples by planted condition; a URL listed k times counts its samples against its rows in order."""
    kept: collections.Counter = collections.Counter()
    for url, count in collections.Counter(urls).items():
        conditions = expects.get(url, [])
        for n in range(count):
            kept[conditions[n] if n < len(conditions) else "unknown"] += 1
    return kept


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(meta: dict[str, Any], runs: dict[str, list[dict[str, Any]]], expects: dict[str, list[str]]) -> str:
    """Markdown tables: medians over the repeats, the spread of wall time, correctness of the first run."""
    c, i = runs["curate"], runs["img2dataset"]
    ct, it = runs.get("curate_tiny"), runs.get("img2dataset_tiny")
    n = len(c)
    lines = [
        f"URL list: {meta['rows']:,} rows (seed {meta['seed']}), {meta['served_mb']} MiB served on loopback; "
        f"longest side min/median/max {meta['longest_side']['min']}/{meta['longest_side']['median']}/"
        f"{meta['longest_side']['max']} px, {meta['share_over_512']:.0%} over 512 px. curate at {meta['commit']}. "
        f"Medians of {n} runs of each tool (wall time: median, then min-max).",
        "",
        "| full run | curate | img2dataset | curate / img2dataset |",
        "| --- | ---: | ---: | ---: |",
    ]

    def row(label, a_runs, b_runs, value, fmt="{:,.1f}", spread=False):
        a, b = median([value(r) for r in a_runs]), median([value(r) for r in b_runs])
        cells = []
        for number, group in ((a, a_runs), (b, b_runs)):
            text = fmt.format(number)
            if spread and len(group) > 1:
                values = [value(r) for r in group]
                text += f" ({fmt.format(min(values))}-{fmt.format(max(values))})"
            cells.append(text)
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {ratio(a, b)} |")

    row("samples written (tool's own count)", c, i, lambda r: r["successes"], "{:,.0f}")
    row("samples in the tars", c, i, lambda r: len(r["urls"]), "{:,.0f}")
    row("wall time, s", c, i, lambda r: r["wall_s"], spread=True)
    row("images/s (written / wall)", c, i, lambda r: r["successes"] / r["wall_s"])
    row("peak RSS, summed over process tree, MiB", c, i, lambda r: r["peak_rss_mib"], "{:,.0f}")
    row("peak PSS, summed over process tree, MiB", c, i, lambda r: r["peak_pss_mib"], "{:,.0f}")
    row("peak processes in tree", c, i, lambda r: r["peak_processes"], "{:,.0f}")
    row("CPU time of the tree, s", c, i, lambda r: r["cpu_s"])
    row("HTTP requests served", c, i, lambda r: r["server_requests"], "{:,.0f}")
    row("CPU time of the loopback server, s", c, i, lambda r: r["server_cpu_s"])
    row("CPU time of other processes on the machine, s", c, i, lambda r: r["other_cpu_s"])
    if ct and it:
        lines += ["", f"| start-up run ({TINY_ROWS} URLs) | curate | img2dataset | curate / img2dataset |",
                  "| --- | ---: | ---: | ---: |"]
        row("wall time, s", ct, it, lambda r: r["wall_s"], spread=True)
        row("peak RSS, summed over process tree, MiB", ct, it, lambda r: r["peak_rss_mib"], "{:,.0f}")
        row("peak PSS, summed over process tree, MiB", ct, it, lambda r: r["peak_pss_mib"], "{:,.0f}")
        row("peak processes in tree", ct, it, lambda r: r["peak_processes"], "{:,.0f}")
        row("CPU time of the tree, s", ct, it, lambda r: r["cpu_s"])
        row("CPU time of other processes on the machine, s", ct, it, lambda r: r["other_cpu_s"])
        c_net = median([r["wall_s"] for r in c]) - median([r["wall_s"] for r in ct])
        i_net = median([r["wall_s"] for r in i]) - median([r["wall_s"] for r in it])
        c_ok, i_ok = median([r["successes"] for r in c]), median([r["successes"] for r in i])
        lines += ["", "| full run minus start-up run (medians) | curate | img2dataset | curate / img2dataset |",
                  "| --- | ---: | ---: | ---: |",
                  f"| wall time, s | {c_net:.1f} | {i_net:.1f} | {ratio(c_net, i_net)} |",
                  f"| images/s | {c_ok / c_net:.1f} | {i_ok / i_net:.1f} | {ratio(c_ok / c_net, i_ok / i_net)} |"]

    phases = {name: median([r["phase_seconds"][name] for r in c]) for name in c[0]["phase_seconds"]}
    rest = median([r["wall_s"] - sum(r["phase_seconds"].values()) for r in c])
    lines += ["", "curate's own phase timings (manifest, medians): "
              + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
              + f"; the rest of the wall time (imports, Ray start and stop, drop log, manifest) {rest:.1f} s."]

    for tool, group in (("curate", c), ("img2dataset", i)):
        labels = {label for r in group for label in r["cpu_s_by_process"]}
        by_label = {label: median([r["cpu_s_by_process"].get(label, 0.0) for r in group]) for label in labels}
        top = sorted(by_label.items(), key=lambda item: -item[1])
        lines.append(f"CPU s by process, {tool} (medians): "
                     + ", ".join(f"{label} {seconds:.1f}" for label, seconds in top if seconds >= 0.1) + ".")

    lines += ["", "| planted condition | rows | curate kept | img2dataset kept |", "| --- | ---: | ---: | ---: |"]
    planted = collections.Counter(e for conditions in expects.values() for e in conditions)
    kept_c, kept_i = kept_by_condition(c[0]["urls"], expects), kept_by_condition(i[0]["urls"], expects)
    for cond in sorted(planted, key=lambda k: (-planted[k], k)):
        lines.append(f"| {cond} | {planted[cond]:,} | {kept_c[cond]:,} | {kept_i[cond]:,} |")
    same = {tool: len({(r["successes"], tuple(sorted(r["urls"]))) for r in group}) == 1
            for tool, group in (("curate", c), ("img2dataset", i))}
    lines += ["", f"Same samples in every run: curate {same['curate']}, img2dataset {same['img2dataset']}.",
              "", "Drops by reason (first run):",
              f"- curate: {c[0]['drops_by_reason']}", f"- img2dataset: {i[0]['drops_by_reason']}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="rows of the synthetic URL list")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=2.0,
                        help="scale factor for the normal images (the demo draws 96-640 px)")
    parser.add_argument("--threads", type=int, default=16, help="download threads per process, both tools")
    parser.add_argument("--processes", type=int, default=2, help="img2dataset processes (curate: one per CPU)")
    parser.add_argument("--shard-rows", type=int, default=500, help="rows per work unit and per output shard")
    parser.add_argument("--img2dataset-venv", default="/tmp/bench-img2dataset-venv")
    parser.add_argument("--workdir", default="/tmp/curate-bench-download")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tool; the tables show medians")
    parser.add_argument("--skip-startup", action="store_true", help="skip the tiny start-up runs")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per tool run")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args)
        return 0
    i2d = Path(args.img2dataset_venv) / "bin" / "img2dataset"
    if not i2d.exists():
        print(f"img2dataset not found at {i2d}; see benchmarks/README.md", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"uptime before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--images", str(args.images), "--seed", str(args.seed),
         "--scale", str(args.scale), "--workdir", str(workdir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        meta = json.loads(server.stdout.readline())
        meta["seed"] = args.seed
        meta["commit"] = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                        cwd=REPO).stdout.strip()
        print(f"synthetic web ready in {meta['build_seconds']} s: {meta}", flush=True)

        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONPATH")}
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
                   NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", WANDB_SILENT="true")
        tools = {"curate": (curate_command, curate_results), "img2dataset": (img2dataset_command, img2dataset_results)}
        runs: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for repeat in range(args.repeat):
            # Alternate which tool goes first, so that drift in the machine's load hits both alike.
            order = ["curate", "img2dataset"] if repeat % 2 == 0 else ["img2dataset", "curate"]
            sizes = ["full"] if args.skip_startup else ["tiny", "full"]
            for which in sizes:
                for tool in order:
                    name = tool if which == "full" else f"{tool}_tiny"
                    command_of, results_of = tools[tool]
                    out = workdir / f"out-{name}"
                    shutil.rmtree(out, ignore_errors=True)
                    server.stdin.write("reset\n")
                    server.stdin.flush()
                    assert server.stdout.readline().strip() == "ok"
                    command = command_of(args, meta[which], out)
                    print(f"\n[{repeat + 1}/{args.repeat}] $ {shlex.join(command)}", flush=True)
                    server_cpu = _stat(server.pid)[2]
                    run = run_measured(name, command, env, workdir / f"{name}.log", args.timeout)
                    run["server_cpu_s"] = round((_stat(server.pid)[2] - server_cpu) / TICKS, 1)
                    # CPU time of everything else on the machine over the same interval (other users' load).
                    run["other_cpu_s"] = round(max(0.0, run["machine_cpu_s"] - run["cpu_s"] - run["server_cpu_s"]
                                                   - run["bench_cpu_s"]), 1)
                    server.stdin.write("stats\n")
                    server.stdin.flush()
                    run["server_requests"] = json.loads(server.stdout.readline())["hits"]
                    if run["exit_code"] != 0:
                        print(f"{name} failed (exit {run['exit_code']}); log: {run['log']}", file=sys.stderr)
                        print(Path(run["log"]).read_text()[-3000:], file=sys.stderr)
                        return 1
                    if which == "full":
                        run.update(results_of(out))
                    print(json.dumps({k: v for k, v in run.items() if k not in ("command", "urls")}), flush=True)
                    runs[name].append(run)
    finally:
        server.stdin.close()
        server.wait(timeout=30)

    import pyarrow.parquet as pq

    table = pq.read_table(meta["full"], columns=["url", "expect"])
    expects: dict[str, list[str]] = collections.defaultdict(list)  # url -> conditions of its rows, in order
    for url, expect in zip(table.column("url").to_pylist(), table.column("expect").to_pylist()):
        expects[url].append(expect)
    text = report(meta, runs, expects)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    machine = (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
               f"{os.sysconf('SC_PHYS_PAGES') * PAGE / 2**30:.1f} GiB RAM, Python {platform.python_version()}")
    print("\n" + text)
    print(f"\nmachine: {machine}\nuptime after: {uptime_after}")
    print("load average (1/5/15 min) before/after each run: "
          + "; ".join(f"{r['name']}: {r['load_before']} -> {r['load_after']}" for rs in runs.values() for r in rs))
    print(f"benchmark total: {time.perf_counter() - started:.0f} s")
    result = {"meta": meta, "machine": machine, "args": vars(args),
              "runs": {n: [{k: v for k, v in r.items() if k != "urls"} for r in rs] for n, rs in runs.items()},
              "report": text}
    (workdir / "results.json").write_text(json.dumps(result, indent=1))
    print(f"raw numbers: {workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
