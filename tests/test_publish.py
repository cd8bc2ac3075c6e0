"""`curate publish` against the loopback Hub (tests/fakehub): card, upload, resume, retries, dry run, token hygiene,
and read-back with `datasets.load_dataset` through the same endpoint."""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from curate.demo.server import LoopbackServer
from curate.demo.web import build_synthetic_web, write_url_list
from curate.publish import PublishError, PublishSettings, plan_repository, publish_output
from curate.publish import run as run_module
from curate.publish.plan import FILES_PER_COMMIT, generated_file, plan_commits, read_output, repo_paths
from curate.publish.upload import RetryPolicy

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO_ROOT / "pipelines" / "demo.yaml"
REPO = "curators/demo-pairs"
# The card's model table is checked on the example demo manifest; the test output skips the model pass to stay fast.
WITHOUT_MODELS_AND_DEDUP = ("stages.clip_score=false", "stages.aesthetic=false", "stages.watermark=false",
                            "stages.dedup_exact=false",
                            "stages.dedup_perceptual=false")
EXAMPLE_MANIFEST = REPO_ROOT / "manifests" / "example-demo.manifest.json"


def fast(**overrides) -> PublishSettings:
    """Small commits (so an output of a few shards takes several) and near-instant retries."""
    settings = {"max_files_per_commit": 4, "retry": RetryPolicy(retries=3, backoff_base=0.001, backoff_max=0.05)}
    return PublishSettings(**{**settings, **overrides})


@pytest.fixture(scope="module")
def output(tmp_path_factory, local_ray) -> Path:
    """A real output of the demo recipe (fetch and filters; model pass and dedup off), 10 rows a shard."""
    from curate.engine.run import compile_plan, execute
    from curate.recipe import load_recipe

    folder = tmp_path_factory.mktemp("publish")
    web = build_synthetic_web(n_images=48, seed=1)
    with LoopbackServer(web.routes) as server:
        write_url_list(web, server.base_url, folder / "urls.parquet")
        recipe = load_recipe(DEMO_RECIPE, [f"source.path={folder / 'urls.parquet'}", f"output.path={folder / 'out'}",
                                           "output.shard_rows=10", *WITHOUT_MODELS_AND_DEDUP])
        manifest = execute(compile_plan(recipe), Console(file=io.StringIO()), progress=False)
    assert manifest["reconciliation"]["ok"] and manifest["outputs"]["rows"] > 20
    return folder / "out"


@pytest.fixture(scope="module")
def charts(output) -> list:
    """The report's charts of `output`, drawn once for the module (they depend only on the output)."""
    return run_module.chart_files(output)


@pytest.fixture(autouse=True)
def _draw_charts_once(request, monkeypatch):
    if "output" in request.fixturenames:
        drawn = request.getfixturevalue("charts")
        monkeypatch.setattr(run_module, "chart_files", lambda output: list(drawn))


@pytest.fixture(scope="module")
def planned(output, charts) -> dict[str, bytes]:
    """Path -> content of every file the repository of `output` should hold (default layout)."""
    original, run_module.chart_files = run_module.chart_files, lambda folder: list(charts)
    try:
        plan = plan_repository(output, read_output(output), REPO)
    finally:
        run_module.chart_files = original
    return {file.path: file.read_bytes() for file in plan.files}


def local_rows(output: Path) -> list[dict]:
    return pq.read_table(sorted((output / "parquet").glob("*.parquet"))).to_pylist()


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def remote_tree(hub) -> dict[str, bytes]:
    files = hub.files(REPO)
    files.pop(".gitattributes")  # made by the Hub when the repository is created
    return files


def all_files_text(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in folder.rglob("*") if path.is_file())


# --------------------------------------------------------------------------- publish and load back


