"""How an image-edit sample (kind `edit`) sits in the unified schema.

An edit sample is a chain of one or more turns; each turn edits an input image into
an output image following an instruction, optionally limited to a mask. A single
triplet (InstructPix2Pix, UltraEdit, OmniEdit) is a chain of one turn; a MagicBrush
session (turn 1..n on one image) is one sample whose turn t edits the output of
turn t - 1.

- `images`: the chain first, in order: the first input, then each turn's output
  (and a turn's input, when it is not the previous turn's output: stored where it
  first appears); the masks after the chain, in turn order.
- `segments`: the chain as a document: image, instruction, image, instruction,
  image ... (each turn's first instruction). Masks are not in `segments`.
- `meta.edit.turns[t]`: `input`, `output`, `mask` (image indices, mask may be null)
  and `instructions` (every alternative instruction of the turn, the one in
  `segments` first); the checks and the direction score add their values to it.

A sample without `meta.edit` (written by something else) is read from `segments`:
each text between two images is one turn without a mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

EDIT_KIND = "edit"
META_KEY = "edit"


@dataclass
class Turn:
    """One edit: image indices of its input, output and optional mask, and its instructions."""

    input: int
    output: int
    mask: int | None = None
    instructions: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # values added by stages (change, clip_direction)

    @property
    def instruction(self) -> str | None:
        """The turn's main instruction (the one in `segments`)."""
        return self.instructions[0] if self.instructions else None

    def to_json(self) -> dict[str, Any]:
        """The turn as stored in `meta.edit.turns`."""
        return {"input": self.input, "output": self.output, "mask": self.mask,
                "instructions": list(self.instructions), **self.extra}


@dataclass
class ChainTurn:
    """One turn as a source reads it: the images are opaque values with a content digest."""

    source: Any
    source_digest: str
    target: Any
    instructions: list[str]
    mask: Any = None


@dataclass
class ChainLayout:
    """Where the images of a chain go: `images` in sample order, `segments` and `turns`."""

    images: list[Any]
    segments: list[dict[str, Any]]
    turns: list[Turn]


def lay_out_chain(chain: list[ChainTurn], target_digests: list[str]) -> ChainLayout:
    """Place the images of `chain` (see the module docstring).

    `target_digests[t]` identifies turn t's target; a turn whose source has the same
    digest as the previous turn's target reuses that image instead of storing it again.
    """
    images: list[Any] = []
    segments: list[dict[str, Any]] = []
    turns: list[Turn] = []
    previous_output, previous_digest = None, None
    for number, turn in enumerate(chain):
        if previous_output is not None and turn.source_digest == previous_digest:
            input_index = previous_output
        else:
            input_index = len(images)
            images.append(turn.source)
            segments.append({"text": None, "image": input_index})
        segments.append({"text": turn.instructions[0], "image": None})
        output_index = len(images)
        images.append(turn.target)
        segments.append({"text": None, "image": output_index})
        turns.append(Turn(input_index, output_index, None, list(turn.instructions)))
        previous_output, previous_digest = output_index, target_digests[number]
    for turn, source_turn in zip(turns, chain):
        if source_turn.mask is not None:
            turn.mask = len(images)
            images.append(source_turn.mask)
    return ChainLayout(images, segments, turns)


def parse_meta(meta: str | None) -> dict[str, Any] | None:
    """`meta` as a JSON object: {} when null, None when it is something else (free text, a list)."""
    if not meta:
        return {}
    try:
        value = json.loads(meta)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def dump_meta(meta: dict[str, Any]) -> str | None:
    """The `meta` column value of a JSON object (null when empty)."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str) if meta else None


def read_turns(segments: list[dict[str, Any]] | None, meta: str | None) -> list[Turn]:
    """The turns of an edit sample, from `meta.edit.turns`, else from its segments."""
    stored = (parse_meta(meta) or {}).get(META_KEY)
    if isinstance(stored, dict) and isinstance(stored.get("turns"), list):
        return [_turn_from_json(item) for item in stored["turns"] if isinstance(item, dict)]
    return turns_from_segments(segments or [])


def _turn_from_json(item: dict[str, Any]) -> Turn:
    known = ("input", "output", "mask", "instructions")
    instructions = item.get("instructions") or []
    return Turn(
        input=item.get("input"),
        output=item.get("output"),
        mask=item.get("mask"),
        instructions=[text for text in instructions if isinstance(text, str)],
        extra={k: v for k, v in item.items() if k not in known},
    )


def turns_from_segments(segments: list[dict[str, Any]]) -> list[Turn]:
    """Turns read off a document: each text that stands between two images is one edit."""
    turns: list[Turn] = []
    last_image, pending_text = None, None
    for segment in segments:
        if segment is None:
            continue
        if segment.get("image") is not None:
            if last_image is not None and pending_text is not None:
                turns.append(Turn(last_image, segment["image"], None, [pending_text]))
            last_image, pending_text = segment["image"], None
        elif segment.get("text") is not None and last_image is not None:
            pending_text = segment["text"] if pending_text is None else f"{pending_text} {segment['text']}"
    return turns


def write_turns(meta: str | None, turns: list[Turn]) -> str | None:
    """`meta` with `edit.turns` replaced by `turns` (other keys kept); unchanged if it is not a JSON object."""
    value = parse_meta(meta)
    if value is None:
        return meta
    edit = value.get(META_KEY) if isinstance(value.get(META_KEY), dict) else {}
    value[META_KEY] = {**edit, "turns": [turn.to_json() for turn in turns]}
    return dump_meta(value)
