"""The HTML report of a real output (`curate inspect --html`) and the charts behind it (`plot_pngs`)."""

from __future__ import annotations

import base64
import binascii
import io
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from report_outputs import HOSTILE, build_output
from typer.testing import CliRunner

from curate.cli import app
from curate.report.columns import Distributions
from curate.report.html import build_report, write_report
from curate.report.plots import plot_pngs, render_plots
from curate.report.reader import open_output

SECTIONS = {"summary", "funnel", "drops", "distributions", "counts", "dedup", "kept", "dropped"}
HISTOGRAMS = {"clip_score", "aesthetic", "image_sizes", "caption_length"}


@pytest.fixture(scope="module")
def output(local_ray, _loopback_server, tmp_path_factory) -> Path:
    """Output A of report_outputs: the demo recipe over a small synthetic web, work area kept."""
    return build_output("a", _loopback_server, tmp_path_factory)


class Page(HTMLParser):
    """The parts of the report the tests look at: sections, their text, images, cards, links."""

    def __init__(self, text: str):
        super().__init__()
        self.section: str | None = None
        self.sections: dict[str, list[str]] = {}
        self.images: list[dict[str, str]] = []
        self.cards: dict[str, list[dict[str, object]]] = {}
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.reasons: list[str] = []
        self._card: dict[str, object] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.section = attributes.get("id")
            self.sections[self.section] = []
        for name in ("src", "href"):
            if name in attributes:
                self.links.append(attributes[name])
        if tag == "img":
            self.images.append({**attributes, "section": self.section})
            if self._card is not None:
                self._card["image"] = attributes["src"]
        if tag == "figure":
            self._card = {"key": attributes["data-key"], "classes": attributes["class"].split(), "text": []}
            self.cards.setdefault(self.section, []).append(self._card)
        if tag == "h3" and "data-reason" in attributes:
            self.reasons.append(attributes["data-reason"])

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None
        if tag == "figure":
            self._card = None

    def handle_data(self, data):
        if self.section is not None:
            self.sections[self.section].append(data)
        if self._card is not None:
            self._card["text"].append(data)

    def text(self, section: str) -> str:
        return " ".join(self.sections[section])


def decode_data_uri(uri: str) -> tuple[str, Image.Image]:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:") and header.endswith(";base64"), header[:40]
    mime = header[len("data:"):-len(";base64")]
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise AssertionError(f"not base64: {error}") from None
    image = Image.open(io.BytesIO(data))
    image.load()
    return mime, image


@pytest.fixture(scope="module")
def page(output, tmp_path_factory) -> tuple[str, Page]:
    report = write_report(output, tmp_path_factory.mktemp("html") / "report.html", kept=100, per_reason=10)
    text = report.read_text(encoding="utf-8")
    return text, Page(text)


def test_the_report_has_every_section_with_the_manifest_numbers(output, page):
    _, parsed = page
    manifest = open_output(output).manifest
    assert SECTIONS <= set(parsed.sections)
    funnel = parsed.text("funnel")
    for stage in manifest["stages"]:
        assert stage["name"] in funnel
        assert f"{stage['rows_out']:,}" in funnel
    drops = parsed.text("drops")
    for reason, count in manifest["drop_log"]["by_reason"].items():
        assert reason in drops
    counts = parsed.text("counts")
    for kind, count in manifest["kinds"].items():
        assert kind in counts and f"{count:,}" in counts
    assert manifest["roles"], "the demo recipe has roles"
    for role, count in manifest["roles"].items():
        assert role in counts and f"{count['samples']:,}" in counts
    charts = {image.get("data-chart"): image["section"] for image in parsed.images if image.get("data-chart")}
    assert charts["funnel"] == "funnel" and charts["drops_by_reason"] == "drops"
    assert {name for name, section in charts.items() if section == "distributions"} == HISTOGRAMS


def test_dedup_section_shows_the_manifest_example_groups(output, page):
    _, parsed = page
    manifest = open_output(output).manifest
    decisions = {name: s for name, s in manifest["decisions"].items() if name.startswith("dedup_")}
    assert decisions and all(s["examples"] for s in decisions.values())
    example_keys = {key for s in decisions.values() for group in s["examples"] for key in group}
    shown = {card["key"] for card in parsed.cards["dedup"]}
    assert shown == example_keys
    dropped = {row["key"]: row["reason"] for row in pq.read_table(output / "drops.parquet").to_pylist()}
    for card in parsed.cards["dedup"]:
        status = " ".join(card["text"])
        if card["key"] in dropped:
            assert f"dropped: {dropped[card['key']]}" in status
        else:
            assert status.startswith("kept")
    for summary in decisions.values():
        assert str(summary["removed"]) in parsed.text("dedup")


