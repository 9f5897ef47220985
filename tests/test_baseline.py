"""The baseline inside every build: the probe and exact P@k on generated data, and the session bundle's record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recommender.baseline import (
    BuildBaseline,
    HeadBaseline,
    RetrievalBaseline,
    classification_summary,
    exact_precision_at_k,
    probe_metrics,
)
from recommender.errors import BundleError

ROOT = Path(__file__).resolve().parents[1]


def blobs(rows_per_class: int, classes: int, dimension: int = 32, spread: float = 0.5, seed: int = 0):
    """Well separated Gaussian blobs: (n, dimension) float32 and n string labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dimension))
    labels = np.repeat(np.arange(classes), rows_per_class)
    features = centres[labels] + rng.normal(0, spread, (len(labels), dimension))
    return features.astype(np.float32), np.array([f"class-{i}" for i in labels], dtype=object)


# -- the probe -----------------------------------------------------------------------------


def test_probe_separates_separable_classes():
    features, labels = blobs(50, 4, seed=0)
    validation = np.arange(len(labels)) % 5 == 0
    found = probe_metrics(features[~validation], labels[~validation], features[validation], labels[validation], seed=0)
    assert found["accuracy"] == 1.0 and found["macro_f1"] == 1.0
    assert found["validation_rows"] == 40 and found["left_out_rows"] == 0 and found["classes"] == 4
    assert found["converged"] and 0 < found["iterations"] < 300 and found["seconds"] > 0


def test_probe_is_near_chance_on_shuffled_labels():
    features, labels = blobs(60, 4, seed=1)
    shuffled = np.random.default_rng(2).permutation(labels)
    validation = np.arange(len(labels)) % 3 == 0
    found = probe_metrics(features[~validation], shuffled[~validation], features[validation], shuffled[validation])
    assert found["validation_rows"] == 80
    assert found["accuracy"] < 0.45  # chance is 0.25; separable data scores 1.0 above


def test_probe_leaves_out_and_counts_classes_absent_from_training():
    features, labels = blobs(35, 4, seed=3)
    train = (np.arange(len(labels)) % 7 != 0) & (labels != "class-3")  # class-3 never occurs in training
    train_x, train_y = features[train], labels[train]
    validation_x, validation_y = features[np.arange(len(labels)) % 7 == 0], labels[np.arange(len(labels)) % 7 == 0]
    found = probe_metrics(train_x, train_y, validation_x, validation_y)
    assert found["left_out_rows"] == 5 and found["left_out_classes"] == 1 and found["validation_rows"] == 15
    nothing_known = probe_metrics(train_x, train_y, validation_x[-5:], validation_y[-5:])
    assert nothing_known["accuracy"] is None and nothing_known["macro_f1"] is None
    assert nothing_known["left_out_rows"] == 5


def test_probe_with_one_training_class_predicts_it():
    features, _ = blobs(10, 1)
    labels = np.array(["only"] * 10, dtype=object)
    found = probe_metrics(features[:8], labels[:8], features[8:], labels[8:])
    assert found["accuracy"] == 1.0 and found["iterations"] == 0


