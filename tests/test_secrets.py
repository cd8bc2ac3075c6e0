"""Secrets (tokens in the environment or a recipe, passwords in URLs) never reach logs, manifests, drop logs,
shards, dataset cards or the HTML report (curate/redact.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from curate.cli import app
from curate.demo.server import LoopbackServer, Route
from curate.redact import (
    MASK,
    redact_data,
    redact_drop_table,
    redact_sample_urls,
    redact_text,
    redact_url,
    secret_key_name,
)
from curate.schema import DROP_SCHEMA, from_rows

ENVIRONMENT = {
    "HF_TOKEN": "hf_EnvironmentToken0123456789abcdefXYZ",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEACCESSKEY123",
    "AWS_SECRET_ACCESS_KEY": "fake/Secret+Access/Key0123456789abcdefgh",
    "AWS_SESSION_TOKEN": "FakeSessionTokenValue0123456789abcdefghijkl",
}
RECIPE_TOKEN = "hf_RecipeToken9876543210zyxwvutsrqpon"
BEARER = "FakeBearerValue_0123456789"
URL_PASSWORDS = ("hunter2-url-password", "another-url-password")
SECRETS = (*ENVIRONMENT.values(), RECIPE_TOKEN, BEARER, *URL_PASSWORDS)


def jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("text, kept, gone", [
    ("http://user:hunter2@host/a.jpg", "http://user:***@host/a.jpg", "hunter2"),
    ("https://ghp_tokenAsUser@github.example/x", "https://***@github.example/x", "ghp_tokenAsUser"),
    ("fetch https://u:pw@a.example@127.0.0.1/x failed", "https://u:***@127.0.0.1/x failed", "pw@a.example"),
    ("http://host/a.jpg?x=1&token=abc123&X-Amz-Signature=f00d#top", "?x=1&token=***&X-Amz-Signature=***#top",
     "abc123"),
    ("Authorization: Bearer abcdefghijkl", "Authorization: ***", "abcdefghijkl"),
    ('{"authorization": "Basic dXNlcjpwYXNz"}', '{"authorization": "***"}', "dXNlcjpwYXNz"),
    ("key AKIAABCDEFGHIJKLMNOP used", "key *** used", "AKIAABCDEFGHIJKLMNOP"),
    ("pasted hf_abcdefghijklmnopqrstuvwxyz012345 here", "pasted *** here", "hf_abcdefghij"),
])
def test_redact_text_masks_each_kind_of_secret(text, kept, gone):
    redacted = redact_text(text)
    assert kept in redacted and gone not in redacted


def test_redact_text_leaves_ordinary_text_alone():
    for text in ("write to user@example.com", "http://host/a@b.jpg", "min_side=64 and key=clip_score",
                 "https://images.example/cat.jpg"):
        assert redact_text(text).replace("key=***", "key=clip_score") == text


def test_environment_secret_values_are_masked_anywhere(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "correct horse battery")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to be worth masking
    assert redact_text("login with correct horse battery please") == f"login with {MASK} please"
    assert redact_text("abc stays") == "abc stays"


def test_redact_data_masks_values_of_credential_keys_but_not_ordinary_keys():
    recipe = {"source": {"url_key": "url", "license_key": "license", "hf_token": "anything", "api_key": "k",
                         "password": "", "Secret-Access-Key": "s"},
              "stages": {"fetch": {"user_agent_token": "curate", "resolve": {"h": "1.2.3.4"}}},
              "list": [{"token": "t"}, "http://u:p@h/x"]}
    redacted = redact_data(recipe)
    assert redacted["source"] == {"url_key": "url", "license_key": "license", "hf_token": MASK, "api_key": MASK,
                                  "password": "", "Secret-Access-Key": MASK}
    assert redacted["stages"] == recipe["stages"]
    assert redacted["list"] == [{"token": MASK}, "http://u:***@h/x"]
    assert recipe["source"]["hf_token"] == "anything"  # a copy: the input is untouched
    assert not secret_key_name("sort_key") and secret_key_name("AWS_SECRET_ACCESS_KEY")


def test_redact_url_keeps_everything_but_the_credentials():
    assert redact_url("http://user:pw@host:8080/a/b.jpg?q=1") == "http://user:***@host:8080/a/b.jpg?q=1"
    assert redact_url("http://host/a.jpg") == "http://host/a.jpg"
    assert redact_url(None) is None


def test_sample_and_drop_tables_lose_url_passwords_and_keep_everything_else():
    samples = from_rows([
        {"key": "0" * 16, "kind": "pair", "images": [{"bytes": None, "path": None}],
         "image_meta": [{"url": "http://u:secretpw@h/a.jpg"}], "source": {"url": "http://u:secretpw@h/a.jpg"}},
        {"key": "1" * 16, "kind": "pair", "images": [{"bytes": None, "path": None}],
         "image_meta": [{"url": "http://h/b.jpg"}], "source": {"url": "http://h/b.jpg"}},
    ])
    redacted = redact_sample_urls(samples).to_pylist()
    assert [row["image_meta"][0]["url"] for row in redacted] == ["http://u:***@h/a.jpg", "http://h/b.jpg"]
    assert [row["source"]["url"] for row in redacted] == ["http://u:***@h/a.jpg", "http://h/b.jpg"]
    clean = samples.slice(1)
    assert redact_sample_urls(clean) is clean  # nothing to mask: the very same table, no copy
    drops = pa.Table.from_pylist([{"key": "0" * 16, "url": "http://u:secretpw@h/a.jpg", "stage": "fetch",
                                   "reason": "http_404", "detail": "GET http://u:secretpw@h/a.jpg: 404"}],
                                 schema=DROP_SCHEMA)
    row = redact_drop_table(drops).to_pylist()[0]
    assert row["url"] == "http://u:***@h/a.jpg" and "secretpw" not in row["detail"]


def test_drop_details_are_masked_row_by_row_when_they_repeat():
    details = ["robots.txt of http://h unreachable", None, "GET http://h/x?token=abcdefgh123: 403",
               "robots.txt of http://h unreachable", "GET http://h/x?token=abcdefgh123: 403", None, "plain 404"]
    drops = pa.Table.from_pylist([{"key": f"{n:016d}", "url": "http://h/x", "stage": "fetch", "reason": "r",
                                   "detail": detail} for n, detail in enumerate(details)], schema=DROP_SCHEMA)
    masked = redact_drop_table(drops).column("detail").to_pylist()
    assert masked == [redact_text(detail) for detail in details]
    assert masked[2] == masked[4] and "abcdefgh123" not in masked[2] and "token=***" in masked[2]
    assert masked[1] is None and masked[6] == "plain 404"


# --------------------------------------------------------------------------- a run through the command line


def texts_of(path: Path) -> str:
    """Everything a person or a program could read from `path`: Parquet decoded, tars member by member."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        keep = [name for name in table.column_names if name != "images"]
        return json.dumps(table.select(keep).to_pylist(), default=str, ensure_ascii=False)
    if path.suffix == ".tar":
        with tarfile.open(path) as tar:
            return "\n".join(tar.extractfile(member).read().decode("utf-8", "replace")
                             for member in tar.getmembers() if member.isfile())
    return path.read_bytes().decode("utf-8", "replace")


