"""HTML -> document extraction, checked against real pages (tests/data/web-pages, see its SOURCE.txt)."""

from __future__ import annotations

from pathlib import Path

import pytest

from curate.extract.charset import decode_html
from curate.extract.html import ExtractParams, PageImage, extract_page
from curate.extract.text import split_sentences
from curate.extract.urls import largest_candidate, parse_srcset, resolve

PAGES = Path(__file__).resolve().parent / "data" / "web-pages" / "html"
OMNICORPUS_URL = "https://roundtablegauteng.co.za/?page_number_0=4"
PHYS_URL = "https://phys.org/news/2019-10-flint-flake-tool-partially-birch.html"


def page(name: str, url: str | None, **params) -> tuple:
    decoded = decode_html((PAGES / name).read_bytes())
    return extract_page(decoded.text, url, ExtractParams(**params)), decoded


def sequence(extracted) -> list[str]:
    """Items as comparable values: text blocks as they are, images as ('image', url)."""
    return [f"image {item.url}" if isinstance(item, PageImage) else item for item in extracted.items]


def test_omnicorpus_page_gives_the_magic_html_reference_text_and_images_in_order():
    extracted, _ = page("omnicorpus_demo_origin_page.html", OMNICORPUS_URL)
    reference, _ = page("omnicorpus_demo_magic-html_extraction.html", OMNICORPUS_URL, main_content=False)
    assert len(reference.images) == 3
    assert sequence(extracted) == sequence(reference)
    # the images sit between the same paragraphs as in the reference
    items = sequence(extracted)
    positions = [i for i, item in enumerate(items) if item.startswith("image ")]
    assert items[positions[0] - 1].startswith("So, if you’re a young man looking for a way")
    assert items[positions[0] + 1].startswith("Round Table raises funds through")
    assert items[positions[2] - 1].startswith("In its centre, we can see")
    # the page's header logo, its feed widget's spinner and placeholders are not part of it
    assert not any("RTGA-fb-header" in item or "wd-facebook-feed" in item for item in items)


def test_omnicorpus_page_whole_body_keeps_header_logo_but_not_the_loading_spinner():
    extracted, _ = page("omnicorpus_demo_origin_page.html", OMNICORPUS_URL, main_content=False)
    urls = [image.url for image in extracted.images]
    assert not any(url.endswith("RTGA-fb-header-2.jpg") for url in urls)  # <header> is boilerplate
    skipped = {s.url: s.reason for s in extracted.skipped_images}
    assert skipped["https://roundtablegauteng.co.za/wp-content/plugins/wd-facebook-feed/images/loading.gif"] == (
        "icon_or_placeholder_url")
    assert len(urls) == 3


def test_lazy_data_src_images_are_found_and_data_placeholders_and_tracking_pixels_are_not():
    raw = (PAGES / "phys.org.tool.html").read_text(encoding="utf-8")
    extracted, _ = page("phys.org.tool.html", PHYS_URL, main_content=False)
    lazy = [image for image in extracted.images if image.attribute == "data-src"]
    assert len(lazy) >= 10
    for image in lazy:  # each lazy image's markup had a data: placeholder in src and the real URL in data-src
        assert f'data-src="{image.url}" src="data:image/gif;base64' in raw
    assert all(not image.url.startswith("data:") for image in extracted.images)
    pixel = "https://pixel.quantserve.com/pixel/p-5dNhPAnM9r0yY.gif"
    assert pixel not in [image.url for image in extracted.images]
    assert {s.url: s.reason for s in extracted.skipped_images}[pixel] == "tracking_pixel"


def test_picture_source_srcset_is_used_when_img_has_only_a_placeholder():
    html = """<html><body><article>
      <p>Some words about the picture that are long enough to count as a paragraph here.</p>
      <picture><source type="image/svg+xml" srcset="/a.svg"><source srcset="/p-400.jpg 400w, /p-1200.jpg 1200w">
        <img src="data:image/gif;base64,R0lGOD" alt="lazy"></picture>
      <img srcset="/s-1x.jpg, /s-2x.jpg 2x" alt="dense">
      <img src="/track.gif" width="1" height="1"><img src="/favicon.ico"><img src="/icon.png" width="16" height="16">
      <img data-src="data:image/png;base64,AAAA" src="data:image/png;base64,AAAA">
      <p>More words after the pictures, also long enough to be a paragraph of this article.</p>
    </article></body></html>"""
    extracted = extract_page(html, "https://example.org/news/story.html")
    assert [(i.url, i.attribute) for i in extracted.images] == [
        ("https://example.org/p-1200.jpg", "picture"), ("https://example.org/s-2x.jpg", "srcset")]
    reasons = sorted(s.reason for s in extracted.skipped_images)
    assert reasons == ["data_uri", "icon", "icon", "tracking_pixel"]


