"""The dataset card (README.md): YAML metadata the Hub and `datasets` read, and a body that describes the output."""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow.parquet as pq
import yaml

from curate.drop_log import images_removed

LOADABLE_FORMATS = ("parquet", "webdataset")  # `datasets` builders that read curate's shard formats
TASKS_BY_KIND = {"pair": ["image-to-text", "text-to-image"], "edit": ["image-to-image"],
                 "interleaved": ["image-text-to-text"]}
TAGS_BY_KIND = {"pair": "image-text-pairs", "edit": "image-editing", "interleaved": "interleaved"}
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (10_000_000_000, "1B<n<10B"))
LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")
THRESHOLD_KEY = re.compile(r"^(min|max)_|threshold|fraction|languages|distance|policy|^score$|^drop_|^mode$|^size$"
                           r"|^format$|^quality$|^side$")


@dataclass
class DataConfig:
    """A `configs:` entry: one loadable set of shards (a format, and a role when the output has roles)."""

    name: str
    format: str
    pattern: str  # data_files glob, relative to the repository root
    files: list[str]  # repository paths it matches
    rows: int
    num_bytes: int
    features: list[Any] | None  # `datasets` features as YAML, read from the first Parquet shard


def data_configs(root: Path, manifest: dict[str, Any], paths: dict[str, str],
                 drops_path: str | None) -> list[DataConfig]:
    """One config per role folder of the loadable format (Parquet, else WebDataset), then `drops` for the drop log.

    `datasets` picks one builder for a whole repository from its first config, so configs of the other
    format would not load; those shards are still uploaded and the card shows how to read them.
    """
    shards = manifest["outputs"]["shards"]
    formats = [fmt for fmt in LOADABLE_FORMATS if any(shard["format"] == fmt for shard in shards)]
    if not formats:
        return []
    groups: dict[str, list[dict]] = {}
    for shard in shards:
        if shard["format"] == formats[0]:
            role = "/".join(PurePosixPath(shard["path"]).parts[1:-1])
            groups.setdefault(role, []).append(shard)
    configs = []
    for role, members in sorted(groups.items(), key=lambda item: (item[0] != "", item[0])):
        files = sorted(paths[shard["path"]] for shard in members)
        features = _parquet_features(root / members[0]["path"]) if formats[0] == "parquet" else None
        configs.append(DataConfig(role.replace("/", "-") or "default", formats[0], glob_for(files), files,
                                  sum(s["rows"] for s in members), sum(s["bytes"] for s in members), features))
    if drops_path is not None and formats[0] == "parquet":
        # every row of the file: dropped samples (`image` null) and images removed from kept documents (`image` set)
        configs.append(DataConfig("drops", "parquet", drops_path, [drops_path], drop_log_file_rows(manifest),
                                  (root / manifest["drop_log"]["path"]).stat().st_size,
                                  _parquet_features(root / manifest["drop_log"]["path"])))
    return configs


def drop_log_file_rows(manifest: dict[str, Any]) -> int:
    """Rows of drops.parquet: `drop_log.rows` dropped samples plus `drop_log.image_rows` removed images (0 in a
    manifest of before image rows)."""
    return manifest["drop_log"]["rows"] + manifest["drop_log"].get("image_rows", 0)


def glob_for(files: list[str]) -> str:
    """The data_files pattern matching exactly `files`: `folder/*.ext`, or `folder/*/*.ext` over split subfolders."""
    suffixes = {PurePosixPath(f).suffix for f in files}
    extension = suffixes.pop() if len(suffixes) == 1 else ""
    folders = {str(PurePosixPath(f).parent) for f in files}
    if len(folders) == 1:
        return f"{folders.pop()}/*{extension}"
    parents = {str(PurePosixPath(folder).parent) for folder in folders}
    if len(parents) != 1:
        raise ValueError(f"shards of one config are spread over unrelated folders: {sorted(folders)[:3]}")
    return f"{parents.pop()}/*/*{extension}"


