"""Reading what a request sends: ``k``, attribute filters, and the uploaded image bytes (never decoded here)."""

from __future__ import annotations

import re

from flask import request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from recommender.engine import MAX_K
from recommender.errors import FilterError
from recommender.filters import parse_filters

#: Raw-body content types taken as an encoded image (the engine decides whether it is one).
RAW_IMAGE_TYPES = ("application/octet-stream",)

#: Between column and value in a ``filter`` parameter: ``?filter=colour:red``.
FILTER_SEPARATOR = ":"

_WHOLE_NUMBER = re.compile(r"[0-9]{1,6}")


class BadInput(HTTPException):
    """A request the web layer refuses before the engine sees it; carries an error code.

    Args:
        message: what is wrong, for the client.
        code_name: the machine-readable ``error.code``.
        status: the HTTP status (400 unless told).
    """

    def __init__(self, message: str, code_name: str, status: int = 400):
        super().__init__(description=message)
        self.code = status
        self.code_name = code_name


def parse_k(raw: str | None, default: int) -> int:
    """Parses ``k`` from a query string or form: a whole number 1..100.

    Args:
        raw: the parameter as sent, or None when absent.
        default: the value when absent.

    Returns:
        k.

    Raises:
        BadInput: not a plain whole number, or outside 1..MAX_K (400, ``invalid_k``).
    """
    if raw is None:
        return default
    # Strict on purpose: int() would also take " 6", "+6", "6_0" and non-ASCII digits.
    if not _WHOLE_NUMBER.fullmatch(raw) or not 1 <= int(raw) <= MAX_K:
        raise BadInput(f"k must be a whole number from 1 to {MAX_K}, got {raw[:20]!r}", "invalid_k")
    return int(raw)


class InvalidFilter(BadInput):
    """400 for a malformed filter, or one the served bundle cannot apply (``invalid_filter``)."""

    def __init__(self, message: str):
        super().__init__(message, "invalid_filter")


def parse_filter_args(items: list[str]) -> dict[str, list[str]]:
    """Reads repeated ``filter=column:value`` parameters into ``{column: [values]}``.

    Only the form is checked here; whether the bundle has the column and the value is the
    engine's call.

    Raises:
        InvalidFilter: an item without ``:``, or with an empty column or value (400).
    """
    try:
        return parse_filters(items, FILTER_SEPARATOR)
    except FilterError as error:
        raise InvalidFilter(str(error)) from None


def request_filters() -> tuple[dict[str, list[str]], list[str]]:
    """The ``filter`` and ``match_predicted`` parameters of the current request.

    Both are repeatable and are read from the query string and, for a multipart body, from
    its form fields too (the two are merged).

    Returns:
        ``({column: [values]}, [label columns])``; both empty when none were sent.

    Raises:
        InvalidFilter: a malformed filter, or an empty ``match_predicted`` (400).
    """
    filters = request.args.getlist("filter")
    match_predicted = request.args.getlist("match_predicted")
    if request.mimetype == "multipart/form-data":
        filters += request.form.getlist("filter")
        match_predicted += request.form.getlist("match_predicted")
    columns = [column.strip() for column in match_predicted]
    if not all(columns):
        raise InvalidFilter("match_predicted needs a label column name, e.g. match_predicted=colour")
    return parse_filter_args(filters), list(dict.fromkeys(columns))


def uploaded_image() -> bytes:
    """The encoded image of the current request: multipart field ``image``, or the raw body.

    Returns:
        The bytes as sent (possibly empty: the engine reports a zero-byte image).

    Raises:
        BadInput: a form without an ``image`` file (400, ``missing_image``), or a body of a type
            that cannot be an image, such as JSON or a urlencoded form (415).
        RequestEntityTooLarge: the body is above the upload limit (413, from Werkzeug).
    """
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        upload = request.files.get("image")
        if upload is None:
            raise BadInput("send the photo as a file in the multipart field 'image'", "missing_image")
        return upload.read()
    if mimetype == "" or mimetype.startswith("image/") or mimetype in RAW_IMAGE_TYPES:
        return _raw_body()
    raise BadInput(
        f"unsupported content type {mimetype!r}: send multipart/form-data with a file field 'image', "
        "or the raw image with Content-Type image/* or application/octet-stream",
        "unsupported_media_type",
        status=415,
    )


def _raw_body() -> bytes:
    """The request body, refusing one above the upload limit even when it has no Content-Length.

    Werkzeug raises 413 up front when Content-Length is too large, but a chunked body is
    only cut off at the limit, silently; one more byte from the server's own stream tells a
    body that ends exactly at the limit from one that goes on.
    """
    data = request.get_data(cache=False)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(data) >= limit:
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    return data
