"""What-if at scale: `what_if` over a synthetic pool of 100,000 and 1,000,000 rows, in process and as the CLI.

`curate run RECIPE --what-if` (curate/engine/whatif.py) computes the funnel of a recipe's settings from
its output's pool alone. Running the engine for a million URLs is out of reach on a small machine, so
this benchmark writes the pool directly, in the engine's format, for a LAION-like recipe (written to
the work folder as recipe.yaml: a url_list source; fetch with a 512 px resize, basic_filter as a gate,
language, clip_score and aesthetic on the tiny models, dedup_exact; Parquet output):

- the URL list: `--rows` synthetic rows (url, caption; captions of 0-30 words drawn from the COCO
  captions' vocabulary of /work/shared/data/real/captioned-images, 2% empty, 3% of one word);
- the input split: written by the engine's own `split_source` over that list (the url_list source
  makes the keys, sources and segments), `engine.rows_per_work_shard` 1,000 (the default), and the
  pool record (`pool.json`) of the compiled plan;
- one annotation table and completion marker per stage and work shard, with the fingerprints
  `compile_plan(...).fingerprints` gives, `_annotated` where the stage would have computed the row,
  and the markers' digests of the live rows computed as the annotation worker does:
  - fetch: 8% hard drops (http_404 4%, connection_error 1.5%, timeout 1%, dns_error 1%, http_403
    0.5%); `images` one placeholder per row with null bytes (no image bytes anywhere); `image_meta`
    with original sizes from a log-normal (median about 600 x 450, aspect ratios 0.4-2.5), sizes after
    the 512 px resize, JPEG/PNG/WEBP, byte counts, and sha256 / pixel_sha256 / phash of which 2% copy
    those of an earlier row (exact duplicates);
  - basic_filter: `meta.basic` computed by the stage's own `annotate`, its gate verdict by its own
    `select` (the recipe's limits), as the worker does;
  - language (on the rows the gate let through): `meta.language` written by the stage's own
    `with_language`: 62% en (confidence Beta(8, 2)), 33% one of 12 other codes, 3% no language, 2% not
    judged;
  - clip_score: `scores.clip_score` from N(0.28, 0.05), `embeddings` of the tiny model (its model name
    and dimension as the probe's table has them), random unit vectors in float16;
  - aesthetic: `scores.aesthetic` from N(5.0, 0.9), with clip_score's score.

Before anything is timed, a probe checks the format: the real engine runs the same recipe on 20 of
benchmarks/pool.py's images (plus a 404, an empty caption and a one-word caption) served on
127.0.0.1; then the table writer of this benchmark rewrites that pool's tables from the probe's own
values (its fetch results, languages, scores and embeddings) and every table must equal the engine's
(image bytes aside) and every marker too (seconds aside). The probe also runs the what-if on its pool
(real image bytes) with pyarrow's Parquet reads traced, and fails if any read asks for the `images`
column or for every column of a file holding image bytes.

Timed: `what_if(compile_plan(load_recipe(...)))` with `stages.clip_score.min_score` changed (0.25 ->
0.28), in a fresh process (imports, compile and the call timed apart), and `curate run RECIPE
--what-if --set ...` as a subprocess (all included), `--repeats` times each, alternating; peak RSS of
the process tree (benchmarks/measure.py, every 0.2 s) and the process's own peak (VmHWM); bytes read
(/proc/PID/io rchar). Before each run it waits (at most `--quiet-wait` s) for the rest of the machine to
use at most `--quiet-threshold` cores, and a run during which they used more (on average) is run again,
at most `--retries` times (the medians leave out the disturbed attempts). With `--profile`, one more
in-process run under `python -m cProfile` per size, and its top functions in the report. Raw numbers:
WORKDIR/results.json.

    .venv/bin/python benchmarks/whatif_scale.py --rows 100000,1000000 --repeats 3 --profile
    .venv/bin/python benchmarks/whatif_scale.py --rows 10000 --repeats 1                        # smoke

The synthetic pools are cached in the work folder (pool-n<rows>-w<rows per shard>-seed<seed>/).
Linux (reads /proc).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import pstats
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import TICKS, TreeSampler, busy_ticks, finish_results, loadavg  # noqa: E402
from pool import REPO, Server, image_set, median, tree_env, tree_state, wait_for_quiet  # noqa: E402
from reselect import code_state  # noqa: E402

sys.path.insert(0, str(REPO))
CURATE = Path(sys.executable).parent / "curate"  # the console script of this venv
FORMAT_VERSION = 2  # bump when the synthetic pool changes: the cache is keyed by it (2: markers' counters)

RECIPE = """\
name: whatif-scale
description: A LAION-like recipe over a URL list, for benchmarks/whatif_scale.py (its pool is synthetic).
source:
  type: url_list
  path: urls.parquet
  url_column: url
  caption_column: caption
stages:
  fetch:
    threads: 64
    retries: 2
    resize: {mode: keep_ratio, side: longest, size: 512, only_if_bigger: true}
    encode: {format: jpg, quality: 90}
  basic_filter:
    min_side: 128
    max_aspect_ratio: 3
    min_caption_words: 2
  language:
    languages: [en]
    min_confidence: 0.5
  clip_score:
    model: {model: curate-tiny}
    min_score: 0.25
  aesthetic:
    clip: {model: curate-tiny}
    head: {head: tiny}
    min_score: 4.5
  dedup_exact: {}
gates: [basic_filter]
output:
  path: out
  formats: [parquet]
engine:
  rows_per_work_shard: 1000
