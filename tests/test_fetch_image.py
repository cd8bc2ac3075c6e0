"""process_image: robustness on real-world oddities, orientation, colour, resize modes, determinism."""

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from curate.fetch.config import EncodeParams, ResizeParams
from curate.fetch.image import ImageError, process_image

WEIRD = Path(__file__).parent / "data" / "weird-images"
WEIRD_FILES = sorted(p.name for p in WEIRD.iterdir() if p.suffix not in (".txt", ".tsv"))
MAX_PIXELS = 89_478_485
# Files that must be rejected, with the reason (see weird-images/SOURCE.txt).
EXPECTED_FAILURES = {
    "avif_hopper.heif": "not_image",
    "broken.png": "not_image",
    "decompression_bomb.gif": "decompression_bomb",
    "bmp_reallybig.bmp": "decompression_bomb",
    "png_decompression_dos.png": "decompression_bomb",
    "truncated_jpeg.jpg": "corrupt",
    "truncated_image.png": "corrupt",
    "truncated_end_chunk.png": "corrupt",
    "broken_data_stream.png": "corrupt",
    "bmp_shortfile.bmp": "corrupt",
    "ultrahdr.jpg": "corrupt",
}


def weird(name):
    return (WEIRD / name).read_bytes()


def process(data, encode="png", max_pixels=MAX_PIXELS, **resize):
    return process_image(data, ResizeParams(**resize), EncodeParams(format=encode), max_pixels)


def decoded(result):
    image = Image.open(io.BytesIO(result.data))
    image.load()
    return image


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def encoded(image, fmt="PNG", **save):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def noise_image(width=64, height=48, mode="RGB"):
    rng = np.random.default_rng(7)
    channels = len(mode)
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode)


def test_weird_folder_is_complete():
    assert len(WEIRD_FILES) == 56
    assert (WEIRD / "SOURCE.txt").exists() and (WEIRD / "manifest.tsv").exists()


@pytest.mark.parametrize("name", WEIRD_FILES)
def test_weird_images(name):
    data = weird(name)
    if name in EXPECTED_FAILURES:
        with pytest.raises(ImageError) as info:
            process(data, size=256)
        assert info.value.reason == EXPECTED_FAILURES[name]
        assert info.value.detail
        return
    result = process(data, size=256, encode="jpg")
    image = decoded(result)
    assert image.format == "JPEG" and image.mode == "RGB"
    assert image.size == (result.width, result.height)
    assert max(result.width, result.height) <= 256
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.original_num_bytes == len(data)
    assert result.num_bytes == len(result.data)
    assert result.original_format


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_applied(orientation):
    reference = pixels(Image.open(WEIRD / "hopper.webp"))
    data = weird(f"hopper_orientation_{orientation}.jpg")
    upright = pixels(decoded(process(data, mode="none")))
    as_stored = pixels(Image.open(io.BytesIO(data)))
    assert np.abs(upright - reference).mean() < 10
    assert np.abs(as_stored - reference).mean() > 30


def test_webp_exif_orientation_is_applied():
    reference = pixels(Image.open(WEIRD / "hopper.webp"))
    upright = pixels(decoded(process(weird("hopper_orientation_6.webp"), mode="none")))
    assert np.abs(upright - reference).mean() < 10


def test_orientation_swaps_width_and_height():
    result = process(weird("orientation_rectangle.jpg"), mode="none")
    assert (result.width, result.height) == (1, 2)
    assert (result.original_width, result.original_height) == (1, 2)
    assert decoded(result).size == (1, 2)


def test_original_size_is_as_displayed_after_resize():
    photo = noise_image(200, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    result = process(encoded(photo, "JPEG", exif=exif.tobytes()), size=50)
    assert (result.original_width, result.original_height) == (100, 200)
    assert (result.width, result.height) == (25, 50)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_exif_does_not_crash():
    data = encoded(noise_image(), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\x01\x12")
    result = process(data, mode="none")
    assert (result.width, result.height) == (64, 48)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("truncated_jpeg.jpg", "corrupt"),
        ("broken.png", "not_image"),
        ("png_decompression_dos.png", "decompression_bomb"),
    ],
)
def test_broken_inputs(name, reason):
    with pytest.raises(ImageError) as info:
        process(weird(name))
    assert info.value.reason == reason


def test_max_pixels_is_checked_before_decoding():
    with pytest.raises(ImageError) as info:
        process(weird("hopper.webp"), max_pixels=128 * 128 - 1)
    assert info.value.reason == "decompression_bomb"
    assert process(weird("hopper.webp"), max_pixels=128 * 128).width == 128


