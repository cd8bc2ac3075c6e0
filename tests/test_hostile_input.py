"""Hostile input: every kind ends in a clear error or a drop reason, never a crash or a hang, and nothing is
written outside the output folder. docs/reliability.md lists each kind with the test that covers it (here or
in the fetch, image, recipe, source and end-to-end tests)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import tarfile
import threading
import time
import tracemalloc
import zlib
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from curate.cli import app
from curate.demo.server import LoopbackServer, Route
from curate.engine.run import OutputConflict, compile_plan, execute
from curate.fetch.config import EncodeParams, FetchParams, ResizeParams
from curate.fetch.http import HttpFetcher
from curate.fetch.image import ImageError, process_image
from curate.manifest.verify import verify_output
from curate.recipe import load_recipe
from curate.sources.image_folder import ImageFolderParams, ImageFolderSource
from curate.sources.image_shards import ImageShardsParams, ImageShardsSource
from curate.sources.url_list import UrlListParams, UrlListSource
from curate.stage import RecipeError

MiB = 1 << 20


def jpeg(width: int = 64, height: int = 48, colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def rows_of(source, batch_rows: int = 7) -> list[dict]:
    return [row for table in source.iter_batches(batch_rows) for row in table.to_pylist()]


def listing(root: Path, skip: Path | None = None) -> dict[str, bytes | str]:
    """Every path under `root` (but `skip`) with its content, or its link target: to see what a run touched."""
    found: dict[str, bytes | str] = {}
    for folder, folders, files in os.walk(root):
        if skip is not None and Path(folder) == skip:
            folders[:] = []
            continue
        for name in folders + files:
            path = Path(folder) / name
            if skip is not None and path == skip:
                continue
            if path.is_symlink():
                found[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                found[str(path)] = path.read_bytes()
            else:
                found[str(path)] = "folder"
    return found


@pytest.fixture
def fetcher():
    """A factory of fetchers (no retries, short deadlines), all closed after the test."""
    made = []

    def make(lookup=None, **overrides):
        values = dict(allow_private_addresses=True, host_rate=None, retries=0, connect_timeout=1.0,
                      read_timeout=1.0, total_timeout=2.0)
        values.update(overrides)
        made.append(HttpFetcher(FetchParams(**values), lookup=lookup))
        return made[-1]

    yield make
    for item in made:
        item.close()


# --------------------------------------------------------------------------- bodies


def deflated(size: int, wbits: int) -> bytes:
    """`size` zero bytes compressed (wbits 31: gzip, 15: zlib "deflate"); about 1,000 times smaller."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = b"\0" * MiB
    return b"".join([compressor.compress(block) for _ in range(size // MiB)] + [compressor.flush()])


@pytest.mark.parametrize("encoding, wbits", [("gzip", 31), ("deflate", 15)])
def test_a_compression_bomb_is_cut_at_max_bytes_of_the_decoded_body(loopback, fetcher, encoding, wbits):
    bomb = deflated(256 * MiB, wbits)  # 256 MiB once decoded, about 250 KiB on the wire
    loopback.routes["/bomb.png"] = Route(body=bomb, content_type="image/png", headers={"Content-Encoding": encoding})
    tracemalloc.start()
    started = time.monotonic()
    result = fetcher(max_bytes=MiB).fetch(loopback.url("/bomb.png"))
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.reason == "too_large" and result.body is None
    assert "exceeds max_bytes" in result.detail  # the limit applies to the decoded size, not Content-Length
    assert result.content_length == len(bomb) < MiB
    assert peak < 32 * MiB, f"decoding held {peak / MiB:.0f} MiB"
    assert elapsed < 5


def test_a_compression_bomb_in_an_error_or_redirect_answer_is_drained_without_decoding(loopback, fetcher):
    bomb = deflated(60 * MiB, 31)
    assert len(bomb) < 64 * 1024  # small enough to be drained (read and discarded) to keep the connection
    loopback.routes["/gone.jpg"] = Route(body=bomb, status=404, headers={"Content-Encoding": "gzip"})
    loopback.routes["/moved.jpg"] = Route(body=bomb, status=301, headers={"Content-Encoding": "gzip",
                                                                          "Location": "/gone.jpg"})
    tracemalloc.start()
    results = [fetcher().fetch(loopback.url(path)) for path in ("/gone.jpg", "/moved.jpg")]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [r.reason for r in results] == ["http_404", "http_404"]
    assert peak < 16 * MiB, f"draining held {peak / MiB:.0f} MiB"


def test_a_compressed_body_within_the_limit_is_decoded(loopback, fetcher):
    image = jpeg()
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    loopback.routes["/small.jpg"] = Route(body=compressor.compress(image) + compressor.flush(),
                                          headers={"Content-Encoding": "gzip"})
    result = fetcher().fetch(loopback.url("/small.jpg"))
    assert result.ok and result.body == image


def test_a_body_that_is_not_what_its_content_encoding_says_is_dropped(loopback, fetcher):
    loopback.routes["/liar.jpg"] = Route(body=jpeg(), headers={"Content-Encoding": "gzip"})
    result = fetcher().fetch(loopback.url("/liar.jpg"))
    assert result.reason == "connection_error" and "Content-Encoding" in result.detail


@contextmanager
def raw_http_server(answer: bytes):
    """A loopback server that answers each request of a kept-alive connection with exactly `answer`."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()
    requests: list[bytes] = []

    def handle(connection: socket.socket) -> None:
        with connection:
            connection.settimeout(2.0)
            pending = b""
            try:
                while not stop.is_set():
                    data = connection.recv(65536)
                    if not data:
                        return
                    pending += data
                    while b"\r\n\r\n" in pending:
                        head, pending = pending.split(b"\r\n\r\n", 1)
                        requests.append(head)
                        connection.sendall(answer)
            except OSError:
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            threading.Thread(target=handle, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", requests
    finally:
        stop.set()
        thread.join(timeout=2)
        server.close()


def test_a_content_length_shorter_than_the_body_ends_the_body_and_does_not_poison_the_connection(fetcher):
    image = jpeg(200, 200)
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100\r\n\r\n" + image
    with raw_http_server(answer) as (base, requests):
        client = fetcher(respect_robots=False)
        first = client.fetch(base + "/one.jpg")
        second = client.fetch(base + "/two.jpg")  # the extra bytes are never read as the next answer
    assert first.ok and first.body == image[:100]
    assert second.ok and second.body == image[:100]
    assert len(requests) == 2
    with pytest.raises(ImageError) as caught:  # what was announced is a cut image: the sample is dropped
        process_image(first.body, ResizeParams(size=64), EncodeParams(), 89_478_485)
    assert caught.value.reason == "corrupt"


# --------------------------------------------------------------------------- URLs


def public(host: str) -> list[str]:
    return ["93.184.216.34"]


@pytest.mark.parametrize("url, reason", [
    (" http://a.example/x.jpg", "invalid_url"),  # a leading space (sources strip it; the fetcher refuses it)
    ("http://exa mple.example/x.jpg", "invalid_url"),
    ("a.example/x.jpg", "invalid_url"),  # no scheme
    ("http:/a.example/x.jpg", "invalid_url"),
    ("view-source:http://a.example/x.jpg", "invalid_url"),
    ("jar:http://a.example/x.jar!/x.jpg", "invalid_url"),
    ("http://a.example:99999/x.jpg", "invalid_url"),  # port out of range
    ("http://a.example:-1/x.jpg", "invalid_url"),
    ("http://a.example:port/x.jpg", "invalid_url"),
    ("http://a.exa\x00mple/x.jpg", "invalid_url"),  # NUL in the host
    ("http://[not-an-address]/x.jpg", "invalid_url"),
    ("http://[fe80::1%25eth0]/x.jpg", "blocked_address"),  # IPv6 literal with a zone
    ("http://[::ffff:7f00:1]/x.jpg", "blocked_address"),
    ("http://user:pass@a.example@127.0.0.1/x.jpg", "blocked_address"),  # the host is after the last @
])
def test_malformed_and_tricky_urls_are_refused_before_any_request(fetcher, url, reason):
    result = fetcher(lookup=public, allow_private_addresses=False).fetch(url)
    assert (result.reason, result.attempts) == (reason, 0)


@pytest.mark.parametrize("url", ["http://2130706433/x.jpg", "http://0x7f000001/x.jpg", "http://127.1/x.jpg",
                                 "http://0177.0.0.1/x.jpg"])
def test_numeric_spellings_of_loopback_are_judged_by_the_address_they_resolve_to(fetcher, url):
    result = fetcher(allow_private_addresses=False).fetch(url)  # the system resolver reads numbers without DNS
    assert (result.reason, result.attempts) == ("blocked_address", 0)


def test_spaces_unicode_nul_crlf_and_userinfo_in_urls_are_encoded_never_injected(loopback, fetcher):
    for path in ("/a%20b.jpg", "/a%00.jpg", "/%C3%A4.jpg", "/idn.jpg", "/user.jpg", "/a.jpg"):
        loopback.routes[path] = Route(body=jpeg())
    port = loopback.base_url.rsplit(":", 1)[1]
    client = fetcher(lookup=lambda host: ["127.0.0.1"])
    base = f"http://127.0.0.1:{port}"
    assert client.fetch(base + "/a b.jpg").ok
    assert client.fetch(base + "/a\x00.jpg").ok
    assert client.fetch(base + "/ä.jpg").ok
    assert client.fetch(f"http://bücher.example:{port}/idn.jpg").ok
    assert client.fetch(f"http://user:hunter2@127.0.0.1:{port}/user.jpg").ok
    injected = client.fetch(base + "/a.jpg\r\nX-Injected: yes")
    assert injected.reason == "http_404" and loopback.routes["/a.jpg"].hits == 0
    sent = [headers for route in loopback.routes.values() for headers in route.request_headers]
    assert len(sent) == 5
    assert not any("X-Injected" in headers for headers in sent)
    assert not any("Authorization" in headers for headers in sent)  # user information is never sent
    assert loopback.routes["/idn.jpg"].request_headers[0]["Host"].startswith("xn--bcher-kva.example")


# --------------------------------------------------------------------------- images


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def patched(fmt: str, marker: bytes, offset: int, packed: bytes) -> bytes:
    """A tiny image of `fmt` with `packed` written `offset` bytes after the first `marker`."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (9, 9, 9)).save(buffer, fmt)
    data = bytearray(buffer.getvalue())
    start = data.index(marker) + offset
    data[start:start + len(packed)] = packed
    return bytes(data)


@pytest.mark.parametrize("name, data", [
    ("png 100000x100000", png_header(100_000, 100_000)),
    ("png 12000x12000, above max_pixels but below Pillow's own limit", png_header(12_000, 12_000)),
    ("jpeg 65500x65500", patched("JPEG", b"\xff\xc0", 5, struct.pack(">HH", 65_500, 65_500))),
    ("gif 65535x65535", patched("GIF", b"GIF", 6, struct.pack("<HH", 65_535, 65_535))),
    ("bmp 60000x60000", patched("BMP", b"BM", 18, struct.pack("<ii", 60_000, 60_000))),
    ("webp 16383x16383", patched("WEBP", b"\x9d\x01\x2a", 3, struct.pack("<HH", 16_383, 16_383))),
])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_huge_dimensions_in_a_tiny_file_are_a_decompression_bomb_found_from_the_header(name, data):
    started = time.monotonic()
    with pytest.raises(ImageError) as caught:
        process_image(data, ResizeParams(size=64), EncodeParams(), max_pixels=89_478_485)
    assert caught.value.reason == "decompression_bomb", name
    assert time.monotonic() - started < 1.0  # refused from the header, nothing decoded


# --------------------------------------------------------------------------- URL lists


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_text_lists_with_invalid_utf8_nul_and_megabyte_captions_keep_every_row(tmp_path, fmt):
    separator = b"," if fmt == "csv" else b"\t"
    huge = b"word " * (MiB // 5 * 3)  # a 3 MiB caption
    lines = [b"url" + separator + b"caption",
             b"http://a.example/1.jpg" + separator + b"caf\xe9 cr\xe8me",  # Latin-1, not UTF-8
             b"http://a.example/2.jpg" + separator + b"nul \x00 inside",
             b"http://a.example/3\x00.jpg" + separator + huge,
             b"http://a.example/4.jpg" + separator + b"plain"]
    path = tmp_path / f"list.{fmt}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = rows_of(UrlListSource(UrlListParams(path=str(path))))
    assert [row["drop_reason"] for row in rows] == [None] * 4
    captions = [row["captions"][0]["text"] for row in rows]
    assert captions[0] == "caf\ufffd cr\ufffdme"
    assert captions[1] == "nul \x00 inside"
    assert captions[2] == huge.decode() and len(captions[2]) == len(huge)
    assert rows[2]["image_meta"][0]["url"] == "http://a.example/3\x00.jpg"  # the fetcher encodes it


def test_a_csv_row_longer_than_the_reader_block_is_a_clear_error_not_a_crash(tmp_path):
    path = tmp_path / "list.csv"
    path.write_bytes(b"url,caption\n" + b"http://a.example/1.jpg,ok\n" * 1000 + b"http://a.example/2.jpg,"
                     + b"x" * (40 * MiB) + b"\n")
    with pytest.raises(RecipeError) as caught:
        rows_of(UrlListSource(UrlListParams(path=str(path))), batch_rows=1000)
    assert caught.value.path == "source.path"
    assert "after row 1000" in caught.value.message and "JSON Lines" in caught.value.message


def test_json_lines_with_invalid_utf8_and_non_objects_are_drop_rows(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_bytes(b'{"url": "http://a.example/1.jpg", "caption": "ok"}\n'
                     b'{"url": "http://a.example/2.jpg", "caption": "caf\xe9"}\n'
                     b'[1, 2]\n"text"\n{"url": \n'
                     + json.dumps({"url": "http://a.example/3.jpg", "caption": "x" * (4 * MiB)}).encode() + b"\n")
    rows = rows_of(UrlListSource(UrlListParams(path=str(path))))
    assert [row["drop_reason"] for row in rows] == [None, "bad_input_row", "bad_input_row", "bad_input_row",
                                                    "bad_input_row", None]
    assert len(rows[-1]["captions"][0]["text"]) == 4 * MiB


# --------------------------------------------------------------------------- shards and folders


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
               link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_tar_members_with_dot_dot_absolute_and_link_names_are_read_never_extracted(tmp_path):
    image = jpeg()
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "part.tar", "w") as tar:
        add_member(tar, "good.jpg", image)
        add_member(tar, "good.txt", b"a good caption")
        add_member(tar, "../../escape.jpg", image)
        add_member(tar, "../../escape.txt", b"tries to climb out")
        add_member(tar, "/abs/rooted.jpg", image)
        add_member(tar, "lonely.json", b'{"caption": "metadata without its image"}')
        add_member(tar, "link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add_member(tar, "hard.jpg", kind=tarfile.LNKTYPE, link="good.jpg")
        add_member(tar, "device.jpg", kind=tarfile.CHRTYPE)
    before = listing(tmp_path.parent)
    rows = rows_of(ImageShardsSource(ImageShardsParams(path=str(shards))))
    assert listing(tmp_path.parent) == before  # nothing written anywhere
    by_id = {row["source"]["id"]: row for row in rows}
    assert set(by_id) == {"part.tar:good", "part.tar:../../escape", "part.tar:/abs/rooted", "part.tar:lonely"}
    assert by_id["part.tar:good"]["drop_reason"] is None
    assert by_id["part.tar:../../escape"]["drop_reason"] is None  # a name, not a path: no file is made from it
    assert by_id["part.tar:lonely"]["drop_reason"] == "missing_image"
    assert all(row["images"][0]["bytes"] in (None, image) for row in rows)  # link targets are never read


@pytest.mark.timeout(60)
def test_image_folder_links_out_of_the_folder_fifos_and_devices_are_drops_not_hangs(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg())
    (tmp_path / "private.jpg").write_bytes(jpeg(colour=(0, 0, 255)))
    (root / "escape.jpg").symlink_to(tmp_path / "private.jpg")
    (root / "dotdot.jpg").symlink_to(Path("..") / "private.jpg")
    (root / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(root / "pipe")  # never listed itself: not a regular file
    (root / "piped.jpg").symlink_to(root / "pipe")
    (root / "b.jpg").write_bytes(jpeg(colour=(0, 255, 0)))
    (root / "b.txt").symlink_to(root / "pipe")  # a caption that would block a reader forever
    rows = rows_of(ImageFolderSource(ImageFolderParams(path=str(root))))
    reasons = {row["source"]["id"]: (row["drop_reason"], row["drop_detail"]) for row in rows}
    assert reasons["a.jpg"] == (None, None)
    for name in ("escape.jpg", "dotdot.jpg", "zero.jpg"):
        assert reasons[name][0] == "unreadable" and "outside the folder" in reasons[name][1]
    assert reasons["piped.jpg"][0] == "unreadable" and "not a regular file" in reasons["piped.jpg"][1]
    assert reasons["b.jpg"][0] == "unreadable" and "not a regular file" in reasons["b.jpg"][1]
    assert len(rows) == 6

    following = {row["source"]["id"]: row for row in rows_of(ImageFolderSource(
        ImageFolderParams(path=str(root), links="follow")))}
    assert following["escape.jpg"]["drop_reason"] is None  # asked for: read wherever the link points
    assert following["zero.jpg"]["drop_reason"] == "unreadable"  # a device is never read, followed or not


# --------------------------------------------------------------------------- recipes


def write_recipe(folder: Path, body: str, name: str = "recipe.yaml") -> Path:
    (folder / "urls.csv").write_text("url,caption\nhttp://a.example/1.jpg,one\n")
    path = folder / name
    path.write_text(body)
    return path


BASE = "source: {type: url_list, path: urls.csv}\nstages: {fetch: {}}\noutput: {path: out}\n"


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    levels = ['l0: &l0 ["xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx"]']
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    body = ("source:\n  type: url_list\n  path: urls.csv\n  defs:\n" + "".join(f"    {line}\n" for line in levels)
            + "  extra_columns: *l8\noutput: {path: out}\n")
    started = time.monotonic()
    with pytest.raises(RecipeError, match="aliases"):
        load_recipe(write_recipe(tmp_path, body))
    assert time.monotonic() - started < 5


def test_a_self_referencing_alias_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="aliases"):
        load_recipe(write_recipe(tmp_path, BASE + "description: &loop [*loop]\n"))


def test_a_huge_or_binary_recipe_file_is_refused_with_its_size_or_encoding(tmp_path):
    huge = write_recipe(tmp_path, BASE + "description: |\n" + "  filler line\n" * 200_000, "huge.yaml")
    with pytest.raises(RecipeError, match="at most 1,048,576"):
        load_recipe(huge)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(BASE.encode() + b"description: caf\xe9\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(binary)


def test_presets_that_include_each_other_are_an_error_naming_the_loop(tmp_path):
    (tmp_path / "first.yaml").write_text("include: second\nstages: {basic_filter: {}}\n")
    (tmp_path / "second.yaml").write_text("include: first\n")
    with pytest.raises(RecipeError, match="includes itself") as caught:
        load_recipe(write_recipe(tmp_path, BASE + "include: first\n"))
    assert caught.value.path == "include"


def test_a_long_wrong_value_is_not_echoed_whole(tmp_path):
    with pytest.raises(RecipeError) as caught:
        load_recipe(write_recipe(tmp_path, BASE + f"engine: {{workers: {'x' * 5000}}}\n"))
    assert caught.value.path.startswith("engine.workers") and len(caught.value.message) < 400


# --------------------------------------------------------------------------- output.path


def test_an_output_path_that_is_a_file_or_holds_a_broken_manifest_is_refused(tmp_path):
    recipe = write_recipe(tmp_path, BASE)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(OutputConflict, match="existing file"):
        execute(compile_plan(load_recipe(recipe, [f"output.path={tmp_path / 'a-file'}"])), Console(file=io.StringIO()))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{ edited by hand")
    with pytest.raises(OutputConflict, match="unreadable"):
        execute(compile_plan(load_recipe(recipe, [f"output.path={broken}"])), Console(file=io.StringIO()))
    assert (tmp_path / "a-file").read_text() == "not a folder" and (broken / "manifest.json").exists()


@pytest.mark.parametrize("target", ["recipe folder", "current folder", "parent of the current folder", "root"])
def test_overwrite_never_deletes_a_folder_holding_the_recipe_the_input_or_the_current_folder(tmp_path, monkeypatch,
                                                                                             target):
    work = tmp_path / "project"
    work.mkdir()
    recipe = write_recipe(work, BASE)
    monkeypatch.chdir(work)
    output = {"recipe folder": work, "current folder": Path("."), "parent of the current folder": tmp_path,
              "root": Path("/")}[target]
    before = listing(tmp_path)
    with pytest.raises(OutputConflict, match="--overwrite would delete"):
        execute(compile_plan(load_recipe(recipe, [f"output.path={output}"])), Console(file=io.StringIO()),
                overwrite=True)
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def hostile_run(local_ray, tmp_path_factory):
    """One run over a URL list full of hostile rows; the output sits in a folder with sentinel files."""
    folder = tmp_path_factory.mktemp("hostile")
    parent = folder / "parent"
    (parent / "neighbour").mkdir(parents=True)
    (parent / "sentinel.txt").write_text("must stay as it is")
    (parent / "neighbour" / "keep.bin").write_bytes(b"\0\1\2")
    output = parent / "out"
    routes = {
        "/ok.jpg": Route(body=jpeg(96, 64)),
        "/long-caption.jpg": Route(body=jpeg(80, 80, (10, 200, 10))),
        "/nul-caption.jpg": Route(body=jpeg(70, 90, (10, 10, 200))),
        "/gzip-bomb.png": Route(body=deflated(64 * MiB, 31), content_type="image/png",
                                headers={"Content-Encoding": "gzip"}),
        "/header-bomb.png": Route(body=png_header(100_000, 100_000), content_type="image/png"),
        "/endless.jpg": Route(body=b"\xff" * 512, endless=True),
        "/slow-loris.jpg": Route(body=jpeg(), trickle=0.05),
        "/short.jpg": Route(body=jpeg(200, 200), truncate_to=50),
    }
    with LoopbackServer(routes) as server:
        port = server.base_url.rsplit(":", 1)[1]
        expected = [
            (server.url("/ok.jpg"), "an ordinary picture", None),
            (server.url("/long-caption.jpg"), "long " * 400_000, None),
            (server.url("/nul-caption.jpg"), "nul \x00 in the caption", None),
            (server.url("/gzip-bomb.png"), "a gzip bomb", "too_large"),
            (server.url("/header-bomb.png"), "a pixel bomb", "decompression_bomb"),
            (server.url("/endless.jpg"), "a body without end", "timeout"),
            (server.url("/slow-loris.jpg"), "one byte at a time", "timeout"),
            (server.url("/short.jpg"), "less than its Content-Length", "truncated"),
            (server.url("/missing.jpg"), "not there", "http_404"),
            ("javascript:alert(1)", "script", "invalid_url"),
            ("data:image/png;base64,iVBORw0KGgo=", "inline", "invalid_url"),
            ("file:///etc/passwd", "a local file", "invalid_url"),
            ("ftp://127.0.0.1/a.jpg", "ftp", "invalid_url"),
            ("images.example/no-scheme.jpg", "no scheme", "invalid_url"),
            ("http://127.0.0.1:99999/a.jpg", "port out of range", "invalid_url"),
            (f"http://127.0.0.1:{port}/nul\x00.jpg", "NUL in the URL", "http_404"),
            (f"http://[::1]:{port}/v6.jpg", "IPv6 loopback", "connection_error"),  # the server listens on IPv4 only
        ]
        lines = [json.dumps({"url": url, "caption": caption}).encode() for url, caption, _ in expected]
        lines.insert(3, b'{"url": "http://127.0.0.1/not-utf8.jpg", "caption": "caf\xe9"}')  # Latin-1
        url_list = folder / "urls.jsonl"
        url_list.write_bytes(b"\n".join(lines) + b"\n")
        recipe = folder / "recipe.yaml"
        recipe.write_text(
            "source: {type: url_list, path: urls.jsonl}\n"
            "stages:\n"
            "  fetch: {allow_private_addresses: true, host_rate: null, retries: 0, total_timeout: 1.5,"
            " read_timeout: 1.0, max_bytes: 1048576, threads: 8}\n"
            "  basic_filter: {min_side: 8, min_caption_words: 0}\n"
            f"output: {{path: {output}, formats: [parquet, webdataset], shard_rows: 4}}\n"
            "engine: {rows_per_work_shard: 6, workers: 2}\n")
        before = listing(folder, skip=output)
        manifest = execute(compile_plan(load_recipe(recipe)), Console(file=io.StringIO()), progress=False)
        after = listing(folder, skip=output)
    return output, manifest, expected, before, after


def test_a_run_over_hostile_rows_accounts_for_every_row_with_the_expected_reason(hostile_run):
    output, manifest, expected, _, _ = hostile_run
    totals = manifest["reconciliation"]
    assert totals["ok"] and totals["input_rows"] == len(expected) + 1
    drops = pq.read_table(output / "drops.parquet").to_pylist()
    by_url = {row["url"]: row["reason"] for row in drops}
    for url, _, reason in expected:
        if reason is not None:
            assert by_url.get(url) == reason, url
    assert sum(1 for row in drops if row["reason"] == "bad_input_row") == 1  # the line that is not UTF-8
    kept = pq.read_table(output / "parquet").to_pylist()
    captions = {row["image_meta"][0]["url"]: row["captions"][0]["text"] for row in kept}
    assert set(captions) == {url for url, _, reason in expected if reason is None}
    assert captions[expected[1][0]] == expected[1][1]  # 2 MB caption kept whole
    assert captions[expected[2][0]] == expected[2][1]  # NUL kept
    assert not (output / "_work").exists()  # the work area is removed after a successful run


def test_a_run_over_hostile_rows_writes_nothing_outside_its_output_folder(hostile_run):
    output, _, _, before, after = hostile_run
    assert after == before
    assert sorted(p.name for p in output.iterdir()) == ["_pool", "drops.parquet", "manifest.json", "parquet",
                                                        "webdataset"]


def tampered(hostile_run, tmp_path) -> tuple[Path, dict]:
    output, manifest, _, _, _ = hostile_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    return copy, manifest


def test_verify_catches_a_missing_shard(hostile_run, tmp_path):
    copy, manifest = tampered(hostile_run, tmp_path)
    assert verify_output(copy).ok
    shard = manifest["outputs"]["shards"][0]["path"]
    (copy / shard).unlink()
    assert f"missing shard {shard}" in verify_output(copy).problems


def test_verify_catches_an_extra_row(hostile_run, tmp_path):
    copy, manifest = tampered(hostile_run, tmp_path)
    entry = next(s for s in manifest["outputs"]["shards"] if s["format"] == "parquet")
    table = pq.read_table(copy / entry["path"])
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), copy / entry["path"])
    problems = verify_output(copy).problems
    assert f"{entry['path']}: {entry['rows'] + 1} rows, manifest says {entry['rows']}" in problems


def test_verify_catches_a_count_edited_by_hand_and_a_path_pointing_outside(hostile_run, tmp_path):
    copy, manifest = tampered(hostile_run, tmp_path)
    edited = json.loads((copy / "manifest.json").read_text())
    edited["outputs"]["rows"] += 1
    edited["reconciliation"]["output_rows"] += 1
    edited["outputs"]["shards"][0]["path"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(edited))
    problems = " | ".join(verify_output(copy).problems)
    assert "rows do not reconcile" in problems and "manifest says" in problems
    assert "'../../etc/passwd' points outside the output folder" in problems


def test_verify_and_inspect_give_a_clear_error_for_a_broken_manifest(hostile_run, tmp_path):
    copy, _ = tampered(hostile_run, tmp_path)
    runner = CliRunner()
    (copy / "manifest.json").write_text('{"manifest_version": 1, "status": "complete"')
    verified = runner.invoke(app, ["verify", str(copy)])
    assert verified.exit_code == 1 and isinstance(verified.exception, SystemExit)  # not a traceback
    assert "not valid JSON" in verified.output
    inspected = runner.invoke(app, ["inspect", str(copy)])
    assert inspected.exit_code == 2 and isinstance(inspected.exception, SystemExit)
    assert "not valid JSON" in inspected.output
    (copy / "manifest.json").write_text('{"manifest_version": 1, "status": "complete"}')
    inspected = runner.invoke(app, ["inspect", str(copy)])
    assert inspected.exit_code == 2 and isinstance(inspected.exception, SystemExit)
    assert "manifest field" in inspected.output
