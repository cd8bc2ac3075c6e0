"""The stage contract (curate/stage.py), checked on every registered stage and the role step.

Each stage declares its scope, the sample columns it reads and provides, whether it reads image
bytes, and which Params fields are annotation params (in the annotation's fingerprint) or
selection params (never in it). A stage that splits its steps selects from its annotations alone:
`select` over the annotated batch without image bytes drops what `process` drops with them.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from curate import registry, schema
from curate.ops.basic_filter import BasicFilter, BasicFilterParams
from curate.ops.documents import DocumentFilter, DocumentsParams
from curate.ops.language import LanguageFilter, LanguageParams
from curate.roles.assign import TARGET as ROLE_TARGET
from curate.roles.assign import RoleAssignment, RoleAssignmentParams
from curate.stage import CorpusStage, RecipeError, Resources, Stage, StageContext

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = DATA / "captioned-images"
TARGETS = {**registry.STAGES, "roles": ROLE_TARGET}
COLUMNS = frozenset(schema.SAMPLE_SCHEMA.names) - {"key"}
DECLARATIONS = ("reads", "provides", "reads_images", "annotation_params", "selection_params")
TINY_CLIP = {"model": "curate-tiny"}
LIST_FILES = {"urls.txt": "https://example.org/a.jpg\n", "domains.txt": "example.net\n", "sha256.txt": "f" * 64 + "\n",
              "phash.txt": "0123456789abcdef\n"}

# The smallest valid params of the stages that need some (see pipelines/*.yaml).
MINIMAL: dict[str, dict[str, Any]] = {
    "clip_score": {"model": TINY_CLIP},
    "aesthetic": {"clip": TINY_CLIP, "head": {"head": "tiny"}},
    "watermark": {"clip": TINY_CLIP, "head": {"head": "tiny"}},
    "image_text_assignment": {"model": TINY_CLIP},
    "edit_direction": {"model": TINY_CLIP},
    "decontaminate": {"sets": [{"name": "eval", "path": "eval.parquet"}], "model": TINY_CLIP},
    "blocklist": {"urls": ["urls.txt"], "domains": ["domains.txt"]},
    "blocklist_hashes": {"sha256": ["sha256.txt"], "phash": ["phash.txt"]},
    "caption_join": {"path": "captions.parquet"},
    "captioner": {"model": {"type": "tiny", "seed": 0}},
    "roles": {"roles": {"generation": {"when": "aesthetic >= 5"}}},
}

# Other values for fields the generic alternatives below cannot change into a valid value.
ALTERNATIVES: dict[tuple[str, str], Any] = {
    ("roles", "roles"): {"generation": {"when": "aesthetic >= 6"}},
    ("faces", "cascade"): "haarcascade_frontalface_alt.xml",
}


def stage_class(name: str) -> type[Stage]:
    return registry.import_target(TARGETS[name])


def declared(cls: type[Stage], attribute: str) -> bool:
    """Whether a class of the stage's own (not Stage or CorpusStage) sets `attribute`."""
    return any(attribute in vars(klass) for klass in cls.__mro__ if klass not in (Stage, CorpusStage, object))


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory) -> Path:
    """A recipe folder with the list files the blocklists fingerprint."""
    folder = tmp_path_factory.mktemp("contract")
    for name, text in LIST_FILES.items():
        (folder / name).write_text(text)
    return folder


def build(name: str, folder: Path, **changes: Any) -> Stage:
    cls = stage_class(name)
    params = cls.Params.model_validate({**MINIMAL.get(name, {}), **changes})
    return cls(params, StageContext(recipe_dir=str(folder)))


# --------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("name", TARGETS)
def test_scope_matches_the_base_class(name):
    cls = stage_class(name)
    assert cls.scope in ("sample", "corpus"), f"{name}: scope {cls.scope!r}"
    assert (cls.scope == "corpus") == issubclass(cls, CorpusStage), f"{name}: scope {cls.scope!r} vs its base class"
    assert isinstance(cls.version, int) and cls.version >= 1, f"{name}: version {cls.version!r}"


