"""What a recipe's `roles:` section holds: per role a condition, caption preference and resolution.

```yaml
roles:
  generation:
    when: "aesthetic >= 5.5 and min_side >= 512"
    captions: [dense, alt]
    resolution: {buckets: [[512, 512], [640, 384], [384, 640]]}
  understanding:
    when: "clip_score >= 0.28"
    resolution: {mode: keep_ratio, size: 448}
roles_required: false
```

The engine only routes samples (the `roles` column). `captions` and `resolution` are recorded in
the manifest's resolved recipe (`recipe.resolved.roles.<name>`) for the exporters, which write
each role's training format.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ROLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")

Side = Annotated[int, Field(ge=8, le=16384)]


class Resolution(BaseModel):
    """How an exporter sizes a role's images.

    - `keep_ratio`: scale so that the `side` side (longest or shortest) equals `size`;
    - `center_crop`: scale the shortest side to `size`, then crop a centred size x size square;
    - `buckets`: aspect-ratio buckets `[[width, height], ...]`: an image goes to the bucket whose
      aspect ratio is closest to its own (in log ratio), scaled to cover it and centre-cropped to it.
      Given `buckets` without `mode`, the mode is `buckets`.

    `only_if_bigger` (keep_ratio): never upscale. No `resolution` (null) keeps images as stored.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["keep_ratio", "center_crop", "buckets"] = "keep_ratio"
    size: Side | None = None
    side: Literal["longest", "shortest"] = "longest"
    only_if_bigger: bool = True
    buckets: list[tuple[Side, Side]] | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _buckets_imply_mode(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("buckets") is not None and "mode" not in data:
            return {**data, "mode": "buckets"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Resolution":
        if self.mode == "buckets":
            if not self.buckets:
                raise ValueError("mode buckets needs `buckets: [[width, height], ...]`")
            if self.size is not None:
                raise ValueError("`size` does not apply to mode buckets (each bucket gives its own size)")
            if len(set(self.buckets)) != len(self.buckets):
                raise ValueError("`buckets` lists the same size twice")
        else:
            if self.buckets is not None:
                raise ValueError(f"`buckets` applies to mode buckets only, not {self.mode}")
            if self.size is None:
                raise ValueError(f"mode {self.mode} needs `size`")
        return self


class RoleSpec(BaseModel):
    """One role: which samples it takes (`when`), which caption variants it prefers, how images are sized."""

    model_config = ConfigDict(extra="forbid")

    when: str = Field(min_length=1)  # a condition (curate/roles/expression.py); "true" takes every sample
    # Caption variants in order of preference: the first the sample has (with text) is the role's caption;
    # a sample with none of them has no caption for this role (exporters skip it). Empty (the default):
    # `alt`, else the sample's first caption. caption_chars / caption_words in `when` measure this caption.
    captions: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    resolution: Resolution | None = None  # None: images as stored

    @field_validator("captions")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("a caption variant is listed twice")
        return names
