"""What the views ask of the served engine: the engine of this request, catalog rows by id, display cards."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from flask import current_app, g, url_for

from recommender.errors import FilterError, UnknownItemError
from recommender.manifest import CatalogRecord
from webapp.errors import UnknownItem
from webapp.inputs import InvalidFilter

#: The engine's answer keys an upload's JSON answer carries, in this order (those present).
ANSWER_KEYS = ("predicted", "hierarchy", "tags", "neighbors", "filter")


def engine():
    """The engine answering the current request, fixed for the whole request.

    A bundle swap between two calls in one request must not mix two bundles in one answer,
    so the first call's engine is kept on ``flask.g``.
    """
    if "engine" not in g:
        g.engine = current_app.extensions["live_bundle"].current()
    return g.engine


def catalog_row(item_id: str) -> CatalogRecord:
    """The served bundle's catalog record of ``item_id``.

    Raises:
        UnknownItem: no such id (404).
    """
    try:
        return engine().item(item_id)
    except UnknownItemError:
        raise UnknownItem(item_id) from None


def query(image, k: int, *, filters: dict | None = None, match_predicted: Sequence[str] = ()) -> dict:
    """The engine's answer for one photo: predictions and its ``k`` nearest (filtered) items.

    With batching on (``WebConfig.batch_wait_ms`` > 0), the photo is decoded in this thread and
    its forward pass shared with concurrent uploads (``recommender.batching.QueryBatcher``);
    off, it is ``engine().query``'s own path.

    Args:
        image: encoded bytes or ``ImageBytes``.
        k: neighbours, already checked by :func:`webapp.inputs.parse_k`.
        filters: ``{column: [values]}``; empty or None: no filter.
        match_predicted: label columns whose predicted value the neighbours must share.

    Raises:
        InvalidImageError: not a usable image (400).
        InvalidFilter: an unknown filter column or value, or a column given both ways (400).
    """
    served = engine()
    batcher = current_app.extensions.get("query_batcher")
    try:
        if batcher is None:
            answer = served.query(image, k, filters=filters or None, match_predicted=match_predicted)
        else:
            options = served.query_options(k, filters=filters or None, match_predicted=match_predicted)
    except FilterError as error:
        raise InvalidFilter(str(error)) from None
    if batcher is not None:  # decoded here, answered in a forward pass shared with concurrent uploads
        return batcher.query(served, image, options)
    metrics = current_app.extensions.get("metrics")
    if metrics is not None:
        metrics.forward_pass(1)
    return answer


def similar_to_item(item_id: str, k: int, filters: dict | None = None) -> tuple[dict, str]:
    """Neighbours of a catalog item from its stored embedding, optionally filtered.

    Unfiltered, with ``k`` at most the panels' k, the answer is read from the served bundle's
    precomputed panels (``webapp.panels``): the same answer, without a search.

    Returns:
        ``(the engine's answer, "panels" or "live")``.

    Raises:
        UnknownItem: no such id (404).
        InvalidFilter: an unknown filter column or value (400).
    """
    served = engine()
    try:
        panels = current_app.extensions.get("panels")
        if panels is not None and not filters:
            answer = panels.answer(served, item_id, k)
            if answer is not None:
                return answer, "panels"
        return served.similar_to_item(item_id, k, filters=filters or None), "live"
    except UnknownItemError:
        raise UnknownItem(item_id) from None
    except FilterError as error:
        raise InvalidFilter(str(error)) from None


def with_image_urls(neighbors: list[dict]) -> list[dict]:
    """The engine's neighbours plus ``image_url``, where a client can fetch each item's photo."""
    return [{**neighbor, "image_url": url_for("pages.catalog_image", item_id=neighbor["id"])} for neighbor in neighbors]


def link_target(url: str | None) -> str | None:
    """``url`` when a page may link to it: an absolute http(s) URL with a host; else None.

    Anything else (``javascript:``, ``data:``, relative paths, URLs with spaces or control
    characters, which browsers strip before reading the scheme) is shown as no link at all.
    """
    if not url or any(ord(character) <= 32 or ord(character) == 127 for character in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. a malformed IPv6 host
        return None
    return url if parts.scheme.lower() in ("http", "https") and parts.hostname else None


def card(row: CatalogRecord, distance: float | None = None) -> dict:
    """What a product card shows: title, price, labels, tags, distance, links.

    ``title`` is the bundle's title column (else the id), ``price`` its price column (None
    without one), ``product_url`` its URL column when that is an http(s) URL (else None).
    """
    shown = engine().display_fields(row)
    return {
        "id": row.id,
        "title": shown["title"],
        "price": shown.get("price"),
        "product_url": link_target(shown.get("url")),
        "labels": dict(row.labels),
        "tags": list(row.tags or ()),
        "distance": distance,
        "image_url": url_for("pages.catalog_image", item_id=row.id),
        "item_url": url_for("pages.item_page", item_id=row.id),
    }


def neighbor_cards(neighbors: list[dict]) -> list[dict]:
    """Cards of the engine's neighbours, nearest first."""
    served = engine()
    return [card(served.item(neighbor["id"]), neighbor["distance"]) for neighbor in neighbors]


def predicted_heads(predicted: dict) -> list[dict]:
    """The engine's predictions as a list, primary head first: ``{"column", "label", "probability"}``."""
    columns = engine().label_columns
    return [{"column": column, **predicted[column]} for column in columns if column in predicted]