def test_published_dataset_loads_with_datasets_and_matches_the_local_shards(output, hub_env, planned):
    import datasets

    lines: list[str] = []
    result = publish_output(output, REPO, settings=fast(), say=lines.append)
    expected_commits = len(plan_commits(result.plan.data, 4)) + 1
    assert hub_env.stats.commits == result.upload.commits == expected_commits > 2
    assert remote_tree(hub_env) == planned
    assert any(line.startswith("published curators/demo-pairs@main") for line in lines)

    loaded = datasets.load_dataset(REPO, split="train")
    assert loaded.data.table.to_pylist() == local_rows(output)
    assert loaded.features["images"].feature.__class__.__name__ == "Image"
    first, meta = loaded[0]["images"][0], local_rows(output)[0]["image_meta"][0]
    assert first.size == (meta["width"], meta["height"])

    drops = datasets.load_dataset(REPO, "drops", split="train")
    assert drops.data.table.to_pylist() == pq.read_table(output / "drops.parquet").to_pylist()

    # the card's recipe for the WebDataset shards, through HfFileSystem on the same endpoint
    tars = datasets.load_dataset("webdataset", data_files={"train": f"hf://datasets/{REPO}/webdataset/*.tar"},
                                 split="train")
    assert sorted(tars["__key__"]) == sorted(row["key"] for row in local_rows(output))


def test_card_yaml_parses_and_its_configs_point_at_remote_files(output, hub_env):
    from huggingface_hub import DatasetCard

    publish_output(output, REPO, settings=fast(), say=lambda line: None)
    remote = remote_tree(hub_env)
    manifest = read_output(output)
    card = remote["README.md"].decode()
    metadata = front_matter(card)
    assert DatasetCard(card).data.to_dict()["configs"] == metadata["configs"]

    assert metadata["license"] == "unknown"  # the demo's URL list records no licenses
    assert metadata["task_categories"] == ["image-to-text", "text-to-image"]
    assert metadata["size_categories"] == ["n<1K"]
    assert metadata["pretty_name"] == "demo pairs" and "curate" in metadata["tags"]
    configs = {config["config_name"]: config for config in metadata["configs"]}
    assert list(configs) == ["default", "drops"]
    for name, formats in (("default", "parquet/"), ("drops", "drops.parquet")):
        pattern = configs[name]["data_files"][0]["path"]
        matched = {path for path in remote if fnmatch.fnmatch(path, pattern)}
        local = {s["path"] for s in manifest["outputs"]["shards"] if s["format"] == "parquet"} if name == "default" \
            else {"drops.parquet"}
        assert matched == local and all(path.startswith(formats) for path in matched)
    info = {entry["config_name"]: entry for entry in metadata["dataset_info"]}
    features = {feature["name"]: feature for feature in info["default"]["features"]}
    assert features["images"] == {"name": "images", "list": "image"}
    assert info["default"]["splits"] == [{"name": "train", "num_examples": manifest["outputs"]["rows"]}]

    body = card.split("---\n", 2)[2]
    for stage in manifest["stages"]:
        assert f"| {stage['name']} | {stage['phase']} | {stage['rows_in']:,} | {stage['rows_out']:,} |" in body
    assert "`min_side` = 32" in body  # a basic_filter threshold of the demo recipe
    assert f'load_dataset("{REPO}", split="train")' in body
    images = [line.split("(")[1].rstrip(")") for line in body.splitlines() if line.startswith("![")]
    assert images and all(path in remote and remote[path].startswith(b"\x89PNG") for path in images)


def test_card_body_lists_models_with_checksums_and_thresholds():
    from curate.publish.card import card_body

    manifest = json.loads(EXAMPLE_MANIFEST.read_text())
    body = card_body(manifest, REPO, "main", [], {}, {}, [])
    assert manifest["models"]
    for model in manifest["models"]:
        assert f"`{model['sha256']}`" in body and f"| {model['stage']} | {model['role']} |" in body
    assert "`min_score` = 0.7" in body  # clip_score's threshold in the demo recipe
    for name, summary in manifest.get("decisions", {}).items():
        assert f"| {name} | {summary['method']} |" in body


