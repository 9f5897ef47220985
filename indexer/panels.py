"""The panels job: every catalog item's k nearest other items, precomputed into a verified folder.

``write_panels(bundle, out, k)`` answers, for every item, what ``Recommender.similar_to_item``
would (the same exclusion of the item and of same-photo duplicates,
``recommender.engine.same_photo_positions``), in batches over the index's stored vectors: no
image is decoded and the backbone never runs. The folder format is ``recommender.panels``.

With ``per_column``, each item's neighbours are searched among the items with the item's own
value in that label column (what ``similar_to_item(id, filters={column: own value})``
answers): the "more like this, in the same department" panel of a product page. Panels of
every value for every item (k x values per item) are not computed: a product page shows the
item's own value, and the other values are a live filtered search away.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recommender.checkpoints import checkpoint
from recommender.engine import DEFAULT_K, check_k, same_photo_positions
from recommender.errors import FilterError, PanelsError
from recommender.panels import (
    PANELS_FORMAT_VERSION,
    PANELS_JSONL,
    PANELS_MANIFEST,
    PANELS_PARQUET,
    PanelFile,
    PanelsManifest,
    bundle_manifest_sha256,
)

log = logging.getLogger(__name__)

#: Items searched per FAISS call: large enough for FAISS's batched (BLAS) distance path, small
#: enough that a chunk's (batch, k + duplicates) results stay a few MB.
DEFAULT_BATCH_SIZE = 1024


@dataclass(frozen=True)
class PanelsReport:
    """What :func:`write_panels` wrote.

    Attributes:
        out: the panels folder.
        bundle_id: the bundle the panels belong to.
        k: neighbours per item.
        per_column: the column searched within (the item's own value), or None.
        items: items with a panel.
        neighbors: neighbour rows written.
        items_without_value: items left out for having no value in ``per_column``.
        seconds: time of the searches and writing (not of loading the bundle).
        items_per_second: ``items / seconds``.
    """

    out: Path
    bundle_id: str
    k: int
    per_column: str | None
    items: int
    neighbors: int
    items_without_value: int
    seconds: float
    items_per_second: float

    def to_json(self) -> dict:
        """JSON-ready fields (the CLI prints them)."""
        return {
            "out": str(self.out),
            "bundle_id": self.bundle_id,
            "k": self.k,
            "per_column": self.per_column,
            "items": self.items,
            "neighbors": self.neighbors,
            "items_without_value": self.items_without_value,
            "seconds": round(self.seconds, 3),
            "items_per_second": round(self.items_per_second, 1),
        }


@dataclass
class _Bundle:
    """What the job needs of a bundle: its catalog rows, index, attributes and identity."""

    path: Path
    bundle_id: str
    rows: list
    index: object
    attributes: object
    label_columns: list[str]


def _open_bundle(source) -> _Bundle:
    """A loaded ``Recommender`` (or ``_Bundle``) as is; a path read without the model (no TensorFlow)."""
    if hasattr(source, "index") and hasattr(source, "rows"):
        return _Bundle(
            source.path, source.bundle_id, source.rows, source.index, source.attributes, list(source.label_columns)
        )
    from recommender.bundle import read_catalog_rows, read_label_space, verify_bundle
    from recommender.filters import AttributeIndex
    from recommender.index import VectorIndex

    path = Path(source).resolve()
    manifest = verify_bundle(path)
    rows = read_catalog_rows(path, manifest.counts.items)
    space = read_label_space(path)
    # The CPU index: the job's batch searches are what FAISS's CPU BLAS path is good at, and
    # a GPU is left to the serving processes.
    index = VectorIndex.load(path / "index.faiss", use_gpu=False, parameters=manifest.index.parameters)
    attributes = AttributeIndex(rows, space.columns, space.tags_column)
    return _Bundle(path, manifest.bundle_id, rows, index, attributes, list(space.columns))


def checked_bundle(source, k: int, per_column: str | None, batch_size: int) -> _Bundle:
    """The bundle of a panels job, once its settings are known to be good for it.

    Raises:
        QueryError: ``k`` out of range; FilterError for ``per_column`` not a label column.
        ValueError: ``batch_size`` below 1.
        BundleError: a bundle folder that does not verify.
    """
    check_k(k)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    bundle = _open_bundle(source)
    if per_column is not None and per_column not in bundle.label_columns:
        raise FilterError(
            f"--per column {per_column!r} is not a label column of bundle {bundle.bundle_id} "
            f"(label columns: {', '.join(bundle.label_columns)})"
        )
    return bundle


def compute_panels(
    source,
    k: int = DEFAULT_K,
    per_column: str | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    items: np.ndarray | None = None,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Every item's ``k`` nearest other items, as ``similar_to_item`` finds them, in batches.

    Args:
        source: a loaded ``Recommender`` or a bundle folder.
        k: neighbours per item, 1..100.
        per_column: a label column: search each item's neighbours among the items with its
            own value there (items without a value get no panel). None: the whole catalog.
        batch_size: items per FAISS search.
        progress: show a tqdm bar.
        items: only these catalog positions' panels (one shard of a distributed job,
            ``indexer.ray_engine.compute_panels_ray``); None: every item's.

    Returns:
        ``(item positions with a panel, ascending; (m, k) int64 neighbour positions, -1 padded;
        (m, k) float32 distances, +inf padded)``.

    Raises:
        QueryError: ``k`` out of range; FilterError for ``per_column`` not a label column.
        BundleError: a bundle folder that does not verify.
    """
    from tqdm.auto import tqdm

    from recommender.index import SearchResult, VectorIndex, drop_excluded

    bundle = checked_bundle(source, k, per_column, batch_size)
    size = len(bundle.rows)
    by_hash = same_photo_positions(bundle.rows)
    excluded = [by_hash.get(row.sha256, [position]) for position, row in enumerate(bundle.rows)]
    if per_column is None:
        groups = [(np.arange(size, dtype=np.int64), None)]
    else:
        # One group per value: its items, and the mask the engine's filtered search would use.
        groups = []
        for value in bundle.attributes.values(per_column):
            allowed = bundle.attributes.mask({per_column: [value]})
            groups.append((np.flatnonzero(allowed), allowed))
    wanted = None if items is None else np.isin(np.arange(size), np.asarray(items, dtype=np.int64))
    done_positions, done_neighbors, done_distances = [], [], []
    total = sum(len(members) if wanted is None else int(wanted[members].sum()) for members, _ in groups)
    bar = tqdm(total=total, desc="panels", unit="item", disable=not progress)
    try:
        for members, allowed in groups:
            queries = members if wanted is None else members[wanted[members]]
            if len(queries) == 0:
                continue
            subset = None
            if allowed is not None and bundle.index.filter_method(len(members)) == "exact scan":
                # The engine scans the value's items exactly; so does a flat index of just those
                # vectors, and FAISS searches that in batches with BLAS (a selector scan runs one
                # query at a time). Same neighbours; distances agree to float32 rounding.
                subset = VectorIndex.build(bundle.index.reconstruct_batch(members), "flat", use_gpu=False)
            for start in range(0, len(queries), batch_size):
                chunk = queries[start : start + batch_size]
                vectors = bundle.index.reconstruct_batch(chunk)
                chunk_excluded = [excluded[int(position)] for position in chunk]
                widest = max(len(positions) for positions in chunk_excluded)
                if allowed is None:
                    found = bundle.index.search_excluding(vectors, chunk_excluded, k)
                elif subset is not None:
                    local = subset.search(vectors, k + widest)
                    positions = np.where(local.positions >= 0, members[np.maximum(local.positions, 0)], -1)
                    found = drop_excluded(SearchResult(positions, local.distances), chunk_excluded, k)
                else:  # an HNSW walk with the value's selector, as the engine's filtered search
                    found = drop_excluded(bundle.index.search(vectors, k + widest, allowed=allowed), chunk_excluded, k)
                done_positions.append(chunk)
                done_neighbors.append(_padded(found.positions, k, -1))
                done_distances.append(_padded(found.distances, k, np.inf))
                bar.update(len(chunk))
    finally:
        bar.close()
    if not done_positions:
        return [], np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    positions = np.concatenate(done_positions)
    order = np.argsort(positions, kind="stable")  # catalog order, whatever the grouping
    neighbors = np.concatenate(done_neighbors)[order]
    distances = np.concatenate(done_distances)[order].astype(np.float32)
    return positions[order].tolist(), neighbors, distances


def _padded(array: np.ndarray, k: int, fill) -> np.ndarray:
    """``array`` widened to k columns (a catalog smaller than k + 1 gives fewer)."""
    if array.shape[1] >= k:
        return array[:, :k]
    return np.concatenate([array, np.full((len(array), k - array.shape[1]), fill, array.dtype)], axis=1)


def write_panels(
    source,
    out: str | os.PathLike,
    k: int = DEFAULT_K,
    per_column: str | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    progress: bool = False,
    engine: str = "local",
    ray_config=None,
) -> PanelsReport:
    """Computes every item's panel and writes the panels folder atomically.

    The folder is written as a temporary sibling and renamed into place, ``panels.json``
    last: a reader (or a killed job) never sees a half-written folder at ``out``.

    Args:
        source: a loaded ``Recommender`` or a bundle folder.
        out: the panels folder to create.
        k: neighbours per item, 1..100.
        per_column: see :func:`compute_panels`.
        batch_size: items per FAISS search.
        overwrite: replace an existing folder at ``out`` (after the new one is complete).
        progress: show a tqdm bar.
        engine: ``local`` (this process) or ``ray`` (shards of the items in Ray tasks,
            :func:`indexer.ray_engine.compute_panels_ray`; every node must read the bundle).
        ray_config: the ``recommender.config.RayConfig`` of the ``ray`` engine.

    Returns:
        A :class:`PanelsReport`.

    Raises:
        PanelsError: ``out`` exists and ``overwrite`` is false.
        QueryError, FilterError, BundleError: as for :func:`compute_panels`.
        RayEngineError: the ``ray`` engine cannot start or a task failed.
        StorageError: the disk filled up while writing (nothing is left at ``out``).
    """
    from recommender.files import storage_errors

    out = Path(out)
    if out.exists() and not overwrite:
        raise PanelsError(f"{out} already exists; choose another --out or pass --overwrite")
    check_k(k)
    bundle = _open_bundle(source)
    manifest_sha256 = bundle_manifest_sha256(bundle.path)
    import pyarrow as pa
    import pyarrow.parquet  # noqa: F401

    # One-time costs before the clock starts, so items/s measures the job: the first conversion
    # of Python strings makes pyarrow import pandas (~1 s on the 2-core machine).
    pa.array([""], type=pa.string())

    started = time.perf_counter()
    if engine == "ray":
        from indexer.ray_engine import compute_panels_ray
        from recommender.config import RayConfig

        positions, neighbors, distances = compute_panels_ray(
            bundle, k, per_column, batch_size=batch_size, config=ray_config or RayConfig()
        )
    elif engine == "local":
        positions, neighbors, distances = compute_panels(
            bundle, k, per_column, batch_size=batch_size, progress=progress
        )
    else:
        raise ValueError(f"engine must be local or ray, got {engine!r}")
    with storage_errors(out):
        manifest = _write_folder(out, bundle, manifest_sha256, k, per_column, positions, neighbors, distances)
    seconds = time.perf_counter() - started
    log.info("wrote panels of %d items to %s in %.2f s", manifest.items, out, seconds)
    return PanelsReport(
        out=out,
        bundle_id=bundle.bundle_id,
        k=k,
        per_column=per_column,
        items=manifest.items,
        neighbors=manifest.neighbors,
        items_without_value=manifest.items_without_value,
        seconds=seconds,
        items_per_second=manifest.items / seconds if seconds > 0 else float("inf"),
    )


def _write_folder(out: Path, bundle: _Bundle, manifest_sha256, k, per_column, positions, neighbors, distances):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recommender.backbones import file_sha256

    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    temp.mkdir()
    try:
        ids = [row.id for row in bundle.rows]
        valid = neighbors >= 0
        counts = valid.sum(axis=1)
        item_column = np.repeat(np.asarray(positions, dtype=np.int64), counts)
        ranks = np.concatenate([np.arange(count) for count in counts]) if len(counts) else np.empty(0, np.int64)
        flat_neighbors = neighbors[valid]
        # Strings by take() from one array of the ids: vectorised, and no numpy object arrays
        # (pyarrow would import pandas to read those).
        id_array = pa.array(ids, type=pa.string())
        columns = {
            "id": id_array.take(pa.array(item_column)),
            "rank": pa.array(ranks.astype(np.int16), type=pa.int16()),
            "neighbor_id": id_array.take(pa.array(flat_neighbors.astype(np.int64))),
            "distance": pa.array(distances[valid].astype(np.float32), type=pa.float32()),
        }
        per_values = None
        if per_column is not None:
            per_values = [bundle.rows[position].labels.get(per_column) for position in positions]
            item_rows = np.repeat(np.arange(len(positions)), counts)
            columns["per_value"] = pa.array(per_values, type=pa.string()).take(pa.array(item_rows))
        pq.write_table(pa.table(columns), temp / PANELS_PARQUET)
        with open(temp / PANELS_JSONL, "w", encoding="utf-8") as handle:
            for i, position in enumerate(positions):
                line = {
                    "id": ids[position],
                    "neighbors": [
                        {"id": ids[int(p)], "distance": float(d)} for p, d in zip(neighbors[i], distances[i]) if p >= 0
                    ],
                }
                if per_values is not None:
                    line["per_value"] = per_values[i]
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        files = {
            name: PanelFile(sha256=file_sha256(temp / name), bytes=(temp / name).stat().st_size)
            for name in (PANELS_PARQUET, PANELS_JSONL)
        }
        manifest = PanelsManifest(
            format_version=PANELS_FORMAT_VERSION,
            bundle_id=bundle.bundle_id,
            bundle_manifest_sha256=manifest_sha256,
            k=k,
            per_column=per_column,
            items=len(positions),
            neighbors=int(valid.sum()),
            items_without_value=len(bundle.rows) - len(positions),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            files=files,
        )
        checkpoint("panels-manifest")  # every file but the manifest written: a kill here must leave no DIR
        (temp / PANELS_MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
        for path in temp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(temp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, out)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return manifest


def write_published_panels(
    root: str | os.PathLike,
    summary: dict,
    k: int = DEFAULT_K,
    per_column: str | None = None,
    *,
    engine: str = "local",
    ray_config=None,
) -> dict:
    """The nightly job's panels step: panels of the bundle a rebuild left published.

    Writes ``ROOT/panels/<bundle id>/`` for the run's new bundle (state ``published``), or for
    the kept one (``unchanged``) when it has none yet, and removes the panels of bundles the
    run pruned. Never raises for a failed write: the bundle is published either way, and the
    outcome is returned for the run summary (an absent panel only means live searches).

    Args:
        root: the artifact root.
        summary: what ``indexer.rebuild.rebuild`` returned.
        k: neighbours per item.
        per_column: as for :func:`write_panels`.
        engine: ``local`` or ``ray`` (the run's own ``--engine``), as for :func:`write_panels`.
        ray_config: the run's ``RayConfig``.

    Returns:
        ``{"state": "written" | "kept" | "failed" | "skipped", ...}``: ``path``, ``items``,
        ``seconds`` when written, ``reason`` when failed or skipped.
    """
    from recommender.errors import RecommenderError
    from recommender.panels import PANELS_FOLDER

    root = Path(root)
    folder = root / PANELS_FOLDER
    for pruned in summary.get("pruned") or ():
        shutil.rmtree(folder / pruned, ignore_errors=True)
    bundle_id = summary.get("bundle_id") if summary.get("state") == "published" else summary.get("current")
    if summary.get("state") not in ("published", "unchanged") or not bundle_id:
        return {"state": "skipped", "reason": f"run state {summary.get('state')}: no bundle to write panels for"}
    out = folder / bundle_id
    if out.exists():
        return {"state": "kept", "path": str(out)}
    try:
        report = write_panels(root / "bundles" / bundle_id, out, k, per_column, engine=engine, ray_config=ray_config)
    except (RecommenderError, OSError) as error:
        log.error("panels of bundle %s not written (the bundle stays published): %s", bundle_id, error)
        return {"state": "failed", "path": str(out), "reason": f"{type(error).__name__}: {error}"}
    return {"state": "written", "path": str(out), "items": report.items, "seconds": round(report.seconds, 3)}