"""
CHANGE = "stages.clip_score.min_score=0.28"  # the what-if's changed threshold (the recipe's is 0.25)
PROBE_SETS = ["stages.fetch.allow_private_addresses=true", "stages.fetch.host_rate=null",
              "engine.rows_per_work_shard=10", "engine.batch_rows=4"]  # batches of 4: digests over several batches

FETCH_FAILURES = [  # reason, detail, share of all rows
    ("http_404", "HTTP 404", 0.04),
    ("connection_error", "connection failed: [Errno 111] Connection refused after 3 attempts", 0.015),
    ("timeout", "timeout: read timed out (20.0 s) after 3 attempts", 0.01),
    ("dns_error", "cannot resolve host: [Errno -2] Name or service not known", 0.01),
    ("http_403", "HTTP 403", 0.005),
]
DUPLICATE_SHARE = 0.02
LANGUAGES = ["de", "fr", "es", "it", "pt", "nl", "ru", "ja", "zh", "pl", "sv", "tr"]
ORIGINAL_FORMATS = [("JPEG", "RGB", 0.85), ("PNG", "RGBA", 0.05), ("PNG", "RGB", 0.05), ("WEBP", "RGB", 0.05)]
STAGES = ("fetch", "basic_filter", "language", "clip_score", "aesthetic")

RUNNER = r"""
import json, sys, time
started = time.perf_counter()
recipe, result = sys.argv[1:3]
from curate.engine.run import compile_plan
from curate.engine.whatif import what_if
from curate.recipe import load_recipe
imported = time.perf_counter()
plan = compile_plan(load_recipe(recipe, sys.argv[3:]), require_weights=False)
compiled = time.perf_counter()
found = what_if(plan)
done = time.perf_counter()
with open("/proc/self/io") as handle:
    io = dict(line.split(": ") for line in handle.read().splitlines())
with open("/proc/self/status") as handle:  # VmHWM: this process's peak RSS (ru_maxrss may hold the parent's: vfork)
    status = dict(line.split(":", 1) for line in handle.read().splitlines() if ":" in line)
with open(result, "w") as handle:
    json.dump({"import_s": imported - started, "compile_s": compiled - imported, "work_s": done - compiled,
               "reported_s": found["seconds"], "kept": found["output_rows"], "input_rows": found["rows"],
               "funnel": {s["name"]: [s["rows_in"], s["rows_out"], s["dropped"]] for s in found["stages"]},
               "vm_hwm_mib": int(status["VmHWM"].split()[0]) / 1024,
               "read_mb": int(io["rchar"]) / 1e6}, handle)
