"""The demo shop pages (search by photo, product pages) and catalog images served by id."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

from flask import Blueprint, current_app, render_template, request, send_file
from werkzeug.exceptions import NotFound

from webapp import service
from webapp.inputs import BadInput, uploaded_image

log = logging.getLogger(__name__)
pages = Blueprint("pages", __name__)

#: Uploads up to this size are shown back on the results page (as a data: URL).
PREVIEW_LIMIT_BYTES = 2_000_000

#: Leading bytes -> MIME type of the formats every browser shows; only these are echoed back.
_SIGNATURES = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def browser_image_type(data: bytes) -> str | None:
    """The MIME type of encoded image bytes a browser can show, from their signature (no decoding)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for signature, mimetype in _SIGNATURES:
        if data.startswith(signature):
            return mimetype
    return None


def sample_cards(count: int) -> list[dict]:
    """``count`` catalog items spread evenly over the catalog (which is grouped by class)."""
    rows = service.engine().rows
    if count <= 0 or not rows:
        return []
    step = max(1, len(rows) // count)
    return [service.card(row) for row in rows[::step][:count]]


def render_home(error: str | None = None, result: dict | None = None) -> str:
    """The demo page: the search form, then either results or a sample of the catalog.

    Args:
        error: a message to show above the form (a failed search).
        result: a search's ``{"heads", "cards", "preview"}``.
    """
    engine = service.engine()
    config = current_app.config["WEB"]
    return render_template(
        "index.html",
        error=error,
        result=result,
        samples=[] if result else sample_cards(config.sample_items),
        item_count=len(engine.rows),
        max_upload_mb=config.max_upload_mb,
    )


@pages.get("/")
def home():
    """``GET /``: the demo page."""
    return render_home()


@pages.post("/")
def search():
    """``POST /``: the demo page's form post (field ``image``); renders the results page.

    Errors (no file, not an image, too large) show the form again with the reason.
    """
    data = uploaded_image()
    chosen = request.files.get("image")
    if not data and (chosen is None or not chosen.filename):
        # A browser sends an empty, nameless file part when nothing was chosen.
        raise BadInput("Choose a photo first.", "missing_image")
    engine = service.engine()
    answer = engine.query(data, current_app.config["WEB"].default_k)
    mimetype = browser_image_type(data) if len(data) <= PREVIEW_LIMIT_BYTES else None
    preview = f"data:{mimetype};base64,{base64.b64encode(data).decode('ascii')}" if mimetype else None
    result = {
        "heads": service.predicted_heads(answer["predicted"]),
        "cards": service.neighbor_cards(answer["neighbors"]),
        "preview": preview,
    }
    return render_home(result=result)


@pages.get("/items/<path:item_id>")
def item_page(item_id: str):
    """``GET /items/<id>``: a product and its similar items."""
    row = service.catalog_row(item_id)
    similar = service.similar_to_item(item_id, current_app.config["WEB"].default_k)
    return render_template(
        "item.html",
        item=service.card(row),
        extra={key: value for key, value in (row.get("extra") or {}).items() if key != "title" and value},
        label_columns=service.engine().label_columns,
        cards=service.neighbor_cards(similar["neighbors"]),
    )


@pages.get("/catalog/<path:item_id>/image")
def catalog_image(item_id: str):
    """``GET /catalog/<id>/image``: a catalog item's photo, by id only.

    The file is the one the served bundle's catalog row names; nothing from the request ever
    becomes part of a file path. The row's content hash is the ETag, so a browser revalidates
    with ``If-None-Match`` and gets 304 while the photo is unchanged.
    """
    row = service.catalog_row(item_id)
    path = Path(row["path"])
    if not path.is_file():
        log.warning("the photo of catalog item %r is missing: %s", item_id, path)
        raise NotFound(f"the photo of item {item_id!r} is not available")
    return send_file(path, etag=row["sha256"], max_age=current_app.config["WEB"].image_max_age_s, conditional=True)
