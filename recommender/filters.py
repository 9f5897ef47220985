"""Attribute filters for neighbour search: which catalog positions hold which label value or tag.

A filter is ``{column: value or [values]}``: an item passes when, for every column given, it
holds one of that column's values (AND across columns, OR within one). :class:`AttributeIndex`
turns a filter into a (size,) bool mask over catalog positions (FAISS order), which
``VectorIndex.search(..., allowed=mask)`` takes. :func:`parse_filters` reads the
``column=value`` (CLI) and ``column:value`` (API) forms.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from recommender.errors import FilterError
from recommender.manifest import CatalogRecord
from recommender.records import CatalogRecords

#: How many known values an "unknown value" message lists.
LISTED_VALUES = 10


class AttributeIndex:
    """Which catalog positions hold which attribute value; built once when a bundle loads.

    Each (column, value) keeps its positions as a sorted (count,) int64 array, so a mask costs
    one (size,) allocation plus a scatter of the matching positions per column, never a
    Python loop over the catalog (see ``bench/filtered.py`` for the measured time).

    Args:
        rows: catalog records in FAISS order (``recommender.manifest.CatalogRecord``: ``labels``
            {column: value}, ``tags``).
        columns: label columns that can be filtered on (``row.labels[column]``).
        tags_column: the name under which ``row.tags`` can be filtered on: an item
            matches tag value ``v`` when ``v`` is one of its tags. None when the bundle has none.

    Attributes:
        size: number of catalog items.
        columns: filterable columns: the label columns, then the tags column.
    """

    def __init__(self, rows: Sequence[CatalogRecord], columns: list[str], tags_column: str | None = None):
        columns = list(columns)
        if tags_column is not None and tags_column in columns:
            raise ValueError(f"column {tags_column!r} cannot be both a label column and the tags column")
        self.size = len(rows)
        self.columns = columns + ([tags_column] if tags_column is not None else [])
        self.tags_column = tags_column
        collected: dict[str, dict[str, list[int]]] = {column: {} for column in self.columns}
        if isinstance(rows, CatalogRecords):  # its columns, without decoding a record
            label_values = {column: rows.label_values(column) for column in columns}
            tag_values = rows.tag_values() if tags_column is not None else None
        else:
            label_values = {column: [row.labels.get(column) for row in rows] for column in columns}
            tag_values = [row.tags for row in rows] if tags_column is not None else None
        for column, found in label_values.items():
            for position, value in enumerate(found):
                if value is not None:
                    collected[column].setdefault(str(value), []).append(position)
        if tag_values is not None:
            for position, tags in enumerate(tag_values):
                for tag in dict.fromkeys(tags or ()):  # a repeated tag counts once
                    collected[tags_column].setdefault(str(tag), []).append(position)
        # Positions are appended in increasing order, so every array is already sorted.
        self._positions: dict[str, dict[str, np.ndarray]] = {
            column: {value: np.asarray(found, dtype=np.int64) for value, found in sorted(by_value.items())}
            for column, by_value in collected.items()
        }

    def values(self, column: str) -> dict[str, int]:
        """Value -> number of items holding it, sorted by value.

        Raises:
            FilterError: ``column`` is not filterable.
        """
        self._check_column(column)
        return {value: len(positions) for value, positions in self._positions[column].items()}

    def mask(self, filters: Mapping[str, str | Sequence[str]] | None) -> np.ndarray:
        """The items that pass ``filters``, as a new (size,) bool array.

        Args:
            filters: ``{column: value or [values]}``; AND across columns, OR across the values
                of one column. None or empty: every item passes.

        Raises:
            FilterError: an unknown column (the message lists the filterable ones), an unknown
                value (it names the column, lists known values and suggests close ones), or an
                empty value list.
        """
        allowed = None
        for _, wanted in self._resolve(filters):
            in_column = np.zeros(self.size, dtype=bool)
            for positions in wanted:
                in_column[positions] = True
            if allowed is None:
                allowed = in_column
            else:
                allowed &= in_column
        return np.ones(self.size, dtype=bool) if allowed is None else allowed

    def count(self, filters: Mapping[str, str | Sequence[str]] | None) -> int:
        """Number of items that pass ``filters`` (same rules and errors as :meth:`mask`)."""
        return int(np.count_nonzero(self.mask(filters)))

    def _resolve(self, filters) -> list[tuple[str, list[np.ndarray]]]:
        """Checks every column and value first, so an error never depends on the order given."""
        resolved = []
        for column, given in (filters or {}).items():
            self._check_column(column)
            values = [given] if isinstance(given, str) else list(given)
            if not values:
                raise FilterError(f"no values given for filter column {column!r}")
            known = self._positions[column]
            wanted = []
            for value in dict.fromkeys(str(value) for value in values):
                if value not in known:
                    raise FilterError(self._unknown_value_message(column, value))
                wanted.append(known[value])
            resolved.append((column, wanted))
        return resolved

    def _check_column(self, column: str) -> None:
        if column not in self._positions:
            filterable = ", ".join(self.columns) if self.columns else "none"
            close = difflib.get_close_matches(str(column), self.columns, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise FilterError(f"unknown filter column {column!r}{hint} (filterable columns: {filterable})")

    def _unknown_value_message(self, column: str, value: str) -> str:
        known = list(self._positions[column])
        # Compare case-folded so "women" suggests "Women".
        folded = {candidate.casefold(): candidate for candidate in known}
        close = [folded[match] for match in difflib.get_close_matches(value.casefold(), list(folded), n=3)]
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        listed = ", ".join(known[:LISTED_VALUES])
        more = f", ... ({len(known)} in all)" if len(known) > LISTED_VALUES else ""
        if not known:
            listed = "none: no catalog item has a value in this column"
        return f"unknown value {value!r} for filter column {column!r}{hint} (known values: {listed}{more})"


def parse_filters(items: Iterable[str] | None, separator: str) -> dict[str, list[str]]:
    """Reads filters written as ``column<separator>value``, e.g. ``gender=Women`` or ``gender:Women``.

    Each item is split on the first separator (a value may contain the separator), both sides
    stripped of whitespace. Repeating a column adds values to it (OR), without repeats, in the
    order given.

    Args:
        items: the filter strings (None: no filters).
        separator: ``"="`` on the command line, ``":"`` in the web API.

    Returns:
        ``{column: [values]}`` in the order the columns first appear.

    Raises:
        FilterError: an item without the separator, or with an empty column or value.
    """
    if not separator:
        raise ValueError("the filter separator cannot be empty")
    filters: dict[str, list[str]] = {}
    for item in items or ():
        column, found, value = str(item).partition(separator)
        column, value = column.strip(), value.strip()
        if not found or not column or not value:
            raise FilterError(
                f"malformed filter {item!r}: expected COLUMN{separator}VALUE, e.g. gender{separator}Women"
            )
        values = filters.setdefault(column, [])
        if value not in values:
            values.append(value)
    return filters
