"""Backbone features in immutable Parquet part files: the feature store for big catalogs and for Ray.

Store layout (a folder, format version 1)::

    store.json                                   {"format": "recommender-feature-parts", "version": 1}
    <backbone key>/<view>/incoming/part-*.parquet    one part per extracted batch (any writer)
    <backbone key>/<view>/prefix=<xx>/part-*.parquet parts merged by :meth:`PartFeatureStore.compact`,
                                                     partitioned by the first two hex digits of the sha256

Each part holds ``sha256`` (string) and ``features`` (fixed-size list of ``feature_dim`` float32)
and records its backbone key, view, width and the format version in its schema metadata, checked
when read. ``view`` is ``original`` or ``flipped``, as in :mod:`recommender.features`.

Why parts: the HDF5 store (:class:`recommender.features.FeatureStore`) has one main file that
``compact()`` rewrites whole, from features it loads into memory; at 10M photos that is 160 GB
moved every night. Here nothing is ever rewritten: a writer (the in-process loop, or each Ray
actor on any node) adds one new part per batch under ``incoming/`` (temp file + rename, so a
killed writer leaves at most a temporary file, which readers ignore), and :meth:`compact`
moves incoming rows into the prefix partitions as new parts, then deletes the incoming parts it
merged. A kill between the two leaves the same features twice, which readers take once.

Lookups go through sorted numpy arrays of the stored hashes (64 bytes a photo and view, 0.64 GB
at 10M), not a Python dict per photo; reads open only the parts that hold the rows asked for.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np

from recommender.errors import FeatureStoreError
from recommender.files import atomic_write, atomic_write_json, storage_errors

log = logging.getLogger(__name__)

PARTS_FORMAT = "recommender-feature-parts"
PARTS_FORMAT_VERSION = 1
VIEWS = ("original", "flipped")
INCOMING = "incoming"


def is_parts_store(path: str | os.PathLike) -> bool:
    """Whether a feature store path names a part-file store: a folder, or any path not ending in ``.h5``."""
    path = Path(path)
    return path.is_dir() or path.suffix != ".h5"


def _part_name() -> str:
    return f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"


def _schema(backbone_key: str, view: str, feature_dim: int):
    import pyarrow as pa

    metadata = {
        "format": PARTS_FORMAT,
        "version": str(PARTS_FORMAT_VERSION),
        "backbone_key": backbone_key,
        "view": view,
        "feature_dim": str(feature_dim),
    }
    return pa.schema(
        [("sha256", pa.string()), ("features", pa.list_(pa.float32(), feature_dim))],
        metadata={key: value.encode() for key, value in metadata.items()},
    )


class PartWriter:
    """Adds parts to a store without reading it: what each Ray actor holds.

    Args:
        path: the store folder (created with its ``store.json`` when missing).
        backbone_key: ``Backbone.identity["key"]``.
        feature_dim: features per image.
    """

    def __init__(self, path: str | os.PathLike, backbone_key: str, feature_dim: int):
        self.path = Path(path)
        self.backbone_key = backbone_key
        self.feature_dim = feature_dim
        _ensure_store(self.path)

    def write(self, digests: list[str], features: np.ndarray, view: str = "original") -> Path | None:
        """Writes one part under ``incoming/`` (atomic: temp + rename); returns its path (None when empty).

        Raises:
            FeatureStoreError: the shape does not match, or a row is not finite (naming its image).
            StorageError: the disk is full.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not digests:
            return None
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        features = np.ascontiguousarray(features, np.float32)
        if features.shape != (len(digests), self.feature_dim):
            raise FeatureStoreError(f"features shape {features.shape} does not match {len(digests)} hashes")
        finite = np.isfinite(features).all(axis=1)
        if not finite.all():
            corrupt = [digest for digest, ok in zip(digests, finite) if not ok]
            raise FeatureStoreError(
                f"refusing to store non-finite (NaN or inf) {view} features for {len(corrupt)} image(s) "
                f"(sha256 {', '.join(d[:12] for d in corrupt[:5])})",
                digests=corrupt,
            )
        folder = self.path / self.backbone_key / view / INCOMING
        with storage_errors(folder):
            folder.mkdir(parents=True, exist_ok=True)
        schema = _schema(self.backbone_key, view, self.feature_dim)
        flat = pa.array(features.reshape(-1), pa.float32())
        table = pa.Table.from_arrays(
            [pa.array(list(digests), pa.string()), pa.FixedSizeListArray.from_arrays(flat, self.feature_dim)],
            schema=schema,
        )
        return atomic_write(folder / _part_name(), lambda temp: pq.write_table(table, temp))


