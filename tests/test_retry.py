"""`curate retry`: transient fetch failures are fetched again and merged in; 404s are left alone."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from rich.console import Console

from curate.demo.server import LoopbackServer, Route
from curate.engine import retry as retry_module
from curate.engine.retry import retry
from curate.engine.run import compile_plan, execute
from curate.manifest.verify import verify_output
from curate.recipe import load_recipe


def jpeg(seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (96, 72), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(6):
        x, y = rng.randrange(80), rng.randrange(60)
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 16, y + 12))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def routes() -> dict[str, Route]:
    """ok: always served; flaky: 503 three times; busy: 429 three times; missing: 404; down: always 503."""
    table = {}
    for n in range(10):
        table[f"/ok/{n}.jpg"] = Route(body=jpeg(n))
    for n in range(4):
        table[f"/flaky/{n}.jpg"] = Route(body=jpeg(100 + n), fail_times=3, fail_status=503)
    for n in range(2):
        table[f"/busy/{n}.jpg"] = Route(body=jpeg(200 + n), fail_times=3, fail_status=429,
                                        fail_headers={"Retry-After": "0"})
    table["/down/0.jpg"] = Route(body=jpeg(300), fail_times=10**6, fail_status=503)
    return table


MISSING = ["/missing/0.jpg", "/missing/1.jpg", "/missing/2.jpg"]


def finished(tmp_path: Path, keep_pool: bool):
    """A run whose fetch (2 attempts per URL) lost the flaky, busy, missing and down images; it kept its pool
    (retried in place) or not (engine.keep_pool: false: retried apart and merged in)."""
    server = LoopbackServer(routes())
    server.__enter__()
    paths = list(server.routes) + MISSING
    base = server.base_url.rstrip("/")
    pq.write_table(pa.table({"url": [base + p for p in paths], "caption": [f"picture number {n}" for n in
                                                                          range(len(paths))]}),
                   tmp_path / "urls.parquet")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "source: {type: url_list, path: urls.parquet}\n"
        "stages:\n  fetch: {allow_private_addresses: true, host_rate: null, retries: 1, backoff_base: 0.01}\n"
        "output: {path: out, formats: [parquet, webdataset], shard_rows: 5}\nengine: {rows_per_work_shard: 6}\n")
    plan = compile_plan(load_recipe(recipe, [f"output.path={tmp_path / 'out'}",
                                             f"engine.keep_pool={'true' if keep_pool else 'false'}"]))
    manifest = execute(plan, Console(file=io.StringIO()), progress=False)
    return tmp_path / "out", manifest, server, base


@pytest.fixture(params=[True, False], ids=["pool", "no-pool"])
def finished_run(tmp_path, local_ray, request):
    output, manifest, server, base = finished(tmp_path, keep_pool=request.param)
    yield output, manifest, server, base
    server.__exit__(None, None, None)


@pytest.fixture
def finished_run_without_pool(tmp_path, local_ray):
    output, manifest, server, base = finished(tmp_path, keep_pool=False)
    yield output, manifest, server, base
    server.__exit__(None, None, None)


def keys_in(output: Path) -> tuple[list[str], list[str], list[str]]:
    """(parquet keys, webdataset keys, drop log keys)."""
    parquet = pq.read_table(output / "parquet", columns=["key"]).column("key").to_pylist()
    tars = sorted(str(p) for p in (output / "webdataset").glob("*.tar"))
    tar_keys = [sample["__key__"] for sample in wds.WebDataset(tars, shardshuffle=False)]
    drops = pq.read_table(output / "drops.parquet", columns=["key"]).column("key").to_pylist()
    return parquet, tar_keys, drops


def test_retry_recovers_transient_failures_and_leaves_404s_alone(finished_run):
    output, first, server, base = finished_run
    by_reason = first["drop_log"]["by_reason"]
    assert by_reason.get("http_5xx") == 5 and by_reason.get("http_429") == 2 and by_reason.get("http_404") == 3
    all_keys = set(sum(keys_in(output), []))
    hits_before = {path: route.hits for path, route in server.routes.items()}

    merged = retry(output, Console(file=io.StringIO()), progress=False)

    parquet, tar_keys, drops = keys_in(output)
    assert merged["reconciliation"]["ok"] and merged["outputs"]["rows"] == 16
    assert sorted(parquet) == sorted(tar_keys) and len(set(parquet)) == len(parquet) == 16
    assert not set(parquet) & set(drops) and set(parquet) | set(drops) == all_keys and len(drops) == 4
    assert merged["drop_log"]["by_reason"] == {"http_404": 3, "http_5xx": 1}
    assert merged["retries"][0]["retried_rows"] == 7 and merged["retries"][0]["recovered_rows"] == 6
    assert merged["retries"][0]["dropped_again"] == {"http_5xx": 1}
    for path in server.routes:
        if path.startswith(("/flaky/", "/busy/")):
            assert server.routes[path].hits == 4  # two attempts in the run, two in the retry
    assert all(server.routes[p].hits == hits_before[p] for p in server.routes if p.startswith("/ok/"))
    detail = {r["url"]: r["reason"] for r in pq.read_table(output / "drops.parquet").to_pylist()}
    assert {detail[base + p] for p in MISSING} == {"http_404"}
    fetch = next(s for s in merged["stages"] if s["name"] == "fetch")
    assert fetch["rows_in"] == 20 and fetch["rows_out"] == 16 and fetch["dropped"] == {"http_404": 3, "http_5xx": 1}
    report = verify_output(output)
    assert report.ok, report.problems
    images = pq.read_table(output / "parquet", columns=["images"]).column("images").to_pylist()
    assert all(row[0]["bytes"] for row in images)
    assert not (output / "_retry").exists()

    again = retry(output, Console(file=io.StringIO()), progress=False)
    assert again["reconciliation"]["ok"] and len(again["retries"]) == 2 and again["outputs"]["rows"] == 16
    assert verify_output(output).ok


def test_an_interrupted_merge_is_finished_by_the_next_retry(finished_run_without_pool, monkeypatch):
    output, _, _, _ = finished_run_without_pool
    real_apply = retry_module._apply_merge

    def crash_after_moving_shards(out: Path, merge: Path):
        plan = retry_module.read_json(merge / "plan.json")
        move = plan["moves"][0]
        Path(out / move["to"]).parent.mkdir(parents=True, exist_ok=True)
        Path(move["from"]).replace(out / move["to"])
        raise KeyboardInterrupt("killed during the merge")

    monkeypatch.setattr(retry_module, "_apply_merge", crash_after_moving_shards)
    with pytest.raises(KeyboardInterrupt):
        retry(output, Console(file=io.StringIO()), progress=False)
    assert retry_module.read_json(output / "manifest.json")["outputs"]["rows"] == 10  # nothing merged yet
    monkeypatch.setattr(retry_module, "_apply_merge", real_apply)

    merged = retry(output, Console(file=io.StringIO()), progress=False)
    parquet, tar_keys, drops = keys_in(output)
    assert len(merged["retries"]) == 1 and merged["outputs"]["rows"] == 16 == len(set(parquet)) == len(tar_keys)
    assert len(parquet) + len(drops) == 20 and verify_output(output).ok


def test_retry_refuses_a_folder_without_a_manifest(tmp_path):
    from curate.stage import RecipeError

    with pytest.raises(RecipeError, match="no manifest.json"):
        retry(tmp_path, Console(file=io.StringIO()))


def test_retry_refuses_when_the_input_file_changed(finished_run):
    from curate.stage import RecipeError

    output, manifest, server, _ = finished_run
    url_list = Path(manifest["sources"][0]["path"])
    table = pq.read_table(url_list)
    pq.write_table(table.slice(1), url_list)  # the list was edited in place after the run
    hits = sum(route.hits for route in server.routes.values())
    with pytest.raises(RecipeError, match="input file changed"):
        retry(output, Console(file=io.StringIO()))
    assert sum(route.hits for route in server.routes.values()) == hits  # nothing was fetched
    assert json.loads((output / "manifest.json").read_text()) == manifest


def test_retryable_keys_are_only_fetch_drops_with_a_retryable_reason():
    from curate.engine.retry import retryable_keys
    from curate.schema import DROP_SCHEMA

    rows = [("a", "fetch", "timeout"), ("b", "fetch", "http_404"), ("c", "basic_filter", "timeout"),
            ("d", "fetch", "http_5xx"), ("e", "fetch", None), ("f", "fetch", "http_429")]
    drops = pa.Table.from_pylist([{"key": key, "url": None, "stage": stage, "reason": reason, "detail": None}
                                  for key, stage, reason in rows], schema=DROP_SCHEMA)
    assert retryable_keys(drops) == {"a": "timeout", "d": "http_5xx", "f": "http_429"}


COCO = Path(__file__).resolve().parent / "data" / "captioned-images"


def test_a_recovered_copy_never_sits_beside_its_original_and_top_fraction_sees_the_whole_pool(tmp_path, local_ray):
    """A copy whose first fetch failed (503) is recovered by `curate retry`; the selection then runs over the whole
    pool: the copy is dropped as a copy, and the top fraction is that of a run where nothing failed."""
    captions = [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines()]
    photo = (COCO / captions[0]["file_name"]).read_bytes()
    table = {"/photo.jpg": Route(body=photo), "/photo_copy.jpg": Route(body=photo, fail_times=2, fail_status=503)}
    for n, row in enumerate(captions[1:]):
        table[f"/coco{n}.jpg"] = Route(body=(COCO / row["file_name"]).read_bytes())
    for n in range(6):
        table[f"/ok/{n}.jpg"] = Route(body=jpeg(n))
    texts = [captions[0]["caption"]] * 2 + [row["caption"] for row in captions[1:]] + [
        f"Bild Nummer {n}" for n in range(6)]
    recipe = tmp_path / "recipe.yaml"

    def run_into(server: LoopbackServer, out: str) -> dict:
        base = server.base_url.rstrip("/")
        pq.write_table(pa.table({"url": [base + p for p in table], "caption": texts}), tmp_path / f"{out}.parquet")
        recipe.write_text(
            f"source: {{type: url_list, path: {out}.parquet}}\n"
            "stages:\n  fetch: {allow_private_addresses: true, host_rate: null, retries: 1, backoff_base: 0.01}\n"
            "  clip_score: {model: {model: curate-tiny}}\n  dedup_exact: {}\n"
            "  top_fraction: {score: clip_score, fraction: 0.5}\n"
            f"output: {{path: {tmp_path / out}, formats: [parquet]}}\nengine: {{rows_per_work_shard: 4}}\n")
        return execute(compile_plan(load_recipe(recipe)), Console(file=io.StringIO()), progress=False, judge=False)

    with LoopbackServer(table) as server:
        first = run_into(server, "out")
        assert first["drop_log"]["by_reason"].get("http_5xx") == 1
        merged = retry(tmp_path / "out", Console(file=io.StringIO()), progress=False)
    with LoopbackServer({path: Route(body=route.body) for path, route in table.items()}) as steady:
        fresh = run_into(steady, "fresh")  # the same list where every fetch succeeds at once

    kept = pq.read_table(tmp_path / "out" / "parquet", columns=["key", "image_meta"]).to_pylist()
    hashes = [row["image_meta"][0]["sha256"] for row in kept]
    assert len(hashes) == len(set(hashes))  # no copy beside its original
    drops = {row["key"]: row for row in pq.read_table(tmp_path / "out" / "drops.parquet").to_pylist()}
    copy = next(row for row in drops.values() if row["url"].endswith("/photo_copy.jpg"))
    assert copy["stage"] == "dedup_exact"
    assert merged["retries"][0]["recovered_rows"] == 1 and merged["reconciliation"]["ok"]
    assert merged["drop_log"]["by_reason"] == fresh["drop_log"]["by_reason"]
    judged = {s["name"]: (s["rows_in"], s["rows_out"]) for s in merged["stages"]}
    assert judged == {s["name"]: (s["rows_in"], s["rows_out"]) for s in fresh["stages"]}
    assert judged["top_fraction"][1] == int(judged["top_fraction"][0] * 0.5) or \
        judged["top_fraction"][1] >= int(judged["top_fraction"][0] * 0.5)
