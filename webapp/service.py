"""What the views ask of the served engine: the engine of this request, catalog rows by id, display cards."""

from __future__ import annotations

from flask import current_app, g, url_for

from webapp.errors import UnknownItem


def engine():
    """The engine answering the current request, fixed for the whole request.

    A bundle swap between two calls in one request must not mix two bundles in one answer,
    so the first call's engine is kept on ``flask.g``.
    """
    if "engine" not in g:
        g.engine = current_app.extensions["live_bundle"].current()
    return g.engine


def catalog_row(item_id: str) -> dict:
    """The served bundle's catalog row of ``item_id``.

    Raises:
        UnknownItem: no such id (404).
    """
    try:
        return engine().item(item_id)
    except KeyError:
        raise UnknownItem(item_id) from None


def similar_to_item(item_id: str, k: int) -> dict:
    """Neighbours of a catalog item from its stored embedding.

    Raises:
        UnknownItem: no such id (404).
        QueryError: ``k`` out of range (400).
    """
    try:
        return engine().similar_to_item(item_id, k)
    except KeyError:
        raise UnknownItem(item_id) from None


def with_image_urls(neighbors: list[dict]) -> list[dict]:
    """The engine's neighbours plus ``image_url``, where a client can fetch each item's photo."""
    return [{**neighbor, "image_url": url_for("pages.catalog_image", item_id=neighbor["id"])} for neighbor in neighbors]


def title_of(row: dict) -> str:
    """A product's display title: its catalog ``title`` column, else its id."""
    title = (row.get("extra") or {}).get("title")
    return str(title) if title else str(row["id"])


def card(row: dict, distance: float | None = None) -> dict:
    """What a product card shows: title, labels, distance, links."""
    return {
        "id": row["id"],
        "title": title_of(row),
        "labels": row["labels"],
        "distance": distance,
        "image_url": url_for("pages.catalog_image", item_id=row["id"]),
        "item_url": url_for("pages.item_page", item_id=row["id"]),
    }


def neighbor_cards(neighbors: list[dict]) -> list[dict]:
    """Cards of the engine's neighbours, nearest first."""
    served = engine()
    return [card(served.item(neighbor["id"]), neighbor["distance"]) for neighbor in neighbors]


def predicted_heads(predicted: dict) -> list[dict]:
    """The engine's predictions as a list, primary head first: ``{"column", "label", "probability"}``."""
    columns = engine().label_columns
    return [{"column": column, **predicted[column]} for column in columns if column in predicted]
