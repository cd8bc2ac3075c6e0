"""Streaming benchmark: annotation groups streamed side by side against barrier phases, one GPU stage, one run.

The barrier engine (a source tree given by `--barrier`, a git worktree of 9fba54d) runs each
annotation group over every work shard before the next group starts: every shard is fetched before
the model stage sees any. The streaming engine (`--streaming`, this tree's HEAD) gives each group its
own pool of Ray actors and moves a work shard on to the next group as soon as one is done with it
(curate/engine/phases.py `run_pipeline`). This benchmark runs the same recipe with both on the same
machine, in one invocation, runs alternating; each run in its own subprocess with PYTHONPATH set to
its tree (`curate.__file__` is checked) and this folder, started from the work folder.

- **Stage**: benchmarks/standin_gpu.py, a stand-in GPU stage (phase "model", 1 CPU + 1 GPU per
  worker) that sleeps `--gpu-seconds` (50 ms) per batch and passes every row through. The driver adds
  it to `curate.registry.STAGES`; Ray's workers import it from PYTHONPATH. It appends each batch's
  start and end to WORKDIR/RUN.gpu.log, from which the GPU stage's busy time is measured in both
  trees (the barrier tree writes no timeline).
- **Cluster**: per run, a 2-node local Ray cluster (`ray.cluster_utils.Cluster`) started by the
  driver: the head with 1 CPU, a second node with 1 CPU and 1 GPU (the machine has 2 cores), then
  `execute(plan, address=...)`. The stand-in's worker is placed on the GPU node and runs on its CPU.
- **Images**: `--images` distinct small JPEGs (64-128 px a side, random colour blocks, seeded;
  cached in the work folder), served on 127.0.0.1 by curate.demo.server.LoopbackServer from a
  subprocess, each response (robots.txt included) delayed by `--delay` (200 ms), as the web does.
- **Recipe** (WORKDIR/recipe.yaml, the same for both trees): url_list source; `fetch`
  (allow_private_addresses, host_rate null, host_concurrency 256, `--threads` 16 threads, otherwise
  its defaults); `standin_gpu`; Parquet output; `engine: {rows_per_work_shard: 100, batch_rows: 10,
  workers: 2, keep_work: true}`. workers 2: the fetch group gets 2 actors in both engines (the GPU
  group gets 1: one GPU).

How the sizes were chosen. `engine.batch_rows` is the batch of every stage, fetch included: a fetch
actor downloads one batch at a time, all of its URLs at once when batch_rows <= threads, so a batch
takes about one delay (0.2 s) to fetch and 0.05 s on the stand-in. Two fetch actors feed one GPU
actor, so with batch_rows <= threads the stand-in's total busy time is about (0.05 / 0.2) x 2 = half
of the download time whatever batch_rows is (with batch_rows > threads a batch takes several delays
and the share falls): half is the most these settings give, and "comparable" here means that. 10
rows divide the work shards of 100 evenly (10 batches a shard): about 2 s of fetch and 0.5 s of
stand-in per shard; with 2,000 images (20 shards) about 20 s of download (two actors) and 10 s of
GPU time. Ideally the barrier engine takes download + GPU (about 30 s) and the streaming one download
+ one shard's GPU time (about 20.5 s), plus the same fixed costs in both. Measured, a fetch batch takes
about 0.25 s (26-27 s of download, 10 s of GPU time): `--gpu-seconds 0.14` makes the stand-in's time
equal to the download time.

Per run: wall time of the cluster's start (`Cluster` + `wait_for_nodes`), of `execute` (connecting
to the cluster, timed apart as in pool.py, included) and of their sum ("Ray start included"); the
annotation window (from the first `_annotate` call's start to the last one's end: the barrier engine
calls it once per group, the streaming engine once); the stand-in's busy time (sum of its batches'
sleeps), and its idle share 1 - busy / wall over the run (cluster start + execute) and over the
annotation window; when its first batch started in the window; the nodes its batches ran on; the
CPU time of the run's process tree (benchmarks/measure.py, Ray's daemons included) and of every
other process meanwhile; kept rows (the manifest). For the streaming engine also its timeline
(OUT/_work/timeline.jsonl, copied to WORKDIR/RUN.timeline.jsonl): per step the span, the nodes and
the processes, and how long the GPU group sat without a shard while fetch still ran. Before each run
it waits (at most `--quiet-wait` s) for the rest of the machine to use at most `--quiet-threshold`
cores and records what it saw; a run during which they used more (on average) is run again, at most
`--retries` times (the medians leave the disturbed attempts out; the table of runs shows them). Runs
alternate between the trees, `--repeats` each; tables show medians. Raw numbers: WORKDIR/results.json
(and `--json`).

    git -C /work/main worktree add /tmp/curate-barrier 9fba54d       # the barrier engine
    .venv/bin/python benchmarks/streaming.py --images 2000 --repeats 3
    .venv/bin/python benchmarks/streaming.py --images 200 --repeats 1     # smoke
    git -C /work/main worktree remove --force /tmp/curate-barrier

`--streaming` defaults to this repository; to measure its HEAD while the tree has uncommitted
changes, pass a worktree of HEAD (`git worktree add /tmp/curate-streaming HEAD`).

Linux (reads /proc for CPU times and the load average).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import TICKS, finish_results, loadavg, proc_stat, run_measured  # noqa: E402
from pool import REPO, Server, tree_env, tree_state, wait_for_quiet, write_url_list  # noqa: E402
from standin_gpu import NAME as STANDIN  # noqa: E402
from standin_gpu import TARGET as STANDIN_TARGET  # noqa: E402
from standin_gpu import read_log  # noqa: E402

MIN_SIDE, MAX_SIDE = 64, 128  # px, each side of a generated image

RUNNER = r"""
import json, os, sys, time
started = time.perf_counter()
tree, recipe, result, name, target = sys.argv[1:6]
import curate
where = os.path.realpath(curate.__file__)
assert where.startswith(os.path.realpath(tree) + os.sep), f"curate imported from {where}, not from {tree}"
from rich.console import Console
from ray.cluster_utils import Cluster
import ray
from curate import registry
registry.STAGES[name] = target  # the stand-in, importable from PYTHONPATH here and in Ray's workers
registry.import_target(target)
from curate.engine import cluster, run as engine_run
from curate.engine.run import compile_plan, execute
from curate.recipe import load_recipe
connect, ray_connect = cluster.connect, []
def timed_connect(*args, **kwargs):
    began = time.perf_counter()
    try:
        return connect(*args, **kwargs)
    finally:
        ray_connect.append(time.perf_counter() - began)
