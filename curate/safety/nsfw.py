"""NSFW score: NudeNet's detector on every image, plus a caption screen.

NudeNet (the `nudenet` package, which ships its 320 px YOLOv8 ONNX model, 320n.onnx,
inside its wheel) detects 18 classes of body parts, exposed or covered. A sample's
`scores.nsfw` is the highest probability, over its images and over the detector's
candidate boxes, of any class in `classes` (by default the exposed genitalia, breast,
buttocks and anus classes), so it lies in [0, 1]. The image is prepared as NudeNet
prepares an image file: padded at the right and bottom to a square, resized to 320 x 320
(bilinear), channels in BGR order, scaled to [0, 1]. onnxruntime runs it on the CPU, or with the CUDA
provider when that is installed and the run has a GPU.

Before any image is decoded, every caption and text segment is screened against a
word list (nsfw_words.txt, extended by `caption_words` / `caption_word_files`);
a match skips the detector and drops the sample with `nsfw_caption`.

`annotate` records the screen's match in ``meta.nsfw_caption`` (the list and entry number,
never the text) and, for the rows it scores, the class and image the score comes from in
``meta.nsfw``; only undecodable images are dropped there. `select` drops the screened rows,
then the scores above `max_score`.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from curate.models.weights import local_file, verify_sha256
from curate.ops.clip_stage import local_path, merge_scores, score_values
from curate.safety.captions import BUNDLED_WORDS, CaptionScreen, read_terms
from curate.safety.images import decode_rgb, meta_object, replace_meta_keys, sample_texts
from curate.stage import Params, RecipeError, Resources, Stage, StageContext, WeightsUnavailable, with_drops

NSFW = "nsfw"
NSFW_CAPTION = "nsfw_caption"
CORRUPT = "corrupt"
META_CAPTION = "nsfw_caption"  # meta key: the caption screen's match, {list, entry}
META_DETECTION = "nsfw"  # meta key: the class and image scores.nsfw comes from, {class, image}

# NudeNet 3.x class order (the rows 4.. of the model's output).
LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)
DETECTOR_PRECISION = "fp32"  # NudeNet's ONNX model is float32, on the CPU and the CUDA provider alike
UNSAFE = ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED",
          "ANUS_EXPOSED")


def bundled_model() -> Path:
    """The ONNX model inside the installed nudenet package."""
    try:
        return Path(str(importlib.resources.files("nudenet") / "320n.onnx"))
    except ModuleNotFoundError as error:
        raise RecipeError("the nsfw stage needs the `nudenet` package: pip install 'curate[safety]' "
                          "(nudenet's wheel carries an AGPL-3.0 licence file)") from error


class NsfwParams(Params):
    """Detector, threshold and caption screen of the nsfw stage."""

    max_score: float | None = Field(None, ge=0.0, le=1.0)  # drop above (reason nsfw)
    classes: list[str] = list(UNSAFE)  # NudeNet classes whose probability is the score
    model: str | None = None  # a NudeNet-format ONNX file; default: the one in the nudenet package
    sha256: str | None = None  # pin for `model`
    input_size: int = Field(320, ge=32)  # the model's square input side
    batch_size: int = Field(16, ge=1)
    threads: int | None = Field(None, ge=1)  # onnxruntime threads; default: the CPUs Ray gave the worker
    caption_screen: bool = True
    bundled_words: bool = True  # screen with curate/safety/nsfw_words.txt
    caption_words: list[str] = []  # more terms, inline
    caption_word_files: list[str] = []  # more terms, one per line (relative to the recipe)

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(LABELS))
        if unknown or not value:
            raise ValueError(f"unknown NudeNet classes {unknown}; known: {', '.join(LABELS)}" if unknown
                             else "name at least one NudeNet class")
        return value


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """NudeNet's input for one RGB image (h, w, 3 uint8): padded right/bottom to a square, resized, CHW [0, 1].

    The channels go in B, G, R order: that is what NudeNet 3.4 feeds its model for an image file
    (it reads BGR with OpenCV, then swaps channels twice), so its scores are reproduced exactly.
    """
    height, width = image.shape[:2]
    side = max(height, width)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[:height, :width] = image[:, :, ::-1]
    resized = cv2.resize(square, (size, size), interpolation=cv2.INTER_LINEAR)
    return resized.astype(np.float32).transpose(2, 0, 1) / 255.0


class NudeNetDetector:
    """The NudeNet ONNX model in an onnxruntime session: per-class probabilities of images."""

    def __init__(self, path: Path, input_size: int = 320, threads: int = 1, use_gpu: bool = False):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if use_gpu and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.input_size = input_size
        self.providers = self.session.get_providers()

    def class_scores(self, images: list[np.ndarray]) -> np.ndarray:
        """(n, 18) float32: for each image and class, the highest probability over the candidate boxes."""
        if not images:
            return np.zeros((0, len(LABELS)), dtype=np.float32)
        blob = np.stack([letterbox(image, self.input_size) for image in images])
        output = self.session.run(None, {self.input_name: blob})[0]  # (n, 4 + classes, candidates)
        return output[:, 4:, :].max(axis=2).astype(np.float32)


def threads_for_worker(requested: int | None) -> int:
    """Threads as asked, else what Ray's CPU share says (OMP_NUM_THREADS), at least 1."""
    return requested or max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1)


