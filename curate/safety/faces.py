"""Faces: detection with OpenCV's bundled Haar cascade, boxes in `meta`, optional blurring of the stored bytes.

The detector is OpenCV's frontal-face Haar cascade (shipped in opencv-python-headless
4.x as cv2.data.haarcascades), run on the grayscale image (histogram-equalised) scaled
down to at most `detect_side` pixels. It works offline and on any CPU; it finds
upright frontal faces and misses profiles, small or occluded faces, and it has false
positives (animal faces, textures).

Per sample, `annotate` gives `meta` ``"faces"``: for each image, a list of ``[x, y, w, h]``
boxes in pixels of the stored image (``images[i].bytes``), and sets ``image_meta[i].width`` /
``height`` to the stored image's size. `select` drops samples by `max_faces` and
`max_face_fraction` (reason `faces`) from those alone. With `blur: true`, `transform` (run on
the kept rows when the output is written) Gaussian-blurs each box, grown by `margin` on every
side, in the stored image, which is re-encoded in its own format (`image_meta[i].format`);
`image_meta[i].num_bytes` follows the new bytes, and ``"faces_blurred"`` in `meta` counts the
sample's blurred images. `sha256`, `pixel_sha256` and `phash` keep describing the original as
fetched (dedup and blocklists match originals).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter
from pydantic import Field

from curate import schema
from curate.models.weights import sha256_file
from curate.safety.images import decode_rgb, encode_like, merge_meta, meta_object
from curate.schema import DROP_REASON
from curate.stage import Params, RecipeError, Resources, Stage, StageContext, with_drops

FACES = "faces"
CORRUPT = "corrupt"


class FacesParams(Params):
    """Detector settings, blurring and limits of the faces stage."""

    blur: bool = False  # blur every detected face in the stored image bytes
    margin: float = Field(0.15, ge=0.0, le=1.0)  # grow each box by this share of its size per side before blurring
    blur_radius: float = Field(0.25, gt=0.0)  # Gaussian radius as a share of the box's longer side
    quality: int = Field(95, ge=1, le=100)  # JPEG / WebP quality of re-encoded images
    max_faces: int | None = Field(None, ge=0)  # drop samples with more faces than this in one image
    max_face_fraction: float | None = Field(None, gt=0.0, le=1.0)  # drop when a face box covers more of its image
    cascade: str = "haarcascade_frontalface_default.xml"  # a file of cv2.data.haarcascades, or a path
    scale_factor: float = Field(1.1, gt=1.0)
    min_neighbors: int = Field(5, ge=1)
    min_size: int = Field(24, ge=8)  # smallest face side, in pixels of the detection image
    detect_side: int = Field(640, ge=64)  # detection runs on the image scaled to at most this side


def cascade_file(name: str, recipe_dir: str = ".") -> Path:
    """The cascade XML for `name`: a file of OpenCV's bundled cascades, else a path (relative to the recipe)."""
    bundled = Path(cv2.data.haarcascades) / name
    if bundled.is_file():
        return bundled
    path = Path(name).expanduser()
    path = path if path.is_absolute() else Path(recipe_dir) / path
    if path.is_file():
        return path
    raise RecipeError(f"no Haar cascade {name!r} in {cv2.data.haarcascades} or at {path}; "
                      "use one of the bundled files (e.g. haarcascade_frontalface_default.xml) or a path")


class FaceDetector:
    """OpenCV Haar cascade face detection on RGB images; boxes in the image's own pixels."""

    def __init__(self, path: Path, params: FacesParams):
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise RecipeError(f"{path} is not a Haar cascade OpenCV can load")
        self.params = params

    def detect(self, image: Image.Image) -> list[list[int]]:
        """[x, y, w, h] boxes of the faces in `image`, in its pixels, sorted by position."""
        scale = min(1.0, self.params.detect_side / max(image.size))
        small = image if scale == 1.0 else image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR)
        gray = cv2.equalizeHist(np.asarray(small.convert("L")))
        found = self.cascade.detectMultiScale(gray, scaleFactor=self.params.scale_factor,
                                              minNeighbors=self.params.min_neighbors,
                                              minSize=(self.params.min_size, self.params.min_size))
        boxes = []
        for x, y, w, h in (found if len(found) else []):
            x0, y0 = round(x / scale), round(y / scale)
            x1, y1 = min(image.width, round((x + w) / scale)), min(image.height, round((y + h) / scale))
            boxes.append([x0, y0, x1 - x0, y1 - y0])
        return sorted(boxes)