def curate(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curate.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, cwd=cwd)


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secrets")
    routes = {"/a.jpg": Route(body=jpeg((200, 20, 20))), "/b.jpg": Route(body=jpeg((20, 200, 20)))}
    with LoopbackServer(routes) as server:
        host = server.base_url.split("://", 1)[1]
        (folder / "urls.csv").write_text(
            "url,caption\n"
            f"http://reader:{URL_PASSWORDS[0]}@{host}/a.jpg,a red picture\n"
            f"http://{host}/b.jpg,a green picture\n"
            f"http://reader:{URL_PASSWORDS[1]}@{host}/missing.jpg,a missing picture\n")
        (folder / "recipe.yaml").write_text(
            "name: secrets\n"
            f"description: 'private mirror; pasted by mistake: {RECIPE_TOKEN}, Authorization: Bearer {BEARER}'\n"
            "source: {type: url_list, path: urls.csv}\n"
            "stages:\n"
            "  fetch: {allow_private_addresses: true, host_rate: null, retries: 0}\n"
            "  basic_filter: {min_side: 8}\n"
            "output: {path: out, formats: [parquet, webdataset]}\n")
        runs = [curate("run", "recipe.yaml", "--no-progress", env=ENVIRONMENT, cwd=folder)]
    runs.append(curate("inspect", "out", "--html", "report.html", env=ENVIRONMENT, cwd=folder))
    runs.append(curate("publish", "out", "--repo", "someone/secrets", "--dry-run", "card", env=ENVIRONMENT,
                       cwd=folder))
    runs.append(curate("run", "recipe.yaml", "--dry-run", env=ENVIRONMENT, cwd=folder))
    return folder, runs