def check_patterns(configs: list[DataConfig], repo_files: list[str]) -> None:
    """Refuse a config whose pattern matches other repository files than its own (glob `*` stays in a folder)."""
    for config in configs:
        matched = sorted(f for f in repo_files if _glob_match(f, config.pattern))
        if matched != sorted(config.files):
            raise ValueError(f"config {config.name}: pattern {config.pattern} matches {len(matched)} files, "
                             f"expected {len(config.files)}")


def _glob_match(path: str, pattern: str) -> bool:
    parts, pattern_parts = path.split("/"), pattern.split("/")
    return len(parts) == len(pattern_parts) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts))


def _parquet_features(path: Path) -> list[Any]:
    import datasets

    return datasets.Features.from_arrow_schema(pq.read_schema(path))._to_yaml_list()


def sample_licenses(root: Path, manifest: dict[str, Any]) -> dict[str | None, int]:
    """Samples per `source.license` value (None: not recorded), read from the Parquet shards; {} without them."""
    counts: dict[str | None, int] = {}
    for shard in manifest["outputs"]["shards"]:
        if shard["format"] != "parquet":
            continue
        table = pq.read_table(root / shard["path"], columns=["source"])
        for item in table.column("source").combine_chunks().field("license").value_counts().to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


def size_category(rows: int) -> str:
    for limit, name in SIZE_CATEGORIES:
        if rows < limit:
            return name
    return "n>10B"


def card_license(licenses: dict[str | None, int], override: str | None) -> str:
    """The card's `license`: the given one, the samples' single shared license, `unknown` when none was
    recorded, else `other` (the body lists them)."""
    if override is not None:
        if not LICENSE_ID.match(override):
            raise ValueError(f"--license {override!r}: use a Hub license id such as cc-by-4.0, apache-2.0 or other")
        return override
    recorded = {name for name in licenses if name}
    if not recorded:
        return "unknown"
    if len(recorded) == 1 and None not in licenses:
        name = recorded.pop().strip().lower()
        return name if LICENSE_ID.match(name) else "other"
    return "other"


def card_metadata(manifest: dict[str, Any], repo_id: str, configs: list[DataConfig], license_id: str) -> dict:
    """The YAML front matter."""
    kinds = sorted(manifest.get("kinds", {}))
    roles = sorted({c.name for c in configs if c.name not in ("default", "drops")})
    tasks = sorted({task for kind in kinds for task in TASKS_BY_KIND.get(kind, [])})
    metadata: dict[str, Any] = {
        "pretty_name": repo_id.split("/", 1)[-1].replace("-", " ").replace("_", " "),
        "license": license_id,
        "task_categories": tasks,
        "size_categories": [size_category(manifest["outputs"]["rows"])],
        "tags": ["curate", *[TAGS_BY_KIND.get(kind, kind) for kind in kinds], *roles],
    }
    if configs:
        metadata["configs"] = []
        for index, config in enumerate(configs):
            entry: dict[str, Any] = {"config_name": config.name,
                                     "data_files": [{"split": "train", "path": config.pattern}]}
            if index == 0 and config.name != "default":
                entry["default"] = True
            metadata["configs"].append(entry)
        infos = [_dataset_info(config) for config in configs if config.features is not None]
        if infos:
            metadata["dataset_info"] = infos
    return metadata


def _dataset_info(config: DataConfig) -> dict[str, Any]:
    return {"config_name": config.name, "features": config.features,
            "splits": [{"name": "train", "num_examples": config.rows}], "download_size": config.num_bytes}


# --------------------------------------------------------------------------- body