# --------------------------------------------------------------------------- resume, retries


def test_second_publish_of_the_same_output_uploads_nothing(output, hub_env):
    publish_output(output, REPO, settings=fast(), say=lambda line: None)
    hub_env.reset_records()
    result = publish_output(output, REPO, settings=fast(), say=lambda line: None)
    assert result.upload.uploaded_files == 0 and result.upload.skipped_files == len(result.plan.files)
    assert hub_env.stats.commits == hub_env.stats.lfs_uploads == hub_env.stats.committed_files == 0
    writes = [r.target for r in hub_env.write_requests()]
    assert writes == ["/api/repos/create"]  # answered 409: the repository exists


def test_interrupted_publish_resumes_without_uploading_committed_files_again(output, hub_env, planned):
    settings = fast()
    hub_env.fail(method="POST", path=r"/commit/", skip=1, times=100)  # every commit after the first fails
    with pytest.raises(PublishError, match="run the same command again"):
        publish_output(output, REPO, settings=settings, say=lambda line: None)
    assert hub_env.stats.commits == 1
    committed_first = remote_tree(hub_env)
    assert 0 < len(committed_first) <= 4

    hub_env.reset_records()
    result = publish_output(output, REPO, settings=settings, say=lambda line: None)
    assert remote_tree(hub_env) == planned
    assert result.upload.skipped_files == len(committed_first)
    uploaded_again = {r.target.split("?")[0].rsplit("/", 1)[1] for r in hub_env.requests if r.host == "storage"}
    first_digests = {file.sha256 for file in result.plan.files if file.path in committed_first}
    assert uploaded_again and not uploaded_again & first_digests


def test_transient_failures_are_retried_with_backoff_and_retry_after(output, hub_env, planned):
    waits: list[float] = []
    settings = fast(retry=RetryPolicy(retries=3, backoff_base=0.001, backoff_max=5, sleep=waits.append))
    hub_env.fail(method="POST", path=r"/commit/", skip=1, times=1, status=429, retry_after=0.3)
    hub_env.fail(method="POST", path=r"/paths-info/", times=1, status=503)
    result = publish_output(output, REPO, settings=settings, say=lambda line: None)
    assert remote_tree(hub_env) == planned
    assert len(waits) == 2 and max(waits) >= 0.3  # the 429's Retry-After is honoured
    assert hub_env.stats.commits == result.upload.commits


def test_a_commit_whose_answer_is_lost_is_not_made_twice(output, hub_env, planned):
    hub_env.fail(method="POST", path=r"/commit/", skip=1, times=1, drop_connection=True, after_handling=True)
    result = publish_output(output, REPO, settings=fast(), say=lambda line: None)
    assert remote_tree(hub_env) == planned
    assert hub_env.stats.commits == len(plan_commits(result.plan.data, 4)) + 1
    assert hub_env.stats.committed_files == len(result.plan.files)  # each file committed once


def test_stale_shards_on_the_remote_are_deleted(output, hub_env, planned):
    from huggingface_hub import CommitOperationAdd, HfApi

    hub_env.tree_page_size = 3  # listings come in several pages
    publish_output(output, REPO, settings=fast(), say=lambda line: None)
    api = HfApi(endpoint=hub_env.endpoint, token=hub_env.token)
    api.create_commit(REPO, [CommitOperationAdd("parquet/part-09999.parquet", b"PAR1 old shard"),
                             CommitOperationAdd("notes.txt", b"kept: outside the folders curate owns")],
                      commit_message="by hand", repo_type="dataset")
    result = publish_output(output, REPO, settings=fast(), say=lambda line: None)
    assert result.upload.deleted_files == ["parquet/part-09999.parquet"]
    assert remote_tree(hub_env) == {**planned, "notes.txt": b"kept: outside the folders curate owns"}
    assert any("/tree/" in r.target and "cursor=" in r.target for r in hub_env.requests)