"""


# --------------------------------------------------------------------------- the recipe and its plan

def recipe_file(workdir: Path) -> Path:
    path = workdir / "recipe.yaml"
    if not path.exists() or path.read_text() != RECIPE:
        path.write_text(RECIPE)
    return path


def compile_for(recipe: Path, overrides: list[str]) -> Any:
    """The compiled plan of the recipe (the fingerprints, stages, layout and pool record the pool is made for)."""
    from curate.engine.run import compile_plan
    from curate.recipe import load_recipe

    return compile_plan(load_recipe(str(recipe), overrides), require_weights=False)


# --------------------------------------------------------------------------- the table writer

@dataclass
class ShardValues:
    """What the stages found for the rows of one work shard (values of rows a stage never sees are ignored)."""

    reason: list[str | None]  # fetch's hard drop
    detail: list[str | None]
    image_meta: Any  # pa.Array list<IMAGE_META>: fetch's image_meta column
    language: list[tuple[str | None, float | None]]  # (code, confidence)
    clip: np.ndarray  # float32
    aesthetic: np.ndarray  # float32
    image_embedding: np.ndarray  # (rows, dim) float16
    text_embedding: np.ndarray
    embedding_model: str


class PoolWriter:
    """Writes one work shard's annotation tables and markers as the annotation worker would have."""

    def __init__(self, plan: Any, models: dict[str, list]):
        from curate.engine.reuse import gate_criteria

        self.plan = plan
        self.layout = plan.layout
        self.stages = {s.name: s for s in plan.stages if s.name in STAGES}
        self.gates = {name for group in plan.groups for name in group.gates}
        self.criteria = {name: gate_criteria(self.stages[name]) for name in self.gates}
        self.batch_rows = plan.loaded.recipe.engine.batch_rows
        self.models = models

    def write(self, shard: int, source: Any, values: ShardValues) -> dict[str, Any]:
        """Write the tables and markers of `shard` (its input rows: `source`); return the tables written."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from curate import schema
        from curate.engine.pool import GATE, scatter
        from curate.ops.language import Detection, with_language

        rows = source.num_rows
        everyone = np.ones(rows, dtype=bool)
        fetched = np.array([r is None for r in values.reason], dtype=bool)
        tables, alive = {}, {"fetch": (everyone, fetched)}
        images = placeholder_images(rows)
        tables["fetch"] = self._table("fetch", source, everyone, {
            "images": images, "image_meta": values.image_meta, "segments": source.column("segments"),
            "meta": source.column("meta")}, reasons=(values.reason, values.detail))
        # basic_filter: the stage's own measurements and gate, on the rows fetch let through
        stage = self.stages["basic_filter"]
        positions = np.flatnonzero(fetched).tolist()
        view = pa.table({"kind": source.column("kind"), "captions": source.column("captions"),
                         "segments": source.column("segments"), "image_meta": values.image_meta,
                         "meta": source.column("meta")}).take(pa.array(positions, pa.int64()))
        measured = stage.annotate(view)
        passed = pc.is_null(column_of(stage.select(measured), schema.DROP_REASON)).to_numpy(zero_copy_only=False)
        metas = scatter(rows, positions, measured, ["meta"])["meta"]
        gate = scatter(rows, positions, pa.table({GATE: pa.array(passed, pa.bool_())}), [GATE])[GATE]
        tables["basic_filter"] = self._table("basic_filter", source, fetched, {"meta": metas}, gate=gate)
        gated = fetched.copy()
        gated[positions] = passed
        alive["basic_filter"] = (fetched, gated)
        # language, on the rows the gate let through: meta.language as the stage writes it
        basic = metas.to_pylist()
        language = [with_language(basic[i], Detection(*values.language[i])) if gated[i] else None
                    for i in range(rows)]
        tables["language"] = self._table("language", source, gated, {"meta": pa.array(language, pa.string())})
        alive["language"] = (gated, gated)
        # clip_score and aesthetic on the same rows
        scores = schema.SAMPLE_SCHEMA.field("scores").type
        clip = np.where(gated, values.clip, np.nan).astype(np.float32)
        nothing = pa.nulls(rows, pa.float32())
        clip_scores = pa.StructArray.from_arrays(
            [pa.array(clip, pa.float32(), mask=~gated), nothing, nothing, nothing, nothing], fields=list(scores),
            mask=pa.array(~gated))
        embeddings = embedding_column(values, gated)
        tables["clip_score"] = self._table("clip_score", source, gated, {"scores": clip_scores,
                                                                          "embeddings": embeddings})
        aesthetic = pa.array(values.aesthetic.astype(np.float32), pa.float32(), mask=~gated)
        both = pa.StructArray.from_arrays(
            [pa.array(clip, pa.float32(), mask=~gated), aesthetic, nothing, nothing, nothing], fields=list(scores),
            mask=pa.array(~gated))
        tables["aesthetic"] = self._table("aesthetic", source, gated, {"scores": both})
        alive["clip_score"] = alive["aesthetic"] = (gated, gated)
        for name, table in tables.items():
            self._store(name, shard, table, *alive[name])
        return tables

    def _table(self, name: str, source: Any, annotated: np.ndarray, columns: dict[str, Any],
               reasons: tuple[list, list] | None = None, gate: Any = None) -> Any:
        """The annotation table: key, the provided columns (null where not annotated), the status columns."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from curate.engine.pool import ANNOTATED, DETAIL, GATE, REASON, annotation_schema

        rows = source.num_rows
        flags = pa.array(annotated, pa.bool_())
        provided = {}
        for column, values in columns.items():
            values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
            provided[column] = values if annotated.all() else pc.if_else(flags, values, pa.nulls(rows, values.type))
        reason, detail = reasons if reasons is not None else ([None] * rows, [None] * rows)
        table = pa.table({"key": source.column("key"), **provided, ANNOTATED: flags,
                          REASON: pa.array(reason, pa.string()), DETAIL: pa.array(detail, pa.string()),
                          GATE: gate if gate is not None else pa.nulls(rows, pa.bool_())})
        return table.cast(annotation_schema(tuple(self.stages[name].provides)))

    def _store(self, name: str, shard: int, table: Any, alive_in: np.ndarray, alive_out: np.ndarray) -> None:
        """Write the table and its completion marker (atomically, as the worker does)."""
        from curate import storage
        from curate.engine.annotate import _Digest, _reason_counts
        from curate.engine.apply import StageStats
        from curate.engine.pool import ANNOTATED
        from curate.files import write_json, write_table

        layout, stage = self.layout, self.stages[name]
        annotated = int(np.asarray(table.column(ANNOTATED).to_numpy(zero_copy_only=False)).sum())
        reasons = _reason_counts(table)
        digests = []
        for mask in (alive_in, alive_out):
            digest = _Digest()
            for start in range(0, len(mask), self.batch_rows):
                import pyarrow as pa

                digest.update(pa.array(mask[start:start + self.batch_rows], pa.bool_()))
            digests.append(digest.digest())
        dropped = sum(reasons.values())
        stats = StageStats(annotated, annotated - dropped, collections.Counter(reasons), 0.0)
        marker = {"stage": name, "shard": shard, "fingerprint": self.plan.fingerprints[name], "rows": table.num_rows,
                  "admission": stage.admission() or {}, "gate": self.criteria.get(name),
                  "alive_in": digests[0], "alive_out": digests[1], "annotated": annotated, "computed": annotated,
                  "reused": 0, "reasons": reasons, "stats": stats.to_json(), "counters": {},
                  "models": self.models.get(name, [])}
        phase = layout.annotation_phase(name)
        write_table(storage.location(str(layout.shard_file(phase, shard))), table)
        write_json(storage.location(str(layout.marker(phase, shard))), marker)


def column_of(table: Any, name: str) -> Any:
    import pyarrow as pa

    if name in table.column_names:
        return table.column(name).combine_chunks().cast(pa.string())
    return pa.nulls(table.num_rows, pa.string())


def placeholder_images(rows: int) -> Any:
    """One image per row with null bytes and path (what fetch's table holds, minus the bytes)."""
    import pyarrow as pa

    from curate import schema

    element = schema.SAMPLE_SCHEMA.field("images").type.value_type
    values = pa.StructArray.from_arrays([pa.nulls(rows, f.type) for f in element], fields=list(element))
    return pa.ListArray.from_arrays(pa.array(np.arange(rows + 1), pa.int32()), values,
                                    type=schema.SAMPLE_SCHEMA.field("images").type)


def embedding_column(values: ShardValues, annotated: np.ndarray) -> Any:
    """`embeddings` as clip_score writes it: model, image and text vectors (float16), null where not annotated."""
    import pyarrow as pa

    from curate import schema

    kind = schema.SAMPLE_SCHEMA.field("embeddings").type
    rows, dim = values.image_embedding.shape
    offsets = pa.array(np.arange(rows + 1) * dim, pa.int32())
    vectors = [pa.ListArray.from_arrays(offsets, pa.array(m.reshape(-1), pa.float16()))
               for m in (values.image_embedding, values.text_embedding)]
    model = pa.array([values.embedding_model] * rows, pa.string())
    return pa.StructArray.from_arrays([model, *vectors], fields=list(kind), mask=pa.array(~annotated))


# --------------------------------------------------------------------------- synthetic values

def vocabulary() -> list[str]:
    """The words of the COCO captions of the shared photo set (lower case, letters only)."""
    from photos import SOURCE_DIR

    words = set()
    for line in (SOURCE_DIR / "captions.jsonl").read_text().splitlines():
        if line.strip():
            words.update(re.findall(r"[a-z]+", json.loads(line)["caption"].lower()))
    return sorted(words)


