"""`curate models pull` and `curate models list`: put real weights where curate looks for them.

curate never downloads CLIP weights while it runs (curate.models.clip resolves them offline). This
module is the one place that fetches them, once, on a machine that can reach the Hub (a cluster's
login node), into the caches the offline resolver reads:

- an open_clip model with its pretrained tag (``ViT-L-14/openai``): the file open_clip's pretrained
  config names (its ``hf_hub`` repository and file, the ``.safetensors`` alternative first, as open_clip
  prefers) into the Hugging Face cache (`curate.models.clip.hf_cache_dir`);
- ``hf-hub:ORG/NAME``: that repository's open_clip_config.json and weights file;
- a recipe or preset (a bundled name or a YAML path): every CLIP spec and aesthetic / watermark head
  its stages name; curate's tiny models ship with curate and need nothing;
- an http(s) URL with its sha256: into curate's URL cache (`curate.models.weights.fetch`).

Every file is checked against its sha256: the pin given (``--sha256`` or the recipe's ``sha256:``) and
the sha256 (git oid for small files) the Hub lists. A file that fails is deleted and the pull fails,
naming both hashes. A file already cached is re-checked (against the pin, and against the sha256 the HF
cache stored it under) and downloaded again when it fails.

huggingface_hub reads HF_ENDPOINT, HF_TOKEN and HF_HOME / HF_HUB_CACHE itself; against an endpoint that
is not huggingface.co the Xet transfer protocol is turned off (HF_HUB_DISABLE_XET=1), since mirrors and
proxies serve plain files.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import open_clip
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from pydantic import BaseModel

from curate.models import weights
from curate.models.aesthetic import PUBLIC_FILES, TINY_AESTHETIC_WEIGHTS, AestheticSpec
from curate.models.clip import (
    HF_CONFIG_NAME,
    HF_HUB_PREFIX,
    TINY_CLIP_WEIGHTS,
    TINY_MODEL,
    ClipSpec,
    _find_cached_tag,
    _safe_alternatives,
    check_clip_available,
    hf_cache_dir,
)
from curate.models.watermark import TINY_WATERMARK_WEIGHTS, WatermarkSpec
from curate.stage import RecipeError

__all__ = ["CachedFile", "PullError", "Pulled", "cached_files", "pull"]

SHA256 = re.compile(r"^[0-9a-f]{64}$")
HF_HOSTS = ("huggingface.co", "hf.co")
# Files a Hugging Face tokenizer (open_clip's HFTokenizer, through transformers) reads offline.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "config.json")
TINY_SAYS = "their scores are for the tests and the demo, not meaningful on real photos"

Say = Callable[[str], None]


class PullError(Exception):
    """A pull that failed: unknown name, unreachable Hub, missing file, sha256 mismatch. One clear message."""


@dataclass
class Pulled:
    """One weights file placed (or found) where curate reads it."""

    name: str  # what was asked for: ViT-B-32/openai, hf-hub:org/name, a URL, a local path
    status: str  # downloaded, cached, local
    path: Path
    sha256: str
    size: int
    recipe: list[str]  # the lines to put in a recipe
    origin: str = ""  # repo/file or URL it came from


@dataclass
class CachedFile:
    """One file of the caches curate reads, for `curate models list`."""

    kind: str  # hf, url, shipped
    label: str  # the model names it serves (ViT-B-32/openai, hf-hub:org/name, a head)
    what: str  # repo/file, or the file name
    path: Path
    sha256: str
    size: int
    note: str = ""

    def line(self) -> str:
        note = f"  ({self.note})" if self.note else ""
        return (f"{self.kind:<7} {self.label}  {self.what}  sha256 {self.sha256}  {self.size:,} bytes  "
                f"{self.path}{note}")


# --------------------------------------------------------------------------- entry point


def pull(name: str, sha256: str | None = None, say: Say = print) -> list[Pulled]:
    """Resolve NAME to the files it needs and place them in curate's caches; say what was done.

    NAME: ``ARCH/TAG`` (an open_clip pretrained tag), ``hf-hub:ORG/NAME``, an http(s) URL (needs
    `sha256`), or a recipe / preset (bundled name or YAML path). Raises PullError.
    """
    pin = _check_pin(sha256)
    name = name.strip()
    if weights.is_url(name):
        return [_report(_pull_url(name, pin, "--sha256"), say)]
    if name.startswith(HF_HUB_PREFIX):
        return [_report(_pull_hf_hub(name, pin, "--sha256"), say)]
    tag = None if name.endswith((".yaml", ".yml")) else _as_tag(name)
    if tag is not None:
        return [_report(_pull_tag(*tag, pin, "--sha256"), say)]
    recipe_file = _find_recipe_or_preset(name)
    if recipe_file is not None:
        if pin:
            raise PullError(f"--sha256 pins one file; {name} is a recipe: its stages pin their files with `sha256:`")
        return _pull_recipe(name, recipe_file, say)
    if name == TINY_MODEL or name.startswith(TINY_MODEL + "/"):
        say(f"nothing to pull: {TINY_MODEL} ships with curate ({TINY_SAYS})")
        return []
    arch = name.replace("/", "-")
    if open_clip.get_model_config(arch) is not None:
        raise PullError(f"{name} needs a pretrained tag: {_tag_examples(arch)}")
    raise PullError(
        f"{name!r} is not an open_clip model with a pretrained tag (e.g. ViT-L-14/openai), an hf-hub:ORG/NAME id, "
        "an http(s) URL, nor a recipe or preset (a YAML file, or a name listed by `curate recipes` or in filters/)"
    )


def _check_pin(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    pin = sha256.strip().lower()
    if not SHA256.match(pin):
        raise PullError(f"--sha256 expects 64 hex digits, got {sha256!r}")
    return pin


def _report(item: Pulled, say: Say, prefix: str = "") -> Pulled:
    verb = {"downloaded": "pulled", "cached": "already cached", "local": "local file"}[item.status]
    origin = f" ({item.origin})" if item.origin else ""
    say(f"{prefix}{verb} {item.name}{origin}")
    say(f"  file:   {item.path}")
    say(f"  sha256: {item.sha256}")
    say(f"  size:   {item.size:,} bytes")
    for index, line in enumerate(item.recipe):
        say(f"  {'recipe:' if index == 0 else '    or:'} {line}")
    return item


# --------------------------------------------------------------------------- open_clip pretrained tags


def _as_tag(name: str) -> tuple[str, str] | None:
    """(arch, tag) for ``ARCH/TAG`` when ARCH is an open_clip model; PullError for an unknown tag of a model."""
    if "/" not in name:
        return None
    model, tag = name.rsplit("/", 1)
    arch = model.replace("/", "-")
    if open_clip.get_model_config(arch) is None:
        return None
    if not open_clip.get_pretrained_cfg(arch, tag):
        raise PullError(f"{tag!r} is not a pretrained tag of {arch}: {_tag_examples(arch)}")
    return arch, tag


def _tag_examples(arch: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not tags:
        return f"open_clip knows no pretrained weights of {arch}"
    return "one of " + ", ".join(f"{arch}/{tag}" for tag in tags)


def _pull_tag(arch: str, tag: str, pin: str | None, pin_label: str) -> Pulled:
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    name = f"{arch}/{tag}"

    def spec_line(sha: str) -> list[str]:
        return [f"model: {{model: {arch}, pretrained: {tag}, sha256: {sha}}}    (`clip:` in aesthetic and watermark)"]

    found, _ = _find_cached_tag(tag_cfg)
    stale = _stale(found[0], pin, pin_label) if found is not None else ""
    if found is not None and not stale:
        return _pulled(name, "cached", found[0], spec_line)
    if not tag_cfg.get("hf_hub"):
        raise PullError(f"{stale}open_clip names no Hugging Face repository for {name}: download its weights by hand "
                        "and set `checkpoint:` to the file")
    repo, filename = os.path.split(tag_cfg["hf_hub"])
    try:  # a cached copy that fails the pin is downloaded again (and fails again unless the Hub has the pinned file)
        path, origin = _download_first(repo, _safe_alternatives(filename or HF_WEIGHTS_NAME), pin, pin_label, name,
                                       force=bool(stale))
    except PullError as error:
        raise PullError(f"{stale}{error}") from error
    _pull_tokenizer(open_clip.get_model_config(arch))
    info = _resolved(ClipSpec(model=arch, pretrained=tag), path)
    return _pulled(name, "downloaded", Path(info["weights"]), spec_line, origin)


def _pull_hf_hub(model: str, pin: str | None, pin_label: str) -> Pulled:
    repo = model[len(HF_HUB_PREFIX):].strip("/")
    if repo.count("/") != 1:
        raise PullError(f"{model!r}: expected hf-hub:ORG/NAME")

    def spec_line(sha: str) -> list[str]:
        return [f"model: {{model: {model}, sha256: {sha}}}"]

    try:
        cached = Path(check_clip_available(ClipSpec(model=model))["weights"])
    except RecipeError:  # not cached yet
        cached = None
    stale = _stale(cached, pin, pin_label) if cached is not None else ""
    if cached is not None and not stale:
        return _pulled(model, "cached", cached, spec_line)
    try:
        config, _ = _download_first(repo, [HF_CONFIG_NAME], None, pin_label, model)
        path, origin = _download_first(repo, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME], pin, pin_label, model,
                                       force=bool(stale))
    except PullError as error:
        raise PullError(f"{stale}{error}") from error
    _pull_tokenizer(_read_model_cfg(config))
    info = _resolved(ClipSpec(model=model), path)
    return _pulled(model, "downloaded", Path(info["weights"]), spec_line, origin)


def _stale(cached: Path, pin: str | None, pin_label: str) -> str:
    """Why a cached file is not good enough ("" when it is): it fails the pin, or the sha256 it was stored under."""
    actual = weights.sha256_file(cached)
    if pin is not None and actual != pin:
        return f"the cached {cached} has sha256 {actual}, but {pin_label} is {pin}; "
    stored = _hub_sha256_of(cached)
    if pin is None and stored is not None and actual != stored:
        return f"the cached {cached} has sha256 {actual}, but the Hub's sha256 it was stored under is {stored}; "
    return ""


def _hub_sha256_of(cached: Path) -> str | None:
    """The Hub's sha256 of a file in the HF cache: the name of the blob its snapshot entry links to (LFS files)."""
    if not cached.is_symlink():
        return None
    name = os.path.basename(os.readlink(cached))  # snapshots/<rev>/<file> -> ../../blobs/<etag>
    return name if SHA256.match(name) else None


