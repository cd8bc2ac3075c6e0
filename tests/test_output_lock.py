"""One process per output folder (curate/engine/lock.py).

Module level: the lock is taken, names its holder and is released however the command ends; a lock
whose process is gone is taken over with a notice, a live one refuses, `break_lock` takes it; on S3
(moto's server on loopback) the lock is a lease, renewed while held and taken over once it expires.
Through the command line: of two `curate run` started together into one folder exactly one is
refused, naming the other, and the output verifies; a lock left by a killed process does not block
the next run; retry, export, publish and a re-run are refused while another process holds the folder.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from moto_s3 import moto_bucket
from PIL import Image

from curate import storage
from curate.demo.server import LoopbackServer, Route
from curate.engine.lock import LOCK_FILE, Holder, OutputLock, OutputLocked, check_unlocked, process_space
from curate.engine.run import OutputConflict, check_output_folder, compile_plan
from curate.export import ExportError, export_output
from curate.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
CURATE = REPO / ".venv" / "bin" / "curate"
RECIPE = REPO / "pipelines" / "download.yaml"
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
HOST = socket.gethostname()
BUCKET = "locks"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "curate-test-key", "AWS_SECRET_ACCESS_KEY": "curate-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
IMAGES = 6
DELAY = 5.0  # seconds each image of the slow list takes: the first run still holds the folder when the second starts


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def record_of(folder: Path) -> dict:
    return json.loads((folder / LOCK_FILE).read_text())


def holding_process(folder: Path | str, *settings: str, env: dict | None = None) -> subprocess.Popen:
    """Another process that takes the lock of `folder` (OutputLock keyword arguments in `settings`), says
    "held" and sleeps."""
    script = ("import time\nfrom curate.engine.lock import OutputLock\n"
              f"with OutputLock({str(folder)!r}, {', '.join(settings)}):\n"
              "    print('held', flush=True)\n    time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**ENV, **(env or {})})
    assert process.stdout.readline().strip() == "held", process.stderr.read()
    return process


# --------------------------------------------------------------------------- a local folder


def test_the_lock_names_its_holder_refuses_others_and_is_gone_after(tmp_path):
    root = tmp_path / "new" / "out"
    with OutputLock(root, command="curate run demo") as lock:
        record = record_of(root)
        assert (record["pid"], record["host"], record["command"], record["mode"]) == (os.getpid(), HOST,
                                                                                       "curate run demo", "pid")
        assert abs(record["started"] - time.time()) < 60 and record["token"] == lock.record.token
        with pytest.raises(OutputLocked) as refused:
            OutputLock(root).acquire()
        message = str(refused.value)
        for part in (f"pid {os.getpid()}", f"host {HOST}", "since ", "command: curate run demo", "Wait for it",
                     "--break-lock"):
            assert part in message
        with pytest.raises(OutputLocked):
            check_unlocked(root)
    assert not (root / LOCK_FILE).exists()
    assert not (tmp_path / "new").exists()  # the folders the lock made, left empty, are removed
    check_unlocked(root)


def test_the_lock_is_released_when_the_command_fails_or_is_interrupted(tmp_path):
    for error in (RuntimeError("stage failed"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with OutputLock(tmp_path):
                assert (tmp_path / LOCK_FILE).exists()
                raise error
        assert not (tmp_path / LOCK_FILE).exists()


def test_sigterm_unwinds_and_releases_the_lock(tmp_path):
    process = holding_process(tmp_path, "command='curate run x'")
    assert record_of(tmp_path)["pid"] == process.pid
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_whose_process_is_gone_is_taken_over_with_a_notice(tmp_path):
    process = holding_process(tmp_path, "command='curate run old'")
    process.kill()  # SIGKILL: nothing unwinds, the lock stays behind
    process.wait()
    assert record_of(tmp_path)["pid"] == process.pid
    notices = []
    with OutputLock(tmp_path, say=notices.append):
        assert record_of(tmp_path)["pid"] == os.getpid()
    assert len(notices) == 1 and f"pid {process.pid}" in notices[0] and "no longer running" in notices[0]
    assert "taking over" in notices[0] and "curate run old" in notices[0]
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_reused_pid_a_live_pid_and_a_pid_on_another_machine(tmp_path):
    now = time.time()
    holder = Holder(pid=os.getpid(), host=HOST, started=now, command="curate run x", token="other",
                    pid_start=12345, machine=process_space())
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder.to_json()))
    notices = []
    with OutputLock(tmp_path, say=notices.append):  # our pid, but it started at another time: reused, stale
        pass
    assert len(notices) == 1 and "no longer running" in notices[0]
    for elsewhere in ({}, {"host": "gpu-node-7", "machine": "another boot id"}):
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            live = {**holder.to_json(), "pid": sleeper.pid, "pid_start": None, **elsewhere}
            (tmp_path / LOCK_FILE).write_text(json.dumps(live))
            with pytest.raises(OutputLocked, match=f"pid {sleeper.pid} on host {live['host']}"):
                OutputLock(tmp_path).acquire()
            if elsewhere:  # a pid on another machine cannot be checked, even once it is gone here
                sleeper.kill()
                sleeper.wait()
                with pytest.raises(OutputLocked):
                    OutputLock(tmp_path).acquire()
        finally:
            sleeper.kill()
            sleeper.wait()
    assert record_of(tmp_path)["host"] == "gpu-node-7"


def test_break_lock_takes_a_live_lock_with_a_warning_naming_the_holder(tmp_path):
    process = holding_process(tmp_path, "command='curate run stuck'")
    try:
        notices = []
        with OutputLock(tmp_path, break_lock=True, say=notices.append):
            assert record_of(tmp_path)["pid"] == os.getpid()
        assert len(notices) == 1 and notices[0].startswith("warning: --break-lock")
        assert f"pid {process.pid}" in notices[0] and "curate run stuck" in notices[0]
        assert not (tmp_path / LOCK_FILE).exists()
    finally:
        process.kill()
        process.wait()


def test_overwrite_empties_the_folder_but_keeps_the_lock(tmp_path):
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), urls)
    out = tmp_path / "out"
    plan = compile_plan(load_recipe(RECIPE, [f"source.path={urls}", f"output.path={out}"]))
    with OutputLock(out) as lock:
        assert check_output_folder(plan, overwrite=False) == "fresh"  # a folder holding only the lock is empty
        (out / "notes.txt").write_text("not a curate output")
        (out / "webdataset").mkdir()
        (out / "webdataset" / "part-00000.tar").write_bytes(b"old")
        with pytest.raises(OutputConflict):
            check_output_folder(plan, overwrite=False)
        assert check_output_folder(plan, overwrite=True) == "fresh"
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
        assert record_of(out)["token"] == lock.record.token
    assert not out.exists()  # made by the lock, left empty: removed


def test_an_export_is_refused_while_its_destination_is_being_written(tmp_path):
    out, dest = tmp_path / "out", tmp_path / "exports" / "llava"
    out.mkdir()
    beside = dest.parent / f".{dest.name}{LOCK_FILE}"
    with OutputLock(dest, file=beside, command="curate export a b --to llava"):
        in_use = f"{dest} is in use by another curate process: pid {os.getpid()}"
        with pytest.raises(ExportError, match=re.escape(in_use)):
            export_output(out, dest, "llava")
    with OutputLock(out, command="curate retry out"):
        with pytest.raises(ExportError, match="command: curate retry out"):
            export_output(out, dest, "llava")
    with pytest.raises(ExportError, match="no manifest"):  # unlocked: the export goes on to read the output
        export_output(out, dest, "llava")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out"]  # no lock left, DEST's parent removed


# --------------------------------------------------------------------------- a lease on S3


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a loopback port with a bucket, and AWS credentials in the environment."""
    with moto_bucket(BUCKET, AWS_ENV) as (endpoint, filesystem):
        yield endpoint, filesystem