def url_list(path: Path, rows: int, seed: int) -> None:
    """`rows` URL rows: url on one of 5,000 hosts, caption of 0-30 words (2% empty, 3% one word)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng([seed, 1])
    words = np.array(vocabulary())
    lengths = np.clip(np.round(rng.lognormal(np.log(9), 0.5, rows)), 2, 30).astype(int)
    lengths[rng.random(rows) < 0.03] = 1
    lengths[rng.random(rows) < 0.02] = 0
    picks = rng.integers(len(words), size=int(lengths.sum()))
    ends = np.cumsum(lengths)
    flat = words[picks].tolist()
    captions = [" ".join(flat[end - n:end]) for n, end in zip(lengths.tolist(), ends.tolist())]
    hosts = rng.integers(5000, size=rows)
    urls = [f"https://img{h}.example-cdn.com/photos/{i:08d}.jpg" for i, h in enumerate(hosts.tolist())]
    pq.write_table(pa.table({"url": urls, "caption": captions}), path, compression="zstd")


class Synthetic:
    """Every row's synthetic fetch result, language and scores, drawn once for the whole pool."""

    def __init__(self, rows: int, seed: int, embedding_model: str, dim: int):
        rng = np.random.default_rng([seed, 2])
        self.seed, self.embedding_model, self.dim = seed, embedding_model, dim
        draw = rng.random(rows)
        self.failure = np.full(rows, -1)
        edge = 0.0
        for index, (_, _, share) in enumerate(FETCH_FAILURES):
            self.failure[(draw >= edge) & (draw < edge + share)] = index
            edge += share
        longest = np.clip(rng.lognormal(np.log(600), 0.6, rows), 40, 6000)
        ratio = np.exp(rng.uniform(np.log(0.4), np.log(2.5), rows))  # width / height
        self.width = np.maximum(1, np.where(ratio >= 1, longest, longest * ratio)).astype(np.int32)
        self.height = np.maximum(1, np.where(ratio >= 1, longest / ratio, longest)).astype(np.int32)
        self.original_bytes = (self.width.astype(np.int64) * self.height * rng.uniform(0.08, 0.5, rows)).astype(
            np.int64)
        self.format = rng.choice(len(ORIGINAL_FORMATS), size=rows, p=[f[2] for f in ORIGINAL_FORMATS])
        self.hash_id = np.arange(rows)
        copies = np.flatnonzero(rng.random(rows) < DUPLICATE_SHARE)
        copies = copies[copies > 0]
        sources = (rng.random(len(copies)) * copies).astype(np.int64)  # an earlier row
        for array in (self.width, self.height, self.original_bytes, self.format):
            array[copies] = array[sources]
        self.hash_id[copies] = self.hash_id[sources]
        self.duplicates = len(copies)
        kind = rng.random(rows)
        self.language = np.where(kind < 0.62, 0, np.where(kind < 0.95, 1, np.where(kind < 0.98, 2, 3)))
        self.other_language = rng.integers(len(LANGUAGES), size=rows)
        self.confidence = np.where(self.language == 0, rng.beta(8, 2, rows), rng.beta(5, 3, rows))
        self.clip = rng.normal(0.28, 0.05, rows).astype(np.float32)
        self.aesthetic = rng.normal(5.0, 0.9, rows).astype(np.float32)

    def shard(self, start: int, source: Any, shard: int) -> ShardValues:
        """The values of the rows [start, start + rows of `source`)."""
        import pyarrow as pa

        from curate import schema

        rows = source.num_rows
        part = slice(start, start + rows)
        failure = self.failure[part]
        ok = failure < 0
        reason = [None if f < 0 else FETCH_FAILURES[f][0] for f in failure.tolist()]
        detail = [None if f < 0 else FETCH_FAILURES[f][1] for f in failure.tolist()]
        urls = [m[0]["url"] for m in source.column("image_meta").to_pylist()]
        width, height = self.width[part], self.height[part]
        scale = np.minimum(1.0, 512 / np.maximum(width, height))
        hashes = [hashlib.shake_256(f"{self.seed}:{h}".encode()).digest(72)
                  for h in self.hash_id[part].tolist()]
        formats = self.format[part]
        out_bytes = (np.round(width * scale) * np.round(height * scale) * 0.25).astype(np.int64)
        fields = {
            "url": pa.array(urls, pa.string()),
            "width": pa.array(np.maximum(1, np.round(width * scale)).astype(np.int32), mask=~ok),
            "height": pa.array(np.maximum(1, np.round(height * scale)).astype(np.int32), mask=~ok),
            "original_width": pa.array(width, mask=~ok),
            "original_height": pa.array(height, mask=~ok),
            "sha256": pa.array([h[:32].hex() for h in hashes], pa.string(), mask=~ok),
            "format": pa.array(["jpg"] * rows, pa.string(), mask=~ok),
            "original_format": pa.array([ORIGINAL_FORMATS[f][0] for f in formats.tolist()], pa.string(), mask=~ok),
            "original_mode": pa.array([ORIGINAL_FORMATS[f][1] for f in formats.tolist()], pa.string(), mask=~ok),
            "exif_orientation": pa.array(np.ones(rows, np.int32), mask=~ok),
            "num_bytes": pa.array(out_bytes, mask=~ok),
            "original_num_bytes": pa.array(self.original_bytes[part], mask=~ok),
            "pixel_sha256": pa.array([h[32:64].hex() for h in hashes], pa.string(), mask=~ok),
            "phash": pa.array(np.frombuffer(b"".join(h[64:72] for h in hashes), dtype=np.int64), mask=~ok),
        }
        element = schema.IMAGE_META
        meta = pa.StructArray.from_arrays([fields[f.name].cast(f.type) for f in element], fields=list(element))
        image_meta = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1), pa.int32()), meta,
                                              type=schema.SAMPLE_SCHEMA.field("image_meta").type)
        language = self.language[part]
        others = self.other_language[part]
        confidence = np.round(self.confidence[part], 4)
        detections = []
        for kind, other, value in zip(language.tolist(), others.tolist(), confidence.tolist()):
            detections.append(("en", value) if kind == 0 else (LANGUAGES[other], value) if kind == 1
                              else (None, 0.0) if kind == 2 else (None, None))
        rng = np.random.default_rng([self.seed, 3, shard])
        vectors = []
        for _ in range(2):
            matrix = rng.standard_normal((rows, self.dim)).astype(np.float32)
            matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
            vectors.append(matrix.astype(np.float16))
        return ShardValues(reason, detail, image_meta, detections, self.clip[part], self.aesthetic[part],
                           vectors[0], vectors[1], self.embedding_model)


