"""Connecting to Ray (local by default, a cluster by address) and sizing work to it."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from typing import Iterator

import ray


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers a phase runs and what each asks for."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float = 0.0
    memory_per_worker: int = 0  # bytes Ray reserves per worker; 0 = no reservation


def connect(address: str | None = None, verbose: bool = False) -> dict[str, float]:
    """Start or join Ray; return the cluster's total resources.

    `address` (or RAY_ADDRESS) joins a cluster; otherwise a local Ray starts on
    this machine. Ray's own logs stay quiet unless `verbose`.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        with _keeping_signal_handlers():
            ray.init(
                # "local": a new Ray on this machine, never whichever cluster /tmp/ray last recorded
                address=address or os.environ.get("RAY_ADDRESS") or "local",
                include_dashboard=False,
                log_to_driver=verbose,
                logging_level=logging.INFO if verbose else logging.ERROR,
                configure_logging=True,
            )
    return dict(ray.cluster_resources())


@contextlib.contextmanager
def _keeping_signal_handlers() -> Iterator[None]:
    """ray.init replaces the SIGINT/SIGTERM handlers (SIGTERM: a native handler that aborts with a stack dump);
    put back the program's own, so that an interrupted command unwinds and says so."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in saved.items():
            if handler is not None:
                signal.signal(number, handler)


def plan_workers(resources: dict[str, float], requested: int | str, shards: int,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, memory_per_worker: int = 0) -> WorkerPlan:
    """Size a worker pool from the cluster's resources.

    Asks for fractional CPUs so that the pool never takes every CPU: Ray's own
    tasks and the driver keep a share, and the pool cannot starve them (a pool
    of N x 1 CPU on an N-CPU machine can hang).
    """
    cpus = max(resources.get("CPU", 1.0), 0.1)
    if requested == "auto":
        workers = max(1, math.floor(cpus / cpus_per_worker))
    else:
        workers = int(requested)
    if gpus_per_worker:
        workers = min(workers, max(1, math.floor(resources.get("GPU", 0) / gpus_per_worker)))
    if memory_per_worker:
        workers = min(workers, max(1, math.floor(resources.get("memory", 0) / memory_per_worker)))
    workers = max(1, min(workers, shards))
    share = min(cpus_per_worker, cpus * 0.8 / workers)
    return WorkerPlan(workers=workers, cpus_per_worker=round(max(share, 0.05), 3), gpus_per_worker=gpus_per_worker,
                      memory_per_worker=memory_per_worker)


@dataclass(frozen=True)
class Demand:
    """What one pool of a streamed run asks for: per worker (CPUs, GPUs, memory), and how many work shards it
    may get (0: none, so no pool)."""

    cpus: float
    gpus: float = 0.0
    memory: int = 0
    shards: int = 1


def plan_pools(resources: dict[str, float], requested: int | str, demands: list[Demand]) -> list[WorkerPlan]:
    """Size pools that run side by side (a streamed run), one per demand.

    Together they ask for at most 80% of the cluster's CPUs, shared in proportion to the CPUs a worker of each
    declares. A pool that asks for GPUs, when the cluster has them, gets one worker per GPU share it asks for
    ("auto"), placed on the GPU nodes. The CPU pools split the cluster's CPUs between them: with "auto", each
    gets as many workers as its part holds whole declared CPUs (at least one). A number asks for that many
    workers per pool. Each worker then asks for its share of its pool's CPUs.
    """
    cpus = max(resources.get("CPU", 1.0), 0.1)
    gpus = resources.get("GPU", 0.0)
    live = [d for d in demands if d.shards > 0]
    total = sum(max(d.cpus, 0.05) for d in live) or 1.0
    cpu_pools = sum(1 for d in live if not d.gpus) or 1
    plans = []
    for demand in demands:
        if demand.shards <= 0:
            plans.append(WorkerPlan(0, 0.0))
            continue
        declared = max(demand.cpus, 0.05)
        share = cpus * 0.8 * declared / total
        if requested != "auto":
            workers = int(requested)
        elif demand.gpus:
            workers = math.floor(gpus / demand.gpus)
        else:
            workers = math.floor(cpus / cpu_pools / declared + 1e-9)
        if demand.gpus:
            workers = min(workers, math.floor(gpus / demand.gpus))
        if demand.memory:
            workers = min(workers, math.floor(resources.get("memory", 0) / demand.memory))
        workers = max(1, min(workers, demand.shards))
        plans.append(WorkerPlan(workers=workers, cpus_per_worker=round(max(min(declared, share / workers), 0.05), 3),
                                gpus_per_worker=demand.gpus, memory_per_worker=demand.memory))
    return plans


def faiss_backend() -> str:
    """Which FAISS is installed: 'gpu' (faiss-gpu with a visible GPU), 'cpu', or 'missing'.

    faiss-cpu and faiss-gpu install the same `faiss` module, so this is decided at run time.
    """
    try:
        import faiss
    except ImportError:
        return "missing"
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return "gpu" if get_num_gpus is not None and get_num_gpus() > 0 else "cpu"


def this_process() -> dict[str, float]:
    """The resources of this machine, for a step that runs in this process without Ray (a re-selection)."""
    return {"CPU": float(os.cpu_count() or 1)}


def device_summary(resources: dict[str, float]) -> dict[str, object]:
    """What the manifest records about where the run executed."""
    return {
        "cpus": resources.get("CPU", 0.0),
        "gpus": resources.get("GPU", 0.0),
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]) if ray.is_initialized() else 1,
        "accelerator": "gpu" if resources.get("GPU", 0.0) > 0 else "cpu",
        "ray": ray.is_initialized(),
        "faiss": faiss_backend(),
    }
