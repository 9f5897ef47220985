"""The Ray engine: a build on a local Ray (in a private network namespace) equals the local build.

Ray listens on the host's address too, so its runs here start inside ``unshare -n`` with only
loopback up (``tests/ray_job.py``); the tests skip with the reason where namespaces or Ray are
not available. One namespace run builds the catalog three ways; the tests read its bundles.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CORRUPT_ID = "corrupt-photo"


def namespace_problem() -> str | None:
    """Why a private network namespace cannot be made here (None when it can)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()[:200]}"
    return None


def in_namespace(command: list[str], timeout: float, **options) -> subprocess.CompletedProcess:
    """Runs a command in a new network namespace with loopback up."""
    script = 'ip link set lo up && exec "$@"'
    try:
        return subprocess.run(
            ["unshare", "-n", "sh", "-c", script, "sh", *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            **options,
        )
    except subprocess.TimeoutExpired as error:
        errors = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr or ""
        pytest.fail(f"timed out after {timeout} s; its stderr ends:\n{errors[-4000:]}")


@pytest.fixture(scope="module")
def ray_builds(tmp_path_factory):
    """Runs tests/ray_job.py once in a namespace over a generated catalog with one corrupt photo."""
    pytest.importorskip("ray.data", reason="the Ray engine needs ray[data]")
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)
    from recommender.synthetic import generate_catalog

    folder = tmp_path_factory.mktemp("ray-catalog")
    catalog = generate_catalog(
        folder, per_class=6, patterns=("plain", "stripes", "dots"), colours=("red", "blue"), size=64, seed=3
    )
    with open(catalog, newline="") as handle:
        rows = list(csv.DictReader(handle))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append({**rows[0], "id": CORRUPT_ID, "file": "corrupt.jpg"})
    with open(catalog, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path_factory.mktemp("ray-builds")
    done = in_namespace([sys.executable, str(ROOT / "tests" / "ray_job.py"), str(catalog), str(out)], 1500, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads((out / "reports.json").read_text()), len(rows)


def test_ray_and_local_builds_give_the_same_bundle(ray_builds):
    from recommender.engine import load_bundle

    out, reports, total = ray_builds
    local, on_ray = load_bundle(out / "local", use_gpu=False), load_bundle(out / "ray", use_gpu=False)
    assert [row.id for row in on_ray.rows] == [row.id for row in local.rows] and len(local.rows) == total - 1
    assert [row.labels for row in on_ray.rows] == [row.labels for row in local.rows]
    vectors = np.stack([on_ray.index.reconstruct(i) for i in range(on_ray.index.size)])
    expected = np.stack([local.index.reconstruct(i) for i in range(local.index.size)])
    assert np.abs(vectors - expected).max() <= 1e-5
    for row in local.rows:
        assert [n["id"] for n in on_ray.similar_to_item(row.id)["neighbors"]] == [
            n["id"] for n in local.similar_to_item(row.id)["neighbors"]
        ]
    assert reports["ray"]["extracted"] == reports["local"]["extracted"] == total - 1


def test_a_corrupt_photo_is_a_bad_row_on_ray_too(ray_builds):
    _, reports, _ = ray_builds
    bad = {engine: [(row["id"], row["reason"]) for row in reports[engine]["bad_rows"]] for engine in ("local", "ray")}
    assert [item for item, _ in bad["ray"]] == [CORRUPT_ID]
    assert bad["ray"] == bad["local"]


def test_an_actor_killed_mid_batch_is_retried_and_nothing_is_missing(ray_builds):
    out, reports, total = ray_builds
    assert (out / "killed").exists()  # the first actor SIGKILLed itself at its first batch
    assert reports["ray"]["items"] == total - 1 and not [
        row for row in reports["ray"]["bad_rows"] if row["id"] != CORRUPT_ID
    ]


def test_the_ray_store_is_compacted_parts_that_a_rerun_reuses(ray_builds):
    out, reports, total = ray_builds
    parts = out / "ray.parts"
    assert (parts / "store.json").is_file() and list(parts.rglob("prefix=*/part-*.parquet"))
    assert not list(parts.rglob("incoming/part-*.parquet"))
    assert reports["ray-again"]["extracted"] == 0 and reports["ray-again"]["cached"] == total - 1


def test_an_ivf_index_added_in_ray_shard_tasks_answers_like_the_local_exact_index(ray_builds):
    """The cached rebuild asked for ivf-sq8: shards added by Ray tasks, merged on the driver."""
    from recommender.engine import load_bundle

    out, reports, _ = ray_builds
    assert reports["ray-again"]["index_shards"] == 2  # one per CPU of the job's 2-CPU Ray
    local, sharded = load_bundle(out / "local", use_gpu=False), load_bundle(out / "ray-again", use_gpu=False)
    assert (local.index.kind, sharded.index.kind) == ("flat", "ivf-sq8")
    assert sharded.index.size == local.index.size
    # One list scanned whole at this size: exact search over the float16 vectors, so the same
    # neighbour distances as the float32 flat index up to float16 rounding.
    for row in local.rows:
        expected = [n["distance"] for n in local.similar_to_item(row.id)["neighbors"]]
        found = [n["distance"] for n in sharded.similar_to_item(row.id)["neighbors"]]
        assert np.allclose(found, expected, rtol=2e-3, atol=2e-3), row.id


def test_panels_on_ray_tasks_equal_the_local_job(ray_builds):
    """``recommender panels --engine ray --per colour`` joined the job's Ray: the local job's answers."""
    _, reports, total = ray_builds
    panels = reports["panels"]
    assert panels["returncode"] == 0, panels["stderr"]
    assert f"panels of {total - 1} items" in panels["stderr"]
    assert [line["id"] for line in panels["ray"]] == [line["id"] for line in panels["local"]]
    for mine, theirs in zip(panels["ray"], panels["local"]):
        assert [n["id"] for n in mine["neighbors"]] == theirs["neighbors"]
        assert np.allclose([n["distance"] for n in mine["neighbors"]], theirs["distances"], atol=1e-5)


def test_a_killed_driver_leaves_current_valid_and_the_rerun_reuses_stored_parts(ray_builds):
    _, reports, _ = ray_builds
    killed = reports["killed-driver"]
    after = killed["after_kill"]
    assert after["reached_checkpoint"] and after["returncode"] == -9, after["stderr_tail"]
    # current still names the first bundle, which verifies; the stored batches are still there.
    assert after["current"] == after["current_verifies"] == killed["first"]["bundle_id"]
    assert after["incoming_parts"] >= 1
    assert killed["rerun_returncode"] == 0, killed["rerun"]
    rerun = killed["rerun"]
    assert rerun["state"] == "published" and rerun["counts"]["added"] == killed["new_photos"]
    assert rerun["counts"]["extracted"] < killed["new_photos"]  # the photos stored before the kill are reused
    from recommender.panels import verify_panels

    assert rerun["panels"]["state"] == "written", rerun["panels"]
    panels = verify_panels(Path(rerun["panels"]["path"]))  # computed in Ray tasks (the run's --engine ray)
    assert panels.bundle_id == rerun["bundle_id"] and panels.items == rerun["panels"]["items"] > killed["new_photos"]


def test_an_unreachable_cluster_is_one_clear_error_at_once(generated_catalog, tmp_path):
    """ray.init retries an address nothing answers for minutes; the job says so before loading anything."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    command = [sys.executable, "-m", "recommender", "build", "--catalog", str(generated_catalog)]
    command += ["--out", str(tmp_path / "b"), "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"error: no Ray cluster answers at 127.0.0.1:{port}" in done.stderr
    assert not (tmp_path / "b").exists()