@pytest.mark.parametrize("name", TARGETS)
def test_columns_and_image_bytes_are_declared(name):
    cls = stage_class(name)
    missing = [attribute for attribute in DECLARATIONS if not declared(cls, attribute)]
    assert not missing, f"{name}: declares no {', '.join(missing)}"
    for attribute in ("reads", "provides"):
        value = getattr(cls, attribute)
        assert isinstance(value, frozenset), f"{name}.{attribute} is a {type(value).__name__}, not a frozenset"
        assert value <= COLUMNS, f"{name}.{attribute} names no sample column: {sorted(value - COLUMNS)}"
    assert isinstance(cls.reads_images, bool), f"{name}.reads_images is not a bool"


@pytest.mark.parametrize("name", TARGETS)
def test_every_param_is_an_annotation_or_a_selection_param(name):
    cls = stage_class(name)
    annotation, selection = cls.annotation_params, cls.selection_params
    for attribute, value in (("annotation_params", annotation), ("selection_params", selection)):
        assert isinstance(value, frozenset), f"{name}.{attribute} is a {type(value).__name__}, not a frozenset"
    fields = frozenset(cls.Params.model_fields)
    assert not annotation & selection, f"{name}: both annotation and selection params: {sorted(annotation & selection)}"
    assert not fields - annotation - selection, (
        f"{name}: Params fields in neither annotation_params nor selection_params: "
        f"{sorted(fields - annotation - selection)}")
    unknown = (annotation | selection) - fields
    assert not unknown, f"{name}: declared params that are not Params fields: {sorted(unknown)}"


@pytest.mark.parametrize("name", TARGETS)
def test_resources_and_steps(name, recipe_dir):
    stage = build(name, recipe_dir)
    cls = type(stage)
    assert isinstance(stage.resources, Resources), f"{name}.resources is not a Resources"
    if cls.scope == "sample":
        assert cls.annotate is not Stage.annotate or cls.process is not Stage.process, (
            f"{name}: implements neither annotate() nor process()")
    else:
        assert cls.decide is not CorpusStage.decide or cls.decide_files is not CorpusStage.decide_files, (
            f"{name}: implements no decide()")


# --------------------------------------------------------------------------- fingerprints


@pytest.mark.parametrize("name", TARGETS)
def test_fingerprint_follows_the_annotation_params_only(name, recipe_dir):
    stage = build(name, recipe_dir)
    base = stage.fingerprint()
    json.dumps(base)  # serialisable as it is
    for field in stage.Params.model_fields:
        in_annotation, in_selection = field in stage.annotation_params, field in stage.selection_params
        assert in_annotation or in_selection, f"{name}: param {field} is neither an annotation nor a selection param"
        changed = changed_fingerprint(name, field, recipe_dir)
        outside = stage.speed_params | stage.admission_params
        if in_annotation and field not in outside:
            assert changed != base, f"{name}: changing annotation param {field} leaves the fingerprint as it is"
        else:
            assert changed == base, f"{name}: changing {field} (selection, speed or admission) changes the fingerprint"


@pytest.mark.parametrize("name", sorted(registry.STAGES))
def test_speed_admission_and_pool_params_are_annotation_params(name, recipe_dir):
    stage = build(name, recipe_dir)
    for kind in ("speed_params", "admission_params", "pool_params"):
        declared = getattr(stage, kind)
        assert declared <= stage.annotation_params, f"{name}: {kind} {sorted(declared - stage.annotation_params)}"
    assert not stage.speed_params & stage.admission_params
    assert not (stage.speed_params | stage.admission_params) & stage.pool_params
    assert stage.readmits(stage.admission()) == frozenset()  # the same settings admit nothing new


