"""`curate models pull` / `curate models list` as a user types them, against the loopback Hub (tests/fakehub)
and the loopback HTTP server, with every cache under tmp_path; and the one-line notice of the tiny models."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.demo.server import Route
from curate.models import tiny_notice
from curate.models.aesthetic import TINY_AESTHETIC, check_aesthetic_available
from curate.models.clip import TINY_CLIP, ClipSpec, ModelUnavailable, check_clip_available
from curate.models.watermark import TINY_WATERMARK, WatermarkSpec, check_watermark_available

CURATE = Path(sys.executable).with_name("curate")


@pytest.fixture
def caches(hub_env, tmp_path, monkeypatch):
    """The loopback Hub with HF_HOME and CURATE_CACHE (and HOME, for open_clip's URL cache) under tmp_path."""
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "curate-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return hub_env


def seed(hub, repo: str, files: dict[str, bytes], private: bool = False) -> None:
    """A model repository on the loopback Hub holding `files`."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo(repo, private=private)
    api.create_commit(repo, [CommitOperationAdd(name, data) for name, data in files.items()],
                      commit_message="weights")


def hub_file(arch: str, tag: str) -> tuple[str, str]:
    """The repository and (safetensors) file a real open_clip pretrained tag points at."""
    repo, filename = os.path.split(open_clip.get_pretrained_cfg(arch, tag)["hf_hub"])
    assert repo and not filename  # "org/repo/": open_clip's default weights file
    return repo, "open_clip_model.safetensors"


def fake_weights(seed_byte: int, size: int = 6000) -> bytes:
    return bytes((seed_byte + i * 7) % 256 for i in range(size))


def curate(*args: str):
    return CliRunner().invoke(app, list(args))


def printed(result) -> str:
    """What the user sees: stdout and stderr (click >= 8.2 mixes both into `output`)."""
    return result.output


def go_offline(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --------------------------------------------------------------------------- open_clip pretrained tags


def test_pulled_tag_is_what_the_offline_resolver_reads(caches, tmp_path, monkeypatch):
    tag = "laion2b_s34b_b79k"
    repo, filename = hub_file("ViT-B-32", tag)
    weights = fake_weights(1)
    sha = hashlib.sha256(weights).hexdigest()
    seed(caches, repo, {filename: weights, "open_clip_pytorch_model.bin": fake_weights(2)})

    result = curate("models", "pull", f"ViT-B-32/{tag}")
    assert result.exit_code == 0, printed(result)
    assert f"model: {{model: ViT-B-32, pretrained: {tag}, sha256: {sha}}}" in result.output
    assert f"sha256: {sha}" in result.output and f"{len(weights):,} bytes" in result.output
    path = Path(re.search(r"file: +(\S+)", result.output).group(1))
    assert path.read_bytes() == weights and path.name == filename  # the safetensors file, as open_clip prefers
    assert str(path).startswith(str(tmp_path / "hf-home" / "hub"))
    downloads = [r.target for r in caches.requests if r.host == "storage" and r.method == "GET"]
    assert len(downloads) == 1 and f"/{sha}?" in downloads[0]  # the .bin was not downloaded
    assert caches.token_leaks() == []

    go_offline(monkeypatch)
    seen = len(caches.requests)
    info = check_clip_available(ClipSpec(model="ViT-B-32", pretrained=tag, sha256=sha))
    assert Path(info["weights"]) == path and info["sha256"] == sha and info["source"] == "hf_cache"
    assert len(caches.requests) == seen  # resolved from the cache alone

    again = curate("models", "pull", f"ViT-B/32/{tag}")  # offline, and open_clip's other spelling
    assert again.exit_code == 0, printed(again)
    assert "already cached" in again.output and f"sha256: {sha}" in again.output
    assert len(caches.requests) == seen


def test_pull_falls_back_to_the_bin_file_and_checks_the_pin(caches, monkeypatch):
    repo, _ = hub_file("ViT-B-32", "openai")
    weights = fake_weights(3)
    sha = hashlib.sha256(weights).hexdigest()
    seed(caches, repo, {"open_clip_pytorch_model.bin": weights})

    wrong = "0" * 64
    refused = curate("models", "pull", "ViT-B-32/openai", "--sha256", wrong)
    assert refused.exit_code == 2
    assert sha in printed(refused) and wrong in printed(refused)
    with pytest.raises(ModelUnavailable):
        check_clip_available(ClipSpec(model="ViT-B-32", pretrained="openai"))

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # as a user who never set it
    monkeypatch.delenv("HF_HUB_DISABLE_XET")
    result = curate("models", "pull", "ViT-B-32/openai", "--sha256", sha.upper())
    assert result.exit_code == 0, printed(result)
    assert constants.HF_HUB_DISABLE_XET and os.environ["HF_HUB_DISABLE_XET"] == "1"  # a non-HF endpoint: no Xet
    go_offline(monkeypatch)
    info = check_clip_available(ClipSpec(model="ViT-B-32", pretrained="openai"))
    assert Path(info["weights"]).name == "open_clip_pytorch_model.bin" and info["sha256"] == sha
    assert Path(info["weights"]).read_bytes() == weights


def test_a_damaged_download_is_deleted_and_names_both_hashes(caches):
    repo, filename = hub_file("ViT-B-32", "laion2b_s34b_b79k")
    weights = fake_weights(4)
    listed = hashlib.sha256(weights).hexdigest()
    seed(caches, repo, {filename: weights})
    damaged = bytes(reversed(weights))  # same size, other bytes: what a broken mirror or transfer delivers
    caches.store.lfs_objects[(("model", repo), listed)] = damaged

    result = curate("models", "pull", "ViT-B-32/laion2b_s34b_b79k")
    assert result.exit_code == 2
    assert listed in printed(result) and hashlib.sha256(damaged).hexdigest() in printed(result)
    with pytest.raises(ModelUnavailable):
        check_clip_available(ClipSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    hub_cache = Path(os.environ["HF_HOME"]) / "hub"
    assert not [p for p in cache_files(hub_cache) if p.read_bytes() == damaged]


def test_a_damaged_cached_file_is_flagged_and_pulled_again(caches, monkeypatch):
    tag = "laion2b_s34b_b79k"
    repo, filename = hub_file("ViT-B-32", tag)
    weights = fake_weights(11)
    sha = hashlib.sha256(weights).hexdigest()
    seed(caches, repo, {filename: weights})
    assert curate("models", "pull", f"ViT-B-32/{tag}").exit_code == 0
    cached = Path(check_clip_available(ClipSpec(model="ViT-B-32", pretrained=tag))["weights"])
    cached.resolve().write_bytes(weights[:-100])  # an interrupted copy, say

    [line] = [line for line in curate("models", "list").output.splitlines() if line.startswith("hf ")]
    assert "DAMAGED" in line and sha in line

    go_offline(monkeypatch)  # offline, it cannot be mended: said with both hashes
    offline = curate("models", "pull", f"ViT-B-32/{tag}")
    assert offline.exit_code == 2 and sha in printed(offline)
    assert hashlib.sha256(weights[:-100]).hexdigest() in printed(offline) and "HF_HUB_OFFLINE" in printed(offline)

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    result = curate("models", "pull", f"ViT-B-32/{tag}")
    assert result.exit_code == 0, printed(result)
    assert "pulled" in result.output and cached.read_bytes() == weights
    [line] = [line for line in curate("models", "list").output.splitlines() if line.startswith("hf ")]
    assert "DAMAGED" not in line and f"sha256 {sha}" in line


def test_unknown_names_are_clear_errors(caches):
    for name, expected in [("ViT-B-32/no-such-tag", "ViT-B-32/laion2b_s34b_b79k"),
                           ("ViT-B-32", "needs a pretrained tag"),
                           ("no-such-thing", "not an open_clip model"),
                           ("missing.yaml", "no recipe file")]:
        result = curate("models", "pull", name)
        assert result.exit_code == 2 and expected in printed(result), (name, printed(result))
        assert "Traceback" not in printed(result)
    assert caches.requests == []


# --------------------------------------------------------------------------- hf-hub models, private, subprocess


def test_hf_hub_model_from_a_private_repo_with_hf_token_in_a_subprocess(caches, tmp_path, monkeypatch):
    config = {"model_cfg": {"embed_dim": 64, "text_cfg": {"hf_tokenizer_name": "org/tokenizer"}},
              "preprocess_cfg": {}}
    weights = fake_weights(5)
    seed(caches, "org/clip-mini", {"open_clip_config.json": json.dumps(config).encode(),
                                   "open_clip_model.safetensors": weights}, private=True)
    seed(caches, "org/tokenizer", {"tokenizer.json": b'{"model": {}}', "tokenizer_config.json": b"{}",
                                   "unrelated.bin": b"\0not a tokenizer file"})

    monkeypatch.delenv("HF_TOKEN")
    anonymous = curate("models", "pull", "hf-hub:org/clip-mini")
    assert anonymous.exit_code == 2 and "HF_TOKEN" in printed(anonymous)
    monkeypatch.setenv("HF_TOKEN", caches.token)

    done = subprocess.run([str(CURATE), "models", "pull", "hf-hub:org/clip-mini"], env=os.environ.copy(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sha = hashlib.sha256(weights).hexdigest()
    assert f"model: {{model: hf-hub:org/clip-mini, sha256: {sha}}}" in done.stdout
    assert caches.token not in done.stdout + done.stderr and caches.token_leaks() == []

    go_offline(monkeypatch)
    info = check_clip_available(ClipSpec(model="hf-hub:org/clip-mini"))
    assert Path(info["weights"]).read_bytes() == weights and info["sha256"] == sha
    from huggingface_hub import try_to_load_from_cache

    hub_cache = tmp_path / "hf-home" / "hub"
    assert isinstance(try_to_load_from_cache("org/tokenizer", "tokenizer.json", cache_dir=hub_cache), str)
    assert not isinstance(try_to_load_from_cache("org/tokenizer", "unrelated.bin", cache_dir=hub_cache), str)


# --------------------------------------------------------------------------- URLs


def test_url_with_its_sha256_lands_in_the_url_cache(caches, loopback, tmp_path):
    body = fake_weights(6, 3000)
    sha = hashlib.sha256(body).hexdigest()
    loopback.routes["/heads/linear-probe.pt"] = route = Route(body=body, content_type="application/octet-stream")
    url = loopback.url("/heads/linear-probe.pt")

    result = curate("models", "pull", url, "--sha256", sha)
    assert result.exit_code == 0, printed(result)
    cached = tmp_path / "curate-cache" / "weights" / sha / "linear-probe.pt"
    assert cached.read_bytes() == body
    assert f"checkpoint: {cached}" in result.output and f"sha256: {sha}" in result.output
    assert f"head: {{path: {url}, sha256: {sha}}}" in result.output

    again = curate("models", "pull", url, "--sha256", sha)
    assert again.exit_code == 0 and "already cached" in again.output and route.hits == 1


def test_url_with_a_wrong_sha256_fails_and_leaves_nothing(caches, loopback, tmp_path):
    body = fake_weights(7, 3000)
    loopback.routes["/head.pth"] = Route(body=body, content_type="application/octet-stream")
    wrong = "ab" * 32

    result = curate("models", "pull", loopback.url("/head.pth"), "--sha256", wrong)
    assert result.exit_code != 0
    assert hashlib.sha256(body).hexdigest() in printed(result) and wrong in printed(result)
    assert list((tmp_path / "curate-cache").rglob("*")) in ([], [tmp_path / "curate-cache" / "weights"])

    unpinned = curate("models", "pull", loopback.url("/head.pth"))
    assert unpinned.exit_code == 2 and "--sha256" in printed(unpinned)
    assert cache_files(tmp_path / "curate-cache") == []


# --------------------------------------------------------------------------- recipes and presets


@pytest.mark.parametrize("name", ["safe_generation", "demo"])
def test_a_recipe_of_tiny_models_has_nothing_to_pull(caches, tmp_path, name):
    result = curate("models", "pull", name)
    assert result.exit_code == 0, printed(result)
    assert f"nothing to pull: {name} names only curate's tiny models" in result.output
    assert "not meaningful on real photos" in result.output
    assert caches.requests == []
    assert cache_files(tmp_path / "curate-cache") == [] and cache_files(tmp_path / "hf-home" / "hub") == []


def test_a_recipe_pulls_every_clip_and_head_it_names_and_list_shows_them(caches, loopback, tmp_path):
    tag = "laion2b_s34b_b79k"
    repo, filename = hub_file("ViT-B-32", tag)
    clip_weights = fake_weights(8)
    seed(caches, repo, {filename: clip_weights})
    head = fake_weights(9, 2000)
    head_sha = hashlib.sha256(head).hexdigest()
    loopback.routes["/aesthetic.pth"] = Route(body=head, content_type="application/octet-stream")
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "watermark-probe.safetensors").write_bytes(b"a local head")
    recipe = tmp_path / "recipe" / "real.yaml"
    recipe.write_text(f"""
name: real
source: {{type: url_list, path: urls.parquet}}
stages:
  clip_score: {{model: {{model: ViT-B-32, pretrained: {tag}}}}}
  aesthetic:
    clip: {{model: ViT-B-32, pretrained: {tag}}}
    head: {{head: laion_v2, path: {loopback.url('/aesthetic.pth')}, sha256: {head_sha}}}
  watermark:
    clip: {{model: ViT-B-32, pretrained: {tag}}}
    head: {{head: linear, path: watermark-probe.safetensors}}
output: {{path: out}}
""")
    result = curate("models", "pull", str(recipe))
    assert result.exit_code == 0, printed(result)
    assert "stages.clip_score.model: pulled ViT-B-32/laion2b_s34b_b79k" in result.output
    assert "stages.aesthetic.head: pulled http" in result.output
    assert "stages.aesthetic.clip: ViT-B-32/laion2b_s34b_b79k (see above)" in result.output
    # a relative head path is read from the recipe's folder, as the run does
    assert f"stages.watermark.head: local file {tmp_path / 'recipe' / 'watermark-probe.safetensors'}" in result.output
    clip_sha = hashlib.sha256(clip_weights).hexdigest()
    assert len([r for r in caches.requests if r.method == "GET" and f"/{clip_sha}?" in r.target]) == 1
    assert (tmp_path / "curate-cache" / "weights" / head_sha / "aesthetic.pth").read_bytes() == head

    listing = curate("models", "list")
    assert listing.exit_code == 0, printed(listing)
    lines = listing.output.splitlines()
    [hf_line] = [line for line in lines if line.startswith("hf ")]
    assert f"ViT-B-32/{tag}" in hf_line and f"{repo}/{filename}" in hf_line
    assert f"sha256 {clip_sha}" in hf_line and f"{len(clip_weights):,} bytes" in hf_line
    [url_line] = [line for line in lines if line.startswith("url ")]
    assert f"sha256 {head_sha}" in url_line and f"{len(head):,} bytes" in url_line and "DAMAGED" not in url_line
    assert "nothing pulled yet" not in listing.output

    damaged = tmp_path / "curate-cache" / "weights" / ("c" * 64) / "other.pth"
    damaged.parent.mkdir()
    damaged.write_bytes(b"not what its folder says")
    assert "DAMAGED" in [line for line in curate("models", "list").output.splitlines() if "other.pth" in line][0]


def test_a_bundled_preset_pulls_its_clip_and_names_the_head_it_cannot_pull(caches, tmp_path):
    repo, filename = hub_file("ViT-L-14", "openai")
    weights = fake_weights(10)
    seed(caches, repo, {filename: weights})

    result = curate("models", "pull", "laion_aesthetic_5")
    assert result.exit_code == 2
    output = printed(result)
    assert "pulled ViT-L-14/openai" in output and "sac+logos+ava1-l14-linearMSE.pth" in output
    assert "improved-aesthetic-predictor" in output  # where the head comes from
    info = check_clip_available(ClipSpec(model="ViT-L-14", pretrained="openai"))
    assert Path(info["weights"]).read_bytes() == weights


def test_list_with_empty_caches_says_so(caches, tmp_path):
    result = curate("models", "list")
    assert result.exit_code == 0, printed(result)
    assert str(tmp_path / "hf-home" / "hub") in result.output and str(tmp_path / "curate-cache") in result.output
    assert "nothing pulled yet" in result.output
    assert not [line for line in result.output.splitlines() if line.startswith(("hf ", "url "))]
    assert "curate-tiny" in result.output  # the shipped tiny models are listed as such


# --------------------------------------------------------------------------- the tiny models' notice


def test_tiny_models_log_one_notice_per_process(caplog, monkeypatch, tmp_path):
    probe = tmp_path / "probe.safetensors"
    probe.write_bytes(b"a linear probe")
    real_and_tiny = [
        (lambda: check_watermark_available(WatermarkSpec(head="linear", path=str(probe))), 0),  # not for real heads
        (lambda: check_clip_available(TINY_CLIP), 1),
        (lambda: check_clip_available(ClipSpec(model="curate-tiny")), 1),
        (lambda: check_aesthetic_available(TINY_AESTHETIC), 1),
        (lambda: check_watermark_available(TINY_WATERMARK), 1),
    ]
    for check, expected in real_and_tiny:  # each loader says it, once however often it is called
        monkeypatch.setattr(tiny_notice, "_noticed", False)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            check()
            check()
        assert [r.getMessage() for r in caplog.records].count(tiny_notice.TINY_NOTICE) == expected

    monkeypatch.setattr(tiny_notice, "_noticed", False)  # and all of them together: one line per process
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for check, _ in real_and_tiny:
            check()
    notices = [r.getMessage() for r in caplog.records if r.getMessage() == tiny_notice.TINY_NOTICE]
    assert len(notices) == 1 and "\n" not in notices[0] and "not meaningful on real photos" in notices[0]


def test_the_notice_reaches_the_user_of_a_run_once(tmp_path):
    code = ("import logging, io, sys\n"
            "from curate.models.clip import TINY_CLIP, check_clip_available\n"
            "from curate.models.aesthetic import TINY_AESTHETIC, check_aesthetic_available\n"
            "for _ in range(3):\n"
            "    check_clip_available(TINY_CLIP); check_aesthetic_available(TINY_AESTHETIC)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("for the tests and the demo, not meaningful on real photos") == 1
