"""Where the engine finds sources, stages and sinks by name.

Adding one is one new module plus one line here. Entries are import strings so
that naming a component in a recipe imports only that component.
"""

from __future__ import annotations

import importlib
from typing import Any

SOURCES: dict[str, str] = {
    "url_list": "curate.sources.url_list:UrlListSource",
    "mmc4": "curate.sources.mmc4:Mmc4Source",
    "obelics": "curate.sources.obelics:ObelicsSource",
    "warc": "curate.sources.web_pages:WarcSource",
    "html_pages": "curate.sources.web_pages:HtmlPagesSource",
    "edit_triplets": "curate.sources.edits:EditTripletSource",
    "image_folder": "curate.sources.image_folder:ImageFolderSource",
    "image_shards": "curate.sources.image_shards:ImageShardsSource",
    "hf_dataset": "curate.sources.hf_dataset:HfDatasetSource",
}

STAGES: dict[str, str] = {
    "fetch": "curate.fetch.stage:FetchStage",
    "decode": "curate.ops.decode:DecodeStage",
    "basic_filter": "curate.ops.basic_filter:BasicFilter",
    "language": "curate.ops.language:LanguageFilter",
    "clip_score": "curate.ops.clip_score:ClipScoreStage",
    "aesthetic": "curate.ops.aesthetic:AestheticStage",
    "top_fraction": "curate.ops.top_fraction:TopFractionFilter",
    "dedup_exact": "curate.dedup.exact:DedupExact",
    "dedup_perceptual": "curate.dedup.perceptual:DedupPerceptual",
    "dedup_semantic": "curate.dedup.semantic:DedupSemantic",
    "nsfw": "curate.safety.nsfw:NsfwStage",
    "watermark": "curate.safety.watermark:WatermarkStage",
    "faces": "curate.safety.faces:FacesStage",
    "blocklist": "curate.safety.blocklist:Blocklist",
    "blocklist_hashes": "curate.safety.blocklist:BlocklistHashes",
    "documents": "curate.ops.documents:DocumentFilter",
    "image_text_assignment": "curate.ops.image_text_assignment:ImageTextAssignment",
    "dedup_text": "curate.ops.text_dedup:TextDedup",
    "edit_checks": "curate.ops.edit_checks:EditChecks",
    "edit_direction": "curate.ops.edit_direction:EditDirection",
    "decontaminate": "curate.dedup.decontaminate:Decontaminate",
    "caption_join": "curate.ops.caption_join:CaptionJoin",
    "captioner": "curate.ops.captioner:Captioner",
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
