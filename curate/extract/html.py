"""HTML page -> text blocks and images in page order (the main content, without boilerplate).

Parsing uses selectolax's Lexbor engine (an HTML5 parser: broken markup is repaired the way
browsers do). Why not trafilatura or jusText: both work on text paragraphs and lose where the
images were (the OmniCorpus reference extraction by trafilatura keeps none of its page's three
images), and image positions are the point of an interleaved document. So this module keeps
the DOM order and does its own, readability-style, main-content choice:

1. Boilerplate is excluded: script, style, template, nav, aside, footer, form, iframe, svg,
   buttons, `header` outside an article or main, elements that are hidden (`hidden`,
   `aria-hidden`, `display:none`, classes such as `sr-only`), landmark roles (navigation,
   banner, contentinfo, complementary, search), and, for the main-content choice, elements
   whose class or id reads like a comment box, sidebar, share bar, cookie banner or advert.
   A `<noscript>` gives only its images (the fallback of script-inserted or lazy images), and
   none when the `<img>` just before it already gave one.
2. Main content (`main_content: true`): every paragraph-like element with at least 25
   characters scores 1 + its commas + one point per 100 characters (at most 3) for its parent
   and half that for its grandparent; a candidate's score starts from its tag and class/id
   and is scaled by (1 - its link density). The best candidate and those of its siblings that
   score at least a fifth as much (or are long, link-poor paragraphs) form the content, in page order.
3. The content is walked in document order: block elements end a text block, `<br>` ends a
   line, an `<img>` ends the block before it and becomes an image item. Blocks made mostly of
   link text (menus, tag lists) are dropped (`max_link_density`).

Images: the URL comes from lazy-loading attributes (data-src, ...) first, then `src` unless it
is a `data:` placeholder, then the largest `<picture><source srcset>` / `srcset` candidate;
it is resolved against `<base href>` and the page URL. Skipped, with a reason: `data:` only
(`data_uri`), no URL (`no_src`), a relative URL without a page URL (`unresolved_url`),
width or height attribute <= 1 (`tracking_pixel`), both at most `icon_max_side` or .ico/.cur
(`icon`), .svg (`svg`: not a raster image), file-name words of icons and placeholders
(`icon_or_placeholder_url`), and the same URL again on the page (`repeated`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

from pydantic import Field
from selectolax.lexbor import LexborHTMLParser, LexborNode

from curate.extract.urls import (
    LAZY_SRC_ATTRIBUTES,
    LAZY_SRCSET_ATTRIBUTES,
    is_data_uri,
    largest_candidate,
    parse_srcset,
    resolve,
)
from curate.stage import Params

DEFAULT_SKIP_URL_WORDS = (
    "favicon", "icon", "icons", "sprite", "sprites", "logo", "emoji", "emoticon", "avatar", "badge", "button",
    "spacer", "blank", "pixel", "loading", "loader", "spinner", "placeholder", "transparent", "1x1",
)

# Elements never part of the content, with everything inside them.
BOILERPLATE_TAGS = (
    "script", "style", "template", "nav", "aside", "footer", "form", "iframe", "svg", "button", "select",
    "textarea", "input", "label", "dialog", "menu", "object", "embed", "canvas", "audio", "video", "map",
    "head", "link", "meta",
)
BOILERPLATE_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search", "menu", "menubar", "dialog",
                     "alert", "alertdialog", "tooltip"}
HIDDEN_CLASSES = {"hidden", "d-none", "sr-only", "visually-hidden", "screen-reader-text", "hide", "invisible"}
BLOCK_TAGS = {
    "p", "div", "section", "article", "main", "header", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li",
    "dl", "dt", "dd", "table", "thead", "tbody", "tfoot", "tr", "td", "th", "caption", "blockquote", "pre",
    "figure", "figcaption", "hr", "address", "details", "summary", "center", "body", "picture", "noscript",
}
PARAGRAPH_TAGS = ("p", "pre", "td", "blockquote")
MIN_PARAGRAPH_CHARS = 25

_UNLIKELY = re.compile(
    r"banner|breadcrumb|combx|comment|communit|disqus|extra|foot|gdpr|legends|menu|related|remark|replies|rss|"
    r"shoutbox|sidebar|skyscraper|social|sponsor|supplemental|ad-break|agegate|pagination|pager|popup|share|"
    r"cookie|consent|newsletter|subscribe|signup|promo|advert|masthead|navbar|toolbar",
    re.IGNORECASE,
)
_MAYBE = re.compile(r"and|article|body|column|content|main|shadow|post|entry|text|story|blog", re.IGNORECASE)
_POSITIVE = re.compile(r"article|body|content|entry|hentry|main|page|post|text|blog|story", re.IGNORECASE)
_NEGATIVE = re.compile(
    r"hidden|banner|combx|comment|com-|contact|foot|masthead|media|meta|outbrain|promo|related|scroll|share|"
    r"shoutbox|sidebar|skyscraper|sponsor|shopping|tags|tool|widget|advert|cookie|social",
    re.IGNORECASE,
)
_DISPLAY_NONE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\r\f\v\u00a0\u200b\u3000]+")
_WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")
_PIXELS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(px)?\s*$", re.IGNORECASE)
_STYLE_SIZE = re.compile(r"(?<![-\w])(width|height)\s*:\s*(\d+(?:\.\d+)?)px", re.IGNORECASE)


class ExtractParams(Params):
    """How pages are turned into documents."""

    main_content: bool = True  # keep the main content only (readability-style scoring); false: the whole body
    max_link_density: float | None = Field(0.5, ge=0.0, le=1.0)  # drop text blocks with more link text than this
    min_block_chars: int = Field(1, ge=0)  # shorter text blocks are left out
    icon_max_side: int = Field(48, ge=0)  # width and height attributes both at most this: an icon
    skip_url_words: list[str] = list(DEFAULT_SKIP_URL_WORDS)  # file-name words of icons, spacers, placeholders
    drop_repeated_images: bool = True  # the same image URL again on a page is left out


@dataclass(frozen=True)
class PageImage:
    """An image of the page, where it stands in the text."""

    url: str
    attribute: str  # where the URL came from: src, data-src, srcset, picture, ...
    alt: str | None = None
    title: str | None = None
    width: int | None = None  # as declared in the markup
    height: int | None = None


@dataclass(frozen=True)
class SkippedImage:
    """An `<img>` that is not part of the document, and why."""

    url: str | None
    reason: str


@dataclass
class ExtractedPage:
    """Text blocks (str) and images (PageImage) in page order, plus what the page says about itself."""

    items: list[str | PageImage] = field(default_factory=list)
    skipped_images: list[SkippedImage] = field(default_factory=list)
    title: str | None = None
    lang: str | None = None
    base_url: str | None = None
    canonical_url: str | None = None
    robots: list[str] = field(default_factory=list)  # <meta name="robots"> directives, lower case

    @property
    def images(self) -> list[PageImage]:
        return [item for item in self.items if isinstance(item, PageImage)]

    @property
    def texts(self) -> list[str]:
        return [item for item in self.items if isinstance(item, str)]


def extract_page(html: str | bytes, page_url: str | None, params: ExtractParams | None = None) -> ExtractedPage:
    """Extract the text blocks and images of one page in page order (see the module docstring)."""
    params = params or ExtractParams()
    tree = LexborHTMLParser(html)
    page = ExtractedPage()
    _read_head(tree, page, page_url)
    body = tree.body
    if body is None:
        return page
    excluded = _boilerplate(tree, params.main_content)
    roots = _content_roots(body, excluded) if params.main_content else [body]
    _Walker(page, excluded, params).walk(roots)
    return page


# -- head -------------------------------------------------------------------


def _read_head(tree: LexborHTMLParser, page: ExtractedPage, page_url: str | None) -> None:
    title = tree.css_first("title")
    page.title = _normalize(title.text(deep=True)) or None if title is not None else None
    html = tree.css_first("html")
    page.lang = (html.attributes.get("lang") or None) if html is not None else None
    canonical = tree.css_first('link[rel="canonical"]')
    og_url = tree.css_first('meta[property="og:url"]')
    found = (canonical.attributes.get("href") if canonical is not None else None) or (
        og_url.attributes.get("content") if og_url is not None else None)
    page.canonical_url = resolve(page_url, found)
    base = tree.css_first("base[href]")
    page_base = page_url or page.canonical_url
    page.base_url = resolve(page_base, base.attributes.get("href")) if base is not None else None
    page.base_url = page.base_url or page_base
    for meta in tree.css("meta[name]"):
        if (meta.attributes.get("name") or "").strip().lower() == "robots":
            content = (meta.attributes.get("content") or "").lower()
            page.robots += [d.strip() for d in content.split(",") if d.strip()]


# -- boilerplate ------------------------------------------------------------


def _boilerplate(tree: LexborHTMLParser, unlikely: bool) -> set[int]:
    """mem_ids of the elements whose whole subtree is left out."""
    excluded: set[int] = set()
    for node in tree.css(",".join(BOILERPLATE_TAGS)):
        excluded.add(node.mem_id)
    for node in tree.css("header"):
        if not _has_ancestor(node, ("article", "main")):
            excluded.add(node.mem_id)
    for node in tree.css("[hidden],[aria-hidden],[style],[role],[class]"):
        attrs = node.attributes
        if node.tag in ("html", "body"):
            continue
        classes = set((attrs.get("class") or "").lower().split())
        if ("hidden" in attrs or (attrs.get("aria-hidden") or "").lower() == "true"
                or _DISPLAY_NONE.search(attrs.get("style") or "")
                or (attrs.get("role") or "").lower() in BOILERPLATE_ROLES
                or classes & HIDDEN_CLASSES):
            excluded.add(node.mem_id)
    if unlikely:
        for node in tree.css("[class],[id]"):
            if node.tag in ("html", "body", "article", "main", "img", "picture", "a") or node.mem_id in excluded:
                continue
            label = f"{node.attributes.get('class') or ''} {node.attributes.get('id') or ''}"
            if _UNLIKELY.search(label) and not _MAYBE.search(label):
                excluded.add(node.mem_id)
    return excluded


def _has_ancestor(node: LexborNode, tags: tuple[str, ...]) -> bool:
    parent = node.parent
    while parent is not None:
        if parent.tag in tags:
            return True
        parent = parent.parent
    return False


def _is_excluded(node: LexborNode, excluded: set[int]) -> bool:
    while node is not None:
        if node.mem_id in excluded:
            return True
        node = node.parent
    return False


# -- main content -----------------------------------------------------------


def _class_weight(node: LexborNode) -> float:
    label = f"{node.attributes.get('class') or ''} {node.attributes.get('id') or ''}"
    weight = 0.0
    if _NEGATIVE.search(label):
        weight -= 25
    if _POSITIVE.search(label):
        weight += 25
    return weight


_TAG_WEIGHT = {"div": 5, "article": 10, "main": 5, "section": 3, "pre": 3, "td": 3, "blockquote": 3,
               "form": -3, "ol": -3, "ul": -3, "dl": -3, "li": -3, "address": -3,
               "h1": -5, "h2": -5, "h3": -5, "h4": -5, "h5": -5, "h6": -5, "th": -5}


def _text_and_links(node: LexborNode, excluded: set[int]) -> tuple[int, int]:
    """(characters of text, characters of link text) in `node`, excluded subtrees left out."""
    total = links = 0
    stack: list[tuple[LexborNode, bool]] = [(node, False)]
    while stack:
        current, in_link = stack.pop()
        if current.mem_id in excluded:
            continue
        if current.tag == "-text":
            size = len(current.text_content.strip())
            total += size
            links += size if in_link else 0
            continue
        in_link = in_link or current.tag == "a"
        stack.extend((child, in_link) for child in current.iter(include_text=True))
    return total, links


def _direct_text(node: LexborNode) -> str:
    return " ".join(c.text_content for c in node.iter(include_text=True) if c.tag == "-text")


def _paragraphs(body: LexborNode, excluded: set[int]) -> Iterator[tuple[LexborNode, str]]:
    for node in body.css(",".join((*PARAGRAPH_TAGS, "div"))):
        text = _direct_text(node) if node.tag == "div" else node.text(deep=True, separator=" ")
        text = _normalize(text)
        if len(text) >= MIN_PARAGRAPH_CHARS and not _is_excluded(node, excluded):
            yield node, text


def _content_roots(body: LexborNode, excluded: set[int]) -> list[LexborNode]:
    """The main-content elements, in page order (the body when nothing scores)."""
    scores: dict[int, float] = {}
    nodes: dict[int, LexborNode] = {}

    def add(node: LexborNode | None, amount: float) -> None:
        if node is None or node.tag in ("html", "-document"):
            return
        if node.mem_id not in scores:
            scores[node.mem_id] = _TAG_WEIGHT.get(node.tag, 0) + _class_weight(node)
            nodes[node.mem_id] = node
        scores[node.mem_id] += amount

    for node, text in _paragraphs(body, excluded):
        points = 1 + text.count(",") + text.count("，") + text.count("、") + min(len(text) // 100, 3)
        parent = node.parent
        add(parent, points)
        add(parent.parent if parent is not None else None, points / 2)
    if not scores:
        return [body]
    final = {}
    for mem_id, score in scores.items():
        total, links = _text_and_links(nodes[mem_id], excluded)
        final[mem_id] = score * (1 - (links / total if total else 0))
    ranked = sorted(final, key=lambda m: (-final[m], m))
    top = _promote(nodes[ranked[0]], [nodes[m] for m in ranked[1:5] if final[m] >= 0.5 * final[ranked[0]]],
                   excluded)
    final.setdefault(top.mem_id, final[ranked[0]])
    if top.tag == "body" or top.parent is None:
        return [top]
    threshold = max(10.0, final[top.mem_id] * 0.2)
    roots = []
    for sibling in top.parent.iter(include_text=False):
        if sibling.mem_id in excluded:
            continue
        if sibling.mem_id == top.mem_id or final.get(sibling.mem_id, float("-inf")) >= threshold:
            roots.append(sibling)
        elif sibling.tag == "p":
            total, links = _text_and_links(sibling, excluded)
            if total >= 80 and links / total < 0.25:
                roots.append(sibling)
    return roots


def _ancestors(node: LexborNode) -> list[LexborNode]:
    found, parent = [], node.parent
    while parent is not None and parent.tag not in ("html", "-document"):
        found.append(parent)
        parent = parent.parent
    return found


def _promote(top: LexborNode, runners_up: list[LexborNode], excluded: set[int]) -> LexborNode:
    """Widen the best candidate to the element that really holds the content.

    - Content split over several blocks: the nearest ancestor holding the best candidate and at
      least two close runners-up (score >= 3/4 of the best) stands for all of them.
    - An `<article>` (or `itemprop=articleBody`) around the candidate whose text is at most twice
      the candidate's is taken whole, so its title and lead image come along.
    - Wrappers with the candidate as their only element child are taken instead of it.
    """
    for ancestor in _ancestors(top):
        if ancestor.tag == "body":
            break
        inside = sum(1 for other in runners_up if ancestor.mem_id in {a.mem_id for a in _ancestors(other)})
        if inside >= 2:
            top = ancestor
            break
        if ancestor.tag == "article":  # never merge several articles of one page
            break
    text, _ = _text_and_links(top, excluded)
    for ancestor in _ancestors(top):
        if ancestor.tag == "article" or (ancestor.attributes.get("itemprop") or "") == "articleBody":
            whole, _ = _text_and_links(ancestor, excluded)
            if whole <= 2 * text:
                top = ancestor
            break
    while top.parent is not None and top.parent.tag not in ("body", "html"):
        siblings = [c for c in top.parent.iter(include_text=False) if c.mem_id not in excluded]
        if len(siblings) != 1:
            break
        top = top.parent
    return top


# -- walking the content ----------------------------------------------------


def _normalize(text: str) -> str:
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _size(attrs: dict, name: str) -> int | None:
    match = _PIXELS.match(attrs.get(name) or "")
    if match:
        return int(float(match.group(1)))
    for prop, value in _STYLE_SIZE.findall(attrs.get("style") or ""):
        if prop.lower() == name:
            return int(float(value))
    return None


class _Walker:
    """Walks content roots in document order and fills an ExtractedPage."""

    def __init__(self, page: ExtractedPage, excluded: set[int], params: ExtractParams):
        self.page = page
        self.excluded = excluded
        self.params = params
        self.words = re.compile(
            r"(?<![a-z0-9])(" + "|".join(re.escape(w.lower()) for w in params.skip_url_words) + r")(?![a-z])"
        ) if params.skip_url_words else None
        self.parts: list[str] = []
        self.text_chars = 0
        self.link_chars = 0
        self.seen_urls: set[str] = set()
        self.resolved_img: int | None = None  # mem_id of the last <img> that gave an image

    def walk(self, roots: list[LexborNode]) -> None:
        for root in roots:
            self._walk(root)
        self._flush()

    def _walk(self, root: LexborNode) -> None:
        stack: list[tuple[LexborNode, bool, bool]] = [(root, False, False)]  # node, leaving, inside a link
        while stack:
            node, leaving, in_link = stack.pop()
            tag = node.tag
            if leaving:
                if tag in BLOCK_TAGS:
                    self._flush()
                continue
            if tag == "-text":
                self._text(node.text_content, in_link)
                continue
            if tag.startswith("-") or node.mem_id in self.excluded:
                continue
            if tag == "br":
                self.parts.append("\n")
                continue
            if tag == "img":
                self._image(node)
                continue
            if tag == "noscript":
                self._noscript(node)
                continue
            if tag in BLOCK_TAGS:
                self._flush()
            stack.append((node, True, in_link))
            children = list(node.iter(include_text=True))
            stack.extend((child, False, in_link or tag == "a") for child in reversed(children))

    def _text(self, text: str, in_link: bool) -> None:
        self.parts.append(_WHITESPACE.sub(" ", text))  # line breaks in markup are spaces; only <br> breaks lines
        size = len(text.strip())
        self.text_chars += size
        if in_link:
            self.link_chars += size

    def _flush(self) -> None:
        text = _normalize("".join(self.parts))
        dense = (self.params.max_link_density is not None and self.text_chars
                 and self.link_chars / self.text_chars > self.params.max_link_density)
        if text and len(text) >= self.params.min_block_chars and not dense:
            self.page.items.append(text)
        self.parts, self.text_chars, self.link_chars = [], 0, 0

    def _noscript(self, node: LexborNode) -> None:
        """Images of a <noscript> (the fallback of script-inserted or lazy images); its text is left out.

        Skipped when the element just before it is an <img> that already gave the image.
        """
        previous = node.prev
        while previous is not None and previous.tag == "-text" and not previous.text_content.strip():
            previous = previous.prev
        if previous is not None and previous.mem_id == self.resolved_img:
            return
        for image in node.css("img"):
            self._image(image)

    def _image(self, node: LexborNode) -> None:
        self._flush()
        image, skipped = self._choose(node)
        if image is None:
            self.page.skipped_images.append(skipped)
            return
        self.resolved_img = node.mem_id
        self.seen_urls.add(image.url)
        self.page.items.append(image)

    def _choose(self, node: LexborNode) -> tuple[PageImage | None, SkippedImage | None]:
        attrs = node.attributes
        width, height = _size(attrs, "width"), _size(attrs, "height")
        raw, attribute = self._raw_url(node)
        if raw is None:
            placeholder = is_data_uri(attrs.get("src"))
            return None, SkippedImage(None, "data_uri" if placeholder else "no_src")
        url = resolve(self.page.base_url, raw)
        if url is None:
            return None, SkippedImage(raw, "unresolved_url")
        reason = self._skip_reason(url, width, height)
        if reason is None and self.params.drop_repeated_images and url in self.seen_urls:
            reason = "repeated"
        if reason is not None:
            return None, SkippedImage(url, reason)
        alt = _normalize(attrs.get("alt") or "") or None
        title = _normalize(attrs.get("title") or "") or None
        return PageImage(url, attribute, alt, title, width, height), None

    def _raw_url(self, node: LexborNode) -> tuple[str | None, str]:
        """The image URL as written in the markup, and the attribute it came from."""
        attrs = node.attributes
        for name in LAZY_SRC_ATTRIBUTES:
            value = (attrs.get(name) or "").strip()
            if value and not is_data_uri(value):
                return value, name
        src = (attrs.get("src") or "").strip()
        if src and not is_data_uri(src):
            return src, "src"
        parent = node.parent
        if parent is not None and parent.tag == "picture":
            for source in parent.iter(include_text=False):
                if source.tag != "source" or "svg" in (source.attributes.get("type") or ""):
                    continue
                best = largest_candidate(parse_srcset(source.attributes.get("srcset")
                                                      or source.attributes.get("data-srcset")))
                if best is not None:
                    return best.url, "picture"
        for name in (*LAZY_SRCSET_ATTRIBUTES, "srcset"):
            best = largest_candidate(parse_srcset(attrs.get(name)))
            if best is not None:
                return best.url, name
        return None, ""

    def _skip_reason(self, url: str, width: int | None, height: int | None) -> str | None:
        if (width is not None and width <= 1) or (height is not None and height <= 1):
            return "tracking_pixel"
        path = url.split("?", 1)[0].split("#", 1)[0].lower()
        if path.endswith(".svg") or path.endswith(".svgz"):
            return "svg"
        if path.endswith((".ico", ".cur")):
            return "icon"
        side = self.params.icon_max_side
        if width is not None and height is not None and width <= side and height <= side:
            return "icon"
        name = path.rsplit("/", 1)[-1]
        if self.words is not None and self.words.search(name):
            return "icon_or_placeholder_url"
        return None