@pytest.mark.parametrize("data", [b"", b"<html><body>hello</body></html>", b"\x89PNG\r\n\x1a\n"])
def test_not_an_image(data):
    with pytest.raises(ImageError) as info:
        process(data)
    assert info.value.reason in ("not_image", "corrupt")


def test_formats_outside_the_web_set_are_refused():
    with pytest.raises(ImageError) as info:
        process(encoded(noise_image(), "PPM"))
    assert info.value.reason == "not_image"


@pytest.mark.parametrize(
    ("resize", "size"),
    [
        (dict(mode="keep_ratio", side="longest", size=32), (32, 24)),
        (dict(mode="keep_ratio", side="shortest", size=24), (32, 24)),
        (dict(mode="keep_ratio", side="longest", size=128), (64, 48)),
        (dict(mode="keep_ratio", side="longest", size=128, only_if_bigger=False), (128, 96)),
        (dict(mode="keep_ratio", side="shortest", size=96, only_if_bigger=False), (128, 96)),
        (dict(mode="keep_ratio", side="shortest", size=48), (64, 48)),
        (dict(mode="center_crop", size=32), (32, 32)),
        (dict(mode="center_crop", size=128), (48, 48)),
        (dict(mode="center_crop", size=128, only_if_bigger=False), (128, 128)),
        (dict(mode="border", size=32), (32, 32)),
        (dict(mode="border", size=128), (64, 64)),
        (dict(mode="border", size=128, only_if_bigger=False), (128, 128)),
        (dict(mode="none", size=8), (64, 48)),
    ],
)
def test_resize_modes(resize, size):
    result = process(encoded(noise_image()), **resize)
    assert (result.width, result.height) == size
    assert decoded(result).size == size
    assert (result.original_width, result.original_height) == (64, 48)


def test_border_pads_with_border_color():
    image = Image.new("RGB", (64, 32), (0, 0, 255))
    result = process(encoded(image), mode="border", size=32, border_color=(255, 0, 0))
    out = decoded(result)
    assert out.size == (32, 32)
    assert out.getpixel((16, 0)) == (255, 0, 0)
    assert out.getpixel((16, 31)) == (255, 0, 0)
    assert out.getpixel((16, 16)) == (0, 0, 255)


def test_center_crop_keeps_the_center():
    image = Image.new("RGB", (96, 32), (255, 0, 0))
    image.paste((0, 255, 0), (32, 0, 64, 32))
    out = decoded(process(encoded(image), mode="center_crop", size=32))
    assert out.size == (32, 32)
    assert out.getpixel((0, 0)) == out.getpixel((31, 31)) == (0, 255, 0)


def test_large_jpeg_is_resized_exactly():
    result = process(encoded(noise_image(1000, 600), "JPEG"), size=100, encode="jpg")
    assert (result.width, result.height) == (100, 60)
    assert (result.original_width, result.original_height) == (1000, 600)


@pytest.mark.parametrize("encode", ["jpg", "webp", "png"])
def test_output_is_deterministic(encode):
    data = weird("flower2.webp")
    first = process(data, size=64, encode=encode)
    second = process(data, size=64, encode=encode)
    assert first.data == second.data
    assert first.format == encode
    assert decoded(first).format == {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}[encode]


def test_sixteen_bit_png_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    source = Image.fromarray(ramp)
    assert source.mode == "I;16"
    data = encoded(source)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    values = pixels(decoded(process(data, mode="none")))[:, :, 0]
    assert 100 < values.mean() < 155
    assert values.min() < 5 and values.max() > 250
    assert len(np.unique(values)) > 32


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (0, 0, 10, 10))
    out = decoded(process(encoded(image), mode="none"))
    assert out.mode == "RGB"
    assert out.getpixel((15, 5)) == (255, 255, 255)
    assert out.getpixel((5, 5)) == (0, 0, 0)


def test_palette_transparency_is_composited_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 200, 0, 0])
    image.info["transparency"] = 0
    out = decoded(process(encoded(image, transparency=0), mode="none"))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red ink
    out = decoded(process(encoded(cmyk, "JPEG", quality=95), mode="none"))
    red, green, blue = pixels(out).mean(axis=(0, 1))
    assert red > 200 and green < 60 and blue < 60


def test_icc_profile_is_converted_to_srgb():
    data = weird("icc_profile_big.jpg")
    source = Image.open(io.BytesIO(data))
    source.load()
    expected = ImageCms.profileToProfile(
        source, ImageCms.ImageCmsProfile(io.BytesIO(source.info["icc_profile"])), ImageCms.createProfile("sRGB")
    )
    out = pixels(decoded(process(data, mode="none")))
    assert np.abs(out - pixels(expected)).mean() < 0.5
    assert np.abs(out - pixels(source)).mean() > 3.0


