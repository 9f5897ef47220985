"""Backbone features cached in HDF5 by image content hash, and the batched extraction loop.

Store layout (``features.h5``, format version 1)::

    /<backbone key>/<view>/hashes    (n,)  S64    hex sha256 of the encoded image
    /<backbone key>/<view>/features  (n, d) float32

``view`` is ``original`` or ``flipped`` (the horizontally mirrored image). The backbone key
changes with anything that changes the features (model file, weights, input size).

Crash safety: the main file is never modified in place. Each extracted batch is written as a
small segment file (``features.h5.segments/*.h5``, temp file + ``os.replace``), so a run
killed at any moment loses at most the batch in flight, and the main file is rewritten only
by :meth:`FeatureStore.compact` (also temp + ``os.replace``). A reader therefore sees either
the old or the new main file, plus whole segments, never a half-written one.

Features are finite: :meth:`FeatureStore.add` refuses NaN or inf, :meth:`FeatureStore.get`
raises :class:`FeatureStoreError` naming the image when the file holds them (tampered, or
written by an older version), and :meth:`FeatureStore.compact` drops such entries (the next
run re-extracts them) rather than carry them into the main file.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from recommender.catalog import BadRow, CatalogRow
from recommender.checkpoints import checkpoint
from recommender.errors import FeatureStoreError, InvalidImageError
from recommender.files import atomic_write, storage_errors
from recommender.images import DEFAULT_MAX_PIXELS, decoded_batches, load_image, read_image_bytes

log = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
VIEWS = ("original", "flipped")


def progress_bar(total: int, description: str, enabled: bool):
    """A tqdm bar over ``total`` images on stderr (disabled: a no-op bar), for image-by-image jobs."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="img", disable=not enabled, leave=False)