class NsfwStage(Stage):
    """Fills scores.nsfw (max over images); drops listed caption terms and, optionally, high scores."""

    name = "nsfw"
    Params = NsfwParams
    phase = "safety"
    resources = Resources(cpus=1.0, gpus=1.0)  # the GPU is asked for only when the cluster has one
    version = 1
    reads = frozenset({"images", "captions", "segments", "meta"})
    provides = frozenset({"scores", "meta"})
    reads_images = True
    annotation_params = frozenset({"classes", "model", "sha256", "input_size", "batch_size", "threads",
                                   "caption_screen", "bundled_words", "caption_words", "caption_word_files"})
    selection_params = frozenset({"max_score"})
    speed_params = frozenset({"batch_size", "threads"})

    def __init__(self, params: NsfwParams, context: StageContext | None = None):
        super().__init__(params, context)
        resolved = {"model": local_path(params.model, self.context.recipe_dir),
                    "caption_word_files": [local_path(f, self.context.recipe_dir) for f in params.caption_word_files]}
        self.params = params.model_copy(update=resolved)

    def _model_file(self) -> tuple[Path, str]:
        if self.params.model is None:
            path = bundled_model()
            if not path.is_file():
                raise RecipeError(f"the nudenet package has no model file at {path}; reinstall nudenet")
        else:
            path = local_file(self.params.model, "NSFW model", "set `model:` to a NudeNet-format .onnx file")
        return path, verify_sha256(path, self.params.sha256, "NSFW model")

    def _screen(self) -> CaptionScreen:
        lists = [("bundled list", read_terms(BUNDLED_WORDS))] if self.params.bundled_words else []
        if self.params.caption_words:
            lists.append(("caption_words", self.params.caption_words))
        for file in self.params.caption_word_files:
            try:
                lists.append((Path(file).name, read_terms(file)))
            except (OSError, UnicodeDecodeError) as error:
                raise RecipeError(f"cannot read the word list {file}: {error}",
                                  path=f"stages.{self.name}.caption_word_files") from error
        return CaptionScreen(lists)

    def preflight(self) -> None:
        """The model file exists (and matches its pin); the word lists are readable."""
        self._model_info = self._model_file()
        if self.params.caption_screen:
            self._screen()

    def model_info(self) -> list[dict]:
        """What the manifest records about the detector (without a sha256 when its file is not available)."""
        try:
            path, sha = getattr(self, "_model_info", None) or self._model_file()
        except WeightsUnavailable:
            path, sha = self.params.model, self.params.sha256
        info = {"stage": self.name, "role": "nsfw_detector", "name": "NudeNet 320n", "weights": str(path),
                "sha256": sha, "precision": DETECTOR_PRECISION, "classes": self.params.classes}
        if getattr(self, "detector", None) is not None:
            info["providers"] = self.detector.providers
        return [info]

    def setup(self) -> None:
        """Open the ONNX session once per worker, sized to the worker's CPUs; build the caption screen."""
        path, _ = self._model_file()
        self.detector = NudeNetDetector(path, self.params.input_size, threads_for_worker(self.params.threads),
                                        use_gpu=self.context.device == "gpu")
        self.class_index = [LABELS.index(label) for label in self.params.classes]
        self.screen = self._screen() if self.params.caption_screen else None

    def annotate(self, batch: pa.Table) -> pa.Table:
        """Screen captions; score the images of the rows that pass; drop undecodable images.

        Records the screen's match in meta.nsfw_caption ({list, entry}) and the detection behind
        scores.nsfw in meta.nsfw ({class, image}); screened rows skip the detector.
        """
        if getattr(self, "detector", None) is None:
            self.setup()
        reasons: list[str | None] = [None] * batch.num_rows
        details: list[str | None] = [None] * batch.num_rows
        matches = self._screen_captions(batch) if self.screen is not None else [None] * batch.num_rows
        scores, found = self._score_images(batch, [m is not None for m in matches], reasons, details)
        batch = merge_scores(batch, "nsfw", scores)
        metas = [replace_meta_keys(meta, {META_CAPTION: match, META_DETECTION: detection})
                 for meta, match, detection in zip(batch.column("meta").to_pylist(), matches, found)]
        batch = batch.set_column(batch.schema.get_field_index("meta"), "meta", pa.array(metas, pa.string()))
        return with_drops(batch, reasons, details)

    def select(self, batch: pa.Table) -> pa.Table:
        """Drop rows whose texts matched the screen (nsfw_caption), then scores.nsfw above max_score (nsfw)."""
        verdicts = [self._verdict(meta_object(meta), score)
                    for meta, score in zip(batch.column("meta").to_pylist(), score_values(batch, "nsfw"))]
        return with_drops(batch, [reason for reason, _ in verdicts], [detail for _, detail in verdicts])

    def metrics(self) -> list:
        """scores.nsfw (null for the rows the caption screen stopped)."""
        from curate.metrics import Metric

        return [Metric(NSFW, f"scores.{NSFW}", "highest probability of the chosen classes over the images")]

    def thresholds(self) -> list:
        """max_score on nsfw (the caption screen is a rule, not a threshold)."""
        from curate.metrics import limits

        return limits(self.params, {"max_score": (NSFW, "max")})

    def _verdict(self, meta: dict, score: float | None) -> tuple[str | None, str | None]:
        """(reason, detail) of one row from its recorded screen match and score; (None, None) keeps it."""
        match, limit = meta.get(META_CAPTION), self.params.max_score
        if isinstance(match, dict):
            return NSFW_CAPTION, f"a text matches entry {match.get('entry')} of the {match.get('list')}"
        if limit is None or score is None or score <= limit:
            return None, None
        detection = meta.get(META_DETECTION)
        where = f" ({detection.get('class')}, image {detection.get('image')})" if isinstance(detection, dict) else ""
        return NSFW, f"nsfw {score:.3f} > {limit}{where}"

    def _screen_captions(self, batch: pa.Table) -> list[dict | None]:
        """Per row: the list and entry number of the first listed term in its texts, else None."""
        captions = batch.column("captions").to_pylist()
        segments = batch.column("segments").to_pylist()
        matches: list[dict | None] = []
        for row_captions, row_segments in zip(captions, segments):
            found = self.screen.match(sample_texts(row_captions, row_segments))
            matches.append(None if found is None else {"list": found.list_name, "entry": found.entry})
        return matches

    def _score_images(self, batch: pa.Table, skip: list[bool], reasons: list,
                      details: list) -> tuple[list[float | None], list[dict | None]]:
        """Per row: the max class probability over its images and the class and image it came from (None
        when skipped, undecodable or without images); undecodable rows get their hard drop in `reasons`."""
        pending: list[tuple[int, int, np.ndarray]] = []  # (row, image index, pixels)
        for row, images in enumerate(batch.column("images").to_pylist()):
            if skip[row]:
                continue
            for index, image in enumerate(images or []):
                try:
                    pixels = np.asarray(decode_rgb(image["bytes"], max_side=2 * self.params.input_size))
                except Exception as error:  # a sample-level failure: recorded as the row's drop detail
                    reasons[row], details[row] = CORRUPT, f"image {index}: cannot decode for NSFW: {error}"
                    break
                pending.append((row, index, pixels))
        best: dict[int, tuple[float, str, int]] = {}
        size = self.params.batch_size
        for start in range(0, len(pending), size):
            chunk = pending[start:start + size]
            per_class = self.detector.class_scores([pixels for _, _, pixels in chunk])[:, self.class_index]
            for (row, index, _), values in zip(chunk, per_class):
                top = int(np.argmax(values))
                if row not in best or values[top] > best[row][0]:
                    best[row] = (float(values[top]), self.params.classes[top], index)
        scores: list[float | None] = [None] * batch.num_rows
        found: list[dict | None] = [None] * batch.num_rows
        for row, (score, label, index) in best.items():
            if reasons[row] is None:  # else a later image of the row was undecodable
                scores[row], found[row] = score, {"class": label, "image": index}
        return scores, found