def _read_model_cfg(config: Path) -> dict:
    import json

    try:
        return json.loads(config.read_text()).get("model_cfg") or {}
    except (ValueError, AttributeError) as error:
        raise PullError(f"{config} is not an open_clip config ({error})") from error


def _pull_tokenizer(model_cfg: dict | None) -> None:
    """The files of the Hugging Face tokenizer a model's text tower names (SigLIP and friends), if any."""
    repo = ((model_cfg or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
    if not repo:
        return
    for entry in _hub_call(lambda api: api.get_paths_info(repo, list(TOKENIZER_FILES)), repo):
        if hasattr(entry, "blob_id"):  # a file, not a folder
            _download_checked(repo, entry, None, "", f"tokenizer of {repo}")


def _resolved(spec: ClipSpec, downloaded: Path) -> dict:
    """What curate's offline resolver finds for `spec` now; PullError unless it is the downloaded file."""
    try:
        info = check_clip_available(spec)
    except RecipeError as error:
        raise PullError(f"downloaded {downloaded}, but curate's resolver does not find it: {error}") from error
    if Path(info["weights"]).resolve() != downloaded.resolve():
        raise PullError(f"downloaded {downloaded}, but curate's resolver reads another file: {info['weights']}")
    return info


def _pulled(name: str, status: str, path: Path, recipe: Callable[[str], list[str]], origin: str = "") -> Pulled:
    """A Pulled for `path`, with its sha256, size and the recipe lines `recipe(sha256)`."""
    sha = weights.sha256_file(path)
    return Pulled(name, status, path, sha, path.stat().st_size, recipe(sha), origin)


# --------------------------------------------------------------------------- the Hub


def _hub_ready() -> None:
    """Refuse offline mode; turn Xet off against an endpoint that is not huggingface.co."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise PullError("HF_HUB_OFFLINE is set: pulling needs to reach the Hub; run `curate models pull` with "
                        "HF_HUB_OFFLINE=0 on a machine with access to it (the run itself stays offline)")
    host = (urlsplit(constants.ENDPOINT).hostname or "").lower()
    if not any(host == h or host.endswith("." + h) for h in HF_HOSTS) and not constants.HF_HUB_DISABLE_XET:
        os.environ["HF_HUB_DISABLE_XET"] = "1"
        constants.HF_HUB_DISABLE_XET = True  # read at call time; the environment only at import


def _hub_call(call: Callable[[Any], Any], repo: str) -> Any:
    """`call(HfApi())`, its failures turned into one PullError naming the repository and the endpoint."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    _hub_ready()
    where = f"{repo} at {constants.ENDPOINT}"
    try:
        return call(HfApi())
    except GatedRepoError as error:
        raise PullError(f"{where} is gated: accept its terms on the Hub and set HF_TOKEN ({_first_line(error)})") \
            from error
    except RepositoryNotFoundError as error:
        raise PullError(f"no repository {where} (or it is private: set HF_TOKEN to a token that can read it)") \
            from error
    except RevisionNotFoundError as error:
        raise PullError(f"{where}: {_first_line(error)}") from error
    except PullError:
        raise
    except Exception as error:  # network, HTTP and disk errors of huggingface_hub: one message, no traceback
        raise PullError(f"cannot download from {where}: {type(error).__name__}: {_first_line(error)} "
                        "(check HF_ENDPOINT, HF_TOKEN and the network)") from error


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _download_first(repo: str, names: list[str], pin: str | None, pin_label: str, what: str,
                    force: bool = False) -> tuple[Path, str]:
    """Download the first of `names` the repository has (checked); (local path, "repo/file")."""
    listed = {entry.path: entry for entry in _hub_call(lambda api: api.get_paths_info(repo, names), repo)
              if hasattr(entry, "blob_id")}
    for name in names:
        if name in listed:
            return _download_checked(repo, listed[name], pin, pin_label, what, force), f"{repo}/{name}"
    raise PullError(f"{what}: {repo} has no {' nor '.join(names)}")


def _download_checked(repo: str, entry: Any, pin: str | None, pin_label: str, what: str,
                      force: bool = False) -> Path:
    """hf_hub_download of one file of `repo` into curate's HF cache, checked against `pin` and the Hub's hash."""
    from huggingface_hub import hf_hub_download

    listed = entry.lfs.sha256 if entry.lfs is not None else None
    if pin and listed and listed != pin:  # known before any byte is downloaded
        raise PullError(f"{what}: the Hub lists sha256 {listed} for {repo}/{entry.path}, but {pin_label} is {pin}; "
                        "nothing was downloaded")
    path = Path(_hub_call(lambda api: hf_hub_download(repo, entry.path, cache_dir=hf_cache_dir(),
                                                      force_download=force), repo))
    actual = weights.sha256_file(path)
    problem = None
    if pin and actual != pin:
        problem = f"has sha256 {actual}, but {pin_label} is {pin}"
    elif listed and actual != listed:
        problem = f"has sha256 {actual}, but the Hub lists {listed} (a damaged transfer?)"
    elif listed is None and entry.blob_id and _git_blob_id(path) != entry.blob_id:
        problem = f"has git oid {_git_blob_id(path)}, but the Hub lists {entry.blob_id} (a damaged transfer?)"
    if problem:
        _discard(path)
        raise PullError(f"{what}: {repo}/{entry.path} {problem}; deleted the download")
    return path


def _git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _discard(path: Path) -> None:
    """Delete a cached file: the snapshot link, the blob link(s) it points through and the content."""
    current = path
    for _ in range(8):
        if not current.is_symlink():
            break
        target = current.parent / os.readlink(current)
        current.unlink()
        current = target
    if current.exists() or current.is_symlink():
        current.unlink()


# --------------------------------------------------------------------------- URLs


def _pull_url(url: str, pin: str | None, pin_label: str) -> Pulled:
    if pin is None:
        where = "pass --sha256 HEX" if pin_label == "--sha256" else f"set {pin_label.removeprefix('the pin ')}"
        raise PullError(f"{url}: a URL needs its sha256 ({where}, the checksum its publisher gives): curate keeps "
                        "a download under its sha256 and checks it")
    target = weights.cached_download_path(url, pin)
    status = "cached" if target.is_file() and weights.sha256_file(target) == pin else "downloaded"
    try:
        path = weights.fetch(url, pin, "the file")
    except RecipeError as error:  # ModelUnavailable: not downloadable, or a different sha256
        _remove_empty(target.parent)
        message = str(error).replace("but the recipe pins", f"but {pin_label} is")
        mismatch = "has sha256" in message
        raise PullError(f"{message}; deleted the download, nothing was cached" if mismatch else message) from error

    def recipe(sha: str) -> list[str]:
        return [f"checkpoint: {path}    (a CLIP checkpoint; pin it with `sha256: {sha}`)",
                f"head: {{path: {url}, sha256: {sha}}}    (an aesthetic or watermark head; the run reads the cached "
                "copy)"]

    return _pulled(url, status, path, recipe)


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty, or already gone


# --------------------------------------------------------------------------- recipes and presets


def _find_recipe_or_preset(name: str) -> Path | None:
    """A YAML path, a bundled recipe (pipelines/) or a bundled preset (filters/) called `name`, else None."""
    from curate.recipe import PRESET_DIRS, find_recipe

    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    if name.endswith((".yaml", ".yml")):
        raise PullError(f"no recipe file {path}")
    if "/" in name:
        return None
    try:
        return find_recipe(name)
    except RecipeError:
        pass
    for folder in PRESET_DIRS:
        for candidate in (folder / f"{name}.yaml", folder / name):
            if candidate.is_file():
                return candidate.resolve()
    return None


def _stage_params(file: Path) -> Iterator[tuple[str, BaseModel]]:
    """(stage name, validated Params) of every stage the recipe or preset turns on, presets merged in."""
    from curate.recipe import stages_of_file

    yield from stages_of_file(file).items()


def _model_specs(value: Any, path: str) -> Iterator[tuple[str, BaseModel]]:
    """Every ClipSpec, AestheticSpec and WatermarkSpec inside `value`, with its recipe key path."""
    if isinstance(value, (ClipSpec, AestheticSpec, WatermarkSpec)):
        yield path, value
    elif isinstance(value, BaseModel):
        for field in type(value).model_fields:
            yield from _model_specs(getattr(value, field), f"{path}.{field}")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _model_specs(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _model_specs(item, f"{path}.{index}")


def _pull_recipe(name: str, file: Path, say: Say) -> list[Pulled]:
    from curate.ops.clip_stage import local_path

    say(f"{name}: {file}" if Path(name).expanduser().resolve() != file else f"recipe {file}")
    done: dict[tuple, Pulled | str] = {}
    pulled: list[Pulled] = []
    problems: list[str] = []
    tiny = 0
    for stage, params in _stage_params(file):
        for key, spec in _model_specs(params, f"stages.{stage}"):
            if isinstance(spec, ClipSpec):
                spec = spec.model_copy(update={"checkpoint": local_path(spec.checkpoint, str(file.parent))})
                identity: tuple = ("clip", spec.model, spec.pretrained, spec.checkpoint, spec.sha256)
            else:
                spec = spec.model_copy(update={"path": local_path(spec.path, str(file.parent))})
                identity = (type(spec).__name__, spec.head, spec.path, spec.sha256)
            if identity in done:
                previous = done[identity]
                say(f"{key}: {previous.name if isinstance(previous, Pulled) else previous} (see above)")
                continue
            try:
                item = _pull_spec(spec, key)
            except PullError as error:
                problems.append(f"{key} ({_describe(spec)}): {error}")
                say(f"{key} ({_describe(spec)}): not pulled: {error}")
                done[identity] = "not pulled"
                continue
            if item is None:
                tiny += 1
                what = f"{TINY_MODEL} CLIP" if isinstance(spec, ClipSpec) else f"tiny {_head_kind(spec)} head"
                say(f"{key}: {what}, shipped with curate (nothing to pull)")
                done[identity] = what
                continue
            if not (isinstance(spec, ClipSpec) and not spec.sha256):
                item.recipe = []  # the recipe names it already; a CLIP spec without a pin gets the pinned line
            pulled.append(_report(item, say, prefix=f"{key}: "))
            done[identity] = item
    if problems:
        raise PullError(f"{len(problems)} of the files {name} names could not be put in place:\n  "
                        + "\n  ".join(problems))
    if not pulled:
        if tiny:
            say(f"nothing to pull: {name} names only curate's tiny models, shipped with curate ({TINY_SAYS})")
        else:
            say(f"nothing to pull: {name} names no model weights")
    return pulled


def _describe(spec: BaseModel) -> str:
    if isinstance(spec, ClipSpec):
        return spec.checkpoint or "/".join(part for part in (spec.model, spec.pretrained) if part)
    return f"{spec.head} {_head_kind(spec)} head"


def _head_kind(spec: BaseModel) -> str:
    return "aesthetic" if isinstance(spec, AestheticSpec) else "watermark"


def _pull_spec(spec: BaseModel, key: str) -> Pulled | None:
    """Put the weights of one spec in place; None for curate's shipped tiny models."""
    label = f"the pin {key}.sha256"
    if isinstance(spec, ClipSpec):
        pin = spec.sha256.lower() if spec.sha256 else None
        if spec.checkpoint:
            return _local(spec.checkpoint, pin, label, "`checkpoint:`")
        if spec.model.startswith(HF_HUB_PREFIX):
            return _pull_hf_hub(spec.model, pin, label)
        arch = spec.model.replace("/", "-")
        if spec.pretrained:
            if open_clip.get_pretrained_cfg(arch, spec.pretrained):
                return _pull_tag(arch, spec.pretrained, pin, label)
            return _local(spec.pretrained, pin, label, "`pretrained:`")
        if arch == TINY_MODEL:
            return None
        raise PullError(f"CLIP model {spec.model} has no weights: set `pretrained:` ({_tag_examples(arch)}) "
                        "or `checkpoint:`")
    pin = spec.sha256.lower() if spec.sha256 else None
    if spec.path is None:
        if spec.head == "tiny":
            return None
        raise PullError(f"the {spec.head} {_head_kind(spec)} head names no weights: set `path:` to an http(s) URL "
                        "with `sha256:` (then pull the recipe again) or to a local file")
    if weights.is_url(spec.path):
        return _pull_url(spec.path, pin, label)
    public = PUBLIC_FILES.get(spec.head) if isinstance(spec, AestheticSpec) else None
    return _local(spec.path, pin, label, "`path:`", f" (the public file: {public})" if public else "")


def _local(location: str, pin: str | None, pin_label: str, key: str, source: str = "") -> Pulled:
    """A local file a recipe names: present and matching its pin, or a PullError saying what to do."""
    path = Path(location).expanduser()
    if not path.is_file():
        raise PullError(f"{path} is a local file, not something to pull, and it does not exist: copy the weights "
                        f"there{source}, or set {key} to an http(s) URL with `sha256:` and pull the recipe again")
    actual = weights.sha256_file(path)
    if pin and actual != pin:
        raise PullError(f"{path} has sha256 {actual}, but {pin_label} is {pin}")
    return _pulled(str(location), "local", path, lambda sha: [])


# --------------------------------------------------------------------------- list


def cached_files() -> list[CachedFile]:
    """The files of curate's caches: CLIP repositories in the HF cache, the URL cache, the shipped tiny models."""
    return [*_hf_cached_files(), *_url_cached_files(), *_shipped_files()]


def _hf_cached_files() -> list[CachedFile]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hf_cache_dir())
    except CacheNotFound:
        return []
    tags_by_repo: dict[str, list[str]] = {}
    for arch, tag in open_clip.list_pretrained():
        hub = open_clip.get_pretrained_cfg(arch, tag).get("hf_hub")
        if hub:
            tags_by_repo.setdefault(os.path.split(hub)[0], []).append(f"{arch}/{tag}")
    found: list[CachedFile] = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        files: dict[str, Path] = {}  # path in the repository -> cached file, the newest revision's last
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified):
            for file in revision.files:
                files[Path(file.file_path).relative_to(revision.snapshot_path).as_posix()] = Path(file.file_path)
        if repo.repo_type != "model" or (repo.repo_id not in tags_by_repo and HF_CONFIG_NAME not in files):
            continue
        label = ", ".join(tags_by_repo.get(repo.repo_id, [])) or f"{HF_HUB_PREFIX}{repo.repo_id}"
        for name, path in sorted(files.items()):
            if path.is_file():
                sha, stored = weights.sha256_file(path), _hub_sha256_of(path)
                note = f"DAMAGED: the Hub's sha256 is {stored}; pull it again" if stored not in (None, sha) else ""
                found.append(CachedFile("hf", label, f"{repo.repo_id}/{name}", path, sha, path.stat().st_size, note))
    return found


def _url_cached_files() -> list[CachedFile]:
    root = weights.cache_dir()
    found = []
    for path in sorted(root.glob("*/*")) if root.is_dir() else []:
        if not path.is_file() or path.name.startswith(".part-"):
            continue
        sha = weights.sha256_file(path)
        note = "" if sha == path.parent.name else f"DAMAGED: kept under sha256 {path.parent.name}; delete it"
        found.append(CachedFile("url", "URL download", path.name, path, sha, path.stat().st_size, note))
    return found


def _shipped_files() -> list[CachedFile]:
    shipped = [(TINY_MODEL, TINY_CLIP_WEIGHTS), ("head: tiny (aesthetic)", TINY_AESTHETIC_WEIGHTS),
               ("head: tiny (watermark)", TINY_WATERMARK_WEIGHTS)]
    return [CachedFile("shipped", label, path.name, path, weights.sha256_file(path), path.stat().st_size,
                       "tests and demo only")
            for label, path in shipped if path.is_file()]