def test_thumbnail_grids_show_kept_and_dropped_samples(output, page):
    _, parsed = page
    kept_keys = set(pq.read_table(output / "parquet", columns=["key"]).column("key").to_pylist())
    kept_cards = parsed.cards["kept"]
    assert {card["key"] for card in kept_cards} == kept_keys  # kept=100 > rows: every kept sample is shown
    assert all("image" in card for card in kept_cards)
    drops = pq.read_table(output / "drops.parquet").to_pylist()
    reason_of = {row["key"]: row["reason"] for row in drops}
    assert set(parsed.reasons) == {row["reason"] for row in drops}
    dropped_cards = parsed.cards["dropped"]
    assert len(dropped_cards) == len(drops)  # per_reason=10 is more than any reason has here
    for card in dropped_cards:
        assert "dropped" in card["classes"]
        assert reason_of[card["key"]] in " ".join(card["text"])
    # With the pool kept (the default), every sample fetch could store shows its image, whichever stage dropped
    # it; one fetch itself dropped (a 404, not an image) never had bytes.
    stored = {row["key"]: row["stage"] != "fetch" for row in drops}
    assert any(stored.values()) and not all(stored.values())
    assert any(row["stage"] == "basic_filter" for row in drops)  # dropped with fetch's phase, shown all the same
    for card in dropped_cards:
        assert ("image" in card) == stored[card["key"]], card["text"]


def test_every_embedded_image_is_a_decodable_png_or_jpeg_data_uri(page):
    _, parsed = page
    assert len(parsed.images) > 20
    for image in parsed.images:
        mime, decoded = decode_data_uri(image["src"])
        assert (mime, decoded.format) in {("image/png", "PNG"), ("image/jpeg", "JPEG")}
        if image.get("data-chart"):
            assert mime == "image/png"


def test_the_report_references_no_external_resource(page):
    text, parsed = page
    assert parsed.links
    for link in parsed.links:
        assert link.startswith(("data:", "#")), link[:60]
    assert not {"script", "link", "iframe", "object", "embed"} & parsed.tags
    lowered = text.lower()
    assert "url(http" not in lowered and "@import" not in lowered


def test_hostile_captions_are_escaped(page):
    text, parsed = page
    assert "<script>" not in text and "<b>red</b>" not in text
    assert "&lt;script&gt;alert(&quot;curate&quot;)&lt;/script&gt; two &lt;b&gt;red&lt;/b&gt;" in text
    # the broken link's caption came back from the work area and is shown, as text, in its card
    card = next(c for c in parsed.cards["dropped"] if HOSTILE in "".join(c["text"]))
    assert "http_404" in " ".join(card["text"])


def test_without_the_pool_dropped_captions_come_from_the_source(output, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(output, copy, ignore=shutil.ignore_patterns("_work", "_pool"))
    text = build_report(open_output(copy), kept=4, per_reason=10)
    parsed = Page(text)
    assert "captions read back from the source" in parsed.text("dropped")
    cards = parsed.cards["dropped"]
    assert not any("image" in card for card in cards)  # no bytes anywhere: placeholders instead of thumbnails
    assert any(HOSTILE in "".join(card["text"]) for card in cards)
    assert "<script>" not in text


def test_plot_pngs_gives_named_deterministic_pngs(output):
    charts = plot_pngs(output)
    assert set(charts) == {"funnel", "drops_by_reason", *HISTOGRAMS}
    for name, png in charts.items():
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.width > 300 and image.height > 150, name
    assert plot_pngs(output) == charts


def test_inspect_keeps_the_terminal_summary_and_writes_html_on_request(output, tmp_path):
    runner = CliRunner()
    plain = runner.invoke(app, ["inspect", str(output)])
    assert plain.exit_code == 0, plain.output
    assert "Funnel" in plain.output and "report:" not in plain.output
    report = tmp_path / "sub" / "report.html"
    result = runner.invoke(app, ["inspect", str(output), "--html", str(report)])
    assert result.exit_code == 0, result.output
    assert "Funnel" in result.output and "report:" in result.output
    assert SECTIONS <= set(Page(report.read_text(encoding="utf-8")).sections)
    missing = runner.invoke(app, ["inspect", str(tmp_path / "nothing"), "--html", str(tmp_path / "x.html")])
    assert missing.exit_code == 2 and "no manifest" in missing.output
    assert not (tmp_path / "x.html").exists()


def test_an_output_with_only_webdataset_shards_reads_its_tars(output, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(output, copy, ignore=shutil.ignore_patterns("_work", "parquet"))
    manifest = open_output(output).manifest
    parsed = Page(build_report(open_output(copy), kept=100))
    assert "webdataset shards" in parsed.text("distributions")
    charts = {image.get("data-chart") for image in parsed.images if image["section"] == "distributions"}
    assert charts == HISTOGRAMS
    kept = parsed.cards["kept"]
    assert len(kept) == manifest["outputs"]["rows"] and all("image" in card for card in kept)


def test_charts_of_an_output_that_kept_nothing(output):
    manifest = open_output(output).manifest
    emptied = {**manifest, "stages": [{**stage, "rows_in": 0, "rows_out": 0, "dropped": {}}
                                      for stage in manifest["stages"]]}
    charts = render_plots(emptied, Distributions())
    assert set(charts) == {"funnel"}
    assert Image.open(io.BytesIO(charts["funnel"])).format == "PNG"
