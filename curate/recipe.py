"""Recipes: YAML files that say what to read, which stages to run and what to write.

A recipe is loaded in four steps: parse the YAML, merge the presets it includes
(``include:``, looked up next to the recipe and in the bundled ``filters/``),
apply ``--set dotted.key=value`` overrides, then validate everything with
pydantic models that reject unknown keys. Every user mistake becomes one
RecipeError naming the file, the key path and what was expected.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from curate import registry
from curate.roles.spec import ROLE_NAME, RoleSpec
from curate.stage import Params, RecipeError
from curate.storage import Location, is_remote, location

# curate/_bundled/ links to the project's filters/ and pipelines/ folders (copied into wheels).
BUNDLED = Path(__file__).resolve().parent / "_bundled"
PRESET_DIRS = (BUNDLED / "filters",)
PIPELINE_DIRS = (BUNDLED / "pipelines",)
MAX_RECIPE_BYTES = 1 << 20  # a recipe or preset file; more is not a recipe
MAX_RECIPE_NODES = 100_000  # values in one file once YAML aliases are expanded


class RecipeLoader(yaml.SafeLoader):
    """YAML with the booleans of YAML 1.2: only true/false. YAML 1.1 also reads on/off/yes/no/y/n as
    booleans, which turns `on: url` (caption_join) or `mode: no` into true/false behind the user's back."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def parse_yaml(text: str) -> Any:
    """Parse recipe YAML (YAML 1.2 booleans, see RecipeLoader)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


class OutputSpec(BaseModel):
    """Where and how output shards are written.

    Besides the fields below, a key named after a sink (``parquet:``, ``webdataset:``)
    holds that sink's parameters; any other key is an error.
    """

    model_config = ConfigDict(extra="allow")

    path: str
    formats: list[str] = Field(default_factory=lambda: ["parquet", "webdataset"], min_length=1)
    shard_rows: int | None = Field(10_000, ge=1)  # a shard closes at this many samples...
    shard_bytes: int | None = Field(512 * 1024 * 1024, ge=1)  # ...or this many image bytes
    embeddings: bool = False  # keep the CLIP embeddings column in Parquet shards (it stays in the work area anyway)
    # a run keeping less than this share of its input rows (or nothing) ends with a warning naming the likely cause
    min_kept_fraction: float = Field(0.01, ge=0.0, le=1.0)
    strict: bool = False  # make that warning an error (non-zero exit); also `curate run --strict`


class EngineSpec(BaseModel):
    """How the run is executed."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = None  # Ray cluster address; None = local Ray (or RAY_ADDRESS)
    rows_per_work_shard: int = Field(1000, ge=1)
    batch_rows: int = Field(256, ge=1)  # rows a stage gets per call
    workers: int | Literal["auto"] = "auto"  # workers per pool (annotation groups run side by side)
    # work shards between entering the first annotation group and leaving the last (auto: twice the workers)
    max_shards_in_flight: int | Literal["auto"] = "auto"
    # drop: a sample whose processing raises is dropped (reason stage_error), unless the whole batch fails;
    # raise: any exception stops the run.
    on_sample_error: Literal["drop", "raise"] = "drop"
    keep_work: bool = False  # keep the work area (selection steps, decisions) after a successful run
    # keep the pool (input split, image bytes, annotation tables) after the run; false deletes each pool
    # shard as soon as its output shards are written (`curate clean OUT --pool` deletes a kept one)
    keep_pool: bool = True
    check_disk: bool = True  # refuse to start when the output's disk clearly lacks space (curate/engine/disk.py)


