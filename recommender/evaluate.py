"""Measuring a bundle on labelled query images: classification, hierarchy, tag and retrieval metrics.

Two layers. The metric functions (:func:`classification_metrics`, :func:`hierarchy_metrics`,
:func:`multilabel_metrics`, :func:`retrieval_metrics` and the P@k / recall@k / hit rate / AP@k
primitives) take plain arrays and know nothing of bundles, so they can be checked against
scikit-learn and hand-computed values. :func:`run_queries` walks labelled rows through a
loaded bundle (``load_image`` -> ``Recommender.embed_outputs`` -> ``LabelSpace.predict`` and
the bundle's index), batched, and :func:`raw_feature_neighbors` finds the neighbours of the
same queries by raw standardized backbone features, the baseline the trained embedding must
beat; both leave a query's own image out of its neighbours through one function,
:func:`search_without_self`. The ``evaluate`` job (``indexer.evaluate``) turns them into
``metrics.json``, plots and an HTML page.

Retrieval definitions (``relevant`` is an (n, k) bool array: neighbour j of query i carries
the query's label):

- P@k: mean over queries of (relevant neighbours among the k) / k.
- recall@k: mean over queries of (relevant neighbours among the k) / R, where R is the number
  of catalog items with the query's label (its whole class, the query's own image left out):
  the share of the class found. k < R caps a query at k / R; R = 0 scores 0.
- hit rate@k: share of queries with at least one relevant neighbour among the k (what an
  earlier version reported as "recall@k"; it saturates quickly and hides how much of the class
  the k neighbours hold).
- mAP@k: mean over queries of AP@k = sum_j P@j * relevant_j / min(k, R), where R is the
  number of catalog items with the query's label (the most relevant items the k neighbours
  could hold); 1.0 means every position that could hold a relevant item does.

Hierarchy and tag definitions:

- path score: per query, one point per hierarchy level whose predicted value is right (the
  predicted path is the most probable *valid* path, so levels are judged together, as the
  original comparison of hierarchical and combined heads counted it); reported as the mean
  per query (out of the number of levels), the total over the test set, and the share of
  queries with every level right (path accuracy).
- tags: a tag is predicted when its sigmoid probability reaches its threshold. Micro
  precision / recall / F1 pool every (query, tag) decision (micro-F1 is the iMaterialist
  metric); macro averages the per-tag figures over the tags that occur in the truth or the
  predictions (0 for a tag never predicted, as for the single-label heads).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recommender.catalog import BadRow, CatalogRow
from recommender.errors import InvalidImageError
from recommender.images import decoded_batches, load_image_with_hash
from recommender.labels import path_score
from recommender.manifest import CatalogRecord
from recommender.records import same_photo_positions

# -- retrieval metrics ---------------------------------------------------------------------


def precision_at_k(relevant: np.ndarray) -> float:
    """Mean share of relevant neighbours per query.

    Args:
        relevant: (n, k) bool, neighbour j of query i has the query's label; a missing
            neighbour (fewer than k found) is False.

    Returns:
        P@k in [0, 1]; NaN for no queries.
    """
    relevant = np.asarray(relevant, bool)
    return float(relevant.mean()) if relevant.size else float("nan")


def recall_at_k(relevant: np.ndarray, relevant_totals: np.ndarray) -> float:
    """Mean over queries of the share of their relevant catalog items found among the k.

    A query with R relevant items and h of them among its k neighbours scores h / R, so
    k < R caps it at k / R; a query with R = 0 scores 0 (nothing could be found, as its
    P@k and AP@k are 0 too).

    Args:
        relevant: (n, k) bool, as for :func:`precision_at_k`.
        relevant_totals: (n,) int, R = catalog items with the query's label that may be
            returned (:func:`relevant_totals`).

    Returns:
        recall@k in [0, 1]; NaN for no queries.

    Raises:
        ValueError: the totals do not match the queries, or a query has more relevant
            neighbours than relevant items (relevance and totals were counted differently).
    """
    relevant = np.asarray(relevant, bool)
    totals = np.asarray(relevant_totals, np.int64)
    if totals.shape != (len(relevant),):
        raise ValueError(f"{len(relevant)} queries but {len(totals)} totals")
    if not len(relevant):
        return float("nan")
    hits = relevant.sum(axis=1)
    if (hits > totals).any():
        query = int(np.argmax(hits > totals))
        raise ValueError(
            f"query {query} has more relevant neighbours than relevant items ({hits[query]} > {totals[query]})"
        )
    return float(np.divide(hits, totals, out=np.zeros(len(relevant)), where=totals > 0).mean())


def hit_rate_at_k(relevant: np.ndarray) -> float:
    """Share of queries with at least one relevant neighbour among the k.

    Args:
        relevant: (n, k) bool, as for :func:`precision_at_k`.

    Returns:
        The hit rate in [0, 1]; NaN for no queries.
    """
    relevant = np.asarray(relevant, bool)
    return float(relevant.any(axis=1).mean()) if len(relevant) else float("nan")


def average_precision_at_k(relevant: np.ndarray, relevant_totals: np.ndarray) -> np.ndarray:
    """AP@k of each query: sum over positions j of P@j * relevant_j, over min(k, R).

    Args:
        relevant: (n, k) bool, as for :func:`precision_at_k`.
        relevant_totals: (n,) int, R = catalog items with the query's label.

    Returns:
        (n,) float64 in [0, 1]; 0 where R is 0.
    """
    relevant = np.asarray(relevant, bool)
    totals = np.asarray(relevant_totals, np.int64)
    k = relevant.shape[1]
    hits = np.cumsum(relevant, axis=1)
    precision_at_each = hits / np.arange(1, k + 1)
    summed = (precision_at_each * relevant).sum(axis=1)
    denominator = np.minimum(totals, k)
    return np.divide(summed, denominator, out=np.zeros(len(relevant)), where=denominator > 0)


def retrieval_metrics(relevant: np.ndarray, relevant_totals: np.ndarray) -> dict:
    """P@k, recall@k, hit rate@k and mAP@k of a set of queries.

    Args:
        relevant: (n, k) bool, neighbour j of query i carries the query's label.
        relevant_totals: (n,) int, catalog items with each query's label that may be returned.

    Returns:
        ``{"queries", "precision_at_k", "recall_at_k", "hit_rate_at_k", "map_at_k"}``.
    """
    relevant = np.asarray(relevant, bool)
    return {
        "queries": int(len(relevant)),
        "precision_at_k": precision_at_k(relevant),
        "recall_at_k": recall_at_k(relevant, relevant_totals),
        "hit_rate_at_k": hit_rate_at_k(relevant),
        "map_at_k": float(average_precision_at_k(relevant, relevant_totals).mean()) if len(relevant) else float("nan"),
    }


def neighbor_relevance(
    catalog_rows: Sequence[CatalogRecord], positions: np.ndarray, truth: list[str], column: str
) -> np.ndarray:
    """Marks which neighbours carry the query's label.

    Args:
        catalog_rows: the bundle's rows (``Recommender.rows``), FAISS order.
        positions: (n, k) int catalog positions, -1 where no neighbour was found.
        truth: n true labels of the queries.
        column: the label column compared.

    Returns:
        (n, k) bool.
    """
    labels = np.array([row.labels.get(column) for row in catalog_rows] + [None], dtype=object)
    # -1 (no neighbour) indexes the trailing None, which never equals a label.
    found = labels[np.asarray(positions, np.int64)]
    return found == np.asarray(truth, dtype=object)[:, None]


# -- classification metrics ----------------------------------------------------------------


def classification_metrics(
    truth: np.ndarray, probabilities: np.ndarray, classes: list[str], predicted: np.ndarray | None = None
) -> dict:
    """Accuracy, precision / recall / F1 (macro, micro, weighted), ROC AUC and per-class figures.

    Averages are over the classes that occur in the truth or the predictions (scikit-learn's
    rule), with 0 for a class never predicted (no warning). ROC AUC is one-vs-rest per class,
    defined only for classes that have both positive and negative queries; its macro and
    weighted (by support) means are over those classes, None when there are none.

    Args:
        truth: (n,) int class indices into ``classes``.
        probabilities: (n, len(classes)) float, rows summing to 1.
        classes: class names by index.
        predicted: (n,) int predicted class indices; None means the argmax of
            ``probabilities``. A hierarchy level passes the level of the most probable valid
            path, which need not be the argmax of its marginal.

    Returns:
        ``{"queries", "accuracy", "precision", "recall", "f1", "roc_auc_ovr", "per_class",
        "confusion_matrix"}``; see ``indexer.evaluate`` for the key documentation.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    truth = np.asarray(truth, np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    predicted = np.argmax(probabilities, axis=1) if predicted is None else np.asarray(predicted, np.int64)
    present = np.union1d(truth, predicted)
    summary = {"queries": int(len(truth)), "accuracy": float(accuracy_score(truth, predicted))}
    for average in ("macro", "micro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            truth, predicted, labels=present, average=average, zero_division=0
        )
        summary.setdefault("precision", {})[average] = float(precision)
        summary.setdefault("recall", {})[average] = float(recall)
        summary.setdefault("f1", {})[average] = float(f1)
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=np.arange(len(classes)), average=None, zero_division=0
    )
    auc = np.full(len(classes), np.nan)
    for index in range(len(classes)):
        positives = truth == index
        if positives.any() and not positives.all():
            auc[index] = roc_auc_score(positives, probabilities[:, index])
    scored = ~np.isnan(auc)
    summary["roc_auc_ovr"] = {
        "macro": float(auc[scored].mean()) if scored.any() else None,
        "weighted": float(np.average(auc[scored], weights=support[scored])) if scored.any() else None,
        "classes_scored": int(scored.sum()),
    }
    summary["per_class"] = [
        {
            "class": name,
            "support": int(support[i]),
            "predicted": int((predicted == i).sum()),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "roc_auc": None if np.isnan(auc[i]) else float(auc[i]),
        }
        for i, name in enumerate(classes)
    ]
    summary["confusion_matrix"] = {
        "labels": list(classes),
        "counts": confusion_matrix(truth, predicted, labels=np.arange(len(classes))).tolist(),
    }
    return summary


