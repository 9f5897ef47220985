"""The one image preprocessing function shared by build, query and the web app.

Every image, whatever its source, goes through :func:`load_image`: decode with Pillow, apply
the EXIF orientation, convert any mode to RGB uint8 (alpha composited on white), then fit it
into a ``size x size`` square *without cropping*: the longer side is scaled to ``size`` and
the shorter side is padded with white, centred ("letterbox"). Product photos are usually
shot on white; padding keeps the whole garment (a crop would cut off sleeves and shoe tips),
and white padding looks like the background the backbone already sees.

Skew between training, indexing and serving is the bug we fear most, so nothing else in the
project decodes or resizes images.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from recommender.errors import InvalidImageError

# A truncated file must be an error, not a silently grey-padded picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Default pixel limit (width x height) above which an image is refused as a decompression bomb.
DEFAULT_MAX_PIXELS = 40_000_000

#: Share of ``max_pixels`` allowed for an image that must be decoded at full size (every format
#: but a JPEG, which decodes at a reduced scale). Measured (bench/decode.py): zlib-compressed
#: formats cost ~13-22 ms per Mpx here whatever is done afterwards, so a 40 Mpx PNG took
#: 0.5-0.9 s; at 30% (12 Mpx by default, a 4000x3000 photo) every upload decodes within 0.3 s.
FULL_DECODE_SHARE = 0.3


def full_decode_limit(max_pixels: int) -> int:
    """Pixels allowed for an image decoded at full size (PNG, WebP, TIFF, GIF...): 30% of ``max_pixels``."""
    return int(max_pixels * FULL_DECODE_SHARE)


#: Fill colour for padding and for compositing transparent pixels.
BACKGROUND = (255, 255, 255)

#: Pillow's ``reducing_gap`` for the letterbox resize: box-reduce by whole factors while the
#: image stays at least 3x the target, then resample bilinearly.
REDUCING_GAP = 3.0

#: Rows converted at a time when a large non-RGB image is reduced in bands (:func:`letterbox`).
BAND_ROWS = 256

#: Greyscale modes deeper than 8 bits: scaled to 8 bits, not clipped.
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO


@dataclass(frozen=True)
class ImageBytes:
    """Raw encoded bytes of one image plus their content hash.

    Attributes:
        data: the encoded file content.
        sha256: hex sha256 of ``data``; the key of the feature store and of self-exclusion.
    """

    data: bytes
    sha256: str


def content_hash(data: bytes) -> str:
    """Returns the hex sha256 of encoded image bytes (the identity of a photo)."""
    return hashlib.sha256(data).hexdigest()


def read_image_bytes(source: ImageSource) -> ImageBytes:
    """Reads encoded image bytes from a path, a bytes object or a binary file object.

    Raises:
        InvalidImageError: the file does not exist, cannot be read, or is empty.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InvalidImageError(f"{path}: file not found") from None
        except IsADirectoryError:
            raise InvalidImageError(f"{path}: is a directory, not an image file") from None
        except OSError as error:
            raise InvalidImageError(f"{path}: cannot read file ({error.strerror})") from None
    else:
        data = source.read()
    if not data:
        raise InvalidImageError("empty file (0 bytes)")
    return ImageBytes(data=data, sha256=content_hash(data))


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decodes encoded bytes into an upright RGB Pillow image at full resolution.

    :func:`load_image` does not use this for large images: it converts and reduces them in
    bands of rows, so a 40 Mpx upload never holds a second full-size copy.

    Args:
        data: encoded image bytes (any format Pillow reads).
        max_pixels: refuse images with more than this many pixels (decompression bombs);
            an image decoded at full size (here: every one, unless a JPEG with ``draft_size``)
            may have :func:`full_decode_limit` of them.
        draft_size: if given, let JPEG decode at a reduced scale no smaller than this
            (much faster for large photos; the result is still resized afterwards).

    Returns:
        An RGB image with EXIF orientation applied and alpha composited on white.

    Raises:
        InvalidImageError: empty, not an image, truncated, or too many pixels.
    """
    return _to_rgb(_open_oriented(data, max_pixels=max_pixels, draft_size=draft_size))


def _open_oriented(data: bytes, *, max_pixels: int, draft_size: int | None) -> Image.Image:
    """Decodes encoded bytes into an upright Pillow image in the file's own mode (RGB, P, I;16, ...)."""
    if not data:
        raise InvalidImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below gives the clear error; Pillow's warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImageError(
                    f"image too large: {width}x{height} = {width * height:,} pixels (limit {max_pixels:,})"
                )
            if width == 0 or height == 0:
                raise InvalidImageError(f"image has no pixels ({width}x{height})")
            reduced = bool(draft_size) and image.format == "JPEG"
            if not reduced and width * height > full_decode_limit(max_pixels):
                raise InvalidImageError(
                    f"image too large: {width}x{height} = {width * height:,} pixels; a {image.format or 'non-JPEG'} "
                    f"image is decoded at full size, limit {full_decode_limit(max_pixels):,} pixels "
                    f"(a JPEG may have up to {max_pixels:,})"
                )
            if reduced:
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            # In place: without an orientation tag, exif_transpose would return a full-size copy.
            ImageOps.exif_transpose(image, in_place=True)
    except InvalidImageError:
        raise
    except UnidentifiedImageError:
        raise InvalidImageError("not an image (format not recognised)") from None
    except Image.DecompressionBombError as error:
        raise InvalidImageError(f"image too large ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated"),
        # SyntaxError (broken PNG chunks) or ValueError.
        raise InvalidImageError(f"corrupt or truncated image ({error})") from None
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB; transparent pixels become white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in HIGH_BIT_DEPTH_MODES:
        return _high_bit_depth_to_rgb(image, _high_bit_depth_peak(image))
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def _high_bit_depth_peak(image: Image.Image) -> float:
    """The value that becomes 255: 65535 if any pixel is above 255 (16-bit data), else 255.

    ``getextrema`` scans the whole image in C without allocating, so a reduced copy gets
    the same scaling as the full image.
    """
    _, highest = image.getextrema()
    return 65535.0 if highest > 255 else 255.0


