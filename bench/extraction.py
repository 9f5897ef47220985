"""Feature extraction speed: the original per-image predict loop, our pipeline, and the bare model.

    python bench/extraction.py [--images 256] [--batch-size 32] [--repeats 2] [--quick]

Three ways to get backbone features of the same photos, in one run:

  (a) original: per image, ``keras.utils.load_img`` (resize) -> ``preprocess_input`` ->
      ``model.predict`` on a batch of one (for the TFLite backbone, which has no ``predict``:
      the same per-image decode and a batch-of-one interpreter call);
  (b) pipeline: ``recommender.features.extract_features`` with a fresh feature store:
      hash + decode (``load_image``, two threads, one batch ahead) + forward + store;
  (c) bare: ``backbone.extract`` batches on images decoded beforehand (compute only).

Backbones: ResNet50 at 224 px with random-init weights (``--weights none``: the weights do not
change the speed) and the shared MobileNet v1 TFLite extractor. Photos are from
../shared/datasets/clothing-small (generated T-shirts when it is absent). Targets:
(b) >= 3x (a) and (b) >= 90% of (c). Also times the pipeline's parts on their own (hashing,
single-thread decoding, store writes) to show where (b) loses to (c). Records the load average,
since other work on the machine distorts the figures. Writes bench/results/extraction.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from common import CLOTHING, MOBILENET, machine, save_results  # noqa: E402

TARGET_SPEEDUP = 3.0
TARGET_SHARE_OF_BARE = 0.9


def photo_rows(count: int, workdir: Path):
    """``count`` catalog rows of real photos (clothing-small), or generated ones when absent.

    Returns:
        ``(rows, description)``.
    """
    from recommender.catalog import read_catalog

    if (CLOTHING / "labels.csv").is_file():
        rows = read_catalog(CLOTHING / "labels.csv").rows
        # Spread over the classes, deterministic.
        step = max(1, len(rows) // count)
        return rows[::step][:count], f"clothing-small photos ({count})"
    from recommender.synthetic import generate_catalog

    per_class = max(1, -(-count // 6))
    catalog = generate_catalog(workdir / "generated", per_class=per_class, size=256, seed=0)
    return read_catalog(catalog).rows[:count], f"generated 256 px T-shirts ({count}; clothing-small absent)"


def original_loop(backbone, rows) -> float:
    """The original post's loop: one image at a time, decode + resize + predict. Returns seconds."""
    import keras

    size = backbone.input_size
    started = time.perf_counter()
    for row in rows:
        image = keras.utils.load_img(row.path, target_size=(size, size))
        array = keras.utils.img_to_array(image)[None]
        if hasattr(backbone, "model"):  # Keras ResNet50: the original predict call
            backbone.model.predict(keras.applications.resnet50.preprocess_input(array), verbose=0)
        else:  # TFLite has no predict: a batch-of-one interpreter call
            backbone.extract(array.astype(np.uint8))
    return time.perf_counter() - started


def pipeline(backbone, rows, workdir: Path, batch_size: int, run: int) -> float:
    """Our pipeline end to end into a fresh feature store. Returns seconds."""
    from recommender.features import FeatureStore, extract_features

    store = FeatureStore(
        workdir / f"features-{backbone.identity['key']}-{run}.h5", backbone.identity["key"], backbone.feature_dim
    )
    started = time.perf_counter()
    result = extract_features(rows, backbone, store, flips=False, batch_size=batch_size)
    seconds = time.perf_counter() - started
    if result.extracted != len(rows):
        raise RuntimeError(f"pipeline extracted {result.extracted} of {len(rows)} images")
    return seconds


def bare(backbone, decoded: np.ndarray, batch_size: int) -> float:
    """The compiled model alone on pre-decoded batches. Returns seconds."""
    started = time.perf_counter()
    for start in range(0, len(decoded), batch_size):
        backbone.extract(decoded[start : start + batch_size])
    return time.perf_counter() - started


def parts(backbone, rows, workdir: Path, batch_size: int) -> dict:
    """Seconds of the pipeline's non-compute parts, each on its own, on one thread."""
    from recommender.features import FeatureStore, hash_rows
    from recommender.images import load_image

    started = time.perf_counter()
    _, hashes, _ = hash_rows(rows)
    hashing = time.perf_counter() - started
    started = time.perf_counter()
    for row in rows:
        load_image(row.path, backbone.input_size)
    decoding = time.perf_counter() - started
    store = FeatureStore(
        workdir / f"parts-{backbone.identity['key']}.h5", backbone.identity["key"], backbone.feature_dim
    )
    features = np.zeros((len(rows), backbone.feature_dim), np.float32)
    started = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        store.add(hashes[start : start + batch_size], features[start : start + batch_size])
    store.compact()
    storing = time.perf_counter() - started
    return {"hash_s": hashing, "decode_1_thread_s": decoding, "store_s": storing}


