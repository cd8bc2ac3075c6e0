"""One process per output folder: the lock a run, a retry or an export holds on the folder it writes or reads.

The lock is a small JSON file, `OUT/_lock.json`, naming its holder: pid, host name, start time,
command (secrets masked) and a random token. It is deleted when the holder's command ends, however
it ends (an error, Ctrl-C, SIGTERM), so a finished output never holds one; a holder that is killed
outright (SIGKILL, a lost machine) leaves it behind, and the next command decides whether it is stale:

  pid mode     (a local folder) stale when the holder ran on this machine and its pid is gone (or
               is now another process, or a zombie). "This machine" is the same kernel boot and pid
               namespace (/proc), else the same host name. A holder elsewhere cannot be checked: it is
               never stale, `--break-lock` takes it.
  lease mode   (an object store URL, or any folder with CURATE_LOCK=lease, e.g. on a file system
               shared by several machines) the holder renews the lock every `renew_every` seconds
               (30 s) from a daemon thread; it is stale `stale_after` seconds (5 min) after its last
               renewal, by the reader's clock (hosts' clocks should agree to well under that), or
               at once when the holder ran on this machine and its pid is gone (as in pid mode).

A stale lock is taken over with a one-line notice; a live one refuses the command (OutputLocked, or
the caller's own error through `refuse`) with a message naming the holder and what to do; with
`break_lock` a live lock is taken all the same, with a warning naming the holder.

Taking the lock is atomic on a local file system (a complete file hard-linked into place, which
fails if one is there). Object stores have no create-if-absent: the record is written, read back
after `settle` seconds, and kept only if it is still ours (the last writer wins, the other refuses).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from curate import storage
from curate.files import read_json, write_json
from curate.stage import RecipeError

LOCK_FILE = "_lock.json"
LOCK_MODE_ENV = "CURATE_LOCK"  # "lease": lease mode on local folders too (file systems shared by several hosts)
RENEW_EVERY = 30.0
STALE_AFTER = 300.0
BREAK_ADVICE = "re-run the command with --break-lock"


class OutputLocked(RecipeError):
    """Another live process holds the folder's lock."""


@dataclass
class Holder:
    """Who holds a lock: the content of the lock file."""

    pid: int
    host: str
    started: float  # time.time() when the lock was taken
    command: str
    token: str  # tells this holder from another one with the same pid and host
    mode: str = "pid"  # "pid" or "lease": which rule says when it is stale
    renewed: float = 0.0  # lease mode: time.time() of the last renewal
    pid_start: int | None = None  # the process's start time (Linux clock ticks), to tell a reused pid
    machine: str = ""  # where `pid` means something: kernel boot id and pid namespace (see process_space)

    @classmethod
    def from_json(cls, data: Any) -> "Holder":
        if not isinstance(data, dict):
            raise ValueError("a lock record is a JSON object")
        started = float(data["started"])
        return cls(pid=int(data["pid"]), host=str(data["host"]), started=started, command=str(data.get("command", "")),
                   token=str(data["token"]), mode=str(data.get("mode", "pid")),
                   renewed=float(data.get("renewed") or started), pid_start=data.get("pid_start"),
                   machine=str(data.get("machine", "")))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "started_at": _clock(self.started)}

    def describe(self, now: float | None = None) -> str:
        """`pid 123 on host h, since 2025-01-02 10:11:12 (3 min ago), command: curate run ...`"""
        now = time.time() if now is None else now
        text = f"pid {self.pid} on host {self.host}, since {_clock(self.started)} ({_ago(now - self.started)})"
        if self.mode == "lease":
            text += f", lease renewed {_ago(now - self.renewed)}"
        return text + f", command: {self.command or '(unknown)'}"


def current_command() -> str:
    """This process's command line as the user typed it (`curate run ...`), secrets masked."""
    from curate.redact import redact_text

    args = list(sys.argv)
    if args and Path(args[0]).name in ("curate", "cli.py", "__main__.py"):
        args[0] = "curate"
    return redact_text(shlex.join(args)) or ""


