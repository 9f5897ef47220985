"""Precomputed "similar items" panels: the folder format, its manifest, and reading it back verified.

A panels folder holds, for every catalog item of one bundle, its ``k`` nearest other items as
``Recommender.similar_to_item`` finds them (``indexer.panels.write_panels`` writes it)::

    PANELS/
      panels.parquet   one row per (item, rank): id, rank (0 = nearest), neighbor_id, distance
                       (float32, Euclidean), and per_value (the item's value of the per column)
                       when computed per column
      panels.jsonl     one line per item: {"id", "neighbors": [{"id", "distance"}, ...]}
                       (and "per_value"), nearest first, for tools that do not read Parquet
      panels.json      written last: format version, the bundle's id and the sha256 of its
                       manifest.json, k, the per column, counts, and the sha256 and size of
                       each other file

Panels belong to one bundle: :func:`load_panel_map` refuses panels whose bundle id or manifest
hash is not the served bundle's (:class:`PanelsMismatchError`), and any file that does not
match its hash (:class:`PanelsError`), so a stale or tampered panel is never served.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from recommender.backbones import file_sha256
from recommender.errors import PanelsError, PanelsMismatchError

PANELS_FORMAT_VERSION = 1
PANELS_MANIFEST = "panels.json"
PANELS_PARQUET = "panels.parquet"
PANELS_JSONL = "panels.jsonl"
PANELS_FILES = (PANELS_PARQUET, PANELS_JSONL)


@dataclass(frozen=True)
class PanelFile:
    """One file of a panels folder as the manifest records it."""

    sha256: str
    bytes: int


@dataclass(frozen=True)
class PanelsManifest:
    """``panels.json``: what the panels were computed from and the identity of each file.

    Attributes:
        format_version: :data:`PANELS_FORMAT_VERSION`.
        bundle_id: the bundle the panels belong to.
        bundle_manifest_sha256: sha256 of that bundle's ``manifest.json`` (a bundle rewritten
            under the same id does not match).
        k: neighbours per item (fewer where the catalog, or the item's per value, has fewer
            other items).
        per_column: the label column neighbours were restricted to (each item's own value),
            or None for plain panels.
        items: items with a panel.
        neighbors: rows of ``panels.parquet`` (sum of every item's neighbours).
        items_without_value: catalog items left out because they have no value in
            ``per_column`` (0 without one).
        created_at: UTC time of writing, ISO 8601.
        files: ``{file name: PanelFile}`` for every file but the manifest.
    """

    format_version: int
    bundle_id: str
    bundle_manifest_sha256: str
    k: int
    per_column: str | None
    items: int
    neighbors: int
    items_without_value: int
    created_at: str
    files: Mapping[str, PanelFile] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The manifest as JSON-ready data."""
        return {
            "format_version": self.format_version,
            "bundle_id": self.bundle_id,
            "bundle_manifest_sha256": self.bundle_manifest_sha256,
            "k": self.k,
            "per_column": self.per_column,
            "items": self.items,
            "neighbors": self.neighbors,
            "items_without_value": self.items_without_value,
            "created_at": self.created_at,
            "files": {name: {"sha256": f.sha256, "bytes": f.bytes} for name, f in self.files.items()},
        }

    @classmethod
    def from_json(cls, payload, source: str) -> PanelsManifest:
        """Validates ``panels.json`` data.

        Raises:
            PanelsError: naming the first missing or malformed field, or an unsupported version.
        """

        def fail(name: str, problem: str):
            raise PanelsError(f"{source}: {name}: {problem}")

        if not isinstance(payload, Mapping):
            fail("(top level)", "expected an object")
        version = payload.get("format_version")
        if version != PANELS_FORMAT_VERSION:
            fail("format_version", f"{version!r} is not {PANELS_FORMAT_VERSION}, the version this code reads")

        def text(name: str, optional: bool = False) -> str | None:
            value = payload.get(name)
            if value is None and optional:
                return None
            if not isinstance(value, str) or not value:
                fail(name, f"expected a non-empty string, got {value!r}")
            return value

        def count(name: str, minimum: int = 0) -> int:
            value = payload.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                fail(name, f"expected an integer >= {minimum}, got {value!r}")
            return value

        files = payload.get("files")
        if not isinstance(files, Mapping):
            fail("files", "expected an object")
        parsed = {}
        for name in PANELS_FILES:
            entry = files.get(name)
            if not isinstance(entry, Mapping) or not isinstance(entry.get("sha256"), str):
                fail(f"files.{name}", "missing or without a sha256")
            size = entry.get("bytes")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                fail(f"files.{name}.bytes", f"expected an integer >= 0, got {size!r}")
            parsed[name] = PanelFile(sha256=entry["sha256"], bytes=size)
        unexpected = sorted(set(files) - set(PANELS_FILES))
        if unexpected:
            fail("files", f"unexpected entries {', '.join(unexpected)}")
        return cls(
            format_version=version,
            bundle_id=text("bundle_id"),
            bundle_manifest_sha256=text("bundle_manifest_sha256"),
            k=count("k", 1),
            per_column=text("per_column", optional=True),
            items=count("items"),
            neighbors=count("neighbors"),
            items_without_value=count("items_without_value"),
            created_at=text("created_at"),
            files=MappingProxyType(parsed),
        )


#: Folder of an artifact root holding one panels folder per bundle: ``ROOT/panels/<bundle id>/``
#: (``recommender rebuild --panels`` writes there; the web app looks there by default).
PANELS_FOLDER = "panels"


def default_panels_root(bundle: str | os.PathLike) -> Path | None:
    """``ROOT/panels`` for a bundle published in an artifact root (``ROOT/bundles/<id>``), else None."""
    bundle = Path(os.path.realpath(bundle))
    if bundle.parent.name != "bundles":
        return None
    return bundle.parent.parent / PANELS_FOLDER


def panels_folder_for(root: str | os.PathLike, bundle_id: str) -> Path:
    """The panels folder of a bundle: ``root`` itself when it is one (holds ``panels.json``),
    else ``root/<bundle_id>``."""
    root = Path(root)
    return root if (root / PANELS_MANIFEST).is_file() else root / bundle_id


def bundle_manifest_sha256(bundle: str | os.PathLike) -> str:
    """sha256 of a bundle's ``manifest.json``: with the id, what ties panels to one bundle."""
    from recommender.bundle import MANIFEST

    return file_sha256(Path(bundle) / MANIFEST)


def read_panels_manifest(folder: str | os.PathLike) -> PanelsManifest:
    """Reads and validates ``panels.json`` (no file hashing).

    Raises:
        PanelsError: no folder, no or malformed manifest.
    """
    folder = Path(folder)
    path = folder / PANELS_MANIFEST
    if not path.is_file():
        raise PanelsError(f"{folder}: no {PANELS_MANIFEST} (not a panels folder, or its write did not finish)")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PanelsError(f"{path}: not valid JSON ({error})") from None
    return PanelsManifest.from_json(payload, str(path))


def verify_panels(folder: str | os.PathLike) -> PanelsManifest:
    """Checks every panels file against ``panels.json``: present, same size, same sha256.

    Raises:
        PanelsError: naming the first file that is missing, truncated or changed.
    """
    folder = Path(folder)
    manifest = read_panels_manifest(folder)
    for name, expected in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise PanelsError(f"{folder}: file {name} is missing")
        size = path.stat().st_size
        if size != expected.bytes:
            raise PanelsError(f"{folder}: file {name} has {size} bytes, panels.json says {expected.bytes}")
        if file_sha256(path) != expected.sha256:
            raise PanelsError(f"{folder}: file {name} does not match its sha256 in panels.json (changed or corrupt)")
    return manifest


@dataclass(frozen=True)
class PanelMap:
    """Panels held compactly in memory, in the bundle's catalog order (FAISS positions).

    Attributes:
        manifest: the verified ``panels.json``.
        positions: (n, k) int32 neighbour positions, -1 where an item has fewer than k.
        distances: (n, k) float32 Euclidean distances, +inf where there is no neighbour.
        has_panel: (n,) bool, False for items left out (no value in the per column).
    """

    manifest: PanelsManifest
    positions: np.ndarray
    distances: np.ndarray
    has_panel: np.ndarray

    @property
    def k(self) -> int:
        """Neighbours stored per item."""
        return self.manifest.k

    def neighbors_of(self, position: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The first ``k`` stored neighbours of the item at ``position``, or None without a panel.

        Returns:
            ``((m,) int32 positions, (m,) float32 distances)``, nearest first, m <= k.
        """
        if k > self.manifest.k or not self.has_panel[position]:
            return None
        row = self.positions[position, :k]
        found = row >= 0
        return row[found], self.distances[position, :k][found]


def load_panel_map(
    folder: str | os.PathLike, bundle_id: str, manifest_sha256: str, item_ids: Sequence[str]
) -> PanelMap:
    """Reads a panels folder written for the given bundle into a :class:`PanelMap`.

    Args:
        folder: the panels folder.
        bundle_id: the id of the bundle the panels must belong to.
        manifest_sha256: sha256 of that bundle's ``manifest.json`` (:func:`bundle_manifest_sha256`).
        item_ids: the bundle's catalog ids in FAISS order (``Recommender.rows``).

    Raises:
        PanelsMismatchError: the panels name another bundle id or manifest hash.
        PanelsError: a file missing or changed (hash), or ids the bundle does not have.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder = Path(folder)
    manifest = read_panels_manifest(folder)
    # Compared before hashing the files: another bundle's panels are skipped without reading them.
    if manifest.bundle_id != bundle_id or manifest.bundle_manifest_sha256 != manifest_sha256:
        raise PanelsMismatchError(
            f"{folder}: panels of bundle {manifest.bundle_id} (manifest sha256 "
            f"{manifest.bundle_manifest_sha256[:12]}...), not of bundle {bundle_id} ({manifest_sha256[:12]}...)"
        )
    manifest = verify_panels(folder)
    try:
        table = pq.read_table(folder / PANELS_PARQUET, columns=["id", "rank", "neighbor_id", "distance"])
    except (OSError, pa.ArrowException) as error:
        raise PanelsError(f"{folder / PANELS_PARQUET}: cannot read ({error})") from None
    if table.num_rows != manifest.neighbors:
        raise PanelsError(
            f"{folder}: {PANELS_PARQUET} has {table.num_rows} rows, panels.json says {manifest.neighbors}"
        )
    known = pa.array(list(item_ids), type=pa.string())
    # Vectorised id -> position lookups (no Python loop over the rows); null: an unknown id.
    items = pc.index_in(table["id"].cast(pa.string()), value_set=known)
    neighbors = pc.index_in(table["neighbor_id"].cast(pa.string()), value_set=known)
    if items.null_count or neighbors.null_count:
        raise PanelsError(f"{folder}: {PANELS_PARQUET} names ids the bundle {bundle_id} does not have")
    items = items.to_numpy(zero_copy_only=False).astype(np.int64)
    neighbors = neighbors.to_numpy(zero_copy_only=False).astype(np.int32)
    ranks = table["rank"].to_numpy(zero_copy_only=False).astype(np.int64)
    if len(ranks) and (ranks.min() < 0 or ranks.max() >= manifest.k):
        raise PanelsError(f"{folder}: {PANELS_PARQUET} has ranks outside 0..{manifest.k - 1}")
    size = len(item_ids)
    positions = np.full((size, manifest.k), -1, dtype=np.int32)
    distances = np.full((size, manifest.k), np.inf, dtype=np.float32)
    positions[items, ranks] = neighbors
    distances[items, ranks] = table["distance"].to_numpy(zero_copy_only=False).astype(np.float32)
    if manifest.per_column is None:
        # Every item has a panel (one with no other item in the catalog has an empty one).
        has_panel = np.ones(size, dtype=bool)
    else:
        # Items without a value in the column are left out (an item alone with its value too).
        has_panel = np.zeros(size, dtype=bool)
        has_panel[items] = True
    return PanelMap(manifest=manifest, positions=positions, distances=distances, has_panel=has_panel)
