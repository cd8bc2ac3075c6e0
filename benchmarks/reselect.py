"""Re-selection and what-if benchmark: a first run, a re-selection of its output and a what-if, same images.

After a first run, running the recipe again on the same output with only selection settings changed
(a threshold, dedup settings, output formats) re-selects from the output's pool: no HTTP request, no
model load, the annotations reused as they stand (curate/engine/reselect.py). `curate run RECIPE
--what-if` computes the funnel of changed settings from the pool's annotations alone and writes
nothing (curate/engine/whatif.py). This benchmark times the three on one machine, each step in its
own subprocess (PYTHONPATH set to this repository, started from the work folder), `--repeats` times:

1. **first run**: a fresh output folder, `execute` from the compiled plan to the manifest (Ray's start
   included, timed apart as in benchmarks/pool.py);
2. **re-selection**: the same recipe on that output with `stages.clip_score.min_score` raised to the
   median clip score; the benchmark checks that it re-selected (`check_output_folder` says "reselect"),
   that the manifest's `pool.annotations[*].computed_rows` and `loads` are all 0 and that the image
   server answered no request meanwhile;
3. **what-if, in process**: `what_if(compile_plan(load_recipe(...)))` with `stages.aesthetic.min_score`
   raised to the median aesthetic score (on top of the first run's settings), in a fresh process
   (the call timed apart from the imports and the compile);
4. **what-if, CLI**: `curate run RECIPE --what-if --set ...` with the same settings, the whole
   subprocess timed (Python's start and imports included); its "would keep N" must equal step 3's.

Once (first repeat), a re-selection with step 3's settings checks the what-if's prediction: its kept
rows must equal what the what-if said (not timed in the tables).

Images and web: benchmarks/pool.py's (`--images` distinct JPEGs made from real COCO photos, 1.5%
exact and 1.5% re-encoded planted copies, 1% URLs that answer 404, served on 127.0.0.1 from a
subprocess that counts every request, robots.txt included). Recipe: pipelines/demo.yaml (fetch,
basic_filter, clip_score and aesthetic on the tiny models, exact and perceptual dedup, watermark;
Parquet + WebDataset), `engine.rows_per_work_shard` 100, with pool.py's calibrated thresholds (one
calibration run of this tree with the filters off, cached in the work folder): basic_filter.min_side
at the 10th percentile of the shortest sides, clip_score and aesthetic at the quantile that keeps
about half the rows, watermark.max_score 1.0 (the tiny watermark head scores most real photos at
1.0). The tiny models' scores mean nothing on real photos; they only make every stage work and drop.

Per step: wall time of the step's work (`execute`, or the `what_if` call), of Ray's start within it,
of the whole subprocess; CPU time of its process tree (benchmarks/measure.py, Ray's daemons included)
and of every other process meanwhile; peak RSS of the tree; requests the server answered; kept rows.
Before each step it waits (at most `--quiet-wait` s) for the rest of the machine to use at most
`--quiet-threshold` cores; a round during one of whose steps they used more (on average) is run again, at
most `--retries` times (the medians leave out the disturbed rounds). Tables show medians; raw numbers:
WORKDIR/results.json (and `--json`).

    .venv/bin/python benchmarks/reselect.py --images 1000 --repeats 5
    .venv/bin/python benchmarks/reselect.py --images 200 --repeats 1     # smoke

Linux (reads /proc).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import TICKS, TreeSampler, busy_ticks, finish_results, loadavg, proc_stat  # noqa: E402
from pool import (  # noqa: E402
    REPO,
    Server,
    calibrate,
    describe_images,
    image_set,
    median,
    recipe_overrides,
    tree_env,
    tree_state,
    wait_for_quiet,
    write_url_list,
)

RECIPE = REPO / "pipelines" / "demo.yaml"
CURATE = Path(sys.executable).parent / "curate"  # the console script of this venv

RUNNER = r"""
import json, os, sys, time
started = time.perf_counter()
mode, tree, recipe, result = sys.argv[1:5]
import curate
where = os.path.realpath(curate.__file__)
assert where.startswith(os.path.realpath(tree) + os.sep), f"curate imported from {where}, not from {tree}"
from rich.console import Console
from curate.engine import cluster
from curate.engine.run import check_output_folder, compile_plan, execute
from curate.engine.whatif import what_if
from curate.recipe import load_recipe
connect, ray_start = cluster.connect, []
def timed_connect(*args, **kwargs):
    began = time.perf_counter()
    try:
        return connect(*args, **kwargs)
    finally:
        ray_start.append(time.perf_counter() - began)
