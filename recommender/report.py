"""The evaluation report: a bundle on a labelled test catalog -> metrics.json, PNG plots, report.html.

    python -m recommender evaluate --bundle BUNDLE --catalog TEST.csv --out REPORT_DIR [--k 6]

:func:`evaluate_bundle` is the library entry point; :func:`add_evaluate_arguments` and
:func:`run_evaluate` are the ``evaluate`` subcommand. Metrics come from
``recommender.evaluate``; this module adds the plots (matplotlib, Agg backend, no display
needed) and the HTML page, which references the PNGs beside it by relative path so the
folder opens offline and can be copied as a whole. A bundle with a label hierarchy also gets
per-level accuracy and the path score of its predicted paths; one with a tags column gets
micro / macro precision, recall and F1 of its tags at its tuned thresholds and at 0.5. Bad
input (unreadable or missing images, labels or tags the bundle never saw, label or tags
columns the test catalog lacks) is reported in ``metrics.json`` under ``problems`` and at
the top of the page; only a catalog with nothing left to evaluate is an error.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import html
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from recommender.catalog import BadRow, CatalogRow
from recommender.errors import CatalogError, InvalidImageError, RecommenderError

log = logging.getLogger(__name__)

#: Version of the ``metrics.json`` layout; bumped only when a documented key changes meaning.
METRICS_SCHEMA_VERSION = 2

#: How many correct and how many wrong example queries the example grid shows.
DEFAULT_EXAMPLES = 4

#: Side of the thumbnails in the example grid, pixels.
THUMBNAIL_SIZE = 112

#: The documented keys of ``metrics.json`` (a Markdown table, pasted into the README; a test
#: checks that every key listed here is in a generated file). ``HEAD`` is a label column,
#: ``SPACE`` is ``embedding`` or ``raw_features``.
METRICS_JSON_KEYS = """\
| key | meaning |
|---|---|
| `schema_version` | layout version of this file (2: `recall_at_k` became the usual recall, the old figure is `hit_rate_at_k`); bumped only when a documented key changes meaning |
| `created_at` | UTC time the report was made, ISO 8601 |
| `k` | neighbours per query used for the retrieval metrics |
| `bundle.path` / `bundle.bundle_id` | the evaluated bundle |
| `bundle.items` | catalog items in its index |
| `bundle.backbone` | backbone identity (kind, weights, input size, key) |
| `bundle.flip_average` | whether embeddings average the image and its mirror |
| `bundle.index_kind` | `flat` (exact) or `hnsw` (approximate) |
| `catalog.source` | the test catalog as given |
| `catalog.rows` | test rows read (good and bad) |
| `catalog.evaluated` | rows whose image was read and answered |
| `catalog.self_matches` | evaluated rows whose image is itself in the bundle's catalog (left out of their own neighbours) |
| `catalog.bad_rows` | rows left out: list of `{line, id, image, reason}` |
| `heads.HEAD.evaluated` | false when the test catalog lacks the column or has no row with a known label |
| `heads.HEAD.queries` | rows scored for this head (evaluated rows whose label the bundle knows) |
| `heads.HEAD.unknown_labels` | labels the bundle never saw -> row count (left out of this head's figures) |
| `heads.HEAD.accuracy` | share of queries whose predicted label is right (a hierarchy level: the level of the predicted valid path) |
| `heads.HEAD.precision` / `.recall` / `.f1` | `{macro, micro, weighted}` over the classes present in truth or predictions (0 for a class never predicted) |
| `heads.HEAD.roc_auc_ovr` | `{macro, weighted, classes_scored}`: one-vs-rest ROC AUC over classes with positive and negative queries; null when none |
| `heads.HEAD.per_class` | list of `{class, support, predicted, precision, recall, f1, roc_auc}`, every class of the bundle |
| `heads.HEAD.confusion_matrix` | `{labels, counts}`: `counts[i][j]` = queries of class `labels[i]` predicted as `labels[j]` |
| `heads.HEAD.retrieval.SPACE` | `{queries, precision_at_k, recall_at_k, hit_rate_at_k, map_at_k}`, or null when not measured: P@k = share of the k neighbours with the query's label; recall@k = share of the query's class (catalog items with its label, its own image left out) among the k, so at most k / class size; hit rate = share of queries with at least one such neighbour; mAP@k = mean AP@k over min(k, class size) |
| `heads.HEAD.plots` | `{confusion_matrix, roc, precision_recall}`: PNG file names in the report folder |
| `hierarchy.evaluated` / `.reason` | whether the label hierarchy was scored; why not (no hierarchy in the bundle, a level missing from the test catalog), else null |
| `hierarchy.mode` / `.levels` | `hierarchical` (one softmax head per level) or `combined` (one head over full paths), null without a hierarchy; level columns, root first |
| `hierarchy.queries` | rows scored: evaluated rows whose every level value the bundle knows |
| `hierarchy.unknown_paths` | true paths with a value the bundle never saw (`a > b > c`) -> row count (left out) |
| `hierarchy.outside_taxonomy` | scored rows whose true path is not one of the bundle's valid paths (each level still judged) |
| `hierarchy.level_accuracy` | level -> share of rows whose predicted path has the right value there |
| `hierarchy.path_score` / `.path_score_max` / `.path_score_total` | one point per right level of the predicted path: mean per row, its maximum (the number of levels), sum over the rows |
| `hierarchy.path_accuracy` | share of rows with every level right |
| `hierarchy.validation` | the hierarchy figures recorded in the bundle's manifest at build time |
| `tags.evaluated` / `.reason` | whether tags were scored; why not (no tags head in the bundle, no tags column in the test catalog), else null |
| `tags.column` / `.separator` / `.threshold_mode` | the bundle's tags column, its separator, `global` or `per_tag` thresholds |
| `tags.queries` | rows scored (every evaluated row; an empty cell means no tags) |
| `tags.unknown_tags` | tags the bundle never saw -> row count (left out of the figures) |
| `tags.at_thresholds` / `.at_half` | at the bundle's tuned thresholds / at 0.5: `{micro, macro, tags_averaged}`, each average `{precision, recall, f1}`; micro pools every (row, tag) decision (micro-F1 is the iMaterialist metric), macro averages over the `tags_averaged` tags true or predicted at least once |
| `tags.per_tag` | list of `{tag, support, predicted, precision, recall, f1, threshold}` at the bundle's thresholds, every tag of the bundle |
| `tags.validation` | the tag figures recorded in the bundle's manifest at build time (thresholds, validation micro-F1) |
| `retrieval_spaces.embedding` | how the trained embedding's neighbours were found (the bundle's index) |
| `retrieval_spaces.raw_features` | `{measured, reason}`: raw standardized backbone features, searched exactly |
| `training.epochs` | epochs trained (from the bundle's `history.json`) |
| `training.validation` | the validation metrics recorded in the bundle's manifest at build time |
| `training.baseline` | the build's baseline check from the manifest (the selection model on its validation split, before the refit on all rows); null when the bundle was built without it |
| `training.baseline.heads.HEAD.validation_accuracy` / `.validation_macro_f1` | the head on the validation rows whose class occurs in the training rows |
| `training.baseline.heads.HEAD.probe_validation_accuracy` / `.probe_validation_macro_f1` | a plain logistic regression on the head's column, fit on the training rows' standardized raw backbone features, on the same rows |
| `training.baseline.heads.HEAD.validation_rows` / `.left_out_rows` / `.probe_converged` | validation rows compared; rows left out (their class is absent from the training rows); whether the probe converged within its iteration cap |
| `training.baseline.retrieval.k` / `.column` / `.queries` / `.left_out_queries` | neighbours per query; the primary column; validation rows queried against the training rows as the catalog; rows left out (class absent from training) |
| `training.baseline.retrieval.embedding_p_at_k` / `.raw_features_p_at_k` | P@k in the selection model's standardized (flip-averaged) embedding / in the standardized raw backbone features |
| `training.baseline.seconds` | what the check cost the build |
| `training.plot` | training-curve PNG, or null when the bundle has no history |
| `examples.plot` | example-query grid PNG, or null when there were no queries |
| `examples.correct` / `examples.wrong` | ids of the queries shown, by the primary head's prediction |
| `problems` | human-readable list of everything that was left out or could not be measured |
| `seconds` | wall time of the evaluation |
"""

# Metric definitions (P@k, recall@k, hit rate@k, mAP@k) are in recommender.evaluate's module docstring.

RETRIEVAL_SPACES = ("embedding", "raw_features")


def evaluate_bundle(
    recommender,
    catalog_rows: list[CatalogRow],
    out_dir: str | Path,
    k: int = 6,
    *,
    bad_rows: list[BadRow] | tuple = (),
    source: str | None = None,
    missing_columns: list[str] | tuple = (),
    tags_column: str | None = None,
    feature_store: str | Path | None = None,
    raw_features: bool = True,
    examples: int = DEFAULT_EXAMPLES,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Evaluates a loaded bundle on labelled test rows and writes the report folder.

    Writes ``out_dir/metrics.json`` (keys documented in :data:`METRICS_JSON_KEYS`),
    ``out_dir/report.html`` and the PNG plots it shows.

    Args:
        recommender: a loaded ``engine.Recommender``.
        catalog_rows: labelled test rows (``Catalog.rows``); each row's ``labels`` holds the
            label columns to score.
        out_dir: the report folder (created; existing report files in it are replaced).
        k: neighbours per query.
        bad_rows: rows already rejected while reading the catalog (reported with the rest).
        source: the test catalog as given, for the report.
        missing_columns: bundle label columns the test catalog lacks (reported).
        tags_column: the column the rows' ``tags`` were read from (``Catalog.tags_column``);
            None when the test catalog has none, so tags are reported as not evaluated.
        feature_store: HDF5 feature cache for the raw-feature baseline (the build's store
            holds the catalog's features already); None extracts them without storing.
        raw_features: also measure neighbours by raw standardized backbone features.
        examples: correct and wrong example queries to show (each).
        batch_size: images per forward pass.
        progress: show a progress bar on stderr.

    Returns:
        The metrics, as written to ``metrics.json``.

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
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RecommenderError(f"report folder {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
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

    with _progress_bar(len(catalog_rows), "queries", progress) as bar:
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

    plots = _write_plots(recommender, run, heads, out_dir, k, examples, problems)
    history = _read_history(recommender.path)
    metrics = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "k": k,
        "bundle": {
            "path": str(recommender.path),
            "bundle_id": recommender.bundle_id,
            "items": len(recommender.rows),
            "backbone": recommender.manifest["backbone"]["identity"],
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
            "validation": recommender.manifest.get("metrics", {}).get("heads", {}),
            "baseline": build_baseline(recommender.manifest, problems),
            "plot": plots["training"],
        },
        "examples": plots["examples"],
        "problems": problems,
        "seconds": time.perf_counter() - started,
    }
    for column, entry in heads.items():
        if entry.get("evaluated"):
            entry["plots"] = plots["heads"][column]
    metrics = _finite(metrics)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(metrics, plots), encoding="utf-8")
    return metrics


def build_baseline(manifest: dict, problems: list[str]) -> dict | None:
    """The ``training.baseline`` entry: the manifest's build-time baseline check, or None.

    Args:
        manifest: the bundle's manifest.
        problems: appended to when the bundle has no (readable) baseline check.
    """
    from recommender.baseline import BuildBaseline

    payload = (manifest.get("metrics") or {}).get("baseline")
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
        See :data:`METRICS_JSON_KEYS`.
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
    validation = recommender.manifest.get("metrics", {}).get("hierarchy")
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
        See :data:`METRICS_JSON_KEYS`.
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
    validation = recommender.manifest.get("metrics", {}).get("tags")
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
    from recommender.features import FeatureStore

    return FeatureStore(feature_store, backbone.identity["key"], backbone.feature_dim)


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="img", disable=not enabled, leave=False)


def _read_history(bundle: Path) -> dict:
    path = Path(bundle) / "history.json"
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return history if isinstance(history, dict) else {}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "head"


# -- plots ---------------------------------------------------------------------------------


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> str:
    figure.savefig(path, format="png")
    return path.name


def _write_plots(recommender, run, heads: dict, out_dir: Path, k: int, examples: int, problems: list[str]) -> dict:
    """Draws every plot; returns their file names (None where a plot could not be made)."""
    plots: dict = {"heads": {}, "training": None, "examples": None}
    history = _read_history(recommender.path)
    if history.get("loss"):
        plots["training"] = _save(
            plot_training(history, head_titles(recommender.label_space)), out_dir / "training.png"
        )
    else:
        problems.append("no training curves: the bundle has no history.json (or it is empty)")
    for head, (column, classes) in enumerate(zip(recommender.label_columns, recommender.classes)):
        entry = heads[column]
        if not entry.get("evaluated"):
            continue
        lookup = {name: i for i, name in enumerate(classes)}
        known = np.array([row.labels[column] in lookup for row in run.rows], bool)
        truth = np.array([lookup[row.labels[column]] for row, ok in zip(run.rows, known) if ok])
        probabilities = run.probabilities[head][known]
        stem = f"{head}-{_slug(column)}"
        plots["heads"][column] = {
            "confusion_matrix": _save(
                plot_confusion_matrix(entry["confusion_matrix"], column), out_dir / f"confusion-{stem}.png"
            ),
            "roc": _save(plot_curves(truth, probabilities, classes, column, "roc"), out_dir / f"roc-{stem}.png"),
            "precision_recall": _save(
                plot_curves(truth, probabilities, classes, column, "pr"), out_dir / f"pr-{stem}.png"
            ),
        }
    retrieval = {c: e["retrieval"] for c, e in heads.items() if e.get("evaluated")}
    plots["retrieval"] = _save(plot_retrieval(retrieval, k), out_dir / "retrieval.png") if retrieval else None
    primary = next((i for i, c in enumerate(recommender.label_columns) if heads[c].get("evaluated")), None)
    if primary is not None:
        chosen = choose_examples(recommender, run, primary, examples)
        figure = plot_examples(recommender, run, primary, chosen, k)
        plots["examples"] = {
            "plot": _save(figure, out_dir / "examples.png"),
            "head": recommender.label_columns[primary],
            "correct": [run.rows[i].id for i in chosen["correct"]],
            "wrong": [run.rows[i].id for i in chosen["wrong"]],
        }
    else:
        plots["examples"] = {"plot": None, "head": None, "correct": [], "wrong": []}
    return plots


def head_titles(label_space) -> list[str]:
    """What each model output head predicts, in head order (Keras names them ``head_i``).

    A combined hierarchy's head predicts full paths and a tags head several tags, so head
    ``i`` is not label column ``i`` in general.
    """
    titles = []
    for head in label_space.heads:
        if head.target == "path":
            titles.append("path (" + " > ".join(label_space.taxonomy.levels) + ")")
        elif head.target == "tags":
            titles.append(f"tags ({head.column})")
        else:
            titles.append(head.column)
    return titles


def plot_training(history: dict, label_columns: list[str]):
    """Loss and accuracy per epoch, training and validation, one accuracy line per head.

    Args:
        history: the bundle's ``history.json`` (Keras ``History.history``).
        label_columns: what each head predicts, in head order (Keras calls them ``head_i``;
            see :func:`head_titles`). Heads without an accuracy metric (tags) draw no line.

    Returns:
        A matplotlib Figure.
    """
    figure = _figure(10, 3.8)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    epochs = np.arange(1, len(history["loss"]) + 1)
    loss_axes.plot(epochs, history["loss"], label="training")
    if "val_loss" in history:
        loss_axes.plot(epochs, history["val_loss"], label="validation", linestyle="--")
    loss_axes.set(title="loss (sum over heads)", xlabel="epoch")
    loss_axes.legend()
    for index, column in enumerate(label_columns):
        # A one-head Keras model may name its metric plain "accuracy".
        for key, style, kind in (
            (f"head_{index}_accuracy", "-", "training"),
            (f"val_head_{index}_accuracy", "--", "validation"),
        ):
            values = history.get(key) or (
                history.get(key.replace(f"head_{index}_", "")) if len(label_columns) == 1 else None
            )
            if values:
                accuracy_axes.plot(
                    epochs[: len(values)], values, linestyle=style, color=f"C{index}", label=f"{column} {kind}"
                )
    accuracy_axes.set(title="accuracy per head", xlabel="epoch", ylim=(0, 1.02))
    accuracy_axes.legend(fontsize="small")
    return figure


def plot_confusion_matrix(confusion: dict, column: str):
    """Confusion matrix, rows normalised to the true class, annotated with counts.

    Args:
        confusion: ``{"labels", "counts"}`` as in ``metrics.json``.
        column: the head's name, for the title.
    """
    labels = confusion["labels"]
    counts = np.asarray(confusion["counts"], np.int64)
    side = max(4.0, 0.45 * len(labels) + 2.5)
    figure = _figure(side + 1, side)
    axes = figure.subplots()
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set(xlabel="predicted", ylabel="true", title=f"{column}: confusion matrix (row share, counts)")
    if len(labels) <= 30:  # past that the numbers are unreadable anyway
        for i in range(len(labels)):
            for j in range(len(labels)):
                if counts[i, j]:
                    colour = "white" if shares[i, j] > 0.5 else "black"
                    axes.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, color=colour)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return figure


def plot_curves(truth: np.ndarray, probabilities: np.ndarray, classes: list[str], column: str, kind: str):
    """One-vs-rest ROC or precision-recall curves, one per class with positives, plus micro-average.

    Args:
        truth: (n,) int class indices.
        probabilities: (n, classes) float.
        classes: class names.
        column: the head's name, for the title.
        kind: ``roc`` or ``pr``.
    """
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    figure = _figure(7.5, 5)
    axes = figure.subplots()
    onehot = np.eye(len(classes), dtype=bool)[truth]
    curves = [(name, onehot[:, i], probabilities[:, i]) for i, name in enumerate(classes)]
    curves.append(("micro-average", onehot.ravel(), probabilities.ravel()))
    for name, positives, scores in curves:
        if not positives.any() or positives.all():
            continue  # undefined for a class without positives (or negatives) among the queries
        style = {"color": "black", "linewidth": 2.2} if name == "micro-average" else {"linewidth": 1}
        if kind == "roc":
            false_positive, true_positive, _ = roc_curve(positives, scores)
            axes.plot(
                false_positive, true_positive, label=f"{name} ({auc(false_positive, true_positive):.3f})", **style
            )
        else:
            precision, recall, _ = precision_recall_curve(positives, scores)
            score = average_precision_score(positives, scores)
            axes.plot(recall, precision, label=f"{name} (AP {score:.3f})", drawstyle="steps-post", **style)
    if kind == "roc":
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axes.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{column}: ROC, one-vs-rest (AUC)")
    else:
        axes.set(xlabel="recall", ylabel="precision", title=f"{column}: precision-recall, one-vs-rest")
    axes.set(xlim=(0, 1), ylim=(0, 1.02))
    axes.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def plot_retrieval(retrieval: dict, k: int):
    """Grouped bars: P@k, recall@k, hit rate@k and mAP@k of the trained embedding next to raw features, per head."""
    figure = _figure(max(5.0, 4.0 * len(retrieval)), 3.6)
    all_axes = np.atleast_1d(figure.subplots(1, len(retrieval)))
    names = (
        ("precision_at_k", f"P@{k}"),
        ("recall_at_k", f"recall@{k}"),
        ("hit_rate_at_k", f"hit rate@{k}"),
        ("map_at_k", f"mAP@{k}"),
    )
    for axes, (column, spaces) in zip(all_axes, retrieval.items()):
        positions = np.arange(len(names))
        for offset, space, colour in ((-0.2, "embedding", "tab:blue"), (0.2, "raw_features", "tab:grey")):
            values = spaces.get(space)
            if values is None:
                continue
            heights = [values[key] for key, _ in names]
            bars = axes.bar(positions + offset, heights, width=0.4, label=space.replace("_", " "), color=colour)
            axes.bar_label(bars, fmt="%.2f", fontsize=7)
        axes.set_xticks(positions, [label for _, label in names])
        axes.set(title=f"{column}: neighbours", ylim=(0, 1.1))
        axes.legend(fontsize="x-small", loc="lower right")
    return figure


def choose_examples(recommender, run, head: int, count: int) -> dict[str, list[int]]:
    """Picks up to ``count`` correctly and ``count`` wrongly predicted queries (seeded, spread out).

    Returns:
        ``{"correct": [row indices], "wrong": [row indices]}`` into ``run.rows``.
    """
    column, classes = recommender.label_columns[head], recommender.classes[head]
    right = np.array([classes[p] == row.labels[column] for p, row in zip(run.predicted[head], run.rows)], bool)
    rng = np.random.default_rng(0)
    chosen = {}
    for name, mask in (("correct", right), ("wrong", ~right)):
        candidates = np.flatnonzero(mask)
        picked = rng.choice(candidates, size=min(count, len(candidates)), replace=False) if len(candidates) else []
        chosen[name] = sorted(int(i) for i in picked)
    return chosen


def _thumbnail(path: str | Path, size: int) -> np.ndarray:
    """The image as the backbone sees it (``load_image``), or a grey square when unreadable."""
    from recommender.images import load_image

    try:
        return load_image(path, size)
    except InvalidImageError:
        return np.full((size, size, 3), 200, np.uint8)


def plot_examples(recommender, run, head: int, chosen: dict[str, list[int]], k: int):
    """Grid: each chosen query, then its k neighbours framed green (same label) or red (other).

    Args:
        recommender: the loaded bundle.
        run: the ``evaluate.QueryRun``.
        head: index of the head whose labels decide right and wrong.
        chosen: from :func:`choose_examples`.
        k: neighbours per query.
    """
    column, classes = recommender.label_columns[head], recommender.classes[head]
    order = [("correct", i) for i in chosen["correct"]] + [("wrong", i) for i in chosen["wrong"]]
    columns = k + 1
    figure = _figure(1.45 * columns, 1.75 * max(1, len(order)))
    if not order:
        figure.text(0.5, 0.5, "no queries to show", ha="center")
        return figure
    grid = np.atleast_2d(figure.subplots(len(order), columns, squeeze=False))
    for line, (kind, index) in enumerate(order):
        row = run.rows[index]
        predicted = classes[int(run.predicted[head][index])]
        query_axes = grid[line, 0]
        query_axes.imshow(_thumbnail(row.path, THUMBNAIL_SIZE))
        _frame(query_axes, "tab:green" if kind == "correct" else "tab:red", 3)
        query_axes.set_title(f"query ({kind})\ntrue {row.labels[column]}\npredicted {predicted}", fontsize=7)
        for rank in range(k):
            axes = grid[line, rank + 1]
            position = int(run.positions[index, rank])
            if position < 0:
                axes.axis("off")
                continue
            neighbour = recommender.rows[position]
            same = neighbour["labels"].get(column) == row.labels[column]
            axes.imshow(_thumbnail(neighbour["path"], THUMBNAIL_SIZE))
            _frame(axes, "tab:green" if same else "tab:red", 2)
            axes.set_title(f"{rank + 1}. {neighbour['labels'].get(column)}\n{'right' if same else 'wrong'}", fontsize=7)
    figure.suptitle(f"example queries and their {k} nearest catalog items ({column}: green = same label)", fontsize=9)
    return figure


def _frame(axes, colour: str, width: float) -> None:
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


# -- HTML ----------------------------------------------------------------------------------


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_number(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(name: str | None, alt: str) -> str:
    if not name:
        return ""
    return f'<figure><img src="{html.escape(name)}" alt="{html.escape(alt)}"></figure>'


def render_html(metrics: dict, plots: dict) -> str:
    """The report page: summary, problems, per-head tables and the plots (relative PNG links).

    Args:
        metrics: as written to ``metrics.json``.
        plots: file names from the plotting step.

    Returns:
        A complete HTML document (no scripts, no external resources).
    """
    k = metrics["k"]
    bundle, catalog = metrics["bundle"], metrics["catalog"]
    parts = [
        f"<h1>Evaluation of bundle {html.escape(bundle['bundle_id'])}</h1>",
        "<p>"
        + f"Bundle <code>{html.escape(bundle['path'])}</code>: {bundle['items']} catalog items, "
        + f"{html.escape(str(bundle['backbone'].get('kind')))} backbone, {html.escape(bundle['index_kind'])} index"
        + (", flip-averaged embeddings" if bundle["flip_average"] else "")
        + f". Test catalog <code>{html.escape(str(catalog['source']))}</code>: {catalog['rows']} rows, "
        + f"{catalog['evaluated']} evaluated, {len(catalog['bad_rows'])} left out. "
        + f"Neighbours per query k = {k}. Made {html.escape(metrics['created_at'])} in {metrics['seconds']:.1f} s.</p>",
    ]
    if metrics["problems"]:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in metrics["problems"])
        parts.append(f'<section class="problems"><h2>Problems</h2><ul>{items}</ul></section>')
    summary = []
    for column, entry in metrics["heads"].items():
        if not entry.get("evaluated"):
            summary.append([column, entry["queries"], None, None, None, None, None, None])
            continue
        embedding = entry["retrieval"]["embedding"]
        raw = entry["retrieval"]["raw_features"] or {}
        summary.append(
            [
                column,
                entry["queries"],
                entry["accuracy"],
                entry["f1"]["macro"],
                entry["roc_auc_ovr"]["macro"],
                embedding["precision_at_k"],
                raw.get("precision_at_k"),
                embedding["map_at_k"],
            ]
        )
    parts.append("<h2>Summary</h2>")
    parts.append(
        _table(
            [
                "head",
                "queries",
                "accuracy",
                "F1 macro",
                "ROC AUC macro",
                f"P@{k} embedding",
                f"P@{k} raw",
                f"mAP@{k} embedding",
            ],
            summary,
        )
    )
    parts += _hierarchy_html(metrics)
    parts += _tags_html(metrics)
    parts += _baseline_html(metrics)
    parts.append("<h2>Neighbours: trained embedding vs raw backbone features</h2>")
    raw_note = metrics["retrieval_spaces"]["raw_features"]
    parts.append(
        f"<p>P@{k}: share of the {k} neighbours with the query's label. recall@{k}: share of the query's "
        f"class (the catalog items with its label, its own image left out) found among the {k}, so at most "
        f"{k} / class size. hit rate@{k}: share of queries with at least one neighbour of their label. "
        f"mAP@{k}: mean average precision over the {k} neighbours. "
        + ("" if raw_note["measured"] else f"Raw features not measured: {html.escape(str(raw_note['reason']))}.")
        + "</p>"
    )
    rows = []
    for column, entry in metrics["heads"].items():
        if not entry.get("evaluated"):
            continue
        for space in RETRIEVAL_SPACES:
            values = entry["retrieval"][space]
            if values is not None:
                rows.append(
                    [
                        column,
                        space.replace("_", " "),
                        values["precision_at_k"],
                        values["recall_at_k"],
                        values["hit_rate_at_k"],
                        values["map_at_k"],
                    ]
                )
    parts.append(_table(["head", "space", f"P@{k}", f"recall@{k}", f"hit rate@{k}", f"mAP@{k}"], rows))
    parts.append(_image(plots.get("retrieval"), "retrieval metrics"))
    parts.append("<h2>Example queries</h2>")
    parts.append(_image((plots.get("examples") or {}).get("plot"), "example queries and neighbours"))
    parts.append("<h2>Training curves</h2>")
    parts.append(_image(plots.get("training"), "training curves") or "<p>No training history in the bundle.</p>")
    for column, entry in metrics["heads"].items():
        parts.append(f"<h2>Head <code>{html.escape(column)}</code></h2>")
        if not entry.get("evaluated"):
            parts.append("<p>Not evaluated (see Problems).</p>")
            continue
        averages = [
            [name, entry[name]["macro"], entry[name]["micro"], entry[name]["weighted"]]
            for name in ("precision", "recall", "f1")
        ]
        averages.append(
            ["ROC AUC (one-vs-rest)", entry["roc_auc_ovr"]["macro"], None, entry["roc_auc_ovr"]["weighted"]]
        )
        parts.append(f"<p>Accuracy {_number(entry['accuracy'])} on {entry['queries']} queries.</p>")
        parts.append(_table(["", "macro", "micro", "weighted"], averages))
        per_class = [
            [c["class"], c["support"], c["predicted"], c["precision"], c["recall"], c["f1"], c["roc_auc"]]
            for c in entry["per_class"]
        ]
        parts.append(_table(["class", "support", "predicted", "precision", "recall", "F1", "ROC AUC"], per_class))
        head_plots = plots["heads"].get(column, {})
        parts.append('<div class="plots">')
        parts.append(_image(head_plots.get("confusion_matrix"), f"{column} confusion matrix"))
        parts.append(_image(head_plots.get("roc"), f"{column} ROC curves"))
        parts.append(_image(head_plots.get("precision_recall"), f"{column} precision-recall curves"))
        parts.append("</div>")
    if catalog["bad_rows"]:
        parts.append("<h2>Rows left out</h2>")
        parts.append(
            _table(
                ["line", "id", "image", "reason"],
                [[b["line"], b["id"], b["image"], b["reason"]] for b in catalog["bad_rows"]],
            )
        )
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        ".problems{background:#fff4e5;border-left:4px solid #f0a020;padding:0.2em 1em}"
        ".plots figure{display:inline-block;margin:0.5em;vertical-align:top;max-width:48%}figure{margin:0.5em 0}"
    )
    title = f"Evaluation of bundle {html.escape(bundle['bundle_id'])}"
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
        f"<style>{style}</style>\n</head>\n<body>\n" + "\n".join(p for p in parts if p) + "\n</body>\n</html>\n"
    )


HIERARCHY_MODE_TEXT = {
    "hierarchical": "hierarchical: one softmax head per level, combined over the valid paths",
    "combined": "combined: one softmax head over the full paths",
}


def _hierarchy_html(metrics: dict) -> list[str]:
    """The Hierarchy section (nothing for a bundle without a hierarchy)."""
    section = metrics.get("hierarchy") or {}
    if not section.get("mode"):
        return []
    levels = " &gt; ".join(f"<code>{html.escape(level)}</code>" for level in section["levels"])
    parts = [f"<h2>Hierarchy {levels}</h2>"]
    mode = HIERARCHY_MODE_TEXT.get(section["mode"], section["mode"])
    parts.append(f"<p>Mode: {html.escape(mode)}. Predictions follow the most probable valid path.</p>")
    if not section.get("evaluated"):
        parts.append(f"<p>Not evaluated: {html.escape(str(section['reason']))}.</p>")
        return parts
    validation = section.get("validation") or {}
    validation_heads = metrics["training"]["validation"]
    parts.append(
        f"<p>{section['queries']} queries; one point per right level of the predicted path "
        f"(at most {section['path_score_max']} per query).</p>"
    )
    parts.append(
        _table(
            ["level", "accuracy", "validation accuracy (build)"],
            [
                [level, accuracy, (validation_heads.get(level) or {}).get("validation_accuracy")]
                for level, accuracy in section["level_accuracy"].items()
            ],
        )
    )
    parts.append(
        _table(
            ["", "test", "validation (build)"],
            [
                ["path score (mean per query)", section["path_score"], validation.get("path_score")],
                ["path score maximum", section["path_score_max"], validation.get("path_score_max")],
                [
                    f"path score total (of {section['queries'] * section['path_score_max']})",
                    section["path_score_total"],
                    None,
                ],
                ["every level right", section["path_accuracy"], validation.get("path_accuracy")],
            ],
        )
    )
    return parts


def _baseline_html(metrics: dict) -> list[str]:
    """The build-time baseline section: each head beside a logistic-regression probe."""
    from recommender.baseline import BuildBaseline

    section = metrics["training"].get("baseline")
    parts = ["<h2>Build-time check: trained heads against a probe on raw features</h2>"]
    if not section:
        parts.append("<p>The bundle records no build-time baseline check.</p>")
        return parts
    retrieval = section["retrieval"]
    shortfalls = BuildBaseline.from_json(section).shortfalls()
    if shortfalls:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in shortfalls)
        parts.append(f'<div class="problems"><ul>{items}</ul></div>')
    parts.append(
        "<p>Recorded when the bundle was built, on its validation split, with the model trained on the "
        "training split only (before the refit on all rows). The probe is a plain logistic regression on "
        "the standardized raw backbone features of the same training rows; a head below it did not gain "
        "from training. Validation rows whose class the training rows lack are left out of both.</p>"
    )
    parts.append(
        _table(
            ["head", "validation rows", "accuracy", "probe accuracy", "macro-F1", "probe macro-F1"],
            [
                [
                    column,
                    head["validation_rows"],
                    head["validation_accuracy"],
                    head["probe_validation_accuracy"],
                    head["validation_macro_f1"],
                    head["probe_validation_macro_f1"],
                ]
                for column, head in section["heads"].items()
            ],
        )
    )
    k = retrieval["k"]
    parts.append(
        _table(
            ["primary column", "queries", f"P@{k} embedding", f"P@{k} raw features"],
            [
                [
                    retrieval["column"],
                    retrieval["queries"],
                    retrieval["embedding_p_at_k"],
                    retrieval["raw_features_p_at_k"],
                ]
            ],
        )
    )
    return parts


def _tags_html(metrics: dict) -> list[str]:
    """The Tags section (nothing for a bundle without tags)."""
    section = metrics.get("tags") or {}
    if not section.get("column"):
        return []
    parts = [f"<h2>Tags <code>{html.escape(section['column'])}</code></h2>"]
    if not section.get("evaluated"):
        parts.append(f"<p>Not evaluated: {html.escape(str(section['reason']))}.</p>")
        return parts
    parts.append(
        f"<p>{section['queries']} queries. A tag is predicted at or above its threshold "
        f"({html.escape(section['threshold_mode'])} thresholds tuned on the validation split for micro-F1). "
        "Micro pools every (query, tag) decision; macro averages the tags true or predicted at least once.</p>"
    )
    rows = []
    for key, name in (("at_thresholds", "bundle thresholds"), ("at_half", "0.5")):
        for average in ("micro", "macro"):
            values = section[key][average]
            rows.append([f"{average} at {name}", values["precision"], values["recall"], values["f1"]])
    parts.append(_table(["", "precision", "recall", "F1"], rows))
    parts.append(
        _table(
            ["tag", "support", "predicted", "precision", "recall", "F1", "threshold"],
            [
                [t["tag"], t["support"], t["predicted"], t["precision"], t["recall"], t["f1"], t["threshold"]]
                for t in section["per_tag"]
            ],
        )
    )
    return parts


# -- the evaluate subcommand ---------------------------------------------------------------


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``evaluate`` subcommand's flags to a parser.

    Args:
        parser: the ``evaluate`` subparser (or a standalone parser).
    """
    parser.add_argument("--bundle", required=True, type=Path, help="bundle folder to evaluate")
    parser.add_argument("--catalog", required=True, help="labelled test catalog: CSV or folder of class folders")
    parser.add_argument("--out", required=True, type=Path, help="report folder (created; report files replaced)")
    parser.add_argument(
        "--image-column", default="file", help="CSV column with image paths, relative to the CSV (default: %(default)s)"
    )
    parser.add_argument("--id-column", default=None, help="CSV column with ids (default: the image path is the id)")
    parser.add_argument(
        "--label-column",
        action="append",
        dest="label_columns",
        metavar="COLUMN",
        help="label column to score, repeatable (default: every label column of the bundle the catalog has)",
    )
    parser.add_argument(
        "--split", action="append", dest="splits", metavar="NAME", help="keep only rows of this split (repeatable)"
    )
    parser.add_argument("--split-column", default="split", help="CSV column naming each row's split (default: split)")
    parser.add_argument("--k", type=int, default=6, help="neighbours per query, 1..100 (default: 6)")
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


def run_evaluate(args: argparse.Namespace) -> int:
    """Runs ``evaluate``: loads the bundle, reads the test catalog, writes the report.

    Prints a summary to stderr and one JSON line (report paths and headline figures) to
    stdout.

    Args:
        args: parsed flags from :func:`add_evaluate_arguments`.

    Returns:
        0 when the report was written (problems with the input are in the report).

    Raises:
        QueryError: ``--k`` out of range.
        BundleError: the bundle is missing or fails verification.
        CatalogError: the test catalog is unreadable, or nothing in it can be evaluated.
    """
    from recommender.catalog import read_catalog
    from recommender.config import default_feature_store
    from recommender.engine import MAX_K, load_bundle
    from recommender.errors import QueryError

    if not 1 <= args.k <= MAX_K:
        raise QueryError(f"--k must be from 1 to {MAX_K}, got {args.k}")
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
