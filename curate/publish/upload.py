"""Upload a plan to a Hub dataset repository: bounded commits made by curate, unchanged files skipped, retries.

Uses huggingface_hub's HfApi (create_repo, create_branch, get_paths_info, list_repo_tree, create_commit). The
token goes only to HfApi; nothing here prints, logs or stores it.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from curate.publish.plan import BYTES_PER_COMMIT, FILES_PER_COMMIT, PlannedFile, PublishError, plan_commits
from curate.publish.remote import RemoteFile, remote_file, same_content

log = logging.getLogger("curate.publish")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
PATHS_INFO_BATCH = 500  # paths per paths-info request


@dataclass
class RetryPolicy:
    """Retries of Hub calls that failed with 429, 5xx or a broken connection: `backoff_base` x 2^n x U(1, 1.25)
    seconds, at least the server's Retry-After, at most `backoff_max`."""

    retries: int = 5
    backoff_base: float = 2.0
    backoff_max: float = 120.0
    sleep: Callable[[float], None] = time.sleep

    def wait(self, attempt: int, error: BaseException) -> float:
        wait = self.backoff_base * 2**attempt * random.uniform(1.0, 1.25)
        after = retry_after(error)
        return min(max(wait, after or 0.0), self.backoff_max)

    def call(self, what: str, function: Callable[[], Any], on_retry: Callable[[], None] | None = None) -> Any:
        """`function()`, retried on transient failures; `on_retry` runs before each new attempt."""
        for attempt in range(self.retries + 1):
            try:
                return function()
            except Exception as error:  # noqa: BLE001 - classified just below
                if attempt == self.retries or not is_retryable(error):
                    raise
                wait = self.wait(attempt, error)
                log.warning("%s failed (%s); retry %d of %d in %.1f s", what, describe(error), attempt + 1,
                            self.retries, wait)
                self.sleep(wait)
                if on_retry is not None:
                    on_retry()
        raise AssertionError("unreachable")


