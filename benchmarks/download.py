"""Download benchmark: curate's pipelines/download.yaml vs img2dataset on the same photos, served on loopback.

Two parts (both by default; `--part speed` or `--part memory` for one):

speed: serves a deterministic set of camera-sized JPEGs made from real COCO photos
(benchmarks/photos.py: 2,000 by default, 1,000-3,000 px, 200 KB - 2 MB) on 127.0.0.1 from
a subprocess, then runs each tool, one at a time and each as its own subprocess, first on
a 10-URL list (its fixed start-up cost) and then on the full list, writing WebDataset.
Each round also measures Ray's idle footprint: the tree of a process that starts Ray the
way `curate run` does (cluster.connect) and then does nothing for --idle-seconds. This is
repeated --repeat times, alternating which tool goes first; the tables show medians.

Both tools get the same settings: longest side resized to 512 px, only images bigger than
that (curate keep_ratio/longest/only_if_bigger, img2dataset keep_ratio_largest +
resize_only_if_bigger); JPEG quality 95; 2 processes x --threads threads (curate starts one
worker per CPU); 2 retries; drop images under 32 px or with an aspect ratio above 10;
500 samples per output shard. curate's per-host request limits are lifted in both parts (all
URLs are on one loopback host; img2dataset has no such limits).

memory: curate alone on URL lists of --memory-rows rows (100,000 and 1,000,000 by default)
where one row in --live-every points at a served photo and every other row at a closed port
on 127.0.0.2 (connection refused: it fails fast), with the recipe's own engine settings.
Reports the peak PSS and RSS of the whole tree (Ray's daemons included) for each size.

For each run it measures wall seconds, the peak over time of the summed RSS and PSS of
the tool's whole process tree (benchmarks/measure.py, sampled from /proc), the CPU seconds
of that tree, of the loopback server and of everything else on the machine, and the HTTP
requests the server answered. Success counts come from each tool's own outputs (curate:
manifest.json; img2dataset: *_stats.json), cross-checked by counting the samples in the
tars; every image in the tars is checked to be 512 px on its longest side. Prints markdown
tables; writes the raw numbers to WORKDIR/results.json.

    python3 -m venv /tmp/bench-img2dataset-venv
    /tmp/bench-img2dataset-venv/bin/pip install -r benchmarks/requirements-img2dataset.txt
    .venv/bin/python benchmarks/download.py
    .venv/bin/python benchmarks/download.py --part memory --memory-rows 100000,1000000,10000000

Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import collections
import glob
import io
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import PAGE, TICKS, TreeSampler, loadavg, proc_stat, run_measured  # noqa: E402
from photos import describe, photo_set  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "pipelines" / "download.yaml"
TINY_ROWS = 10
SIZE, QUALITY, RETRIES, MIN_SIDE, MAX_ASPECT, SHARD_ROWS = 512, 95, 2, 32, 10, 500
DEAD_HOST = "127.0.0.2"  # nothing listens there: connections are refused at once
IDLE_SNIPPET = """
import sys, time
from curate.engine import run  # what `curate run` imports before it starts Ray
from curate.engine import cluster
cluster.connect()
print("ray up", flush=True)
time.sleep(float(sys.argv[1]))
"""


# --------------------------------------------------------------------------- the web

def serve(args: argparse.Namespace) -> None:
    """Subprocess mode: serve the photo set, print one JSON line when ready, then obey stdin.

    Commands on stdin: `reset` (forget every route's hits), `stats`, EOF to stop.
    """
    from curate.demo.server import LoopbackServer, Route

    photos = photo_set(args.photos, args.seed, Path(args.workdir))
    routes = {f"/photos/{i:06d}.jpg": Route(body=p.path.read_bytes()) for i, p in enumerate(photos)}
    with LoopbackServer(routes) as server:
        print(json.dumps({"base_url": server.base_url}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            with server._server.lock:  # noqa: SLF001 - the benchmark owns this server
                if command == "reset":
                    for route in server.routes.values():
                        route.hits = 0
                        route.hit_times.clear()
                        route.request_headers.clear()
                    print("ok", flush=True)
                elif command == "stats":
                    print(json.dumps({"hits": sum(route.hits for route in server.routes.values())}), flush=True)


class Server:
    """The loopback server subprocess."""

    def __init__(self, args: argparse.Namespace):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--photos", str(args.photos), "--seed", str(args.seed),
             "--workdir", str(args.workdir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.base_url = json.loads(self.process.stdout.readline())["base_url"]

    def ask(self, command: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def cpu_ticks(self) -> int:
        return proc_stat(self.process.pid)[2]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def write_photo_list(path: Path, base_url: str, photos, indices) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    indices = list(indices)
    pq.write_table(pa.table({"url": [f"{base_url}/photos/{i:06d}.jpg" for i in indices],
                             "caption": [photos[i].caption for i in indices]}), path)
    return path


def write_mostly_dead_list(path: Path, rows: int, live_every: int, base_url: str, photos: int, dead_port: int) -> Path:
    """`rows` rows: every `live_every`-th a served photo, the others a closed port; written in row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    block = 100_000
    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, block):
            numbers = range(start, min(rows, start + block))
            urls = [f"{base_url}/photos/{(n // live_every) % photos:06d}.jpg" if n % live_every == 0
                    else f"http://{DEAD_HOST}:{dead_port}/gone/{n}.jpg" for n in numbers]
            writer.write_table(pa.table({"url": urls, "caption": [f"row {n}" for n in numbers]}, schema=schema))
    return path


