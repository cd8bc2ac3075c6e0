"""Training roles: the condition language, routing of samples to roles, recipe errors, and one engine run."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from rich.console import Console

from curate import schema
from curate.demo.server import LoopbackServer
from curate.demo.web import build_synthetic_web, write_url_list
from curate.engine.run import compile_plan, execute
from curate.recipe import _validate, load_recipe
from curate.roles.assign import NO_ROLE, RoleAssignment, RoleAssignmentParams, RoleRouter
from curate.roles.expression import ExpressionError, compile_condition
from curate.roles.spec import RoleSpec
from curate.stage import RecipeError


def sample(key: str, kind: str = "pair", scores: dict | None = None, sizes: list[tuple] = ((640, 480),),
           captions: dict[str, str] | None = None, dataset: str | None = None, meta: dict | None = None,
           original_sizes: list[tuple] | None = None, roles: list[str] | None = None) -> dict:
    """A sample row; `sizes` are stored sizes (None entries: unknown), `original_sizes` the originals."""
    original_sizes = original_sizes or [(None, None)] * len(sizes)
    image_meta = [{"width": s[0] if s else None, "height": s[1] if s else None, "original_width": o[0],
                   "original_height": o[1], "num_bytes": 1000 + i}
                  for i, (s, o) in enumerate(zip(sizes, original_sizes))]
    captions = captions or {"alt": "a red square on a white background"}
    return {
        "key": key, "kind": kind, "images": [{"bytes": b"x", "path": None} for _ in sizes], "image_meta": image_meta,
        "captions": [{"name": n, "text": t} for n, t in captions.items()],
        "scores": scores, "roles": roles or [], "source": {"dataset": dataset, "id": key, "url": None, "license": None},
        "meta": json.dumps(meta) if meta is not None else None,
    }


ROLES = {
    "generation": RoleSpec(when="aesthetic >= 5.5 and min_side >= 512"),
    "understanding": RoleSpec(when="clip_score >= 0.28 and caption_words >= 3", captions=["dense", "alt"]),
    "editing": RoleSpec(when="kind == 'edit'"),
    "interleaved": RoleSpec(when="kind == 'interleaved' and num_images >= 2"),
}

ROUTING = [
    (sample("both", scores={"aesthetic": 6.0, "clip_score": 0.31}, sizes=[(800, 600)]),
     ["generation", "understanding"]),
    (sample("at-limits", scores={"aesthetic": 5.5, "clip_score": 0.28125}, sizes=[(512, 512)]),
     ["generation", "understanding"]),
    (sample("one-small-image", scores={"aesthetic": 7.0}, sizes=[(1024, 768), (300, 900)]), []),
    (sample("all-images-large", scores={"aesthetic": 7.0}, sizes=[(1024, 768), (600, 900)]), ["generation"]),
    (sample("null-aesthetic", scores={"aesthetic": None, "clip_score": 0.5}, sizes=[(2048, 2048)]), ["understanding"]),
    (sample("no-scores", scores=None, sizes=[(2048, 2048)]), []),
    (sample("unknown-size", scores={"aesthetic": 9.0}, sizes=[None]), []),
    (sample("original-size-fallback", scores={"aesthetic": 9.0}, sizes=[None], original_sizes=[(700, 900)]),
     ["generation"]),
    (sample("dense-preferred-short", scores={"clip_score": 0.4},
            captions={"alt": "a long alt text with many words", "dense": "short"}), []),
    (sample("dense-preferred-long", scores={"clip_score": 0.4},
            captions={"alt": "short", "dense": "a dense caption with many words"}), ["understanding"]),
    (sample("alt-fallback", scores={"clip_score": 0.4}, captions={"alt": "three words here"}), ["understanding"]),
    (sample("edit", kind="edit", scores={"aesthetic": 6.0}, sizes=[(640, 640), (640, 640)]), ["editing", "generation"]),
    (sample("document", kind="interleaved", sizes=[(100, 100), (200, 300), (50, 60)]), ["interleaved"]),
    (sample("one-image-document", kind="interleaved", sizes=[(100, 100)]), []),
]


def expected_order(names: list[str]) -> list[str]:
    return [name for name in ROLES if name in names]


def test_roles_route_samples_by_scores_sizes_kinds_and_captions():
    table = schema.from_rows([row for row, _ in ROUTING])
    routed = RoleRouter(ROLES).route(table)
    for (row, expected), got in zip(ROUTING, routed):
        assert got == expected_order(expected), row["key"]
    assert routed[0] == ["generation", "understanding"]  # several roles, in recipe order


@pytest.mark.parametrize("condition, row, expected", [
    ("min_side >= 300 and max_side <= 900", sample("k", sizes=[(1024, 768), (300, 900)]), False),
    ("min_side == 300 and max_side == 1024", sample("k", sizes=[(1024, 768), (300, 900)]), True),
    ("min_width == 300 and min_height == 768", sample("k", sizes=[(1024, 768), (300, 900)]), True),
    ("max_width == 1024 and max_height == 900", sample("k", sizes=[(1024, 768), (300, 900)]), True),
    ("min_pixels == 270000 and max_pixels == 786432", sample("k", sizes=[(1024, 768), (300, 900)]), True),
    ("max_aspect_ratio == 3", sample("k", sizes=[(1024, 768), (300, 900)]), True),
    ("num_images == 2", sample("k", sizes=[(10, 10), (20, 20)]), True),
    ("min_width / min_height > 1.2", sample("k", sizes=[(640, 480)]), True),
    ("min_width / (min_height - 480) > 1", sample("k", sizes=[(640, 480)]), False),  # division by zero: missing
    ("source.dataset == 'laion'", sample("k", dataset="laion"), True),
    ("source.dataset != 'laion'", sample("k", dataset=None), False),  # missing: every comparison is false
    ("language in ['en', 'de']", sample("k", meta={"language": {"code": "de", "confidence": 0.9}}), True),
    ("language not in ['en', 'de']", sample("k", meta={"other": 1}), False),
    ("'dense' in caption_names", sample("k", captions={"alt": "a", "dense": "b"}), True),
    ("'dense' not in caption_names", sample("k", captions={"alt": "a"}), True),
    ("caption_chars == 5", sample("k", captions={"alt": "  hello  "}), True),
    ("5 <= aesthetic < 7", sample("k", scores={"aesthetic": 6.5}), True),
    ("5 <= aesthetic < 7", sample("k", scores={"aesthetic": 7.0}), False),
    ("-aesthetic < -6", sample("k", scores={"aesthetic": 6.5}), True),
    ("nsfw < 0.2 and watermark < 0.5", sample("k", scores={"nsfw": 0.1, "watermark": 0.2}), True),
    ("clip_direction > 0.1 or kind == 'pair'", sample("k"), True),
    ("not (aesthetic >= 5)", sample("k", scores={"aesthetic": None}), True),  # documented: `not` of false
    ("aesthetic < 5", sample("k", scores={"aesthetic": None}), False),
    ("true", sample("k"), True),
])
def test_fields_and_operators(condition, row, expected):
    routed = RoleRouter({"r": RoleSpec(when=condition)}).route(schema.from_rows([row]))
    assert routed == [["r"] if expected else []]


def test_caption_fields_measure_the_roles_own_caption():
    rows = [sample("alt-only", captions={"alt": "four words of alt"}),
            sample("both", captions={"alt": "x", "dense": "a dense caption of five"}),
            sample("empty-dense", captions={"dense": "", "alt": "four words of alt"}),
            sample("no-alt", captions={"source": "a b c d e f"})]
    roles = {"dense_only": RoleSpec(when="caption_words >= 4", captions=["dense"]),
             "dense_then_alt": RoleSpec(when="caption_words >= 4", captions=["dense", "alt"]),
             "default": RoleSpec(when="caption_words >= 4")}  # alt, else the first caption
    assert RoleRouter(roles).route(schema.from_rows(rows)) == [
        ["dense_then_alt", "default"], ["dense_only", "dense_then_alt"], ["dense_then_alt", "default"], ["default"]]


def test_role_step_replaces_the_column_and_drops_role_less_samples_when_required():
    rows = [sample("a", scores={"aesthetic": 6.0}, sizes=[(600, 600)], roles=["stale"]),
            sample("b", scores={"aesthetic": 1.0}, roles=["stale"])]
    roles = {"generation": RoleSpec(when="aesthetic >= 5.5 and min_side >= 512")}
    kept = RoleAssignment(RoleAssignmentParams(roles=roles)).process(schema.from_rows(rows))
    assert kept.column("roles").to_pylist() == [["generation"], []]
    assert "drop_reason" not in kept.column_names
    required = RoleAssignment(RoleAssignmentParams(roles=roles, required=True)).process(schema.from_rows(rows))
    assert required.column("drop_reason").to_pylist() == [None, NO_ROLE]
    assert "generation" in required.column("drop_detail").to_pylist()[1]


# --------------------------------------------------------------------------- recipe errors


def write_recipe(folder: Path, roles: dict, **extra) -> Path:
    recipe = {"name": "roles-test", "source": {"type": "url_list", "path": "urls.parquet"},
              "stages": {"fetch": {}}, "output": {"path": str(folder / "out")}, "roles": roles, **extra}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.parametrize("condition, message", [
    ("aesthetic >= ", "not a valid expression"),
    ("aesthetic = 5", "compare with =="),
    ("aestetic >= 5", "unknown field `aestetic` (did you mean aesthetic?)"),
    ("len(kind) > 3", "function calls are not allowed"),
    ("__import__('os').system('true') == 0", "function calls are not allowed"),
    ("kind.lower == 'pair'", "attribute access is not allowed"),
    ("source.nothing == 'x'", "unknown field `source.nothing`"),
    ("caption_names[0] == 'alt'", "indexing"),
    ("[x for x in caption_names] == 1", "ListComp is not allowed"),
    ("aesthetic if kind else 1", "if ... else"),
    ("kind >= 'edit'", "compares numbers"),
    ("kind == 5", "cannot compare `kind` (a string) with `5` (a number)"),
    ("aesthetic == 'high'", "cannot compare `aesthetic` (a number)"),
    ("aesthetic + 'x' > 1", "arithmetic needs numbers"),
    ("aesthetic ** 2 > 1", "operator ** is not allowed"),
    ("aesthetic is None", "cannot be compared"),
    ("kind in kind", "`in` needs a list of constants"),
    ("kind in [1, 2]", "among numbers"),
    ("kind in [num_images]", "numbers or strings only"),
    ("aesthetic + 1", "must be true or false"),
    ("aesthetic and kind == 'pair'", "`and` joins conditions"),
    ("not aesthetic", "`not` applies to a condition"),
    ("", "at least 1 character"),
])
def test_a_bad_condition_is_a_recipe_error_naming_the_role(tmp_path, condition, message):
    recipe = write_recipe(tmp_path, {"understanding": {"when": "clip_score >= 0.28"},
                                     "generation": {"when": condition}})
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    error = caught.value
    assert error.path == "roles.generation.when"
    assert message in error.message
    assert str(error).startswith(f"{recipe}: roles.generation.when: ")


@pytest.mark.parametrize("role, path, message", [
    ({"when": "true", "resolution": {"mode": "keep_ratio"}}, "roles.r.resolution", "needs `size`"),
    ({"when": "true", "resolution": {"buckets": []}}, "roles.r.resolution.buckets", "at least 1"),
    ({"when": "true", "resolution": {"buckets": [[512, 512], [512, 512]]}}, "roles.r.resolution", "twice"),
    ({"when": "true", "resolution": {"mode": "keep_ratio", "size": 448, "buckets": [[512, 512]]}},
     "roles.r.resolution", "applies to mode buckets only"),
    ({"when": "true", "resolution": {"size": 4}}, "roles.r.resolution.size", "greater than or equal to 8"),
    ({"when": "true", "resolution": {"mode": "stretch", "size": 64}}, "roles.r.resolution.mode", "keep_ratio"),
    ({"when": "true", "captions": [""]}, "roles.r.captions.0", "at least 1 character"),
    ({"when": "true", "resolution": {"mode": "border", "size": 64}}, "roles.r.resolution.mode", "center_crop"),
    ({"when": "true", "captions": ["alt", "alt"]}, "roles.r.captions", "listed twice"),
    ({"when": "true", "whne": "true"}, "roles.r.whne", "unknown key; expected one of: captions, resolution, when"),
    ({"captions": ["alt"]}, "roles.r.when", "required key is missing"),
])
def test_bad_role_settings_are_recipe_errors(tmp_path, role, path, message):
    with pytest.raises(RecipeError) as caught:
        load_recipe(write_recipe(tmp_path, {"r": role}))
    assert caught.value.path == path
    assert message in caught.value.message


def test_a_bad_role_name_is_refused(tmp_path):
    with pytest.raises(RecipeError) as caught:
        load_recipe(write_recipe(tmp_path, {"my role": {"when": "true"}}))
    assert caught.value.path == "roles.my role"


def test_resolved_roles_carry_captions_and_resolution_and_change_the_hash(tmp_path):
    roles = {"generation": {"when": "aesthetic >= 5.5", "captions": ["dense", "alt"],
                            "resolution": {"buckets": [[512, 512], [640, 384]]}},
             "understanding": {"when": "clip_score >= 0.28", "resolution": {"mode": "keep_ratio", "size": 448}},
             "editing": {"when": "kind == 'edit'"}}
    loaded = load_recipe(write_recipe(tmp_path, roles))
    resolved = loaded.resolved()["roles"]
    assert list(resolved) == ["generation", "understanding", "editing"]
    assert resolved["generation"]["captions"] == ["dense", "alt"]
    assert resolved["generation"]["resolution"]["mode"] == "buckets"
    assert resolved["generation"]["resolution"]["buckets"] == [[512, 512], [640, 384]]
    assert resolved["understanding"]["resolution"] == {"mode": "keep_ratio", "size": 448, "side": "longest",
                                                      "only_if_bigger": True, "buckets": None}
    assert resolved["understanding"]["captions"] == [] and resolved["editing"]["resolution"] is None
    assert loaded.resolved()["roles_required"] is False
    again = _validate(loaded.resolved(), loaded.file)  # how `curate retry` re-reads a manifest's recipe
    assert again.resolved()["roles"] == resolved and again.sha256() == loaded.sha256()
    without_editing = load_recipe(write_recipe(tmp_path, roles), ["roles.editing=false"])
    assert list(without_editing.resolved()["roles"]) == ["generation", "understanding"]
    assert without_editing.sha256() != loaded.sha256()
    changed = load_recipe(write_recipe(tmp_path, roles), ["roles.generation.when=aesthetic >= 6"])
    assert changed.sha256() != loaded.sha256()
    no_roles = load_recipe(write_recipe(tmp_path, {}))
    assert no_roles.resolved()["roles"] == {}
    assert load_recipe(write_recipe(tmp_path, {}), ["roles_required=true"]).sha256() != no_roles.sha256()


def test_expressions_are_never_evaluated_as_python():
    condition = compile_condition("kind == '__import__(\"os\").system(\"false\")'")
    assert condition({"kind": "pair"}) is False
    assert condition({"kind": '__import__("os").system("false")'}) is True
    with pytest.raises(ExpressionError):
        compile_condition("(lambda: 1)() == 1")
    with pytest.raises(ExpressionError, match="longer than"):
        compile_condition("aesthetic > 1 and " * 200 + "true")


# --------------------------------------------------------------------------- placement in the plan


def test_the_role_step_is_the_last_step_of_the_selection(tmp_path):
    urls = pa.table({"url": ["http://example.org/a.jpg"], "caption": ["a red square"]})
    pq.write_table(urls, tmp_path / "urls.parquet")
    roles = {"generation": {"when": "aesthetic >= 5"}}
    demo = load_recipe(write_recipe(tmp_path, roles), [f"source.path={tmp_path / 'urls.parquet'}"])
    plan = compile_plan(demo)
    assert [(g.name, [s.name for s in g.stages]) for g in plan.groups] == [("prepare", ["fetch"])]
    assert [(seg.name, [s.name for s in seg.stages]) for seg in plan.segments] == [("select", ["fetch", "roles"])]

    (tmp_path / "scored.yaml").write_text(yaml.safe_dump(scored_recipe(roles, tmp_path / "o"), sort_keys=False))
    plan = compile_plan(load_recipe(tmp_path / "scored.yaml", [f"source.path={tmp_path / 'urls.parquet'}"]))
    assert [g.name for g in plan.groups] == ["prepare", "model"]
    assert [seg.name for seg in plan.segments] == ["select", "dedup_exact"]
    assert plan.segments[-1].corpus_stage == "dedup_exact"  # a corpus stage last: the step follows its decision
    assert [s.name for s in plan.segments[-1].stages] == ["roles"]
    assert all("roles" not in [s.name for s in p.stages] for p in [*plan.groups, *plan.segments[:-1]])

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    bare = {"source": {"type": "image_folder", "path": str(folder)}, "output": {"path": str(tmp_path / "o")},
            "roles": roles}
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(bare))
    plan = compile_plan(load_recipe(tmp_path / "bare.yaml"))
    assert plan.groups == [] and [(seg.name, [s.name for s in seg.stages]) for seg in plan.segments] == [
        ("select", ["roles"])]

    without = compile_plan(load_recipe(write_recipe(tmp_path, {}), [f"source.path={tmp_path / 'urls.parquet'}"]))
    assert all("roles" not in [s.name for s in p.stages] for p in without.phases)


# --------------------------------------------------------------------------- engine run


def scored_recipe(roles: dict, output: Path, **extra) -> dict:
    """Fetch, filters, the tiny CLIP and aesthetic models, exact dedup (a corpus stage, last), and `roles`."""
    return {
        "name": "roles-run",
        "source": {"type": "url_list", "path": "urls.parquet", "url_column": "url", "caption_column": "caption"},
        "stages": {
            "fetch": {"threads": 8, "retries": 2, "backoff_base": 0.05, "allow_private_addresses": True,
                      "host_rate": None, "resize": {"mode": "keep_ratio", "side": "longest", "size": 1024}},
            "basic_filter": {"min_side": 32, "max_aspect_ratio": 4, "min_caption_words": 2},
            "clip_score": {"model": {"model": "curate-tiny"}, "min_score": 0.7},
            "aesthetic": {"clip": {"model": "curate-tiny"}, "head": {"head": "tiny"}},
            "dedup_exact": {},
        },
        "output": {"path": str(output), "formats": ["parquet", "webdataset"]},
        "engine": {"rows_per_work_shard": 20},
        "roles": roles,
        **extra,
    }


ENGINE_ROLES = {
    "generation": {"when": "aesthetic >= 6.5 and min_side >= 300", "captions": ["alt"],
                   "resolution": {"buckets": [[512, 512], [640, 384], [384, 640]]}},
    "understanding": {"when": "clip_score >= 0.89 and caption_words >= 4", "captions": ["dense", "alt"],
                      "resolution": {"mode": "keep_ratio", "size": 448}},
    "editing": {"when": "kind == 'edit'"},
}


def expected_roles(row: dict) -> list[str]:
    """The engine roles computed here from a row's values, independently of curate.roles."""
    aesthetic, clip = (row["scores"] or {}).get("aesthetic"), (row["scores"] or {}).get("clip_score")
    sides = [min(m["width"], m["height"]) for m in row["image_meta"]]
    caption = next((c["text"] for name in ("dense", "alt") for c in row["captions"] if c["name"] == name), None)
    roles = []
    if aesthetic is not None and aesthetic >= 6.5 and sides and min(sides) >= 300:
        roles.append("generation")
    if clip is not None and clip >= 0.89 and caption is not None and len(caption.split()) >= 4:
        roles.append("understanding")
    if row["kind"] == "edit":
        roles.append("editing")
    return roles