def test_a_blocklist_edited_in_place_changes_the_fingerprint(tmp_path):
    for name, text in LIST_FILES.items():
        (tmp_path / name).write_text(text)
    before = [build(name, tmp_path).fingerprint() for name in ("blocklist", "blocklist_hashes")]
    (tmp_path / "domains.txt").write_text("example.net\nexample.com\n")
    (tmp_path / "phash.txt").write_text("0123456789abcdef\nfedcba9876543210\n")
    after = [build(name, tmp_path).fingerprint() for name in ("blocklist", "blocklist_hashes")]
    assert all(old != new and old["params"] == new["params"] for old, new in zip(before, after))


def changed_fingerprint(name: str, field: str, folder: Path) -> dict:
    """The fingerprint of the stage with `field` set to another valid value."""
    cls = stage_class(name)
    base = cls.Params.model_validate(MINIMAL.get(name, {}))
    current = base.model_dump(mode="json")[field]
    candidates = [ALTERNATIVES[(name, field)]] if (name, field) in ALTERNATIVES else alternatives(
        current, cls.Params.model_fields[field].annotation)
    for candidate in candidates:
        try:
            params = cls.Params.model_validate({**MINIMAL.get(name, {}), field: candidate})
        except ValidationError:
            continue
        if params.model_dump(mode="json")[field] == current:
            continue
        try:
            return cls(params, StageContext(recipe_dir=str(folder))).fingerprint()
        except RecipeError:  # valid params naming something that is not there (a model, a file)
            continue
    raise AssertionError(f"{name}: no other valid value found for param {field} (add one to ALTERNATIVES)")


def alternatives(value: Any, annotation: Any = None) -> Iterator[Any]:
    """Values that differ from `value` (JSON form), most of them valid for a field of its kind."""
    yield from (choice for choice in literal_choices(annotation) if choice != value)
    if isinstance(value, bool):
        yield not value
    elif isinstance(value, int):
        yield from (value + 1, value - 1, value * 2)
    elif isinstance(value, float):
        yield from (value / 2, value + 0.05, value - 0.05, 0.5)
    elif isinstance(value, str):
        yield value + "x"
    elif value is None:
        yield from (1, 0.5, 2, 10, ["en", "de"], "x", True)
    elif isinstance(value, list):
        yield from list_alternatives(value)
    elif isinstance(value, dict):
        yield from dict_alternatives(value)


def list_alternatives(value: list) -> Iterator[list]:
    if value:
        yield value[:-1]
        yield [*value[1:], value[0]]
        yield [*value, value[-1]]
        yield from ([first, *value[1:]] for first in alternatives(value[0]))
    else:
        yield ["x"]


def dict_alternatives(value: dict) -> Iterator[dict]:
    for key, item in value.items():
        yield from ({**value, key: other} for other in alternatives(item))
    yield {**value, "example.test": "127.0.0.1"}  # a mapping of names (fetch.resolve)


def literal_choices(annotation: Any) -> list[Any]:
    """The values of every Literal inside a type annotation."""
    if annotation is None:
        return []
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [choice for argument in typing.get_args(annotation) for choice in literal_choices(argument)]


def test_alternatives_find_another_value_of_each_kind():
    assert list(alternatives(True)) == [False]
    assert next(alternatives("a", typing.Literal["a", "b"])) == "b"
    assert [254, 255, 255] in list(list_alternatives([255, 255, 255]))
    assert {"size": 1025, "mode": "none"} in list(dict_alternatives({"size": 1024, "mode": "none"}))


# --------------------------------------------------------------------------- select without image bytes


def photo_rows() -> list[dict]:
    """Pairs of real photos (bytes and original sizes) with captions of several lengths and languages."""
    records = [json.loads(line) for line in (PHOTOS / "captions.jsonl").read_text().splitlines()]
    long_caption = "A very long caption that goes on and on about the picture and everything that can be seen in it"
    samples = [(0, "Ein kleiner Hund spielt im Garten mit einem roten Ball."),
               (1, "Une femme lit un livre sur un banc dans le parc."),
               (2, records[2]["caption"]), (3, records[3]["caption"]), (0, ""), (1, "ok"), (0, long_caption),
               (1, records[1]["caption"])]
    rows = []
    for index, (photo, caption) in enumerate(samples):
        path = PHOTOS / records[photo]["file_name"]
        with Image.open(path) as image:
            width, height = image.size
        rows.append({"key": schema.sample_key("contract", index, None), "kind": "pair",
                     "images": [{"bytes": path.read_bytes(), "path": None}],
                     "image_meta": [{"original_width": width, "original_height": height, "width": width,
                                     "height": height}],
                     "captions": [{"name": "alt", "text": caption}], "meta": None})
    return rows


