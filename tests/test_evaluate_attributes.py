"""Evaluation of hierarchies and tags: metric code by hand and against scikit-learn; reports of
the hierarchical and the combined attribute bundles end to end."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ATTRIBUTE_HIERARCHY, TINY_COLOURS, TINY_PATTERNS, TINY_SIZE
from sklearn.metrics import precision_recall_fscore_support
from test_evaluate import check_documented_keys

from recommender.catalog import read_catalog
from recommender.evaluate import hierarchy_metrics, multi_hot, multilabel_metrics, tag_metrics

# -- path score by hand --------------------------------------------------------------------

LEVELS = ("department", "family", "label")


def test_path_score_by_hand():
    truth = [
        ("prints", "lines", "stripes"),
        ("prints", "shapes", "dots"),
        ("basics", "solid", "plain"),
        ("prints", "shapes", "checks"),
    ]
    predicted = [
        ("prints", "lines", "stripes"),  # 3 points
        ("prints", "shapes", "checks"),  # 2: right department and family, wrong leaf
        ("prints", "lines", "stripes"),  # 0: wrong from the root down
        ("prints", "lines", "stripes"),  # 1: right department only
    ]
    figures = hierarchy_metrics(truth, predicted, LEVELS)
    assert figures["queries"] == 4
    assert figures["level_accuracy"] == pytest.approx({"department": 3 / 4, "family": 2 / 4, "label": 1 / 4})
    assert figures["path_score_total"] == 3 + 2 + 0 + 1
    assert figures["path_score"] == pytest.approx(6 / 4)
    assert figures["path_score_max"] == 3
    assert figures["path_accuracy"] == pytest.approx(1 / 4)


def test_path_score_of_no_queries_is_undefined_not_a_crash():
    figures = hierarchy_metrics([], [], LEVELS)
    assert figures["queries"] == 0 and figures["path_score_total"] == 0
    assert np.isnan(figures["path_score"]) and np.isnan(figures["level_accuracy"]["label"])


# -- multi-label metrics against scikit-learn ----------------------------------------------


def _random_tags(seed: int, n: int = 120, tags: int = 7):
    rng = np.random.default_rng(seed)
    truth = rng.random((n, tags)) < np.linspace(0.05, 0.5, tags)
    scores = np.clip(0.55 * truth + rng.normal(0.25, 0.2, (n, tags)), 0, 1)
    return truth, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multilabel_metrics_equal_scikit_learn(seed):
    truth, scores = _random_tags(seed)
    predicted = scores >= 0.5
    figures = multilabel_metrics(truth, predicted)
    assert truth.any(axis=0).all()  # every tag occurs: macro is over all of them, sklearn's default
    for average in ("micro", "macro"):
        precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
        assert figures[average]["precision"] == pytest.approx(precision)
        assert figures[average]["recall"] == pytest.approx(recall)
        assert figures[average]["f1"] == pytest.approx(f1)
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    per_tag = figures["per_tag"]
    assert per_tag["support"].tolist() == support.tolist()
    assert per_tag["predicted"].tolist() == predicted.sum(axis=0).tolist()
    assert per_tag["precision"] == pytest.approx(precision)
    assert per_tag["recall"] == pytest.approx(recall)
    assert per_tag["f1"] == pytest.approx(f1)
    assert 0.3 < figures["micro"]["f1"] < 0.95  # a non-trivial case


def test_multilabel_macro_leaves_out_tags_neither_true_nor_predicted():
    truth = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0]], bool)
    predicted = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 1, 0, 0]], bool)
    # tag 0: P 1, R 1/2; tag 1: P 1, R 1; tag 2 never true nor predicted; tag 3: predicted once, never true
    figures = multilabel_metrics(truth, predicted)
    assert figures["tags_averaged"] == 3
    present = [0, 1, 3]
    for average in ("micro", "macro"):
        expected = precision_recall_fscore_support(truth, predicted, labels=present, average=average, zero_division=0)[
            :3
        ]
        assert (figures[average]["precision"], figures[average]["recall"], figures[average]["f1"]) == pytest.approx(
            expected
        )
    assert figures["macro"]["precision"] == pytest.approx((1 + 1 + 0) / 3)
    assert figures["macro"]["recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert figures["micro"]["precision"] == pytest.approx(3 / 4) and figures["micro"]["recall"] == pytest.approx(3 / 4)


def test_tag_metrics_use_the_bundle_thresholds_and_compare_with_half():
    truth = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], bool)
    # float32 like the model's sigmoid outputs: 0.6 (float32) reaches the threshold 0.6
    scores = np.array([[0.4, 0.1], [0.7, 0.6], [0.2, 0.9], [0.35, 0.55]], np.float32)
    figures = tag_metrics(truth, scores, np.array([0.3, 0.6]), ["warm", "cool"])
    # thresholds 0.3 / 0.6: warm predicted for rows 0, 1, 3 (2 right, 1 wrong); cool for rows 1, 2 (both right)
    assert figures["at_thresholds"]["micro"] == pytest.approx({"precision": 4 / 5, "recall": 1.0, "f1": 8 / 9})
    # at 0.5: warm for row 1 only; cool for rows 1, 2, 3 (one wrong)
    assert figures["at_half"]["micro"] == pytest.approx({"precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4})
    assert figures["per_tag"][0] == pytest.approx(
        {"tag": "warm", "support": 2, "predicted": 3, "precision": 2 / 3, "recall": 1.0, "f1": 0.8, "threshold": 0.3}
    )
    assert figures["per_tag"][1]["threshold"] == pytest.approx(0.6)


def test_multi_hot_leaves_out_tags_the_bundle_never_saw():
    hot, unknown = multi_hot([("cool", "striped"), (), ("lined", "warm"), ("lined",)], ["cool", "striped", "warm"])
    assert hot.tolist() == [[True, True, False], [False, False, False], [False, False, True], [False, False, False]]
    assert unknown == {"lined": 2}


# -- reports of the attribute bundles ------------------------------------------------------


@pytest.fixture(scope="module")
def combined_bundle(combined_cli_build) -> Path:
    """The attribute catalog built with one combined head over full paths (through the CLI)."""
    out, code, stderr = combined_cli_build
    assert code == 0, stderr
    return out


@pytest.fixture(scope="module")
def attribute_test_catalog(tmp_path_factory) -> Path:
    """Fresh generated shirts: 2 per (pattern, colour) of the bundle's patterns plus the
    unseen "grid" (label and tag "lined" unknown to the bundle), and one stripes row filed
    under family "shapes" (known values, a path outside the taxonomy)."""
    from recommender.synthetic import generate_catalog

    catalog = generate_catalog(
        tmp_path_factory.mktemp("attribute-test"),
        per_class=2,
        patterns=(*TINY_PATTERNS, "grid"),
        colours=TINY_COLOURS,
        size=TINY_SIZE,
        seed=7,
    )
    with open(catalog, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    next(row for row in rows if row["label"] == "stripes")["family"] = "shapes"
    with open(catalog, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return catalog


def _run_evaluate(bundle: Path, catalog: Path, out: Path, *extra: str) -> dict:
    from indexer.evaluate import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--bundle", str(bundle), "--catalog", str(catalog), "--id-column", "id", "--out", str(out), *extra]
    )
    assert run(args) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def attribute_report(attribute_bundle, attribute_test_catalog, session_store, tmp_path_factory):
    """The hierarchical bundle's report through the ``evaluate`` command; returns (metrics, folder)."""
    out = tmp_path_factory.mktemp("attribute-report") / "report"
    metrics = _run_evaluate(attribute_bundle, attribute_test_catalog, out, "--feature-store", str(session_store))
    return metrics, out


