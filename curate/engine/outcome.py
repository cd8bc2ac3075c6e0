"""Whether a finished run kept enough of its input, and if not, what most likely went wrong.

A run that keeps nothing, or less than `output.min_kept_fraction` of its input rows, still
reconciles; this says so loudly: the stage that dropped most, its top reason, and the likely fix.
"""

from __future__ import annotations

from typing import Any


class KeptTooLittle(RuntimeError):
    """A run kept less than `output.min_kept_fraction` of its input, and `output.strict` makes that an error.

    The output is complete and valid; the command exits non-zero so that scripts notice.
    """


# reason -> what usually cures it
FIXES = {
    "blocked_address": "the URLs point at loopback or private addresses, which fetch refuses; if that is meant, "
                       "--set stages.fetch.allow_private_addresses=true",
    "dns_error": "the host names do not resolve from this machine: check its network and DNS",
    "connection_error": "the hosts refused or dropped connections: check the network, or `curate retry` later",
    "timeout": "the hosts did not answer in time: raise stages.fetch.timeout, or `curate retry` later",
    "host_unreachable": "the hosts failed too many connections in a row: `curate retry` later",
    "robots": "robots.txt disallows these URLs for curate's user agent",
    "opt_out": "the hosts' X-Robots-Tag forbids this use (noai / noimageai)",
    "missing_url": "the URL column is empty: check source.url_column",
    "clip_score_low": "the CLIP threshold removes nearly everything: the tiny model's thresholds are for the demo's "
                      "drawings, not real photos; pull real weights (`curate models pull`) or lower "
                      "stages.clip_score.min_score",
    "aesthetic_low": "the aesthetic threshold removes nearly everything: the tiny head's threshold is for the "
                     "demo's drawings, not real photos; use a real head or lower stages.aesthetic.min_score",
    "watermark": "the watermark threshold removes nearly everything: the tiny head is for the demo's drawings, not "
                 "real photos; raise stages.watermark.max_score or turn the stage off",
    "language": "the language filter removes nearly everything: check stages.language.languages",
    "too_small": "the images are below stages.basic_filter.min_side",
}


def low_yield(manifest: dict[str, Any], min_kept_fraction: float) -> str | None:
    """A warning when the run kept less than `min_kept_fraction` of its input rows (or nothing); else None."""
    totals = manifest["reconciliation"]
    kept, read = totals["output_rows"], totals["input_rows"]
    if read == 0:
        return "the input had no rows: nothing was written"
    if kept > 0 and kept >= min_kept_fraction * read:
        return None
    share = f"{kept:,} of {read:,} input rows ({kept / read:.1%})" if kept else f"none of {read:,} input rows"
    message = f"the run kept {share}"
    stage = max(manifest["stages"], key=lambda s: sum(s.get("dropped", {}).values()), default=None)
    dropped = stage.get("dropped", {}) if stage else {}
    if dropped:
        reason, count = max(dropped.items(), key=lambda item: item[1])
        message += f"; stage {stage['name']!r} dropped most ({sum(dropped.values()):,}), mostly {reason} ({count:,})"
        fix = FIXES.get(reason) or (f"see the drop details: `curate inspect OUT --html report.html`, or loosen "
                                    f"stages.{stage['name']}")
        message += f". Likely fix: {fix}"
    return message