cluster.connect = timed_connect  # both trees connect through cluster.connect
annotate, windows = engine_run._annotate, []
def timed_annotate(*args, **kwargs):
    began = time.time()
    try:
        return annotate(*args, **kwargs)
    finally:
        windows.append([began, time.time()])
engine_run._annotate = timed_annotate  # barrier: one call per group; streaming: one call
imported = time.perf_counter()
plan = compile_plan(load_recipe(recipe, sys.argv[6:]))
compiled = time.perf_counter()
local = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
gpu_node = local.add_node(num_cpus=1, num_gpus=1)
local.wait_for_nodes()
cluster_started = time.perf_counter()
execute_began = time.time()
manifest = execute(plan, Console(stderr=True), address=local.address, overwrite=True, progress=False, judge=False)
done = time.perf_counter()
head_id = local.head_node.node_id
ray.shutdown()
local.shutdown()
stopped = time.perf_counter()
with open(result, "w") as handle:
    json.dump({"curate": where, "import_s": imported - started, "compile_s": compiled - imported,
               "cluster_start_s": cluster_started - compiled, "execute_s": done - cluster_started,
               "ray_connect_s": sum(ray_connect), "cluster_stop_s": stopped - done,
               "execute_began": execute_began, "annotate_windows": windows,
               "head_node": head_id, "gpu_node": gpu_node.node_id,
               "kept": manifest["outputs"]["rows"], "input_rows": manifest["reconciliation"]["input_rows"],
               "drops_by_reason": manifest["drop_log"]["by_reason"],
               "phase_seconds": {p["name"]: p["seconds"] for p in manifest.get("phases", [])}}, handle)