class StorageSpec(BaseModel):
    """How to reach object storage for s3:// paths (credentials come from the environment, never from here)."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = None  # an S3-compatible endpoint; default: AWS_ENDPOINT_URL, else AWS itself
    region: str | None = None  # default: AWS_REGION / AWS_DEFAULT_REGION
    # (an endpoint or path with credentials in it is refused when the plan is compiled, without echoing it)


class TrialSpec(BaseModel):
    """A trial run over part of the input (`--limit`, `--sample`); the output is marked as a trial."""

    model_config = ConfigDict(extra="forbid")

    limit: int | None = Field(None, ge=1)  # the first N input rows (after `sample`)
    sample: float | None = Field(None, gt=0.0, le=1.0)  # rows whose hash of (seed, key) falls below this fraction
    seed: int = 0

    @property
    def active(self) -> bool:
        """Whether this is a trial at all."""
        return self.limit is not None or self.sample is not None


# Settings that change how a run executes but not what it produces: left out of the recipe hash,
# so a run can be resumed with more workers, on a cluster, or from a moved output folder.
EXECUTION_ONLY = {"output": ("path", "min_kept_fraction", "strict"),
                  "engine": ("address", "workers", "max_shards_in_flight", "keep_work", "keep_pool", "check_disk"),
                  "storage": ("endpoint_url", "region")}


class Recipe(BaseModel):
    """A validated recipe. `stages` keeps the recipe's order."""

    model_config = ConfigDict(extra="forbid")

    name: str = "recipe"
    description: str = ""
    source: dict[str, Any]
    # name -> parameters (null = defaults); `false` turns off a stage a preset or the recipe listed
    stages: dict[str, dict[str, Any] | Literal[False] | None] = Field(default_factory=dict)
    output: OutputSpec
    engine: EngineSpec = EngineSpec()
    storage: StorageSpec = StorageSpec()
    # training roles: name -> {when, captions, resolution} (curate/roles/spec.py); `false` turns a role off
    roles: dict[str, dict[str, Any] | Literal[False]] | None = Field(default_factory=dict)
    roles_required: bool = False  # true: a sample that meets no role is dropped (`no_role`)
    trial: TrialSpec = TrialSpec()  # `--limit N` / `--sample F --seed S`: part of the input only
    # stages whose criteria stop rows before the stages after them are annotated (cheap checks before a
    # model: a row failing them reaches no later stage); stages before the one that fetches are gates anyway
    gates: list[str] = Field(default_factory=list)


class LoadedRecipe:
    """A recipe with its typed component parameters, where it came from and its hash."""

    def __init__(self, recipe: Recipe, file: Path, source_params: Params, stage_params: dict[str, Params],
                 sink_params: dict[str, Params], roles: dict[str, RoleSpec] | None = None):
        self.recipe = recipe
        self.file = file
        self.directory = file.parent
        self.source_type: str = recipe.source["type"]
        self.source_params = source_params
        self.stage_params = stage_params
        self.sink_params = sink_params
        self.roles: dict[str, RoleSpec] = roles or {}

    def resolved(self) -> dict[str, Any]:
        """The full recipe with every default filled in, as plain JSON data."""
        data = self.recipe.model_dump(mode="json")
        data["source"] = {"type": self.source_type, **self.source_params.model_dump(mode="json")}
        data["stages"] = {name: p.model_dump(mode="json") for name, p in self.stage_params.items()}
        for name, params in self.sink_params.items():
            data["output"][name] = params.model_dump(mode="json")
        data["roles"] = {name: spec.model_dump(mode="json") for name, spec in self.roles.items()}
        return data

    def sha256(self) -> str:
        """Hash of what the recipe produces: equal hashes mean the same work.

        Execution-only settings are left out and the source path is made absolute.
        """
        identity = self.resolved()
        for section, keys in EXECUTION_ONLY.items():
            for key in keys:
                identity[section].pop(key, None)
            if not identity[section]:
                del identity[section]  # a section of execution-only keys alone (storage) leaves no trace
        if not identity["gates"]:
            del identity["gates"]  # recipes without gates hash as before gates existed
        if not TrialSpec.model_validate(identity["trial"]).active:
            del identity["trial"]  # a full run hashes as before trials existed
        if not identity["roles"] and not identity["roles_required"]:
            del identity["roles"], identity["roles_required"]  # recipes without roles hash as before roles existed
        if isinstance(identity["source"].get("path"), str) and not is_remote(identity["source"]["path"]):
            identity["source"]["path"] = str((self.directory / Path(identity["source"]["path"]).expanduser()).resolve())
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def output_path(self) -> Location:
        """The output folder: a storage URL as given, or a local path (relative ones from the current directory)."""
        where = location(self.recipe.output.path)
        return where.resolve() if isinstance(where, Path) else where


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Load, merge, override and validate the recipe at `path`."""
    file = find_recipe(path)
    data = _read_yaml(file)
    data = _apply_includes(data, file)
    for override in overrides or []:
        _apply_override(data, override, file)
    return _validate(data, file)


def find_recipe(path: str | Path) -> Path:
    """Resolve a recipe path, or the name of a bundled recipe (``demo`` -> pipelines/demo.yaml)."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate.resolve()
    for folder in PIPELINE_DIRS:
        for name in (str(path), f"{path}.yaml"):
            if (folder / name).is_file():
                return (folder / name).resolve()
    raise RecipeError("no such recipe file (nor a bundled recipe of that name; see `curate recipes`)",
                      file=str(path))


