"""Feature extraction through the Ray engine (local Ray, actors) against the in-process loop.

    python bench/ray_extraction.py [--images 1024] [--backbone tflite|resnet50] [--actors N] [--quick]

Both get the features of the same photos into a fresh store, in one run:

  (a) in process: ``recommender.features.extract_features`` (HDF5 store, decode one batch ahead);
  (b) Ray: ``indexer.ray_engine.extract_features_ray`` on a local Ray started beforehand
      (Parquet part store; actors load the backbone, decode with ``load_image``, write parts).
      Reported without and with the Ray start-up (cluster start, then actor start inside the job).

Target (issue 14): (b) >= 0.9x (a)'s img/s. Photos from ../shared/datasets/clothing-small.
Ray listens on the host's address: the script re-runs itself inside ``unshare -n`` (loopback
only) when it can (``--no-namespace`` to run as is). Writes bench/results/ray-extraction-<backbone>.json
(``--quick``: 48 photos with TFLite, ray_extraction-quick.json).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from common import CLOTHING, MOBILENET, machine, save_results  # noqa: E402

TARGET = 0.9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--backbone", choices=("tflite", "resnet50"), default="tflite")
    parser.add_argument("--actors", type=int, default=None, help="default: the engine's own choice")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-namespace", action="store_true", help="do not re-run inside unshare -n")
    parser.add_argument(
        "--quick", action="store_true", help="48 photos, TFLite: for the test that keeps this script working"
    )
    args = parser.parse_args()
    if args.quick:
        args.images, args.backbone = 48, "tflite"
    if not args.no_namespace and os.environ.get("RECOMMENDER_BENCH_NAMESPACE") != "1":
        if shutil.which("unshare"):
            script = 'ip link set lo up && exec "$@"'
            command = ["unshare", "-n", "sh", "-c", script, "sh", sys.executable, *sys.argv]
            return subprocess.call(command, env={**os.environ, "RECOMMENDER_BENCH_NAMESPACE": "1"})
        if args.quick:  # the test's run: never a Ray on the host's address
            print("--quick runs Ray inside unshare -n, and unshare is not installed", file=sys.stderr)
            return 2
    if not (CLOTHING / "labels.csv").is_file() or not MOBILENET.is_file():
        print(f"needs {CLOTHING} and {MOBILENET}", file=sys.stderr)
        return 1

    from recommender.backbones import BackboneSpec, load_backbone
    from recommender.catalog import read_catalog
    from recommender.config import RayConfig
    from recommender.feature_parts import PartFeatureStore
    from recommender.features import FeatureStore, extract_features, take_rows

    load_before = list(os.getloadavg())
    rows = read_catalog(CLOTHING / "labels.csv").rows
    rows = rows[:: max(1, len(rows) // args.images)][: args.images]
    spec = (
        BackboneSpec(name=f"tflite:{MOBILENET}", weights="file")
        if args.backbone == "tflite"
        else BackboneSpec(name="resnet50", weights="none", input_size=224)
    )
    backbone = load_backbone(spec)
    key, width = backbone.identity["key"], backbone.feature_dim
    results = {}
    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        started = time.perf_counter()
        local = extract_features(
            rows, backbone, FeatureStore(temp / "f.h5", key, width), flips=True, batch_size=args.batch_size
        )
        results["in process"] = {"seconds": time.perf_counter() - started, "images": local.extracted}

        import ray

        from indexer.ray_engine import extract_features_ray

        started = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=500 * 2**20)
        ray_start = time.perf_counter() - started
        started = time.perf_counter()
        on_ray = extract_features_ray(
            rows,
            backbone,
            PartFeatureStore(temp / "f.parts", key, width),
            config=RayConfig(actors=args.actors),
            flips=True,
            batch_size=args.batch_size,
            max_pixels=40_000_000,
        )
        job = time.perf_counter() - started
        ray.shutdown()
        results["ray job"] = {"seconds": job, "images": on_ray.extracted}
        results["ray incl. start"] = {"seconds": job + ray_start, "images": on_ray.extracted}
        every = np.arange(len(local.hashes))  # the rows read, in catalog order; Ray's stay in the store
        same = float(abs(take_rows(on_ray.features, every) - take_rows(local.features, every)).max())
    base = results["in process"]["images"] / results["in process"]["seconds"]
    print(f"machine: {machine()}; load average {os.getloadavg()}")
    print(f"{len(rows)} clothing-small photos, {args.backbone} backbone, two views, batch {args.batch_size}")
    print(f"{'run':18s} {'seconds':>8s} {'img/s':>8s} {'x local':>8s} {'target':>8s}")
    table = []
    for name, result in results.items():
        rate = result["images"] / result["seconds"]
        target = f">= {TARGET}" if name == "ray job" else ""
        print(f"{name:18s} {result['seconds']:8.1f} {rate:8.1f} {rate / base:8.2f} {target:>8s}")
        table.append({"run": name, **result, "img_per_s": rate, "share_of_local": rate / base})
    print(f"largest feature difference Ray vs in process: {same:.2e}; Ray start-up {ray_start:.1f} s")
    name = "ray_extraction-quick" if args.quick else f"ray-extraction-{args.backbone}"
    load = {"before": load_before, "after": list(os.getloadavg())}
    path = save_results(name, {"images": len(rows), "rows": table, "max_difference": same, "load_average": load})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