"""


# --------------------------------------------------------------------------- the images and the web

def image_set(count: int, seed: int, workdir: Path) -> list[dict]:
    """`count` distinct small JPEGs (random colour blocks, 64-128 px a side), made once into the work folder."""
    folder = workdir / f"images-n{count}-seed{seed}"
    index = folder / "index.json"
    if not index.exists():
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(count):
            rng = np.random.default_rng([seed, i])
            width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
            blocks = rng.integers(0, 256, size=(int(rng.integers(4, 9)), int(rng.integers(4, 9)), 3), dtype=np.uint8)
            image = Image.fromarray(blocks).resize((width, height), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=int(rng.integers(75, 96)))
            name = f"{i:05d}.jpg"
            (folder / name).write_bytes(buffer.getvalue())
            rows.append({"route": f"/img/{name}", "file": name, "caption": f"colour blocks {i}",
                         "width": width, "height": height, "bytes": len(buffer.getvalue())})
        temporary = index.with_suffix(".tmp")
        temporary.write_text(json.dumps(rows))
        temporary.replace(index)
    return json.loads(index.read_text())


def serve(args: argparse.Namespace) -> None:
    """Subprocess mode: serve the images, each answer `--delay` s late; print one JSON line when ready; each
    line on stdin asks for the number of requests answered so far; stop at EOF on stdin (as pool.py's)."""
    sys.path.insert(0, str(REPO))
    from curate.demo.server import LoopbackServer, Route

    folder = Path(args.workdir) / f"images-n{args.images}-seed{args.seed}"
    rows = json.loads((folder / "index.json").read_text())
    routes = {r["route"]: Route(body=(folder / r["file"]).read_bytes(), delay=args.delay) for r in rows}
    routes["/robots.txt"] = Route(body=b"not found", status=404, content_type="text/plain", delay=args.delay)
    with LoopbackServer(routes) as server:
        print(json.dumps({"base_url": server.base_url}), flush=True)
        for _ in sys.stdin:
            print(json.dumps({"requests": sum(route.hits for route in routes.values())}), flush=True)


class DelayedServer(Server):
    """pool.py's server subprocess, serving this benchmark's images with a delay."""

    def __init__(self, args: argparse.Namespace):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--images", str(args.images), "--seed", str(args.seed),
             "--workdir", str(args.workdir), "--delay", str(args.delay)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.base_url = json.loads(self.process.stdout.readline())["base_url"]


def write_recipe(path: Path, urls: Path, args: argparse.Namespace) -> Path:
    """The recipe both trees run (output path and the stand-in's log file are set per run)."""
    path.write_text(
        "source: {type: url_list, path: %s, url_column: url, caption_column: caption}\n"
        "stages:\n"
        "  fetch: {allow_private_addresses: true, host_rate: null, host_concurrency: 256, threads: %d}\n"
        "  %s: {seconds_per_batch: %s}\n"
        "output: {path: out, formats: [parquet]}\n"
        "engine: {rows_per_work_shard: %d, batch_rows: %d, workers: %d, keep_work: true}\n"
        % (urls, args.threads, STANDIN, args.gpu_seconds, args.rows_per_work_shard, args.batch_rows, args.workers))
    return path


# --------------------------------------------------------------------------- runs

def run_env(tree: Path) -> dict[str, str]:
    """pool.py's environment of a run (Ray local and quiet), with this folder on PYTHONPATH for the stand-in."""
    env = tree_env(tree)
    env["PYTHONPATH"] = f"{tree}{os.pathsep}{HERE}"
    return env


def run_once(name: str, tree: Path, recipe: Path, args: argparse.Namespace, server: Server) -> dict[str, Any]:
    """One run of `recipe` with `tree` in a subprocess; its measurements."""
    workdir = Path(args.workdir)
    out, result_file, gpu_log = workdir / f"out-{name}", workdir / f"{name}.result.json", workdir / f"{name}.gpu.log"
    shutil.rmtree(out, ignore_errors=True)
    result_file.unlink(missing_ok=True)
    gpu_log.unlink(missing_ok=True)
    command = [sys.executable, "-c", RUNNER, str(tree), str(recipe), str(result_file), STANDIN, STANDIN_TARGET,
               f"output.path={out}", f"stages.{STANDIN}.log_file={gpu_log}"]
    print(f"\n[{name}] PYTHONPATH={tree}:{HERE} python -c RUNNER {' '.join(command[3:])}", flush=True)
    waited, cores = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
    requests, server_cpu = server.requests(), proc_stat(server.process.pid)[2]
    run = run_measured(name, command, run_env(tree), workdir / f"{name}.log", args.timeout, cwd=workdir,
                       interval=0.5, pss_every=10**9)
    server_cpu = (proc_stat(server.process.pid)[2] - server_cpu) / TICKS
    run.update(requests=server.requests() - requests, server_cpu_s=round(server_cpu, 1),
               waited_for_quiet_s=waited, other_cores_at_start=cores, started_at=time.time() - run["wall_s"])
    run["other_cpu_s"] = round(max(0.0, run["machine_cpu_s"] - run["cpu_s"] - server_cpu - run["bench_cpu_s"]), 1)
    if run["exit_code"] != 0 or not result_file.exists():
        log = Path(run["log"]).read_text(errors="replace")
        raise RuntimeError(f"{name} failed (exit {run['exit_code']}); log {run['log']}:\n{log[-4000:]}")
    run.update(json.loads(result_file.read_text()))
    run.update(analyse(run, read_log(gpu_log)))
    timeline = out / "_work" / "timeline.jsonl"
    if timeline.exists():
        shutil.copy(timeline, workdir / f"{name}.timeline.jsonl")
        run["timeline"] = analyse_timeline([json.loads(line) for line in timeline.read_text().splitlines()],
                                           run["head_node"], run["gpu_node"])
    shutil.rmtree(out, ignore_errors=True)
    run.update(name=name, tree=str(tree))
    print(json.dumps({k: run.get(k) for k in ("total_s", "cluster_start_s", "execute_s", "annotate_s", "gpu_busy_s",
                                              "idle_run", "idle_annotate", "gpu_first_s", "kept", "cpu_s",
                                              "other_cpu_s", "load_before")}), flush=True)
    return run


def analyse(run: dict[str, Any], batches: list[dict]) -> dict[str, Any]:
    """The stand-in's busy time and idle shares from its batch log, against the run's clocks."""
    total = run["cluster_start_s"] + run["execute_s"]
    windows = run["annotate_windows"]
    window_start, window_end = min(w[0] for w in windows), max(w[1] for w in windows)
    annotate = window_end - window_start
    busy = sum(b["end"] - b["start"] for b in batches)
    first = min((b["start"] for b in batches), default=window_end)
    last = max((b["end"] for b in batches), default=window_end)
    nodes = sorted({b["node"] for b in batches})
    return {"total_s": round(total, 2), "after_connect_s": round(run["execute_s"] - run["ray_connect_s"], 2),
            "annotate_s": round(annotate, 2), "gpu_batches": len(batches),
            "gpu_rows": sum(b["rows"] for b in batches), "gpu_busy_s": round(busy, 2),
            "gpu_span_s": round(last - first, 2), "gpu_first_s": round(first - window_start, 2),
            "gpu_after_last_s": round(window_end - last, 2),
            "idle_run": round(1 - busy / total, 3), "idle_execute": round(1 - busy / run["execute_s"], 3),
            "idle_annotate": round(1 - busy / annotate, 3),
            "gpu_on_gpu_node": nodes == [run["gpu_node"]], "gpu_pids": len({b["pid"] for b in batches}),
            "gpu_ids": sorted({b["gpus"] for b in batches})}


def analyse_timeline(entries: list[dict], head: str, gpu_node: str) -> dict[str, Any]:
    """The streaming engine's timeline: per step its span, nodes and processes; the model step's gaps while
    fetch still ran; the most shards in each step at once."""
    where = {head: "head", gpu_node: "gpu"}
    steps: dict[str, Any] = {}
    for step in dict.fromkeys(e["step"] for e in entries):
        mine = sorted((e for e in entries if e["step"] == step), key=lambda e: e["start"])
        events = sorted([(e["start"], 1) for e in mine] + [(e["end"], -1) for e in mine])
        running = most = 0
        for _, change in events:
            running += change
            most = max(most, running)
        steps[step] = {"shards": len(mine), "start": mine[0]["start"], "end": max(e["end"] for e in mine),
                       "busy_s": round(sum(e["end"] - e["start"] for e in mine), 2), "most_at_once": most,
                       "nodes": sorted({where.get(e["node"], e["node"]) for e in mine}),
                       "pids": len({e["pid"] for e in mine}), "gpus": sorted({",".join(e["gpus"] or []) for e in mine})}
    result: dict[str, Any] = {"steps": steps}
    if "prepare" in steps and "model" in steps:
        fetch_end = steps["prepare"]["end"]
        model = sorted((e for e in entries if e["step"] == "model"), key=lambda e: e["start"])
        gaps = [b["start"] - a["end"] for a, b in zip(model, model[1:]) if b["start"] < fetch_end]
        result.update(model_gaps_while_fetching_s=round(sum(max(0.0, g) for g in gaps), 2),
                      model_longest_gap_s=round(max(gaps, default=0.0), 2),
                      model_after_fetch_s=round(steps["model"]["end"] - fetch_end, 2),
                      model_first_after_fetch_start_s=round(steps["model"]["start"] - steps["prepare"]["start"], 2))
        origin = steps["prepare"]["start"]
        for step in steps.values():
            step["start"], step["end"] = round(step["start"] - origin, 2), round(step["end"] - origin, 2)
    return result


# --------------------------------------------------------------------------- report

KEYS = ("total_s", "cluster_start_s", "execute_s", "ray_connect_s", "after_connect_s", "annotate_s", "gpu_busy_s",
        "gpu_span_s", "gpu_first_s", "gpu_after_last_s", "idle_run", "idle_execute", "idle_annotate", "kept",
        "cpu_s", "other_cpu_s", "wall_s", "requests")


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians of one engine's runs."""
    return {key: statistics.median([r[key] for r in runs]) for key in KEYS}


def quotient(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else ""


def percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def report(result: dict[str, Any]) -> str:
    """Markdown: the setup, the medians of both engines, the ratios and one line per run."""
    runs = result["runs"]
    b, s = summarize(runs["barrier"]), summarize(runs["streaming"])
    n = len(runs["barrier"])
    args = result["args"]
    parts = [f"Images: {result['images']['rows']:,} JPEGs, {result['images']['kb']:.0f} KB in all, "
             f"{MIN_SIDE}-{MAX_SIDE} px a side, each answer {args['delay'] * 1000:.0f} ms late. Work shards of "
             f"{args['rows_per_work_shard']} rows, batch_rows {args['batch_rows']}, fetch threads {args['threads']}, "
             f"workers {args['workers']}, stand-in {args['gpu_seconds'] * 1000:.0f} ms per batch.",
             f"barrier: {result['barrier']}; streaming: {result['streaming']}."]
    lines = [f"| medians of {n} | barrier | streaming | streaming / barrier |", "| --- | ---: | ---: | ---: |",
             f"| **wall time, Ray start included** (cluster start + `execute`), s | {b['total_s']:.1f} | "
             f"{s['total_s']:.1f} | **{quotient(s['total_s'], b['total_s'])}** |",
             f"| of which the 2-node cluster's start, s | {b['cluster_start_s']:.1f} | {s['cluster_start_s']:.1f} | |",
             f"| wall time of `execute`, s | {b['execute_s']:.1f} | {s['execute_s']:.1f} | "
             f"{quotient(s['execute_s'], b['execute_s'])} |",
             f"| of which connecting to the cluster, s | {b['ray_connect_s']:.1f} | {s['ray_connect_s']:.1f} | |",
             f"| **wall time of `execute` after connecting**, s | {b['after_connect_s']:.1f} | "
             f"{s['after_connect_s']:.1f} | **{quotient(s['after_connect_s'], b['after_connect_s'])}** |",
             f"| annotation window (fetch + stand-in), s | {b['annotate_s']:.1f} | {s['annotate_s']:.1f} | "
             f"{quotient(s['annotate_s'], b['annotate_s'])} |",
             f"| stand-in GPU stage busy (sum of its sleeps), s | {b['gpu_busy_s']:.1f} | {s['gpu_busy_s']:.1f} | |",
             f"| its first batch, s after the annotation window opens | {b['gpu_first_s']:.1f} | "
             f"{s['gpu_first_s']:.1f} | |",
             f"| from its first batch to its last, s | {b['gpu_span_s']:.1f} | {s['gpu_span_s']:.1f} | |",
             f"| **GPU stage idle, share of the run** (1 − busy ÷ wall, Ray start included) | "
             f"**{percent(b['idle_run'])}** | **{percent(s['idle_run'])}** | |",
             f"| GPU stage idle, share of `execute` | {percent(b['idle_execute'])} | {percent(s['idle_execute'])} | |",
             f"| GPU stage idle, share of the annotation window | {percent(b['idle_annotate'])} | "
             f"{percent(s['idle_annotate'])} | |",
             f"| CPU time of the run's process tree, s | {b['cpu_s']:.1f} | {s['cpu_s']:.1f} | "
             f"{quotient(s['cpu_s'], b['cpu_s'])} |",
             f"| CPU time of other processes meanwhile, s | {b['other_cpu_s']:.1f} | {s['other_cpu_s']:.1f} | |",
             f"| wall time of the process, s | {b['wall_s']:.1f} | {s['wall_s']:.1f} | "
             f"{quotient(s['wall_s'], b['wall_s'])} |",
             f"| requests to the image server | {b['requests']:,.0f} | {s['requests']:,.0f} | |",
             f"| kept rows | {b['kept']:,.0f} | {s['kept']:,.0f} | |"]
    parts.append("\n".join(lines))
    run_lines = ["| run | total s | cluster start s | execute s | annotation s | GPU busy s | GPU first s | "
                 "idle (run) | idle (annotation) | CPU s | other CPU s | kept | other cores at start (waited s) | "
                 "load before |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted([*(r for group in runs.values() for r in group), *result.get("disturbed", [])],
                    key=lambda r: r["started_at"]):
        label = r["name"] + (" (disturbed: not in the medians)" if r in result.get("disturbed", []) else
                             " (disturbed, last attempt)" if r.get("disturbed") else "")
        run_lines.append(f"| {label} | {r['total_s']:.1f} | {r['cluster_start_s']:.1f} | {r['execute_s']:.1f} | "
                         f"{r['annotate_s']:.1f} | {r['gpu_busy_s']:.1f} | {r['gpu_first_s']:.1f} | "
                         f"{percent(r['idle_run'])} | {percent(r['idle_annotate'])} | {r['cpu_s']:.1f} | "
                         f"{r['other_cpu_s']:.1f} | {r['kept']:,} | {r['other_cores_at_start']} "
                         f"({r['waited_for_quiet_s']}) | {r['load_before']} |")
    parts.append("\n".join(run_lines))
    timeline_lines = ["| streaming run | step | shards | span s (from fetch's start) | busy s | most at once | "
                      "nodes | processes |", "| --- | --- | ---: | --- | ---: | ---: | --- | ---: |"]
    notes = []
    for r in runs["streaming"]:
        t = r.get("timeline")
        if not t:
            continue
        for step, e in t["steps"].items():
            timeline_lines.append(f"| {r['name']} | {step} | {e['shards']} | {e['start']:.1f}–{e['end']:.1f} | "
                                  f"{e['busy_s']:.1f} | {e['most_at_once']} | {', '.join(e['nodes'])} | "
                                  f"{e['pids']} |")
        if "model_gaps_while_fetching_s" in t:
            notes.append(f"{r['name']}: the model step began {t['model_first_after_fetch_start_s']:.1f} s after "
                         f"fetch's first shard, sat {t['model_gaps_while_fetching_s']:.1f} s between shards while "
                         f"fetch still ran (longest gap {t['model_longest_gap_s']:.1f} s), ended "
                         f"{t['model_after_fetch_s']:.1f} s after fetch's last shard")
    parts.append("\n".join(timeline_lines))
    placement = [f"{r['name']}: stand-in batches on the GPU node {r['gpu_on_gpu_node']}, in {r['gpu_pids']} "
                 f"process(es), Ray GPU ids {r['gpu_ids']}" for group in runs.values() for r in group]
    parts.append("\n".join(["- " + line for line in notes + placement]))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="distinct images (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each engine, alternating; medians")
    parser.add_argument("--barrier", default="/tmp/curate-barrier", help="the barrier engine's tree (9fba54d)")
    parser.add_argument("--streaming", default=str(REPO), help="the streaming engine's tree (default: this repo)")
    parser.add_argument("--rows-per-work-shard", type=int, default=100)
    parser.add_argument("--batch-rows", type=int, default=10, help="engine.batch_rows (every stage's batch)")
    parser.add_argument("--threads", type=int, default=16, help="fetch threads per worker")
    parser.add_argument("--workers", type=int, default=2, help="engine.workers (workers per pool)")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds each answer of the server is late")
    parser.add_argument("--gpu-seconds", type=float, default=0.05, help="the stand-in's sleep per batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/curate-bench-streaming")
    parser.add_argument("--quiet-threshold", type=float, default=0.25, metavar="CORES",
                        help="before each run, wait until other processes use at most this many cores (default 0.25)")
    parser.add_argument("--quiet-wait", type=float, default=60.0, metavar="SECONDS",
                        help="...but no longer than this (default 60)")
    parser.add_argument("--retries", type=int, default=2, help="runs a run again (at most this many times) when "
                        "other processes used more than --quiet-threshold cores on average during it (default 2)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per run")
    parser.add_argument("--json", help="also write the raw numbers here (always: WORKDIR/results.json)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    if args.serve:
        serve(args)
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = image_set(args.images, args.seed, workdir)
    trees = {"barrier": Path(args.barrier).resolve(), "streaming": Path(args.streaming).resolve()}
    result: dict[str, Any] = {"images": {"rows": len(rows), "kb": sum(r["bytes"] for r in rows) / 1e3},
                              **{k: f"{v} ({tree_state(v)})" for k, v in trees.items()},
                              "args": vars(args), "load_before": loadavg()}
    print(f"images: {result['images']}; barrier: {result['barrier']}; streaming: {result['streaming']}", flush=True)
    server = DelayedServer(args)
    try:
        urls = write_url_list(workdir / "urls.parquet", server.base_url, rows)
        recipe = write_recipe(workdir / "recipe.yaml", urls, args)
        result["runs"], result["disturbed"] = {"barrier": [], "streaming": []}, []
        for repeat in range(args.repeats):
            order = ("barrier", "streaming") if repeat % 2 == 0 else ("streaming", "barrier")
            for which in order:
                for attempt in range(args.retries + 1):
                    name = f"{which}-{repeat}" + (f"-again{attempt}" if attempt else "")
                    run = run_once(name, trees[which], recipe, args, server)
                    # other processes used more than --quiet-threshold cores on average: run it again
                    run["disturbed"] = run["other_cpu_s"] > args.quiet_threshold * run["wall_s"]
                    if not run["disturbed"] or attempt == args.retries:
                        break
                    result["disturbed"].append(run)
                    print(f"{name} disturbed ({run['other_cpu_s']} s of other CPU): again", flush=True)
                result["runs"][which].append(run)
    finally:
        server.close()
    return finish_results(result, workdir, started, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
