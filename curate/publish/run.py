"""`curate publish`: lay out an output as a Hub dataset repository, then write it to a folder (dry run) or upload it."""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from curate.engine.lock import check_unlocked
from curate.publish.card import (
    card_body,
    card_license,
    card_metadata,
    check_patterns,
    data_configs,
    glob_for,
    render_card,
    sample_licenses,
)
from curate.publish.plan import (
    BYTES_PER_COMMIT,
    CARD,
    FILES_PER_COMMIT,
    MANIFEST,
    MAX_FILES_PER_FOLDER,
    PlannedFile,
    PublishError,
    generated_file,
    output_file,
    public_manifest,
    read_output,
    repo_paths,
    write_tree,
)
from curate.publish.remote import check_remote, stale_files, top_folders
from curate.publish.upload import HubRepository, RetryPolicy, UploadReport, describe, upload
from curate.sinks.wds_side_files import SIZES_FILE

log = logging.getLogger("curate.publish")

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
HF_ENDPOINTS = ("https://huggingface.co", "https://hub-ci.huggingface.co")  # the endpoints that serve Xet storage


@dataclass
class PublishSettings:
    """Limits of the repository layout and of the upload."""

    max_files_per_folder: int = MAX_FILES_PER_FOLDER
    max_files_per_commit: int = FILES_PER_COMMIT
    max_bytes_per_commit: int = BYTES_PER_COMMIT
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass
class RepoPlan:
    """The repository a publish makes: `data` (shards, drop log, charts) first, then `final` (card, manifest)."""

    data: list[PlannedFile]
    final: list[PlannedFile]
    shard_paths: dict[str, str]  # output path of each shard -> repository path
    managed_folders: list[str]  # folders the repository mirrors from the output (stale files there are deleted)

    @property
    def files(self) -> list[PlannedFile]:
        return self.data + self.final

    def file(self, path: str) -> PlannedFile:
        return next(file for file in self.files if file.path == path)


@dataclass
class PublishResult:
    repo_id: str
    revision: str
    plan: RepoPlan
    url: str | None = None
    upload: UploadReport | None = None
    problems: list[str] = field(default_factory=list)


def plan_repository(output: Path, manifest: dict[str, Any], repo_id: str, revision: str = "main",
                    license_id: str | None = None, settings: PublishSettings | None = None) -> RepoPlan:
    """Every file the repository gets, with sizes and sha256 (shards checked against the manifest), and the card."""
    settings = settings or PublishSettings()
    manifest = public_manifest(manifest)  # the card and the manifest copy name files, not local paths
    shards = manifest["outputs"]["shards"]
    shard_paths = repo_paths([shard["path"] for shard in shards], settings.max_files_per_folder)
    data = [output_file(output, s["path"], s["sha256"], s["bytes"], shard_paths[s["path"]]) for s in shards]
    drop_log = manifest["drop_log"]
    data.append(output_file(output, drop_log["path"], drop_log["sha256"]))
    data += sizes_files(output, shards, shard_paths)
    data += chart_files(output)
    configs = data_configs(output, manifest, shard_paths, drop_log["path"])
    loadable = configs[0].format if configs else None
    other_formats = {}
    for fmt in manifest["outputs"]["formats"]:
        if fmt != loadable and fmt in ("parquet", "webdataset"):
            paths = [shard_paths[s["path"]] for s in shards if s["format"] == fmt]
            other_formats[fmt] = _pattern_or_recursive(fmt, paths)
    licenses = sample_licenses(output, manifest)
    try:
        metadata = card_metadata(manifest, repo_id, configs, card_license(licenses, license_id))
    except ValueError as error:
        raise PublishError(str(error), code=2) from error
    images = [file.path for file in data if file.path.startswith("images/")]
    card = render_card(metadata, card_body(manifest, repo_id, revision, configs, other_formats, licenses, images))
    final = [generated_file(CARD, card.encode()),
             generated_file(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())]
    check_patterns(configs, [file.path for file in data + final])
    return RepoPlan(data, final, shard_paths, top_folders(file.path for file in data))


def sizes_files(output: Path, shards: list[dict[str, Any]], shard_paths: dict[str, str]) -> list[PlannedFile]:
    """`sizes.json` of the WebDataset tars (open_clip_train reads it), when they stay in one repository folder."""
    tars = [s["path"] for s in shards if s["format"] == "webdataset"]
    folders = {str(PurePosixPath(shard_paths[path]).parent) for path in tars}
    sizes = output / PurePosixPath(tars[0]).parent / SIZES_FILE if tars else None
    if len(folders) != 1 or sizes is None or not sizes.is_file():
        return []
    return [output_file(output, str(sizes.relative_to(output)), repo_path=f"{folders.pop()}/{SIZES_FILE}")]


def _pattern_or_recursive(fmt: str, paths: list[str]) -> str:
    try:
        return glob_for(paths)
    except ValueError:
        return f"{fmt}/**/*{PurePosixPath(paths[0]).suffix}"