def card_body(manifest: dict[str, Any], repo_id: str, revision: str, configs: list[DataConfig],
              other_formats: dict[str, str], licenses: dict[str | None, int], images: list[str]) -> str:
    """The Markdown body: what the dataset is, loading, funnel, filters, models, statistics, charts, recipe."""
    sections = [
        _summary(manifest, repo_id),
        _loading(repo_id, revision, configs, other_formats),
        _funnel(manifest),
        _filters(manifest),
        _models(manifest),
        _statistics(manifest),
        _licenses(licenses),
        _charts(images),
        _recipe(manifest),
        _files(manifest),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _summary(manifest: dict[str, Any], repo_id: str) -> str:
    recipe = manifest["recipe"]
    totals = manifest["reconciliation"]
    kinds = ", ".join(f"{count:,} {kind}" for kind, count in sorted(manifest.get("kinds", {}).items()))
    sources = "; ".join(f"{s.get('dataset') or s.get('type')} (`{s.get('type')}`, {s.get('rows', 0):,} rows)"
                        for s in manifest.get("sources", []))
    description = str(recipe["resolved"].get("description") or "").strip()
    lines = [f"# {repo_id.split('/', 1)[-1]}", ""]
    if description:
        lines += [description, ""]
    lines += [
        f"Built with curate {manifest['versions'].get('curate', '')} by the recipe `{recipe['name']}` "
        f"(sha256 `{recipe['sha256'][:16]}…`) on {manifest['created'][:10]}.",
        "",
        f"- **Samples:** {manifest['outputs']['rows']:,} ({kinds or 'none'})",
        f"- **Input rows:** {totals['input_rows']:,}; **kept** {totals['output_rows']:,}, "
        f"**dropped** {totals['dropped_rows']:,} (every dropped row is in `drops.parquet` with its reason)"
        + _removed_images_note(manifest),
        f"- **Formats:** {', '.join(manifest['outputs']['formats'])}",
        f"- **Sources:** {sources or 'not recorded'}",
        "- **Manifest:** [`manifest.json`](manifest.json) lists every shard with its rows, bytes and sha256",
    ]
    return "\n".join(lines)


def _removed_images_note(manifest: dict[str, Any]) -> str:
    images = manifest["drop_log"].get("image_rows", 0)
    if not images:
        return ""
    return (f"; **images removed** from kept documents {images:,} (rows of `drops.parquet` whose `image` column "
            "is set: the document's key, the image URL, its index in the document and the reason)")


def _loading(repo_id: str, revision: str, configs: list[DataConfig], other_formats: dict[str, str]) -> str:
    revision_arg = f', revision="{revision}"' if revision != "main" else ""
    lines = ["## Load it", "", "```python", "from datasets import load_dataset", ""]
    for config in configs:
        name = "" if config.name == "default" else f'"{config.name}", '
        lines.append(f'{_identifier(config.name)} = load_dataset("{repo_id}", {name}split="train"{revision_arg})'
                     f"  # {config.rows:,} rows")
    for fmt, pattern in other_formats.items():
        url = f"hf://datasets/{repo_id}@{revision}/{pattern}" if revision_arg else f"hf://datasets/{repo_id}/{pattern}"
        lines.append(f'{_identifier(fmt)} = load_dataset("{fmt}", data_files={{"train": "{url}"}}, split="train")')
    lines.append("```")
    if configs and configs[0].format == "parquet":
        lines += ["", "`images` is a list of images (PIL when loaded with `datasets`); `image_meta`, `captions`, "
                      "`scores` and `source` follow curate's unified sample schema."]
    return "\n".join(lines)


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", "ds" if name == "default" else name)


def _funnel(manifest: dict[str, Any]) -> str:
    lines = ["## Funnel", "", "| stage | phase | rows in | rows out | dropped | reasons |", "|---|---|--:|--:|--:|---|"]
    for stage in manifest["stages"]:
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in
                            sorted(stage["dropped"].items(), key=lambda item: -item[1]))
        removed = images_removed(stage)
        if removed:  # images taken out of documents, not dropped samples
            reasons += ("; " if reasons else "") + "images removed: " + ", ".join(
                f"{reason} {count:,}" for reason, count in sorted(removed.items(), key=lambda item: -item[1]))
        lines.append(f"| {stage['name']} | {stage['phase']} | {stage['rows_in']:,} | {stage['rows_out']:,} | "
                     f"{stage['rows_in'] - stage['rows_out']:,} | {reasons} |")
    return "\n".join(lines)


