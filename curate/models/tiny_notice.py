"""The one-line notice that curate's tiny models are in use (once per process).

The tiny CLIP (``curate-tiny``) and the tiny aesthetic and watermark heads were trained on the
synthetic scenes of curate.demo.web: their scores are right for the tests and the demo, and mean
nothing on real photos. clip.py, aesthetic.py and watermark.py call `notice_tiny_model` when a
spec resolves to one of them.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

TINY_NOTICE = (
    "curate's tiny models are in use (curate-tiny CLIP / `head: tiny`): their scores are for the tests and "
    "the demo, not meaningful on real photos; for real data pull real weights (`curate models pull laion`) "
    "and run a recipe that names them"
)

_noticed = False


def notice_tiny_model() -> None:
    """Log TINY_NOTICE as a warning, the first time only in this process."""
    global _noticed
    if not _noticed:
        _noticed = True
        log.warning(TINY_NOTICE)