def bundled_recipes() -> list[Path]:
    """The recipes shipped in pipelines/."""
    for folder in PIPELINE_DIRS:
        if folder.is_dir():
            return sorted(folder.glob("*.yaml"))
    return []


def _read_yaml(file: Path) -> dict[str, Any]:
    try:
        size = file.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"the file has {size:,} bytes; a recipe or preset has at most {MAX_RECIPE_BYTES:,}",
                              file=str(file))
        data = parse_yaml(file.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(f"{where}not valid YAML ({getattr(error, 'problem', error)})", file=str(file)) from None
    except UnicodeDecodeError as error:
        raise RecipeError(f"not UTF-8 text (byte {error.start})", file=str(file)) from None
    except OSError as error:
        raise RecipeError(f"cannot read: {error.strerror}", file=str(file)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"expected a mapping at the top level, got {type(data).__name__}", file=str(file))
    _check_node_count(data, file)
    return data


def _check_node_count(data: Any, file: Path) -> None:
    """Refuse YAML whose aliases expand to more than MAX_RECIPE_NODES values (an alias bomb, a cyclic alias)."""
    pending, seen = [data], 0
    while pending:
        node = pending.pop()
        seen += 1
        if seen > MAX_RECIPE_NODES:
            raise RecipeError(f"more than {MAX_RECIPE_NODES:,} values once YAML aliases (*name) are expanded",
                              file=str(file))
        if isinstance(node, dict):
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)


def _find_preset(name: str, including_file: Path) -> Path:
    names = [name] if name.endswith((".yaml", ".yml")) else [f"{name}.yaml", name]
    folders = [including_file.parent, including_file.parent / "filters", *PRESET_DIRS]
    for folder in folders:
        for candidate in names:
            path = folder / candidate
            if path.is_file() and path.resolve() != including_file.resolve():  # a recipe may share a preset's name
                return path.resolve()
    looked = ", ".join(str(f) for f in folders)
    raise RecipeError(f"no preset {name!r} (looked in {looked})", file=str(including_file), path="include")