def test_a_run_with_secrets_in_environment_recipe_and_urls_writes_and_prints_none_of_them(secret_run):
    folder, runs = secret_run
    for result in runs:
        assert result.returncode == 0, result.stderr
    written = [path for path in sorted(folder.rglob("*")) if path.is_file() and path.name != "recipe.yaml"
               and path.name != "urls.csv"]
    assert {p.name for p in written} >= {"manifest.json", "drops.parquet", "report.html", "README.md",
                                         "part-00000.parquet", "part-00000.tar"}
    sources = {str(path.relative_to(folder)): texts_of(path) for path in written}
    sources.update({f"output of command {i}": result.stdout + result.stderr for i, result in enumerate(runs)})
    for name, text in sources.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} found in {name}"


def test_urls_keep_where_they_point_and_the_recipe_keeps_its_meaning(secret_run):
    folder, _ = secret_run
    manifest = json.loads((folder / "out" / "manifest.json").read_text())
    assert manifest["reconciliation"]["ok"] and manifest["reconciliation"]["input_rows"] == 3
    assert manifest["recipe"]["resolved"]["stages"]["basic_filter"]["min_side"] == 8
    assert MASK in manifest["recipe"]["resolved"]["description"]
    kept = pq.read_table(folder / "out" / "parquet").to_pylist()
    urls = sorted(row["image_meta"][0]["url"] for row in kept)
    assert urls[0].startswith("http://127.0.0.1:") and urls[0].endswith("/b.jpg")
    assert urls[1].startswith("http://reader:***@127.0.0.1:") and urls[1].endswith("/a.jpg")
    drop = pq.read_table(folder / "out" / "drops.parquet").to_pylist()
    assert [(row["reason"], row["url"].split("@")[0]) for row in drop] == [("http_404", "http://reader:***")]


@pytest.mark.parametrize("override, words", [
    ("source.path=https://reader:{secret}@lists.example/urls.csv", "must not contain credentials"),
    ("storage.endpoint_url=http://AKIAFAKEACCESSKEY123:{secret}@127.0.0.1:9/", "must not contain credentials"),
    ("source.hf_token={secret}", "unknown key"),
    ("stages.fetch.user_agent_token=[{secret}]", "valid string"),
])
def test_errors_about_a_secret_never_repeat_it(tmp_path, monkeypatch, override, words):
    secret = "hf_ErrorPathToken0123456789abcdefghij"
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://a.example/1.jpg,one\n")
    (tmp_path / "recipe.yaml").write_text("source: {type: url_list, path: urls.csv}\nstages: {fetch: {}}\n"
                                          "output: {path: out}\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "recipe.yaml", "--set", override.format(secret=secret)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert words in result.output and secret not in result.output