def test_the_loopback_hub_serves_model_snapshots_and_keeps_private_repos_private(hub_env, tmp_path):
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(endpoint=hub_env.endpoint, token=hub_env.token)
    api.create_repo("org/tiny-clip", private=True)
    weights = bytes(range(256)) * 40
    api.create_commit("org/tiny-clip", [CommitOperationAdd("open_clip_config.json", b'{"embed_dim": 64}'),
                                        CommitOperationAdd("open_clip_model.safetensors", weights)],
                      commit_message="weights")
    folder = Path(snapshot_download("org/tiny-clip", cache_dir=tmp_path / "cache"))
    assert (folder / "open_clip_model.safetensors").read_bytes() == weights
    assert hub_env.repo("org/tiny-clip", "model").resolve("main").files["open_clip_model.safetensors"].lfs_sha256
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/tiny-clip", "open_clip_config.json", token=False, cache_dir=tmp_path / "anon")
    assert hub_env.token_leaks() == []


# --------------------------------------------------------------------------- token, dry run, CLI


def test_token_never_appears_in_files_logs_or_other_requests(output, hub_env, tmp_path, caplog, capfd):
    from huggingface_hub.utils import logging as hub_logging

    token = hub_env.token
    caplog.set_level(logging.DEBUG)
    hub_logging.set_verbosity_debug()
    try:
        publish_output(output, REPO, settings=fast(), say=print)
        publish_output(output, REPO, dry_run=tmp_path / "dry", say=print)
    finally:
        hub_logging.set_verbosity_warning()
    captured = capfd.readouterr()
    assert any(r.host == "hub" and r.headers.get("authorization") == f"Bearer {token}" for r in hub_env.requests)
    assert hub_env.token_leaks() == []
    assert "curators/demo-pairs" in captured.out and caplog.records  # something was printed and logged
    for text in (captured.out, captured.err, caplog.text):
        assert token not in text
    for content in (all_files_text(output), all_files_text(tmp_path / "dry"), *hub_env.files(REPO).values()):
        assert token.encode() not in content

    # the command line, in its own process, printing what it does
    done = subprocess.run([sys.executable, "-m", "curate.cli", "publish", str(output), "--repo", "curators/other",
                           "--private"], env=os.environ.copy(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "published curators/other@main" in done.stdout
    assert token not in done.stdout + done.stderr
    assert hub_env.repo("curators/other").private and hub_env.token_leaks() == []


def test_dry_run_writes_the_repository_tree_and_sends_no_request(output, hub_env, planned, tmp_path):
    from curate.cli import app

    target = tmp_path / "tree"
    done = CliRunner().invoke(app, ["publish", str(output), "--repo", REPO, "--dry-run", str(target)])
    assert done.exit_code == 0, done.output
    assert hub_env.requests == []
    written = {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert written == planned

    publish_output(output, REPO, settings=fast(), say=lambda line: None)
    assert remote_tree(hub_env) == written  # the dry run showed exactly what the upload made

    refused = CliRunner().invoke(app, ["publish", str(output), "--repo", REPO, "--dry-run", str(target)])
    assert refused.exit_code == 2 and "not empty" in refused.output


def test_the_card_and_manifest_copy_name_files_not_local_paths(output, planned):
    local = json.loads((output / "manifest.json").read_text())
    assert local["recipe"]["file"].startswith("/")  # the local manifest keeps where things are on this machine
    folder = str(output.parent)
    for name in ("README.md", "manifest.json"):
        assert folder not in planned[name].decode() and str(REPO_ROOT) not in planned[name].decode(), name
    public = json.loads(planned["manifest.json"])
    assert public["recipe"]["file"] == "demo.yaml"
    assert public["recipe"]["resolved"]["source"]["path"] == "urls.parquet"
    assert public["outputs"] == local["outputs"]
    assert planned["webdataset/sizes.json"] == (output / "webdataset" / "sizes.json").read_bytes()


def test_revision_goes_to_its_own_branch(output, hub_env, planned):
    publish_output(output, REPO, revision="v1", settings=fast(), say=lambda line: None)
    assert set(hub_env.files(REPO, revision="main")) == {".gitattributes"}
    branch = hub_env.files(REPO, revision="v1")
    assert set(branch) - {".gitattributes"} == set(planned)
    assert 'revision="v1"' in branch["README.md"].decode()


def test_refusals_name_the_problem(output, hub_env, tmp_path, monkeypatch):
    with pytest.raises(PublishError, match="OWNER/NAME"):
        publish_output(output, "no-owner", say=lambda line: None)
    with pytest.raises(PublishError, match="no manifest"):
        publish_output(tmp_path, REPO, say=lambda line: None)

    changed = tmp_path / "changed"
    shutil.copytree(output, changed)
    shard = sorted((changed / "parquet").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"X")
    with pytest.raises(PublishError, match="curate verify"):
        publish_output(changed, REPO, say=lambda line: None)

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        publish_output(output, REPO, say=lambda line: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match="no Hugging Face token") as missing:
        publish_output(output, REPO, say=lambda line: None)
    assert missing.value.code == 2
    assert hub_env.requests == []

    wrong = "hf_notTheRightToken42"
    monkeypatch.setenv("HF_TOKEN", wrong)
    with pytest.raises(PublishError, match="401") as refused:
        publish_output(output, REPO, settings=fast(), say=lambda line: None)
    assert wrong not in str(refused.value) and "write access" in str(refused.value)
    assert hub_env.stats.repos_created == 0


# --------------------------------------------------------------------------- layout planning


def test_a_folder_over_the_limit_is_split_into_numbered_subfolders():
    names = [f"parquet/part-{i:05d}.parquet" for i in range(7)] + ["drops.parquet"]
    mapping = repo_paths(names, max_files_per_folder=3)
    assert mapping["drops.parquet"] == "drops.parquet"
    assert [mapping[n] for n in names[:7]] == [f"parquet/{i // 3:04d}/part-{i:05d}.parquet" for i in range(7)]
    assert repo_paths(names[:3], max_files_per_folder=3) == {n: n for n in names[:3]}
    with pytest.raises(PublishError, match="two folder levels"):
        repo_paths([f"x/{i}" for i in range(10)], max_files_per_folder=3)


def test_commits_are_bounded_by_files_and_bytes():
    files = [generated_file(f"f{i}", b"x" * size) for i, size in enumerate([5, 5, 5, 50, 5, 5])]
    assert [[f.path for f in c] for c in plan_commits(files, max_files=2, max_bytes=100)] == \
        [["f0", "f1"], ["f2", "f3"], ["f4", "f5"]]
    assert [[f.path for f in c] for c in plan_commits(files, max_files=10, max_bytes=20)] == \
        [["f0", "f1", "f2"], ["f3"], ["f4", "f5"]]
    assert FILES_PER_COMMIT <= 100


def test_split_layout_is_published_and_loads(output, hub_env):
    import datasets

    result = publish_output(output, REPO, settings=fast(max_files_per_folder=2), say=lambda line: None)
    remote = remote_tree(hub_env)
    shards = sorted(path for path in remote if path.startswith("parquet/"))
    folders = {path.rsplit("/", 1)[0] for path in shards}
    assert len(folders) > 1 and all(sum(p.startswith(f + "/") for p in shards) <= 2 for f in folders)
    metadata = front_matter(remote["README.md"].decode())
    assert metadata["configs"][0]["data_files"][0]["path"] == "parquet/*/*.parquet"
    assert set(result.plan.shard_paths.values()) <= set(remote)
    loaded = datasets.load_dataset(REPO, split="train")
    assert loaded.data.table.to_pylist() == local_rows(output)


def relayout(output: Path, target: Path, move) -> Path:
    """A copy of `output` with each shard moved to `move(shard)` (None: removed), its manifest rewritten."""
    shutil.copytree(output, target)
    manifest = json.loads((target / "manifest.json").read_text())
    kept = []
    for shard in manifest["outputs"]["shards"]:
        new = move(shard)
        if new is None:
            (target / shard["path"]).unlink()
            continue
        (target / new).parent.mkdir(parents=True, exist_ok=True)
        (target / shard["path"]).rename(target / new)
        kept.append({**shard, "path": new})
    manifest["outputs"]["shards"] = kept
    manifest["outputs"]["formats"] = [f for f in manifest["outputs"]["formats"] if any(s["format"] == f for s in kept)]
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_an_output_with_role_folders_gets_one_config_per_role(output, hub_env, tmp_path):
    import datasets

    def by_role(shard):
        folder, name = shard["path"].split("/")
        role = "understanding" if int(name.split("-")[1].split(".")[0]) % 2 == 0 else "generation"
        return f"{folder}/{role}/{name}"

    roles = relayout(output, tmp_path / "roles", by_role)
    publish_output(roles, REPO, settings=fast(), say=lambda line: None)
    metadata = front_matter(hub_env.files(REPO)["README.md"].decode())
    assert [(c["config_name"], c["data_files"][0]["path"], c.get("default")) for c in metadata["configs"]] == [
        ("generation", "parquet/generation/*.parquet", True),
        ("understanding", "parquet/understanding/*.parquet", None), ("drops", "drops.parquet", None)]
    assert {"generation", "understanding"} <= set(metadata["tags"])
    for role in ("generation", "understanding"):
        loaded = datasets.load_dataset(REPO, role, split="train")
        expected = pq.read_table(sorted((roles / "parquet" / role).glob("*.parquet"))).to_pylist()
        assert loaded.data.table.to_pylist() == expected and expected


def test_a_webdataset_only_output_is_loadable_from_its_card(output, hub_env, tmp_path):
    import datasets

    tars_only = relayout(output, tmp_path / "tars", lambda s: s["path"] if s["format"] == "webdataset" else None)
    publish_output(tars_only, REPO, settings=fast(), say=lambda line: None)
    remote = remote_tree(hub_env)
    metadata = front_matter(remote["README.md"].decode())
    assert [c["data_files"][0]["path"] for c in metadata["configs"]] == ["webdataset/*.tar"]
    assert "dataset_info" not in metadata and not any(path.startswith("parquet/") for path in remote)
    loaded = datasets.load_dataset(REPO, split="train")
    assert sorted(loaded["__key__"]) == sorted(row["key"] for row in local_rows(output))


def test_the_remote_check_names_missing_changed_and_stale_files():
    from curate.publish.remote import RemoteFile, check_remote

    card, shard = generated_file("README.md", b"# card\n"), generated_file("parquet/part-00000.parquet", b"PAR1 rows")
    manifest = {"outputs": {"shards": [{"path": "parquet/part-00000.parquet", "bytes": shard.size,
                                        "sha256": shard.sha256}]}}
    matching = {card.path: RemoteFile(card.path, card.size, card.git_sha1()),
                shard.path: RemoteFile(shard.path, shard.size, "pointer-blob-id", shard.sha256)}
    assert check_remote(matching, [card, shard], manifest, {}, ["parquet"]) == []
    changed = {**matching, shard.path: RemoteFile(shard.path, shard.size, "pointer-blob-id", "0" * 64),
               "parquet/part-00001.parquet": RemoteFile("parquet/part-00001.parquet", 3, "x", "1" * 64)}
    del changed[card.path]
    problems = check_remote(changed, [card, shard], manifest, {}, ["parquet"])
    assert problems == ["README.md: missing on the remote",
                        "parquet/part-00000.parquet: the remote content differs from the local file",
                        "parquet/part-00000.parquet: the remote copy does not match the manifest's size and sha256",
                        "parquet/part-00001.parquet: on the remote but not in this output"]
