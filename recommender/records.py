"""A bundle's catalog rows held compactly: the ``catalog.jsonl`` bytes plus the columns lookups need.

A loaded bundle answers for every product, so its rows stay in memory. As one frozen
:class:`~recommender.manifest.CatalogRecord` per product (strings, dicts, mapping proxies)
they took 1.5 KB each: 1.5 GB at 1,000,000 items (``bench/index_kinds.py``), more than the
compressed index. :class:`CatalogRecords` keeps instead:

    blob      the file's bytes                          (~0.4 KB a row)
    offsets   (n + 1,) int64 line starts
    ids       n str                                     the id lookup
    sha256s   (n,) S64                                  same-photo lookups (PhotoPositions)
    labels    column -> (values, (n,) int32 codes)      the attribute index
    tags      n tuples of shared strings, or None

and decodes a :class:`CatalogRecord` when one is asked for (``rows[i]``: one ``json.loads``
of one line, microseconds), so it is a ``Sequence[CatalogRecord]`` like the list it replaces.
Every line is parsed and validated once when the file is read (a malformed line fails the
load, named), never again later.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from recommender.errors import BundleError
from recommender.manifest import CatalogRecord


class CatalogRecords(Sequence):
    """The rows of one ``catalog.jsonl`` (line i is FAISS id i); see the module docstring.

    Build with :meth:`read`. ``rows[i]`` is a :class:`CatalogRecord`; a slice is a list of them.

    Attributes:
        ids: the product ids, in row order.
        sha256s: (n,) S64 image digests.
        source: the file, for messages.
    """

    def __init__(
        self,
        blob: bytes,
        offsets: np.ndarray,
        ids: list[str],
        sha256s: np.ndarray,
        labels: dict[str, tuple[list[str], np.ndarray]],
        tags: list[tuple[str, ...] | None] | None,
        source: str,
    ):
        self._blob = blob
        self._offsets = offsets
        self.ids = ids
        self.sha256s = sha256s
        self._labels = labels
        self._tags = tags
        self.source = source

    @classmethod
    def read(cls, path: str | Path) -> CatalogRecords:
        """Reads and validates every line of a ``catalog.jsonl``.

        Raises:
            BundleError: the file cannot be read, or a line is not JSON or not a valid record
                (file and line named).
        """
        path = Path(path)
        try:
            blob = path.read_bytes()
        except OSError as error:
            raise BundleError(f"cannot read {path}: {error.strerror or error}") from None
        starts = [0]
        ids: list[str] = []
        digests: list[str] = []
        codes: dict[str, list[int]] = {}
        values: dict[str, dict[str, int]] = {}
        tags: list[tuple[str, ...] | None] = []
        position = 0
        number = 0
        size = len(blob)
        while position < size:
            end = blob.find(b"\n", position)
            end = size if end < 0 else end + 1
            number += 1
            record = _parse(blob[position:end], f"{path} line {number}")
            ids.append(record.id)
            digests.append(record.sha256)
            for column, value in record.labels.items():
                if column not in codes:  # first seen here: the rows before lack it
                    codes[column], values[column] = [-1] * (number - 1), {}
                known = values[column]
                codes[column].append(known.setdefault(value, len(known)))
            for column_codes in codes.values():
                if len(column_codes) < number:  # this row lacks the column
                    column_codes.append(-1)
            tags.append(None if record.tags is None else tuple(sys.intern(tag) for tag in record.tags))
            starts.append(end)
            position = end
        labels = {column: (list(values[column]), np.asarray(codes[column], np.int32)) for column in codes}
        try:
            sha256s = np.asarray(digests, dtype="S64")
        except UnicodeEncodeError:
            raise BundleError(f"{path}: a sha256 field is not a hex digest") from None
        has_tags = any(row is not None for row in tags)
        return cls(
            blob,
            np.asarray(starts, np.int64),
            ids,
            sha256s,
            labels,
            tags if has_tags else None,
            str(path),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"catalog row {index} of {len(self)}")
        line = self._blob[self._offsets[index] : self._offsets[index + 1]]
        return _parse(line, f"{self.source} line {index + 1}")

    def __iter__(self) -> Iterator[CatalogRecord]:
        for index in range(len(self)):
            yield self[index]

    def label_values(self, column: str) -> list[str | None]:
        """Every row's value of a label column (None where a row has none), in row order."""
        if column not in self._labels:
            return [None] * len(self)
        names, codes = self._labels[column]
        table = [*names, None]  # code -1 picks the None at the end
        return [table[code] for code in codes.tolist()]

    def tag_values(self) -> list[tuple[str, ...] | None]:
        """Every row's tags (None where a row has no tags field), in row order."""
        return list(self._tags) if self._tags is not None else [None] * len(self)


def _parse(line: bytes, where: str) -> CatalogRecord:
    try:
        payload = json.loads(line.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{where}: not valid JSON ({error})") from None
    return CatalogRecord.from_json(payload, where)


class PhotoPositions:
    """Image sha256 -> the catalog positions with that photo, from a sorted (n,) S64 array.

    The lookup :func:`recommender.engine.same_photo_positions` returns: ``get(digest,
    default)`` gives the sorted positions (a list) or ``default``. 72 bytes a row, where a
    dict of lists took about 250.
    """

    def __init__(self, sha256s: np.ndarray | Sequence[str]):
        digests = np.asarray(sha256s, dtype="S64")
        self._order = np.argsort(digests, kind="stable")
        self._sorted = digests[self._order]

    def __contains__(self, digest: str) -> bool:
        return self.get(digest) is not None

    def __getitem__(self, digest: str) -> list[int]:
        found = self.get(digest)
        if found is None:
            raise KeyError(digest)
        return found

    def get(self, digest: str, default=None):
        key = np.asarray(digest, dtype="S64")
        start = int(np.searchsorted(self._sorted, key, side="left"))
        end = int(np.searchsorted(self._sorted, key, side="right"))
        if start == end:
            return default
        return self._order[start:end].tolist()

    def __len__(self) -> int:
        """Distinct photos."""
        if not len(self._sorted):
            return 0
        return int(1 + np.count_nonzero(self._sorted[1:] != self._sorted[:-1]))


def same_photo_positions(rows: Sequence[CatalogRecord]) -> PhotoPositions:
    """Image sha256 -> the catalog positions with that photo: what an item's neighbours leave out.

    An item is never its own neighbour, nor is another item with the same photo (a duplicate
    listing). ``similar_to_item``, the precomputed panels and ``evaluate`` all exclude through
    this map (``get(digest, default)``); :class:`CatalogRecords` gives its digests column
    without decoding a record.
    """
    return PhotoPositions(rows.sha256s if isinstance(rows, CatalogRecords) else [row.sha256 for row in rows])
