"""A stand-in GPU stage for benchmarks/streaming.py: it holds a GPU, sleeps per batch and passes rows through.

It is a curate Stage (curate/stage.py) of the "model" phase that asks for one CPU and one GPU, as a
model stage does, so the engine places its workers on a node that declares a GPU; it runs there on
the CPU. `process(batch)` sleeps `seconds_per_batch` (50 ms by default) and returns the batch as it
is: it provides no column and drops nothing. It reads the image bytes (`reads_images`), as a model
stage does, so the engine hands it the same batches it would hand a model.

With `log_file` set, each batch appends one line to that file: the wall times (time.time()) at the
start and the end of its sleep, its rows, the process, Ray's node id and the GPU ids Ray gave the
worker. The benchmark measures the stage's busy time from these lines in either engine (the earlier
one writes no timeline).

It follows the stage contract of this tree and of 9fba54d (no services). It is not in
curate.registry.STAGES: the benchmark's driver adds it (`standin_gpu: "standin_gpu:StandinGpu"`)
and puts this folder on PYTHONPATH, so Ray's workers import it too.
"""

from __future__ import annotations

import os
import time

import pyarrow as pa
from pydantic import Field

from curate.stage import Params, Resources, Stage

NAME = "standin_gpu"
TARGET = "standin_gpu:StandinGpu"


class StandinGpuParams(Params):
    """How long a batch takes, and where each batch's times go."""

    seconds_per_batch: float = Field(0.05, ge=0)
    log_file: str | None = None  # one line per batch: start end rows pid node gpus


class StandinGpu(Stage):
    """Sleeps `seconds_per_batch` per batch on a GPU worker; passes every row through."""

    name = NAME
    phase = "model"
    Params = StandinGpuParams
    params: StandinGpuParams
    resources = Resources(cpus=1.0, gpus=1.0)
    reads = frozenset({"images"})
    provides = frozenset()
    reads_images = True
    annotation_params = frozenset({"seconds_per_batch", "log_file"})
    speed_params = frozenset({"log_file"})  # where the times go changes no annotation
    selection_params = frozenset()

    def setup(self) -> None:
        self._where = _where()

    def process(self, batch: pa.Table) -> pa.Table:
        if not hasattr(self, "_where"):
            self.setup()
        started = time.time()
        time.sleep(self.params.seconds_per_batch)
        ended = time.time()
        if self.params.log_file:
            with open(self.params.log_file, "a", encoding="utf-8") as handle:
                handle.write(f"{started:.6f} {ended:.6f} {batch.num_rows} {self._where}\n")
        return batch


def _where() -> str:
    """pid, Ray node id and GPU ids of this worker (one field each; '-' outside Ray)."""
    node, gpus = "-", "-"
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
            gpus = ",".join(str(g) for g in ray.get_gpu_ids()) or "-"
    except Exception:  # noqa: BLE001 - the log is informative only
        pass
    return f"{os.getpid()} {node} {gpus}"


def read_log(file: str | os.PathLike) -> list[dict]:
    """The batches of a log file: start, end, rows, pid, node, gpus."""
    batches = []
    try:
        lines = open(file, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        start, end, rows, pid, node, gpus = line.split()
        batches.append({"start": float(start), "end": float(end), "rows": int(rows), "pid": int(pid), "node": node,
                        "gpus": gpus})
    return batches