def process_space() -> str:
    """Where this process's pid means something: the kernel's boot id and the pid namespace (Linux), else the
    host name. Two processes with the same value can check each other's pid."""
    try:
        space = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()
    with suppress(OSError):
        space += " " + os.readlink("/proc/self/ns/pid")
    return space


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, from /proc), None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """Whether `pid` is a running process of this host (not a zombie; the same process when `started` is known)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    with suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False  # dead, not yet reaped by its parent
    now = process_start(pid)
    return started is None or now is None or now == started


class OutputLock:
    """The lock of the folder `root` (a local path or a store URL), as a context manager.

    `file` puts the lock file elsewhere than `root/_lock.json` (an export's destination, which is
    replaced whole, locks a file beside it). `refuse(message)` makes the exception raised for a
    live holder (default OutputLocked); `advice` ends its message. `say` prints the one-line
    notices (a stale lock taken over, a lock broken); default: standard error.
    """

    def __init__(self, root: storage.Location | str, *, break_lock: bool = False, command: str | None = None,
                 mode: str | None = None, renew_every: float = RENEW_EVERY, stale_after: float = STALE_AFTER,
                 settle: float = 1.0, file: storage.Location | str | None = None,
                 say: Callable[[str], None] | None = None, refuse: Callable[[str], Exception] | None = None,
                 advice: str = BREAK_ADVICE):
        self.root = storage.location(root)
        self.file = storage.location(file) if file is not None else self.root / LOCK_FILE
        self.local = isinstance(self.file, Path)
        mode = mode or ("lease" if not self.local or os.environ.get(LOCK_MODE_ENV) == "lease" else "pid")
        if mode not in ("pid", "lease"):
            raise ValueError(f"lock mode {mode!r}: expected 'pid' or 'lease'")
        self.mode, self.break_lock, self.command = mode, break_lock, command
        self.renew_every, self.stale_after, self.settle = renew_every, stale_after, settle
        self.say = say or (lambda line: print(line, file=sys.stderr))
        self.refuse = refuse or (lambda message: OutputLocked(message))
        self.advice = advice
        self.record: Holder | None = None  # ours, while held
        self.lost_to: Holder | None = None  # set when another process took the lock while we held it
        self._created: Path | None = None  # the local folder the lock's creation made (removed if left empty)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._sigterm_installed = False

    # -- the context manager ------------------------------------------------------------

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self.record is not None

    def acquire(self) -> "OutputLock":
        """Take the lock (a stale one taken over, a live one broken with `break_lock`); else raise `refuse`."""
        if self.local and self.root.exists() and not self.root.is_dir():
            return self  # not a folder: nothing to lock, the caller reports the path
        now = time.time()
        record = Holder(pid=os.getpid(), host=socket.gethostname(), started=now,
                        command=self.command if self.command is not None else current_command(),
                        token=uuid.uuid4().hex, mode=self.mode, renewed=now, pid_start=process_start(os.getpid()),
                        machine=process_space())
        for _ in range(20):
            current = self.holder()
            if current is None:
                if self._create(record):
                    self.record = record
                    break
                continue
            stale, why = self._stale(current)
            if stale:
                self.say(f"note: taking over the lock of {self.root} left by {current.describe()} ({why})")
            elif self.break_lock:
                self.say(f"warning: --break-lock: taking the lock of {self.root} from {current.describe()}")
            else:
                raise self.refuse(self.refusal(current))
            if self.local:
                self._remove(current)
            elif self._create(record):  # a store's write replaces the old record whole
                self.record = record
                break
        else:
            raise self.refuse(f"{self.root}: could not take the output folder's lock ({self.file}): other processes "
                              "keep taking it; try again")
        if self.mode == "lease":
            self._stop.clear()
            self._renewer = threading.Thread(target=self._renew, name="curate-lock-renewal", daemon=True)
            self._renewer.start()
        self._unwind_on_sigterm()
        return self

    def release(self) -> None:
        """Stop renewing and delete the lock file if it is still ours; never raises for a lock that is gone."""
        if self._renewer is not None:
            self._stop.set()
            self._renewer.join(timeout=10)
            self._renewer = None
        if self._sigterm_installed:
            if signal.getsignal(signal.SIGTERM) is _raise_on_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._sigterm_installed = False
        record, self.record = self.record, None
        if record is None:
            return
        try:
            current = self.holder()
            if current is not None and current.token == record.token:
                self.file.unlink(missing_ok=True)
        except OSError as error:
            self.say(f"warning: could not remove the lock file {self.file}: {error}")
        if self._created is not None:  # the folders the lock made, while empty: the command wrote nothing there
            folder = self.file.parent
            with suppress(OSError):
                while True:
                    folder.rmdir()
                    if folder == self._created:
                        break
                    folder = folder.parent
            self._created = None

    # -- who holds it -------------------------------------------------------------------

    def holder(self) -> Holder | None:
        """The current holder, None when there is no lock file. An unreadable file (cut short) counts as a
        lease last renewed when the file was written: stale `stale_after` seconds later."""
        for attempt in range(3):
            try:
                return Holder.from_json(read_json(self.file))
            except FileNotFoundError:
                return None
            except OSError:
                if not self.file.exists():  # some stores say "not found" as a plain OSError
                    return None
                raise
            except (ValueError, KeyError, TypeError):
                if attempt < 2:
                    time.sleep(0.2)  # a store's write is whole, a local one is linked in whole: rarely seen
        written = self._mtime()
        return Holder(pid=0, host="(unreadable lock file)", started=written, command="", token="unreadable",
                      mode="lease", renewed=written)

    def refusal(self, current: Holder) -> str:
        """The message refusing this command while `current` holds the lock."""
        return (f"{self.root} is in use by another curate process: {current.describe()}. Wait for it to finish; if "
                f"that process is dead, {self.advice}"
                + (f" (or wait for its lease to expire, {_ago(self.stale_after, suffix='')} after its last renewal)"
                   if current.mode == "lease" else "") + ".")

    def _stale(self, current: Holder) -> tuple[bool, str]:
        now = time.time()
        if current.mode == "lease" and now - current.renewed > self.stale_after:
            return True, f"its lease was last renewed {_ago(now - current.renewed)}"
        here = current.machine == process_space() if current.machine else current.host == socket.gethostname()
        if here and not pid_alive(current.pid, current.pid_start):
            return True, "that process is no longer running"
        return False, ""

    # -- the file -----------------------------------------------------------------------

    def _create(self, record: Holder) -> bool:
        """Write our record if there is no lock file; whether the lock is ours now."""
        if not self.local:
            write_json(self.file, record.to_json())
            time.sleep(self.settle)  # another writer in the same moment: the last one wins, both see which
            current = self.holder()
            return current is not None and current.token == record.token
        folder = self.file.parent
        if not folder.exists():
            missing = folder
            while not missing.parent.exists():
                missing = missing.parent
            folder.mkdir(parents=True, exist_ok=True)
            self._created = self._created or missing
        draft = folder / f".{self.file.name}.{record.token}.tmp"
        draft.write_text(json.dumps(record.to_json(), indent=2) + "\n")
        try:
            os.link(draft, self.file)  # fails if a lock file is there: atomic create-if-absent
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            try:
                handle = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(handle, "w") as out:
                out.write(draft.read_text())
            return True
        finally:
            draft.unlink(missing_ok=True)

    def _remove(self, current: Holder) -> None:
        """Delete the local lock file of `current` (stale or broken), and only that one."""
        aside = self.file.with_name(f".{self.file.name}.{uuid.uuid4().hex}.old")
        try:
            os.rename(self.file, aside)  # of two processes taking over, one moves the file
        except FileNotFoundError:
            return
        try:
            moved = Holder.from_json(read_json(aside))
        except (OSError, ValueError, KeyError, TypeError):
            moved = None
        if moved is not None and moved.token != current.token:
            with suppress(OSError):  # a new holder's lock was moved: put it back unless another one is there
                os.link(aside, self.file)
        aside.unlink(missing_ok=True)

    def _mtime(self) -> float:
        try:
            if self.local:
                return self.file.stat().st_mtime
            modified = self.file.info().mtime
            return modified.timestamp() if modified is not None else time.time()
        except (OSError, AttributeError):
            return time.time()

    def _renew(self) -> None:
        """Lease mode: write a new `renewed` time every `renew_every` seconds while the lock is ours."""
        record = self.record
        while record is not None and not self._stop.wait(self.renew_every):
            try:
                current = self.holder()
                if current is None or current.token != record.token:
                    self.lost_to = current
                    self.say(f"warning: the lock of {self.root} was taken by "
                             f"{current.describe() if current else 'another process (it was deleted)'}; "
                             "this command no longer holds it")
                    return
                record.renewed = time.time()
                write_json(self.file, record.to_json())
            except OSError as error:  # a store that does not answer now: try again at the next period
                self.say(f"warning: could not renew the lock of {self.root}: {error}")

    def _unwind_on_sigterm(self) -> None:
        """SIGTERM raises SystemExit (so `with` blocks run and the lock is released) instead of ending at once."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_on_sigterm)
            self._sigterm_installed = True


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def check_unlocked(root: storage.Location | str, *, refuse: Callable[[str], Exception] | None = None,
                   advice: str | None = None, stale_after: float = STALE_AFTER) -> None:
    """Refuse (raise `refuse(message)`) while a live process holds the lock of `root`; a stale lock is no refusal.

    `advice` (default: delete the lock file) says what to do if the holder is dead."""
    lock = OutputLock(root, refuse=refuse, stale_after=stale_after)
    lock.advice = advice or f"delete {lock.file}"
    current = lock.holder()
    if current is not None and not lock._stale(current)[0]:
        raise lock.refuse(lock.refusal(current))


def is_lock_file(name: str) -> bool:
    """Whether a file name in an output folder is the lock or one of its short-lived helpers (drafts, renewals)."""
    return name == LOCK_FILE or name.startswith(f".{LOCK_FILE}.")


def remove_all_but_lock(root: storage.Location) -> None:
    """Delete everything in the folder `root` but the lock (`--overwrite` while holding the lock)."""
    for entry in list(root.iterdir()):
        if is_lock_file(entry.name):
            continue
        if isinstance(entry, Path) and (entry.is_file() or entry.is_symlink()):
            entry.unlink(missing_ok=True)
        else:
            storage.remove_tree(entry)


def _clock(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _ago(seconds: float, suffix: str = " ago") -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s{suffix}"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min{suffix}"
    return f"{seconds / 3600:.1f} h{suffix}"