@pytest.fixture(scope="module")
def role_run(local_ray, tmp_path_factory):
    folder = tmp_path_factory.mktemp("roles-run")
    recipe = scored_recipe(ENGINE_ROLES, folder / "out", roles_required=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    web = build_synthetic_web(n_images=40, seed=3)
    with LoopbackServer(web.routes) as server:
        write_url_list(web, server.base_url, folder / "urls.parquet")
        loaded = load_recipe(folder / "recipe.yaml", [f"source.path={folder / 'urls.parquet'}",
                                                      f"output.path={folder / 'out'}", "engine.keep_work=true"])
        manifest = execute(compile_plan(loaded), Console(file=io.StringIO()), progress=False)
    return folder / "out", manifest


def test_engine_run_writes_roles_that_match_an_independent_computation(role_run):
    output, manifest = role_run
    assert manifest["reconciliation"]["ok"]
    rows = pq.read_table(output / "parquet").to_pylist()
    assert rows and all(row["roles"] == expected_roles(row) for row in rows)
    assert all(row["roles"] for row in rows)  # roles_required: no kept sample without a role
    generation = sum("generation" in row["roles"] for row in rows)
    understanding = sum("understanding" in row["roles"] for row in rows)
    assert 0 < generation < len(rows) and 0 < understanding < len(rows)  # the conditions really split the corpus
    assert any(len(row["roles"]) == 2 for row in rows)

    dropped = pq.read_table(output / "drops.parquet").to_pylist()
    no_role = {d["key"] for d in dropped if d["reason"] == NO_ROLE}
    assert no_role and all(d["stage"] == "roles" for d in dropped if d["reason"] == NO_ROLE)
    work_shards = sorted((output / "_work" / "model").glob("[0-9]*[0-9].parquet"))  # the last phase's input
    before = [row for shard in work_shards for row in pq.read_table(shard).to_pylist()]
    assert all(expected_roles(row) == [] for row in before if row["key"] in no_role)
    funnel = {stage["name"]: stage for stage in manifest["stages"]}
    assert funnel["roles"]["dropped"] == {NO_ROLE: len(no_role)}
    assert funnel["roles"]["phase"] == "dedup_exact"


def test_manifest_counts_per_role_and_resolved_role_settings(role_run):
    output, manifest = role_run
    rows = pq.read_table(output / "parquet").to_pylist()
    expected = {}
    for name in ENGINE_ROLES:
        members = [row for row in rows if name in row["roles"]]
        expected[name] = {"samples": len(members), "images": sum(len(row["images"]) for row in members),
                          "bytes": sum(len(image["bytes"]) for row in members for image in row["images"])}
    assert manifest["roles"] == expected
    assert list(manifest["roles"]) == list(ENGINE_ROLES) and manifest["roles"]["editing"]["samples"] == 0
    assert manifest["captions"] == {"alt": len(rows)}
    resolved = manifest["recipe"]["resolved"]["roles"]
    assert resolved["understanding"]["captions"] == ["dense", "alt"]
    assert resolved["understanding"]["resolution"]["size"] == 448
    assert resolved["generation"]["resolution"]["buckets"] == [[512, 512], [640, 384], [384, 640]]
    assert manifest["recipe"]["resolved"]["roles_required"] is True
    tar_roles = {}
    for tar in sorted((output / "webdataset").glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    record = json.loads(archive.extractfile(member).read())
                    tar_roles[record["key"]] = json.loads(record["roles"])  # a JSON array in the .json record
    assert tar_roles == {row["key"]: row["roles"] for row in rows}
