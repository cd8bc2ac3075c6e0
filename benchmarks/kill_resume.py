"""Kill anywhere, resume to the same result: SIGKILL of the whole process tree at random moments.

The demo recipe (fetch, basic filters, tiny CLIP score and aesthetic, exact and perceptual
dedup, Parquet + WebDataset) runs over a synthetic web served on loopback:

1. once uninterrupted: the reference (keys, shard checksums, drop log);
2. per trial: `curate run` in a new session (process group: the CLI, Ray's GCS, raylet and
   every worker), SIGKILL to the whole group after a random delay drawn from the reference
   run's duration, then the same command again until it completes (each re-run may itself be
   killed again with probability `--second-kill`), then compare with the reference: same
   keys, same shard checksums, same drop log checksum, no key twice, input = output + drops.

    .venv/bin/python benchmarks/kill_resume.py --trials 10           # ~6 minutes on 2 cores
    .venv/bin/python benchmarks/kill_resume.py --trials 20 --images 400 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "pipelines" / "demo.yaml"


def command(urls: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "curate.cli", "run", str(DEMO), "--no-progress",
            "--set", f"source.path={urls}", "--set", f"output.path={out}",
            "--set", "engine.rows_per_work_shard=40", "--set", "output.shard_rows=60"]


def run(urls: Path, out: Path, kill_after: float | None, env: dict) -> tuple[str, float]:
    """Run the CLI in its own process group; SIGKILL the group after `kill_after` s. ('done'|'killed'|'failed', s)."""
    started = time.perf_counter()
    process = subprocess.Popen(command(urls, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                               start_new_session=True)
    try:
        process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        _reap_ray(env)
        return "killed", time.perf_counter() - started
    if process.returncode != 0:
        sys.stderr.write(process.stderr.read().decode(errors="replace")[-2000:])
        return "failed", time.perf_counter() - started
    return "done", time.perf_counter() - started


def _reap_ray(env: dict) -> None:
    """Ray daemons the kill orphaned (they leave the process group when they daemonize) are killed too."""
    subprocess.run(["pkill", "-9", "-f", f"ray.*{env['CURATE_KILL_TAG']}"], check=False)
    time.sleep(0.5)


def outcome(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    keys = pq.read_table(out / "parquet", columns=["key"]).column("key").to_pylist()
    drops = pq.read_table(out / "drops.parquet", columns=["key"]).column("key").to_pylist()
    return {
        "keys": sorted(keys),
        "drops": sorted(drops),
        "shards": sorted((s["path"], s["sha256"]) for s in manifest["outputs"]["shards"]),
        "drop_log": manifest["drop_log"]["sha256"],
        "duplicates": len(keys) - len(set(keys)),
        "reconciled": manifest["reconciliation"]["ok"],
        "input_rows": manifest["reconciliation"]["input_rows"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--second-kill", type=float, default=0.3, help="chance that a re-run is killed again")
    parser.add_argument("--json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from curate.demo.server import LoopbackServer
    from curate.demo.web import build_synthetic_web, write_url_list

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="curate-kill-"))
    tag = work.name
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "CURATE_KILL_TAG": tag,
           "RAY_TMPDIR": str(work / "ray")}
    web = build_synthetic_web(n_images=args.images, seed=args.seed)
    results = {"images": args.images, "trials": []}
    with LoopbackServer(web.routes) as server:
        urls = work / "urls.parquet"
        write_url_list(web, server.base_url, urls)
        state, seconds = run(urls, work / "reference", None, env)
        assert state == "done", "the reference run failed"
        reference = outcome(work / "reference")
        results["reference_seconds"] = round(seconds, 1)
        print(f"reference: {len(reference['keys'])} kept, {len(reference['drops'])} dropped, {seconds:.1f} s",
              flush=True)
        for trial in range(args.trials):
            out = work / f"trial{trial}"
            kills, runs = [], 0
            delay = rng.uniform(0.5, seconds)
            state, _ = run(urls, out, delay, env)
            if state == "killed":  # a run may finish before its kill time
                kills.append(round(delay, 2))
            while state != "done":
                if state == "failed":
                    break
                runs += 1
                again = rng.uniform(0.5, seconds) if rng.random() < args.second_kill else None
                state, _ = run(urls, out, again, env)
                if again is not None and state == "killed":
                    kills.append(round(again, 2))
            got = outcome(out) if state == "done" else None
            row = {
                "trial": trial, "kills_at_s": kills, "reruns": runs, "completed": got is not None,
                "same_keys": (got is not None and got["keys"] == reference["keys"]
                              and got["drops"] == reference["drops"]),
                "same_shards": got is not None and got["shards"] == reference["shards"],
                "same_drop_log": got is not None and got["drop_log"] == reference["drop_log"],
                "rows_lost": (None if got is None
                              else reference["input_rows"] - len(set(got["keys"]) | set(got["drops"]))),
                "duplicates": None if got is None else got["duplicates"],
                "reconciled": got is not None and got["reconciled"],
            }
            results["trials"].append(row)
            print(json.dumps(row), flush=True)
    trials = results["trials"]
    results["summary"] = {
        "trials": len(trials),
        "kills": sum(len(t["kills_at_s"]) for t in trials),
        "completed": sum(t["completed"] for t in trials),
        "identical": sum(t["same_keys"] and t["same_shards"] and t["same_drop_log"] for t in trials),
        "rows_lost": sum(t["rows_lost"] or 0 for t in trials),
        "duplicates": sum(t["duplicates"] or 0 for t in trials),
    }
    print(json.dumps(results["summary"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
