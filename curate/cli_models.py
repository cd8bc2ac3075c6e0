"""`curate models pull NAME` and `curate models list`: real weights into the caches curate reads offline."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from curate.stage import RecipeError

models_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                         help="Pull model weights into the caches curate reads offline, and list them.")
console = Console()


def _say(line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True, markup=False)


def _fail(message: str) -> None:
    from curate.cli import _fail as fail  # imported here: curate.cli imports this module

    fail(message)


@models_app.command("pull")
def pull_command(
    name: str = typer.Argument(..., help="ARCH/TAG (an open_clip pretrained tag, e.g. ViT-L-14/openai), "
                                         "hf-hub:ORG/NAME, a recipe or preset (bundled name or YAML path), "
                                         "or an http(s) URL with --sha256."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="The file's sha256: required for a URL, a pin "
                                                                "for a CLIP tag or hf-hub id."),
) -> None:
    """Download the weights NAME needs into the caches curate reads (HF_HOME, CURATE_CACHE), sha256-checked."""
    from curate.models.pull import PullError, pull

    try:
        pull(name, sha256, say=_say)
    except (PullError, RecipeError) as error:
        _fail(str(error))


@models_app.command("list")
def list_command() -> None:
    """List cached weights (CLIP repositories in the HF cache, curate's URL cache) with sha256 and size."""
    from curate.models.clip import hf_cache_dir
    from curate.models.pull import cached_files
    from curate.models.weights import cache_dir

    _say(f"Hugging Face cache: {hf_cache_dir()}")
    _say(f"curate's URL cache: {cache_dir()}")
    files = cached_files()
    for file in files:
        _say(file.line())
    if not any(file.kind != "shipped" for file in files):
        _say("nothing pulled yet: `curate models pull NAME` (e.g. ViT-B-32/openai, or a recipe such as laion)")