def _ensure_store(path: Path) -> None:
    """Creates the store folder and its ``store.json``, or checks an existing one's format."""
    marker = path / "store.json"
    if marker.is_file():
        try:
            payload = json.loads(marker.read_text())
        except (OSError, ValueError) as error:
            raise FeatureStoreError(f"{marker} is unreadable ({error}); delete the store to start afresh") from None
        if payload.get("format") != PARTS_FORMAT or payload.get("version") != PARTS_FORMAT_VERSION:
            raise FeatureStoreError(
                f"{marker}: feature store format {payload.get('format')!r} version {payload.get('version')!r}, "
                f"this version reads {PARTS_FORMAT!r} version {PARTS_FORMAT_VERSION}"
            )
        return
    if path.exists() and not path.is_dir():
        raise FeatureStoreError(f"{path} is a file, not a part-file feature store folder")
    with storage_errors(path):
        path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"format": PARTS_FORMAT, "version": PARTS_FORMAT_VERSION})


class PartFeatureStore:
    """The part-file store with the interface of :class:`recommender.features.FeatureStore`.

    ``contains``, ``get``, ``add``, ``compact`` and ``len`` behave as there, so
    :func:`recommender.features.extract_features` and the build use either store.

    Args:
        path: the store folder (created on first write).
        backbone_key: ``Backbone.identity["key"]``.
        feature_dim: features per image; a part with another width is an error.
    """

    def __init__(self, path: str | os.PathLike, backbone_key: str, feature_dim: int):
        self.path = Path(path)
        self.backbone_key = backbone_key
        self.feature_dim = feature_dim
        self._writer: PartWriter | None = None
        self._scan()

    # -- reading -------------------------------------------------------------------------
    def _view_folder(self, view: str) -> Path:
        return self.path / self.backbone_key / view

    def _parts(self, view: str) -> list[Path]:
        """Every finished part of a view: partitions first, then incoming (newest last)."""
        folder = self._view_folder(view)
        if not folder.is_dir():
            return []
        merged = sorted(folder.glob("prefix=*/part-*.parquet"))
        incoming = sorted((folder / INCOMING).glob("part-*.parquet"))
        return merged + incoming

    def _scan(self) -> None:
        """Reads the hash column of every part into sorted lookup arrays, per view."""
        if (self.path / "store.json").exists():
            _ensure_store(self.path)  # checks the format version
        elif self.path.exists() and not self.path.is_dir():
            raise FeatureStoreError(f"{self.path} is a file, not a part-file feature store folder")
        self._files: dict[str, list[Path]] = {}
        self._lookup: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for view in VIEWS:
            files = self._parts(view)
            hashes, file_ids, rows = [], [], []
            for file_id, part in enumerate(files):
                digests = self._read_column(part, view, "sha256")
                hashes.append(np.asarray(digests, dtype="S64"))
                file_ids.append(np.full(len(digests), file_id, np.int32))
                rows.append(np.arange(len(digests), dtype=np.int32))
            self._files[view] = files
            self._set_lookup(view, hashes, file_ids, rows)

    def _set_lookup(self, view: str, hashes: list, file_ids: list, rows: list) -> None:
        if not hashes:
            self._lookup[view] = (np.empty(0, "S64"), np.empty(0, np.int32), np.empty(0, np.int32))
            return
        hashes_, file_ids_, rows_ = np.concatenate(hashes), np.concatenate(file_ids), np.concatenate(rows)
        # Stable sort, then keep the last of equal hashes: a newer part wins, as in the HDF5 store.
        order = np.argsort(hashes_, kind="stable")
        hashes_, file_ids_, rows_ = hashes_[order], file_ids_[order], rows_[order]
        last = np.ones(len(hashes_), bool)
        last[:-1] = hashes_[1:] != hashes_[:-1]
        self._lookup[view] = (hashes_[last], file_ids_[last], rows_[last])

    def _read_column(self, part: Path, view: str, column: str):
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(part)
            metadata = {key.decode(): value.decode() for key, value in (schema.metadata or {}).items()}
            if metadata.get("format") != PARTS_FORMAT or metadata.get("version") != str(PARTS_FORMAT_VERSION):
                raise FeatureStoreError(
                    f"{part}: not a feature part of format version {PARTS_FORMAT_VERSION} "
                    f"(found {metadata.get('format')!r} {metadata.get('version')!r})"
                )
            if metadata.get("view") != view or metadata.get("backbone_key") != self.backbone_key:
                raise FeatureStoreError(f"{part}: holds {metadata.get('view')} features of another backbone or view")
            if int(metadata.get("feature_dim", -1)) != self.feature_dim:
                raise FeatureStoreError(
                    f"{part}: stored features have {metadata.get('feature_dim')} values, "
                    f"the backbone gives {self.feature_dim}"
                )
            table = pq.read_table(part, columns=[column])
        except FeatureStoreError:
            raise
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise FeatureStoreError(f"feature part {part} is unreadable ({error}); delete it to re-extract") from None
        if column == "sha256":
            return table.column(0).to_pylist()
        return table.column(0).combine_chunks()

    def _positions(self, digests: list[str], view: str) -> np.ndarray:
        """Index into the view's lookup arrays of each digest, -1 where it is not stored."""
        hashes, _, _ = self._lookup[view]
        wanted = np.asarray(digests, dtype="S64")
        if len(hashes) == 0:
            return np.full(len(wanted), -1, np.int64)
        found = np.searchsorted(hashes, wanted)
        found = np.minimum(found, len(hashes) - 1)
        return np.where(hashes[found] == wanted, found, -1)

    def __len__(self) -> int:
        return len(self._lookup["original"][0])

    def contains(self, digest: str, view: str = "original") -> bool:
        """Whether features of this image (by sha256) are stored for the view."""
        return bool(self._positions([digest], view)[0] >= 0)

    def missing(self, digests: list[str], view: str = "original") -> np.ndarray:
        """(n,) bool: which of the images have no stored features for the view (one vectorized lookup)."""
        return self._positions(list(digests), view) < 0

    def get(self, digests: list[str], view: str = "original") -> np.ndarray:
        """Reads stored features: (len(digests), feature_dim) float32, in the order asked.

        Raises:
            FeatureStoreError: an image has no stored features, a part is unreadable, or its
                features are not finite (naming the image and file).
        """
        positions = self._positions(list(digests), view)
        if (positions < 0).any():
            first = digests[int(np.flatnonzero(positions < 0)[0])]
            raise FeatureStoreError(f"no stored {view} features for image {first[:12]}")
        _, file_ids, rows = self._lookup[view]
        out = np.empty((len(digests), self.feature_dim), np.float32)
        chosen_files, chosen_rows = file_ids[positions], rows[positions]
        for file_id in np.unique(chosen_files):
            part = self._files[view][int(file_id)]
            asked = np.flatnonzero(chosen_files == file_id)
            column = self._read_column(part, view, "features")
            block = column.values.to_numpy(zero_copy_only=False).reshape(-1, self.feature_dim)[chosen_rows[asked]]
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                corrupt = [digests[int(i)] for i in asked[~finite]]
                raise FeatureStoreError(
                    f"feature part {part} holds non-finite (NaN or inf) {view} features for {len(corrupt)} "
                    f"image(s) (sha256 {', '.join(d[:12] for d in corrupt[:5])}); delete it to re-extract",
                    digests=corrupt,
                )
            out[asked] = block
        return out

    def part_order(self, digests: list[str], view: str = "original") -> np.ndarray:
        """(n,) int64: the positions of ``digests`` grouped by the part file that holds them
        (stable within a part), so consecutive chunks of it read few files.

        Raises:
            FeatureStoreError: an image has no stored features for the view.
        """
        positions = self._positions(list(digests), view)
        if (positions < 0).any():
            first = digests[int(np.flatnonzero(positions < 0)[0])]
            raise FeatureStoreError(f"no stored {view} features for image {first[:12]}")
        return np.argsort(self._lookup[view][1][positions], kind="stable").astype(np.int64)

    # -- writing -------------------------------------------------------------------------
    def add(self, digests: list[str], features: np.ndarray, view: str = "original") -> None:
        """Stores one batch durably as a new incoming part (atomic: temp + rename).

        Raises:
            FeatureStoreError: the shape does not match, or a row is not finite (naming its image).
            StorageError: the disk is full.
        """
        if self._writer is None:
            self._writer = PartWriter(self.path, self.backbone_key, self.feature_dim)
        part = self._writer.write(list(digests), features, view)
        if part is None:
            return
        hashes, file_ids, rows = self._lookup[view]
        self._files[view].append(part)
        self._set_lookup(
            view,
            [hashes, np.asarray(list(digests), dtype="S64")],
            [file_ids, np.full(len(digests), len(self._files[view]) - 1, np.int32)],
            [rows, np.arange(len(digests), dtype=np.int32)],
        )

    def refresh(self) -> None:
        """Reads the parts again: what other writers (Ray actors) added since this store was opened."""
        self._scan()

    def compact(self) -> None:
        """Moves the incoming parts' rows into the prefix partitions as new parts, then deletes them.

        Existing partition parts are never rewritten; only the rows that came in since the last
        compaction are read (one view at a time). Non-finite rows are dropped (a later run
        re-extracts them) rather than carried into a partition.
        """
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        for view in VIEWS:
            incoming = sorted((self._view_folder(view) / INCOMING).glob("part-*.parquet"))
            for leftover in (self._view_folder(view) / INCOMING).glob(".*.tmp"):
                leftover.unlink(missing_ok=True)  # temp files of a killed writer
            if not incoming:
                continue
            tables = []
            for part in incoming:
                self._read_column(part, view, "sha256")  # checks the part's format and width
                tables.append(pq.read_table(part))
            table = pa.concat_tables(tables)
            features = table.column("features").combine_chunks().values.to_numpy(zero_copy_only=False)
            finite = np.isfinite(features.reshape(-1, self.feature_dim)).all(axis=1)
            if not finite.all():
                log.warning("dropped %d non-finite %s feature row(s) while compacting", int((~finite).sum()), view)
                table = table.filter(pa.array(finite))
            prefixes = pc.utf8_slice_codeunits(table.column("sha256"), 0, 2)
            schema = _schema(self.backbone_key, view, self.feature_dim)
            for prefix in sorted(set(prefixes.to_pylist())):
                rows = table.filter(pc.equal(prefixes, prefix)).cast(schema)
                folder = self._view_folder(view) / f"prefix={_safe_prefix(prefix)}"
                with storage_errors(folder):
                    folder.mkdir(parents=True, exist_ok=True)
                atomic_write(folder / _part_name(), lambda temp, rows=rows: pq.write_table(rows, temp))
            for part in incoming:
                part.unlink(missing_ok=True)
        self._scan()


def _safe_prefix(prefix: str) -> str:
    """A partition name from a hash prefix (hex in practice; anything else is escaped)."""
    return "".join(c if c.isalnum() else f"%{ord(c):02x}" for c in prefix) or "_"


def parts_store_path(path: str | os.PathLike) -> Path:
    """The part-file store for a configured feature store path: the path itself, or for an HDF5
    file ``features.h5`` its sibling folder ``features.parts`` (the Ray engine's actors write
    parts, which an HDF5 file cannot take from many processes)."""
    path = Path(path)
    return path.with_suffix(".parts") if path.suffix == ".h5" else path


def open_feature_store(path: str | os.PathLike, backbone_key: str, feature_dim: int):
    """The feature store at ``path``: HDF5 (:class:`recommender.features.FeatureStore`) for a
    ``.h5`` file, else the part-file store (:class:`PartFeatureStore`) in that folder."""
    if is_parts_store(path):
        return PartFeatureStore(path, backbone_key, feature_dim)
    from recommender.features import FeatureStore

    return FeatureStore(path, backbone_key, feature_dim)
