"""Where files live: a local folder or an object store, behind one small interface.

A location is either a `pathlib.Path` (local, unchanged behaviour) or a `StoragePath`
for a URL: `s3://bucket/prefix` and `gs://bucket/prefix` through pyarrow's own
filesystems, any other fsspec protocol (`hf://`, `memory://`, ...) through fsspec.
`StoragePath` offers the few `pathlib` operations the engine uses (`/`, `name`,
`exists`, `read_text`, `iterdir`, ...), and the functions below take either kind,
so code that works on a local output works on a bucket.

What "atomic" means per store (`atomic_output`):

  local        a temporary file beside the target, renamed into place (os.replace).
  s3, gs       no rename: the content is written completely to a local scratch file
               (tempfile's folder), then uploaded once to its final key. An object
               becomes visible only when its upload completes, so readers see the
               whole object or none; an upload that fails is deleted. A re-written
               key is replaced whole.
  other fsspec as s3: write once to the final path, from a complete scratch file.

On stores without rename, readers trust only what a marker written last names: a
work shard counts once its `.done.json` exists, an output shard once the manifest
lists it; anything else left by a killed run is written again on resume.

Configuration (`StorageConfig`) holds only the endpoint and the region: the S3
endpoint from the recipe's `storage.endpoint_url` or `AWS_ENDPOINT_URL`, the region
from `storage.region`, `AWS_REGION` or `AWS_DEFAULT_REGION`. Credentials are never
part of it: every process (each Ray node too) takes them from its own environment
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, `~/.aws`, an instance
role; `HF_TOKEN` for hf://; Google's default credentials for gs://). A URL carrying
credentials (`s3://key:secret@bucket`) or settings in a query string is refused, so
neither can reach a manifest or a log.
"""

from __future__ import annotations

import functools
import io
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Iterator, Union
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

OBJECT_STORES = ("s3", "gs")  # stores with pyarrow filesystems of their own; no rename, implicit folders
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ALIASES = {"s3a": "s3", "gcs": "gs"}
_UPLOAD_CHUNK = 8 * 1024 * 1024
_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}  # file extension -> pyarrow codec


@dataclass(frozen=True)
class StorageConfig:
    """How to reach object stores: endpoint and region only, never credentials."""

    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, moto, R2, ...); None: AWS
    region: str | None = None

    @classmethod
    def from_settings(cls, endpoint_url: str | None = None, region: str | None = None) -> "StorageConfig":
        """The recipe's settings, else the standard AWS environment variables."""
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if endpoint:
            check_no_credentials(endpoint, "storage.endpoint_url")
        return cls(endpoint_url=endpoint or None, region=region or None)


_current: StorageConfig | None = None


def configure(config: StorageConfig | None) -> None:
    """Set the process-wide config used for URLs given as plain strings.

    The driver sets it from the recipe; every Ray entry point of the engine sets it
    from the config the driver sends, so a worker on another node reaches the same store.
    """
    global _current
    if config is not None:
        _current = config


def current_config() -> StorageConfig:
    """The process-wide storage config; until one is set, the one the environment gives."""
    return _current if _current is not None else StorageConfig.from_settings()


def scheme_of(value: object) -> str | None:
    """The URL scheme of `value` (lower case, aliases folded), or None for a local path."""
    if not isinstance(value, str):
        return value.scheme if isinstance(value, StoragePath) else None
    match = _SCHEME.match(value)
    if not match:
        return None
    scheme = match.group(1).lower()
    return None if scheme == "file" else _ALIASES.get(scheme, scheme)


def is_remote(value: object) -> bool:
    """Whether `value` names a file in a store other than the local filesystem."""
    return isinstance(value, StoragePath) or scheme_of(value) is not None


