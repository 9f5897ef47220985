"""The ``evaluate`` job: a bundle on a labelled test catalog -> metrics.json, PNG plots, report.html.

    python -m recommender evaluate --bundle BUNDLE --catalog TEST.csv --out REPORT_DIR [--k 6]

:func:`measure_bundle` is the one evaluation path (the command and the tests use it): it
answers the test rows with the bundle (``recommender.evaluate.run_queries``; a query's own
image is left out of its neighbours), finds the raw-feature baseline's neighbours the same
way, and scores both with the library's metric functions into the ``metrics.json`` layout
documented in :data:`METRICS_KEYS`. :func:`write_report` adds the plots and the HTML page
(``indexer.report``) and writes the folder; :func:`evaluate_bundle` does both, and
:func:`add_arguments` / :func:`run` are the ``evaluate`` subcommand. A bundle
with a label hierarchy also gets per-level accuracy and the path score of its predicted paths;
one with a tags column gets micro / macro precision, recall and F1 of its tags at its tuned
thresholds and at 0.5. Bad input (unreadable or missing images, labels or tags the bundle
never saw, label or tags columns the test catalog lacks) is reported in ``metrics.json`` under
``problems`` and at the top of the page; only a catalog with nothing left to evaluate is an
error.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recommender.manifest import Manifest
from typing import TYPE_CHECKING

import numpy as np

from recommender.catalog import BadRow, CatalogRow
from recommender.errors import CatalogError, RecommenderError
from recommender.files import atomic_write_json

if TYPE_CHECKING:  # the CLI imports this module for its flags: keep that light
    from recommender.evaluate import QueryRun

#: Version of the ``metrics.json`` layout; bumped only when a documented key changes meaning.
METRICS_SCHEMA_VERSION = 2

#: How many correct and how many wrong example queries the example grid shows.
DEFAULT_EXAMPLES = 4


@dataclass(frozen=True)
class MetricsKey:
    """One documented row of ``metrics.json``: keys that share a meaning.

    Attributes:
        names: full dotted keys, e.g. ``("bundle.path", "bundle.bundle_id")``; ``HEAD`` stands
            for a label column and ``SPACE`` for ``embedding`` or ``raw_features``.
        meaning: what they hold (Markdown, one line).
    """

    names: tuple[str, ...]
    meaning: str

    def cell(self) -> str:
        """The key cell of the README table; a sibling of the first key is written ``.name``."""
        parent = self.names[0].rpartition(".")[0]
        written = [f"`{self.names[0]}`"]
        for name in self.names[1:]:
            head, _, last = name.rpartition(".")
            written.append(f"`.{last}`" if head and head == parent else f"`{name}`")
        return " / ".join(written)


#: The documented keys of ``metrics.json``, the one list: the README's table is
#: :func:`metrics_keys_table` (a test compares them) and a test checks that every key listed
#: here is in a generated file.
METRICS_KEYS: tuple[MetricsKey, ...] = (
    MetricsKey(
        ("schema_version",),
        "layout version of this file; bumped only when a documented key changes meaning "
        "(2: `recall_at_k` became the usual recall, the old figure is `hit_rate_at_k`)",
    ),
    MetricsKey(("created_at",), "UTC time the report was made, ISO 8601"),
    MetricsKey(("k",), "neighbours per query used for the retrieval metrics"),
    MetricsKey(("bundle.path", "bundle.bundle_id"), "the evaluated bundle"),
    MetricsKey(("bundle.items",), "catalog items in its index"),
    MetricsKey(("bundle.backbone",), "backbone identity (kind, weights, input size, key)"),
    MetricsKey(("bundle.flip_average",), "whether embeddings average the image and its mirror"),
    MetricsKey(("bundle.index_kind",), "`flat` (exact), or `hnsw`, `ivf-sq8`, `ivf-pq` (approximate)"),
    MetricsKey(("catalog.source",), "the test catalog as given"),
    MetricsKey(("catalog.rows",), "test rows read (good and bad)"),
    MetricsKey(("catalog.evaluated",), "rows whose image was read and answered"),
    MetricsKey(
        ("catalog.self_matches",),
        "evaluated rows whose image is itself in the bundle's catalog (left out of their own neighbours)",
    ),
    MetricsKey(("catalog.bad_rows",), "rows left out: list of `{line, id, image, reason}`"),
    MetricsKey(
        ("heads.HEAD.evaluated",), "false when the test catalog lacks the column or has no row with a known label"
    ),
    MetricsKey(("heads.HEAD.queries",), "rows scored for this head (evaluated rows whose label the bundle knows)"),
    MetricsKey(
        ("heads.HEAD.unknown_labels",), "labels the bundle never saw -> row count (left out of this head's figures)"
    ),
    MetricsKey(
        ("heads.HEAD.accuracy",),
        "share of queries whose predicted label is right (a hierarchy level: the level of the predicted valid path)",
    ),
    MetricsKey(
        ("heads.HEAD.precision", "heads.HEAD.recall", "heads.HEAD.f1"),
        "`{macro, micro, weighted}` over the classes present in truth or predictions (0 for a class never predicted)",
    ),
    MetricsKey(
        ("heads.HEAD.roc_auc_ovr",),
        "`{macro, weighted, classes_scored}`: one-vs-rest ROC AUC over classes with positive and negative queries; null when none",
    ),
    MetricsKey(
        ("heads.HEAD.per_class",),
        "list of `{class, support, predicted, precision, recall, f1, roc_auc}`, every class of the bundle",
    ),
    MetricsKey(
        ("heads.HEAD.confusion_matrix",),
        "`{labels, counts}`: `counts[i][j]` = queries of class `labels[i]` predicted as `labels[j]`",
    ),
    MetricsKey(
        ("heads.HEAD.retrieval.SPACE",),
        "`{queries, precision_at_k, recall_at_k, hit_rate_at_k, map_at_k}`, or null when not measured: P@k = share of the k neighbours with the query's label; recall@k = share of the query's class (catalog items with its label, its own image left out) among the k, so at most k / class size; hit rate = share of queries with at least one such neighbour; mAP@k = mean AP@k over min(k, class size)",
    ),
    MetricsKey(
        ("heads.HEAD.plots",), "`{confusion_matrix, roc, precision_recall}`: PNG file names in the report folder"
    ),
    MetricsKey(
        ("hierarchy.evaluated", "hierarchy.reason"),
        "whether the label hierarchy was scored; why not (no hierarchy in the bundle, a level missing from the test catalog), else null",
    ),
    MetricsKey(
        ("hierarchy.mode", "hierarchy.levels"),
        "`hierarchical` (one softmax head per level) or `combined` (one head over full paths), null without a hierarchy; level columns, root first",
    ),
    MetricsKey(("hierarchy.queries",), "rows scored: evaluated rows whose every level value the bundle knows"),
    MetricsKey(
        ("hierarchy.unknown_paths",),
        "true paths with a value the bundle never saw (`a > b > c`) -> row count (left out)",
    ),
    MetricsKey(
        ("hierarchy.outside_taxonomy",),
        "scored rows whose true path is not one of the bundle's valid paths (each level still judged)",
    ),
    MetricsKey(("hierarchy.level_accuracy",), "level -> share of rows whose predicted path has the right value there"),
    MetricsKey(
        ("hierarchy.path_score", "hierarchy.path_score_max", "hierarchy.path_score_total"),
        "one point per right level of the predicted path: mean per row, its maximum (the number of levels), sum over the rows",
    ),
    MetricsKey(("hierarchy.path_accuracy",), "share of rows with every level right"),
    MetricsKey(("hierarchy.validation",), "the hierarchy figures recorded in the bundle's manifest at build time"),
    MetricsKey(
        ("tags.evaluated", "tags.reason"),
        "whether tags were scored; why not (no tags head in the bundle, no tags column in the test catalog), else null",
    ),
    MetricsKey(
        ("tags.column", "tags.separator", "tags.threshold_mode"),
        "the bundle's tags column, its separator, `global` or `per_tag` thresholds",
    ),
    MetricsKey(("tags.queries",), "rows scored (every evaluated row; an empty cell means no tags)"),
    MetricsKey(("tags.unknown_tags",), "tags the bundle never saw -> row count (left out of the figures)"),
    MetricsKey(
        ("tags.at_thresholds", "tags.at_half"),
        "at the bundle's tuned thresholds / at 0.5: `{micro, macro, tags_averaged}`, each average `{precision, recall, f1}`; micro pools every (row, tag) decision (micro-F1 is the iMaterialist metric), macro averages over the `tags_averaged` tags true or predicted at least once",
    ),
    MetricsKey(
        ("tags.per_tag",),
        "list of `{tag, support, predicted, precision, recall, f1, threshold}` at the bundle's thresholds, every tag of the bundle",
    ),
    MetricsKey(
        ("tags.validation",),
        "the tag figures recorded in the bundle's manifest at build time (thresholds, validation micro-F1)",
    ),
    MetricsKey(
        ("retrieval_spaces.embedding",), "how the trained embedding's neighbours were found (the bundle's index)"
    ),
    MetricsKey(
        ("retrieval_spaces.raw_features",), "`{measured, reason}`: raw standardized backbone features, searched exactly"
    ),
    MetricsKey(("training.epochs",), "epochs trained (from the bundle's `history.json`)"),
    MetricsKey(("training.validation",), "the validation metrics recorded in the bundle's manifest at build time"),
    MetricsKey(
        ("training.baseline",),
        "the build's baseline check from the manifest (the selection model on its validation split, before the refit on all rows); null when the bundle was built without it",
    ),
    MetricsKey(
        ("training.baseline.heads.HEAD.validation_accuracy", "training.baseline.heads.HEAD.validation_macro_f1"),
        "the head on the validation rows whose class occurs in the training rows",
    ),
    MetricsKey(
        (
            "training.baseline.heads.HEAD.probe_validation_accuracy",
            "training.baseline.heads.HEAD.probe_validation_macro_f1",
        ),
        "a plain logistic regression on the head's column, fit on the training rows' standardized raw backbone features, on the same rows",
    ),
    MetricsKey(
        (
            "training.baseline.heads.HEAD.validation_rows",
            "training.baseline.heads.HEAD.left_out_rows",
            "training.baseline.heads.HEAD.probe_converged",
        ),
        "validation rows compared; rows left out (their class is absent from the training rows); whether the probe converged within its iteration cap",
    ),
    MetricsKey(
        (
            "training.baseline.retrieval.k",
            "training.baseline.retrieval.column",
            "training.baseline.retrieval.queries",
            "training.baseline.retrieval.left_out_queries",
        ),
        "neighbours per query; the primary column; validation rows queried against the training rows as the catalog; rows left out (class absent from training)",
    ),
    MetricsKey(
        ("training.baseline.retrieval.embedding_p_at_k", "training.baseline.retrieval.raw_features_p_at_k"),
        "P@k in the selection model's standardized (flip-averaged) embedding / in the standardized raw backbone features",
    ),
    MetricsKey(("training.baseline.seconds",), "what the check cost the build"),
    MetricsKey(("training.plot",), "training-curve PNG, or null when the bundle has no history"),
    MetricsKey(("examples.plot",), "example-query grid PNG, or null when there were no queries"),
    MetricsKey(("examples.correct", "examples.wrong"), "ids of the queries shown, by the primary head's prediction"),
    MetricsKey(
        ("examples.head",), "the head whose predictions chose them (the first evaluated one), null without queries"
    ),
    MetricsKey(("problems",), "human-readable list of everything that was left out or could not be measured"),
    MetricsKey(("seconds",), "wall time of the evaluation (queries, metrics, plots)"),
)


def metrics_keys_table() -> str:
    """:data:`METRICS_KEYS` as the Markdown table of the README ("Evaluate a bundle")."""
    rows = [f"| {key.cell()} | {key.meaning} |" for key in METRICS_KEYS]
    return "\n".join(["| key | meaning |", "|---|---|", *rows]) + "\n"


def documented_keys() -> list[str]:
    """Every documented key of ``metrics.json``, in table order."""
    return [name for key in METRICS_KEYS for name in key.names]


# Metric definitions (P@k, recall@k, hit rate@k, mAP@k) are in recommender.evaluate's module docstring.


@dataclass
class Evaluation:
    """A bundle measured on labelled test rows, before anything is written.

    Attributes:
        metrics: the ``metrics.json`` content; the plot entries (``heads.HEAD.plots``,
            ``training.plot``, ``examples``) are filled in by :func:`write_report`.
        run: what the bundle answered for the readable rows, which the plots draw.
        history: the bundle's ``history.json`` (Keras ``History.history``), empty without one.
    """

    metrics: dict
    run: QueryRun
    history: dict


def measure_bundle(
    recommender,
    catalog_rows: list[CatalogRow],
    k: int = 6,
    *,
    bad_rows: list[BadRow] | tuple = (),
    source: str | None = None,
    missing_columns: list[str] | tuple = (),
    tags_column: str | None = None,
    feature_store: str | Path | None = None,
    raw_features: bool = True,
    batch_size: int = 64,
    progress: bool = False,
) -> Evaluation:
    """Answers labelled test rows with a loaded bundle and scores the answers; writes nothing.

    Args:
        recommender: a loaded ``engine.Recommender``.
        catalog_rows: labelled test rows (``Catalog.rows``); each row's ``labels`` holds the
            label columns to score.
        k: neighbours per query.
        bad_rows: rows already rejected while reading the catalog (reported with the rest).
        source: the test catalog as given, for the report.
        missing_columns: bundle label columns the test catalog lacks (reported).
        tags_column: the column the rows' ``tags`` were read from (``Catalog.tags_column``);
            None when the test catalog has none, so tags are reported as not evaluated.
        feature_store: HDF5 feature cache for the raw-feature baseline (the build's store
            holds the catalog's features already); None extracts them without storing.
        raw_features: also measure neighbours by raw standardized backbone features.
        batch_size: images per forward pass.
        progress: show a progress bar on stderr.

    Returns:
        The metrics (NaN written as None, as in ``metrics.json``) with the run they came from.

    Raises:
        CatalogError: no test row could be evaluated (every image unreadable, or no label
            column in common with the bundle); the error lists the bad rows.
    """
    from recommender.evaluate import (
        classification_metrics,
        neighbor_relevance,
        raw_feature_neighbors,
        relevant_totals,
        retrieval_metrics,
        run_queries,
    )

    started = time.perf_counter()
    bad_rows = list(bad_rows)
    problems: list[str] = []
    columns = [c for c in recommender.label_columns if catalog_rows and c in catalog_rows[0].labels]
    missing_columns = list(missing_columns) or [
        c for c in recommender.label_columns if catalog_rows and c not in catalog_rows[0].labels
    ]
    if not columns:
        raise CatalogError(
            f"the test catalog has none of the bundle's label columns ({', '.join(recommender.label_columns)})",
            bad_rows=bad_rows,
        )
    from recommender.features import progress_bar

    with progress_bar(len(catalog_rows), "queries", progress) as bar:
        run = run_queries(recommender, catalog_rows, k, batch_size=batch_size, progress=bar.update)
    bad_rows += run.bad_rows
    if not run.rows:
        raise CatalogError(f"none of the {len(catalog_rows)} test rows could be read", bad_rows=bad_rows)
    if bad_rows:
        problems.append(
            f"{len(bad_rows)} test row(s) left out (unreadable or missing image, or bad row): see catalog.bad_rows"
        )
    for column in missing_columns:
        problems.append(f"head {column!r} not evaluated: {column!r} is not a label column of the test catalog")
    if run.self_matches:
        problems.append(
            f"{run.self_matches} test image(s) are also in the bundle's catalog (left out of their own neighbours)"
        )

    raw_positions, raw_reason = None, "not asked for (--no-raw-features)"
    if raw_features:
        try:
            store = _open_store(feature_store, recommender.backbone)
            raw_positions, raw_reason = raw_feature_neighbors(recommender, run.rows, k, store=store)
        except RecommenderError as error:  # e.g. an unreadable feature store: report, keep going
            raw_reason = f"raw-feature baseline failed: {error}"
        if raw_reason:
            problems.append(f"raw-feature neighbours not measured: {raw_reason}")

    heads: dict[str, dict] = {}
    for head, (column, classes) in enumerate(zip(recommender.label_columns, recommender.classes)):
        if column not in columns:
            heads[column] = {"evaluated": False, "queries": 0, "unknown_labels": {}}
            continue
        lookup = {name: i for i, name in enumerate(classes)}
        truth_labels = [row.labels[column] for row in run.rows]
        known = np.array([label in lookup for label in truth_labels], bool)
        unknown: dict[str, int] = {}
        for label, is_known in zip(truth_labels, known):
            if not is_known:
                unknown[label] = unknown.get(label, 0) + 1
        if unknown:
            listed = ", ".join(f"{label!r} ({count})" for label, count in sorted(unknown.items())[:10])
            problems.append(
                f"head {column!r}: {sum(unknown.values())} test row(s) carry labels the bundle never saw, "
                f"left out of its figures: {listed}"
            )
        entry: dict = {"evaluated": bool(known.any()), "queries": int(known.sum()), "unknown_labels": unknown}
        if not known.any():
            heads[column] = entry
            continue
        truth = [label for label, is_known in zip(truth_labels, known) if is_known]
        hashes = [digest for digest, is_known in zip(run.hashes, known) if is_known]
        entry.update(
            classification_metrics(
                np.array([lookup[label] for label in truth]),
                run.probabilities[head][known],
                classes,
                run.predicted[head][known],
            )
        )
        totals = relevant_totals(recommender.rows, truth, hashes, column)
        entry["retrieval"] = {
            "embedding": retrieval_metrics(
                neighbor_relevance(recommender.rows, run.positions[known], truth, column), totals
            ),
            "raw_features": None
            if raw_positions is None
            else retrieval_metrics(neighbor_relevance(recommender.rows, raw_positions[known], truth, column), totals),
        }
        heads[column] = entry
    hierarchy = hierarchy_section(recommender, run, columns, problems)
    tags = tags_section(recommender, run, tags_column, problems)

    history = _read_history(recommender.path)
    metrics = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "k": k,
        "bundle": {
            "path": str(recommender.path),
            "bundle_id": recommender.bundle_id,
            "items": len(recommender.rows),
            "backbone": dict(recommender.manifest.backbone.identity),
            "flip_average": recommender.flip_average,
            "index_kind": recommender.index.kind,
        },
        "catalog": {
            "source": source,
            "rows": len(catalog_rows) + len(bad_rows) - len(run.bad_rows),
            "evaluated": len(run.rows),
            "self_matches": run.self_matches,
            "bad_rows": [bad.to_json() for bad in bad_rows],
        },
        "heads": heads,
        "hierarchy": hierarchy,
        "tags": tags,
        "retrieval_spaces": {
            "embedding": f"the bundle's {recommender.index.kind} index over standardized trained embeddings"
            + (" (flip-averaged)" if recommender.flip_average else ""),
            "raw_features": {
                "measured": raw_positions is not None,
                "reason": None if raw_positions is not None else raw_reason,
            },
        },
        "training": {
            "epochs": len(history.get("loss", [])),
            "validation": recommender.manifest.metrics.to_json().get("heads", {}),
            "baseline": build_baseline(recommender.manifest, problems),
            "plot": None,
        },
        "examples": {"plot": None, "head": None, "correct": [], "wrong": []},
        "problems": problems,
        "seconds": time.perf_counter() - started,
    }
    return Evaluation(metrics=_finite(metrics), run=run, history=history)


def write_report(recommender, evaluation: Evaluation, out_dir: str | Path, *, examples: int = DEFAULT_EXAMPLES) -> dict:
    """Draws the plots and writes ``metrics.json`` and ``report.html`` into the report folder.

    Args:
        recommender: the bundle that was measured.
        evaluation: from :func:`measure_bundle` (left unchanged).
        out_dir: the report folder (created; existing report files in it are replaced).
        examples: correct and wrong example queries to show (each).

    Returns:
        The metrics with their plot file names and ``seconds`` now covering the drawing too,
        as written to ``metrics.json``.

    Raises:
        RecommenderError: ``out_dir`` exists and is not a folder.
    """
    from indexer.report import render_html, write_plots

    started = time.perf_counter()
    out_dir = _report_folder(out_dir)
    metrics = copy.deepcopy(evaluation.metrics)
    plots = write_plots(
        recommender,
        evaluation.run,
        metrics["heads"],
        evaluation.history,
        out_dir,
        metrics["k"],
        examples,
        metrics["problems"],
    )
    metrics["training"]["plot"] = plots["training"]
    metrics["examples"] = plots["examples"]
    for column, entry in metrics["heads"].items():
        if entry.get("evaluated"):
            entry["plots"] = plots["heads"][column]
    metrics["seconds"] = evaluation.metrics["seconds"] + time.perf_counter() - started
    atomic_write_json(out_dir / "metrics.json", metrics)
    (out_dir / "report.html").write_text(render_html(metrics, plots), encoding="utf-8")
    return metrics


def evaluate_bundle(
    recommender,
    catalog_rows: list[CatalogRow],
    out_dir: str | Path,
    k: int = 6,
    *,
    examples: int = DEFAULT_EXAMPLES,
    **measure_options,
) -> dict:
    """Evaluates a loaded bundle on labelled test rows and writes the report folder.

    Writes ``out_dir/metrics.json`` (keys documented in :data:`METRICS_KEYS`),
    ``out_dir/report.html`` and the PNG plots it shows.

    Args:
        recommender: a loaded ``engine.Recommender``.
        catalog_rows: labelled test rows (``Catalog.rows``).
        out_dir: the report folder (created; existing report files in it are replaced).
        k: neighbours per query.
        examples: correct and wrong example queries to show (each).
        **measure_options: the keyword arguments of :func:`measure_bundle` (``bad_rows``,
            ``source``, ``missing_columns``, ``tags_column``, ``feature_store``,
            ``raw_features``, ``batch_size``, ``progress``).

    Returns:
        The metrics, as written to ``metrics.json``.

    Raises:
        RecommenderError: ``out_dir`` exists and is not a folder (checked before measuring).
        CatalogError: no test row could be evaluated; the error lists the bad rows.
    """
    _report_folder(out_dir)
    evaluation = measure_bundle(recommender, catalog_rows, k, **measure_options)
    return write_report(recommender, evaluation, out_dir, examples=examples)


def _report_folder(out_dir: str | Path) -> Path:
    """Creates the report folder; RecommenderError when the path is something else."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RecommenderError(f"report folder {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def build_baseline(manifest: Manifest, problems: list[str]) -> dict | None:
    """The ``training.baseline`` entry: the manifest's build-time baseline check, or None.

    Args:
        manifest: the bundle's manifest.
        problems: appended to when the bundle has no (readable) baseline check.
    """
    from recommender.baseline import BuildBaseline

    payload = manifest.metrics.get("baseline")
    if payload is None:
        problems.append("the bundle records no build-time baseline check (built without it, or before it existed)")
        return None
    try:
        baseline = BuildBaseline.from_json(payload)
    except RecommenderError as error:
        problems.append(f"the bundle's build-time baseline check is unreadable: {error}")
        return None
    return baseline.to_json()


def hierarchy_section(recommender, run, columns: list[str], problems: list[str]) -> dict:
    """The ``hierarchy`` entry of ``metrics.json``: per-level accuracy and path score.

    Args:
        recommender: the loaded bundle.
        run: the ``evaluate.QueryRun`` of the test rows.
        columns: the label columns the test rows carry.
        problems: appended to when the hierarchy cannot be (fully) scored.

    Returns:
        See :data:`METRICS_KEYS`.
    """
    from recommender.evaluate import hierarchy_metrics

    space = recommender.label_space
    taxonomy = space.taxonomy
    if taxonomy is None:
        return {"evaluated": False, "reason": "the bundle has no label hierarchy", "mode": None, "levels": []}
    levels = list(taxonomy.levels)
    section: dict = {
        "evaluated": False,
        "reason": None,
        "mode": space.hierarchy_mode,
        "levels": levels,
    }
    validation = recommender.manifest.metrics.get("hierarchy")
    missing = [level for level in levels if level not in columns]
    if missing:
        section["reason"] = f"level(s) {', '.join(missing)} not read from the test catalog"
        problems.append(f"hierarchy not evaluated: {section['reason']}")
        return {**section, "validation": validation}
    known = {level: set(space.classes_of(level)) for level in levels}
    names = {level: space.classes_of(level) for level in levels}
    position = {column: i for i, column in enumerate(recommender.label_columns)}
    truth, predicted, unknown = [], [], {}
    for i, row in enumerate(run.rows):
        path = tuple(row.labels[level] for level in levels)
        if any(value not in known[level] for level, value in zip(levels, path)):
            joined = " > ".join(path)
            unknown[joined] = unknown.get(joined, 0) + 1
            continue
        truth.append(path)
        predicted.append(tuple(names[level][int(run.predicted[position[level]][i])] for level in levels))
    valid = set(taxonomy.paths)
    outside = sum(1 for path in truth if path not in valid)
    section.update(unknown_paths=dict(sorted(unknown.items())), outside_taxonomy=outside)
    section.update(hierarchy_metrics(truth, predicted, levels), validation=validation)
    if unknown:
        listed = ", ".join(f"{path!r} ({count})" for path, count in sorted(unknown.items())[:10])
        problems.append(
            f"hierarchy: {sum(unknown.values())} test row(s) have a path with values the bundle never saw, "
            f"left out of the path score: {listed}"
        )
    if outside:
        problems.append(
            f"hierarchy: {outside} test row(s) have a path that is not one of the bundle's valid paths "
            "(each level still judged)"
        )
    if not truth:
        section["reason"] = "no test row has a path whose values the bundle knows"
        return section
    section["evaluated"] = True
    return section


def tags_section(recommender, run, tags_column: str | None, problems: list[str]) -> dict:
    """The ``tags`` entry of ``metrics.json``: micro / macro figures and the per-tag table.

    Args:
        recommender: the loaded bundle.
        run: the ``evaluate.QueryRun`` of the test rows.
        tags_column: the column the rows' tags were read from, or None (not evaluated).
        problems: appended to when tags cannot be (fully) scored.

    Returns:
        See :data:`METRICS_KEYS`.
    """
    from recommender.evaluate import multi_hot, tag_metrics

    space = recommender.label_space
    if space.tags_column is None:
        return {"evaluated": False, "reason": "the bundle predicts no tags", "column": None}
    section: dict = {
        "evaluated": False,
        "reason": None,
        "column": space.tags_column,
        "separator": space.tags_separator,
        "threshold_mode": space.threshold_mode,
    }
    validation = recommender.manifest.metrics.get("tags")
    if tags_column is None:
        section["reason"] = f"the test catalog has no tags column {space.tags_column!r}"
        problems.append(f"tags not evaluated: {section['reason']}")
        return {**section, "validation": validation}
    truth, unknown = multi_hot([row.tags for row in run.rows], space.tags)
    if unknown:
        listed = ", ".join(f"{tag!r} ({count} row(s))" for tag, count in list(unknown.items())[:10])
        problems.append(f"tags: test rows carry tags the bundle never saw, left out of the tag figures: {listed}")
    section["unknown_tags"] = unknown
    section.update(tag_metrics(truth, run.tag_probabilities, space.thresholds, space.tags), validation=validation)
    section["evaluated"] = True
    return section


def _finite(value):
    """Replaces NaN and infinities by None: JSON has no NaN and readers choke on it."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _open_store(feature_store, backbone):
    if feature_store is None:
        return None
    from recommender.feature_parts import open_feature_store

    return open_feature_store(feature_store, backbone.identity["key"], backbone.feature_dim)


def _read_history(bundle: Path) -> dict:
    path = Path(bundle) / "history.json"
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return history if isinstance(history, dict) else {}


# -- the evaluate subcommand ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``evaluate`` subcommand's flags to a parser.

    Args:
        parser: the ``evaluate`` subparser (or a standalone parser).
    """
    from indexer.commands.flags import add_catalog_columns
    from recommender.engine import DEFAULT_K, MAX_K

    parser.add_argument("--bundle", required=True, type=Path, help="bundle folder to evaluate")
    parser.add_argument("--catalog", required=True, help="labelled test catalog: CSV or folder of class folders")
    parser.add_argument("--out", required=True, type=Path, help="report folder (created; report files replaced)")
    # The bundle knows its hierarchy and tags column and separator: only where the test catalog keeps what.
    add_catalog_columns(
        parser,
        label_help="label column to score, repeatable (default: every label column of the bundle the catalog has)",
        with_label_structure=False,
    )
    parser.add_argument(
        "--k", type=int, default=DEFAULT_K, help=f"neighbours per query, 1..{MAX_K} (default: %(default)s)"
    )
    parser.add_argument(
        "--feature-store",
        type=Path,
        default=None,
        help="HDF5 feature cache for the raw-feature baseline (default: the build's, $RECOMMENDER_CACHE/features.h5)",
    )
    parser.add_argument(
        "--no-raw-features",
        action="store_true",
        help="skip the raw-backbone-feature neighbours (they need the features of every catalog image)",
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=DEFAULT_EXAMPLES,
        help="correct and wrong example queries to show, each (default: %(default)s)",
    )


def _csv_header(source: str) -> list[str] | None:
    """The header of a CSV catalog, or None for a folder or an unreadable file (read_catalog reports it)."""
    path = Path(source)
    if not path.is_file():
        return None
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def run(args: argparse.Namespace) -> int:
    """Runs ``evaluate``: loads the bundle, reads the test catalog, writes the report.

    Prints a summary to stderr and one JSON line (report paths and headline figures) to
    stdout.

    Args:
        args: parsed flags from :func:`add_arguments`.

    Returns:
        0 when the report was written (problems with the input are in the report).

    Raises:
        QueryError: ``--k`` out of range.
        BundleError: the bundle is missing or fails verification.
        CatalogError: the test catalog is unreadable, or nothing in it can be evaluated.
    """
    from recommender.catalog import read_catalog
    from recommender.config import default_feature_store
    from recommender.engine import check_k, load_bundle

    check_k(args.k, "--k")
    recommender = load_bundle(args.bundle)
    missing: list[str] = []
    if args.label_columns:
        columns = list(args.label_columns)
    else:
        header = _csv_header(args.catalog)
        if header is None:  # a folder catalog has one label column: the primary head
            columns = [recommender.label_columns[0]]
        else:
            columns = [c for c in recommender.label_columns if c in header]
            missing = [c for c in recommender.label_columns if c not in header]
            if not columns:
                raise CatalogError(
                    f"{args.catalog}: none of the bundle's label columns ({', '.join(recommender.label_columns)}) "
                    f"is in its header ({', '.join(header)}); name one with --label-column"
                )
    unknown_columns = [c for c in columns if c not in recommender.label_columns]
    if unknown_columns:
        raise CatalogError(
            f"label column(s) {', '.join(unknown_columns)} are not heads of the bundle "
            f"(its heads: {', '.join(recommender.label_columns)})"
        )
    # Tags are read with the bundle's column and separator when the test catalog has that
    # column; without it tags are reported as not evaluated (a folder catalog never has one).
    tags_column = recommender.label_space.tags_column
    if tags_column is not None and tags_column not in (_csv_header(args.catalog) or []):
        tags_column = None
    catalog = read_catalog(
        args.catalog,
        image_column=args.image_column,
        id_column=args.id_column,
        label_columns=columns,
        split_column=args.split_column,
        splits=args.splits,
        image_root=args.image_root,
        tags_column=tags_column,
        tags_separator=recommender.label_space.tags_separator,
    )
    metrics = evaluate_bundle(
        recommender,
        catalog.rows,
        args.out,
        args.k,
        bad_rows=catalog.bad_rows,
        source=catalog.source,
        missing_columns=missing or [c for c in recommender.label_columns if c not in columns],
        tags_column=catalog.tags_column,
        feature_store=args.feature_store or default_feature_store(),
        raw_features=not args.no_raw_features,
        examples=args.examples,
        progress=sys.stderr.isatty(),
    )
    for problem in metrics["problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    headline = {}
    for column, entry in metrics["heads"].items():
        if not entry.get("evaluated"):
            continue
        raw = entry["retrieval"]["raw_features"]
        headline[column] = {
            "accuracy": entry["accuracy"],
            "precision_at_k": entry["retrieval"]["embedding"]["precision_at_k"],
            "raw_precision_at_k": raw["precision_at_k"] if raw else None,
        }
        raw_text = f", raw features {raw['precision_at_k']:.3f}" if raw else ""
        print(
            f"{column}: accuracy {entry['accuracy']:.3f}, P@{args.k} {entry['retrieval']['embedding']['precision_at_k']:.3f}"
            f"{raw_text} ({entry['queries']} queries)",
            file=sys.stderr,
        )
    hierarchy, tags = metrics["hierarchy"], metrics["tags"]
    if hierarchy["evaluated"]:
        print(
            f"hierarchy ({hierarchy['mode']}): path score {hierarchy['path_score']:.3f} of "
            f"{hierarchy['path_score_max']}, every level right {hierarchy['path_accuracy']:.3f} "
            f"({hierarchy['queries']} queries)",
            file=sys.stderr,
        )
    if tags["evaluated"]:
        print(
            f"tags: micro-F1 {tags['at_thresholds']['micro']['f1']:.3f} at the bundle's thresholds, "
            f"{tags['at_half']['micro']['f1']:.3f} at 0.5; macro-F1 {tags['at_thresholds']['macro']['f1']:.3f}",
            file=sys.stderr,
        )
    print(f"wrote {args.out / 'report.html'} and {args.out / 'metrics.json'}", file=sys.stderr)
    print(
        json.dumps(
            {
                "report": str(args.out / "report.html"),
                "metrics": str(args.out / "metrics.json"),
                "evaluated": metrics["catalog"]["evaluated"],
                "bad_rows": len(metrics["catalog"]["bad_rows"]),
                "heads": headline,
                "path_score": hierarchy.get("path_score") if hierarchy["evaluated"] else None,
                "tags_micro_f1": tags["at_thresholds"]["micro"]["f1"] if tags["evaluated"] else None,
            }
        )
    )
    return 0