def measure(name: str, backbone, rows, workdir: Path, batch_size: int, repeats: int) -> dict:
    """All three ways on the same rows; best of ``repeats`` for each. Returns a result row."""
    from recommender.images import load_image

    decoded = np.stack([load_image(row.path, backbone.input_size) for row in rows])
    backbone.extract(decoded[:batch_size])  # trace and warm up the compiled call
    backbone.extract(decoded[:1])
    original_loop(backbone, rows[:2])  # predict's own first-call set-up
    seconds = {"original": [], "pipeline": [], "bare": []}
    for run in range(repeats):
        seconds["bare"].append(bare(backbone, decoded, batch_size))
        seconds["pipeline"].append(pipeline(backbone, rows, workdir, batch_size, run))
        seconds["original"].append(original_loop(backbone, rows))
    rates = {method: len(rows) / min(values) for method, values in seconds.items()}
    return {
        "backbone": name,
        "images": len(rows),
        "batch_size": batch_size,
        "images_per_s": rates,
        "seconds": seconds,
        "pipeline_vs_original": rates["pipeline"] / rates["original"],
        "pipeline_share_of_bare": rates["pipeline"] / rates["bare"],
        "parts": parts(backbone, rows, workdir, batch_size),
    }


def tensorflow_gpus() -> list[str]:
    """GPUs TensorFlow sees (empty: every figure here is CPU)."""
    import tensorflow as tf

    return [device.name for device in tf.config.list_physical_devices("GPU")]


def main() -> int:
    from recommender.backbones import BackboneSpec, load_backbone

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="photos per backbone (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way; the best counts (default: 2)")
    parser.add_argument("--quick", action="store_true", help="8 photos, ResNet50 at 64 px: keeps this script working")
    args = parser.parse_args()
    count = 8 if args.quick else args.images
    repeats = 1 if args.quick else args.repeats
    resnet_size = 64 if args.quick else 224
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as temp:
        workdir = Path(temp)
        rows, description = photo_rows(count, workdir)
        specs = [(f"resnet50 {resnet_size} px, weights none", BackboneSpec("resnet50", "none", resnet_size))]
        if MOBILENET.is_file():
            specs.append(("mobilenet v1 TFLite (uint8)", BackboneSpec(f"tflite:{MOBILENET}")))
        print(f"machine: {machine()}; load average before: {load_before}")
        print(f"photos: {description}; batch size {args.batch_size}; best of {repeats}")
        print(
            f"{'backbone':30s} {'(a) original':>13s} {'(b) pipeline':>13s} {'(c) bare':>10s} {'b/a':>6s} {'b/c':>6s}"
            f"   parts on 1 thread: hash, decode, store (s)"
        )
        for name, spec in specs:
            result = measure(name, load_backbone(spec), rows, workdir, args.batch_size, repeats)
            results.append(result)
            rates, part = result["images_per_s"], result["parts"]
            print(
                f"{name:30s} {rates['original']:9.1f}/s {rates['pipeline']:9.1f}/s {rates['bare']:7.1f}/s "
                f"{result['pipeline_vs_original']:5.1f}x {result['pipeline_share_of_bare']:6.0%}"
                f"   {part['hash_s']:.2f}, {part['decode_1_thread_s']:.2f}, {part['store_s']:.2f}",
                flush=True,
            )
    load_after = os.getloadavg()
    print(
        f"targets: (b) >= {TARGET_SPEEDUP:g}x (a), (b) >= {TARGET_SHARE_OF_BARE:.0%} of (c); load average after: {load_after}"
    )
    if not MOBILENET.is_file():
        print(f"MobileNet not measured: {MOBILENET} is absent")
    path = save_results(
        "extraction" + ("-quick" if args.quick else ""),
        {
            "photos": description,
            "results": results,
            "targets": {"pipeline_vs_original": TARGET_SPEEDUP, "pipeline_share_of_bare": TARGET_SHARE_OF_BARE},
            "load_average": {"before": load_before, "after": load_after},
            "tensorflow_gpus": tensorflow_gpus(),
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