def check_no_credentials(url: str, what: str) -> None:
    """Refuse a URL that carries a user name, password or query string (they could hold secrets)."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None or parts.query:
        raise ValueError(f"{what} must not contain credentials or a query string; give credentials through the "
                         "environment (AWS_ACCESS_KEY_ID, ...) and the endpoint in storage.endpoint_url")


Location = Union[Path, "StoragePath"]


def location(value: str | os.PathLike | "StoragePath", config: StorageConfig | None = None) -> Location:
    """A `Path` for a local path (or file:// URL), a `StoragePath` for a store URL."""
    if isinstance(value, (StoragePath, Path)):
        return value
    text = os.fspath(value)
    if text.lower().startswith("file://"):
        return Path(text[len("file://"):])
    if scheme_of(text) is not None:
        return StoragePath(text, config)
    return Path(text).expanduser()


class StoragePath:
    """A file or folder in a store, addressed by URL, with the pathlib operations the engine needs.

    Holds the URL and the (credential-free) config, so it can be sent to Ray workers;
    the filesystem object is built, and cached, in each process that uses it.
    """

    __slots__ = ("scheme", "path", "config")

    def __init__(self, url: str, config: StorageConfig | None = None):
        scheme = scheme_of(url)
        if scheme is None:
            raise ValueError(f"not a storage URL: {url}")
        check_no_credentials(url, "a storage URL")
        parts = urlsplit(url)
        segments = [s for s in f"{parts.netloc}/{parts.path}".split("/") if s]
        if not segments:
            raise ValueError(f"{scheme}:// URL without a bucket")
        if any(s in (".", "..") for s in segments):
            raise ValueError(f"storage URL with '.' or '..' segments: {url}")
        self.scheme = scheme
        self.path = "/".join(segments)
        self.config = config if config is not None else current_config()

    @classmethod
    def _of(cls, scheme: str, path: str, config: StorageConfig) -> "StoragePath":
        made = cls.__new__(cls)
        made.scheme, made.path, made.config = scheme, path, config
        return made

    # -- names -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"StoragePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoragePath) and (self.scheme, self.path) == (other.scheme, other.path)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path))

    def __lt__(self, other: "StoragePath") -> bool:
        return (self.scheme, self.path) < (other.scheme, other.path)

    def __truediv__(self, part: str | os.PathLike) -> "StoragePath":
        extra = [s for s in os.fspath(part).split("/") if s]
        if any(s in (".", "..") for s in extra):
            raise ValueError(f"'.' or '..' in a storage path: {part}")
        return StoragePath._of(self.scheme, "/".join([self.path, *extra]), self.config)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> "StoragePath":
        head = self.path.rsplit("/", 1)[0] if "/" in self.path else self.path
        return StoragePath._of(self.scheme, head, self.config)

    def with_name(self, name: str) -> "StoragePath":
        return self.parent / name

    def relative_to(self, other: "StoragePath") -> PurePosixPath:
        """This path relative to `other` (ValueError if it is not inside it)."""
        if not isinstance(other, StoragePath) or other.scheme != self.scheme:
            raise ValueError(f"{self} is not inside {other}")
        return PurePosixPath(self.path).relative_to(other.path)

    # -- the filesystem -------------------------------------------------------------

    @property
    def filesystem(self) -> pafs.FileSystem:
        return _filesystem(self.scheme, self.config)

    def info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def stat(self) -> SimpleNamespace:
        info = self.info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.url)
        return SimpleNamespace(st_size=info.size)

    def iterdir(self) -> Iterator["StoragePath"]:
        """The entries directly inside this folder (none if it does not exist)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        for info in sorted(self.filesystem.get_file_info(selector), key=lambda i: i.path):
            yield StoragePath._of(self.scheme, info.path.strip("/"), self.config)

    def glob(self, pattern: str) -> Iterator["StoragePath"]:
        """Entries of this folder whose name matches `pattern` (one level; no '/' or '**')."""
        if "/" in pattern:
            raise ValueError("StoragePath.glob matches names in one folder only")
        return (p for p in self.iterdir() if fnmatch(p.name, pattern))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Folders are implicit on object stores; elsewhere the folder is created."""
        if self.scheme in OBJECT_STORES:
            return
        self.filesystem.create_dir(self.path, recursive=parents)

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path, compression=None) as stream:
            return stream.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """Write the object in one piece (visible once complete)."""
        with atomic_output(self) as temporary:
            temporary.write_bytes(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.filesystem.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str, config: StorageConfig) -> pafs.FileSystem:
    """The filesystem of a scheme, built once per process and config."""
    if scheme == "s3":
        return pafs.S3FileSystem(endpoint_override=config.endpoint_url, region=config.region)
    if scheme == "gs":
        return pafs.GcsFileSystem()
    try:
        import fsspec
    except ImportError as error:  # pragma: no cover - fsspec comes with datasets
        raise ValueError(f"no filesystem for {scheme}:// (fsspec is not installed)") from error
    try:
        store = fsspec.filesystem(scheme)
    except (ValueError, ImportError) as error:
        raise ValueError(f"no filesystem for {scheme}://: {error}") from error
    return pafs.PyFileSystem(pafs.FSSpecHandler(store))


def filesystem_and_path(value: str | os.PathLike | StoragePath) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path within it, for pyarrow's `filesystem=` arguments."""
    where = location(value)
    if isinstance(where, StoragePath):
        return where.filesystem, where.path
    return pafs.LocalFileSystem(), str(where)


# -- reading -------------------------------------------------------------------------


def exists(value: str | os.PathLike | StoragePath) -> bool:
    return location(value).exists()


def is_file(value: str | os.PathLike | StoragePath) -> bool:
    return location(value).is_file()


