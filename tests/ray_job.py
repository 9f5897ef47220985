"""The Ray side of tests/test_ray_engine.py, run by it inside a private network namespace.

    python tests/ray_job.py CATALOG.csv OUT

Starts one local Ray (2 CPUs, 200 MB object store) and builds the catalog three times with the
tiny bundle's settings: ``OUT/local`` (engine local, HDF5 store), ``OUT/ray`` (engine ray, part
store ``OUT/ray.parts``; the first actor to reach a batch is SIGKILLed once, marker
``OUT/killed``) and ``OUT/ray-again`` (engine ray, same store: everything cached). Writes each
build's report to ``OUT/reports.json``. The test asserts on those files.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_build_config  # noqa: E402


def main(catalog: str, out: str) -> int:
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    # Before Ray starts: its workers inherit the environment, so the first actor dies mid-batch.
    os.environ["RECOMMENDER_KILL_ONCE_AT"] = f"ray-batch:{out_path / 'killed'}"
    import ray

    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    from indexer.build import build_bundle

    config = replace(tiny_build_config(out_path / "local.h5"), batch_size=8, max_bad_fraction=0.2)
    config = replace(config, train=replace(config.train, max_epochs=4))
    reports = {}
    reports["local"] = build_bundle(catalog, out_path / "local", config).to_json()
    ray_config = replace(config, engine="ray", feature_store=out_path / "ray.parts")
    reports["ray"] = build_bundle(catalog, out_path / "ray", ray_config).to_json()
    reports["ray-again"] = build_bundle(catalog, out_path / "ray-again", ray_config).to_json()
    (out_path / "reports.json").write_text(json.dumps(reports, default=str))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