cluster.connect = timed_connect
imported = time.perf_counter()
plan = compile_plan(load_recipe(recipe, sys.argv[5:]), require_weights=mode != "what-if")
compiled = time.perf_counter()
found = {"curate": where, "import_s": imported - started, "compile_s": compiled - imported}
if mode == "what-if":
    funnel = what_if(plan)
    done = time.perf_counter()
    found.update(work_s=done - compiled, kept=funnel["output_rows"], input_rows=funnel["rows"],
                 funnel={s["name"]: [s["rows_in"], s["rows_out"]] for s in funnel["stages"]},
                 current_kept=(funnel["current"] or {}).get("output_rows"))
else:
    state = "fresh" if mode == "first" else check_output_folder(plan, overwrite=False)  # it only reads then
    began = time.perf_counter()
    manifest = execute(plan, Console(stderr=True), overwrite=mode == "first", progress=False, judge=False)
    done = time.perf_counter()
    found.update(state=state, work_s=done - began, kept=manifest["outputs"]["rows"],
                 input_rows=manifest["reconciliation"]["input_rows"],
                 drops_by_reason=manifest["drop_log"]["by_reason"],
                 phase_seconds={p["name"]: p["seconds"] for p in manifest.get("phases", [])},
                 annotations=manifest["pool"]["annotations"])
found.update(ray_start_s=sum(ray_start), process_inner_s=time.perf_counter() - started)
with open(result, "w") as handle:
    json.dump(found, handle)
