"""One model with N heads against N single-head models on the same features: time and accuracy.

    python bench/multihead.py [--queries 200] [--feature-store PATH] [--quick]

The design answers every attribute from one classifier (one forward pass, heads sharing the
512-d embedding); the alternative is one model per attribute. Both are trained with the
project's recipe (``classifier.train_classifier``, default ``TrainConfig``, no flip
augmentation) on the same backbone features, and run through the same inference path
(``ClassifierRunner``, one compiled call per model).

Data: clothing-small with the shared MobileNet v1 TFLite features, trained on the train +
validation rows, scored on the test rows. The dataset has one label column, so two more heads
are derived from it (deterministic functions of the class, stated here so nobody mistakes
them for independent attributes): ``group`` (top, bottom, full-body, footwear, headwear) and
``bucket`` (class index modulo 3: an arbitrary partition that merges unrelated classes, harder
to learn than a visual grouping). Without ../shared: generated T-shirts with their two real
label columns (pattern, colour) and a random-init ResNet50 at 64 px.

Time per query is one feature vector at a time (p50/p99 over the test rows) through the
classifier(s); the backbone pass, the same for both designs, is measured once and added for
the end-to-end figure. Writes bench/results/multihead.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from common import CLOTHING, MOBILENET, machine, save_results  # noqa: E402

#: clothing-small class -> coarse group (the derived ``group`` head).
GROUPS = {
    "t-shirt": "top",
    "shirt": "top",
    "longsleeve": "top",
    "outwear": "top",
    "pants": "bottom",
    "shorts": "bottom",
    "skirt": "bottom",
    "dress": "full-body",
    "shoes": "footwear",
    "hat": "headwear",
}


def derived_labels(labels: list[str], classes: list[str]) -> dict[str, list[str]]:
    """The label head plus the two derived heads (``group`` and ``bucket``)."""
    index = {name: i for i, name in enumerate(classes)}
    return {
        "label": labels,
        "group": [GROUPS.get(label, "other") for label in labels],
        "bucket": [f"bucket-{index[label] % 3}" for label in labels],
    }


def load_data(workdir: Path, quick: bool, feature_store: Path | None):
    """Backbone features and labels of train and test rows.

    Returns:
        ``(train_features, train_labels, test_features, test_labels, backbone, description)``.
    """
    from recommender.backbones import BackboneSpec, load_backbone
    from recommender.catalog import read_catalog
    from recommender.features import FeatureStore, extract_features

    store_path = feature_store or workdir / "features.h5"
    if CLOTHING.is_dir() and MOBILENET.is_file():
        backbone = load_backbone(BackboneSpec(name=f"tflite:{MOBILENET}"))
        train_rows = read_catalog(CLOTHING / "labels.csv", splits=["train", "validation"]).rows
        test_rows = read_catalog(CLOTHING / "labels.csv", splits=["test"]).rows
        if quick:
            train_rows, test_rows = train_rows[::24], test_rows[::12]
        columns = None
        description = "clothing-small, MobileNet v1 TFLite features; heads: label + derived group, bucket"
    else:
        from recommender.synthetic import generate_catalog

        backbone = load_backbone(BackboneSpec("resnet50", "none", 64))
        patterns = ("plain", "stripes", "dots", "checks")
        colours = ("red", "blue", "black")
        train_source = generate_catalog(workdir / "train", per_class=4, patterns=patterns, colours=colours, size=64)
        test_source = generate_catalog(
            workdir / "test", per_class=2, patterns=patterns, colours=colours, size=64, seed=5
        )
        train_rows = read_catalog(train_source, id_column="id", label_columns=["label", "colour"]).rows
        test_rows = read_catalog(test_source, id_column="id", label_columns=["label", "colour"]).rows
        columns = ["label", "colour"]
        description = "generated T-shirts, ResNet50 random init 64 px (../shared absent); heads: pattern, colour"
    store = FeatureStore(store_path, backbone.identity["key"], backbone.feature_dim)
    train = extract_features(train_rows, backbone, store)
    test = extract_features(test_rows, backbone, store)
    if columns is None:
        classes = sorted({row.labels["label"] for row in train.rows})
        train_labels = derived_labels([row.labels["label"] for row in train.rows], classes)
        test_labels = derived_labels([row.labels["label"] for row in test.rows], classes)
    else:
        train_labels = {c: [row.labels[c] for row in train.rows] for c in columns}
        test_labels = {c: [row.labels[c] for row in test.rows] for c in columns}
    return train.features, train_labels, test.features, test_labels, backbone, description


def per_query_seconds(runners: list, features: np.ndarray) -> list[float]:
    """Seconds per query (one feature vector through every runner), one query at a time."""
    times = []
    for row in features:
        started = time.perf_counter()
        for runner in runners:
            runner.run(row[None])
        times.append(time.perf_counter() - started)
    return times


def accuracy(runner, trained, columns: list[str], features: np.ndarray, labels: dict[str, list[str]]) -> dict:
    """Test accuracy of each of ``columns`` from one trained model."""
    _, outputs = runner.run(features)
    probabilities = trained.label_space.column_probabilities(outputs)
    scores = {}
    for column, names in zip(trained.label_columns, trained.classes):
        values = probabilities[column]
        if column in columns:
            predicted = [names[i] for i in np.argmax(values, axis=1)]
            scores[column] = float(np.mean([p == t for p, t in zip(predicted, labels[column])]))
    return scores


def milliseconds(values: list[float]) -> dict:
    """p50 and p99 in milliseconds."""
    return {"p50_ms": float(np.percentile(values, 50) * 1000), "p99_ms": float(np.percentile(values, 99) * 1000)}


def main() -> int:
    from recommender.classifier import ClassifierRunner, TrainConfig, train_classifier

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=200, help="test rows timed one at a time (default: 200)")
    parser.add_argument("--feature-store", type=Path, default=None, help="feature cache (default: a temp file)")
    parser.add_argument("--quick", action="store_true", help="a few rows and epochs: keeps this script working")
    args = parser.parse_args()
    config = replace(TrainConfig(), flip_augment=False, baseline=False, **({"max_epochs": 3} if args.quick else {}))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as temp:
        workdir = Path(temp)
        train_x, train_y, test_x, test_y, backbone, description = load_data(workdir, args.quick, args.feature_store)
    columns = list(train_y)
    print(f"machine: {machine()}; load average before: {load_before}")
    print(f"data: {description}; {len(train_x)} training rows, {len(test_x)} test rows; heads: {', '.join(columns)}")

    started = time.perf_counter()
    multi = train_classifier(train_x, train_y, config)
    multi_train_s = time.perf_counter() - started
    multi_runner = ClassifierRunner(multi.model, multi.input_scaler, [h.name for h in multi.label_space.heads])
    separate, separate_runners, separate_train_s = [], [], 0.0
    for column in columns:
        started = time.perf_counter()
        trained = train_classifier(train_x, {column: train_y[column]}, config)
        separate_train_s += time.perf_counter() - started
        separate.append(trained)
        separate_runners.append(ClassifierRunner(trained.model, trained.input_scaler, ["head_0"]))

    timed = test_x[: 10 if args.quick else args.queries]
    for runner in [multi_runner, *separate_runners]:  # trace every compiled call first
        runner.run(timed[:1])
    multi_times = per_query_seconds([multi_runner], timed)
    separate_times = per_query_seconds(separate_runners, timed)
    # The backbone pass is the same in both designs; its cost does not depend on the pixels.
    blank = np.full((1, backbone.input_size, backbone.input_size, 3), 200, np.uint8)
    backbone.extract(blank)
    backbone_times = []
    for _ in range(min(50, len(timed))):
        started = time.perf_counter()
        backbone.extract(blank)
        backbone_times.append(time.perf_counter() - started)

    multi_accuracy = accuracy(multi_runner, multi, columns, test_x, test_y)
    separate_accuracy = {}
    for runner, trained, column in zip(separate_runners, separate, columns):
        separate_accuracy.update(accuracy(runner, trained, [column], test_x, test_y))
    started = time.perf_counter()
    multi_runner.run(test_x)
    multi_batch_s = time.perf_counter() - started
    started = time.perf_counter()
    for runner in separate_runners:
        runner.run(test_x)
    separate_batch_s = time.perf_counter() - started

    backbone_ms = milliseconds(backbone_times)
    results = {
        "heads": columns,
        "training_rows": len(train_x),
        "test_rows": len(test_x),
        "one_model": {
            "per_query": milliseconds(multi_times),
            "batch_of_test_rows_s": multi_batch_s,
            "train_s": multi_train_s,
            "epochs": multi.metrics["epochs_run"],
            "accuracy": multi_accuracy,
        },
        "separate_models": {
            "per_query": milliseconds(separate_times),
            "batch_of_test_rows_s": separate_batch_s,
            "train_s": separate_train_s,
            "epochs": [trained.metrics["epochs_run"] for trained in separate],
            "accuracy": separate_accuracy,
        },
        "backbone_single_image": backbone_ms,
    }
    one, many = results["one_model"], results["separate_models"]
    print(f"{'':28s} {'per query p50':>14s} {'p99':>8s} {'+backbone p50':>14s} {'train s':>8s}   accuracy per head")
    for name, entry in (("one model, N heads", one), (f"{len(columns)} single-head models", many)):
        scores = ", ".join(f"{c} {entry['accuracy'][c]:.3f}" for c in columns)
        print(
            f"{name:28s} {entry['per_query']['p50_ms']:12.2f}ms {entry['per_query']['p99_ms']:6.2f}ms "
            f"{entry['per_query']['p50_ms'] + backbone_ms['p50_ms']:12.2f}ms {entry['train_s']:8.1f}   {scores}"
        )
    print(
        f"classifier time per query: {many['per_query']['p50_ms'] / one['per_query']['p50_ms']:.2f}x for separate "
        f"models; backbone pass p50 {backbone_ms['p50_ms']:.2f} ms (shared by both designs)"
    )
    load_after = os.getloadavg()
    print(f"load average after: {load_after}")
    path = save_results(
        "multihead" + ("-quick" if args.quick else ""),
        {"data": description, **results, "load_average": {"before": load_before, "after": load_after}},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
