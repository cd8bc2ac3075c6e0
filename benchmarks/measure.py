"""Measuring a command's whole process tree from /proc: peak RSS and PSS, CPU time, the machine's load.

`TreeSampler` follows every descendant of a root process (also once it is re-parented, as
Ray's daemons are) and keeps the peak of the summed RSS and PSS; `run_measured` runs a
command under it and waits until every process of its tree is gone. Linux only.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, starttime, utime+stime ticks) of `pid`, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12])


def process_label(pid: int) -> str:
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


def busy_ticks() -> int:
    """CPU ticks the whole machine spent busy since boot (all CPUs)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size of `pid`: its private pages plus its share of pages it maps with others."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class TreeSampler(threading.Thread):
    """Samples the process tree under `root` every `interval` seconds.

    A process once seen in the tree stays tracked (by pid and start time) even if it
    is re-parented, e.g. a Ray process whose parent exited. RSS is summed every
    sample; PSS (which splits shared pages, e.g. Ray's object store and shared
    libraries, between the processes that map them) every `pss_every` samples.
    `last_rss` / `last_pss` hold the most recent sums, for reading the tree at a moment.
    """

    def __init__(self, root: int, interval: float = 0.2, pss_every: int = 5):
        super().__init__(daemon=True)
        self.root, self.interval, self.pss_every = root, interval, pss_every
        self.tracked: dict[tuple[int, int], int] = {}  # (pid, start) -> last cpu ticks
        self.labels: dict[tuple[int, int], str] = {}  # (pid, start) -> what the process is
        self.peak_rss = self.peak_pss = self.peak_procs = 0
        self.last_rss = self.last_pss = 0
        self.peak_rss_by_label: dict[str, int] = {}  # label -> peak of the summed RSS of its processes
        self.pss_at_peak: dict[str, int] = {}  # label -> summed PSS of its processes when the tree's PSS peaked
        self.peak_pss_at = 0.0  # seconds after the start
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
        """Take a last sample and stop."""
        self._halt.set()
        self.join()

    def sample(self) -> None:
        """Sum the RSS (and every `pss_every` samples the PSS) of the tree as it is now."""
        stats: dict[int, tuple[int, int, int]] = {}
        children: dict[int, list[int]] = collections.defaultdict(list)
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = proc_stat(int(name))
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
        by_label: collections.Counter = collections.Counter()
        for pid in tree:
            key = (pid, stats[pid][1])
            self.tracked[key] = stats[pid][2]
            label = process_label(pid)  # re-read: Ray workers retitle themselves after start
            if label != "?" or key not in self.labels:
                self.labels[key] = label
            resident = rss_bytes(pid)
            rss += resident
            by_label[self.labels[key]] += resident
        for label, resident in by_label.items():
            self.peak_rss_by_label[label] = max(self.peak_rss_by_label.get(label, 0), resident)
        self.samples += 1
        self.last_rss = rss
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(tree))
        self.timeline.append((round(time.perf_counter() - self._t0, 2), rss))
        if (self.samples - 1) % self.pss_every == 0:
            pss_by_label: collections.Counter = collections.Counter()
            for pid in tree:
                pss_by_label[self.labels[(pid, stats[pid][1])]] += pss_bytes(pid)
            self.last_pss = sum(pss_by_label.values())
            if self.last_pss > self.peak_pss:
                self.peak_pss, self.pss_at_peak = self.last_pss, dict(pss_by_label)
                self.peak_pss_at = round(time.perf_counter() - self._t0, 1)

    def alive(self) -> list[int]:
        """The tracked processes that still run."""
        out = []
        for (pid, start) in self.tracked:
            st = proc_stat(pid)
            if st is not None and st[1] == start:
                out.append(pid)
        return out

    def cpu_seconds(self) -> float:
        """CPU time of every process seen in the tree."""
        return sum(self.tracked.values()) / TICKS

    def cpu_by_label(self) -> dict[str, float]:
        """CPU seconds by process label, largest first."""
        totals: collections.Counter = collections.Counter()
        for key, ticks in self.tracked.items():
            totals[self.labels.get(key, "?")] += ticks / TICKS
        return {label: round(seconds, 1) for label, seconds in totals.most_common()}


def run_measured(name: str, command: list[str], env: dict[str, str], log: Path, timeout: float,
                 cwd: Path | None = None, interval: float = 0.2, pss_every: int = 5) -> dict[str, Any]:
    """Run `command`, sampling its process tree; wait until every process of the tree is gone.

    Returns wall time, peak RSS/PSS of the tree (MiB), its CPU time (also by process), the
    machine's busy CPU time over the same interval and the load average before and after.
    """
    load_before = loadavg()
    busy_before, own_before = busy_ticks(), sum(os.times()[:2])
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
        sampler = TreeSampler(proc.pid, interval=interval, pss_every=pss_every)
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
    machine_cpu = (busy_ticks() - busy_before) / TICKS
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
        "peak_rss_mib_by_process": {label: round(value / 2**20) for label, value in
                                    sorted(sampler.peak_rss_by_label.items(), key=lambda item: -item[1])},
        "pss_mib_by_process_at_peak": {label: round(value / 2**20) for label, value in
                                       sorted(sampler.pss_at_peak.items(), key=lambda item: -item[1])},
        "peak_pss_at_s": sampler.peak_pss_at,
        "bench_cpu_s": round(own_cpu, 1),
        "samples": sampler.samples, "load_before": load_before, "load_after": loadavg(), "log": str(log),
    }


def finish_results(result: dict[str, Any], workdir: Path, started: float, report: Any,
                   json_path: str | None = None) -> int:
    """End a benchmark: record the machine, the load after and the time taken in `result`, print
    `report(result)`, and write the raw numbers to WORKDIR/results.json (and `json_path`). Returns 0."""
    import json
    import platform

    result.update(machine=f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
                          f"Python {platform.python_version()}",
                  load_after=loadavg(), seconds=round(time.perf_counter() - started))
    result["report"] = report(result)
    print("\n" + result["report"])
    print(f"\nmachine: {result['machine']}; load average before {result['load_before']}, after "
          f"{result['load_after']}; {result['seconds']} s in all")
    text = json.dumps(result, indent=1, default=str)
    (workdir / "results.json").write_text(text)
    if json_path:
        Path(json_path).write_text(text)
    print(f"raw numbers: {workdir / 'results.json'}")
    return 0
