"""A large synthetic build on Ray whose driver memory tests/test_ray_engine.py checks.

    python tests/ray_memory_job.py generate FOLDER ROWS   # photos, catalog, stored features
    python tests/ray_memory_job.py build FOLDER           # inside a private network namespace

``generate`` (no Ray): ROWS distinct 8x8 PNG photos in 8 classes x 4 colours, ``catalog.csv``,
and both views of class-structured synthetic 2,048-d features stored in a part-file store
under the photos' hashes for the tiny bundle's backbone, so the build extracts nothing and
what it holds is its own. It writes ``FOLDER/generated.json`` (rows, feature bytes).

``build``: one local Ray (2 CPUs), then ``build_bundle`` with ``--engine ray``, a training
sample of ROWS / 32 and the tiny settings. The driver's resident memory is read from
``/proc/self/status`` after its imports (TensorFlow, Keras, Ray) and at its peak during the
build (``VmHWM``); both go to ``FOLDER/memory.json`` with the build report.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_build_config  # noqa: E402

CLASSES = ("plain", "stripes", "dots", "checks", "zigzag", "waves", "stars", "grid")
COLOURS = ("red", "blue", "green", "black")
WRITE_ROWS = 4096


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def config_for(folder: Path):
    config = tiny_build_config(folder / "features.parts")
    return replace(
        config,
        engine="ray",
        train=replace(config.train, max_epochs=1, baseline=False),
        max_bad_fraction=0.0,
    )


def generate(folder: Path, rows: int) -> None:
    from PIL import Image

    from recommender.backbones import load_backbone
    from recommender.catalog import read_catalog
    from recommender.feature_parts import PartFeatureStore
    from recommender.features import hash_rows

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    with open(folder / "catalog.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "file", "label", "colour"])
        for i in range(rows):
            pixels = np.frombuffer(i.to_bytes(3, "little") * 64, np.uint8).reshape(8, 8, 3)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            name = f"images/{i:06d}.png"
            (folder / name).write_bytes(buffer.getvalue())
            writer.writerow([f"sku-{i}", name, CLASSES[i % len(CLASSES)], COLOURS[(i // 8) % len(COLOURS)]])
    catalog = read_catalog(folder / "catalog.csv", id_column="id", label_columns=["label", "colour"])
    good, hashes, bad = hash_rows(catalog.rows)
    assert not bad and len(set(hashes)) == rows
    config = config_for(folder)
    backbone = load_backbone(config.backbone)
    store = PartFeatureStore(config.feature_store, backbone.identity["key"], backbone.feature_dim)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(len(CLASSES), backbone.feature_dim)).astype(np.float32)
    tints = rng.normal(size=(len(COLOURS), backbone.feature_dim)).astype(np.float32)
    for start in range(0, rows, WRITE_ROWS):
        part = good[start : start + WRITE_ROWS]
        label = np.array([CLASSES.index(row.labels["label"]) for row in part])
        colour = np.array([COLOURS.index(row.labels["colour"]) for row in part])
        noise = rng.normal(scale=0.5, size=(len(part), backbone.feature_dim)).astype(np.float32)
        features = centres[label] + 0.5 * tints[colour] + noise
        store.add(hashes[start : start + WRITE_ROWS], features, "original")
        store.add(hashes[start : start + WRITE_ROWS], features + 0.05, "flipped")
    store.compact()
    feature_bytes = rows * 2 * backbone.feature_dim * 4
    (folder / "generated.json").write_text(json.dumps({"rows": rows, "feature_bytes": feature_bytes}))


def build(folder: Path) -> None:
    before_imports = status_mb("VmRSS")
    import keras  # noqa: F401  (imported before the baseline: the build's data is what is measured)
    import ray
    import tensorflow  # noqa: F401

    from indexer.build import build_bundle

    generated = json.loads((folder / "generated.json").read_text())
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    config = config_for(folder)
    config = replace(config, train_sample=generated["rows"] // 32)
    baseline = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here (Linux >= 4.0)
    report = build_bundle(folder / "catalog.csv", folder / "bundle", config)
    result = {
        "rss_before_imports_mb": before_imports,
        "rss_baseline_mb": baseline,
        "rss_peak_mb": status_mb("VmHWM"),
        "report": report.to_json(),
        **generated,
    }
    (folder / "memory.json").write_text(json.dumps(result, default=str))
    ray.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "generate":
        generate(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        build(Path(sys.argv[2]))
