"""The `curate` command line: run, demo, inspect, verify, diff, retry, clean, recipes, publish, export."""

from __future__ import annotations

import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from curate.stage import RecipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build training corpora for unified multimodal models.")
console = Console()
errors = Console(stderr=True)
PEEK_ROWS = 20  # input rows a dry run reads to check the first URLs


def _fail(message: str, code: int = 2) -> None:
    from curate.redact import redact_text  # an error may quote a URL, a header or a value holding a secret

    errors.print(f"[bold red]error:[/] {redact_text(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run_recipe(recipe: str, overrides: list[str], address: Optional[str], dry_run: bool, overwrite: bool,
                verbose: bool, progress: bool, break_lock: bool = False, pool: Optional[str] = None,
                what_if: bool = False) -> Optional[dict]:
    from curate.engine.run import compile_plan, execute
    from curate.recipe import load_recipe
    from curate.stage import StageFailure

    try:
        plan = compile_plan(load_recipe(recipe, overrides), require_weights=not (dry_run or what_if),
                            peek_rows=PEEK_ROWS if dry_run else 0, pool=pool)
        if what_if:
            from curate.engine.whatif import render_what_if
            from curate.engine.whatif import what_if as funnel_of

            render_what_if(funnel_of(plan), console)
            return None
        if dry_run:
            from curate.redact import redact_data

            console.print_json(json.dumps(redact_data(plan.describe())))
            for warning in plan.warnings:
                errors.print(f"[yellow]warning:[/] {warning} (a real run stops here)", highlight=False)
            console.print("[green]recipe is valid[/] (dry run: nothing was fetched or written)")
            return None
        return execute(plan, console, address=address, verbose=verbose, overwrite=overwrite, progress=progress,
                       break_lock=break_lock, judge=False)  # judged after the summary, so the warning ends it
    except RecipeError as error:
        _fail(str(error))
    except StageFailure as error:
        _fail(f"stage failure: {error}", code=1)
    return None


def _trial_overrides(limit: Optional[int], sample: Optional[float], seed: int) -> list[str]:
    """`--limit` / `--sample` / `--seed` as recipe overrides (they change what the run produces)."""
    overrides = [f"trial.limit={limit}"] if limit is not None else []
    if sample is not None:
        overrides += [f"trial.sample={sample}", f"trial.seed={seed}"]
    return overrides