# --------------------------------------------------------------------------- the probe

def probe(args: argparse.Namespace, recipe: Path) -> dict[str, Any]:
    """Run the real engine on 20 images (+ a 404, an empty and a one-word caption), cached; check the writer
    against its pool and the what-if's reads; return the models and embeddings as the engine wrote them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    workdir = Path(args.workdir)
    folder = workdir / "probe"
    cache = folder / f"probe-{code_state()}.json"  # the engine's format is checked again whenever its code changed
    if cache.exists():
        return json.loads(cache.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    rows = image_set(20, args.seed, folder)
    server = Server(argparse.Namespace(images=20, seed=args.seed, workdir=str(folder)))
    out = folder / "out"
    try:
        urls = [server.base_url + r["route"] for r in rows] + [server.base_url + "/img/missing.jpg",
                                                              server.base_url + rows[0]["route"],
                                                              server.base_url + rows[1]["route"]]
        captions = [r["caption"] for r in rows] + ["a picture that is not there", "", "umbrella"]
        pq.write_table(pa.table({"url": urls, "caption": captions}), folder / "urls.parquet")
        command = [str(CURATE), "run", str(recipe), "--overwrite", "--no-progress",
                   *[part for s in [f"source.path={folder / 'urls.parquet'}", f"output.path={out}", *PROBE_SETS]
                     for part in ("--set", s)]]
        print(f"[probe] {shlex.join(command)}", flush=True)
        log = folder / "probe.log"
        with log.open("wb") as handle:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=tree_env(REPO),
                                  cwd=folder, timeout=args.timeout).returncode
        if code != 0:
            raise RuntimeError(f"the probe run failed (exit {code}); log {log}:\n{log.read_text()[-4000:]}")
    finally:
        server.close()
    found = check_writer(recipe, out)
    found["reads"] = trace_what_if_reads(recipe, out)
    cache.write_text(json.dumps(found, indent=1))
    return found


def check_writer(recipe: Path, out: Path) -> dict[str, Any]:
    """Rewrite the probe pool's tables with PoolWriter from the probe's own values (into a copy); every table
    must equal the engine's (image bytes aside) and every marker too (seconds aside)."""
    import pyarrow.compute as pc

    from curate import storage
    from curate.engine.pool import ANNOTATED
    from curate.extract.document import load_meta
    from curate.files import RunLayout, read_json

    engine = RunLayout(out)
    copy = out.parent / "rewritten"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(out / "_pool", copy / "_pool")
    plan = compile_for(recipe, [f"source.path={out.parent / 'urls.parquet'}", f"output.path={copy}", *PROBE_SETS])
    first = read_json(engine.marker(engine.annotation_phase("clip_score"), 0))
    models = {name: read_json(engine.marker(engine.annotation_phase(name), 0))["models"] for name in STAGES}
    writer = PoolWriter(plan, models)
    shards = read_json(engine.phase_dir("input") / "_SUCCESS.json")["shards"]
    compared = 0
    model_name, dim = None, None
    for shard in sorted(range(shards), key=lambda shard: shard != 0):  # shard 0 has live rows
        source = storage.read_table(str(engine.shard_file("input", shard)))
        table = {name: storage.read_table(str(engine.shard_file(engine.annotation_phase(name), shard)))
                 for name in STAGES}
        fetch, clip = table["fetch"], table["clip_score"]
        embeddings = clip.column("embeddings").to_pylist()
        live = [e for e in embeddings if e is not None]
        if live:
            model_name, dim = live[0]["model"], len(live[0]["image"])
        blank = np.zeros(dim or 1, np.float16)
        languages = []
        for meta in table["language"].column("meta").to_pylist():
            found = load_meta(meta).get("language") or {}
            languages.append((found.get("code"), found.get("confidence")))
        scores = table["aesthetic"].column("scores").to_pylist()
        values = ShardValues(
            fetch.column("_reason").to_pylist(), fetch.column("_detail").to_pylist(),
            fetch.column("image_meta").combine_chunks(), languages,
            np.array([(s or {}).get("clip_score") or 0.0 for s in scores], np.float32),
            np.array([(s or {}).get("aesthetic") or 0.0 for s in scores], np.float32),
            np.array([e["image"] if e else blank for e in embeddings], np.float16),
            np.array([e["text"] if e else blank for e in embeddings], np.float16), model_name)
        written = writer.write(shard, source, values)
        for name in STAGES:
            expected = table[name]
            if name == "fetch":  # the engine's table holds the bytes; the writer's placeholders do not
                expected = expected.set_column(expected.schema.get_field_index("images"), "images",
                                               placeholder_images(expected.num_rows))
            if not written[name].equals(expected):
                for column in expected.column_names:
                    if not written[name].column(column).equals(expected.column(column)):
                        raise RuntimeError(f"probe: the writer's {name} table of shard {shard} differs from the "
                                           f"engine's in column {column}:\n{written[name].column(column)}\n"
                                           f"engine:\n{expected.column(column)}")
                raise RuntimeError(f"probe: the writer's {name} table of shard {shard} differs (schema?)")
            mine = read_json(plan.layout.marker(plan.layout.annotation_phase(name), shard))
            theirs = read_json(engine.marker(engine.annotation_phase(name), shard))
            for marker in (mine, theirs):
                marker["stats"].pop("seconds")
            if mine != theirs:
                raise RuntimeError(f"probe: marker {name} {shard}: writer {mine} != engine {theirs}")
            compared += 1
        assert pc.sum(table["fetch"].column(ANNOTATED)).as_py() == source.num_rows
    del first
    print(f"[probe] the writer's {compared} tables and markers equal the engine's ({shards} work shards)", flush=True)
    return {"models": models, "embedding_model": model_name, "embedding_dim": dim, "tables_compared": compared}