def test_relative_urls_resolve_against_base_href_then_page_url():
    html = """<html><head><base href="https://cdn.example.net/assets/"></head><body>
      <p>A paragraph long enough to be the content of this small test page, with commas, too.</p>
      <img src="img/one.jpg"><img src="//other.example.com/two.jpg"><img src="/root.jpg">
      </body></html>"""
    extracted = extract_page(html, "https://example.org/a/b.html", ExtractParams(main_content=False))
    assert [i.url for i in extracted.images] == [
        "https://cdn.example.net/assets/img/one.jpg", "https://other.example.com/two.jpg", "https://cdn.example.net/root.jpg"]
    without_base = extract_page(html.replace('<base href="https://cdn.example.net/assets/">', ""), None,
                                ExtractParams(main_content=False))
    assert without_base.images == []
    assert [s.reason for s in without_base.skipped_images] == ["unresolved_url"] * 3


def test_boilerplate_is_left_out():
    html = """<html><body><nav><p>Home, About, Contact, and many more menu entries here</p></nav>
      <main><h1>Title</h1><p>The real story starts here, and it has commas, several of them, really.</p>
      <aside><p>Related: another story that is long enough to be a paragraph.</p><img src="/side.jpg"></aside>
      <script>var x = "script text that must not show";</script><style>p { color: red }</style>
      <div style="display:none"><p>hidden text that is long enough to be a paragraph</p></div>
      <p>The story goes on, with more words and more commas, until it ends.</p>
      <img src="/story.jpg" alt="story"></main><footer><p>Copyright and legal text of the site footer</p></footer>
      </body></html>"""
    extracted = extract_page(html, "https://example.org/", ExtractParams(main_content=False))
    text = " ".join(extracted.texts)
    for unwanted in ("menu entries", "Related", "script text", "color", "hidden text", "Copyright"):
        assert unwanted not in text
    assert "The real story starts here" in text and "The story goes on" in text
    assert [i.url for i in extracted.images] == ["https://example.org/story.jpg"]


def test_declared_latin1_page_is_decoded_as_windows_1252():
    extracted, decoded = page("cdu-fraktion-erfurt.de.waldorfschule.html",
                              "http://www.cdu-fraktion-erfurt.de/inhalte/aktuelles/"
                              "entwicklung-der-waldorfschule-ermoeglicht/index.html")
    assert decoded.encoding == "cp1252" and decoded.how == "meta"
    text = " ".join(extracted.texts)
    assert "\ufffd" not in text
    assert "ö" in text or "ü" in text or "ä" in text
    with pytest.raises(UnicodeDecodeError):
        (PAGES / "cdu-fraktion-erfurt.de.waldorfschule.html").read_bytes().decode("utf-8")


def test_charset_from_http_header_wins_over_detection_and_gb2312_uses_gb18030():
    body = "<html><body><p>中文内容，测试页面。</p></body></html>".encode("gb18030")
    decoded = decode_html(body, "gb2312")
    assert decoded.encoding == "gb18030" and decoded.how == "http"
    assert "中文内容" in decoded.text
    assert decode_html(b"\xef\xbb\xbf<p>caf\xc3\xa9</p>").how == "bom"


def test_srcset_parsing_keeps_commas_inside_urls():
    candidates = parse_srcset("https://x.org/w_300,h_200/a.jpg 300w, https://x.org/w_900,h_600/a.jpg 900w")
    assert [c.url for c in candidates] == ["https://x.org/w_300,h_200/a.jpg", "https://x.org/w_900,h_600/a.jpg"]
    assert largest_candidate(candidates).width == 900
    assert resolve("https://a.org/x/", "javascript:void(0)") is None
    assert resolve(None, "relative.jpg") is None


def test_sentences_are_split_at_sentence_ends():
    assert split_sentences('He said "Stop." Then he left! Did he? 第一句。第二句') == [
        'He said "Stop."', "Then he left!", "Did he?", "第一句。", "第二句"]