def test_attribute_report_writes_every_documented_key_and_the_new_sections(attribute_report):
    metrics, out = attribute_report
    check_documented_keys(metrics, "label")
    for column in ("label", "colour", *ATTRIBUTE_HIERARCHY):
        assert metrics["heads"][column]["evaluated"]
    page = (out / "report.html").read_text()
    assert "<h2>Hierarchy" in page and "path score (mean per query)" in page and "every level right" in page
    assert "<h2>Tags" in page and "micro at bundle thresholds" in page and "macro at 0.5" in page
    for tag in ("checked", "cool", "dark", "dotted", "striped", "warm"):
        assert f"<td>{tag}</td>" in page  # the per-tag table


def test_attribute_report_scores_the_predicted_paths_and_tags(
    attribute_report, attribute_engine, attribute_test_catalog
):
    metrics, _ = attribute_report
    hierarchy, tags = metrics["hierarchy"], metrics["tags"]
    assert hierarchy["evaluated"] and hierarchy["mode"] == "hierarchical"
    assert hierarchy["levels"] == list(ATTRIBUTE_HIERARCHY)
    assert hierarchy["unknown_paths"] == {"prints > lines > grid": 6}
    assert hierarchy["outside_taxonomy"] == 1
    assert tags["unknown_tags"] == {"lined": 6}
    assert any("never saw" in p and "grid" in p for p in metrics["problems"])

    # The same figures from the engine's own answers (its predicted path and its tags above
    # threshold), computed here by hand.
    space = attribute_engine.label_space
    rows = read_catalog(
        attribute_test_catalog, id_column="id", label_columns=["label", "colour", "department", "family"]
    ).rows
    answers = attribute_engine.query_many([row.path for row in rows], k=1)
    points, every_level, scored = 0, 0, 0
    true_positive = predicted_count = true_count = 0
    for row, answer in zip(rows, answers):
        truth = {tag for tag in row.extra["tags"].split("|") if tag in space.tags}
        found = {t["tag"] for t in answer["tags"]}
        true_positive += len(truth & found)
        predicted_count += len(found)
        true_count += len(truth)
        if row.labels["label"] == "grid":
            continue  # a leaf the bundle never saw: left out of the path score
        right = [row.labels[level] == value for level, value in zip(ATTRIBUTE_HIERARCHY, answer["hierarchy"]["path"])]
        points += sum(right)
        every_level += all(right)
        scored += 1
    assert hierarchy["queries"] == scored == 24
    assert hierarchy["path_score_total"] == points
    assert hierarchy["path_score"] == pytest.approx(points / scored)
    assert hierarchy["path_accuracy"] == pytest.approx(every_level / scored)
    assert hierarchy["path_accuracy"] <= 23 / 24  # the stripes row filed under "shapes" cannot be all right
    assert tags["queries"] == 30
    assert tags["at_thresholds"]["micro"]["precision"] == pytest.approx(true_positive / predicted_count)
    assert tags["at_thresholds"]["micro"]["recall"] == pytest.approx(true_positive / true_count)
    assert tags["at_thresholds"]["micro"]["f1"] == pytest.approx(2 * true_positive / (predicted_count + true_count))
    assert [t["threshold"] for t in tags["per_tag"]] == pytest.approx(space.thresholds.tolist())
    # Leaf accuracy is the same figure in the head's table and the hierarchy's (the same 24 rows).
    assert hierarchy["level_accuracy"]["label"] == pytest.approx(metrics["heads"]["label"]["accuracy"])
    # Generated shirts are easy: the path and the tags are mostly right.
    assert hierarchy["path_score"] >= 2.5 and tags["at_thresholds"]["micro"]["f1"] >= 0.8