class FeatureStore:
    """HDF5 cache of backbone features keyed by (backbone key, view, image sha256).

    Args:
        path: the main HDF5 file (created on first :meth:`compact`).
        backbone_key: ``Backbone.identity["key"]``.
        feature_dim: features per image; a stored group with another width is an error.
    """

    def __init__(self, path: str | os.PathLike, backbone_key: str, feature_dim: int):
        self.path = Path(path)
        self.segments_dir = self.path.with_name(self.path.name + ".segments")
        self.backbone_key = backbone_key
        self.feature_dim = feature_dim
        # (view, hash) -> (file path, row); filled from the main file and the segments.
        self._where: dict[tuple[str, str], tuple[Path, int]] = {}
        self._scan()

    # -- reading -------------------------------------------------------------------------
    def _scan(self) -> None:
        self._where.clear()
        files = [self.path] if self.path.exists() else []
        if self.segments_dir.is_dir():
            files += sorted(p for p in self.segments_dir.glob("*.h5") if not p.name.startswith("."))
        for file_path in files:
            for view, hashes in self._read_hashes(file_path).items():
                for row, digest in enumerate(hashes):
                    self._where[(view, digest)] = (file_path, row)

    def _read_hashes(self, file_path: Path) -> dict[str, list[str]]:
        try:
            with h5py.File(file_path, "r") as handle:
                version = int(handle.attrs.get("format_version", -1))
                if version != STORE_FORMAT_VERSION:
                    raise FeatureStoreError(
                        f"{file_path}: feature store format {version}, this version reads {STORE_FORMAT_VERSION}"
                    )
                group = handle.get(self.backbone_key)
                if group is None:
                    return {}
                found = {}
                for view in VIEWS:
                    if view not in group:
                        continue
                    width = group[view]["features"].shape[1]
                    if width != self.feature_dim:
                        raise FeatureStoreError(
                            f"{file_path}: stored features have {width} values, the backbone gives {self.feature_dim}"
                        )
                    found[view] = [h.decode() for h in group[view]["hashes"][:]]
                return found
        except FeatureStoreError:
            raise
        except (OSError, KeyError, ValueError) as error:
            raise FeatureStoreError(
                f"feature store file {file_path} is unreadable ({error}); delete it to start a fresh cache"
            ) from None

    def __len__(self) -> int:
        return sum(1 for view, _ in self._where if view == "original")

    def contains(self, digest: str, view: str = "original") -> bool:
        """Whether features of this image (by sha256) are stored for the view."""
        return (view, digest) in self._where

    def get(self, digests: list[str], view: str = "original") -> np.ndarray:
        """Reads stored features.

        Args:
            digests: image sha256s, all present (see :meth:`contains`).
            view: ``original`` or ``flipped``.

        Returns:
            (len(digests), feature_dim) float32, in the order asked.

        Raises:
            FeatureStoreError: an image has no stored features, or its stored features are
                not finite (NaN or inf: a tampered or corrupt file), naming the image and file.
        """
        out = np.empty((len(digests), self.feature_dim), np.float32)
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for position, digest in enumerate(digests):
            try:
                file_path, row = self._where[(view, digest)]
            except KeyError:
                raise FeatureStoreError(f"no stored {view} features for image {digest[:12]}") from None
            by_file.setdefault(file_path, []).append((row, position))
        for file_path, pairs in by_file.items():
            pairs.sort()
            rows = np.fromiter((r for r, _ in pairs), dtype=np.int64, count=len(pairs))
            unique_rows, inverse = np.unique(rows, return_inverse=True)
            with h5py.File(file_path, "r") as handle:
                block = handle[self.backbone_key][view]["features"][unique_rows]
            corrupt = ~np.isfinite(block).all(axis=1)
            if corrupt.any():
                with h5py.File(file_path, "r") as handle:
                    hashes = handle[self.backbone_key][view]["hashes"][unique_rows[corrupt]]
                raise FeatureStoreError(
                    f"feature store file {file_path} holds non-finite (NaN or inf) {view} features for "
                    f"{_images(h.decode() for h in hashes)}; delete it to re-extract",
                    digests=[h.decode() for h in hashes],
                )
            out[[p for _, p in pairs]] = block[inverse]
        return out

    # -- writing -------------------------------------------------------------------------
    def add(self, digests: list[str], features: np.ndarray, view: str = "original") -> None:
        """Stores one batch durably as a new segment file (atomic: temp + rename).

        Raises:
            FeatureStoreError: the shape does not match, or a row is not finite (naming its image).
            StorageError: the disk is full.
        """
        if not digests:
            return
        features = np.asarray(features, np.float32)
        if features.shape != (len(digests), self.feature_dim):
            raise FeatureStoreError(f"features shape {features.shape} does not match {len(digests)} hashes")
        corrupt = [digest for digest, finite in zip(digests, np.isfinite(features).all(axis=1)) if not finite]
        if corrupt:
            raise FeatureStoreError(
                f"refusing to store non-finite (NaN or inf) {view} features for {_images(corrupt)}", digests=corrupt
            )
        with storage_errors(self.segments_dir):
            self.segments_dir.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
        final = self.segments_dir / name
        _write_store_file(final, {(self.backbone_key, view): (list(digests), features)})
        for row, digest in enumerate(digests):
            self._where[(view, digest)] = (final, row)

    def compact(self) -> None:
        """Merges every segment into the main file (atomic) and removes the segments.

        All groups are merged, not only this backbone's: segments of another backbone's
        interrupted run must not be lost.
        """
        segments = sorted(p for p in self.segments_dir.glob("*.h5")) if self.segments_dir.is_dir() else []
        if not segments and self.path.exists():
            return
        # (key, view) -> {hash: features}; later files (newer segments) win.
        merged: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for file_path in ([self.path] if self.path.exists() else []) + segments:
            with h5py.File(file_path, "r") as handle:
                for key in handle:
                    for view in handle[key]:
                        group = handle[key][view]
                        entries = merged.setdefault((key, view), {})
                        hashes, features = [h.decode() for h in group["hashes"][:]], group["features"][:]
                        finite = np.isfinite(features).all(axis=1)
                        if not finite.all():
                            # A cache entry, not data: dropped, the next run that needs it re-extracts it.
                            dropped = [h for h, ok in zip(hashes, finite) if not ok]
                            log.warning("%s: dropped non-finite %s features of %s", file_path, view, _images(dropped))
                        entries.update((h, f) for h, f, ok in zip(hashes, features, finite) if ok)
        groups = {
            name: (sorted(entries), np.stack([entries[h] for h in sorted(entries)]))
            for name, entries in merged.items()
            if entries
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_store_file(self.path, groups)
        for segment in segments:
            segment.unlink(missing_ok=True)
        for leftover in self.segments_dir.glob(".*.tmp") if self.segments_dir.is_dir() else []:
            leftover.unlink(missing_ok=True)  # temp files of a killed run
        self._scan()


def _images(digests) -> str:
    """``image <sha256 prefix>, ...`` for a message (at most 5 named)."""
    digests = list(digests)
    named = ", ".join(digest[:12] for digest in digests[:5])
    more = f" and {len(digests) - 5} more" if len(digests) > 5 else ""
    return f"{len(digests)} image(s) (sha256 {named}{more})"


def _write_store_file(final: Path, groups: dict[tuple[str, str], tuple[list[str], np.ndarray]]) -> None:
    """Writes an HDF5 store file to a temp name, fsyncs it, then renames it into place."""

    def write(temp: Path) -> None:
        with h5py.File(temp, "w") as handle:
            handle.attrs["format_version"] = STORE_FORMAT_VERSION
            for (key, view), (digests, features) in groups.items():
                group = handle.require_group(key).create_group(view)
                group.create_dataset("hashes", data=np.array([d.encode() for d in digests], dtype="S64"))
                group.create_dataset("features", data=np.asarray(features, np.float32))

    atomic_write(final, write)


def _rows_of(digests, pairs) -> str:
    """``catalog item 'id' (line n), ...`` for the ``(row, digest)`` pairs whose digest is listed."""
    wanted = set(digests or ())
    named = [f"{row.id!r} (line {row.line})" for row, digest in pairs if digest in wanted]
    more = f" and {len(named) - 5} more" if len(named) > 5 else ""
    return f"catalog item {', '.join(named[:5])}{more}"


class StoredFeatures:
    """(n, d) float32 features of one view that stay in the feature store until asked for.

    What the Ray engine hands the build instead of a matrix: a catalog of millions of photos
    has more features (16 KB a photo with both views) than one machine holds, and the build
    reads only the training sample's rows (:meth:`take`); the embedding actors read their own
    chunks from the store. ``shape``, ``len`` and :meth:`subset` behave as on an array.

    Args:
        store: a feature store (HDF5 or parts) that holds every digest for the view.
        digests: the rows' image sha256s, in row order.
        view: ``original`` or ``flipped``.
    """

    def __init__(self, store, digests: list[str], view: str = "original"):
        self.store = store
        self.digests = list(digests)
        self.view = view

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.digests), int(self.store.feature_dim))

    def __len__(self) -> int:
        return len(self.digests)

    def subset(self, positions) -> StoredFeatures:
        """The rows at ``positions``, still in the store."""
        return StoredFeatures(self.store, [self.digests[int(i)] for i in positions], self.view)

    def take(self, positions) -> np.ndarray:
        """Reads the rows at ``positions``: (len(positions), d) float32.

        Raises:
            FeatureStoreError: a row is not stored, unreadable or not finite.
        """
        return self.store.get([self.digests[int(i)] for i in positions], self.view)


