"""Two real outputs of one synthetic web, each built at most once per test session (test_report, test_diff).

Both run the demo recipe (fetch, basic filters, tiny CLIP and aesthetic models, exact dedup) with
the work area kept; they differ only in clip_score's `min_score`. One broken link of the web
carries a caption with markup: fetch drops it, so a report can only show that caption by reading
it back from the work area or from the URL list. The web is served by the session's loopback
server, so both outputs list the same URLs and the URL list stays valid for the whole session.
"""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from curate.demo.server import LoopbackServer
from curate.demo.web import SyntheticWeb, build_synthetic_web, write_url_list
from curate.engine.run import compile_plan, execute
from curate.recipe import load_recipe

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "pipelines" / "demo.yaml"
HOSTILE = '<script>alert("curate")</script> two <b>red</b> circles & "friends"'
THRESHOLDS = {"a": 0.7, "b": 0.86}  # clip_score min_score of output A and output B
# Short retry waits (the web answers 500 once on some URLs), and one dedup method is enough for the report.
FASTER = ("stages.fetch.backoff_base=0.01", "stages.dedup_perceptual=false")

_built: dict[str, Path] = {}


def _web() -> SyntheticWeb:
    """The synthetic web (the same bytes on every call, fresh fault counters), with the marked-up caption."""
    web = build_synthetic_web(n_images=40)
    next(row for row in web.rows if row["expect"] == "broken_link")["caption"] = HOSTILE
    return web


def build_output(name: str, server: LoopbackServer, tmp_path_factory) -> Path:
    """Output `name` ("a" or "b"), run on its first request of the session (Ray must be up)."""
    if name in _built:
        return _built[name]
    folder = tmp_path_factory.getbasetemp() / "report-outputs"
    folder.mkdir(exist_ok=True)
    url_list = folder / "urls.parquet"
    web = _web()
    if not url_list.exists():
        write_url_list(web, server.base_url, url_list)
    server.routes.clear()
    server.routes.update(web.routes)
    try:
        loaded = load_recipe(DEMO_RECIPE, [f"source.path={url_list}", f"output.path={folder / name}",
                                           "engine.keep_work=true", f"stages.clip_score.min_score={THRESHOLDS[name]}",
                                           *FASTER])
        execute(compile_plan(loaded), Console(file=io.StringIO()), progress=False)
    finally:
        server.routes.clear()
    _built[name] = folder / name
    return _built[name]