"""

STEPS = ("first", "reselect", "whatif", "whatif_cli")
STEP_TITLES = {"first": "first run", "reselect": "re-selection", "whatif": "what-if (in process)",
               "whatif_cli": "what-if (CLI)"}


# --------------------------------------------------------------------------- settings

def code_state() -> str:
    """A short digest of the code a run imports (curate/**/*.py, pipelines/*.yaml), taken before each run: the
    tree is shared, and a change between two runs shows in the runs table."""
    digest = hashlib.sha256()
    for path in sorted([*(REPO / "curate").rglob("*.py"), *(REPO / "pipelines").glob("*.yaml")]):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


def settings(args: argparse.Namespace, urls: Path, out: Path, thresholds: dict[str, Any]) -> dict[str, list[str]]:
    """The --set overrides of each step: the first run's (calibrated), the re-selection's (clip_score.min_score
    at the median clip score) and the what-if's (aesthetic.min_score at the median aesthetic score)."""
    base = recipe_overrides("demo", urls, out, args, thresholds)
    quantiles = thresholds["score_quantiles_0_10_50_90_100"]
    clip, aesthetic = quantiles["clip_score"][2], quantiles["aesthetic"][2]

    def changed(key: str, value: float) -> list[str]:
        return [s for s in base if not s.startswith(f"{key}=")] + [f"{key}={value}"]

    return {"first": base, "reselect": changed("stages.clip_score.min_score", clip),
            "whatif": changed("stages.aesthetic.min_score", aesthetic)}


# --------------------------------------------------------------------------- steps

def run_step(name: str, command: list[str], args: argparse.Namespace, server: Server,
             result_file: Path | None) -> dict[str, Any]:
    """Run one step's subprocess from the work folder, following its process tree; wait until the tree is
    gone. Wall time, CPU (the tree's, the server's, everyone else's), peak RSS, the server's requests."""
    workdir = Path(args.workdir)
    log = workdir / f"{name}.log"
    if result_file is not None:
        result_file.unlink(missing_ok=True)
    print(f"\n[{name}] PYTHONPATH={REPO} {shlex.join(short(command))}", flush=True)
    waited, cores = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
    code = code_state()
    requests_before = server.requests()
    load_before, started_at = loadavg(), time.time()
    busy, served, own = busy_ticks(), proc_stat(server.process.pid)[2], sum(os.times()[:2])
    with log.open("wb") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=tree_env(REPO), cwd=workdir, start_new_session=True)
        sampler = TreeSampler(process.pid, interval=0.2, pss_every=10**9)  # RSS and CPU; PSS once
        sampler.start()
        try:
            exit_code = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # only this step's process group
            exit_code = process.wait()
        wall = time.perf_counter() - started
        deadline = time.monotonic() + 30  # Ray's daemons stop after the driver exits
        while sampler.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        lingering = sampler.alive()
        sampler.stop()
    for pid in lingering:  # only processes of this step's tree, by pid
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    cpu, machine = sampler.cpu_seconds(), (busy_ticks() - busy) / TICKS
    server_cpu = (proc_stat(server.process.pid)[2] - served) / TICKS
    bench_cpu = sum(os.times()[:2]) - own
    run = {"name": name, "exit_code": exit_code, "process_s": round(wall, 2), "cpu_s": round(cpu, 1),
           "server_cpu_s": round(server_cpu, 1),
           "other_cpu_s": round(max(0.0, machine - cpu - server_cpu - bench_cpu), 1),
           "peak_rss_mib": round(sampler.peak_rss / 2**20), "lingering_pids": lingering,
           "requests": server.requests() - requests_before, "waited_for_quiet_s": waited,
           "other_cores_at_start": cores, "load_before": load_before, "started_at": started_at, "log": str(log),
           "code": code}
    if exit_code != 0 or (result_file is not None and not result_file.exists()):
        raise RuntimeError(f"{name} failed (exit {exit_code}); log {log}:\n{log.read_text(errors='replace')[-4000:]}")
    if result_file is not None:
        run.update(json.loads(result_file.read_text()))
        for key in ("work_s", "ray_start_s", "import_s", "compile_s", "process_inner_s"):
            run[key] = round(run[key], 3)
        run["after_ray_start_s"] = round(run["work_s"] - run["ray_start_s"], 3)
    return run


def short(command: list[str]) -> list[str]:
    """The command as printed: the runner's code as RUNNER, the interpreter by name."""
    shown = [Path(command[0]).name, *command[1:]]
    if "-c" in shown:
        shown[shown.index("-c") + 1] = "RUNNER"
    return shown


def runner(name: str, mode: str, overrides: list[str], args: argparse.Namespace, server: Server) -> dict[str, Any]:
    """A step run by RUNNER (first run, re-selection or in-process what-if)."""
    result_file = Path(args.workdir) / f"{name}.result.json"
    command = [sys.executable, "-c", RUNNER, mode, str(REPO), str(RECIPE), str(result_file), *overrides]
    return run_step(name, command, args, server, result_file)


def cli_what_if(name: str, overrides: list[str], args: argparse.Namespace, server: Server) -> dict[str, Any]:
    """`curate run RECIPE --what-if --set ...` as a user types it; the kept rows read from its last lines."""
    command = [str(CURATE), "run", str(RECIPE), "--what-if", *[part for s in overrides for part in ("--set", s)]]
    run = run_step(name, command, args, server, None)
    text = Path(run["log"]).read_text(errors="replace")
    found = re.search(r"would keep\s+([\d,]+)\s+of\s+([\d,]+) rows", text)
    if found is None:
        raise RuntimeError(f"{name}: no 'would keep N of M rows' in {run['log']}:\n{text[-3000:]}")
    run.update(kept=int(found.group(1).replace(",", "")), input_rows=int(found.group(2).replace(",", "")))
    run["work_s"] = run["process_s"]
    return run


def check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"check failed: {message}")


def one_repeat(repeat: int, args: argparse.Namespace, server: Server, sets: dict[str, list[str]],
               out: Path, attempt: int = 0) -> dict[str, Any]:
    """First run, re-selection, what-if in process and as the CLI, on one fresh output folder."""
    shutil.rmtree(out, ignore_errors=True)
    repeat = f"{repeat}-again{attempt}" if attempt else repeat
    runs = {"first": runner(f"first-{repeat}", "first", sets["first"], args, server)}
    check(runs["first"]["requests"] > 0, "the first run made no request")
    reselect = runs["reselect"] = runner(f"reselect-{repeat}", "reselect", sets["reselect"], args, server)
    check(reselect["state"] == "reselect", f"the second run did not re-select ({reselect['state']})")
    computed = {name: (entry.get("computed_rows", 0), entry.get("loads", 0))
                for name, entry in reselect["annotations"].items()}
    reselect["computed_rows_and_loads"] = computed
    check(all(rows == 0 and loads == 0 for rows, loads in computed.values()),
          f"the re-selection computed rows or loaded models: {computed}")
    check(reselect["requests"] == 0, f"the re-selection made {reselect['requests']} requests")
    runs["whatif"] = runner(f"whatif-{repeat}", "what-if", sets["whatif"], args, server)
    runs["whatif_cli"] = cli_what_if(f"whatif-cli-{repeat}", sets["whatif"], args, server)
    for step in ("whatif", "whatif_cli"):
        check(runs[step]["requests"] == 0, f"{step} made {runs[step]['requests']} requests")
    check(runs["whatif"]["kept"] == runs["whatif_cli"]["kept"],
          f"what-if in process kept {runs['whatif']['kept']}, the CLI {runs['whatif_cli']['kept']}")
    check(runs["whatif"]["current_kept"] == reselect["kept"], "the what-if's current output is not the re-selection's")
    if str(repeat).startswith("0"):  # the what-if's prediction against a re-selection with its settings (untimed)
        truth = runner("whatif-check", "reselect", sets["whatif"], args, server)
        check(truth["kept"] == runs["whatif"]["kept"],
              f"the what-if said {runs['whatif']['kept']} kept, a re-selection kept {truth['kept']}")
        check(truth["requests"] == 0, "the check's re-selection made requests")
        runs["whatif_check"] = {k: truth[k] for k in ("kept", "work_s", "requests", "state")}
    print(json.dumps({step: {k: runs[step].get(k) for k in ("work_s", "ray_start_s", "process_s", "kept", "requests")}
                      for step in STEPS}), flush=True)
    return runs


# --------------------------------------------------------------------------- report

def step_summary(runs: list[dict[str, Any]], step: str) -> dict[str, float]:
    """Medians of one step over the repeats."""
    keys = ("work_s", "ray_start_s", "after_ray_start_s", "import_s", "compile_s", "process_s", "cpu_s",
            "other_cpu_s", "peak_rss_mib", "kept", "requests")
    return {key: median([r[step][key] for r in runs if key in r[step]]) for key in keys}


def quotient(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b == b and b else ""


def cell(value: float, digits: int = 1) -> str:
    return "" if value != value else f"{value:,.{digits}f}"


def report(result: dict[str, Any]) -> str:
    runs = result["runs"]
    s = {step: step_summary(runs, step) for step in STEPS}
    first, reselect, whatif, cli = (s[step] for step in STEPS)
    thresholds, sets = result["thresholds"], result["settings"]
    images = result["images"]
    parts = [
        f"Images: {images['rows']:,} URL rows {images['by_kind']}; {images['served_mb']} MB served; longest side "
        f"min/median/max {images['longest_side_min_median_max']} px.",
        f"First run: basic_filter.min_side={thresholds['min_side']}, clip_score.min_score={thresholds['clip_score']}, "
        f"aesthetic.min_score={thresholds['aesthetic']}, watermark.max_score={thresholds['watermark']} (calibrated). "
        f"Re-selection: `{sets['reselect'][-1]}`. What-if: `{sets['whatif'][-1]}`.",
        f"Tree: {result['tree']}; work shards of {result['args']['rows_per_work_shard']} rows."]
    n = len(runs)
    header = (f"| demo.yaml, {images['rows']:,} rows (medians of {n}) | first run | re-selection | "
              "what-if (in process) | what-if (CLI) |")
    lines = [header, "| --- | ---: | ---: | ---: | ---: |",
             f"| wall time of the work (`execute`; the `what_if` call; the CLI process), s | {cell(first['work_s'])} | "
             f"{cell(reselect['work_s'])} | {cell(whatif['work_s'], 2)} | {cell(cli['work_s'], 2)} |",
             f"| of which Ray's start, s | {cell(first['ray_start_s'])} | {cell(reselect['ray_start_s'])} | "
             f"{cell(whatif['ray_start_s'])} | |",
             f"| work after Ray's start, s | {cell(first['after_ray_start_s'])} | "
             f"{cell(reselect['after_ray_start_s'])} | {cell(whatif['after_ray_start_s'], 2)} | |",
             f"| imports, then compile_plan, s | {cell(first['import_s'])}, {cell(first['compile_s'])} | "
             f"{cell(reselect['import_s'])}, {cell(reselect['compile_s'])} | "
             f"{cell(whatif['import_s'])}, {cell(whatif['compile_s'])} | |",
             f"| wall time of the process, s | {cell(first['process_s'])} | {cell(reselect['process_s'])} | "
             f"{cell(whatif['process_s'])} | {cell(cli['process_s'])} |",
             f"| CPU time of its process tree, s | {cell(first['cpu_s'])} | {cell(reselect['cpu_s'])} | "
             f"{cell(whatif['cpu_s'])} | {cell(cli['cpu_s'])} |",
             f"| CPU time of other processes meanwhile, s | {cell(first['other_cpu_s'])} | "
             f"{cell(reselect['other_cpu_s'])} | {cell(whatif['other_cpu_s'])} | {cell(cli['other_cpu_s'])} |",
             f"| peak RSS of the process tree, MiB | {cell(first['peak_rss_mib'], 0)} | "
             f"{cell(reselect['peak_rss_mib'], 0)} | {cell(whatif['peak_rss_mib'], 0)} | "
             f"{cell(cli['peak_rss_mib'], 0)} |",
             f"| requests to the image server | {cell(first['requests'], 0)} | {cell(reselect['requests'], 0)} | "
             f"{cell(whatif['requests'], 0)} | {cell(cli['requests'], 0)} |",
             f"| kept rows | {cell(first['kept'], 0)} | {cell(reselect['kept'], 0)} | {cell(whatif['kept'], 0)} | "
             f"{cell(cli['kept'], 0)} |"]
    parts.append("\n".join(lines))
    ratios = [
        "| ratio (of the medians) | value | goal |", "| --- | ---: | --- |",
        f"| **re-selection ÷ first run**, `execute` | **{quotient(reselect['work_s'], first['work_s'])}** | ≤ 0.25 |",
        f"| re-selection ÷ first run, after Ray's start | "
        f"{quotient(reselect['after_ray_start_s'], first['after_ray_start_s'])} | |",
        f"| re-selection ÷ first run, whole process | {quotient(reselect['process_s'], first['process_s'])} | |",
        f"| **what-if (in process, the call) ÷ first run** `execute` | "
        f"**{quotient(whatif['work_s'], first['work_s'])}** | |",
        f"| what-if (in process, compile + call) ÷ first run `execute` | "
        f"{quotient(whatif['work_s'] + whatif['compile_s'], first['work_s'])} | |",
        f"| **what-if (CLI process) ÷ first run** `execute` | **{quotient(cli['work_s'], first['work_s'])}** | |",
        f"| what-if (CLI process) ÷ first run, whole process | {quotient(cli['process_s'], first['process_s'])} | |"]
    parts.append("\n".join(ratios))
    phases = sorted({p for r in runs for step in ("first", "reselect") for p in r[step].get("phase_seconds", {})},
                    key=lambda p: list(runs[0]["first"].get("phase_seconds", {})).index(p)
                    if p in runs[0]["first"].get("phase_seconds", {}) else 99)
    phase_lines = ["| phase (manifest, medians), s | first run | re-selection |", "| --- | ---: | ---: |"]
    for phase in phases:
        values = [median([r[step]["phase_seconds"].get(phase, 0.0) for r in runs]) for step in ("first", "reselect")]
        phase_lines.append(f"| {phase} | {values[0]:.2f} | {values[1]:.2f} |")
    parts.append("\n".join(phase_lines))
    run_lines = ["| run | work s | Ray start s | process s | CPU s | other CPU s | peak RSS MiB | requests | kept | "
                 "other cores at start (waited s) | load before | code |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for repeat in sorted(runs + result.get("disturbed", []), key=lambda rounds: rounds["first"]["started_at"]):
        for step in STEPS:
            r = dict(repeat[step])
            if repeat in result.get("disturbed", []):
                r["name"] += " (round disturbed: not in the medians)"
            elif step in repeat.get("disturbed_steps", []):
                r["name"] += " (disturbed, last attempt)"
            run_lines.append(f"| {r['name']} | {r['work_s']:.2f} | {r.get('ray_start_s', float('nan')):.1f} | "
                             f"{r['process_s']:.2f} | {r['cpu_s']:.1f} | {r['other_cpu_s']:.1f} | "
                             f"{r['peak_rss_mib']} | "
                             f"{r['requests']} | {r['kept']:,} | {r['other_cores_at_start']} "
                             f"({r['waited_for_quiet_s']}) | {r['load_before']} | {r.get('code', '')} |")
    parts.append("\n".join(run_lines))
    checked = runs[0].get("whatif_check")
    if checked:
        parts.append(f"Check: a re-selection with the what-if's settings kept {checked['kept']:,} rows "
                     f"(the what-if said {runs[0]['whatif']['kept']:,}), with {checked['requests']} requests.")
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="distinct images; 4%% more rows are planted copies "
                        "and 404s (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the four steps; medians (default 3)")
    parser.add_argument("--rows-per-work-shard", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/curate-bench-reselect")
    parser.add_argument("--quiet-threshold", type=float, default=0.25, metavar="CORES",
                        help="before each step, wait until other processes use at most this many cores (default 0.25)")
    parser.add_argument("--quiet-wait", type=float, default=60.0, metavar="SECONDS",
                        help="...but no longer than this (default 60)")
    parser.add_argument("--poll", type=float, default=0.15, help="the calibration run's folder polls (pool.py), s")
    parser.add_argument("--retries", type=int, default=2, help="runs a round again (at most this many times) when "
                        "other processes used more than --quiet-threshold cores on average during a step (default 2)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per step")
    parser.add_argument("--json", help="also write the raw numbers here (always: WORKDIR/results.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.old = str(REPO)  # pool.calibrate runs "the old tree": here the tree under test
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = image_set(args.images, args.seed, workdir)
    result: dict[str, Any] = {"images": describe_images(rows), "tree": f"{REPO} ({tree_state(REPO)})",
                              "args": vars(args), "load_before": loadavg()}
    print(f"images: {result['images']}", flush=True)
    server = Server(args)  # pool.py --serve, with this work folder
    try:
        urls = write_url_list(workdir / "urls.parquet", server.base_url, rows)
        result["thresholds"] = calibrate(args, urls, len(rows), server.process.pid)
        out = workdir / "out"
        result["settings"] = settings(args, urls, out, result["thresholds"])
        print(f"settings: {json.dumps(result['settings'])}", flush=True)
        result["runs"], result["disturbed"] = [], []
        for repeat in range(args.repeats):
            for attempt in range(args.retries + 1):
                runs = one_repeat(repeat, args, server, result["settings"], out, attempt)
                # other processes used more than --quiet-threshold cores on average during a step: run the round again
                busy = [step for step in STEPS if runs[step]["other_cpu_s"] > args.quiet_threshold * runs[step][
                    "process_s"]]
                runs["disturbed_steps"] = busy
                if not busy or attempt == args.retries:
                    break
                result["disturbed"].append(runs)
                print(f"round {repeat} disturbed ({', '.join(busy)}): again", flush=True)
            result["runs"].append(runs)
    finally:
        server.close()
    return finish_results(result, workdir, started, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
