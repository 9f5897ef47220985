"""Quality on real photos: build on clothing-small train+validation, query with its test rows.

    python bench/quality.py [--seeds 0,1,2] [--feature-store PATH]

Prints primary-class accuracy and P@6 of the trained embedding next to the raw standardized
backbone features and the baselines of the original approach; writes bench/results/quality.json.
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

from recommender.classifier import TrainConfig  # noqa: E402

#: Measured with the original post's head on the same split (see the issue).
BASELINES = {"raw features P@6": 0.54, "original head accuracy": 0.84, "original head P@6": 0.76}
TARGETS = {"accuracy": 0.86, "p_at_6": 0.80}


def build_and_measure(workdir: Path, seed: int, feature_store: Path, overrides: dict | None = None) -> dict:
    """Builds one bundle with the default recipe and measures it on the test rows."""
    from indexer.build import build_bundle
    from recommender.backbones import BackboneSpec
    from recommender.catalog import read_catalog
    from recommender.config import BuildConfig
    from recommender.engine import load_bundle
    from recommender.evaluate import evaluate_queries

    defaults = BuildConfig()
    config = replace(
        defaults,
        splits=("train", "validation"),
        backbone=BackboneSpec(name=f"tflite:{MOBILENET}"),
        train=replace(defaults.train, seed=seed, **(overrides or {})),
        feature_store=feature_store,
    )
    started = time.perf_counter()
    report = build_bundle(CLOTHING / "labels.csv", workdir / f"bundle-{seed}", config)
    build_seconds = time.perf_counter() - started
    recommender = load_bundle(workdir / f"bundle-{seed}")
    test_rows = read_catalog(CLOTHING / "labels.csv", splits=["test"]).rows
    result = evaluate_queries(recommender, test_rows, k=6)
    return {
        "seed": seed,
        "accuracy": result.accuracy["label"],
        "p_at_6": result.precision_at_k["label"],
        "queries": result.queries,
        "catalog_items": report.items,
        "build_seconds": build_seconds,
        "train_seconds": report.seconds["train"],
        "epochs": report.metrics["epochs_run"],
    }


def raw_feature_precision(feature_store: Path) -> float:
    """P@6 of raw standardized backbone features (test queries against train+validation)."""
    from recommender.backbones import BackboneSpec, load_backbone
    from recommender.catalog import read_catalog
    from recommender.features import FeatureStore, extract_features
    from recommender.index import VectorIndex
    from recommender.scalers import fit_scaler, transform

    backbone = load_backbone(BackboneSpec(name=f"tflite:{MOBILENET}"))
    store = FeatureStore(feature_store, backbone.identity["key"], backbone.feature_dim)
    catalog = extract_features(
        read_catalog(CLOTHING / "labels.csv", splits=["train", "validation"]).rows, backbone, store
    )
    queries = extract_features(read_catalog(CLOTHING / "labels.csv", splits=["test"]).rows, backbone, store)
    scaler = fit_scaler(catalog.features)
    index = VectorIndex.build(transform(scaler, catalog.features), "flat", use_gpu=False)
    positions = index.search(transform(scaler, queries.features), 6).positions
    catalog_labels = np.array([row.labels["label"] for row in catalog.rows])
    query_labels = np.array([row.labels["label"] for row in queries.rows])
    return float(np.mean(catalog_labels[positions] == query_labels[:, None]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated build seeds (default: 0,1,2)")
    parser.add_argument("--feature-store", type=Path, default=None, help="feature cache (default: a temp file)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a TrainConfig field (e.g. patience=32), repeatable",
    )
    args = parser.parse_args()
    if not CLOTHING.is_dir() or not MOBILENET.is_file():
        print(f"needs {CLOTHING} and {MOBILENET}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as temp:
        workdir = Path(temp)
        store = args.feature_store or workdir / "features.h5"
        overrides = {}
        for item in args.set:
            name, _, value = item.partition("=")
            overrides[name] = type(getattr(TrainConfig(), name))(value)
        runs = [build_and_measure(workdir, int(seed), store, overrides) for seed in args.seeds.split(",")]
        raw = raw_feature_precision(store)
    accuracy = [r["accuracy"] for r in runs]
    precision = [r["p_at_6"] for r in runs]
    print(f"machine: {machine()}; training overrides: {args.set or 'none (defaults)'}")
    print(
        f"clothing-small, MobileNet v1 (TFLite) backbone; catalog = train+validation ({runs[0]['catalog_items']}), queries = test ({runs[0]['queries']})"
    )
    print(f"{'':34s}{'accuracy':>10s}{'P@6':>8s}")
    print(f"{'raw standardized features':34s}{'':>10s}{raw:8.3f}   (baseline {BASELINES['raw features P@6']})")
    print(
        f"{'original post head (baseline)':34s}{BASELINES['original head accuracy']:10.2f}{BASELINES['original head P@6']:8.2f}"
    )
    for run in runs:
        print(
            f"{'this build, seed ' + str(run['seed']):34s}{run['accuracy']:10.3f}{run['p_at_6']:8.3f}   ({run['build_seconds']:.0f} s build, {run['epochs']} epochs)"
        )
    print(
        f"{'mean / min over seeds':34s}{np.mean(accuracy):10.3f}{np.mean(precision):8.3f}   min {min(accuracy):.3f} / {min(precision):.3f}"
    )
    print(f"targets: accuracy >= {TARGETS['accuracy']}, P@6 >= {TARGETS['p_at_6']}")
    path = save_results(
        "quality", {"runs": runs, "raw_features_p_at_6": raw, "baselines": BASELINES, "targets": TARGETS}
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
