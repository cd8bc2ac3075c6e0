"""Models of the scoring stages: CLIP embeddings and scores, aesthetic heads, and their weights.

- `curate.models.clip`: `ClipSpec`, `load_clip`, `check_clip_available`, `clip_scores`
  (open_clip models; the CLIP score is the cosine of normalised embeddings, not x100).
- `curate.models.aesthetic`: `AestheticSpec`, `load_aesthetic`, `check_aesthetic_available`
  (LAION v2/v1 heads and the project's tiny head).
- `curate.models.weights`: sha256 pins, local files and the download cache; `ModelUnavailable`.
- `curate/models/tiny/`: the tiny CLIP (``curate-tiny``) and aesthetic head trained on the
  synthetic scenes of curate.demo.web, used by the demo and the tests (README.md there).

Nothing here downloads CLIP weights: they must already be local.
"""
