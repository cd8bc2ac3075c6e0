"""Where the engine finds sources, stages and sinks by name.

Adding one is one new module plus one line here. Entries are import strings so
that naming a component in a recipe imports only that component.
"""

from __future__ import annotations

import importlib
from typing import Any

SOURCES: dict[str, str] = {
    "url_list": "curate.sources.url_list:UrlListSource",
}

STAGES: dict[str, str] = {
    "fetch": "curate.fetch.stage:FetchStage",
    "basic_filter": "curate.ops.basic_filter:BasicFilter",
    "language": "curate.ops.language:LanguageFilter",
    "clip_score": "curate.ops.clip_score:ClipScoreStage",
    "aesthetic": "curate.ops.aesthetic:AestheticStage",
    "top_fraction": "curate.ops.top_fraction:TopFractionFilter",
    "dedup_exact": "curate.dedup.exact:DedupExact",
    "dedup_perceptual": "curate.dedup.perceptual:DedupPerceptual",
    "dedup_semantic": "curate.dedup.semantic:DedupSemantic",
}

SINKS: dict[str, str] = {
    "parquet": "curate.sinks.parquet:ParquetSink",
    "webdataset": "curate.sinks.webdataset:WebDatasetSink",
}


def import_target(target: str) -> Any:
    """Import and return `module:attribute`."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def load(table: dict[str, str], name: str) -> Any:
    """Import and return the class registered under `name` in `table`."""
    return import_target(table[name])