@pytest.mark.parametrize("bundle_fixture", ["attribute_bundle", "combined_bundle"])
def test_both_hierarchy_modes_report_level_accuracy_and_path_score(
    bundle_fixture, request, attribute_test_catalog, tmp_path
):
    from indexer.evaluate import evaluate_bundle
    from recommender.engine import load_bundle

    engine = load_bundle(request.getfixturevalue(bundle_fixture))
    mode = "combined" if bundle_fixture == "combined_bundle" else "hierarchical"
    assert engine.label_space.hierarchy_mode == mode
    catalog = read_catalog(
        attribute_test_catalog,
        id_column="id",
        label_columns=["label", "colour", *ATTRIBUTE_HIERARCHY[:2]],
        tags_column="tags",
    )
    metrics = evaluate_bundle(
        engine, catalog.rows, tmp_path / "r", raw_features=False, examples=1, tags_column=catalog.tags_column
    )
    hierarchy = metrics["hierarchy"]
    assert hierarchy["evaluated"] and hierarchy["mode"] == mode
    assert set(hierarchy["level_accuracy"]) == set(ATTRIBUTE_HIERARCHY)
    assert all(0.0 <= value <= 1.0 for value in hierarchy["level_accuracy"].values())
    assert 0.0 <= hierarchy["path_score"] <= hierarchy["path_score_max"] == 3
    assert hierarchy["path_score_total"] == round(hierarchy["path_score"] * hierarchy["queries"])
    assert hierarchy["validation"]["mode"] == mode
    assert metrics["tags"]["evaluated"]
    page = (tmp_path / "r" / "report.html").read_text()
    assert f"Mode: {mode}" in page and "path score total" in page


def test_missing_tags_column_and_hierarchy_levels_are_reported_not_a_crash(
    attribute_bundle, attribute_test_catalog, tmp_path
):
    with open(attribute_test_catalog, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    without = attribute_test_catalog.parent / "no_tags.csv"
    with open(without, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "file", "label", "colour", "department"])
        writer.writeheader()
        writer.writerows([{key: row[key] for key in ("id", "file", "label", "colour", "department")} for row in rows])
    metrics = _run_evaluate(attribute_bundle, without, tmp_path / "r", "--no-raw-features", "--examples", "0")
    assert metrics["tags"]["evaluated"] is False and "no tags column 'tags'" in metrics["tags"]["reason"]
    assert metrics["hierarchy"]["evaluated"] is False and "family" in metrics["hierarchy"]["reason"]
    assert metrics["hierarchy"]["mode"] == "hierarchical"
    assert metrics["heads"]["department"]["evaluated"] and metrics["heads"]["label"]["evaluated"]
    problems = " ".join(metrics["problems"])
    assert "tags not evaluated" in problems and "hierarchy not evaluated" in problems
    page = (tmp_path / "r" / "report.html").read_text()
    assert "Not evaluated: the test catalog has no tags column" in page
