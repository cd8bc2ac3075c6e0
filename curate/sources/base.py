"""The source contract: stream input as unified-sample tables, in a fixed order."""

from __future__ import annotations

import os
from typing import Any, ClassVar, Iterable, Iterator

import pyarrow as pa

from curate.schema import from_rows
from curate.stage import Params, with_drops

# What a source makes of one input row: (sample, drop reason or None, drop detail or None).
SampleResult = tuple[dict[str, Any], str | None, str | None]


class Source:
    """Reads a dataset's input rows and yields them as SAMPLE_SCHEMA tables.

    `iter_batches` must use bounded memory (read by row group / chunk), yield rows
    in the same order on every call, and give each row a key from
    `curate.schema.sample_key(source_id, row_index, url)`. Rows that cannot be
    turned into samples (no URL, bad JSON line) are yielded too, with a
    `drop_reason` column set, so that every input row is accounted for.
    """

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    needs_fetch: ClassVar[bool] = False  # True when samples carry URLs but no image bytes

    def __init__(self, params: Params, recipe_dir: str = "."):
        self.params = params
        self.recipe_dir = recipe_dir

    def preflight(self) -> None:
        """Check the input exists and has the configured columns; raise RecipeError if not."""

    def iter_batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """Yield SAMPLE_SCHEMA tables (+ optional drop_reason/drop_detail) of at most `batch_rows` rows."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this source (type, path, format, columns)."""
        return {"type": self.name, "params": self.params.model_dump(mode="json")}

    def input_file_state(self) -> dict[str, int] | None:
        """Size and modification time of the input when it is one local file (None for a folder, a glob or
        object storage), so that a changed input is noticed before an output made from the old one is
        resumed or reported complete."""
        path = getattr(self, "path", None)
        if not isinstance(path, str) or not os.path.isfile(path):
            return None
        stat = os.stat(path)
        return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def samples_table(results: list[SampleResult]) -> pa.Table:
    """One SAMPLE_SCHEMA table, with drop_reason / drop_detail, of (sample, reason, detail) results."""
    samples, reasons, details = zip(*results)
    return with_drops(from_rows(list(samples)), list(reasons), list(details))


def batched_samples(results: Iterable[SampleResult], batch_rows: int) -> Iterator[pa.Table]:
    """`samples_table`s of at most `batch_rows` results each, in order."""
    chunk: list[SampleResult] = []
    for result in results:
        chunk.append(result)
        if len(chunk) == batch_rows:
            yield samples_table(chunk)
            chunk = []
    if chunk:
        yield samples_table(chunk)


def resolve_path(path: str, recipe_dir: str) -> str:
    """`path` made absolute against the recipe's directory (`~` expanded)."""
    return os.path.abspath(os.path.join(recipe_dir, os.path.expanduser(path)))


def default_dataset(path: str, fallback: str = "images") -> str:
    """A dataset name from a path: the file or folder name without extensions (a glob: its fixed part)."""
    fixed = path.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
    name = os.path.basename(os.path.normpath(fixed)) or os.path.basename(os.path.dirname(os.path.normpath(fixed)))
    return name.split(".", 1)[0] or name or fallback


class LocalPathSource(Source):
    """A source reading `params.path` (made absolute against the recipe's folder) and naming its dataset
    `params.dataset`, else after the path."""

    fallback_dataset: ClassVar[str] = "data"  # the dataset name when the path gives none

    @property
    def path(self) -> str:
        """The configured path, made absolute against the recipe's folder."""
        return resolve_path(self.params.path, self.recipe_dir)

    @property
    def dataset(self) -> str:
        """The dataset name recorded in `source.dataset` and used as the key's source id."""
        return self.params.dataset or default_dataset(self.path, self.fallback_dataset)