# -- hierarchy and tag metrics -------------------------------------------------------------


def hierarchy_metrics(
    truth: list[tuple[str, ...]], predicted: list[tuple[str, ...]], levels: list[str] | tuple[str, ...]
) -> dict:
    """Per-level accuracy, path score and path accuracy of predicted taxonomy paths.

    Args:
        truth: n true paths, one value per level (root first).
        predicted: n predicted paths, same layout (the most probable valid path).
        levels: the level names, root first.

    Returns:
        ``{"queries", "level_accuracy": {level: share right}, "path_score" (mean points per
        query), "path_score_max" (the number of levels), "path_score_total" (points over all
        queries), "path_accuracy" (share with every level right)}``; NaN figures for no queries.
    """
    correct = np.array(
        [[t == p for t, p in zip(true_path, predicted_path)] for true_path, predicted_path in zip(truth, predicted)],
        bool,
    ).reshape(len(truth), len(levels))
    scores = path_score(correct)
    return {
        "queries": len(truth),
        "level_accuracy": {
            level: float("nan") if not len(truth) else float(correct[:, depth].mean())
            for depth, level in enumerate(levels)
        },
        "path_score": scores["path_score"],
        "path_score_max": scores["path_score_max"],
        "path_score_total": int(correct.sum()),
        "path_accuracy": scores["path_accuracy"],
    }


