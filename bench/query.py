"""Query latency end to end: ``Recommender.query()`` against a bare single-image forward pass.

    python bench/query.py [--queries 100] [--feature-store PATH] [--quick]

Builds two bundles on clothing-small (train + validation rows) with the shared MobileNet v1
TFLite backbone, in a temporary folder: the default recipe (flip-averaged embeddings: two
backbone passes per query, the image and its mirror) and one with ``flips=False,
flip_average=False`` (one pass). For each, every test photo is asked in-process, one at a
time: encoded bytes in, ``json.dumps`` of the answer out (decode, backbone, classifier, FAISS,
result assembly). The reference is the bare backbone on the same photo decoded beforehand, a
batch of one, timed interleaved with the queries so that load on the machine hits both
alike. Also times the parts on their own (decode, classifier, search). Target: query p50
within 1.2x of the bare forward pass. Without ../shared it uses generated images and a
random-init ResNet50 at 64 px (say so). Writes bench/results/query.json.
"""

from __future__ import annotations

import argparse
import json
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

TARGET_RATIO = 1.2


def catalog_and_config(workdir: Path, quick: bool, feature_store: Path | None):
    """The catalog to build from, its query rows, the base build config and a description."""
    from recommender.backbones import BackboneSpec
    from recommender.catalog import read_catalog
    from recommender.classifier import TrainConfig
    from recommender.config import BuildConfig

    store = feature_store or workdir / "features.h5"
    dropped: set[str] = set()
    # --quick: 3 epochs and no baseline check (a build's probe, which this benchmark does not report).
    train = TrainConfig(max_epochs=3, baseline=False) if quick else TrainConfig()
    if CLOTHING.is_dir() and MOBILENET.is_file():
        config = replace(
            BuildConfig(),
            splits=("train", "validation"),
            backbone=BackboneSpec(name=f"tflite:{MOBILENET}"),
            feature_store=store,
            train=train,
        )
        catalog = read_catalog(CLOTHING / "labels.csv", splits=["train", "validation"])
        queries = read_catalog(CLOTHING / "labels.csv", splits=["test"]).rows
        if quick:  # 4 photos per class: a build in seconds that still has every class
            seen: dict[str, int] = {}
            for row in catalog.rows:
                seen[row.labels["label"]] = seen.get(row.labels["label"], 0) + 1
                if seen[row.labels["label"]] > 4:
                    dropped.add(row.id)
            catalog = catalog.without(dropped)
        return catalog, queries, config, "clothing-small, MobileNet v1 TFLite (224 px)"
    from recommender.synthetic import generate_catalog

    source = generate_catalog(workdir / "generated", per_class=6, patterns=("plain", "stripes", "dots"), size=64)
    catalog = read_catalog(source, id_column="id")
    config = replace(
        BuildConfig(), id_column="id", backbone=BackboneSpec("resnet50", "none", 64), feature_store=store, train=train
    )
    query_folder = workdir / "queries"
    queries = read_catalog(
        generate_catalog(query_folder, per_class=2, patterns=("plain", "stripes", "dots"), size=64, seed=5),
        id_column="id",
    ).rows
    return catalog, queries, config, "generated T-shirts, ResNet50 random init at 64 px (../shared absent)"


def percentiles(values: list[float]) -> dict:
    """p50 and p99 in milliseconds of a list of seconds."""
    return {"p50_ms": float(np.percentile(values, 50) * 1000), "p99_ms": float(np.percentile(values, 99) * 1000)}


def numpy_classifier(recommender):
    """The classifier's embedding as numpy matrix products from the model's weights (one view).

    Returns:
        A function (n, d) float32 backbone features -> (n, 512) float32 embeddings (before
        the embedding scaler), the same arithmetic as the Keras model at inference.
    """
    from recommender.scalers import transform

    model, scaler = recommender.runner.model, recommender.runner.input_scaler
    hidden_kernel, hidden_bias = model.get_layer("hidden").get_weights()
    embedding_kernel, embedding_bias = model.get_layer("embedding").get_weights()

    def embed(features: np.ndarray) -> np.ndarray:
        hidden = np.maximum(transform(scaler, features) @ hidden_kernel + hidden_bias, 0)
        return np.maximum(hidden @ embedding_kernel + embedding_bias, 0).astype(np.float32)

    return embed


