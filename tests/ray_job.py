"""The Ray side of tests/test_ray_engine.py, run by it inside a private network namespace.

    python tests/ray_job.py CATALOG.csv OUT

Starts one local Ray (2 CPUs, 200 MB object store) and builds the catalog three times with the
tiny bundle's settings: ``OUT/local`` (engine local, HDF5 store), ``OUT/ray`` (engine ray, part
store ``OUT/ray.parts``; the first actor to reach a batch is SIGKILLed once, marker
``OUT/killed``; embedded in Ray actors too) and ``OUT/ray-again`` (engine ray, same store: everything cached; an ``ivf-sq8`` index added in
shard tasks on that Ray, :func:`indexer.ray_engine.build_index_ray`). Then a
nightly rebuild on that Ray whose driver is SIGKILLed mid-extraction, and its rerun
(:func:`killed_driver`). Writes the reports to ``OUT/reports.json``; the test asserts on them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_build_config  # noqa: E402


def step(name: str) -> None:
    """One line per phase on stderr, so a run that times out shows where it was."""
    import time

    print(f"ray_job {time.strftime('%H:%M:%S')} {name}", file=sys.stderr, flush=True)


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
    step("local build")
    reports["local"] = build_bundle(catalog, out_path / "local", config).to_json()
    ray_config = replace(config, engine="ray", feature_store=out_path / "ray.parts")
    step("ray build")
    # Embedded in actors however small the catalog: the parity test checks that path.
    in_actors = replace(ray_config, ray=replace(ray_config.ray, driver_embed_rows=0))
    reports["ray"] = build_bundle(catalog, out_path / "ray", in_actors).to_json()
    step("ray build again")
    again_config = replace(ray_config, index_kind="ivf-sq8")
    reports["ray-again"] = build_bundle(catalog, out_path / "ray-again", again_config).to_json()
    step("panels on ray")
    reports["panels"] = panels_on_ray(out_path / "local", ray.get_runtime_context().gcs_address)
    step("killed driver")
    reports["killed-driver"] = killed_driver(catalog, out_path, ray_config, ray.get_runtime_context().gcs_address)
    (out_path / "reports.json").write_text(json.dumps(reports, default=str))
    ray.shutdown()
    return 0


def panels_on_ray(bundle: Path, address: str) -> dict:
    """``recommender panels --engine ray`` (a CLI run joining this Ray) against the local job, per colour."""
    import subprocess

    from indexer.panels import compute_panels

    out = bundle.with_name("panels-ray")
    command = [sys.executable, "-m", "recommender", "panels", "--bundle", str(bundle), "--out", str(out)]
    command += ["--per", "colour", "--engine", "ray", "--ray-address", address, "--batch-size", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    positions, neighbors, distances = compute_panels(bundle, 6, "colour")
    ids = [json.loads(line)["id"] for line in (bundle / "catalog.jsonl").read_text().splitlines()]
    local = [
        {"id": ids[p], "neighbors": [ids[n] for n in row if n >= 0], "distances": [float(d) for d in dist if d < 1e30]}
        for p, row, dist in zip(positions, neighbors, distances)
    ]
    on_ray = (
        [json.loads(line) for line in (out / "panels.jsonl").read_text().splitlines()] if done.returncode == 0 else []
    )
    return {"returncode": done.returncode, "stderr": done.stderr[-3000:], "local": local, "ray": on_ray}


def killed_driver(catalog: str, out: Path, config, address: str) -> dict:
    """A nightly rebuild on this Ray whose driver is SIGKILLed mid-extraction, then run again.

    The root gets a published bundle first (in process); then 12 new photos come, and
    ``recommender rebuild --engine ray`` (two photos per batch) is killed once its first batch
    is stored. Returns what the test checks: ``current`` after the kill, the parts left, the rerun.
    """
    import csv
    import signal
    import subprocess

    from indexer.rebuild import RebuildConfig, rebuild
    from recommender.bundle import verify_bundle
    from recommender.synthetic import generate_catalog

    root = out / "root"
    step("first rebuild")
    first = rebuild(catalog, root, config, RebuildConfig(max_accuracy_drop=1.0))
    extra = generate_catalog(
        Path(catalog).parent / "extra", per_class=2, patterns=("plain", "stripes", "dots"), colours=("red", "blue"),
        size=64, seed=5,
    )  # fmt: skip
    with open(catalog, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(extra, newline="") as handle:
        rows += [{**row, "id": "new-" + row["id"], "file": "extra/" + row["file"]} for row in csv.DictReader(handle)]
    grown = Path(catalog).with_name("grown.csv")
    with open(grown, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = [sys.executable, "-m", "recommender", "rebuild", "--catalog", str(grown), "--root", str(root)]
    command += ["--id-column", "id", "--label-column", "label", "--label-column", "colour", "--weights", "none"]
    command += ["--image-size", "64", "--epochs", "4", "--max-accuracy-drop", "1", "--max-bad-fraction", "0.2"]
    command += ["--engine", "ray", "--ray-address", address, "--batch-size", "2"]
    step("rebuild to kill")
    paused = subprocess.Popen(
        command,
        env={**os.environ, "RECOMMENDER_PAUSE_AT": "ray-results:120"},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in paused.stderr:
        seen.append(line)
        if line.startswith("checkpoint ray-results"):
            os.killpg(paused.pid, signal.SIGKILL)
            break
    paused.wait()
    parts = root / "features.parts"
    after_kill = {
        "reached_checkpoint": any(line.startswith("checkpoint ray-results") for line in seen),
        "returncode": paused.returncode,
        "current": (root / "current").resolve().name,
        "current_verifies": verify_bundle(root / "current").bundle_id,
        "incoming_parts": len(list(parts.rglob("incoming/part-*.parquet"))),
        "stderr_tail": "".join(seen[-20:]),
    }
    step("rerun")
    # The rerun also writes the published bundle's panels, in Ray tasks (the run's --engine ray).
    again = subprocess.run([*command, "--panels"], capture_output=True, text=True, timeout=600)
    return {
        "first": first,
        "after_kill": after_kill,
        "rerun_returncode": again.returncode,
        "rerun": json.loads(again.stdout.splitlines()[-1]) if again.returncode == 0 else again.stderr[-3000:],
        "new_photos": len(rows) - 37,
    }


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
