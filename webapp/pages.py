"""The demo shop pages (search by photo, product pages) and catalog images served by id."""

from __future__ import annotations

import logging
from pathlib import Path

from flask import Blueprint, current_app, render_template, request, send_file, url_for
from werkzeug.exceptions import NotFound

from webapp import attributes, service
from webapp.inputs import BadInput, parse_filter_args, uploaded_image
from webapp.query_photo import QueryPhoto

log = logging.getLogger(__name__)
pages = Blueprint("pages", __name__)

#: A carried photo is shown back (as a data: URL) up to this size.
PREVIEW_LIMIT_BYTES = 2_000_000

#: Room left in a re-post for everything but the carried photo (filters, multipart framing).
FORM_OVERHEAD_BYTES = 8_000


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
        result: a search's ``{"heads", "attributes", "active", "filters", "tags_column",
            "filter", "cards", "preview", "carry"}`` (see :func:`search`).
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


def _next_filters(form) -> dict[str, list[str]]:
    """The filters a results-page click asks for: those in force (hidden ``filter`` fields),
    then the clicked button: ``toggle=column:value``, ``remove=column:value`` or ``clear``."""
    active = parse_filter_args(form.getlist("filter"))
    if form.get("clear"):
        return {}
    if form.get("remove"):
        active = attributes.without(active, *attributes.split_token(form["remove"]))
    if form.get("toggle"):
        active = attributes.toggled(active, *attributes.split_token(form["toggle"]))
    return active


@pages.get("/")
def home():
    """``GET /``: the demo page."""
    return render_home()


@pages.post("/")
def search():
    """``POST /``: the demo page's form posts; renders the results page.

    Two forms post here. The upload form sends the file field ``image`` (a new search, no
    filters). The results page's own form re-sends the photo it searched with (hidden fields
    ``query_image``, ``query_sha256``: see :mod:`webapp.query_photo`), the filters in force
    (hidden, repeated ``filter=column:value``) and the button clicked: ``toggle=column:value``
    (an attribute value), ``remove=column:value`` (an active filter) or ``clear``. Nothing is
    kept on the server between the two, so any worker answers any click.

    Errors (no file, not an image, too large, a damaged form, an unknown filter) show the
    form again with the reason.
    """
    engine = service.engine()
    config = current_app.config["WEB"]
    multipart = request.mimetype == "multipart/form-data"
    chosen = request.files.get("image")
    # A browser sends an empty, nameless file part when nothing was chosen.
    picked = chosen is not None and bool(chosen.filename)
    carried = QueryPhoto.from_form(request.form) if multipart and not picked else None
    if carried is not None:
        photo, active = carried, _next_filters(request.form)
    else:
        data = uploaded_image() if chosen is not None or not multipart else b""
        if not data and not picked:
            raise BadInput("Choose a photo first.", "missing_image")
        photo, active = QueryPhoto.from_upload(data, engine.backbone.input_size, engine.max_pixels), {}
    answer = service.query(photo.image_bytes(), config.default_k, filters=active)
    fields = photo.form_fields()
    # A photo that could not travel back within the upload limit is shown without buttons.
    refinable = len(fields["query_image"]) + FORM_OVERHEAD_BYTES <= config.max_upload_bytes
    result = {
        "heads": service.predicted_heads(answer["predicted"]),
        "attributes": attributes.of_query(engine, answer, active),
        "active": attributes.active_filters(active),
        "filters": active,
        "tags_column": engine.label_space.tags_column,
        "filter": answer.get("filter"),
        "cards": service.neighbor_cards(answer["neighbors"]),
        "preview": photo.preview_url() if len(photo.data) <= PREVIEW_LIMIT_BYTES else None,
        "carry": {**fields, "filter": attributes.filter_tokens(active)} if refinable else None,
    }
    return render_home(result=result)


@pages.get("/items/<path:item_id>")
def item_page(item_id: str):
    """``GET /items/<id>``: a product, its attributes and its similar items.

    ``?filter=column:value`` (repeatable, as in the API) narrows the similar items; each
    attribute value on the page is a link that toggles its filter.
    """
    row = service.catalog_row(item_id)
    active = parse_filter_args(request.args.getlist("filter"))
    similar, _ = service.similar_to_item(item_id, current_app.config["WEB"].default_k, active)
    served = service.engine()
    shown = {served.title_column, served.price_column, served.url_column}  # on the page already

    def link(filters: dict[str, list[str]]) -> str:
        return url_for("pages.item_page", item_id=item_id, filter=attributes.filter_tokens(filters)) + "#similar"

    return render_template(
        "item.html",
        item=service.card(row),
        extra={key: value for key, value in row.extra.items() if key not in shown and value},
        attributes=attributes.of_item(service.engine(), row, active, link),
        active=attributes.active_filters(active, link),
        filters=active,
        tags_column=service.engine().label_space.tags_column,
        clear_url=link({}),
        filter=similar.get("filter"),
        cards=service.neighbor_cards(similar["neighbors"]),
    )


@pages.get("/catalog/<path:item_id>/image")
def catalog_image(item_id: str):
    """``GET /catalog/<id>/image``: a catalog item's photo, by id only.

    The file is the one the served bundle's catalog row names; nothing from the request ever
    becomes part of a file path. It is served only while it lies inside the bundle's image
    root (not through a symlink leaving it: 403) and still has the size and sha256 it had at
    build time (404 otherwise, like a missing file); see ``catalog.open_catalog_image``. The
    row's content hash is the ETag, so a browser revalidates with ``If-None-Match`` and gets
    304 while the photo is unchanged.
    """
    from io import BytesIO

    from werkzeug.exceptions import Forbidden

    from recommender.catalog import open_catalog_image
    from recommender.errors import CatalogImageError

    row = service.catalog_row(item_id)
    try:
        image = open_catalog_image(row, service.engine().manifest.catalog.image_root)
    except CatalogImageError as error:
        log.warning("refusing the photo of catalog item %r (%s): %s", item_id, error.reason, error)
        if error.reason == "outside_root":
            refused = Forbidden(f"the photo of item {item_id!r} lies outside the image root of the catalog")
        else:
            changed = " (it changed since the bundle was built)" if error.reason == "changed" else ""
            refused = NotFound(f"the photo of item {item_id!r} is not available{changed}")
        refused.code_name = f"image_{error.reason}"
        raise refused from None
    return send_file(
        BytesIO(image.data),
        download_name=Path(row.path).name,
        etag=row.sha256,
        last_modified=image.mtime,
        max_age=current_app.config["WEB"].image_max_age_s,
        conditional=True,
    )