def _filters(manifest: dict[str, Any]) -> str:
    stages = manifest["recipe"]["resolved"].get("stages") or {}
    lines = ["## Filters and thresholds", "", "| stage | settings |", "|---|---|"]
    for name, params in stages.items():
        settings = [f"`{key}` = {_compact(value)}" for key, value in _flatten(params or {})
                    if value is not None and THRESHOLD_KEY.search(key.rsplit(".", 1)[-1])]
        lines.append(f"| {name} | {'; '.join(settings) or '(defaults)'} |")
    decisions = manifest.get("decisions") or {}
    if decisions:
        lines += ["", "Corpus-wide decisions:", "", "| stage | method | threshold | removed |", "|---|---|---|--:|"]
        for name, summary in decisions.items():
            threshold = summary.get("threshold", "")
            lines.append(f"| {name} | {summary.get('method', '')} | {_compact(threshold)} | "
                         f"{summary.get('removed', summary.get('dropped', ''))} |")
    lines += ["", "The complete recipe, with every default filled in, is under [Recipe](#recipe)."]
    return "\n".join(lines)


def _flatten(params: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in params.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _compact(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|")


def _models(manifest: dict[str, Any]) -> str:
    models = manifest.get("models") or []
    if not models:
        return ""
    lines = ["## Models", "", "| stage | role | model | weights | sha256 | device | precision |",
             "|---|---|---|---|---|---|---|"]
    for model in models:
        name = model.get("name") or ""
        if model.get("pretrained"):
            name += f" ({model['pretrained']})"
        weights = PurePosixPath(str(model.get("weights") or "")).name
        lines.append(f"| {model.get('stage', '')} | {model.get('role', '')} | {name} | {weights} | "
                     f"`{model.get('sha256') or 'not recorded'}` | {model.get('device', '')} | "
                     f"{model.get('precision', '')} |")
    return "\n".join(lines)


def _statistics(manifest: dict[str, Any]) -> str:
    statistics = manifest.get("statistics") or {}
    if not statistics:
        return ""
    lines = ["## Statistics", "", "| field | count | p5 | p50 | p95 | mean |", "|---|--:|--:|--:|--:|--:|"]
    for name, summary in statistics.items():
        quantiles = summary.get("quantiles", {})
        values = [f"{quantiles[q]:.4g}" if quantiles.get(q) is not None else "" for q in ("p5", "p50", "p95")]
        mean = f"{summary['mean']:.4g}" if summary.get("mean") is not None else ""
        lines.append(f"| {name} | {summary.get('count', 0):,} | {' | '.join(values)} | {mean} |")
    return "\n".join(lines)


def _licenses(licenses: dict[str | None, int]) -> str:
    if not licenses:
        return ""
    lines = ["## Licenses", "", "Each sample keeps the license its source recorded (`source.license`); the images "
             "remain under their owners' terms.", "", "| license | samples |", "|---|--:|"]
    for name, count in sorted(licenses.items(), key=lambda item: -item[1]):
        lines.append(f"| {name or 'not recorded'} | {count:,} |")
    return "\n".join(lines)


def _charts(images: list[str]) -> str:
    if not images:
        return ""
    lines = ["## Charts", ""]
    for path in images:
        lines += [f"![{PurePosixPath(path).stem}]({path})", ""]
    return "\n".join(lines).rstrip()


def _recipe(manifest: dict[str, Any]) -> str:
    resolved = yaml.safe_dump(manifest["recipe"]["resolved"], sort_keys=False, allow_unicode=True).rstrip()
    return f"## Recipe\n\nResolved recipe, sha256 `{manifest['recipe']['sha256']}`:\n\n```yaml\n{resolved}\n```"


def _files(manifest: dict[str, Any]) -> str:
    lines = ["## Files", "", "| format | shards | rows | bytes |", "|---|--:|--:|--:|"]
    for fmt in manifest["outputs"]["formats"]:
        shards = [s for s in manifest["outputs"]["shards"] if s["format"] == fmt]
        lines.append(f"| {fmt} | {len(shards):,} | {sum(s['rows'] for s in shards):,} | "
                     f"{sum(s['bytes'] for s in shards):,} |")
    lines.append(f"| drop log | 1 | {drop_log_file_rows(manifest):,} | |")
    return "\n".join(lines)


def render_card(metadata: dict[str, Any], body: str) -> str:
    """README.md text: YAML front matter between `---` lines, then the body."""
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n\n{body}"