def closed_port() -> int:
    """A port on DEAD_HOST that nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind((DEAD_HOST, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------- the tools

def curate_command(args: argparse.Namespace, url_list: Path, out: Path, same_settings: bool = True) -> list[str]:
    """`curate run pipelines/download.yaml` on `url_list`; with `same_settings`, the comparison's settings."""
    command = [
        str(REPO / ".venv" / "bin" / "curate"), "run", str(RECIPE.relative_to(REPO)),
        "--set", f"source.path={url_list}",
        "--set", f"output.path={out}",
        "--set", "stages.fetch.allow_private_addresses=true",  # the photos are served on loopback
        "--set", "stages.fetch.host_rate=null",  # one host serves everything here; img2dataset has no such limit
        "--set", "stages.fetch.host_concurrency=1024",
    ]
    if same_settings:
        command += [
            "--set", f"stages.fetch.threads={args.threads}",
            "--set", f"stages.fetch.retries={RETRIES}",
            "--set", "stages.fetch.resize.mode=keep_ratio",
            "--set", "stages.fetch.resize.side=longest",
            "--set", f"stages.fetch.resize.size={SIZE}",
            "--set", "stages.fetch.resize.only_if_bigger=true",
            "--set", "stages.fetch.encode.format=jpg",
            "--set", f"stages.fetch.encode.quality={QUALITY}",
            "--set", f"stages.basic_filter.min_side={MIN_SIDE}",
            "--set", f"stages.basic_filter.max_aspect_ratio={MAX_ASPECT}",
            "--set", "output.formats=[webdataset]",
            "--set", f"output.shard_rows={SHARD_ROWS}",
        ]
    return command + [*[a for s in args.curate_set for a in ("--set", s)], "--overwrite", "--no-progress"]


def img2dataset_command(args: argparse.Namespace, url_list: Path, out: Path) -> list[str]:
    return [
        str(Path(args.img2dataset_venv) / "bin" / "img2dataset"),
        "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
        "--output_format", "webdataset", "--output_folder", str(out),
        "--processes_count", "2", "--thread_count", str(args.threads),
        "--number_sample_per_shard", str(SHARD_ROWS),
        "--resize_mode", "keep_ratio_largest", "--image_size", str(SIZE), "--resize_only_if_bigger", "True",
        "--encode_format", "jpg", "--encode_quality", str(QUALITY),
        "--retries", str(RETRIES), "--min_image_size", str(MIN_SIDE), "--max_aspect_ratio", str(MAX_ASPECT),
        "--enable_wandb", "False",
    ]


def tar_samples(out: Path) -> tuple[int, int]:
    """(samples in the output's tars, those whose image is SIZE px on its longest side), from the headers."""
    from PIL import Image

    samples = resized = 0
    for path in sorted(glob.glob(str(out / "**" / "*.tar"), recursive=True)):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith((".jpg", ".jpeg")):
                    samples += 1
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                        resized += max(im.size) == SIZE
    return samples, resized


FIDELITY_EVERY = 10  # output fidelity is measured on every 10th photo (those without an ICC profile)