def trace_what_if_reads(recipe: Path, out: Path) -> dict[str, Any]:
    """Run the what-if on the probe's pool (real image bytes) with pyarrow's Parquet reads traced; fail if a read
    asks for `images`, or for every column of a file that holds image bytes."""
    import pyarrow.parquet as pq

    from curate.engine.whatif import what_if

    reads: list[tuple[str, Any]] = []
    originals = {"iter_batches": pq.ParquetFile.iter_batches, "read": pq.ParquetFile.read,
                 "read_row_group": pq.ParquetFile.read_row_group, "read_table": pq.read_table}

    def traced(name):
        original = originals[name]

        def method(self, *args, **kwargs):
            columns = kwargs.get("columns")
            if columns is None and name == "iter_batches" and len(args) > 1:
                columns = args[1]
            reads.append((str(getattr(self, "_curate_path", "?")), columns))
            return original(self, *args, **kwargs)
        return method

    def traced_read_table(source, *args, columns=None, **kwargs):
        reads.append((str(source), columns))
        return originals["read_table"](source, *args, columns=columns, **kwargs)

    original_init = pq.ParquetFile.__init__

    def init(self, source, *args, **kwargs):
        original_init(self, source, *args, **kwargs)
        self._curate_path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(
            source, "name", "?")

    try:
        pq.ParquetFile.__init__ = init
        for name in ("iter_batches", "read", "read_row_group"):
            setattr(pq.ParquetFile, name, traced(name))
        pq.read_table = traced_read_table
        plan = compile_for(recipe, [f"source.path={out.parent / 'urls.parquet'}", f"output.path={out}", *PROBE_SETS,
                                    CHANGE])
        result = what_if(plan)
    finally:
        pq.ParquetFile.__init__ = original_init
        for name in ("iter_batches", "read", "read_row_group"):
            setattr(pq.ParquetFile, name, originals[name])
        pq.read_table = originals["read_table"]
    with_bytes = str(out / "_pool" / "annotations" / "fetch")
    bad = [(file, columns) for file, columns in reads
           if (columns is not None and "images" in columns) or (columns is None and file.startswith(with_bytes))]
    if bad:
        raise RuntimeError(f"probe: the what-if read image bytes: {bad[:5]}")
    pool_reads = [r for r in reads if "/_pool/" in r[0]]
    print(f"[probe] the what-if made {len(reads)} Parquet reads ({len(pool_reads)} of the pool), none of `images`; "
          f"it kept {result['output_rows']} of {result['rows']}", flush=True)
    return {"parquet_reads": len(reads), "pool_reads": len(pool_reads), "unknown_path_reads":
            sum(1 for r in reads if r[0] == "?"), "kept": result["output_rows"]}


# --------------------------------------------------------------------------- the synthetic pool

def synthetic_pool(args: argparse.Namespace, recipe: Path, rows: int, found: dict[str, Any]) -> dict[str, Any]:
    """The pool of `rows` synthetic rows (cached): URL list, input split, tables and markers."""
    from curate import storage
    from curate.engine.reselect import record_file
    from curate.engine.split import split_source
    from curate.files import read_json, write_json

    workdir = Path(args.workdir)
    dim = args.embedding_dim or found["embedding_dim"]
    wider = f"-d{dim}" if dim != found["embedding_dim"] else ""
    folder = workdir / f"pool-n{rows}-w{args.rows_per_work_shard}-seed{args.seed}{wider}"
    done = folder / "synthetic.json"
    if done.exists() and read_json(done).get("format") == FORMAT_VERSION:
        return read_json(done)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    urls = folder / "urls.parquet"
    url_list(urls, rows, args.seed)
    out = folder / "out"
    plan = compile_for(recipe, overrides(args, urls, out))
    split = split_source(plan.source, plan.layout, args.rows_per_work_shard, scope=plan.record["trial"])
    write_json(record_file(plan.layout), plan.record)
    split_s = time.perf_counter() - started
    values = Synthetic(rows, args.seed, found["embedding_model"], dim)
    writer = PoolWriter(plan, found["models"])
    start = 0
    kept_by_gate = 0
    for shard in range(split["shards"]):
        source = storage.read_table(str(plan.layout.shard_file("input", shard)))
        tables = writer.write(shard, source, values.shard(start, source, shard))
        kept_by_gate += int(np.asarray(tables["language"].column("_annotated").to_numpy(zero_copy_only=False)).sum())
        start += source.num_rows
        if shard % 100 == 99:
            print(f"  {start:,} rows written ({time.perf_counter() - started:.0f} s)", flush=True)
    assert start == rows, (start, rows)
    summary = {"format": FORMAT_VERSION, "rows": rows, "shards": split["shards"], "embedding_dim": dim,
               "out": str(out), "urls": str(urls),
               "fingerprints": plan.fingerprints, "duplicates": values.duplicates,
               "fetch_failures": int((values.failure >= 0).sum()), "past_gate": kept_by_gate,
               "split_s": round(split_s, 1), "build_s": round(time.perf_counter() - started, 1),
               "pool_mb": round(tree_bytes(out / "_pool") / 1e6, 1),
               "pool_mb_by_part": {p.name: round(tree_bytes(p) / 1e6, 1) for p in
                                   sorted((out / "_pool" / "annotations").iterdir())} | {
                   "input": round(tree_bytes(out / "_pool" / "input") / 1e6, 1)}}
    write_json(done, summary)
    print(f"synthetic pool: {json.dumps(summary)}", flush=True)
    return summary


