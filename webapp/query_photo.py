"""The searched photo, carried in the results page's form so narrowing needs no server-side state.

The results page is one form; each attribute value is a submit button of it. A click posts
the photo back with the filters, so whichever worker gets the request can answer, and
nothing is kept per user. A small upload travels as sent. A larger one travels as the pixels
the model sees: the output of ``load_image`` (the one preprocessing function) as a lossless
PNG of ``input_size`` pixels a side, which ``load_image`` reads back unchanged (checked each
time; where it did not, the upload would travel as sent). So a narrowed search embeds exactly
the pixels of the first one, and a 5 MB phone photo costs about 100 kB of base64 at 224 px
where it would cost 6.7 MB, twice in the page (preview and field) and again in every click.
The photo's sha256 travels with it, so a catalog photo stays out of its own neighbours.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from recommender.images import ImageBytes, load_image, read_image_bytes
from webapp.inputs import BadInput

#: Uploads up to this size travel as sent; larger ones as the model's input pixels (PNG).
CARRY_AS_SENT_UP_TO_BYTES = 256_000

#: Form fields of the carried photo.
IMAGE_FIELD = "query_image"
HASH_FIELD = "query_sha256"

#: Leading bytes -> MIME type of the formats every browser shows; only these are echoed back.
_SIGNATURES = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)

_SHA256 = re.compile(r"[0-9a-f]{64}")


def browser_image_type(data: bytes) -> str | None:
    """The MIME type of encoded image bytes a browser can show, from their signature (no decoding)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for signature, mimetype in _SIGNATURES:
        if data.startswith(signature):
            return mimetype
    return None


@dataclass(frozen=True)
class QueryPhoto:
    """The photo a results page searches with, as it travels in the page's form.

    Attributes:
        data: encoded image bytes: the upload as sent, or a PNG of the model's input pixels.
        sha256: content hash of the photo *as uploaded* (decides self-exclusion, as in the API).
    """

    data: bytes
    sha256: str

    @classmethod
    def from_upload(cls, data: bytes, input_size: int, max_pixels: int) -> QueryPhoto:
        """The photo to search with and carry, from an upload.

        Args:
            data: the uploaded bytes.
            input_size: the served backbone's input side in pixels.
            max_pixels: the served bundle's decompression-bomb limit.

        Raises:
            InvalidImageError: empty, not an image, truncated, or too many pixels (400).
        """
        raw = read_image_bytes(data)
        if len(raw.data) <= CARRY_AS_SENT_UP_TO_BYTES:
            return cls(raw.data, raw.sha256)
        pixels = load_image(raw, input_size, max_pixels=max_pixels)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        compact = buffer.getvalue()
        if len(compact) < len(raw.data) and np.array_equal(
            load_image(compact, input_size, max_pixels=max_pixels), pixels
        ):
            return cls(compact, raw.sha256)
        return cls(raw.data, raw.sha256)

    @classmethod
    def from_form(cls, form: Mapping[str, str]) -> QueryPhoto | None:
        """The photo a results page's form carried back, or None when the form has none.

        The hash comes from the client like the photo itself: it only decides which catalog
        photos count as this photo and are left out, so a client can change nothing but its
        own results with it.

        Raises:
            BadInput: the carried fields are damaged (400, ``invalid_form``).
        """
        encoded = form.get(IMAGE_FIELD)
        if encoded is None:
            return None
        sha256 = form.get(HASH_FIELD, "")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if not data or not _SHA256.fullmatch(sha256):
            raise BadInput("the photo in the search form is damaged; please upload it again", "invalid_form")
        return cls(data, sha256)

    def image_bytes(self) -> ImageBytes:
        """What the engine takes: the bytes with the upload's hash."""
        return ImageBytes(data=self.data, sha256=self.sha256)

    def form_fields(self) -> dict[str, str]:
        """The hidden form fields that carry this photo."""
        return {IMAGE_FIELD: base64.b64encode(self.data).decode("ascii"), HASH_FIELD: self.sha256}

    def preview_url(self) -> str | None:
        """A ``data:`` URL showing the photo, or None for a format browsers do not show."""
        mimetype = browser_image_type(self.data)
        return f"data:{mimetype};base64,{base64.b64encode(self.data).decode('ascii')}" if mimetype else None