def chart_files(output: Path) -> list[PlannedFile]:
    """The report's charts as `images/<name>.png`; none when the report module or its plotting is unavailable."""
    try:
        from curate.report.plots import plot_pngs
    except ImportError as error:
        log.info("charts left out: %s", error)
        return []
    try:
        pngs = plot_pngs(output)
    except Exception as error:  # noqa: BLE001 - the charts illustrate the card; the data is published without them
        log.warning("charts left out: %s", describe(error))
        return []
    return [generated_file(f"images/{re.sub(r'[^A-Za-z0-9_.-]', '_', name).removesuffix('.png')}.png", png)
            for name, png in pngs.items()]


def publish_output(output: Path, repo_id: str, *, private: bool = False, revision: str = "main",
                   dry_run: Path | None = None, license_id: str | None = None,
                   settings: PublishSettings | None = None,
                   say: Callable[[str], None] = print) -> PublishResult:
    """Publish the output folder `output` as the dataset repository `repo_id` (or, with `dry_run`, write the
    repository's files into that folder and contact nobody). Raises PublishError."""
    settings = settings or PublishSettings()
    if not REPO_ID.match(repo_id):
        raise PublishError(f"--repo {repo_id!r}: expected OWNER/NAME", code=2)
    output = Path(output)
    check_unlocked(output, refuse=lambda message: PublishError(message, code=2))  # a run or retry is changing it
    manifest = read_output(output)
    plan = plan_repository(output, manifest, repo_id, revision, license_id, settings)
    result = PublishResult(repo_id, revision, plan)
    token = _token(required=dry_run is None)
    if token:
        _refuse_token_in(plan.final, token)
    if dry_run is not None:
        write_tree(plan.files, dry_run)
        say(f"dry run: wrote the {len(plan.files)} files of {repo_id} ({sum(f.size for f in plan.files) / 1e6:,.1f} MB)"
            f" to {dry_run}; nothing was uploaded")
        return result
    repository = HubRepository(_hub_api(token, say), repo_id, revision, settings.retry)
    with _quiet_progress_bars(), _hub_errors(repo_id):
        result.url = repository.ensure(private)
        remote = repository.remote_files([file.path for file in plan.files])
        listing = repository.listing()
        deletions = stale_files(listing, [file.path for file in plan.files], plan.managed_folders)
        result.upload = upload(repository, plan.data, plan.final, deletions, remote, say,
                               settings.max_files_per_commit, settings.max_bytes_per_commit)
        result.problems = check_remote(repository.listing(), plan.files, manifest, plan.shard_paths,
                                       plan.managed_folders)
    if result.problems:
        shown = "\n  ".join(result.problems[:10])
        raise PublishError(f"the remote does not match the output after the upload:\n  {shown}")
    report = result.upload
    say(f"published {repo_id}@{revision}: {report.uploaded_files} files uploaded "
        f"({report.uploaded_bytes / 1e6:,.1f} MB)"
        f" in {report.commits} commits, {report.skipped_files} already there"
        + (f", {len(report.deleted_files)} stale files deleted" if report.deleted_files else "")
        + f"; remote checked: {len(plan.files)} files match")
    return result


def _token(required: bool) -> str | None:
    from huggingface_hub import get_token

    token = get_token()
    if not token and required:
        raise PublishError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`", code=2)
    return token


def _refuse_token_in(files: list[PlannedFile], token: str) -> None:
    for file in files:
        if token.encode() in file.read_bytes():
            raise PublishError(f"{file.path} would contain the Hub access token; remove it from the recipe", code=2)


def _hub_api(token: str, say: Callable[[str], None]) -> Any:
    """HfApi on HF_ENDPOINT (read now, not at import); Xet storage off on endpoints other than the Hub's."""
    from importlib.metadata import PackageNotFoundError, version

    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE is set: publishing needs the Hub; unset it or set HF_HUB_OFFLINE=0", code=2)
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    if endpoint not in HF_ENDPOINTS and not constants.HF_HUB_DISABLE_XET:
        constants.HF_HUB_DISABLE_XET = True
        say(f"endpoint {endpoint}: uploading through git LFS (Xet storage is only on the Hugging Face Hub)")
    try:
        curate_version = version("curate")
    except PackageNotFoundError:
        curate_version = None
    return HfApi(endpoint=endpoint, token=token, library_name="curate", library_version=curate_version)


@contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """Hub and network failures outside the commits (repository creation, listings) as PublishError."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except (HfHubHTTPError, httpx2.HTTPError, OfflineModeIsEnabled, OSError) as error:
        advice = " (check the token's write access to it)" if _status_of(error) in (401, 403) else ""
        raise PublishError(f"{repo_id}: {describe(error)}{advice}") from error


def _status_of(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


class _quiet_progress_bars:
    """huggingface_hub's per-file progress bars off during the upload (curate prints one line per commit)."""

    def __enter__(self):
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        self._was_disabled = are_progress_bars_disabled()
        disable_progress_bars()

    def __exit__(self, *exc):
        from huggingface_hub.utils import enable_progress_bars

        if not self._was_disabled:
            enable_progress_bars()
