"""The JSON API under /api/v1: similar items for an uploaded photo or for a catalog item."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from webapp import service
from webapp.inputs import parse_k, uploaded_image

api = Blueprint("api", __name__, url_prefix="/api/v1")


@api.post("/similar")
def similar_to_upload():
    """``POST /api/v1/similar?k=6``: predicted labels and the k nearest items of an uploaded photo.

    The photo is the multipart field ``image`` or the raw body (Content-Type image/* or
    application/octet-stream). A photo that is itself a catalog item is left out of its own
    neighbours, as in the CLI.

    Returns:
        ``{"predicted": {column: {"label", "probability"}}, "neighbors": [{"id", "distance",
        "labels", "image", "image_url"}], "bundle": bundle id}``.
    """
    k = parse_k(request.args.get("k"), current_app.config["WEB"].default_k)
    data = uploaded_image()
    engine = service.engine()
    answer = engine.query(data, k)
    return jsonify(
        {
            "predicted": answer["predicted"],
            "neighbors": service.with_image_urls(answer["neighbors"]),
            "bundle": engine.bundle_id,
        }
    )


@api.get("/items/<path:item_id>/similar")
def similar_to_item(item_id: str):
    """``GET /api/v1/items/<id>/similar?k=6``: the k nearest items of a catalog item.

    Uses the item's stored embedding (no image decoding, no forward pass) and leaves the item
    itself out.

    Returns:
        ``{"id", "labels", "neighbors": [...], "bundle": bundle id}``.
    """
    k = parse_k(request.args.get("k"), current_app.config["WEB"].default_k)
    answer = service.similar_to_item(item_id, k)
    return jsonify(
        {**answer, "neighbors": service.with_image_urls(answer["neighbors"]), "bundle": service.engine().bundle_id}
    )