def file_size(value: str | os.PathLike | StoragePath) -> int:
    return location(value).stat().st_size


def open_input(value: str | os.PathLike | StoragePath):
    """A seekable binary file object (Parquet footers, tar members)."""
    where = location(value)
    if isinstance(where, StoragePath):
        return where.filesystem.open_input_file(where.path)
    return open(where, "rb")


class _RawStream(io.RawIOBase):
    """A pyarrow input stream as a Python raw stream, so it can be buffered and read by lines."""

    def __init__(self, stream: pa.NativeFile):
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._stream.readinto(buffer)

    def close(self) -> None:
        self._stream.close()
        super().close()


def open_stream(value: str | os.PathLike | StoragePath, decompress: bool = False) -> io.BufferedReader:
    """A buffered binary stream, read front to back (lines, CSV); `decompress` undoes `.gz` and the like."""
    fs, path = filesystem_and_path(value)
    stream = fs.open_input_stream(path, compression=None)
    codec = _COMPRESSION.get(PurePosixPath(path).suffix.lower()) if decompress else None
    if codec is not None:
        stream = pa.CompressedInputStream(stream, codec)
    return io.BufferedReader(_RawStream(stream))


def parquet_file(value: str | os.PathLike | StoragePath) -> pq.ParquetFile:
    """A Parquet file opened through its store."""
    where = location(value)
    if isinstance(where, StoragePath):
        return pq.ParquetFile(where.path, filesystem=where.filesystem)
    return pq.ParquetFile(where)


def read_table(value: str | os.PathLike | StoragePath, columns: list[str] | None = None) -> pa.Table:
    """`pq.read_table` through the file's store."""
    where = location(value)
    if isinstance(where, StoragePath):
        return pq.read_table(where.path, columns=columns, filesystem=where.filesystem)
    return pq.read_table(where, columns=columns)


@contextmanager
def local_copy(value: str | os.PathLike | StoragePath) -> Iterator[Path]:
    """A local file with the content of `value` (the file itself when local; a scratch copy otherwise)."""
    where = location(value)
    if not isinstance(where, StoragePath):
        yield where
        return
    handle, name = tempfile.mkstemp(prefix=".curate-", suffix=f"-{where.name}")
    os.close(handle)
    scratch = Path(name)
    try:
        with where.filesystem.open_input_stream(where.path, compression=None) as source:
            with open(scratch, "wb") as target:
                while block := source.read(_UPLOAD_CHUNK):
                    target.write(block)
        yield scratch
    finally:
        scratch.unlink(missing_ok=True)


# -- writing -------------------------------------------------------------------------


@contextmanager
def atomic_output(target: str | os.PathLike | StoragePath) -> Iterator[Path]:
    """Yield a local temporary path to write; when the block succeeds, it becomes `target` atomically.

    Local: a hidden temporary file beside the target, renamed into place. Store: a
    local scratch file, uploaded to the target's key once complete (see the module doc).
    """
    where = location(target)
    if isinstance(where, StoragePath):
        handle, name = tempfile.mkstemp(prefix=".curate-", suffix=f"-{where.name}")
        os.close(handle)
        scratch = Path(name)
        try:
            yield scratch
            upload(scratch, where)
        finally:
            scratch.unlink(missing_ok=True)
        return
    where.parent.mkdir(parents=True, exist_ok=True)
    temporary = where.with_name(f".{where.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        os.replace(temporary, where)
    finally:
        if temporary.exists():
            temporary.unlink()


def upload(source: Path, target: StoragePath) -> None:
    """Copy a complete local file to its final key; on failure no (partial) object is left behind."""
    fs = target.filesystem
    if target.scheme not in OBJECT_STORES:
        fs.create_dir(target.parent.path, recursive=True)
    try:
        with open(source, "rb") as reader, fs.open_output_stream(target.path, compression=None) as writer:
            while block := reader.read(_UPLOAD_CHUNK):
                writer.write(block)
    except BaseException:
        try:
            fs.delete_file(target.path)
        except OSError:
            pass  # nothing was completed: no object to remove
        raise


def remove_tree(value: str | os.PathLike | StoragePath, ignore_errors: bool = False) -> None:
    """Delete a folder and everything in it. A bucket is emptied, never deleted; a missing store folder is fine."""
    where = location(value)
    if not isinstance(where, StoragePath):
        shutil.rmtree(where, ignore_errors=ignore_errors)
        return
    fs = where.filesystem
    if not where.exists():
        return
    if where.is_file():
        where.unlink(missing_ok=True)
        return
    fs.delete_dir_contents(where.path, missing_dir_ok=True)
    if "/" in where.path and where.exists():
        fs.delete_dir(where.path)