def fidelity(out: Path, photos, references: dict) -> dict[str, Any]:
    """PSNR of a tool's output images against a reference of the same size: Lanczos from the full-size decode.

    Only photos without an ICC profile are compared, as img2dataset keeps a profile's pixels
    unconverted while curate converts them to sRGB. `references` caches the reference images.
    """
    import numpy as np
    from PIL import Image

    values = []
    for path in sorted(glob.glob(str(out / "**" / "*.tar"), recursive=True)):
        with tarfile.open(path) as tar:
            members = {}
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for files in members.values():
            record = json.loads(files["json"])
            url = record.get("url") or record["image_meta"][0]["url"]
            index = int(url.rsplit("/", 1)[-1].split(".")[0])
            if index % FIDELITY_EVERY or photos[index].icc:
                continue
            with Image.open(io.BytesIO(files["jpg"])) as im:
                output = np.asarray(im.convert("RGB"), dtype=np.float64)
            size = (output.shape[1], output.shape[0])
            if (index, size) not in references:
                with Image.open(photos[index].path) as original:
                    references[index, size] = np.asarray(
                        original.convert("RGB").resize(size, Image.Resampling.LANCZOS), dtype=np.float64)
            mse = float(np.mean((output - references[index, size]) ** 2))
            values.append(99.0 if mse == 0 else 10 * np.log10(255 ** 2 / mse))
    values.sort()
    return {"psnr_images": len(values), "psnr_median_db": round(statistics.median(values), 2),
            "psnr_p10_db": round(values[len(values) // 10], 2)}


def curate_results(out: Path) -> dict[str, Any]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples, resized = tar_samples(out)
    return {
        "input_rows": manifest["reconciliation"]["input_rows"],
        "successes": manifest["outputs"]["rows"],
        "drops_by_reason": manifest["drop_log"]["by_reason"],
        "internal_seconds": manifest["seconds"],
        "phase_seconds": {phase["name"]: phase["seconds"] for phase in manifest["phases"]},
        "tar_samples": samples, "tar_resized": resized,
    }


def img2dataset_results(out: Path) -> dict[str, Any]:
    count = successes = 0
    reasons: collections.Counter = collections.Counter()
    for path in glob.glob(str(out / "*_stats.json")):
        stats = json.loads(Path(path).read_text())
        count += stats["count"]
        successes += stats["successes"]
        reasons.update({k: v for k, v in stats["status_dict"].items() if k != "success"})
    samples, resized = tar_samples(out)
    return {"input_rows": count, "successes": successes, "drops_by_reason": dict(sorted(reasons.items())),
            "tar_samples": samples, "tar_resized": resized}


def ray_idle(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """The tree of a process that starts Ray as `curate run` does and then waits: PSS/RSS at the end, and peaks."""
    process = subprocess.Popen([str(REPO / ".venv" / "bin" / "python"), "-c", IDLE_SNIPPET, str(args.idle_seconds)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO,
                               start_new_session=True, text=True)
    sampler = TreeSampler(process.pid, interval=0.5, pss_every=1)
    sampler.start()
    process.stdout.readline()  # Ray is up
    time.sleep(args.idle_seconds - 1)
    settled_rss, settled_pss, processes = sampler.last_rss, sampler.last_pss, len(sampler.alive())
    process.wait(timeout=120)
    deadline = time.monotonic() + 30
    while sampler.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    sampler.stop()
    return {"rss_mib": round(settled_rss / 2**20, 1), "pss_mib": round(settled_pss / 2**20, 1),
            "peak_rss_mib": round(sampler.peak_rss / 2**20, 1), "peak_pss_mib": round(sampler.peak_pss / 2**20, 1),
            "processes": processes,
            "pss_mib_by_process": {label: round(value / 2**20) for label, value in
                                   sorted(sampler.pss_at_peak.items(), key=lambda item: -item[1])}}


# ---------------------------------------------------------------------- report

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def speed_report(meta: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown tables: medians over the repeats (wall time also min-max)."""
    c, i, ct, it, idle = (runs[k] for k in ("curate", "img2dataset", "curate_tiny", "img2dataset_tiny", "ray_idle"))
    photos = meta["photos"]
    lines = [
        f"{photos['photos']:,} photos, {photos['total_mb']} MB served on loopback; file size min/median/mean/max "
        f"{photos['kb']['min']}/{photos['kb']['median']}/{photos['kb']['mean']}/{photos['kb']['max']} KB, longest "
        f"side min/median/max {photos['longest_side']['min']}/{photos['longest_side']['median']}/"
        f"{photos['longest_side']['max']} px. curate at {meta['commit']}. Medians of {len(c)} runs of each tool.",
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

    idle_pss = median([r["pss_mib"] for r in idle])
    c_pss, i_pss = median([r["peak_pss_mib"] for r in c]), median([r["peak_pss_mib"] for r in i])
    row("samples written (tool's own count)", c, i, lambda r: r["successes"], "{:,.0f}")
    row("samples in the tars / of them 512 px", c, i, lambda r: r["tar_samples"], "{:,.0f}")
    row("wall time, s", c, i, lambda r: r["wall_s"], spread=True)
    row("**samples/s** (written / wall time)", c, i, lambda r: r["successes"] / r["wall_s"], spread=True)
    row(f"output fidelity: PSNR vs a Lanczos resize of the full-size decode, median dB ({c[0]['psnr_images']} "
        "photos without ICC profile)", c, i, lambda r: r["psnr_median_db"])
    row("output fidelity: PSNR, 10th percentile dB", c, i, lambda r: r["psnr_p10_db"])
    row("peak PSS, summed over the process tree, MiB", c, i, lambda r: r["peak_pss_mib"], "{:,.0f}")
    row("peak RSS, summed over the process tree, MiB", c, i, lambda r: r["peak_rss_mib"], "{:,.0f}")
    lines.append(f"| **peak PSS above curate's idle Ray ({idle_pss:,.0f} MiB)**, MiB | "
                 f"{c_pss - idle_pss:,.0f} | {i_pss:,.0f} (all of it) | {ratio(c_pss - idle_pss, i_pss)} |")
    row("peak processes in the tree", c, i, lambda r: r["peak_processes"], "{:,.0f}")
    row("CPU time of the tree, s", c, i, lambda r: r["cpu_s"])
    row("HTTP requests served", c, i, lambda r: r["server_requests"], "{:,.0f}")
    row("CPU time of the loopback server, s", c, i, lambda r: r["server_cpu_s"])
    row("CPU time of other processes on the machine, s", c, i, lambda r: r["other_cpu_s"])
    lines += ["", f"| start-up run ({TINY_ROWS} URLs) | curate | img2dataset | curate / img2dataset |",
              "| --- | ---: | ---: | ---: |"]
    row("wall time, s", ct, it, lambda r: r["wall_s"], spread=True)
    row("peak PSS, summed over the process tree, MiB", ct, it, lambda r: r["peak_pss_mib"], "{:,.0f}")
    row("peak RSS, summed over the process tree, MiB", ct, it, lambda r: r["peak_rss_mib"], "{:,.0f}")
    row("CPU time of the tree, s", ct, it, lambda r: r["cpu_s"])
    c_net = median([r["wall_s"] for r in c]) - median([r["wall_s"] for r in ct])
    i_net = median([r["wall_s"] for r in i]) - median([r["wall_s"] for r in it])
    c_ok, i_ok = median([r["successes"] for r in c]), median([r["successes"] for r in i])
    lines += ["", "| full run minus start-up run (medians) | curate | img2dataset | curate / img2dataset |",
              "| --- | ---: | ---: | ---: |",
              f"| wall time, s | {c_net:.1f} | {i_net:.1f} | {ratio(c_net, i_net)} |",
              f"| samples/s | {c_ok / c_net:.1f} | {i_ok / i_net:.1f} | {ratio(c_ok / c_net, i_ok / i_net)} |"]
    lines += ["", "| Ray idle (driver + Ray's daemons, no work) | value |", "| --- | ---: |",
              f"| PSS summed over the tree, MiB | {idle_pss:,.0f} |",
              f"| RSS summed over the tree, MiB | {median([r['rss_mib'] for r in idle]):,.0f} |",
              f"| processes | {median([r['processes'] for r in idle]):.0f} |"]

    phases = {name: median([r["phase_seconds"][name] for r in c]) for name in c[0]["phase_seconds"]}
    rest = median([r["wall_s"] - sum(r["phase_seconds"].values()) for r in c])
    lines += ["", "curate's phase timings (manifest, medians): "
              + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
              + f"; the rest of the wall time (imports, Ray start and stop, drop log, manifest) {rest:.1f} s."]
    for tool, group in (("curate", c), ("img2dataset", i)):
        labels = {label for r in group for label in r["cpu_s_by_process"]}
        by_label = {label: median([r["cpu_s_by_process"].get(label, 0.0) for r in group]) for label in labels}
        top = sorted(by_label.items(), key=lambda item: -item[1])
        lines.append(f"CPU s by process, {tool} (medians): "
                     + ", ".join(f"{label} {seconds:.1f}" for label, seconds in top if seconds >= 0.1) + ".")
    lines += ["", "Drops by reason (first run):", f"- curate: {c[0]['drops_by_reason']}",
              f"- img2dataset: {i[0]['drops_by_reason']}"]
    return "\n".join(lines)


def memory_report(runs: list[dict[str, Any]], live_every: int) -> str:
    lines = [f"| URL rows (1 in {live_every:,} a photo, the rest a closed port) | written | dropped | wall s | "
             "rows/s | peak PSS MiB | peak RSS MiB | PSS / smallest list's | load before -> after |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    base = runs[0]["peak_pss_mib"] if runs else 0
    for r in runs:
        lines.append(f"| {r['rows']:,} | {r['successes']:,} | {r['dropped']:,} | {r['wall_s']:.0f} | "
                     f"{r['rows'] / r['wall_s']:,.0f} | {r['peak_pss_mib']:,.0f} | {r['peak_rss_mib']:,.0f} | "
                     f"{ratio(r['peak_pss_mib'], base)} | {r['load_before']} -> {r['load_after']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "speed", "memory"), default="all")
    parser.add_argument("--photos", type=int, default=2000, help="photos in the set (benchmarks/photos.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=16, help="download threads per process, both tools")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the speed part; the tables show medians")
    parser.add_argument("--idle-seconds", type=float, default=12, help="how long the idle Ray is watched")
    parser.add_argument("--memory-rows", default="100000,1000000", help="sizes of the memory part's URL lists")
    parser.add_argument("--live-every", type=int, default=1000, help="memory part: one row in this many is a photo")
    parser.add_argument("--curate-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra --set for curate (repeatable), e.g. engine.batch_rows=128")
    parser.add_argument("--img2dataset-venv", default="/tmp/bench-img2dataset-venv")
    parser.add_argument("--workdir", default="/tmp/curate-bench-download")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per tool run")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def tool_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", WANDB_SILENT="true")
    return env


def measured(name: str, command: list[str], server: Server, workdir: Path, timeout: float) -> dict[str, Any]:
    """Run one tool command against the served photos; add the server's share and the machine's other load."""
    assert server.ask("reset") == "ok"
    print(f"\n$ {shlex.join(command)}", flush=True)
    server_cpu = server.cpu_ticks()
    run = run_measured(name, command, tool_env(), workdir / f"{name}.log", timeout, cwd=REPO)
    run["server_cpu_s"] = round((server.cpu_ticks() - server_cpu) / TICKS, 1)
    # CPU time of everything else on the machine over the same interval (other users' load).
    run["other_cpu_s"] = round(max(0.0, run["machine_cpu_s"] - run["cpu_s"] - run["server_cpu_s"]
                                   - run["bench_cpu_s"]), 1)
    run["server_requests"] = json.loads(server.ask("stats"))["hits"]
    if run["exit_code"] != 0:
        print(Path(run["log"]).read_text()[-3000:], file=sys.stderr)
        raise RuntimeError(f"{name} failed (exit {run['exit_code']}); log: {run['log']}")
    return run


def speed_part(args: argparse.Namespace, server: Server, photos, workdir: Path) -> dict[str, list[dict[str, Any]]]:
    full = write_photo_list(workdir / "photos.parquet", server.base_url, photos, range(len(photos)))
    tiny = write_photo_list(workdir / "photos-tiny.parquet", server.base_url, photos, range(TINY_ROWS))
    lists = {"tiny": tiny, "full": full}
    commands = {"curate": lambda url_list, out: curate_command(args, url_list, out),
                "img2dataset": lambda url_list, out: img2dataset_command(args, url_list, out)}
    results = {"curate": curate_results, "img2dataset": img2dataset_results}
    references: dict = {}
    runs: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for repeat in range(args.repeat):
        print(f"\n=== round {repeat + 1}/{args.repeat}, load average {loadavg()}", flush=True)
        runs["ray_idle"].append(ray_idle(args, tool_env()))
        print(json.dumps({"ray_idle": runs["ray_idle"][-1]}), flush=True)
        # Alternate which tool goes first, so that drift in the machine's load hits both alike.
        order = ["curate", "img2dataset"] if repeat % 2 == 0 else ["img2dataset", "curate"]
        for which in ("tiny", "full"):
            for tool in order:
                name = tool if which == "full" else f"{tool}_tiny"
                out = workdir / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                run = measured(name, commands[tool](lists[which], out), server, workdir, args.timeout)
                if which == "full":
                    run.update(results[tool](out))
                    run.update(fidelity(out, photos, references))
                print(json.dumps({k: v for k, v in run.items() if k != "command"}), flush=True)
                runs[name].append(run)
    return runs


def memory_part(args: argparse.Namespace, server: Server, photos, workdir: Path) -> list[dict[str, Any]]:
    dead_port = closed_port()
    runs = []
    for rows in [int(n) for n in args.memory_rows.split(",") if n]:
        url_list = write_mostly_dead_list(workdir / f"mostly-dead-{rows}.parquet", rows, args.live_every,
                                          server.base_url, len(photos), dead_port)
        out = workdir / f"out-memory-{rows}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"\n=== memory, {rows:,} rows, load average {loadavg()}", flush=True)
        # Nearly every row fails, so the disk check's estimate (every row a written image) does not apply.
        command = curate_command(args, url_list, out, same_settings=False) + ["--set", "engine.check_disk=false"]
        run = measured(f"memory_{rows}", command, server, workdir, args.timeout)
        manifest = json.loads((out / "manifest.json").read_text())
        run.update(rows=rows, successes=manifest["outputs"]["rows"],
                   dropped=manifest["reconciliation"]["dropped_rows"],
                   drops_by_reason=manifest["drop_log"]["by_reason"],
                   phase_seconds={phase["name"]: phase["seconds"] for phase in manifest["phases"]})
        print(json.dumps({k: v for k, v in run.items() if k != "command"}), flush=True)
        runs.append(run)
        shutil.rmtree(out, ignore_errors=True)
        url_list.unlink()
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    if args.serve:
        serve(args)
        return 0
    if args.part != "memory" and not (Path(args.img2dataset_venv) / "bin" / "img2dataset").exists():
        print(f"img2dataset not found in {args.img2dataset_venv}; see benchmarks/README.md", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime before: {uptime_before}", flush=True)
    photos = photo_set(args.photos, args.seed, workdir)  # made once, then cached in the work folder
    meta = {"photos": describe(photos), "seed": args.seed, "threads": args.threads,
            "commit": subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                     cwd=REPO).stdout.strip()}
    print(f"photos: {meta['photos']}", flush=True)
    server = Server(args)
    report: list[str] = []
    result: dict[str, Any] = {"meta": meta, "args": vars(args), "uptime_before": uptime_before}
    try:
        if args.part in ("all", "speed"):
            runs = speed_part(args, server, photos, workdir)
            result["speed"] = runs
            report.append(speed_report(meta, runs))
        if args.part in ("all", "memory"):
            runs = memory_part(args, server, photos, workdir)
            result["memory"] = runs
            report.append(memory_report(runs, args.live_every))
    finally:
        server.close()
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    machine = (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
               f"{os.sysconf('SC_PHYS_PAGES') * PAGE / 2**30:.1f} GiB RAM, Python {platform.python_version()}")
    text = "\n\n".join(report)
    print("\n" + text)
    print(f"\nmachine: {machine}\nuptime before: {uptime_before}\nuptime after: {uptime_after}")
    all_runs = [r for rs in result.get("speed", {}).values() for r in rs if "name" in r] + result.get("memory", [])
    print("load average (1/5/15 min) before -> after each run: "
          + "; ".join(f"{r['name']}: {r['load_before']} -> {r['load_after']}" for r in all_runs if "name" in r))
    print(f"benchmark total: {time.perf_counter() - started:.0f} s")
    result.update(machine=machine, uptime_after=uptime_after, report=text)
    (workdir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"raw numbers: {workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