def _apply_includes(data: dict[str, Any], file: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise RecipeError("expected a preset name or a list of preset names", file=str(file), path="include")
    merged: dict[str, Any] = {}
    for name in includes:
        preset_file = _find_preset(name, file)
        if preset_file in seen or preset_file == file:
            raise RecipeError(f"preset {name!r} includes itself", file=str(file), path="include")
        preset = _apply_includes(_read_yaml(preset_file), preset_file, seen + (file,))
        merged = _deep_merge(merged, preset)
    return _deep_merge(merged, data)


def _deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Merge `overlay` onto `base`; mappings merge, anything else is replaced.

    Keys keep the overlay's order, then the base's extra keys: a recipe's stage
    order wins over the order of the presets it includes.
    """
    result: dict[str, Any] = {}
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            result[key] = _deep_merge(base[key], value)
        else:
            result[key] = copy.deepcopy(value)
    for key, value in base.items():
        if key not in result:
            result[key] = copy.deepcopy(value)
    return result


def _apply_override(data: dict[str, Any], override: str, file: Path) -> None:
    key_path, sep, raw_value = override.partition("=")
    if not sep or not key_path.strip():
        raise RecipeError(f"--set expects dotted.key=value, got {override!r}", file=str(file))
    try:
        value = parse_yaml(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    keys = key_path.strip().split(".")
    _check_stage_exists(data, keys, value, file)
    value = _paths_from_cwd(keys[-1], value)  # paths given on the command line: from the current folder
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"cannot set a key inside a {type(child).__name__}", file=str(file),
                              path=".".join(keys[: depth + 1]))
        node = child
    node[keys[-1]] = value


def _check_stage_exists(data: dict[str, Any], keys: list[str], value: Any, file: Path) -> None:
    """`--set stages.X.k=v` and `--set stages.X=false` need stage X in the recipe; `stages.X={...}` adds it."""
    if keys[0] != "stages" or len(keys) < 2:
        return
    stages = data.get("stages") or {}
    adds_a_stage = len(keys) == 2 and (value is None or isinstance(value, dict))
    if keys[1] in stages or adds_a_stage:
        return
    listed = ", ".join(name for name, params in stages.items() if params is not False) or "none"
    raise RecipeError(f"the recipe has no stage {keys[1]!r} (its stages: {listed}); to add one on purpose, "
                      f"--set 'stages.{keys[1]}={{...}}'", file=str(file), path=".".join(keys))


def _paths_from_cwd(key: str, value: Any) -> Any:
    """`value` with every relative local path under a `path` key made absolute from the current folder."""
    if isinstance(value, dict):
        return {k: _paths_from_cwd(k, v) for k, v in value.items()}
    if (key == "path" and isinstance(value, str) and value and not is_remote(value)
            and not Path(value).expanduser().is_absolute()):
        return str(Path(value).expanduser().resolve())
    return value


def _validate(data: dict[str, Any], file: Path) -> LoadedRecipe:
    recipe = _check(Recipe, data, file, prefix="")
    source = dict(recipe.source)
    source_type = source.pop("type", None)
    if source_type not in registry.SOURCES:
        raise RecipeError(f"expected one of {sorted(registry.SOURCES)}, got {source_type!r}", file=str(file),
                          path="source.type")
    source_cls = registry.load(registry.SOURCES, source_type)
    source_params = _check(source_cls.Params, source, file, prefix="source")

    stage_params = validate_stages(recipe.stages, file)

    sink_settings = recipe.output.model_extra or {}
    for key in sink_settings:
        if key not in registry.SINKS:
            allowed = sorted(set(OutputSpec.model_fields) | set(registry.SINKS))
            raise RecipeError(f"unknown key; expected one of: {', '.join(allowed)}", file=str(file),
                              path=f"output.{key}")
    sink_params: dict[str, Params] = {}
    for index, name in enumerate(recipe.output.formats):
        if name not in registry.SINKS:
            raise RecipeError(f"expected one of {sorted(registry.SINKS)}, got {name!r}", file=str(file),
                              path=f"output.formats.{index}")
        sink_cls = registry.load(registry.SINKS, name)
        sink_params[name] = _check(sink_cls.Params, sink_settings.get(name) or {}, file, prefix=f"output.{name}")
    return LoadedRecipe(recipe, file, source_params, stage_params, sink_params, _validate_roles(recipe, file))


def validate_stages(stages: dict[str, Any], file: Path) -> dict[str, Params]:
    """The typed parameters of every stage turned on in a `stages:` mapping, in order."""
    stage_params: dict[str, Params] = {}
    for name, params in stages.items():
        if params is False:
            continue
        if name not in registry.STAGES:
            raise RecipeError(f"unknown stage; expected one of {sorted(registry.STAGES)}", file=str(file),
                              path=f"stages.{name}")
        stage_cls = registry.load(registry.STAGES, name)
        stage_params[name] = _check(stage_cls.Params, params or {}, file, prefix=f"stages.{name}")
    return stage_params


def stages_of_file(file: Path) -> dict[str, Params]:
    """The typed stage parameters of a recipe or preset file, its presets merged in (no source or output needed)."""
    stages = _apply_includes(_read_yaml(file), file).get("stages") or {}
    if not isinstance(stages, dict):
        raise RecipeError("expected a mapping of stage names", file=str(file), path="stages")
    return validate_stages(stages, file)


def _validate_roles(recipe: Recipe, file: Path) -> dict[str, RoleSpec]:
    """Validate each role and compile its condition, so that a bad one fails at load time (and in a dry run)."""
    from curate.roles.assign import compile_roles

    roles: dict[str, RoleSpec] = {}
    for name, spec in (recipe.roles or {}).items():
        if spec is False:
            continue
        if not ROLE_NAME.match(name):
            raise RecipeError("a role name starts with a letter and holds letters, digits, _ and - only",
                              file=str(file), path=f"roles.{name}")
        roles[name] = _check(RoleSpec, spec, file, prefix=f"roles.{name}")
    compile_roles(roles, file=str(file))
    return roles


def _check(model: type[BaseModel], data: Any, file: Path, prefix: str) -> Any:
    """Validate `data` against `model`, turning the first error into a RecipeError."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
        raise RecipeError(_explain(first, model, prefix), file=str(file), path=location or None) from None


def _explain(error: dict[str, Any], model: type[BaseModel], prefix: str) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        return f"unknown key; expected one of: {', '.join(allowed)}" if allowed else "unknown key"
    if kind == "missing":
        return "required key is missing"
    got = error.get("input")
    shown = json.dumps(got, default=str) if not isinstance(got, dict) else "a mapping"
    shown = shown if len(shown) <= 200 else shown[:200] + "..."  # a long value (or a secret) is not echoed whole
    message = error["msg"][0].lower() + error["msg"][1:]
    return f"{message}, got {shown}"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        current = fields[part].annotation
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []
