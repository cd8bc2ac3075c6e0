"""Caption language identification: record each sample's language and keep the wanted ones.

The detector is lingua (lingua-language-detector 2.x), whose n-gram models ship
inside the wheel: nothing is downloaded at run time. It is built once per worker
in `setup()` with the models of every candidate language preloaded.

What is judged is a pair's caption (`schema.caption_text`: `alt`, else the
first) or, for other kinds, all text segments joined by a space (the same text
`basic_filter` judges). Text that is empty, or shorter than `min_chars`
characters once surrounding whitespace is removed, is not judged: the sample is
kept and recorded with language null.

Every sample that reaches the stage gets its result in its `meta` JSON object
under `"language"`: `{"code": "en", "confidence": 0.93}` (ISO 639-1 code and
lingua's confidence of the top language, rounded to 4 decimals; the keep/drop
decision uses the rounded value). `code` is null with confidence 0.0 when no
language could be identified (no letters at all, e.g. "12345"), and code and
confidence are both null when the text was not judged. An existing JSON object
in `meta` keeps its keys, except that an existing `"language"` key is replaced;
`meta` that is not a JSON object is kept as `{"original": <the string>}`. The
result is written with sorted keys and without spaces.

`annotate` detects and records; `select` keeps or drops from `meta.language` alone, so
changing `languages` or `min_confidence` re-selects without detecting again.

Confidences are lingua's relative probabilities over the candidate languages
(they sum to 1), so their scale depends on the candidates. Measured on the 89
English captions of the URL list in tests/data: with all 75 languages, short
alt text spreads its probability over many similar languages, and only 31 reach
0.5 (none is confidently labelled another language; full sentences mostly reach
0.75 or more); at `min_confidence: 0`, 82 are kept and 7 go to other languages.
With six candidates (en, de, fr, es, zh, ja), 85 reach 0.5, but text in a
language outside the candidates is forced onto the nearest one, often
confidently: a Dutch and an Italian caption of that list come out as English at
about 0.7.

lingua's batch call runs on a thread pool as large as the machine's cores (the
variable RAYON_NUM_THREADS caps it), so several workers on one machine share
those cores.

DataComp's basic filter kept captions whose top fastText lid.176 label is
English, with no confidence threshold (the nearest setting here is
`min_confidence: 0` with all candidates). lingua is a different model: its
decisions differ on some captions, mostly short or mixed-language ones, so a
corpus filtered here is not identical to DataComp's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
from lingua import ConfidenceValue, IsoCode639_1, Language, LanguageDetector, LanguageDetectorBuilder
from pydantic import Field, field_validator, model_validator

from curate.schema import caption_text
from curate.stage import Params, Resources, Stage, StageContext, with_drops

LANGUAGE = "language"
LANGUAGE_UNCERTAIN = "language_uncertain"

META_KEY = "language"

KNOWN_CODES = tuple(sorted(language.iso_code_639_1.name.lower() for language in Language.all()))

# Resident memory of lingua 2.1's preloaded models, measured as the RSS growth of
# building a detector (all 75 languages: 1.2-1.3 GiB high accuracy, 72-76 MiB low
# accuracy; six languages: 120-162 MiB and 11-14 MiB), rounded up into base + per language.
_MEMORY_BASE = {False: 96 << 20, True: 16 << 20}
_MEMORY_PER_LANGUAGE = {False: 17 << 20, True: 1 << 20}


def _codes(values: list[str]) -> list[str]:
    """Lower-cased, de-duplicated ISO 639-1 codes; ValueError names any lingua does not know."""
    codes = list(dict.fromkeys(v.strip().lower() for v in values))
    unknown = [c for c in codes if c not in KNOWN_CODES]
    if unknown:
        raise ValueError(f"unknown language codes {unknown}; lingua knows {', '.join(KNOWN_CODES)}")
    return codes


class LanguageParams(Params):
    """Which languages to keep and how the detector is built.

    - `languages`: ISO 639-1 codes to keep. A judged sample is kept when its top
      language is one of them with at least `min_confidence`. An empty list only
      annotates: nothing is dropped and `min_confidence` is not used.
    - `min_confidence`: the top language's confidence (0..1) needed for a keep;
      below it the sample is dropped as `language_uncertain`, whatever the top
      language is. Its meaning depends on `candidates` and `low_accuracy_mode`
      (see the module docstring).
    - `candidates`: the languages the detector chooses from (at least two, and
      every code of `languages`); None means all 75 languages lingua knows. Fewer
      candidates build faster, use less memory (about 17 MB per language in high
      accuracy mode, 1.2 GB for all) and detect faster, but text in any other
      language is assigned to one of the candidates.
    - `low_accuracy_mode`: lingua's small models only (all languages: about
      76 MB). Faster and far smaller, but much less accurate below about 120
      characters, which is most alt text (of the 89 English captions of the
      URL list in tests/data, 14 come out as another language with confidence
      0.65 to 1.0).
    - `min_chars`: text shorter than this (characters, surrounding whitespace
      excluded) is not judged and is kept; 0 judges all non-empty text. Empty
      text is never judged (`basic_filter` handles empty captions).
    """

    languages: list[str] = ["en"]
    min_confidence: float = Field(0.0, ge=0.0, le=1.0)  # 0: the top language decides (DataComp's rule)
    candidates: list[str] | None = None
    low_accuracy_mode: bool = False
    min_chars: int = Field(0, ge=0)

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, value: list[str]) -> list[str]:
        return _codes(value)

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        codes = _codes(value)
        if len(codes) < 2:
            raise ValueError("candidates needs at least two languages (or null for all)")
        return codes

    @model_validator(mode="after")
    def _languages_among_candidates(self) -> "LanguageParams":
        if self.candidates is not None:
            missing = [c for c in self.languages if c not in self.candidates]
            if missing:
                raise ValueError(f"languages {missing} are not among candidates {self.candidates}")
        return self


@dataclass(frozen=True)
class Detection:
    """The top language of one text: code null when none was identified; both null when not judged."""

    code: str | None = None
    confidence: float | None = None

    def as_meta(self) -> dict:
        """The value stored under `meta["language"]`."""
        return {"code": self.code, "confidence": self.confidence}


def build_detector(candidates: list[str] | None, low_accuracy_mode: bool) -> LanguageDetector:
    """A lingua detector over `candidates` (None = all languages) with their models preloaded."""
    if candidates is None:
        builder = LanguageDetectorBuilder.from_all_languages()
    else:
        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*(IsoCode639_1.from_str(c) for c in candidates))
    if low_accuracy_mode:
        builder = builder.with_low_accuracy_mode()
    return builder.with_preloaded_language_models().build()


def memory_estimate(candidates: list[str] | None, low_accuracy_mode: bool) -> int:
    """Bytes a worker's detector holds once its models are loaded (an upper estimate)."""
    languages = len(KNOWN_CODES) if candidates is None else len(candidates)
    return _MEMORY_BASE[low_accuracy_mode] + languages * _MEMORY_PER_LANGUAGE[low_accuracy_mode]


def sample_text(kind: str, captions: list[dict] | None, segments: list[dict] | None) -> str | None:
    """A pair's caption; for other kinds all text segments joined by a space."""
    if kind == "pair":
        return caption_text(captions)
    texts = [s["text"] for s in segments or () if s.get("text") is not None]
    return " ".join(texts) if texts else None


def top_language(values: list[ConfidenceValue]) -> Detection:
    """The most likely language of lingua's confidence list (sorted, highest first)."""
    if not values or values[0].value <= 0.0:
        return Detection(None, 0.0)
    top = values[0]
    return Detection(top.language.iso_code_639_1.name.lower(), round(top.value, 4))


def with_language(meta: str | None, detection: Detection) -> str:
    """`meta` (a JSON object, other text, or null) with the detection added as compact, sorted JSON."""
    record = _meta_object(meta)
    record[META_KEY] = detection.as_meta()
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _meta_object(meta: str | None) -> dict:
    if meta is None or not meta.strip():
        return {}
    try:
        parsed = json.loads(meta)
    except ValueError:
        return {"original": meta}
    return parsed if isinstance(parsed, dict) else {"original": meta}


def read_detection(meta: str | None) -> Detection:
    """The detection recorded in `meta.language`; ValueError when the sample was not annotated."""
    record = _meta_object(meta).get(META_KEY)
    if not isinstance(record, dict):
        raise ValueError(f"meta.{META_KEY} is missing: the language stage's annotate() did not run on this sample")
    return Detection(record.get("code"), record.get("confidence"))


def verdict(detection: Detection, params: LanguageParams) -> tuple[str, str] | None:
    """(reason, detail) when a sample with this detection is dropped, else None."""
    if not params.languages or detection.confidence is None:
        return None
    keep = ", ".join(params.languages)
    if detection.code is None:
        return LANGUAGE_UNCERTAIN, "no language identified"
    if detection.confidence < params.min_confidence:
        return LANGUAGE_UNCERTAIN, f"top {detection.code} {detection.confidence:g} < {params.min_confidence:g}"
    if detection.code not in params.languages:
        return LANGUAGE, f"detected {detection.code} ({detection.confidence:g}), keep {keep}"
    return None


class LanguageFilter(Stage):
    """Records each sample's caption language in `meta` and drops samples not in `languages`."""

    name = "language"
    phase = "prepare"
    Params = LanguageParams
    params: LanguageParams
    reads = frozenset({"kind", "captions", "segments", "meta"})
    provides = frozenset({"meta"})
    reads_images = False
    annotation_params = frozenset({"candidates", "low_accuracy_mode", "min_chars"})
    selection_params = frozenset({"languages", "min_confidence"})

    def __init__(self, params: LanguageParams, context: StageContext | None = None):
        super().__init__(params, context)
        self.resources = Resources(
            cpus=1.0, memory_bytes=memory_estimate(params.candidates, params.low_accuracy_mode)
        )
        self._detector: LanguageDetector | None = None

    def setup(self) -> None:
        """Build the detector and load its models (seconds for all languages, once per worker)."""
        self._detector = build_detector(self.params.candidates, self.params.low_accuracy_mode)

    def teardown(self) -> None:
        """Drop the detector.

        lingua keeps models in storage shared by every detector of the process, so
        they are not unloaded here (that would slow other detectors); they go with
        the worker process.
        """
        self._detector = None

    def annotate(self, batch: pa.Table) -> pa.Table:
        """Return `batch` with each sample's detected language and its confidence in `meta.language`."""
        if self._detector is None:
            self.setup()
        detections = self._detect(self._texts(batch))
        metas = [with_language(m, d) for m, d in zip(batch.column("meta").to_pylist(), detections)]
        return batch.set_column(batch.schema.get_field_index("meta"), "meta", pa.array(metas, pa.string()))

    def select(self, batch: pa.Table) -> pa.Table:
        """Return `batch` with `drop_reason` set on rows whose `meta.language` is not wanted."""
        verdicts = [verdict(read_detection(meta), self.params) for meta in batch.column("meta").to_pylist()]
        reasons = [v[0] if v else None for v in verdicts]
        details = [v[1] if v else None for v in verdicts]
        return with_drops(batch, reasons, details)

    def metrics(self) -> list:
        """meta.language.confidence (null when the text was not judged)."""
        from curate.metrics import Metric

        return [Metric("language.confidence", f"meta.{META_KEY}.confidence", "confidence of the top language")]

    def thresholds(self) -> list:
        """min_confidence, when `languages` makes the stage drop anything."""
        from curate.metrics import limits

        if not self.params.languages:
            return []
        return limits(self.params, {"min_confidence": ("language.confidence", "min")})

    def _texts(self, batch: pa.Table) -> list[str | None]:
        """Per row, the text to judge, or None when it is empty or shorter than `min_chars`."""
        kinds = batch.column("kind").to_pylist()
        captions = batch.column("captions").to_pylist()
        segments = batch.column("segments").to_pylist()
        texts: list[str | None] = []
        for kind, caption, segment in zip(kinds, captions, segments):
            text = (sample_text(kind, caption, segment) or "").strip()
            texts.append(text if text and len(text) >= self.params.min_chars else None)
        return texts

    def _detect(self, texts: list[str | None]) -> list[Detection]:
        """One detection per text, in one parallel lingua call; not judged (None) texts get an empty one."""
        judged = [i for i, text in enumerate(texts) if text is not None]
        values = self._detector.compute_language_confidence_values_in_parallel([texts[i] for i in judged])
        detections = [Detection()] * len(texts)
        for i, row_values in zip(judged, values):
            detections[i] = top_language(row_values)
        return detections