def without_bytes(table: pa.Table) -> pa.Table:
    """`table` with every image's bytes (and path) null, as the selection sees it."""
    images = [[{"bytes": None, "path": None} for _ in row or []] for row in table.column("images").to_pylist()]
    field = schema.SAMPLE_SCHEMA.field("images")
    return table.set_column(table.schema.get_field_index("images"), field, pa.array(images, field.type))


def drops(table: pa.Table) -> list[tuple[str | None, str | None]]:
    return list(zip(table.column("drop_reason").to_pylist(), table.column("drop_detail").to_pylist()))


def assert_select_matches_process(stage: Stage, batch: pa.Table) -> list[tuple[str | None, str | None]]:
    """`select` over the annotations without bytes drops what `process` drops over the full batch."""
    assert stage.splits_steps()
    assert not stage.reads_images
    expected = drops(stage.process(batch))
    annotated = stage.annotate(batch)
    assert "drop_reason" not in annotated.column_names  # no hard drops here
    assert drops(stage.select(without_bytes(annotated))) == expected
    return expected


def test_basic_filter_selects_from_its_annotations_without_image_bytes():
    batch = schema.from_rows(photo_rows())
    params = BasicFilterParams(min_side=332, max_aspect_ratio=1.45, min_caption_words=2, max_caption_chars=80)
    expected = assert_select_matches_process(BasicFilter(params), batch)
    assert [reason for reason, _ in expected] == [None, None, "too_small", "aspect_ratio", "empty_caption",
                                                  "caption_too_short", "caption_too_long", None]


def test_language_selects_from_its_annotations_without_image_bytes():
    batch = schema.from_rows(photo_rows())
    stage = LanguageFilter(LanguageParams(candidates=["en", "de", "fr", "es"], min_confidence=0.6))
    expected = assert_select_matches_process(stage, batch)
    reasons = [reason for reason, _ in expected]
    assert reasons[:2] == ["language", "language"] and reasons[4] is None and reasons[6:] == [None, None]


def test_documents_select_from_their_annotations_without_image_bytes():
    photo = next((PHOTOS / "images").glob("*.jpg")).read_bytes()
    documents = [(["Short."], [20]), (["A real paragraph of text here."] * 3, [20, 375]),
                 ([" ".join(f"word{i}" for i in range(40))], [375])]
    rows = []
    for index, (paragraphs, heights) in enumerate(documents):
        segments = [{"text": text, "image": None} for text in paragraphs]
        segments += [{"text": None, "image": i} for i in range(len(heights))]
        rows.append({"key": schema.sample_key("contract", index, None), "kind": "interleaved",
                     "images": [{"bytes": photo, "path": None}] * len(heights),
                     "image_meta": [{"original_width": 500, "original_height": height} for height in heights],
                     "segments": segments, "meta": None})
    params = DocumentsParams(min_image_side=50, min_images=1, min_text_words=2, max_duplicate_paragraph_share=0.5)
    expected = assert_select_matches_process(DocumentFilter(params), schema.from_rows(rows))
    assert [reason for reason, _ in expected] == ["too_few_images", "duplicate_paragraphs", None]


def test_the_role_step_selects_from_the_roles_it_annotated():
    rows = [{"key": "a", "kind": "pair", "scores": {"aesthetic": 6.0}}, {"key": "b", "kind": "pair"}]
    stage = RoleAssignment(RoleAssignmentParams.model_validate({**MINIMAL["roles"], "required": True}))
    expected = assert_select_matches_process(stage, schema.from_rows(rows))
    assert [reason for reason, _ in expected] == [None, "no_role"]
