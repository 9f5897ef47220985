"""The one preprocessing function: every awkward image kind loads, every bad one is refused."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from conftest import BAD_IMAGES, GOOD_IMAGES
from PIL import Image

from recommender.errors import InvalidImageError
from recommender.images import (
    content_hash,
    decode_image,
    fit_square,
    load_image,
    load_image_with_hash,
    read_image_bytes,
)


@pytest.mark.parametrize("name", GOOD_IMAGES)
def test_good_images_load_as_square_rgb_uint8(image_files, name):
    array = load_image(image_files[name], 48)
    assert array.shape == (48, 48, 3)
    assert array.dtype == np.uint8


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_images_raise_invalid_image_error(image_files, name):
    with pytest.raises(InvalidImageError):
        load_image(image_files[name], 48)


def test_error_messages_say_what_is_wrong(image_files, tmp_path):
    cases = {
        "zero_bytes": "empty",
        "truncated_jpeg": "truncated",
        "text_file": "not an image",
        "huge_png": "too large",
    }
    for name, words in cases.items():
        with pytest.raises(InvalidImageError, match=words):
            load_image(image_files[name], 32)
    with pytest.raises(InvalidImageError, match="not found"):
        load_image(tmp_path / "missing.jpg", 32)
    with pytest.raises(InvalidImageError, match="directory"):
        load_image(tmp_path, 32)


def test_pixel_limit_is_configurable(image_files):
    with pytest.raises(InvalidImageError, match="too large"):
        load_image(image_files["rgb_jpeg"], 32, max_pixels=80 * 60 - 1)
    assert load_image(image_files["rgb_jpeg"], 32, max_pixels=80 * 60).shape == (32, 32, 3)


def test_images_decoded_at_full_size_have_a_lower_limit_than_jpegs(image_files):
    """A JPEG decodes at a reduced scale, a PNG only at full size: the PNG's limit is 30% (bounded decode time)."""
    from recommender.images import full_decode_limit

    limit = 80 * 60  # the JPEG's pixels: allowed; a full-size decode may have 30% of it, 1,440
    assert full_decode_limit(limit) == 1440
    assert load_image(image_files["rgb_jpeg"], 32, max_pixels=limit).shape == (32, 32, 3)
    with pytest.raises(InvalidImageError, match=r"a PNG image is decoded at full size, limit 1,440 pixels"):
        load_image(image_files["rgba_png"], 32, max_pixels=limit)  # 40x40 = 1,600
    assert load_image(image_files["rgba_png"], 32, max_pixels=40 * 40 * 10 // 3 + 1).shape == (32, 32, 3)


def test_letterbox_keeps_whole_image_and_pads_white(image_files):
    # 80x60 blue: scaled to 64x48, padded with 8 white rows above and below.
    array = load_image(image_files["rgb_jpeg"], 64)
    assert (array[:7] == 255).all() and (array[-7:] == 255).all()
    centre = array[20:44, 5:59].reshape(-1, 3).mean(axis=0)
    assert np.allclose(centre, (30, 120, 200), atol=6)


def test_alpha_is_composited_on_white(image_files):
    array = load_image(image_files["rgba_png"], 40)
    assert (array[:, :18] == 255).all()  # transparent half -> white
    assert np.allclose(array[:, 24:].reshape(-1, 3).mean(axis=0), (0, 0, 255), atol=2)
    assert (load_image(image_files["la_png"], 30) == 255).all()  # fully transparent -> white
    palette = load_image(image_files["palette_png"], 30)
    assert (palette[:, :13] == 255).all()
    assert np.allclose(palette[:, 17:].reshape(-1, 3).mean(axis=0), (0, 200, 0), atol=2)


def test_cmyk_becomes_rgb(image_files):
    array = load_image(image_files["cmyk_jpeg"], 50)
    red, green, blue = array.reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60


def test_16_bit_is_scaled_not_clipped(image_files):
    array = load_image(image_files["grey16_png"], 20)
    assert np.allclose(array, 127, atol=1)  # 32767 / 65535 of full scale


def test_exif_orientation_is_applied(image_files):
    array = load_image(image_files["exif_rotated"], 40)
    # Upright the image is 20 wide x 40 tall: white padding left and right, red on top.
    assert (array[:, :8] == 255).all() and (array[:, -8:] == 255).all()
    top = array[2:18, 14:26].reshape(-1, 3).mean(axis=0)
    bottom = array[22:38, 14:26].reshape(-1, 3).mean(axis=0)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_same_result_from_path_bytes_and_file_object(image_files):
    path = image_files["webp"]
    from_path = load_image(path, 24)
    from_bytes = load_image(path.read_bytes(), 24)
    with open(path, "rb") as handle:
        from_file = load_image(handle, 24)
    assert np.array_equal(from_path, from_bytes) and np.array_equal(from_path, from_file)


def test_hash_is_of_the_encoded_bytes(image_files):
    path = image_files["rgb_jpeg"]
    array, digest = load_image_with_hash(path, 16)
    assert digest == content_hash(path.read_bytes()) == read_image_bytes(path).sha256
    assert array.shape == (16, 16, 3)


def test_large_jpeg_is_decoded_at_reduced_scale_to_the_same_picture(tmp_path):
    # Draft decoding (JPEG DCT scaling) must give the picture a full decode gives.
    gradient = np.linspace(0, 255, 2000, dtype=np.uint8)
    big = np.stack(
        [np.tile(gradient, (1500, 1)), np.tile(gradient[::-1], (1500, 1)), np.full((1500, 2000), 90, np.uint8)], axis=-1
    )
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=95)
    small = load_image(path, 64)
    reference = np.asarray(Image.fromarray(big).resize((64, 48), Image.Resampling.BILINEAR))
    assert np.abs(small[8:56].astype(int) - reference.astype(int)).mean() < 4


