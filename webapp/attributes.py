"""The attributes a page shows (hierarchy path, other label columns, tags), each value a filter to toggle.

Filters live in the request only: the results page re-posts them as hidden form fields and
the item page keeps them in its query string, so any worker can answer any click. The rules
of a click are here, shared by both pages: clicking a value makes it its column's only value
(so every click narrows, or switches within a column: tags too, where the engine would OR
two values and widen the result), clicking it again removes it.
"""

from __future__ import annotations

from collections.abc import Callable

from webapp.inputs import FILTER_SEPARATOR, parse_filter_args

Filters = dict[str, list[str]]


def filter_token(column: str, value: str) -> str:
    """A filter as one parameter value: ``column:value``."""
    return f"{column}{FILTER_SEPARATOR}{value}"


def filter_tokens(filters: Filters) -> list[str]:
    """Filters as repeated ``filter`` parameter values, in order."""
    return [filter_token(column, value) for column, values in filters.items() for value in values]


def split_token(token: str) -> tuple[str, str]:
    """``column:value`` -> ``(column, value)``.

    Raises:
        InvalidFilter: no ``:``, or an empty column or value (400).
    """
    ((column, values),) = parse_filter_args([token]).items()
    return column, values[0]


def toggled(active: Filters, column: str, value: str) -> Filters:
    """The filters after a click on ``column:value``: removed when it is its column's only value,
    else it becomes that column's only value."""
    result = {name: list(values) for name, values in active.items()}
    if result.get(column) == [value]:
        del result[column]
    else:
        result[column] = [value]
    return result


def without(active: Filters, column: str, value: str) -> Filters:
    """The filters with one value removed (its column too, when it was the last)."""
    result = {name: [v for v in values if not (name == column and v == value)] for name, values in active.items()}
    return {name: values for name, values in result.items() if values}


def _value(
    column: str,
    value: str,
    probability: float | None,
    counts: dict[str, dict[str, int]],
    active: Filters,
    link: Callable[[Filters], str] | None,
) -> dict:
    """One clickable attribute value: what it is, how many catalog items have it, where a click leads."""
    count = counts.get(column, {}).get(value, 0)
    return {
        "column": column,
        "value": value,
        "token": filter_token(column, value),
        "probability": probability,
        "count": count,
        "active": value in active.get(column, ()),
        "filterable": count > 0,
        "href": link(toggled(active, column, value)) if link else None,
    }


def _catalog_counts(engine) -> dict[str, dict[str, int]]:
    """Per filterable column, value -> catalog items with it."""
    return {column: engine.attributes.values(column) for column in engine.attributes.columns}


def describe(
    engine,
    labels: dict[str, str],
    tags: list[tuple[str, float | None]] | None,
    active: Filters,
    *,
    probabilities: dict[str, float] | None = None,
    path_probability: float | None = None,
    link: Callable[[Filters], str] | None = None,
) -> dict:
    """The attribute panel of a query photo or a catalog item.

    Args:
        engine: the served engine (its label space and attribute index).
        labels: label column -> value (predicted, or the item's own).
        tags: ``(tag, probability or None)`` pairs, or None when the bundle has no tags column.
        active: the filters in force.
        probabilities: label column -> probability of its value (predictions only).
        path_probability: probability of the whole predicted hierarchy path.
        link: filters -> URL of the page with them (the item page); None where a click is a
            form button (the results page).

    Returns:
        ``{"path": {"levels", "steps": [value], "probability"} or None, "columns": [value],
        "tags": {"column", "options": [value]} or None}``, each value a dict: ``column, value,
        token, probability, count, active, filterable, href``. (No key is named ``values`` or
        ``items``: Jinja would find the dict's method first.)
    """
    counts = _catalog_counts(engine)
    probabilities = probabilities or {}
    taxonomy = engine.label_space.taxonomy
    levels = list(taxonomy.levels) if taxonomy else []
    path = None
    if levels and all(level in labels for level in levels):
        path = {
            "levels": levels,
            "steps": [_value(level, labels[level], probabilities.get(level), counts, active, link) for level in levels],
            "probability": path_probability,
        }
    else:
        levels = []
    columns = [
        _value(column, labels[column], probabilities.get(column), counts, active, link)
        for column in engine.label_columns
        if column in labels and column not in levels
    ]
    tags_column = engine.label_space.tags_column
    tag_values = None
    if tags_column is not None and tags is not None:
        tag_values = {
            "column": tags_column,
            "options": [_value(tags_column, tag, probability, counts, active, link) for tag, probability in tags],
        }
    return {"path": path, "columns": columns, "tags": tag_values}


def of_query(engine, answer: dict, active: Filters) -> dict:
    """The attribute panel of an uploaded photo, from the engine's answer (see :func:`describe`)."""
    predicted = answer["predicted"]
    hierarchy = answer.get("hierarchy")
    tags = [(tag["tag"], tag["probability"]) for tag in answer["tags"]] if "tags" in answer else None
    return describe(
        engine,
        {column: prediction["label"] for column, prediction in predicted.items()},
        tags,
        active,
        probabilities={column: prediction["probability"] for column, prediction in predicted.items()},
        path_probability=hierarchy["probability"] if hierarchy else None,
    )


def of_item(engine, row, active: Filters, link: Callable[[Filters], str]) -> dict:
    """The attribute panel of a catalog item (a ``CatalogRecord``), with links (see :func:`describe`)."""
    tags = [(tag, None) for tag in row.tags or ()] if engine.label_space.tags_column else None
    return describe(engine, dict(row.labels), tags, active, link=link)


def active_filters(active: Filters, link: Callable[[Filters], str] | None = None) -> list[dict]:
    """The filters in force, one entry per value, with what removes it: ``{column, value, token, href}``."""
    return [
        {
            "column": column,
            "value": value,
            "token": filter_token(column, value),
            "href": link(without(active, column, value)) if link else None,
        }
        for column, values in active.items()
        for value in values
    ]
