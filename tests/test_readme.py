"""Every command of the README's usage section runs, in order, as written, with a loopback web standing in
for the internet and the loopback Hub for the Hugging Face Hub.

The commands are read from README.md itself, so the test fails when the README shows a command that does
not work. Two things differ from a user's machine, both for the loopback: `curate run` commands get
`--set stages.fetch.allow_private_addresses=true` (the address guard refuses 127.0.0.1, and says so), and
`urls.parquet` / `urls.tsv` are files this test writes.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.demo.server import LoopbackServer, Route
from curate.demo.web import COLOURS, SHAPES, Scene, draw_scene

REPO = Path(__file__).resolve().parent.parent
CURATE = str(Path(sys.executable).parent / "curate")
ALLOW_LOOPBACK = ["--set", "stages.fetch.allow_private_addresses=true"]


def usage_commands(readme: str) -> list[list[str]]:
    """The shell commands of the first bash block after '## Usage', continuation lines joined, comments dropped."""
    section = readme.split("\n## Usage\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands, pending = [], ""
    for line in block.splitlines():
        line = line.rstrip()
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(shlex.split(line))
    return commands


def drawing(i: int) -> tuple[bytes, str]:
    colours = [c for c in COLOURS if c not in ("white", "black")]
    scene = Scene(1 + i % 3, colours[i % len(colours)], SHAPES[i % len(SHAPES)], "white")
    out = io.BytesIO()
    draw_scene(scene, 320 + 8 * (i % 5), 288, layout_seed=i).save(out, "JPEG", quality=90)
    return out.getvalue(), scene.caption()


@pytest.fixture
def web(tmp_path):
    """40 drawings with English captions, one URL that answers 503 three times then the image, one 404."""
    routes, rows = {}, []
    for i in range(40):
        body, caption = drawing(i)
        routes[f"/img/{i}.jpg"] = Route(body=body)
        rows.append((f"/img/{i}.jpg", caption))
    flaky, caption = drawing(40)
    routes["/img/flaky.jpg"] = Route(body=flaky, fail_times=3, fail_status=503)
    rows += [("/img/flaky.jpg", caption), ("/img/gone.jpg", "a picture that is gone")]
    with LoopbackServer(routes) as server:
        urls = [server.url(path) for path, _ in rows]
        captions = [caption for _, caption in rows]
        pq.write_table(pa.table({"url": urls, "caption": captions}), tmp_path / "urls.parquet")
        (tmp_path / "urls.tsv").write_text("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in zip(urls, captions)))
        yield tmp_path


def test_every_usage_command_of_the_readme_runs(web, hub_env):
    commands = usage_commands((REPO / "README.md").read_text())
    assert [c[:2] for c in commands if c[0] == "curate"][:3] == [["curate", "run"]] * 3
    (web / "pipelines").symlink_to(REPO / "pipelines")
    environment = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    ran = []
    for command in commands:
        if command[0] == "source":  # activating the venv: the test runs the venv's curate directly
            continue
        assert command[0] == "curate", command
        arguments = command[1:]
        if arguments[0] == "run" and "--dry-run" not in arguments:
            arguments = [*arguments, "--no-progress", *ALLOW_LOOPBACK]
        if arguments[0] == "retry":
            arguments = [*arguments, "--no-progress"]
        result = subprocess.run([CURATE, *arguments], cwd=web, capture_output=True, text=True, env=environment,
                                timeout=600)
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        ran.append((arguments[0], result))
    assert [name for name, _ in ran] == ["run", "run", "run", "recipes", "run", "inspect", "run", "run", "run",
                                         "verify", "retry", "clean", "diff", "publish", "export"]
    assert "kept and dropped" in ran[5][1].stdout.lower() or "annotation" in ran[5][1].stdout.lower()
    assert "would keep" in ran[6][1].stdout and "nothing was written" in ran[6][1].stdout  # --what-if
    assert "re-selecting" in ran[7][1].stdout  # the re-run served from the pool
    assert json.loads((web / "out" / "manifest.json").read_text())["recipe"]["resolved"]["stages"]["basic_filter"][
        "min_side"] == 256
    subset = json.loads((web / "out-top10" / "manifest.json").read_text())
    assert subset["pool"]["reads"] == str(web / "out-datacomp") and subset["reconciliation"]["ok"]
    assert all(entry["computed_rows"] == 0 for entry in subset["pool"]["annotations"].values())
    assert subset["device"]["ray"] is False  # nothing to annotate, a few work shards: run in one process
    assert "deleted" in ran[11][1].stdout and not (web / "out" / "_pool").exists()
    out = json.loads((web / "out" / "manifest.json").read_text())
    assert out["retries"][0]["recovered_rows"] == 1  # the 503s were retried and merged in
    assert out["reconciliation"]["ok"] and out["reconciliation"]["output_rows"] == 41
    trial = json.loads((web / "out-trial" / "manifest.json").read_text())
    assert trial["trial"]["limit"] == 50 and trial["reconciliation"]["input_rows"] == 42
    assert "recipe is valid" in ran[2][1].stdout
    assert json.loads((web / "out-wds" / "export.json").read_text())["rows"] > 0
    assert (web / "out" / "webdataset" / "sizes.json").exists()
    published = hub_env.files("you/my-pairs")
    assert "README.md" in published and json.loads(published["manifest.json"])["outputs"]["rows"] == 41