def _encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@functools.cache
def _large_images() -> dict[str, bytes]:
    """Non-RGB images large enough to be reduced in bands at 64 px (odd sizes: partial blocks).

    641 px wide at 64 px is a reduction factor of 3, 901 rows are four bands (the last partial).
    """
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (901, 641, 4), dtype=np.uint8)
    palette = Image.fromarray(pixels[..., :3]).quantize(64)
    return {
        "rgba": _encoded(Image.fromarray(pixels)),
        "la": _encoded(Image.fromarray(pixels[..., [0, 3]], "LA")),
        "l": _encoded(Image.fromarray(pixels[..., 0])),
        "palette_transparent": _encoded(palette, transparency=5),
        "cmyk_jpeg": _encoded(Image.fromarray(pixels, "CMYK"), "JPEG"),
        "portrait_rgba": _encoded(Image.fromarray(np.ascontiguousarray(pixels[:, :199]))),
    }


@pytest.mark.parametrize("name", ["rgba", "la", "l", "palette_transparent", "cmyk_jpeg", "portrait_rgba"])
def test_banded_conversion_gives_the_pixels_of_a_full_size_conversion(name, size=64):
    # load_image converts and reduces large images a band of rows at a time (bounded memory);
    # the pixels must be those of converting the whole image to RGB, then letterboxing it.
    data = _large_images()[name]
    whole = fit_square(decode_image(data, draft_size=size), size)
    assert np.array_equal(load_image(data, size), whole)


def test_large_16_bit_image_is_reduced_before_scaling_and_keeps_the_full_images_peak():
    # A 16-bit image is box-reduced in its own mode first (no float64 copy of the full image).
    # Its scaling still comes from the full image: one bright pixel makes it 16-bit data.
    ramp = np.tile(np.linspace(0, 250, 1800), (1400, 1))
    values = ramp.astype(np.uint16)
    values[0, 0] = 60000
    array = load_image(_encoded(Image.fromarray(values)), 64)
    assert array.shape == (64, 64, 3) and array[7:57].max() <= 2  # 250 / 65535 of full scale: near black

    smooth = (ramp * 250).astype(np.uint16)  # 0..62500
    reference = np.asarray(
        Image.fromarray(np.round(smooth / 65535 * 255).astype(np.uint8)).resize((64, 50), Image.Resampling.BILINEAR)
    )
    reduced = load_image(_encoded(Image.fromarray(smooth)), 64)[7:57, :, 0]
    assert np.abs(reduced.astype(int) - reference.astype(int)).max() <= 2