def measure(bundle: Path, query_rows, count: int) -> dict:
    """Query latency and the bare forward pass, interleaved per photo, plus the parts alone."""
    from recommender.engine import load_bundle
    from recommender.images import load_image, read_image_bytes

    recommender = load_bundle(bundle)
    backbone = recommender.backbone
    raws = [read_image_bytes(row.path) for row in query_rows[:count]]
    decoded = [load_image(raw, backbone.input_size) for raw in raws]
    for raw, image in zip(raws[:3], decoded[:3]):  # warm up every compiled call
        json.dumps(recommender.query(raw.data))
        backbone.extract(image[None])
    query_times, bare_times, bare_two_times = [], [], []
    for raw, image in zip(raws, decoded):
        started = time.perf_counter()
        backbone.extract(image[None])
        bare_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        backbone.extract(image[None])
        backbone.extract(image[None, :, ::-1])
        bare_two_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        json.dumps(recommender.query(raw.data))
        query_times.append(time.perf_counter() - started)
    decode_times, classifier_times, search_times = [], [], []
    features = [backbone.extract(image[None]) for image in decoded]
    for raw, feature in zip(raws, features):
        started = time.perf_counter()
        load_image(raw, backbone.input_size)
        decode_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        embedding, _ = recommender.runner.run(feature, feature if recommender.flip_average else None)
        classifier_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        recommender.index.search(embedding, 7)
        search_times.append(time.perf_counter() - started)
    # The same classifier as plain numpy matrix products: how much of "classifier" is the
    # per-call overhead of the compiled TensorFlow call rather than arithmetic. Timed in a loop
    # of its own: right after a TensorFlow call, TF's spinning worker threads slow numpy down.
    numpy_embedding = numpy_classifier(recommender)
    numpy_times = []
    for feature in features:
        started = time.perf_counter()
        numpy_embedding(feature)
        numpy_times.append(time.perf_counter() - started)
    largest_difference = 0.0
    for feature in features:
        expected, _ = recommender.runner.run(feature)
        scale = max(float(np.abs(expected).max()), 1e-6)
        largest_difference = max(largest_difference, float(np.abs(numpy_embedding(feature) - expected).max()) / scale)
    query, bare = percentiles(query_times), percentiles(bare_times)
    return {
        "flip_average": recommender.flip_average,
        "queries": len(raws),
        "catalog_items": len(recommender.rows),
        "query": query,
        "bare_forward": bare,
        "bare_forward_x2": percentiles(bare_two_times),
        "parts": {
            "decode": percentiles(decode_times),
            "classifier": percentiles(classifier_times),
            "search": percentiles(search_times),
            "classifier_in_numpy": {**percentiles(numpy_times), "max_relative_difference": largest_difference},
        },
        "ratio_p50": query["p50_ms"] / bare["p50_ms"],
        "ratio_p50_vs_passes": query["p50_ms"]
        / percentiles(bare_two_times if recommender.flip_average else bare_times)["p50_ms"],
    }


def main() -> int:
    from indexer.build import build_bundle

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=100, help="test photos asked (default: %(default)s)")
    parser.add_argument("--feature-store", type=Path, default=None, help="feature cache (default: a temp file)")
    parser.add_argument("--quick", action="store_true", help="small build, 5 queries: keeps this script working")
    args = parser.parse_args()
    count = 5 if args.quick else args.queries
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as temp:
        workdir = Path(temp)
        catalog, query_rows, config, description = catalog_and_config(workdir, args.quick, args.feature_store)
        variants = [("flip-averaged (default)", config), ("no flips", replace(config, flips=False, flip_average=False))]
        print(f"machine: {machine()}; load average before: {load_before}")
        print(f"data: {description}; {min(count, len(query_rows))} queries, one at a time")
        print(
            f"{'bundle':24s} {'query p50':>10s} {'p99':>8s} {'bare p50':>9s} {'p99':>8s} {'ratio':>6s} "
            f"{'vs passes':>9s}   parts p50 ms: decode, classifier, search"
        )
        for name, variant in variants:
            bundle = workdir / name.split()[0]
            build_bundle(catalog, bundle, variant)
            result = {"bundle": name, **measure(bundle, query_rows, count)}
            results.append(result)
            parts = result["parts"]
            print(
                f"{name:24s} {result['query']['p50_ms']:8.2f}ms {result['query']['p99_ms']:6.2f}ms "
                f"{result['bare_forward']['p50_ms']:7.2f}ms {result['bare_forward']['p99_ms']:6.2f}ms "
                f"{result['ratio_p50']:5.2f}x {result['ratio_p50_vs_passes']:8.2f}x   "
                f"{parts['decode']['p50_ms']:.2f}, {parts['classifier']['p50_ms']:.2f}, {parts['search']['p50_ms']:.2f}",
                flush=True,
            )
    load_after = os.getloadavg()
    print(
        f"target: query p50 <= {TARGET_RATIO}x bare forward p50 ('vs passes': against one bare pass per backbone "
        f"pass the query makes); load average after: {load_after}"
    )
    path = save_results(
        "query" + ("-quick" if args.quick else ""),
        {
            "data": description,
            "results": results,
            "target_ratio": TARGET_RATIO,
            "load_average": {"before": load_before, "after": load_after},
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