def _precision_recall_f1(true_positive, false_positive, false_negative):
    """Precision, recall and F1 from counts (arrays or scalars), 0 where undefined."""
    true_positive, false_positive, false_negative = (
        np.asarray(v, np.float64) for v in (true_positive, false_positive, false_negative)
    )

    def share(numerator, denominator):
        return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)

    return (
        share(true_positive, true_positive + false_positive),
        share(true_positive, true_positive + false_negative),
        # 2PR / (P + R), written on the counts so that it is defined whenever P or R is
        share(2 * true_positive, 2 * true_positive + false_positive + false_negative),
    )


def multilabel_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Micro and macro precision / recall / F1 of multi-label decisions, and per-tag figures.

    Micro pools every (query, tag) decision; macro is the mean of the per-tag figures over
    the tags that occur in the truth or the predictions (a tag neither true nor predicted
    for any query has no figures to average), 0 for a tag never predicted or never true.

    Args:
        truth: (n, tags) bool multi-hot true tags.
        predicted: (n, tags) bool predicted tags.

    Returns:
        ``{"queries", "micro": {"precision", "recall", "f1"}, "macro": {...}, "tags_averaged",
        "per_tag": {"support", "predicted", "precision", "recall", "f1"}}`` where ``per_tag``
        holds (tags,) arrays in tag order.
    """
    truth = np.asarray(truth, bool)
    predicted = np.asarray(predicted, bool)
    if truth.shape != predicted.shape or truth.ndim != 2:
        raise ValueError(f"truth {truth.shape} and predictions {predicted.shape} must be the same (n, tags) shape")
    true_positive = (truth & predicted).sum(axis=0)
    false_positive = (~truth & predicted).sum(axis=0)
    false_negative = (truth & ~predicted).sum(axis=0)
    precision, recall, f1 = _precision_recall_f1(true_positive, false_positive, false_negative)
    micro = _precision_recall_f1(true_positive.sum(), false_positive.sum(), false_negative.sum())
    present = truth.any(axis=0) | predicted.any(axis=0)
    return {
        "queries": int(len(truth)),
        "micro": {name: float(value) for name, value in zip(("precision", "recall", "f1"), micro)},
        "macro": {
            name: float(values[present].mean()) if present.any() else 0.0
            for name, values in zip(("precision", "recall", "f1"), (precision, recall, f1))
        },
        "tags_averaged": int(present.sum()),
        "per_tag": {
            "support": truth.sum(axis=0),
            "predicted": predicted.sum(axis=0),
            "precision": precision,
            "recall": recall,
            "f1": f1,
        },
    }


def tag_metrics(truth: np.ndarray, scores: np.ndarray, thresholds: np.ndarray, tags: list[str]) -> dict:
    """Tag figures at the bundle's tuned thresholds and, for comparison, at 0.5.

    Args:
        truth: (n, tags) bool multi-hot true tags.
        scores: (n, tags) float sigmoid probabilities.
        thresholds: (tags,) float, the bundle's thresholds (a tag is predicted at or above).
        tags: tag names by index.

    Returns:
        ``{"queries", "at_thresholds": {"micro", "macro", "tags_averaged"}, "at_half": {...},
        "per_tag": [{"tag", "support", "predicted", "precision", "recall", "f1", "threshold"}]}``
        (per-tag figures at the bundle's thresholds, every tag of the bundle).
    """
    scores = np.asarray(scores, np.float64)
    thresholds = np.asarray(thresholds, np.float64)
    tuned = multilabel_metrics(truth, scores >= thresholds[None, :])
    half = multilabel_metrics(truth, scores >= 0.5)
    per_tag = tuned["per_tag"]
    return {
        "queries": tuned["queries"],
        "at_thresholds": {key: tuned[key] for key in ("micro", "macro", "tags_averaged")},
        "at_half": {key: half[key] for key in ("micro", "macro", "tags_averaged")},
        "per_tag": [
            {
                "tag": tag,
                "support": int(per_tag["support"][i]),
                "predicted": int(per_tag["predicted"][i]),
                "precision": float(per_tag["precision"][i]),
                "recall": float(per_tag["recall"][i]),
                "f1": float(per_tag["f1"][i]),
                "threshold": float(thresholds[i]),
            }
            for i, tag in enumerate(tags)
        ],
    }


def multi_hot(row_tags: list[tuple[str, ...]], tags: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """Encodes each row's tags over the bundle's tag list.

    Args:
        row_tags: per row, its tags.
        tags: the bundle's tag names by index.

    Returns:
        ``((n, tags) bool, {tag the bundle never saw: rows carrying it})``; unknown tags are
        left out of the array (the model cannot predict them).
    """
    lookup = {tag: i for i, tag in enumerate(tags)}
    hot = np.zeros((len(row_tags), len(tags)), bool)
    unknown: Counter = Counter()
    for row, values in enumerate(row_tags):
        for tag in values:
            if tag in lookup:
                hot[row, lookup[tag]] = True
            else:
                unknown[tag] += 1
    return hot, dict(sorted(unknown.items()))


# -- walking queries through a bundle ------------------------------------------------------


@dataclass
class QueryRun:
    """What a bundle answered for labelled query rows.

    Attributes:
        rows: the rows whose image could be read, in the order given.
        hashes: their image sha256s.
        probabilities: per label column (``Recommender.label_columns`` order), (n, classes)
            float32; hierarchy levels are the consistent (valid-path) marginals.
        predicted: per label column, (n,) int64 predicted class indices; hierarchy levels
            follow the most probable valid path (``LabelSpace.predict``).
        tag_probabilities: (n, tags) float32 sigmoid probabilities, or None without a tags head.
        positions: (n, k) int64 catalog positions, nearest first, -1 where none.
        distances: (n, k) float32 Euclidean distances.
        self_matches: how many queries are themselves catalog items (same sha256).
        bad_rows: rows whose image could not be read, with reasons.
    """

    rows: list[CatalogRow]
    hashes: list[str]
    probabilities: list[np.ndarray]
    predicted: list[np.ndarray]
    tag_probabilities: np.ndarray | None
    positions: np.ndarray
    distances: np.ndarray
    self_matches: int
    bad_rows: list[BadRow]


def search_without_self(
    index, vectors: np.ndarray, hashes: list[str], by_hash, k: int, *, exclude_self: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest catalog items of each query, leaving out those with the query's image content.

    The one place the evaluation decides what "the query itself" is: catalog items with the
    same sha256 (``Recommender.query`` leaves out the same ones when serving).

    Args:
        index: a ``VectorIndex`` over the catalog, positions as in ``by_hash``.
        vectors: (n, d) float32 query vectors in the index's space.
        hashes: n image sha256s of the queries.
        by_hash: :func:`recommender.records.same_photo_positions` of the catalog rows.
        k: neighbours to keep.
        exclude_self: False keeps them (a catalog image then finds itself first).

    Returns:
        (n, k) int64 positions nearest first, -1 padded, and (n, k) float32 distances, inf padded.
    """
    excluded = [set(by_hash.get(digest, ())) if exclude_self else set() for digest in hashes]
    found = index.search_excluding(vectors, excluded, k)
    return found.positions, found.distances


def run_queries(
    recommender,
    rows: list[CatalogRow],
    k: int = 6,
    *,
    batch_size: int = 64,
    exclude_self: bool = True,
    decode_workers: int = 2,
    progress=None,
) -> QueryRun:
    """Answers every row's image with the bundle, batched, decoding one batch ahead.

    Args:
        recommender: a loaded ``engine.Recommender``.
        rows: labelled query rows.
        k: neighbours per query.
        batch_size: images per forward pass.
        exclude_self: leave catalog items with the query's image content out of its
            neighbours, as ``Recommender.query`` does by default.
        decode_workers: decoding threads.
        progress: called with the number of rows finished after each batch.

    Returns:
        Predictions and neighbours of the readable rows; the others in ``bad_rows``.
    """
    size = recommender.backbone.input_size
    by_hash = same_photo_positions(recommender.rows)
    space = recommender.label_space
    kept_rows, hashes, bad = [], [], []
    probabilities: list[list[np.ndarray]] = [[] for _ in recommender.label_columns]
    predicted: list[list[np.ndarray]] = [[] for _ in recommender.label_columns]
    tag_probabilities: list[np.ndarray] = []
    positions, distances = [], []

    def decode(row: CatalogRow):
        try:
            return load_image_with_hash(row.path, size, max_pixels=recommender.max_pixels)
        except InvalidImageError as error:
            return error

    for batch, decoded in decoded_batches(rows, batch_size, decode, decode_workers):
        images, batch_rows, batch_hashes = [], [], []
        for row, result in zip(batch, decoded):
            if isinstance(result, InvalidImageError):
                bad.append(BadRow(line=row.line, id=row.id, image=row.image, reason=str(result)))
                continue
            images.append(result[0])
            batch_rows.append(row)
            batch_hashes.append(result[1])
        if images:
            embeddings, outputs = recommender.embed_outputs(np.stack(images))
            kept = search_without_self(
                recommender.index, embeddings, batch_hashes, by_hash, k, exclude_self=exclude_self
            )
            positions.append(kept[0])
            distances.append(kept[1])
            by_column = space.column_probabilities(outputs)
            codes = space.predict(outputs)
            for head, column in enumerate(recommender.label_columns):
                probabilities[head].append(by_column[column].astype(np.float32))
                predicted[head].append(np.asarray(codes[column][0], np.int64))
            scores = space.tag_probabilities(outputs)
            if scores is not None:
                tag_probabilities.append(scores.astype(np.float32))
            kept_rows += batch_rows
            hashes += batch_hashes
        if progress:
            progress(len(batch))
    width = [len(names) for names in recommender.classes]
    return QueryRun(
        rows=kept_rows,
        hashes=hashes,
        probabilities=[
            np.concatenate(p) if p else np.zeros((0, width[i]), np.float32) for i, p in enumerate(probabilities)
        ],
        predicted=[np.concatenate(p) if p else np.zeros(0, np.int64) for p in predicted],
        tag_probabilities=None
        if space.tags_column is None
        else (np.concatenate(tag_probabilities) if tag_probabilities else np.zeros((0, len(space.tags)), np.float32)),
        positions=np.concatenate(positions) if positions else np.zeros((0, k), np.int64),
        distances=np.concatenate(distances) if distances else np.zeros((0, k), np.float32),
        self_matches=sum(1 for h in hashes if h in by_hash),
        bad_rows=bad,
    )


def raw_feature_neighbors(
    recommender, query_rows: list[CatalogRow], k: int = 6, *, store=None, exclude_self: bool = True
) -> tuple[np.ndarray, str | None]:
    """Neighbours of the queries by raw standardized backbone features (the baseline).

    Catalog and query images go through the bundle's backbone (features from the store where
    it has them), are standardized with the bundle's input scaler (fit on its training rows)
    and searched exactly. Original images only, no flip averaging: the baseline is the plain
    backbone.

    Args:
        recommender: a loaded ``engine.Recommender``.
        query_rows: rows whose images all decode (e.g. ``QueryRun.rows``).
        k: neighbours per query.
        store: a ``features.FeatureStore`` for this backbone, or None (extract everything).
        exclude_self: leave catalog items with the query's image content out.

    Returns:
        ``((n, k) int64 catalog positions, None)``, or ``(None, reason)`` when the baseline
        cannot be measured (catalog images unreadable here).
    """
    from recommender.features import extract_features
    from recommender.index import VectorIndex
    from recommender.scalers import transform

    catalog = [
        CatalogRow(id=row.id, image=row.image, path=Path(row.path), labels=dict(row.labels)) for row in recommender.rows
    ]
    catalog_features = extract_features(catalog, recommender.backbone, store, max_pixels=recommender.max_pixels)
    if catalog_features.bad_rows:
        missing = len(catalog_features.bad_rows)
        first = catalog_features.bad_rows[0].describe()
        return None, f"{missing} of {len(catalog)} catalog images cannot be read here (first: {first})"
    query_features = extract_features(query_rows, recommender.backbone, store, max_pixels=recommender.max_pixels)
    scaler = recommender.runner.input_scaler
    index = VectorIndex.build(transform(scaler, catalog_features.features), "flat", use_gpu=False)
    by_hash = same_photo_positions(recommender.rows)
    positions, _ = search_without_self(
        index, transform(scaler, query_features.features), query_features.hashes, by_hash, k, exclude_self=exclude_self
    )
    return positions, None


def relevant_totals(
    catalog_rows: Sequence[CatalogRecord],
    truth: list[str],
    hashes: list[str],
    column: str,
    *,
    exclude_self: bool = True,
) -> np.ndarray:
    """R of recall@k and mAP@k per query: catalog items with the query's label that may be returned.

    Args:
        catalog_rows: the bundle's rows (``Recommender.rows``).
        truth: n true labels of the queries.
        hashes: n image sha256s of the queries.
        column: the label column.
        exclude_self: catalog items with the query's image content are left out of the
            neighbours, so they do not count as retrievable either.

    Returns:
        (n,) int64.
    """
    totals = Counter(row.labels.get(column) for row in catalog_rows)
    by_hash = same_photo_positions(catalog_rows) if exclude_self else {}
    counts = []
    for label, digest in zip(truth, hashes):
        own = sum(1 for p in by_hash.get(digest, []) if catalog_rows[p].labels.get(column) == label)
        counts.append(totals[label] - own)
    return np.asarray(counts, np.int64)