def test_macro_f1_averages_over_classes_in_truth_or_predictions():
    # a: 2 of 2 found, 1 false alarm (P 2/3, R 1, F1 0.8); b: 1 of 2 (P 1, R 1/2, F1 2/3); c: never true, never predicted.
    found = classification_summary(["a", "a", "b", "b"], ["a", "a", "b", "a"])
    assert found["accuracy"] == 0.75
    assert found["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


# -- exact P@k -----------------------------------------------------------------------------


def brute_force_precision(catalog, catalog_labels, queries, query_labels, k):
    distances = ((queries[:, None, :].astype(np.float64) - catalog[None, :, :]) ** 2).sum(axis=2)
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return float(np.mean(catalog_labels[nearest] == query_labels[:, None]))


def test_exact_precision_at_k_equals_a_numpy_brute_force_count():
    catalog, catalog_labels = blobs(20, 5, dimension=16, spread=3.0, seed=4)  # overlapping: P@k well below 1
    queries, query_labels = blobs(6, 5, dimension=16, spread=3.0, seed=4)
    queries = queries + np.random.default_rng(5).normal(0, 0.5, queries.shape).astype(np.float32)
    found = exact_precision_at_k(catalog, catalog_labels, queries, query_labels, k=6)
    expected = brute_force_precision(catalog, catalog_labels, queries, query_labels, 6)
    assert found == {"k": 6, "precision_at_k": pytest.approx(expected), "queries": 30, "left_out_queries": 0}
    assert 0.2 < expected < 0.95


def test_exact_precision_at_k_leaves_out_unknown_classes_and_counts_missing_neighbours_wrong():
    catalog = np.array([[0.0], [1.0], [10.0]], np.float32)
    labels = np.array(["a", "a", "b"], dtype=object)
    queries = np.array([[0.1], [9.0], [5.0]], np.float32)
    found = exact_precision_at_k(catalog, labels, queries, np.array(["a", "b", "c"], dtype=object), k=4)
    # a: a, a, b + one missing neighbour -> 2/4; b: b, a, a + missing -> 1/4; c: no catalog item has it.
    assert found == {"k": 4, "precision_at_k": pytest.approx(3 / 8), "queries": 2, "left_out_queries": 1}


def test_baseline_module_loads_without_tensorflow():
    code = "import sys, recommender.baseline; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- what the build records ----------------------------------------------------------------


def make_baseline(colour_accuracy: float) -> BuildBaseline:
    return BuildBaseline(
        heads=(
            HeadBaseline("articleType", 100, 2, 0.812, 0.61, 0.786, 0.58),
            HeadBaseline("baseColour", 102, 0, colour_accuracy, 0.2, 0.606, 0.3),
        ),
        retrieval=RetrievalBaseline("articleType", 6, 100, 2, 0.8, 0.55),
        seconds=1.5,
    )


def test_a_head_below_its_probe_gets_one_warning_line():
    lines = make_baseline(0.412).summary_lines()
    assert lines == [
        "articleType: validation accuracy 0.812 (probe 0.786), macro-F1 0.61 (probe 0.58) "
        "(2 validation row(s) of classes absent from training left out)",
        "baseColour: validation accuracy 0.412 (probe 0.606), macro-F1 0.20 (probe 0.30)",
        "P@6 on validation: embedding 0.80, raw features 0.55",
        "warning: head 'baseColour' validation accuracy 0.412 is below a logistic-regression probe on the raw "
        "features (0.606): training did not pay off for it",
    ]
    assert make_baseline(0.7).shortfalls() == []


def test_record_round_trips_and_a_malformed_one_is_a_typed_error():
    baseline = make_baseline(0.412)
    payload = json.loads(json.dumps(baseline.to_json()))
    assert set(payload) == {"heads", "retrieval", "seconds"}
    assert set(payload["heads"]["baseColour"]) >= {
        "probe_validation_accuracy",
        "probe_validation_macro_f1",
        "validation_accuracy",
        "validation_macro_f1",
    }
    assert set(payload["retrieval"]) >= {"k", "raw_features_p_at_k", "embedding_p_at_k", "queries"}
    assert BuildBaseline.from_json(payload) == baseline
    del payload["retrieval"]["embedding_p_at_k"]
    with pytest.raises(BundleError, match="embedding_p_at_k"):
        BuildBaseline.from_json(payload)


def test_session_bundle_records_the_baseline_of_its_selection_model(tiny_build):
    bundle, report = tiny_build
    manifest = json.loads((bundle / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["baseline"] == report.metrics["baseline"]
    baseline = BuildBaseline.from_json(metrics["baseline"])
    assert [head.column for head in baseline.heads] == ["label", "colour"]
    for head in baseline.heads:
        assert head.validation_rows + head.left_out_rows == metrics["validation_rows"]
        for value in (head.probe_validation_accuracy, head.probe_validation_macro_f1, head.validation_macro_f1):
            assert 0.0 <= value <= 1.0
        # Same rows, same (selection) model as the recorded validation accuracy.
        assert head.validation_accuracy == pytest.approx(metrics["heads"][head.column]["validation_accuracy"])
        assert 0.0 <= metrics["heads"][head.column]["validation_macro_f1"] <= 1.0
    # 4 generated patterns that random-init features tell apart: the probe is a real fit, far above chance (0.25).
    assert baseline.heads[0].probe_validation_accuracy > 0.5
    retrieval = baseline.retrieval
    assert (retrieval.k, retrieval.column, retrieval.queries) == (6, "label", metrics["validation_rows"])
    assert 0.0 <= retrieval.raw_features_p_at_k <= 1.0 and 0.0 <= retrieval.embedding_p_at_k <= 1.0
    assert 0.0 < baseline.seconds < 60
