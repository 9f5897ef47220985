"""The JSON API under /api/v1: similar items for an uploaded photo or for a catalog item, optionally filtered."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from webapp import service
from webapp.inputs import InvalidFilter, parse_k, request_filters, uploaded_image

#: Response header of an item's answer: ``panels`` (precomputed) or ``live`` (searched now).
SIMILAR_SOURCE_HEADER = "X-Similar-Source"

api = Blueprint("api", __name__, url_prefix="/api/v1")


@api.post("/similar")
def similar_to_upload():
    """``POST /api/v1/similar?k=6``: predicted labels and the k nearest items of an uploaded photo.

    The photo is the multipart field ``image`` or the raw body (Content-Type image/* or
    application/octet-stream). A photo that is itself a catalog item is left out of its own
    neighbours, as in the CLI.

    Parameters (query string; ``filter`` and ``match_predicted`` also as multipart form fields):
        k: neighbours, 1..100 (default 6).
        filter: ``column:value``, repeatable: only neighbours with that value in a label column
            or among their tags. Columns are ANDed, values of one column ORed:
            ``filter=colour:red&filter=colour:blue&filter=tags:striped`` is "red or blue, and
            striped". The value is everything after the first ``:``.
        match_predicted: a label column, repeatable: only neighbours whose value in it equals
            the photo's *predicted* value (e.g. ``match_predicted=department``). A column
            cannot be given both as a filter and here.

    Returns:
        ``{"predicted": {column: {"label", "probability"}}, "hierarchy"?: {"levels", "path",
        "probability", "mode"}, "tags"?: [{"tag", "probability"}], "neighbors": [{"id",
        "distance", "labels", "tags"?, "image", "image_url"}], "filter"?: {"applied": {column:
        [values]}, "matching_items", "complete", "note"?}, "bundle": bundle id}``. ``hierarchy``
        and ``tags`` come with bundles that have them; ``filter`` when a filter was given.
        Fewer than k neighbours when fewer catalog items match: ``complete`` is false and
        ``note`` says how many.

    Errors:
        400 ``invalid_filter``: a filter without ``:``, an unknown column or value, a column
        given both ways, or ``match_predicted`` naming no predicted label column (the message
        says which and lists what is known).
    """
    k = parse_k(request.args.get("k"), current_app.config["WEB"].default_k)
    filters, match_predicted = request_filters()
    data = uploaded_image()
    answer = service.query(data, k, filters=filters, match_predicted=match_predicted)
    body = {key: answer[key] for key in service.ANSWER_KEYS if key in answer}
    body["neighbors"] = service.with_image_urls(answer["neighbors"])
    body["bundle"] = service.engine().bundle_id
    return jsonify(body)


@api.get("/items/<path:item_id>/similar")
def similar_to_item(item_id: str):
    """``GET /api/v1/items/<id>/similar?k=6``: the k nearest items of a catalog item.

    Uses the item's stored embedding (no image decoding, no forward pass) and leaves the item
    itself out.

    Parameters (query string):
        k: neighbours, 1..100 (default 6).
        filter: ``column:value``, repeatable, as for ``POST /api/v1/similar``. (There is no
            ``match_predicted`` here: the item's own labels are known, so filter on them.)

    Returns:
        ``{"id", "labels", "tags"?, "neighbors": [...], "filter"?: {...}, "bundle": bundle id}``;
        the ``X-Similar-Source`` header says ``panels`` when the answer was read from the
        bundle's precomputed panels (unfiltered, k up to theirs), ``live`` when searched.

    Errors:
        400 ``invalid_filter`` (as for uploads, and for ``match_predicted``); 404 ``unknown_item``.
    """
    k = parse_k(request.args.get("k"), current_app.config["WEB"].default_k)
    filters, match_predicted = request_filters()
    if match_predicted:
        raise InvalidFilter(
            "match_predicted applies to an uploaded photo only; for a catalog item, filter on its own "
            "labels, e.g. filter=colour:red"
        )
    answer, source = service.similar_to_item(item_id, k, filters)
    metrics = current_app.extensions.get("metrics")
    if metrics is not None:
        metrics.item_answers.labels(source).inc()
    response = jsonify(
        {**answer, "neighbors": service.with_image_urls(answer["neighbors"]), "bundle": service.engine().bundle_id}
    )
    response.headers[SIMILAR_SOURCE_HEADER] = source
    return response


@api.get("/openapi.json")
def openapi_json():
    """``GET /api/v1/openapi.json``: the OpenAPI 3.1 document of this API for the bundle being served."""
    from webapp.openapi import openapi_document

    served = service.engine()
    key = (served.bundle_id, str(served.path))  # not the engine itself: an old bundle must not stay in memory
    cached = current_app.extensions.get("openapi")
    if cached is None or cached[0] != key:
        cached = (key, openapi_document(served, current_app.config["WEB"]))
        current_app.extensions["openapi"] = cached  # one per served bundle: rebuilt after a swap
    return jsonify(cached[1])