def tree_bytes(root: Path) -> int:
    """Bytes of the files under `root` (apparent sizes)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def overrides(args: argparse.Namespace, urls: Path, out: Path) -> list[str]:
    return [f"source.path={urls}", f"output.path={out}", f"engine.rows_per_work_shard={args.rows_per_work_shard}"]


# --------------------------------------------------------------------------- timing

def run_measured(name: str, command: list[str], args: argparse.Namespace, result_file: Path | None) -> dict[str, Any]:
    """Run one what-if subprocess from the work folder, sampling its process tree (RSS, CPU)."""
    workdir = Path(args.workdir)
    log = workdir / f"{name}.log"
    if result_file is not None:
        result_file.unlink(missing_ok=True)
    print(f"\n[{name}] {shlex.join([Path(command[0]).name, *command[1:]])}", flush=True)
    waited, cores = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
    code = code_state()
    load_before, busy, own = loadavg(), busy_ticks(), sum(os.times()[:2])
    with log.open("wb") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=tree_env(REPO), cwd=workdir, start_new_session=True)
        sampler = TreeSampler(process.pid, interval=0.2, pss_every=10**9)
        sampler.start()
        try:
            exit_code = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # only this run's process group
            exit_code = process.wait()
        wall = time.perf_counter() - started
        sampler.stop()
    cpu, machine = sampler.cpu_seconds(), (busy_ticks() - busy) / TICKS
    run = {"name": name, "exit_code": exit_code, "process_s": round(wall, 2), "cpu_s": round(cpu, 1),
           "other_cpu_s": round(max(0.0, machine - cpu - (sum(os.times()[:2]) - own)), 1),
           "peak_rss_mib": round(sampler.peak_rss / 2**20), "waited_for_quiet_s": waited,
           "other_cores_at_start": cores, "load_before": load_before, "log": str(log), "code": code}
    if exit_code != 0 or (result_file is not None and not result_file.exists()):
        raise RuntimeError(f"{name} failed (exit {exit_code}); log {log}:\n{log.read_text(errors='replace')[-4000:]}")
    if result_file is not None:
        found = json.loads(result_file.read_text())
        run.update({key: round(value, 3) if isinstance(value, float) else value for key, value in found.items()})
    return run


def in_process(name: str, args: argparse.Namespace, recipe: Path, pool: dict[str, Any],
               profile: Path | None = None) -> dict[str, Any]:
    workdir = Path(args.workdir)
    runner = workdir / "whatif_runner.py"
    runner.write_text(RUNNER)
    result_file = workdir / f"{name}.result.json"
    sets = overrides(args, Path(pool["urls"]), Path(pool["out"])) + [CHANGE]
    profiling = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
    command = [sys.executable, *profiling, str(runner), str(recipe), str(result_file), *sets]
    run = run_measured(name, command, args, result_file)
    run["rows_per_s"] = round(pool["rows"] / run["work_s"])
    return run


def cli(name: str, args: argparse.Namespace, recipe: Path, pool: dict[str, Any]) -> dict[str, Any]:
    sets = overrides(args, Path(pool["urls"]), Path(pool["out"])) + [CHANGE]
    command = [str(CURATE), "run", str(recipe), "--what-if", *[part for s in sets for part in ("--set", s)]]
    run = run_measured(name, command, args, None)
    text = Path(run["log"]).read_text(errors="replace")
    found = re.search(r"would keep\s+([\d,]+)\s+of\s+([\d,]+) rows", text)
    if found is None:
        raise RuntimeError(f"{name}: no 'would keep N of M rows' in {run['log']}:\n{text[-3000:]}")
    run.update(kept=int(found.group(1).replace(",", "")), input_rows=int(found.group(2).replace(",", "")),
               work_s=run["process_s"], rows_per_s=round(pool["rows"] / run["process_s"]))
    return run


def top_functions(profile: Path, count: int = 25) -> dict[str, list[dict[str, Any]]]:
    """The profile's top functions by cumulative and by own time."""
    stats = pstats.Stats(str(profile))
    entries = []
    for (file, line, function), (calls, primitive, own, cumulative, _) in stats.stats.items():
        where = file.replace(str(REPO) + "/", "").replace(sys.prefix + "/", "")
        where = re.sub(r".*/site-packages/", "", where)
        entries.append({"function": f"{where}:{line}({function})", "calls": calls, "own_s": round(own, 2),
                        "cumulative_s": round(cumulative, 2)})
    machinery = ("<frozen importlib", "(<module>)", "import_module", "builtins.exec>", "builtins.__import__>",
                 "whatif_runner.py")  # the runner and the imports' frames: the imports show as their modules' cost
    shown = [e for e in entries if not any(m in e["function"] for m in machinery)]
    return {"cumulative": sorted(shown, key=lambda e: -e["cumulative_s"])[:count],
            "own": sorted(entries, key=lambda e: -e["own_s"])[:count]}


# --------------------------------------------------------------------------- report