def _high_bit_depth_to_rgb(image: Image.Image, peak: float) -> Image.Image:
    """Scales 16/32-bit greyscale to 8 bits (``value / peak * 255``, rounded, clipped); Pillow's convert("L") clips."""
    values = np.asarray(image, dtype=np.float64)  # callers pass a reduced image: a few Mpx at most
    grey = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _letterbox_size(width: int, height: int, size: int) -> tuple[int, int]:
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _pad(resized: Image.Image, size: int) -> np.ndarray:
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def fit_square(image: Image.Image, size: int) -> np.ndarray:
    """Scales the longer side to ``size`` and pads the shorter with white, centred.

    Returns:
        (size, size, 3) uint8 array.
    """
    resized = image.resize(_letterbox_size(*image.size, size), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    return _pad(resized, size)


def _reduction_factors(width: int, height: int, new_width: int, new_height: int) -> tuple[int, int]:
    """The box-reduction factors Pillow's ``resize(..., reducing_gap=REDUCING_GAP)`` applies first."""
    return (int(width / new_width / REDUCING_GAP) or 1, int(height / new_height / REDUCING_GAP) or 1)


def letterbox(image: Image.Image, size: int) -> np.ndarray:
    """Converts any mode to RGB and letterboxes it, never holding a second full-size copy.

    The same pixels as ``fit_square(_to_rgb(image), size)``, at bounded cost. ``fit_square``
    box-reduces by whole factors first, then resizes bilinearly. Each output pixel of the
    box reduction depends on its own block of pixels only, so the conversion (alpha on white,
    palette, CMYK, L) and the reduction can run one band of rows at a time: the converted
    full-size image, 120 MB at 40 Mpx (and ~500 MB of intermediate copies for a palette or
    RGBA image), never exists. 16-bit and float images are box-reduced in their own mode
    before scaling to 8 bits (not bit-identical to scaling first, but finer: the average is
    taken over 16-bit values).

    Returns:
        (size, size, 3) uint8 array.
    """
    width, height = image.size
    new_width, new_height = _letterbox_size(width, height, size)
    factor_x, factor_y = _reduction_factors(width, height, new_width, new_height)
    if image.mode == "RGB" or (factor_x == 1 and factor_y == 1):
        return fit_square(_to_rgb(image), size)
    if image.mode in HIGH_BIT_DEPTH_MODES:
        peak = _high_bit_depth_peak(image)
        reduced = image.resize((-(-width // factor_x), -(-height // factor_y)), Image.Resampling.BOX)
        return fit_square(_high_bit_depth_to_rgb(reduced, peak), size)
    reduced = Image.new("RGB", (-(-width // factor_x), -(-height // factor_y)))
    band_rows = max(1, BAND_ROWS // factor_y) * factor_y  # whole blocks only: the bands reduce independently
    for top in range(0, height, band_rows):
        band = _to_rgb(image.crop((0, top, width, min(height, top + band_rows))))
        reduced.paste(band.reduce((factor_x, factor_y)), (0, top // factor_y))
    # As Pillow's resize continues after its own reduction: the same box, in reduced pixels.
    box = (0, 0, width / factor_x, height / factor_y)
    return _pad(reduced.resize((new_width, new_height), Image.Resampling.BILINEAR, box=box), size)


def load_image(source: ImageSource, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Loads one image for the backbone: decode, orient, RGB, letterbox to ``size``.

    Cost is bounded for any image under ``max_pixels``: JPEGs decode at a reduced scale,
    other formats (at most :func:`full_decode_limit` pixels) are converted and reduced in
    bands (:func:`letterbox`).

    Args:
        source: a path, encoded bytes, or a binary file object.
        size: side of the square the backbone takes (e.g. 224).
        max_pixels: decompression-bomb guard, in pixels.

    Returns:
        (size, size, 3) uint8 RGB array.

    Raises:
        InvalidImageError: missing, empty, truncated, not an image, or too many pixels.
    """
    raw = source if isinstance(source, ImageBytes) else read_image_bytes(source)
    return letterbox(_open_oriented(raw.data, max_pixels=max_pixels, draft_size=size), size)


def load_image_with_hash(
    source: ImageSource | ImageBytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, str]:
    """Like :func:`load_image`, also returning the sha256 of the encoded bytes.

    Returns:
        ``((size, size, 3) uint8 array, hex sha256)``.
    """
    raw = source if isinstance(source, ImageBytes) else read_image_bytes(source)
    return load_image(raw, size, max_pixels=max_pixels), raw.sha256


def decoded_batches(items: Sequence, batch_size: int, decode: Callable, workers: int) -> Iterator[tuple[list, list]]:
    """Yields ``(batch, [decode(item) for item in batch])``, decoding the next batch meanwhile.

    Decoding (Pillow, which releases the GIL) runs on a pool of ``workers`` threads one batch
    ahead of the caller, so the backbone or the classifier never waits for the disk. ``decode``
    should return an error value rather than raise for a bad item, so one bad photo does not
    end the batch.
    """
    batches = [list(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = pool.map(decode, batches[0])
        for index, batch in enumerate(batches):
            decoded = list(pending)
            if index + 1 < len(batches):
                pending = pool.map(decode, batches[index + 1])
            yield batch, decoded