@pytest.fixture
def s3_folder(s3, request):
    endpoint, filesystem = s3
    prefix = request.node.name
    return storage.StoragePath(f"s3://{BUCKET}/{prefix}/out", storage.StorageConfig(endpoint)), filesystem, prefix


def keys(filesystem: pafs.S3FileSystem, prefix: str) -> list[str]:
    selector = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    return sorted(i.path for i in filesystem.get_file_info(selector) if i.type == pafs.FileType.File)


def test_a_lease_is_renewed_while_held_keeps_others_out_and_is_deleted_after(s3_folder):
    root, filesystem, prefix = s3_folder
    with OutputLock(root, renew_every=0.2, stale_after=1.0, settle=0.05, command="curate run s3") as lock:
        first = json.loads((root / LOCK_FILE).read_text())
        assert first["mode"] == "lease" and first["token"] == lock.record.token
        time.sleep(1.5)  # past stale_after: only the renewals keep the lease
        renewed = json.loads((root / LOCK_FILE).read_text())
        assert renewed["renewed"] > first["renewed"] + 1.0 and renewed["started"] == first["started"]
        with pytest.raises(OutputLocked, match=r"pid \d+ on host .*lease renewed \d s ago.*lease to expire"):
            OutputLock(root, stale_after=1.0, settle=0.05).acquire()
    assert keys(filesystem, prefix) == []