def _chain(error: BaseException) -> Iterable[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def is_retryable(error: BaseException) -> bool:
    """429/5xx answers and transport failures (refused, reset or dropped connections, timeouts), anywhere in
    the exception chain (huggingface_hub wraps LFS upload failures)."""
    import httpx2

    for item in _chain(error):
        status = _status(item)
        if status is not None:
            return status in RETRY_STATUSES
        if isinstance(item, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return True
    return False


def retry_after(error: BaseException) -> float | None:
    for item in _chain(error):
        response = getattr(item, "response", None)
        value = response.headers.get("Retry-After") if response is not None else None
        if value:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def describe(error: BaseException) -> str:
    """One line naming the failure (status or exception type and first message line)."""
    status = next((_status(item) for item in _chain(error) if _status(item) is not None), None)
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return f"HTTP {status}: {first_line}" if status else f"{type(error).__name__}: {first_line}"


@dataclass
class UploadReport:
    """What one upload did."""

    planned_files: int = 0
    skipped_files: int = 0  # already on the remote with the same content
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    deleted_files: list[str] = field(default_factory=list)
    commits: int = 0


class HubRepository:
    """One dataset repository and revision, reached through HfApi with retries."""

    def __init__(self, api: Any, repo_id: str, revision: str = "main", retry: RetryPolicy | None = None):
        self.api = api
        self.repo_id = repo_id
        self.revision = revision
        self.retry = retry or RetryPolicy()

    def ensure(self, private: bool) -> str:
        """Create the repository (private when asked; an existing one keeps its visibility) and the branch."""
        url = self.retry.call("create repository", lambda: self.api.create_repo(
            self.repo_id, repo_type="dataset", private=private, exist_ok=True))
        if self.revision != "main":
            self.retry.call("create branch", lambda: self.api.create_branch(
                self.repo_id, branch=self.revision, repo_type="dataset", exist_ok=True))
        return str(url)

    def remote_files(self, paths: list[str]) -> dict[str, RemoteFile]:
        """The remote entries of `paths` that exist (files only), by path."""
        found: dict[str, RemoteFile] = {}
        for start in range(0, len(paths), PATHS_INFO_BATCH):
            chunk = paths[start: start + PATHS_INFO_BATCH]
            entries = self.retry.call("read remote file info", lambda: self.api.get_paths_info(
                self.repo_id, chunk, repo_type="dataset", revision=self.revision))
            found.update({item.path: item for item in map(remote_file, entries) if item is not None})
        return found

    def listing(self) -> dict[str, RemoteFile]:
        """Every file of the revision, by path."""
        entries = self.retry.call("list remote files", lambda: list(self.api.list_repo_tree(
            self.repo_id, repo_type="dataset", revision=self.revision, recursive=True)))
        return {item.path: item for item in map(remote_file, entries) if item is not None}

    def commit(self, additions: list[PlannedFile], deletions: list[str], message: str) -> None:
        """One commit of `additions` (sha256 already known, so files are not hashed again) and `deletions`."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        operations: list[Any] = []
        for file in additions:
            operation = CommitOperationAdd(file.path, file.content if file.content is not None else str(file.source))
            operation.upload_info.sha256 = bytes.fromhex(file.sha256)
            operations.append(operation)
        operations += [CommitOperationDelete(path) for path in deletions]
        self.api.create_commit(self.repo_id, operations, commit_message=message, repo_type="dataset",
                               revision=self.revision)


def upload(repository: HubRepository, data: list[PlannedFile], final: list[PlannedFile], deletions: list[str],
           remote: dict[str, RemoteFile], report_progress: Callable[[str], None],
           max_files: int = FILES_PER_COMMIT, max_bytes: int = BYTES_PER_COMMIT) -> UploadReport:
    """Commit the `data` files not already on the remote in bounded commits, then `final` (card, manifest) with
    the `deletions` in one last commit, so the card appears once every file it points to is there."""
    report = UploadReport(planned_files=len(data) + len(final))
    pending = [file for file in data if not same_content(file, remote.get(file.path))]
    pending_final = [file for file in final if not same_content(file, remote.get(file.path))]
    report.skipped_files = report.planned_files - len(pending) - len(pending_final)
    if report.skipped_files:
        report_progress(f"{report.skipped_files} of {report.planned_files} files are already on the remote")
    data_batches = plan_commits(pending, max_files, max_bytes)
    commits = [(batch, [], f"curate publish: data, part {number} of {len(data_batches)}")
               for number, batch in enumerate(data_batches, start=1)]
    if pending_final or deletions:
        commits.append((pending_final, deletions, "curate publish: dataset card and manifest"))
    for number, (batch, removing, message) in enumerate(commits, start=1):
        size = sum(file.size for file in batch)
        report_progress(f"commit {number}/{len(commits)}: {len(batch)} files, {size / 1e6:,.1f} MB"
                        + (f", {len(removing)} deletions" if removing else ""))
        committed = _commit_with_retries(repository, batch, removing, message)
        if committed is not None:
            report.commits += 1
            report.uploaded_files += len(committed)
            report.uploaded_bytes += sum(file.size for file in committed)
        report.deleted_files += removing
    return report


def _commit_with_retries(repository: HubRepository, batch: list[PlannedFile], deletions: list[str],
                         message: str) -> list[PlannedFile] | None:
    """Commit, retrying transient failures. Before a retry the remote is read again, so files that a commit
    whose answer was lost did add are not committed twice. Returns the committed files, None if nothing was left."""
    state = {"files": list(batch), "deletions": list(deletions)}

    def refresh() -> None:
        remote = repository.remote_files([f.path for f in state["files"]] + state["deletions"])
        state["files"] = [f for f in state["files"] if not same_content(f, remote.get(f.path))]
        state["deletions"] = [path for path in state["deletions"] if path in remote]

    def attempt() -> list[PlannedFile] | None:
        if not state["files"] and not state["deletions"]:
            return None
        repository.commit(state["files"], state["deletions"], message)
        return state["files"]

    try:
        return repository.retry.call("commit", attempt, on_retry=refresh)
    except Exception as error:  # noqa: BLE001 - reported with the advice to re-run
        raise PublishError(f"upload stopped: {describe(error)}. Files committed so far stay on the remote; "
                           "run the same command again to resume.") from error
