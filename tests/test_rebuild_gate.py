"""Nightly rebuild, continued: the gate's refusal, the hierarchy leaf it compares, the job lock, rollback and pruning.

A module of its own so that pytest-xdist (one module per worker) can run it beside the rest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import ATTRIBUTE_HIERARCHY, attribute_build_config
from test_rebuild import ROOT, bundle_rows, make_photos, rebuild_build_config, write_catalog

from indexer.artifacts import ArtifactRoot, job_lock, rollback, status
from indexer.rebuild import RebuildConfig, rebuild
from recommender.errors import GateError, JobLockedError, PublishError


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """test_rebuild's generated photos, once per module."""
    return make_photos(tmp_path_factory.mktemp("rebuild-photos"))


@pytest.fixture
def build_config(tmp_path):
    return rebuild_build_config(tmp_path)


def test_gate_refusal_leaves_current_untouched(photos, build_config, tmp_path):
    folder, rows, extra = photos
    root = tmp_path / "root"
    rebuild(write_catalog(folder, "g1.csv", rows), root, build_config)
    current = (root / "current").resolve().name
    strict = RebuildConfig(retrain="always", max_accuracy_drop=-1.0)  # demands a gain of more than 1.0: impossible
    with pytest.raises(GateError, match="validation accuracy of the primary column .label. fell"):
        rebuild(write_catalog(folder, "g2.csv", rows + extra[:1]), root, build_config, strict)
    assert (root / "current").resolve().name == current
    rejected = list((root / "rejected").iterdir())
    assert len(rejected) == 1 and rejected[0].name not in ArtifactRoot(root).bundle_ids()
    report = status(root)
    assert report["runs"][-1]["state"] == "refused" and report["rejected"] == [rejected[0].name]
    assert report["staged"] == [] and not (root / "staging" / rejected[0].name).exists()
    with pytest.raises(PublishError, match=rf"no published bundle {rejected[0].name!r}"):
        rollback(root, rejected[0].name)

    # A complete, verifying bundle in bundles/ that no run recorded as published (what a run
    # killed in its gate used to leave there) is listed as such and never offered.
    unrecorded = "29991231T235959Z-abcdef"
    shutil.copytree(root / "bundles" / current, root / "bundles" / unrecorded)
    listed = {bundle["id"]: bundle for bundle in status(root)["bundles"]}
    assert listed[current]["published"] and not listed[unrecorded]["published"]
    with pytest.raises(PublishError, match=rf"no published bundle {unrecorded!r}.*published: {current}$"):
        rollback(root, unrecorded)
    # A root from before published.jsonl: the history comes from its run logs.
    (root / "published.jsonl").unlink()
    assert ArtifactRoot(root).published_ids() == {current}
    with pytest.raises(PublishError, match=rf"no published bundle {unrecorded!r}"):
        rollback(root, unrecorded)


def test_gate_compares_the_hierarchy_leaf(tiny_bundle, generated_catalog, session_store, tmp_path):
    """The gate's "primary" is the taxonomy's leaf, as in training: with --hierarchy a>b>c and
    no --label-column the label columns start at the root, yet the leaf is what it compares."""
    from indexer.build import build_bundle
    from indexer.rebuild import validation_gate
    from recommender.bundle import read_manifest

    # The CLI's columns for `--hierarchy department>family>label` alone: the levels, root first.
    config = replace(attribute_build_config(session_store), label_columns=ATTRIBUTE_HIERARCHY, tags_column=None)
    config = replace(config, train=replace(config.train, max_epochs=4))
    build_bundle(generated_catalog, tmp_path / "hierarchy", config)
    new = read_manifest(tmp_path / "hierarchy").metrics.accuracy("label")
    current = read_manifest(tiny_bundle)  # label and colour heads: a shop adding a hierarchy
    old = current.metrics.accuracy("label")
    strict = RebuildConfig(max_accuracy_drop=-1.0)  # demands a gain of more than 1.0: impossible
    with pytest.raises(GateError, match=rf"primary column 'label' fell from {old:.3f} to {new:.3f}"):
        validation_gate(tmp_path / "hierarchy", current, strict, retrained=True)


def test_lock_contention_and_release_after_kill(photos, build_config, tmp_path):
    folder, rows, _ = photos
    root = tmp_path / "root"
    with job_lock(ArtifactRoot(root)):
        with pytest.raises(JobLockedError, match="another rebuild is running.*pid"):
            rebuild(write_catalog(folder, "l1.csv", rows), root, build_config)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from indexer.artifacts import ArtifactRoot, job_lock\nwith job_lock(ArtifactRoot(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)",
            str(root),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    assert status(root)["lock"].startswith(f"pid {holder.pid}")
    with pytest.raises(JobLockedError):
        with job_lock(ArtifactRoot(root)):
            pass
    holder.kill()
    holder.wait()
    holder.stdout.close()
    with job_lock(ArtifactRoot(root)):  # the dead holder's lock was released by the kernel
        pass


def test_rollback_and_pruning(photos, build_config, tmp_path):
    folder, rows, extra = photos
    root = tmp_path / "root"
    ids = []
    for number in range(3):
        summary = rebuild(
            write_catalog(folder, f"r{number}.csv", rows + extra[:number]),
            root,
            build_config,
            RebuildConfig(retrain="never" if number else "auto", keep=2),
        )
        ids.append(summary["bundle_id"])
    assert ArtifactRoot(root).bundle_ids() == ids[1:]  # keep=2 pruned the oldest
    assert rollback(root) == {"current": ids[1], "previous": ids[2]}
    assert (root / "current").resolve().name == ids[1]
    assert len(bundle_rows(root)) == 37
    with pytest.raises(PublishError, match="no published bundle older"):
        rollback(root)
    with pytest.raises(PublishError, match="no published bundle 'nope'"):
        rollback(root, "nope")
    rollback(root, ids[2])
    # Pruning never removes the current bundle, even when it is the oldest.
    rollback(root, ids[1])
    rebuild(
        write_catalog(folder, "r3.csv", rows + extra[:3]), root, build_config, RebuildConfig(retrain="never", keep=1)
    )
    remaining = ArtifactRoot(root).bundle_ids()
    assert (root / "current").resolve().name in remaining and len(remaining) == 1
    report = status(root)
    assert report["current"] == remaining[0] and report["lock"] is None and report["runs"]
