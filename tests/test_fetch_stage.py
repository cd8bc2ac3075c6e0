"""FetchStage on a small batch served by the loopback server."""

import hashlib
import io

import pytest
from PIL import Image

from curate.demo.server import Route
from curate.fetch.config import FetchParams
from curate.fetch.image import phash
from curate.fetch.stage import FetchStage
from curate.schema import DROP_DETAIL, DROP_REASON, SAMPLE_SCHEMA, from_rows


def image_bytes(fmt, color, size=(64, 48)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


JPEG = image_bytes("JPEG", (200, 30, 30))
PNG = image_bytes("PNG", (30, 200, 30), size=(40, 80))
HTML = b"<!doctype html><html><body>not an image</body></html>"


def meta(url):
    return {"url": url}


def pair(key, url):
    return {"key": key, "kind": "pair", "images": [{"bytes": None, "path": None}], "image_meta": [meta(url)]}


def interleaved(key, urls):
    return {
        "key": key,
        "kind": "interleaved",
        "images": [{"bytes": None, "path": None} for _ in urls],
        "image_meta": [meta(url) for url in urls],
    }


@pytest.fixture
def stage():
    fetch = FetchStage(
        FetchParams(allow_private_addresses=True, host_rate=None, threads=4, retries=0, resize={"size": 32},
                    encode={"format": "png"})
    )
    fetch.setup()
    yield fetch
    fetch.teardown()


@pytest.fixture
def served(loopback):
    loopback.routes["/a.jpg"] = Route(body=JPEG)
    loopback.routes["/b.png"] = Route(body=PNG, content_type="image/png")
    loopback.routes["/page.html"] = Route(body=HTML, content_type="text/html")
    loopback.routes["/moved.jpg"] = Route(redirect_to="/a.jpg")
    return loopback


def test_stage_contract():
    assert FetchStage.name == "fetch"
    assert FetchStage.Params is FetchParams
    assert FetchStage.phase == "prepare"


def test_batch(stage, served):
    url = served.url
    kept_bytes = image_bytes("PNG", (0, 0, 0))
    prefilled = {
        "key": "k5",
        "kind": "pair",
        "images": [{"bytes": kept_bytes, "path": None}],
        "image_meta": [{"url": url("/not-fetched.jpg"), "width": 64}],
    }
    batch = from_rows(
        [
            pair("k0", url("/a.jpg")),
            pair("k1", url("/missing.jpg")),
            pair("k2", url("/page.html")),
            interleaved("k3", [url("/a.jpg"), url("/b.png")]),
            interleaved("k4", [url("/b.png"), url("/missing.jpg")]),
            prefilled,
            pair("k6", url("/moved.jpg")),
        ]
    )
    out = stage.process(batch)

    assert out.schema.remove(out.schema.get_field_index(DROP_DETAIL)).remove(
        out.schema.get_field_index(DROP_REASON)
    ) == SAMPLE_SCHEMA
    assert out.column("key").to_pylist() == ["k0", "k1", "k2", "k3", "k4", "k5", "k6"]
    assert out.column(DROP_REASON).to_pylist() == [None, "http_404", "not_image", None, "http_404", None, None]
    details = out.column(DROP_DETAIL).to_pylist()
    assert "404" in details[1]
    assert details[4].startswith("image 1 (") and "missing.jpg" in details[4]

    rows = out.to_pylist()
    check_image(rows[0], 0, url("/a.jpg"), JPEG, "JPEG", (64, 48), (32, 24))
    check_image(rows[3], 0, url("/a.jpg"), JPEG, "JPEG", (64, 48), (32, 24))
    check_image(rows[3], 1, url("/b.png"), PNG, "PNG", (40, 80), (16, 32))
    check_image(rows[6], 0, url("/moved.jpg"), JPEG, "JPEG", (64, 48), (32, 24))

    assert rows[5]["images"] == prefilled["images"]
    assert rows[5]["image_meta"][0]["width"] == 64 and rows[5]["image_meta"][0]["sha256"] is None
    assert "/not-fetched.jpg" not in served.routes
    assert rows[0]["image_meta"][0]["pixel_sha256"] == rows[6]["image_meta"][0]["pixel_sha256"]
    assert rows[3]["image_meta"][0]["pixel_sha256"] != rows[3]["image_meta"][1]["pixel_sha256"]
    assert served.routes["/a.jpg"].hits == 2  # k0 and k3 share one download; k6 arrives by redirect


def decoded_original(served_bytes, size):
    """The served image decoded as process_image sees it before resizing.

    For JPEG the decoder scales by 1/2..1/8 while staying >= the target size (`draft`).
    """
    with Image.open(io.BytesIO(served_bytes)) as im:
        if im.format == "JPEG" and size[0] * 2 <= im.width and size[1] * 2 <= im.height:
            im.draft("RGB", size)
        return im.convert("RGB")


def check_image(row, index, url, served_bytes, original_format, original_size, size):
    image, info = row["images"][index], row["image_meta"][index]
    original = decoded_original(served_bytes, size)
    pixels = f"{original.width}x{original.height}:".encode() + original.tobytes()
    assert image["path"] is None
    decoded = Image.open(io.BytesIO(image["bytes"]))
    assert decoded.format == "PNG" and decoded.mode == "RGB"
    assert decoded.size == size
    assert info == {
        "url": url,
        "width": size[0],
        "height": size[1],
        "original_width": original_size[0],
        "original_height": original_size[1],
        "sha256": hashlib.sha256(served_bytes).hexdigest(),
        "format": "png",
        "original_format": original_format,
        "original_mode": "RGB",
        "exif_orientation": 1,
        "num_bytes": len(image["bytes"]),
        "original_num_bytes": len(served_bytes),
        "pixel_sha256": hashlib.sha256(pixels).hexdigest(),
        "phash": phash(original),
    }
    assert -(2**63) <= info["phash"] < 2**63


def test_row_without_url_is_dropped(stage):
    batch = from_rows([{"key": "k", "kind": "pair", "images": None, "image_meta": [{"url": None}]}])
    out = stage.process(batch)
    assert out.column(DROP_REASON).to_pylist() == ["invalid_url"]


def test_empty_batch(stage):
    out = stage.process(from_rows([]))
    assert out.num_rows == 0
    assert DROP_REASON in out.column_names


def test_earlier_drop_reason_wins(stage, served):
    batch = from_rows([pair("k0", served.url("/missing.jpg"))])
    batch = batch.append_column(DROP_REASON, [["earlier"]]).append_column(DROP_DETAIL, [["from before"]])
    out = stage.process(batch)
    assert out.column(DROP_REASON).to_pylist() == ["earlier"]


def test_process_without_setup_and_teardown(served):
    fetch = FetchStage(FetchParams(allow_private_addresses=True, threads=2, resize={"size": 16}))
    out = fetch.process(from_rows([pair("k0", served.url("/a.jpg"))]))
    fetch.teardown()
    assert out.column(DROP_REASON).to_pylist() == [None]
    assert out.to_pylist()[0]["image_meta"][0]["format"] == "jpg"
