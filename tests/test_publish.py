"""Publishing: a bundle is staged until its gate passes; rollback and status offer only published ones."""

from __future__ import annotations

import json
import signal
from dataclasses import replace

import pytest
from conftest import tiny_build_config
from test_rebuild import make_photos, write_catalog
from test_rebuild_kill import run_job

from indexer.artifacts import ArtifactRoot, rollback, status
from indexer.rebuild import rebuild
from recommender.errors import PublishError


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("publish-photos"))


@pytest.fixture
def build_config(tmp_path):
    config = tiny_build_config(tmp_path / "unused.h5")
    return replace(config, train=replace(config.train, max_epochs=4))


def published_history(root) -> list[dict]:
    return [json.loads(line) for line in (root / "published.jsonl").read_text().splitlines()]


def test_a_bundle_killed_in_its_gate_is_never_offered(photos, build_config, tmp_path, capsys):
    """Issue 12 case 7: kill a rebuild during its gate, run a normal rebuild, then roll back:
    ``current`` must go back to the bundle published before, never to the unvalidated one."""
    folder, rows, extra = photos
    root = tmp_path / "root"
    first = rebuild(write_catalog(folder, "a.csv", rows), root, build_config)
    assert first["state"] == "published"

    job = run_job(write_catalog(folder, "b.csv", rows + extra[:1]), root, pause_at="gate")
    assert job.returncode == -signal.SIGKILL, job.errors
    artifacts = ArtifactRoot(root)
    # What the killed run left lives under staging/: not a bundle anything offers.
    staged = artifacts.staged_ids()
    assert len(staged) == 1 and (artifacts.staging / staged[0] / "manifest.json").is_file()
    assert artifacts.bundle_ids() == [first["bundle_id"]]
    report = status(root)
    assert [bundle["id"] for bundle in report["bundles"]] == [first["bundle_id"]]
    assert report["staged"] == [{"id": staged[0], "state": "left by an interrupted run"}]
    assert report["runs"][-1]["state"] == "interrupted" and report["runs"][-1]["staged"] == staged[0]
    from recommender.cli import main

    assert main(["status", "--root", str(root)]) == 0
    text = capsys.readouterr().out
    assert f"staged {staged[0]}  left by an interrupted run; not a rollback target" in text
    assert f"interrupted staged {staged[0]}" in text
    with pytest.raises(PublishError, match="no published bundle older"):
        rollback(root)
    with pytest.raises(PublishError, match=rf"no published bundle {staged[0]!r}"):
        rollback(root, staged[0])

    second = rebuild(write_catalog(folder, "c.csv", rows + extra[:2]), root, build_config)
    assert second["state"] == "published" and second["removed_leftovers"] == [f"staging/{staged[0]}"]
    assert artifacts.staged_ids() == [] and artifacts.bundle_ids() == [first["bundle_id"], second["bundle_id"]]
    history = published_history(root)
    assert [(entry["bundle_id"], entry["run_id"], entry["by"]) for entry in history] == [
        (first["bundle_id"], first["run_id"], "rebuild"),
        (second["bundle_id"], second["run_id"], "rebuild"),
    ]
    assert rollback(root) == {"current": first["bundle_id"], "previous": second["bundle_id"]}
    assert (root / "current").resolve().name == first["bundle_id"]
    assert published_history(root)[-1]["by"] == "rollback"
