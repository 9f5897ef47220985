"""Build a bundle from a catalog: read -> features -> train -> embed -> index -> write.

catalog rows -> load_image (uint8) -> backbone (n, d) float32, cached in the feature store
  -> classifier trained on the catalog -> (n, 512) embeddings -> StandardScaler
  -> FAISS index -> bundle folder (atomic)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from recommender.backbones import load_backbone
from recommender.bundle import (
    RANDOM_WEIGHTS,
    copy_backbone_file,
    library_versions,
    new_bundle_id,
    write_bundle,
    write_json,
)
from recommender.catalog import (
    BadRow,
    Catalog,
    CatalogRow,
    DisplayColumns,
    check_bad_fraction,
    drop_rare_classes,
    read_catalog,
)
from recommender.checkpoints import checkpoint
from recommender.classifier import ClassifierRunner, TrainedClassifier, train_classifier, training_sample
from recommender.config import BuildConfig
from recommender.errors import BundleError, CatalogError, TrainingError
from recommender.feature_parts import PartFeatureStore, open_feature_store, parts_store_path
from recommender.features import ExtractionResult, StoredFeatures, extract_features, progress_bar, take_rows
from recommender.index import (
    EMBEDDINGS_FILE,
    IVF_KINDS,
    VectorIndex,
    choose_kind,
    measure_recall,
    rerank_bytes_per_vector,
)
from recommender.labels import LabelSpace, Taxonomy, primary_column_of
from recommender.manifest import CatalogRecord
from recommender.scalers import fit_scaler, scaler_arrays, transform_in_place

log = logging.getLogger(__name__)

#: How many catalog items the build checks find themselves first (all of them up to this).
SELF_CHECK_SAMPLE = 2000
#: Seeded catalog vectors the build measures the index's recall@6 against exact search on.
RECALL_QUERIES = 1000


@dataclass
class BuildReport:
    """What a build did, for the CLI summary and the bundle's ``build_report.json``.

    ``index_shards``: how many parts the index was added in (Ray tasks with ``--engine ray``
    and an IVF kind; 1 otherwise). ``train_rows``: the rows the classifier trained on (fewer
    than ``items`` above ``--train-sample``; 0 when a trained classifier was reused).
    """

    bundle: str
    bundle_id: str
    items: int
    total_rows: int
    bad_rows: list[dict]
    extracted: int
    cached: int
    seconds: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    self_retrieval: float = 0.0
    index_shards: int = 1
    train_rows: int = 0

    def to_json(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class PreparedCatalog:
    """A catalog with its backbone features: the expensive, cacheable half of a build.

    Attributes:
        catalog: the catalog as read.
        backbone: the loaded backbone.
        extraction: features of every readable row (rows, hashes, features, flipped).
        bad_rows: rows left out so far (reading and decoding), with reasons.
        seconds: timings of loading the backbone and extracting features.
    """

    catalog: Catalog
    backbone: object
    extraction: ExtractionResult
    bad_rows: list[BadRow]
    seconds: dict[str, float]
    taxonomy: Taxonomy | None = None


def load_catalog(source: str | Path, config: BuildConfig) -> Catalog:
    """Reads a catalog with the column settings of a build config.

    Hierarchy levels that are not among the label columns are read as label columns too.
    """
    label_columns = list(config.label_columns)
    label_columns += [level for level in config.hierarchy or () if level not in label_columns]
    return read_catalog(
        source,
        image_column=config.image_column,
        id_column=config.id_column,
        display=DisplayColumns(title=config.title_column, price=config.price_column, url=config.url_column),
        label_columns=label_columns,
        split_column=config.split_column,
        splits=list(config.splits) if config.splits else None,
        tags_column=config.tags_column,
        tags_separator=config.tags_separator,
        image_root=config.image_root,
    )


def prepare_catalog(catalog: str | Path | Catalog, config: BuildConfig, *, progress: bool = False) -> PreparedCatalog:
    """Reads a catalog and gets the features of every photo (from the store where it can).

    Bad rows found on the way (reading, decoding, a broken taxonomy, and with
    ``config.min_class_examples`` the rows of too small primary classes) are left out and
    judged together against ``config.max_bad_fraction``.

    Raises:
        CatalogError: unreadable catalog, too many bad rows (listed), or none left.
        BackboneError / WeightsUnavailableError: the backbone cannot be loaded.
    """
    started = time.perf_counter()
    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog, config)
    # Fail before the expensive part when reading alone already found too many bad rows.
    check_bad_fraction(catalog.total, catalog.bad_rows, config.max_bad_fraction)
    if config.engine == "ray" and config.ray.address:
        from indexer.ray_engine import check_reachable

        check_reachable(config.ray.address)  # before minutes of loading, not after
    backbone = load_backbone(config.backbone)
    seconds = {"load_backbone": time.perf_counter() - started}
    mark = time.perf_counter()
    if config.engine == "ray":
        from indexer.ray_engine import extract_features_ray

        store = PartFeatureStore(parts_store_path(config.feature_store), backbone.identity["key"], backbone.feature_dim)
        extraction = extract_features_ray(
            catalog.rows,
            backbone,
            store,
            config=config.ray,
            flips=config.flips,
            batch_size=config.batch_size,
            max_pixels=config.max_pixels,
            progress=progress,
        )
    else:
        store = open_feature_store(config.feature_store, backbone.identity["key"], backbone.feature_dim)
        with progress_bar(len(catalog.rows), "features", progress) as bar:
            extraction = extract_features(
                catalog.rows,
                backbone,
                store,
                flips=config.flips,
                batch_size=config.batch_size,
                max_pixels=config.max_pixels,
                progress=bar.update,
            )
    seconds["features"] = time.perf_counter() - mark
    bad_rows = catalog.bad_rows + extraction.bad_rows
    taxonomy = None
    if config.hierarchy:
        extraction, taxonomy, conflicts = apply_taxonomy(extraction, config.hierarchy)
        if conflicts:
            log.warning("%d row(s) break the %s hierarchy and are left out", len(conflicts), ">".join(taxonomy.levels))
        bad_rows = bad_rows + conflicts
    if config.min_class_examples > 1:
        primary = primary_column_of(catalog.label_columns, config.hierarchy)
        kept, rare = drop_rare_classes(extraction.rows, primary, config.min_class_examples)
        if rare:
            log.warning("%d row(s) of classes under --min-class-examples are left out", len(rare))
            extraction, taxonomy = keep_rows(extraction, kept, taxonomy)
            bad_rows = bad_rows + rare
    check_bad_fraction(catalog.total, bad_rows, config.max_bad_fraction)
    if not extraction.rows:
        raise CatalogError("no readable catalog rows left to build from", bad_rows=bad_rows)
    return PreparedCatalog(
        catalog=catalog,
        backbone=backbone,
        extraction=extraction,
        bad_rows=bad_rows,
        seconds=seconds,
        taxonomy=taxonomy,
    )


def keep_rows(
    extraction: ExtractionResult, positions: list[int], taxonomy: Taxonomy | None
) -> tuple[ExtractionResult, Taxonomy | None]:
    """The extraction restricted to some rows, with the taxonomy learned again from them
    (a path none of the kept rows has must not stay a valid prediction)."""
    extraction = extraction.subset(positions)
    if taxonomy is not None:
        # The rows already agree on one parent per child, so a subset has no conflicts.
        taxonomy, _ = Taxonomy.learn([row.labels for row in extraction.rows], taxonomy.levels)
    return extraction, taxonomy


def apply_taxonomy(
    extraction: ExtractionResult, levels: tuple[str, ...]
) -> tuple[ExtractionResult, Taxonomy, list[BadRow]]:
    """Learns the taxonomy from the extracted rows and leaves out the rows that break it.

    Returns:
        ``(extraction without the conflicting rows, taxonomy, those rows as bad rows)``.
    """
    taxonomy, conflicts = Taxonomy.learn([row.labels for row in extraction.rows], levels)
    if not conflicts:
        return extraction, taxonomy, []
    dropped = {conflict.position for conflict in conflicts}
    bad = [
        BadRow(line=extraction.rows[c.position].line, id=extraction.rows[c.position].id,
               image=extraction.rows[c.position].image, reason=c.reason)
        for c in conflicts
    ]  # fmt: skip
    return extraction.subset([i for i in range(len(extraction.rows)) if i not in dropped]), taxonomy, bad


def engine_session(config: BuildConfig):
    """The context a job's engine needs: one Ray session (joined or started) for every Ray
    step of the job with ``--engine ray`` (extraction, embedding, index shards), else nothing."""
    if config.engine != "ray":
        return contextlib.nullcontext()
    from indexer.ray_engine import ray_session

    return ray_session(config.ray)


def build_bundle(
    catalog: str | Path | Catalog | PreparedCatalog,
    out: str | Path,
    config: BuildConfig = BuildConfig(),
    *,
    overwrite: bool = False,
    progress: bool = False,
    classifier: TrainedClassifier | None = None,
    bundle_id: str | None = None,
) -> BuildReport:
    """Builds a bundle from a catalog.

    Args:
        catalog: a CSV path, a folder of class folders, a read :class:`Catalog`, or a
            :class:`PreparedCatalog` whose features are already extracted.
        out: the bundle folder to create.
        config: build settings.
        overwrite: replace an existing bundle at ``out``.
        progress: show progress bars (tqdm) on stderr.
        classifier: reuse this trained classifier (e.g. the current bundle's) instead of
            training one; every label of the catalog must be one it knows (:func:`check_reuse`;
            :func:`drop_unknown_labels` leaves out the rows whose labels it does not).
        bundle_id: the new bundle's id (default: a fresh time-based id).

    Returns:
        The build report (also written into the bundle).

    Raises:
        CatalogError: unreadable catalog, or too many bad rows (listed).
        BackboneError / WeightsUnavailableError: the backbone cannot be loaded.
        TrainingError: too few examples per class, or labels a reused classifier never saw.
        BundleError: ``out`` exists.
    """
    with engine_session(config):
        return _build_bundle(
            catalog, out, config, overwrite=overwrite, progress=progress, classifier=classifier, bundle_id=bundle_id
        )


def _build_bundle(
    catalog, out, config: BuildConfig, *, overwrite: bool, progress: bool, classifier, bundle_id
) -> BuildReport:
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; choose a new --out (bundles are immutable) or pass --overwrite")
    prepared = catalog if isinstance(catalog, PreparedCatalog) else prepare_catalog(catalog, config, progress=progress)
    catalog, backbone, extraction, bad_rows = (
        prepared.catalog,
        prepared.backbone,
        prepared.extraction,
        prepared.bad_rows,
    )
    timings = dict(prepared.seconds)

    mark = time.perf_counter()
    labels = {column: [row.labels[column] for row in extraction.rows] for column in catalog.label_columns}
    tags = [row.tags for row in extraction.rows] if catalog.tags_column else None
    if classifier is None:
        space = LabelSpace.create(
            labels,
            taxonomy=prepared.taxonomy,
            hierarchy_mode=config.hierarchy_mode,
            tags=tags,
            tags_column=catalog.tags_column,
            tags_separator=config.tags_separator,
            threshold_mode=config.tag_threshold_mode,
        )
        sample = training_sample(labels, space.primary_column, config.train_sample, config.train.seed, tags)
        if sample is not None:
            log.info(
                "training on a stratified sample of %d of %d rows (--train-sample)", len(sample), len(extraction.rows)
            )
        positions = sample if sample is not None else np.arange(len(extraction.rows))
        use_flipped = config.train.flip_augment and extraction.flipped is not None
        trained = train_classifier(
            take_rows(extraction.features, positions),
            {column: [values[i] for i in positions] for column, values in labels.items()},
            config.train,
            flipped=take_rows(extraction.flipped, positions) if use_flipped else None,
            space=space,
            tags=[tags[i] for i in positions] if tags is not None else None,
            progress=progress,
        )
        train_rows = len(positions)
    else:
        # No silent mislabels: every label, path and tag must be one the classifier predicts.
        reuse = check_reuse(classifier.label_space, prepared)
        if not reuse.reusable:
            raise TrainingError(f"cannot reuse the classifier: {reuse.reason}; retrain it")
        if reuse.unknown:
            position, reason = reuse.unknown[0]
            raise TrainingError(
                f"{len(reuse.unknown)} row(s) carry labels the classifier has never seen (first: id "
                f"{extraction.rows[position].id!r}: {reason}); leave them out (drop_unknown_labels) or retrain"
            )
        trained = classifier
        train_rows = 0
    timings["train"] = time.perf_counter() - mark

    mark = time.perf_counter()
    use_flips = config.flip_average and extraction.flipped is not None
    stored = isinstance(extraction.features, StoredFeatures)  # the Ray engine: features stay in the store
    if stored and len(extraction.features) > config.ray.driver_embed_rows:
        from indexer.ray_engine import embed_ray

        raw_embeddings = embed_ray(trained, extraction.features, use_flips, config.ray)
    else:
        everything = np.arange(len(extraction.rows))
        runner = ClassifierRunner(
            trained.model, trained.input_scaler, [head.name for head in trained.label_space.heads]
        )
        raw_embeddings, _ = runner.run(
            take_rows(extraction.features, everything), take_rows(extraction.flipped, everything) if use_flips else None
        )
    embedding_scaler = fit_scaler(raw_embeddings)
    embeddings = transform_in_place(embedding_scaler, raw_embeddings)  # 2 KB a row: no second copy
    kind = config.index_kind
    if kind == "auto":
        kind = choose_kind(len(embeddings), config.index_memory_bytes, embeddings.shape[1])
    shards = 1
    if config.engine == "ray" and kind in IVF_KINDS:
        from indexer.ray_engine import build_index_ray

        index, shards = build_index_ray(embeddings, kind, config.ray)
    else:
        index = VectorIndex.build(embeddings, kind, use_gpu=config.use_gpu)
    self_retrieval = _self_retrieval(index, embeddings, extraction.hashes)
    recall = measure_recall(index, embeddings, queries=RECALL_QUERIES, k=6)
    log.info("%s index over %d vectors: recall@6 %.3f vs exact", index.kind, index.size, recall)
    if self_retrieval < 1.0:
        log.warning("only %.1f%% of sampled catalog items find themselves first", 100 * self_retrieval)
    timings["index"] = time.perf_counter() - mark

    bundle_id = bundle_id or new_bundle_id()
    report = BuildReport(
        bundle=str(out),
        bundle_id=bundle_id,
        items=len(extraction.rows),
        total_rows=catalog.total,
        bad_rows=[bad.to_json() for bad in bad_rows],
        extracted=extraction.extracted,
        cached=len(extraction.rows) - extraction.extracted,
        metrics=trained.metrics,
        self_retrieval=self_retrieval,
        index_shards=shards,
        train_rows=train_rows,
    )

    def fill(folder: Path) -> dict:
        trained.model.save(folder / "model.keras")
        np.savez(
            folder / "scalers.npz",
            **scaler_arrays(trained.input_scaler, "input"),
            **scaler_arrays(embedding_scaler, "embedding"),
        )
        write_json(folder / "labels.json", trained.label_space.to_json())
        index.save(folder / "index.faiss")
        checkpoint("write")  # half a bundle on disk: a kill here must leave nothing publishable
        with open(folder / "catalog.jsonl", "w", encoding="utf-8") as handle:
            for row, digest in zip(extraction.rows, extraction.hashes):
                record = CatalogRecord.from_row(row, digest, with_tags=bool(catalog.tags_column))
                handle.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
        write_json(folder / "history.json", trained.history)
        if backbone.spec.weights == "none":
            backbone.save_weights(folder / RANDOM_WEIGHTS)
        carried = copy_backbone_file(backbone, folder)  # a TFLite model or weights file travels inside
        report.seconds = {**timings, "total": time.perf_counter() - started}
        write_json(folder / "build_report.json", report.to_json())
        return {
            "bundle_id": bundle_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "libraries": library_versions(),
            "backbone": {"spec": asdict(backbone.spec), "identity": backbone.identity, "file": carried},
            "catalog": {
                "source": os.path.abspath(catalog.source),  # as given, made absolute: no cwd in a bundle
                "label_columns": catalog.label_columns,
                "hierarchy": list(prepared.taxonomy.levels) if prepared.taxonomy else None,
                "tags_column": catalog.tags_column,
                "title_column": catalog.display.title,
                "price_column": catalog.display.price,
                "url_column": catalog.display.url,
                "image_root": str(catalog.image_root) if catalog.image_root else None,
            },
            "embedding": {"dimension": int(embeddings.shape[1]), "flip_average": use_flips, "layer": "embedding"},
            "index": index_record(index, recall, min(RECALL_QUERIES, index.size)),
            "counts": {
                "items": len(extraction.rows),
                "catalog_rows": catalog.total,
                "bad_rows": len(bad_rows),
                "classes": {c: len(names) for c, names in zip(trained.label_columns, trained.classes)},
                "taxonomy_paths": len(prepared.taxonomy.paths) if prepared.taxonomy else None,
                "tags": len(trained.label_space.tags),
            },
            "metrics": trained.metrics,
            "self_retrieval": self_retrieval,
            "max_pixels": config.max_pixels,
        }

    write_bundle(out, fill, overwrite=overwrite)
    return report


def index_record(index: VectorIndex, recall: float, queries: int) -> dict:
    """The manifest's ``index`` of a built index (``recommender.manifest.IndexRecord``)."""
    return {
        "kind": index.kind,
        "size": index.size,
        "parameters": index.parameters.to_json(),
        "bytes_per_vector": round(index.resident_bytes / index.size, 1),
        "rerank_bytes_per_vector": rerank_bytes_per_vector(index.kind, index.dimension),
        "embeddings_file": EMBEDDINGS_FILE if index.embeddings is not None else None,
        "recall_at_6": recall,
        "recall_queries": queries,
    }


def _self_retrieval(index: VectorIndex, embeddings: np.ndarray, hashes: list[str]) -> float:
    """Share of (a sample of) catalog items whose nearest neighbour is themselves.

    An item whose image bytes equal another item's (same sha256) may find its twin first at
    distance 0; that counts as finding itself.
    """
    count = min(len(embeddings), SELF_CHECK_SAMPLE)
    sample = np.random.default_rng(0).choice(len(embeddings), size=count, replace=False)
    result = index.search(embeddings[sample], 1)
    found = [hashes[int(p)] == hashes[int(i)] for p, i in zip(result.positions[:, 0], sample)]
    return float(np.mean(found))


@dataclass(frozen=True)
class ClassifierReuse:
    """Whether a trained classifier can embed a prepared catalog: the one answer to "can the
    current model be reused?" (:func:`check_reuse`).

    Attributes:
        reusable: the catalog's features come from the backbone the classifier was trained
            on, and its label columns, hierarchy levels and tags column are the classifier's.
            When not, every row is affected and only retraining helps.
        reason: why it is not reusable ("" when it is).
        same_labels: the catalog's classes per column, taxonomy paths and tags are exactly
            those the classifier predicts (False when not reusable). A class that appeared or
            vanished makes a new label set, which ``--retrain auto`` trains for.
        unknown: ``(position in prepared.extraction.rows, reason)`` of each row with a label,
            taxonomy path or tag the classifier has never seen (empty when not reusable).
    """

    reusable: bool
    reason: str = ""
    same_labels: bool = False
    unknown: tuple[tuple[int, str], ...] = ()


def check_reuse(space: LabelSpace, prepared: PreparedCatalog, trained_on: str | None = None) -> ClassifierReuse:
    """Whether a classifier with label space ``space`` can embed ``prepared``, and which rows
    it cannot label.

    Args:
        space: the classifier's label space (a bundle's ``labels.json``).
        prepared: the catalog with its features.
        trained_on: identity key of the backbone the classifier was trained on (a bundle
            manifest's ``backbone.identity.key``); None when unknown, then not compared.

    Returns:
        The typed answer (:class:`ClassifierReuse`).
    """
    catalog, taxonomy = prepared.catalog, prepared.taxonomy
    if trained_on is not None and trained_on != prepared.backbone.identity["key"]:
        return ClassifierReuse(False, "the backbone differs from the one the current model was trained on")
    if list(catalog.label_columns) != space.columns:
        return ClassifierReuse(
            False, f"the label columns {list(catalog.label_columns)} differ from the model's {space.columns}"
        )
    if (taxonomy.levels if taxonomy else None) != (space.taxonomy.levels if space.taxonomy else None):
        return ClassifierReuse(False, "the hierarchy differs from the model's")
    if catalog.tags_column != space.tags_column:
        return ClassifierReuse(False, "the tags column differs from the model's")
    rows = prepared.extraction.rows
    same_labels = all(
        {row.labels[column] for row in rows} == set(names) for column, names in zip(space.columns, space.classes)
    )
    if taxonomy is not None:
        same_labels = same_labels and set(taxonomy.paths) == set(space.taxonomy.paths)
    if space.tags_column is not None:
        same_labels = same_labels and {tag for row in rows for tag in row.tags} == set(space.tags)
    reasons = unknown_label_reasons(space, rows)
    unknown = tuple((position, reason) for position, reason in enumerate(reasons) if reason)
    return ClassifierReuse(True, same_labels=same_labels, unknown=unknown)


def unknown_label_reasons(space: LabelSpace, rows: list[CatalogRow]) -> list[str | None]:
    """Per row, why a reused classifier cannot predict its labels (its first unknown label,
    taxonomy path or tags), or None when it knows them all."""
    known = {column: set(names) for column, names in zip(space.columns, space.classes)}
    paths = set(space.taxonomy.paths) if space.taxonomy else None
    tags = set(space.tags)
    reasons: list[str | None] = []
    for row in rows:
        reason = next(
            (
                f"label {row.labels[column]!r} in column {column!r} is unknown to the current model; retrain to add it"
                for column in space.columns
                if row.labels[column] not in known[column]
            ),
            None,
        )
        if reason is None and paths is not None:
            path = tuple(row.labels[level] for level in space.taxonomy.levels)
            if path not in paths:
                reason = f"taxonomy path {' > '.join(path)!r} is unknown to the current model; retrain to add it"
        if reason is None and space.tags_column is not None:
            unknown = sorted(set(row.tags) - tags, key=str)
            if unknown:
                reason = (
                    f"tag(s) {', '.join(repr(t) for t in unknown)} are unknown to the current model; "
                    f"retrain to add them"
                )
        reasons.append(reason)
    return reasons


def drop_unknown_labels(prepared: PreparedCatalog, reuse: ClassifierReuse, max_bad_fraction: float) -> PreparedCatalog:
    """Leaves out, as bad rows, the rows a reused classifier cannot label (``reuse.unknown``).

    Reusing a classifier (``rebuild --retrain never``) must not mislabel a product with a
    class the model cannot predict; such a product is a failed item with its reason, and
    the rest of the catalog is still built (strict in aggregate: ``max_bad_fraction``).

    Args:
        prepared: the catalog with its features.
        reuse: :func:`check_reuse` of the classifier to reuse on ``prepared``.
        max_bad_fraction: the largest share of bad rows (these and the earlier ones).

    Returns:
        ``prepared`` without those rows (the same object when there are none), the rows
        added to its bad rows, the taxonomy learned again from the rows kept.

    Raises:
        TrainingError: the classifier is not reusable at all (``reuse.reason``).
        CatalogError: too many bad rows (listed), or none left.
    """
    if not reuse.reusable:
        raise TrainingError(f"cannot reuse the current model: {reuse.reason}; retrain it (--retrain always or auto)")
    if not reuse.unknown:
        return prepared
    log.warning("%d row(s) carry labels the current model has never seen and are left out", len(reuse.unknown))
    rows = prepared.extraction.rows
    unknown = [BadRow(line=rows[p].line, id=rows[p].id, image=rows[p].image, reason=r) for p, r in reuse.unknown]
    bad_rows = prepared.bad_rows + unknown
    check_bad_fraction(prepared.catalog.total, bad_rows, max_bad_fraction)
    dropped = {position for position, _ in reuse.unknown}
    kept = [position for position in range(len(rows)) if position not in dropped]
    extraction, taxonomy = keep_rows(prepared.extraction, kept, prepared.taxonomy)
    if not extraction.rows:
        raise CatalogError("no catalog rows left to build from", bad_rows=bad_rows)
    return replace(prepared, extraction=extraction, bad_rows=bad_rows, taxonomy=taxonomy)
