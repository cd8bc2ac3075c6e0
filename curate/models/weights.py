"""Where model weights come from: local files, a download cache, sha256 pins.

Weights are named by a local path or an http(s) URL. A URL is downloaded once into
the cache (``$CURATE_CACHE/weights``, default ``~/.cache/curate/weights``) and must
carry a sha256 pin; a local file may carry one. A file whose sha256 differs from its
pin is refused with `ModelUnavailable`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from curate.stage import RecipeError, WeightsUnavailable

CACHE_ENV = "CURATE_CACHE"
DOWNLOAD_TIMEOUT = 60.0
_CHUNK = 1 << 20

_sha256_cache: dict[tuple[str, int, int], str] = {}


class ModelUnavailable(WeightsUnavailable):
    """Model weights are missing locally, cannot be fetched, or do not match their sha256 pin."""


def is_url(location: str) -> bool:
    """Whether `location` is an http(s) URL rather than a local path."""
    return location.startswith(("http://", "https://"))


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, remembered per process while its size and mtime stay the same."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _sha256_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
        _sha256_cache[key] = digest.hexdigest()
    return _sha256_cache[key]


def verify_sha256(path: str | os.PathLike, expected: str | None, what: str) -> str:
    """Return the sha256 of `path`; raise ModelUnavailable if `expected` is set and differs."""
    actual = sha256_file(path)
    if expected is not None and actual != expected.lower():
        raise ModelUnavailable(
            f"{what} {path} has sha256 {actual}, but the recipe pins {expected}: "
            "point the recipe at the intended file or update the pin"
        )
    return actual


def local_file(path: str, what: str, hint: str) -> Path:
    """`path` as an existing file, or ModelUnavailable naming it and saying how to fix it (`hint`)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelUnavailable(f"{what} {file} does not exist; {hint}")
    return file


def cache_dir() -> Path:
    """The folder downloaded weights are kept in."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "curate")
    return Path(root) / "weights"


def cached_download_path(url: str, sha256: str) -> Path:
    """Where the download of `url` with content `sha256` is kept."""
    name = os.path.basename(url.split("?", 1)[0].rstrip("/")) or "weights"
    return cache_dir() / sha256.lower() / name


def fetch(url: str, sha256: str | None, what: str) -> Path:
    """The local copy of `url`, downloading it into the cache (checked against `sha256`) if needed."""
    if not sha256:
        raise RecipeError(f"{what} {url} is a URL without a sha256 pin: set `sha256:` to the file's checksum")
    target = cached_download_path(url, sha256)
    if target.is_file() and sha256_file(target) == sha256.lower():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    try:
        with os.fdopen(handle, "wb") as out:
            actual = _download(url, out, what)
        if actual != sha256.lower():
            raise ModelUnavailable(f"{what} downloaded from {url} has sha256 {actual}, but the recipe pins {sha256}")
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return target


def _download(url: str, out, what: str) -> str:
    """Stream `url` into `out`; return the sha256 of what was received."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            while block := response.read(_CHUNK):
                digest.update(block)
                out.write(block)
    except (urllib.error.URLError, OSError) as error:
        raise ModelUnavailable(
            f"cannot download {what} from {url} ({error}); download it elsewhere and point `path:` at the local file"
        ) from error
    return digest.hexdigest()


def resolve(location: str, sha256: str | None, what: str, hint: str) -> tuple[Path, str]:
    """A local file for `location` (a path or a pinned URL) and its verified sha256."""
    if is_url(location):
        path = fetch(location, sha256, what)
        return path, sha256_file(path)
    path = local_file(location, what, hint)
    return path, verify_sha256(path, sha256, what)