def take_rows(features, positions) -> np.ndarray:
    """``features[positions]`` as a matrix, for an array or :class:`StoredFeatures`."""
    if isinstance(features, StoredFeatures):
        return features.take(positions)
    return features[np.asarray(positions, np.int64)]


@dataclass
class ExtractionResult:
    """Features of the rows that could be read, in catalog order.

    Attributes:
        rows: the rows that have features.
        hashes: their image sha256s.
        features: (n, d) float32 features of the original images, or (Ray engine)
            :class:`StoredFeatures` read from the store when needed.
        flipped: the same of the mirrored images, or None.
        bad_rows: rows whose image could not be read, with reasons.
        extracted: how many images went through the backbone in this run (0 = all cached).
    """

    rows: list[CatalogRow]
    hashes: list[str]
    features: np.ndarray | StoredFeatures
    flipped: np.ndarray | StoredFeatures | None
    bad_rows: list[BadRow]
    extracted: int

    def subset(self, positions: list[int]) -> ExtractionResult:
        """The result restricted to some rows (by position), in the given order."""
        index = np.asarray(positions, np.int64)
        return ExtractionResult(
            rows=[self.rows[i] for i in positions],
            hashes=[self.hashes[i] for i in positions],
            features=_subset_rows(self.features, index),
            flipped=None if self.flipped is None else _subset_rows(self.flipped, index),
            bad_rows=list(self.bad_rows),
            extracted=self.extracted,
        )


def _subset_rows(features, index: np.ndarray):
    return features.subset(index) if isinstance(features, StoredFeatures) else features[index]