@app.command()
def run(
    recipe: str = typer.Argument(..., help="Recipe YAML file, or the name of a bundled recipe."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: dotted.key=value (repeatable)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, "
                                                                  "else a local Ray)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete what the output folder holds (another "
                                   "recipe's output, an unfinished or a finished run) and start over."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show Ray's logs."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    break_lock: bool = typer.Option(False, "--break-lock", help="Take the output folder's lock even though "
                                    "another process holds it (only when that process is dead)."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero when the run keeps less than "
                                "output.min_kept_fraction of its input (default 1%) or nothing."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Trial: the first N input rows only."),
    sample: Optional[float] = typer.Option(None, "--sample", min=0.0, max=1.0, help="Trial: a seeded sample of "
                                           "this fraction of the input rows (a bigger one holds a smaller one)."),
    seed: int = typer.Option(0, "--seed", help="The seed of --sample."),
    pool: Optional[str] = typer.Option(None, "--pool", help="Build this output from another output's pool and "
                                       "annotations (read only): only what this recipe adds is fetched, computed "
                                       "and stored here."),
    what_if: bool = typer.Option(False, "--what-if", help="Print the funnel these settings would give from the "
                                 "output's pool, with the changes against the output as it is; write nothing."),
) -> None:
    """Run RECIPE: fetch, filter and write shards plus a manifest. A re-run resumes, does nothing, or (a changed
    recipe) re-selects from the output's pool, computing only what the change needs."""
    overrides = [*set_, *_trial_overrides(limit, sample, seed), *(["output.strict=true"] if strict else [])]
    manifest = _run_recipe(recipe, overrides, address, dry_run, overwrite, verbose, progress, break_lock=break_lock,
                           pool=pool, what_if=what_if)
    if manifest is not None:
        _summarize(manifest)
        _judge(manifest)


def _judge(manifest: dict) -> None:
    """End a run's output with the low-yield warning (exit 1 under --strict / output.strict)."""
    from curate.engine.outcome import KeptTooLittle
    from curate.engine.run import judge_yield

    try:
        judge_yield(manifest, errors)
    except KeptTooLittle as error:
        _fail(f"{error} (--strict)", code=1)


def _summarize(manifest: dict) -> None:
    from curate.manifest.inspect import render

    render(manifest, console)
    from curate.storage import location

    output = location(manifest["recipe"]["resolved"]["output"]["path"])  # a local folder or a store URL
    console.print(f"\n[bold]output:[/] {output.resolve() if isinstance(output, Path) else output}")


@app.command()
def demo(
    output: Path = typer.Option(Path("demo-output"), "--output", "-o", help="Where to write the demo corpus."),
    images: int = typer.Option(240, "--images", min=40, help="How many images the synthetic web serves (40 or more)."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show Ray's logs."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Serve a synthetic web on loopback and run pipelines/demo.yaml over it, offline."""
    from curate.demo.server import LoopbackServer
    from curate.demo.web import build_synthetic_web, write_url_list

    web = build_synthetic_web(n_images=images, watermarked=0.05)
    with tempfile.TemporaryDirectory(prefix="curate-demo-") as folder, LoopbackServer(web.routes) as server:
        url_list = Path(folder) / "urls.parquet"
        write_url_list(web, server.base_url, url_list)
        console.print(f"synthetic web: {len(web.rows)} URLs served at {server.base_url}")
        manifest = _run_recipe("demo", [f"source.path={url_list}", f"output.path={output.resolve()}"], None,
                               False, True, verbose, progress)
    if manifest is not None:
        _summarize(manifest)
        _judge(manifest)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="An output folder or its manifest.json."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML report here."),
) -> None:
    """Summarise a manifest: funnel, drops by reason, shards, quantiles, and each annotation's distribution kept
    and dropped (from the pool); --html writes a full report."""
    from curate.manifest.inspect import render, render_annotations
    from curate.manifest.verify import resolve_manifest

    manifest_path = resolve_manifest(path)
    if not manifest_path.is_file():
        _fail(f"no manifest at {manifest_path}")
    from curate.manifest.validate import ManifestInvalid, validate_manifest

    try:
        manifest = json.loads(manifest_path.read_text())
        validate_manifest(manifest)  # a manifest edited by hand may miss what the summary reads
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        _fail(f"{manifest_path}: not valid JSON ({error})")
    except ManifestInvalid as error:
        _fail(f"{manifest_path}: {error}")
    render(manifest, console)
    from curate.report.distributions import read_annotation_distributions

    annotations = read_annotation_distributions(manifest_path.parent, manifest)
    render_annotations(annotations, console)
    if html is not None:
        from curate.report.html import write_report

        report = write_report(manifest_path.parent, html, annotations=annotations)
        console.print(f"\n[bold]report:[/] {report.resolve()}", highlight=False)


@app.command()
def diff(
    a: Path = typer.Argument(..., help="The first output folder (or its manifest.json)."),
    b: Path = typer.Argument(..., help="The second output folder (or its manifest.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the differences as JSON."),
) -> None:
    """What changed from output A to B: recipe keys, rows per stage and drop reason, score distributions."""
    from curate.manifest.diff import diff_outputs, render_diff
    from curate.report.reader import OutputUnreadable

    try:
        result = diff_outputs(a, b)
    except OutputUnreadable as error:
        _fail(str(error))
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        render_diff(result, console)


@app.command()
def verify(path: str = typer.Argument(..., help="An output folder or its manifest.json (local, or s3://...).")) -> None:
    """Recompute every shard's sha256 and row count against the manifest; exit 1 on any mismatch."""
    from curate.manifest.verify import verify_output

    report = verify_output(path)
    for problem in report.problems:
        errors.print(f"[red]mismatch:[/] {problem}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)
    console.print(f"[green]ok:[/] {report.checked_files} files, {report.checked_rows:,} rows match the manifest")


@app.command()
def retry(
    output: Path = typer.Argument(..., help="A complete output folder."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key for the retry (e.g. fetch.retries=5)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show Ray's logs."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    break_lock: bool = typer.Option(False, "--break-lock", help="Take the output folder's lock even though "
                                    "another process holds it (only when that process is dead)."),
) -> None:
    """Fetch again only the rows dropped for a transient reason (timeouts, 429, 5xx) and merge them in."""
    from curate.engine.retry import retry as retry_output
    from curate.stage import StageFailure

    try:
        manifest = retry_output(output, console, set_, address=address, verbose=verbose, progress=progress,
                                break_lock=break_lock)
    except RecipeError as error:
        _fail(str(error))
    except StageFailure as error:
        _fail(f"stage failure: {error}", code=1)
    _summarize(manifest)


@app.command()
def clean(
    output: str = typer.Argument(..., help="An output folder (local, or s3://...)."),
    pool: bool = typer.Option(False, "--pool", help="Delete the pool (_pool/: fetched images and annotations)."),
    work: bool = typer.Option(False, "--work", help="Delete the work area (_work/) of an unfinished or kept run."),
    break_lock: bool = typer.Option(False, "--break-lock", help="Take the output folder's lock even though "
                                    "another process holds it (only when that process is dead)."),
) -> None:
    """Delete an output folder's pool and/or work area; the manifest, shards and drop log stay."""
    from curate.engine.clean import clean_output

    if not pool and not work:
        _fail("say what to delete: --pool, --work or both")
    try:
        removed = clean_output(output, pool=pool, work=work, break_lock=break_lock,
                               say=lambda line: errors.print(line, markup=False, highlight=False))
    except RecipeError as error:
        _fail(str(error))
    if not removed:
        console.print("nothing to delete")
    for entry in removed:
        size = f" ({entry.bytes:,} bytes)" if entry.bytes is not None else ""
        console.print(f"deleted {entry.path}{size}", highlight=False)


@app.command()
def recipes() -> None:
    """List the bundled recipes, one line each."""
    import yaml

    from curate.recipe import bundled_recipes

    for file in bundled_recipes():
        data = yaml.safe_load(file.read_text()) or {}
        lines = str(data.get("description") or "").strip().splitlines()
        console.print(f"[bold]{file.stem:<24}[/] {lines[0] if lines else ''}", highlight=False)


@app.command()
def publish(
    output: Path = typer.Argument(..., help="A finished output folder (with manifest.json)."),
    repo: str = typer.Option(..., "--repo", help="Dataset repository OWNER/NAME on the Hub (HF_ENDPOINT)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    revision: str = typer.Option("main", "--revision", help="Branch to commit to (created if missing)."),
    dry_run: Optional[Path] = typer.Option(None, "--dry-run", help="Write the repository's files into this "
                                                                   "folder and upload nothing."),
    license_: Optional[str] = typer.Option(None, "--license", help="Card license id (default: from the samples)."),
) -> None:
    """Publish OUTPUT as a Hub dataset: card, shards in bounded commits, checked after upload; re-run to resume."""
    from curate.publish import PublishError, publish_output

    try:
        publish_output(output, repo, private=private, revision=revision, dry_run=dry_run, license_id=license_,
                       say=lambda line: console.print(line, highlight=False, soft_wrap=True))
    except PublishError as error:
        _fail(str(error), code=error.code)


@app.command()
def export(
    output: Path = typer.Argument(..., help="A finished output folder (with manifest.json)."),
    dest: Path = typer.Argument(..., help="The export folder (new or empty; see --overwrite)."),
    to: str = typer.Option(..., "--to", help="Format: llava, obelics, bagel, wds or hf."),
    role: Optional[str] = typer.Option(None, "--role", help="Export only this role's samples, with its caption "
                                                            "policy and resolution (default: every sample)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export in DEST."),
    shard_rows: int = typer.Option(10_000, "--shard-rows", min=1, help="Samples per Parquet file or tar."),
    pairs_as_documents: bool = typer.Option(False, "--pairs-as-documents", help="obelics: export pairs as "
                                                                                "two-element documents."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="llava: the question after <image>."),
) -> None:
    """Export OUTPUT for a trainer: resized per role, captions per the role's policy, plus DEST/export.json."""
    from curate.export import ExportError, ExportOptions, export_output

    options = ExportOptions(shard_rows=shard_rows, pairs_as_documents=pairs_as_documents,
                            **({"prompt": prompt} if prompt is not None else {}))
    try:
        export_output(output, dest, to, role=role, overwrite=overwrite, options=options,
                      say=lambda text: console.print(text, highlight=False, soft_wrap=True))
    except ExportError as error:
        _fail(str(error))


from curate.cli_models import models_app  # noqa: E402 - after _fail, which its commands call

app.add_typer(models_app, name="models", help="Pull model weights into the caches curate reads offline; list them.")


_signals_received: list[int] = []


def _on_stop_signal(signum: int, frame: object) -> None:
    """SIGINT (Ctrl-C reaches the whole process group) or SIGTERM: unwind as for Ctrl-C, once."""
    if _signals_received:
        return  # a second signal while unwinding does not cut the unwinding short
    _signals_received.append(signum)
    raise KeyboardInterrupt


def main() -> None:
    """Entry point of the `curate` console script: SIGINT and SIGTERM end it with a word and 130 / 143."""
    signal.signal(signal.SIGINT, _on_stop_signal)
    signal.signal(signal.SIGTERM, _on_stop_signal)
    try:
        app()
    except KeyboardInterrupt:
        if not _signals_received:
            _signals_received.append(signal.SIGINT)
    except SystemExit:  # typer turns a KeyboardInterrupt inside a command into a silent exit 130
        if not _signals_received:
            raise
    if _signals_received:
        errors.print("interrupted: run the same command again to resume", highlight=False)
        sys.exit(143 if _signals_received[0] == signal.SIGTERM else 130)


if __name__ == "__main__":
    main()