def blur_boxes(image: Image.Image, boxes: list[list[int]], margin: float, radius: float) -> Image.Image:
    """A copy of `image` with each box, grown by `margin` of its size per side, Gaussian-blurred."""
    out = image.copy()
    for x, y, w, h in boxes:
        grow_x, grow_y = round(w * margin), round(h * margin)
        region = (max(0, x - grow_x), max(0, y - grow_y), min(image.width, x + w + grow_x),
                  min(image.height, y + h + grow_y))
        patch = out.crop(region).filter(ImageFilter.GaussianBlur(max(1.0, radius * max(w, h))))
        out.paste(patch, region[:2])
    return out


class FacesStage(Stage):
    """Records face boxes per image in `meta`; optionally blurs them in the stored bytes or drops samples."""

    name = "faces"
    Params = FacesParams
    phase = "safety"
    resources = Resources(cpus=1.0)
    version = 1
    reads = frozenset({"images", "image_meta", "meta"})
    # annotate fills meta.faces and image sizes; the blur (transform, at the write) changes images,
    # image_meta and meta of the kept rows, which the pool does not store
    provides = frozenset({"meta", "image_meta"})
    reads_images = True
    write_transform = True
    annotation_params = frozenset({"cascade", "scale_factor", "min_neighbors", "min_size", "detect_side"})
    selection_params = frozenset({"max_faces", "max_face_fraction", "blur", "margin", "blur_radius", "quality"})

    def __init__(self, params: FacesParams, context: StageContext | None = None):
        super().__init__(params, context)
        self.detector: FaceDetector | None = None

    def preflight(self) -> None:
        """The cascade file exists and loads."""
        FaceDetector(cascade_file(self.params.cascade, self.context.recipe_dir), self.params)

    def model_info(self) -> list[dict]:
        """What the manifest records about the detector."""
        path = cascade_file(self.params.cascade, self.context.recipe_dir)
        return [{"stage": self.name, "role": "face_detector", "name": f"OpenCV {cv2.__version__} Haar cascade",
                 "weights": str(path), "sha256": sha256_file(path), "device": "cpu"}]

    def setup(self) -> None:
        """Load the cascade once per worker."""
        self.detector = FaceDetector(cascade_file(self.params.cascade, self.context.recipe_dir), self.params)

    def annotate(self, batch: pa.Table) -> pa.Table:
        """Detect faces in every image: boxes in meta.faces, each image's size in image_meta[i].width/height.

        Only rows with an undecodable image are dropped (corrupt).
        """
        if self.detector is None:
            self.setup()
        images = batch.column("images").to_pylist()
        image_meta = batch.column("image_meta").to_pylist()
        sample_meta = batch.column("meta").to_pylist()
        reasons: list[str | None] = [None] * batch.num_rows
        details: list[str | None] = [None] * batch.num_rows
        for row in range(batch.num_rows):
            try:
                decoded = [decode_rgb(image["bytes"]) for image in images[row] or []]
            except Exception as error:  # a sample-level failure: recorded as the row's drop detail
                reasons[row], details[row] = CORRUPT, f"cannot decode for face detection: {error}"
                continue
            image_meta[row] = with_sizes(image_meta[row] or [], decoded)
            sample_meta[row] = merge_meta(sample_meta[row], {"faces": [self.detector.detect(i) for i in decoded]})
        batch = self._set(batch, "image_meta", image_meta)
        batch = batch.set_column(batch.schema.get_field_index("meta"), "meta", pa.array(sample_meta, pa.string()))
        return with_drops(batch, reasons, details)

    def select(self, batch: pa.Table) -> pa.Table:
        """Drop (faces) rows over max_faces / max_face_fraction, from meta.faces and image_meta sizes."""
        details: list[str | None] = []
        for meta, image_meta in zip(batch.column("meta").to_pylist(), batch.column("image_meta").to_pylist()):
            boxes = meta_object(meta).get("faces")
            details.append(self._verdict(image_meta or [], boxes) if isinstance(boxes, list) else None)
        return with_drops(batch, [FACES if detail else None for detail in details], details)

    def transform(self, batch: pa.Table) -> pa.Table:
        """With `blur`: blur the faces of meta.faces in the kept rows' images (re-encoded in their format),
        update image_meta[i].format / num_bytes, and count the sample's blurred images in meta.faces_blurred."""
        if not self.params.blur:
            return batch
        images = batch.column("images").to_pylist()
        image_meta = batch.column("image_meta").to_pylist()
        sample_meta = batch.column("meta").to_pylist()
        dropped = batch.column(DROP_REASON).to_pylist() if DROP_REASON in batch.column_names else [None] * len(images)
        for row in range(batch.num_rows):
            boxes = meta_object(sample_meta[row]).get("faces")
            if dropped[row] is not None or not isinstance(boxes, list):
                continue
            image_meta[row] = list(image_meta[row] or [])
            blurred = self._blur_row(images[row] or [], image_meta[row], boxes)
            self.count("images_blurred", blurred)
            sample_meta[row] = merge_meta(sample_meta[row], {"faces_blurred": blurred})
        batch = self._set(batch, "images", images)
        batch = self._set(batch, "image_meta", image_meta)
        return batch.set_column(batch.schema.get_field_index("meta"), "meta", pa.array(sample_meta, pa.string()))

    def process(self, batch: pa.Table) -> pa.Table:
        """Detect, record and drop as configured, then blur the faces of the kept rows (`blur`)."""
        return self.transform(self.select(self.annotate(batch)))

    def metrics(self) -> list:
        """Faces in the image with most (meta.faces), and the share of its image the largest face covers."""
        from curate.metrics import Metric

        def largest_fraction(row: dict) -> float | None:
            boxes, sizes = row["meta"].get(FACES), row["image_meta"] or []
            if not isinstance(boxes, list):
                return None
            shares = [largest_face(found, sizes[i] if i < len(sizes) else None) if found else 0.0
                      for i, found in enumerate(boxes)]
            shares = [share for share in shares if share is not None]  # None: the image's size is unknown
            return max(shares) if shares else None

        return [Metric("faces.count", f"meta.{FACES}.*.#", "faces found in the image with most"),
                Metric("faces.largest_fraction", description="share of its image the largest face covers",
                       columns=("meta", "image_meta"), read=largest_fraction)]

    def thresholds(self) -> list:
        """max_faces and max_face_fraction."""
        from curate.metrics import limits

        return limits(self.params, {"max_faces": ("faces.count", "max"),
                                    "max_face_fraction": ("faces.largest_fraction", "max")})

    def _verdict(self, image_meta: list[dict | None], boxes: list) -> str | None:
        """Why the sample is dropped under max_faces / max_face_fraction, else None."""
        limit, fraction_limit = self.params.max_faces, self.params.max_face_fraction
        for index, found in enumerate(boxes):
            if limit is not None and len(found) > limit:
                return f"image {index}: {len(found)} faces > {limit}"
            largest = largest_face(found, image_meta[index] if index < len(image_meta) else None)
            if fraction_limit is not None and largest is not None and largest > fraction_limit:
                return f"image {index}: a face covers {largest:.3f} of the image > {fraction_limit}"
        return None

    def _blur_row(self, images: list[dict], metas: list[dict | None], boxes: list[list[list[int]]]) -> int:
        """Blur the faces of one sample's images in place (bytes, format, num_bytes); return how many images changed."""
        changed = 0
        for index, found in enumerate(boxes):
            if not found or index >= len(images):
                continue
            image = decode_rgb(images[index]["bytes"])
            blurred = blur_boxes(image, found, self.params.margin, self.params.blur_radius)
            meta = metas[index] if index < len(metas) and metas[index] is not None else {}
            data, fmt = encode_like(blurred, meta.get("format"), images[index]["bytes"], self.params.quality)
            images[index] = {**images[index], "bytes": data}
            if index < len(metas):
                metas[index] = {**meta, "format": fmt, "num_bytes": len(data)}
            changed += 1
        return changed

    @staticmethod
    def _set(batch: pa.Table, name: str, values: list) -> pa.Table:
        field = schema.SAMPLE_SCHEMA.field(name)
        return batch.set_column(batch.schema.get_field_index(name), field, pa.array(values, field.type))


def largest_face(boxes: list[list[int]], image_meta: dict | None) -> float | None:
    """The share of its image the largest box covers (None without boxes or without the image's size)."""
    width, height = (image_meta or {}).get("width"), (image_meta or {}).get("height")
    if not boxes or not width or not height:
        return None
    return max(w * h for _, _, w, h in boxes) / (width * height)


def with_sizes(image_meta: list[dict | None], decoded: list[Image.Image]) -> list[dict]:
    """`image_meta` with width and height of each decoded image (an entry added where one is missing)."""
    sized = [dict(entry or {}) for entry in image_meta]
    sized += [{} for _ in range(len(decoded) - len(sized))]
    for entry, image in zip(sized, decoded):
        entry["width"], entry["height"] = image.width, image.height
    return sized