def hash_rows(rows: list[CatalogRow]) -> tuple[list[CatalogRow], list[str], list[BadRow]]:
    """Reads every row's image bytes once to get its sha256 (cheap next to decoding)."""
    good, hashes, bad = [], [], []
    for row in rows:
        try:
            hashes.append(read_image_bytes(row.path).sha256)
            good.append(row)
        except InvalidImageError as error:
            bad.append(BadRow(line=row.line, id=row.id, image=row.image, reason=str(error)))
    return good, hashes, bad


def extract_features(
    rows: list[CatalogRow],
    backbone,
    store: FeatureStore | None = None,
    *,
    flips: bool = False,
    batch_size: int = 32,
    decode_workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int], None] | None = None,
) -> ExtractionResult:
    """Gets backbone features for catalog rows, extracting only what the store lacks.

    Images are decoded by a thread pool one batch ahead of the backbone (Pillow and
    TensorFlow both release the GIL), so decoding hides behind compute.

    Args:
        rows: catalog rows.
        backbone: a ``backbones.Backbone``.
        store: feature cache; None extracts everything and stores nothing.
        flips: also compute features of the mirrored images (training augmentation and
            flip-averaged embeddings).
        batch_size: images per forward pass (and per store segment).
        decode_workers: decoding threads.
        max_pixels: decompression-bomb limit per image.
        progress: called with the number of images finished after each batch.

    Returns:
        The features of every readable row; unreadable rows are in ``bad_rows``.
    """
    rows, hashes, bad_rows = hash_rows(rows)
    views = ["original", "flipped"] if flips else ["original"]
    todo = [
        (row, digest)
        for row, digest in zip(rows, hashes)
        if store is None or not all(store.contains(digest, v) for v in views)
    ]
    fresh: dict[str, dict[str, np.ndarray]] = {view: {} for view in views}
    failed: set[str] = set()
    size = backbone.input_size

    def decode(item):
        row, _ = item
        try:
            return load_image(row.path, size, max_pixels=max_pixels)
        except InvalidImageError as error:
            return error

    if progress and len(todo) < len(rows):
        progress(len(rows) - len(todo))
    extracted = 0
    # One batch is decoded ahead of the backbone (recommender.images.decoded_batches).
    for batch, decoded in decoded_batches(todo, batch_size, decode, decode_workers):
        images, digests = [], []
        for (row, digest), image in zip(batch, decoded):
            if isinstance(image, InvalidImageError):
                bad_rows.append(BadRow(line=row.line, id=row.id, image=row.image, reason=str(image), sha256=digest))
                failed.add(row.id)
            else:
                images.append(image)
                digests.append(digest)
        if images:
            stacked = np.stack(images)
            for view in views:
                batch_input = stacked if view == "original" else stacked[:, :, ::-1]
                features = backbone.extract(batch_input)
                finite = np.isfinite(features).all(axis=1)
                if not finite.all():
                    corrupt = [digest for digest, ok in zip(digests, finite) if not ok]
                    raise FeatureStoreError(
                        f"{_rows_of(corrupt, batch)}: the backbone gave non-finite (NaN or inf) {view} features; "
                        "check its weights",
                        digests=corrupt,
                    )
                if store is not None:
                    store.add(digests, features, view)
                    checkpoint("features")
                fresh[view].update(zip(digests, features))
            extracted += len(images)
        if progress:
            progress(len(batch))
    keep = [(row, digest) for row, digest in zip(rows, hashes) if row.id not in failed]
    out_rows = [row for row, _ in keep]
    out_hashes = [digest for _, digest in keep]
    matrices = {}
    for view in views:
        matrix = np.empty((len(keep), backbone.feature_dim), np.float32)
        cached_positions = [i for i, digest in enumerate(out_hashes) if digest not in fresh[view]]
        if cached_positions:
            try:
                matrix[cached_positions] = store.get([out_hashes[i] for i in cached_positions], view)
            except FeatureStoreError as error:
                raise FeatureStoreError(f"{_rows_of(error.digests, keep)}: {error}", digests=error.digests) from None
        for i, digest in enumerate(out_hashes):
            if digest in fresh[view]:
                matrix[i] = fresh[view][digest]
        matrices[view] = matrix
    if store is not None and extracted:
        store.compact()
    return ExtractionResult(
        rows=out_rows,
        hashes=out_hashes,
        features=matrices["original"],
        flipped=matrices.get("flipped"),
        bad_rows=bad_rows,
        extracted=extracted,
    )