def test_broken_icc_profile_is_ignored():
    image = noise_image()
    result = process(encoded(image, icc_profile=b"not a profile"), mode="none")
    assert np.array_equal(pixels(decoded(result)), pixels(image))


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    result = process(buffer.getvalue(), mode="none")
    assert result.original_format == "GIF"
    red, green, blue = pixels(decoded(result)).mean(axis=(0, 1))
    assert red > 200 and blue < 60


def test_original_format_is_reported():
    assert process(weird("sugarshack.mpo"), size=64).original_format == "MPO"
    assert process(weird("hopper.webp"), size=64).original_format == "WEBP"


def test_unexpected_errors_become_corrupt(monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(Image.Image, "save", explode)
    with pytest.raises(ImageError) as info:
        process(weird("hopper.webp"))
    assert info.value.reason == "corrupt"
    assert "encoder exploded" in info.value.detail


# -- colour management shortcuts and the decode threads ----------------------------------------------

PHOTOS = Path(__file__).parent / "data" / "captioned-images" / "images"


def without_profile(data):
    image = Image.open(io.BytesIO(data))
    image.load()
    image.info.pop("icc_profile")
    return encoded(image, image.format)


def test_srgb_profile_within_a_level_keeps_the_decoded_pixels():
    data = weird("icc_profile.png")  # carries the common "sRGB IEC61966-2.1" profile
    profile = ImageCms.ImageCmsProfile(io.BytesIO(Image.open(io.BytesIO(data)).info["icc_profile"]))
    assert "sRGB" in ImageCms.getProfileDescription(profile)
    with_icc, stripped = process(data, mode="none"), process(without_profile(data), mode="none")
    assert with_icc.pixel_sha256 == stripped.pixel_sha256
    assert with_icc.phash == stripped.phash
    assert np.array_equal(pixels(decoded(with_icc)), pixels(decoded(stripped)))


def test_other_profiles_are_converted_exactly_as_littlecms_does():
    data = (PHOTOS / "000000385580.jpg").read_bytes()  # a real photo with a "Camera RGB Profile"
    source = Image.open(io.BytesIO(data))
    source.load()
    expected = ImageCms.profileToProfile(source, ImageCms.ImageCmsProfile(io.BytesIO(source.info["icc_profile"])),
                                         ImageCms.createProfile("sRGB"), outputMode="RGB")
    first, again = process(data, mode="none"), process(data, mode="none")  # the second use hits the cache
    assert np.array_equal(pixels(decoded(first)), pixels(expected))
    assert first.data == again.data
    assert np.abs(pixels(expected) - pixels(source)).mean() > 1.0
    assert first.pixel_sha256 != process(without_profile(data), mode="none").pixel_sha256


def test_broken_profile_is_cached_as_unusable_and_ignored():
    image = noise_image()
    data = encoded(image, icc_profile=b"still not a profile")
    for _ in range(2):
        assert np.array_equal(pixels(decoded(process(data, mode="none"))), pixels(image))


def test_many_calling_threads_get_the_same_results_as_one():
    from concurrent.futures import ThreadPoolExecutor

    datas = [p.read_bytes() for p in sorted(PHOTOS.iterdir())] + [weird("icc_profile_big.jpg")] * 2
    alone = [process(d, size=96, encode="jpg") for d in datas]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda d: process(d, size=96, encode="jpg"), datas * 4))
    assert [(r.data, r.pixel_sha256, r.phash) for r in together] == [(r.data, r.pixel_sha256, r.phash)
                                                                     for r in alone * 4]


def test_a_call_from_a_decode_thread_runs_inline():
    import threading

    from curate.fetch import image as module

    data = weird("hopper.webp")
    pool = module._decoder_pool()
    everyone_busy = threading.Barrier(pool._max_workers)

    def nested():
        everyone_busy.wait(timeout=30)  # every decode thread is taken: a queued call would never run
        return process(data, size=64).width

    calls = [pool.submit(nested) for _ in range(pool._max_workers)]
    assert [call.result(timeout=30) for call in calls] == [64] * pool._max_workers


def test_fingerprints_off_leaves_hashes_empty_and_changes_nothing_else():
    photo = sorted((Path(__file__).parent / "data" / "captioned-images").rglob("*.jpg"))[0]
    data = photo.read_bytes()
    resize, encode = ResizeParams(mode="keep_ratio", size=256), EncodeParams(format="jpg", quality=90)
    with_hashes = process_image(data, resize, encode, MAX_PIXELS)
    without = process_image(data, resize, encode, MAX_PIXELS, fingerprints=False)
    assert with_hashes.pixel_sha256 is not None and with_hashes.phash is not None
    assert without.pixel_sha256 is None and without.phash is None
    assert without.data == with_hashes.data and without.sha256 == with_hashes.sha256