def report(result: dict[str, Any]) -> str:
    sizes = result["sizes"]
    lines = ["| rows (work shards) | pool on disk, MB | what-if in process: the call, s | compile_plan, s | process, s "
             "| rows/s (the call) | peak RSS, MiB (tree, sampled; VmHWM) | read, MB | CLI process, s | CLI rows/s | "
             "CLI peak RSS, MiB | kept |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size in sizes:
        pool, runs, clis = size["pool"], size["in_process"], size["cli"]
        m = {key: median([r[key] for r in runs if key in r]) for key in ("work_s", "compile_s", "process_s",
                                                                         "peak_rss_mib", "vm_hwm_mib", "read_mb")}
        c = {key: median([r[key] for r in clis]) for key in ("process_s", "peak_rss_mib")}
        dim = pool.get("embedding_dim", result["probe"]["embedding_dim"])
        wide = "" if dim == result["probe"]["embedding_dim"] else f", embeddings of {dim}"
        lines.append(f"| {pool['rows']:,} ({pool['shards']:,}{wide}) | {pool['pool_mb']:,.0f} | "
                     f"**{m['work_s']:.1f}** | "
                     f"{m['compile_s']:.1f} | {m['process_s']:.1f} | {pool['rows'] / m['work_s']:,.0f} | "
                     f"{m['peak_rss_mib']:,.0f}; {m['vm_hwm_mib']:,.0f} | {m['read_mb']:,.0f} | "
                     f"**{c['process_s']:.1f}** | {pool['rows'] / c['process_s']:,.0f} | {c['peak_rss_mib']:,.0f} | "
                     f"{runs[0]['kept']:,} |")
    parts = ["\n".join(lines)]
    runs_lines = ["| run | the call s | process s | CPU s | other CPU s | peak RSS MiB | other cores at start "
                  "(waited s) | load before | code |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for size in sizes:
        for run in sorted(size["in_process"] + size["cli"] + size.get("disturbed", []), key=lambda r: r["name"]):
            flag = " (disturbed: not in the medians)" if run in size.get("disturbed", []) else (
                " (disturbed, last attempt)" if run.get("disturbed") else "")
            runs_lines.append(f"| {run['name']}{flag} | {run['work_s']:.1f} | {run['process_s']:.1f} | "
                              f"{run['cpu_s']:.1f} | "
                              f"{run['other_cpu_s']:.1f} | {run['peak_rss_mib']:,} | {run['other_cores_at_start']} "
                              f"({run['waited_for_quiet_s']}) | {run['load_before']} | {run.get('code', '')} |")
    parts.append("\n".join(runs_lines))
    for size in sizes:
        if "profile" in size:
            top = size["profile"]["top"]
            rows = [f"Profile of one in-process what-if at {size['pool']['rows']:,} rows "
                    f"({size['profile']['file']}; the call {size['profile']['run']['work_s']:.1f} s under cProfile):",
                    "", "| function (by cumulative time) | calls | own s | cumulative s |",
                    "| --- | ---: | ---: | ---: |"]
            rows += [f"| `{e['function']}` | {e['calls']:,} | {e['own_s']:.2f} | {e['cumulative_s']:.2f} |"
                     for e in top["cumulative"]]
            rows += ["", "| function (by own time) | calls | own s | cumulative s |", "| --- | ---: | ---: | ---: |"]
            rows += [f"| `{e['function']}` | {e['calls']:,} | {e['own_s']:.2f} | {e['cumulative_s']:.2f} |"
                     for e in top["own"]]
            parts.append("\n".join(rows))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="100000,1000000", help="comma list of pool sizes (default 100000,1000000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind per size, alternating; medians")
    parser.add_argument("--rows-per-work-shard", type=int, default=1000, help="(default 1000, the engine's)")
    parser.add_argument("--profile", action="store_true", help="one more in-process run per size under cProfile")
    parser.add_argument("--embedding-dim", type=int, help="the embeddings' dimension (default: the tiny model's, "
                        "as the probe finds it; e.g. 768 to see a real CLIP's table sizes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/curate-bench-whatif")
    parser.add_argument("--quiet-threshold", type=float, default=0.25, metavar="CORES",
                        help="before each run, wait until other processes use at most this many cores (default 0.25)")
    parser.add_argument("--quiet-wait", type=float, default=60.0, metavar="SECONDS",
                        help="...but no longer than this (default 60)")
    parser.add_argument("--retries", type=int, default=2, help="runs again (at most this many times) a run during "
                        "which other processes used more than --quiet-threshold cores on average (default 2)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    parser.add_argument("--json", help="also write the raw numbers here (always: WORKDIR/results.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    recipe = recipe_file(workdir)
    found = probe(args, recipe)
    result: dict[str, Any] = {"tree": f"{REPO} ({tree_state(REPO)})", "args": vars(args), "probe": found,
                              "change": CHANGE, "load_before": loadavg(), "sizes": []}
    for rows in [int(r) for r in args.rows.split(",") if r]:
        pool = synthetic_pool(args, recipe, rows, found)
        size: dict[str, Any] = {"pool": pool, "in_process": [], "cli": [], "disturbed": []}
        for repeat in range(args.repeats):
            order = ("in_process", "cli") if repeat % 2 == 0 else ("cli", "in_process")
            for kind in order:
                for attempt in range(args.retries + 1):
                    name = f"{kind.replace('_', '-')}-n{rows}-{repeat}" + (f"-again{attempt}" if attempt else "")
                    run = in_process(name, args, recipe, pool) if kind == "in_process" else cli(name, args, recipe,
                                                                                                 pool)
                    print(json.dumps({k: run.get(k) for k in ("work_s", "compile_s", "process_s", "peak_rss_mib",
                                                              "vm_hwm_mib", "other_cpu_s", "kept", "rows_per_s")}),
                          flush=True)
                    # other processes used more than --quiet-threshold cores on average meanwhile: run it again
                    run["disturbed"] = run["other_cpu_s"] > args.quiet_threshold * run["process_s"]
                    if not run["disturbed"] or attempt == args.retries:
                        break
                    size["disturbed"].append(run)
                    print(f"[{name}] disturbed ({run['other_cpu_s']} s of other processes' CPU): again", flush=True)
                size[kind].append(run)
        kept = {r["kept"] for r in size["in_process"] + size["cli"]}
        if len(kept) != 1:
            raise RuntimeError(f"the what-ifs disagree on the kept rows: {kept}")
        if args.profile:
            profile = workdir / f"whatif-n{rows}.prof"
            run = in_process(f"profile-n{rows}", args, recipe, pool, profile=profile)
            size["profile"] = {"file": str(profile), "run": run, "top": top_functions(profile)}
        result["sizes"].append(size)
    return finish_results(result, workdir, started, report, args.json)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