def test_a_lease_that_is_no_longer_renewed_expires_and_is_taken_over(s3_folder):
    root, filesystem, prefix = s3_folder
    now = time.time()
    elsewhere = Holder(pid=4242, host="gpu-node-7", started=now - 60, command="curate run s3", token="theirs",
                       mode="lease", renewed=now, machine="another boot id")
    (root / LOCK_FILE).write_text(json.dumps(elsewhere.to_json()))
    with pytest.raises(OutputLocked, match="pid 4242 on host gpu-node-7"):
        OutputLock(root, stale_after=1.0, settle=0.05).acquire()
    time.sleep(1.3)
    notices = []
    with OutputLock(root, stale_after=1.0, settle=0.05, say=notices.append):
        assert json.loads((root / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(notices) == 1 and "pid 4242" in notices[0] and "lease was last renewed" in notices[0]
    assert keys(filesystem, prefix) == []


def test_a_fresh_lease_of_a_process_gone_from_this_machine_is_taken_over_at_once(s3_folder):
    root, _, _ = s3_folder
    gone = Holder(pid=dead_pid(), host=HOST, started=time.time(), command="curate run s3", token="theirs",
                  mode="lease", renewed=time.time(), machine=process_space())
    (root / LOCK_FILE).write_text(json.dumps(gone.to_json()))
    notices = []
    with OutputLock(root, settle=0.05, say=notices.append):
        pass
    assert len(notices) == 1 and "no longer running" in notices[0]


def test_a_broken_lease_is_not_renewed_nor_deleted_by_its_old_holder(s3_folder):
    root, _, _ = s3_folder
    old = OutputLock(root, renew_every=0.2, settle=0.05, say=lambda line: None).acquire()
    try:
        warnings = []
        new = OutputLock(root, break_lock=True, settle=0.05, say=warnings.append).acquire()
        assert len(warnings) == 1 and "--break-lock" in warnings[0]
        time.sleep(0.6)
        assert old.lost_to is not None and old.lost_to.token == new.record.token
        old.release()
        assert json.loads((root / LOCK_FILE).read_text())["token"] == new.record.token
        new.release()
        assert not (root / LOCK_FILE).exists()
    finally:
        old.release()


# --------------------------------------------------------------------------- the command line


def jpeg(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (30, 120, 200)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A URL list of IMAGES images answering at once, and one whose images take DELAY seconds each."""
    folder = tmp_path_factory.mktemp("web")
    routes = {}
    for index in range(IMAGES):
        routes[f"/fast/{index}.jpg"] = Route(body=jpeg(64 + index))
        routes[f"/slow/{index}.jpg"] = Route(body=jpeg(64 + index), delay=DELAY)
    with LoopbackServer(routes) as server:
        lists = {}
        for speed in ("fast", "slow"):
            lists[speed] = folder / f"{speed}.parquet"
            pq.write_table(pa.table({"url": [server.url(f"/{speed}/{i}.jpg") for i in range(IMAGES)],
                                     "caption": [f"a photo {i}" for i in range(IMAGES)]}), lists[speed])
        yield lists


def run_args(url_list: Path, out: Path, *extra: str) -> list[str]:
    return [str(CURATE), "run", str(RECIPE), "--set", f"source.path={url_list}", "--set", f"output.path={out}",
            "--set", "stages.fetch.allow_private_addresses=true", "--no-progress", *extra]


def curate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CURATE), *args], capture_output=True, text=True, timeout=300, env=ENV)


def verify(out: Path) -> None:
    checked = curate("verify", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{IMAGES} rows match the manifest" in checked.stdout


@pytest.fixture(scope="module")
def concurrent_runs(web, tmp_path_factory):
    """Two `curate run` into one folder, started together; the first images take DELAY seconds."""
    out = tmp_path_factory.mktemp("concurrent") / "out"
    runs = [subprocess.Popen(run_args(web["slow"], out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=ENV) for _ in range(2)]
    results = []
    for process in runs:
        stdout, stderr = process.communicate(timeout=300)
        results.append((process.pid, process.returncode, stdout, stderr))
    return out, results


def test_of_two_runs_into_one_folder_one_is_refused_naming_the_other(concurrent_runs):
    out, results = concurrent_runs
    assert sorted(code for _, code, _, _ in results) == [0, 2], results
    (winner, _, stdout, _), = [r for r in results if r[1] == 0]
    (_, _, _, refusal), = [r for r in results if r[1] == 2]
    message = " ".join(refusal.split())
    assert f"is in use by another curate process: pid {winner} on host {HOST}, since " in message, refusal
    assert f"command: curate run {RECIPE}" in message and f"output.path={out}" in message
    assert "Wait for it to finish; if that process is dead, re-run the command with --break-lock" in message
    assert "resuming" not in stdout and "Traceback" not in refusal
    assert not (out / LOCK_FILE).exists()
    assert json.loads((out / "manifest.json").read_text())["reconciliation"]["output_rows"] == IMAGES
    verify(out)


def test_a_lock_left_by_a_killed_process_does_not_block_the_next_run(web, tmp_path):
    out = tmp_path / "out"
    killed = holding_process(out, "command='curate run killed'")
    killed.kill()
    killed.wait()
    assert record_of(out)["pid"] == killed.pid
    finished = subprocess.run(run_args(web["fast"], out), capture_output=True, text=True, timeout=300, env=ENV)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    notice = [line for line in finished.stdout.splitlines() if "taking over the lock" in line]
    assert len(notice) == 1 and f"pid {killed.pid}" in notice[0] and "no longer running" in notice[0]
    assert not (out / LOCK_FILE).exists()
    verify(out)


def test_retry_export_publish_and_a_rerun_are_refused_while_another_process_holds_the_output(
        concurrent_runs, web, tmp_path):
    out, _ = concurrent_runs
    with OutputLock(out, command="curate retry held-by-the-test"):
        commands = {"run": run_args(web["slow"], out)[1:], "retry": ["retry", str(out), "--no-progress"],
                    "export": ["export", str(out), str(tmp_path / "llava"), "--to", "llava"],
                    "publish": ["publish", str(out), "--repo", "me/data", "--dry-run", str(tmp_path / "repo")]}
        for name, args in commands.items():
            refused = curate(*args)
            message = " ".join(refused.stderr.split())
            assert refused.returncode == 2, (name, refused.stdout, refused.stderr)
            assert f"pid {os.getpid()} on host {HOST}" in message
            assert "command: curate retry held-by-the-test" in message
            assert "already complete" not in refused.stdout and "Traceback" not in refused.stderr
        assert not (tmp_path / "llava").exists() and not (tmp_path / "repo").exists()

        broken = curate("retry", str(out), "--no-progress", "--break-lock")
        assert broken.returncode == 0, broken.stdout + broken.stderr
        assert f"warning: --break-lock: taking the lock of {out} from pid {os.getpid()}" in broken.stdout
        assert "nothing to retry" in broken.stdout
        assert not (out / LOCK_FILE).exists()
    exported = curate("export", str(out), str(tmp_path / "llava"), "--to", "llava")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert not (out / LOCK_FILE).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["llava"]
    verify(out)
