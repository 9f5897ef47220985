"""Precomputed panels: equal to similar_to_item, per column, atomic and verified, the CLI, the web app, rebuild --panels."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import prometheus_sample

from indexer.commands.rebuild import add_panels
from indexer.panels import compute_panels, write_panels, write_published_panels
from recommender.bundle import write_json
from recommender.cli import main
from recommender.errors import FilterError, PanelsError, PanelsMismatchError, QueryError
from recommender.panels import (
    PANELS_JSONL,
    PANELS_MANIFEST,
    PANELS_PARQUET,
    bundle_manifest_sha256,
    default_panels_root,
    load_panel_map,
    read_panels_manifest,
    verify_panels,
)

ROOT = Path(__file__).resolve().parents[1]
K = 6


def assert_same_neighbors(found: list[dict], expected: list[dict]) -> None:
    """Same ids in the same order, distances within 1e-5 (batch and single searches round differently)."""
    assert [n["id"] for n in found] == [n["id"] for n in expected]
    for mine, theirs in zip(found, expected):
        assert mine["distance"] == pytest.approx(theirs["distance"], abs=1e-5)


@pytest.fixture(scope="module")
def panels(engine, tmp_path_factory) -> Path:
    """Plain panels (k=6) of the session's tiny bundle, written from its folder (no model loaded)."""
    out = tmp_path_factory.mktemp("panels") / "tiny"
    write_panels(engine.path, out, K)
    return out


def jsonl_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / PANELS_JSONL).read_text(encoding="utf-8").splitlines()]


def linked_copy(bundle: Path, out: Path, **manifest_changes) -> Path:
    """A bundle folder of hard links to ``bundle``'s files with a rewritten manifest (a valid bundle)."""
    out.mkdir(parents=True)
    for path in bundle.iterdir():
        if path.name != "manifest.json":
            try:
                os.link(path, out / path.name)
            except OSError:
                shutil.copyfile(path, out / path.name)
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    manifest.update(manifest_changes)
    write_json(out / "manifest.json", manifest)
    return out


# -- the job -------------------------------------------------------------------------------


def test_panels_equal_similar_to_item_for_every_item(engine, panels):
    lines = jsonl_lines(panels)
    assert [line["id"] for line in lines] == [row.id for row in engine.rows]
    for line in lines:
        assert_same_neighbors(line["neighbors"], engine.similar_to_item(line["id"], K)["neighbors"])
    manifest = verify_panels(panels)
    assert manifest.bundle_id == engine.bundle_id
    assert manifest.bundle_manifest_sha256 == bundle_manifest_sha256(engine.path)
    assert (manifest.k, manifest.per_column, manifest.items) == (K, None, len(engine.rows))
    assert manifest.neighbors == K * len(engine.rows)


def test_parquet_holds_the_same_rows_as_the_jsonl(panels):
    import pyarrow.parquet as pq

    table = pq.read_table(panels / PANELS_PARQUET).to_pylist()
    expected = [
        {"id": line["id"], "rank": rank, "neighbor_id": n["id"], "distance": pytest.approx(n["distance"], abs=1e-6)}
        for line in jsonl_lines(panels)
        for rank, n in enumerate(line["neighbors"])
    ]
    assert table == expected


def test_batches_of_any_size_give_the_same_panels(engine):
    whole = compute_panels(engine, K, batch_size=1024)
    for batch_size in (1, 7):
        positions, neighbors, distances = compute_panels(engine, K, batch_size=batch_size)
        assert positions == whole[0]
        assert (neighbors == whole[1]).all()
        assert abs(distances - whole[2]).max() < 1e-5


def test_per_column_searches_within_the_items_own_value(engine, tmp_path):
    report = write_panels(engine, tmp_path / "per", 4, "colour")
    assert report.per_column == "colour" and report.items == len(engine.rows) and report.items_without_value == 0
    colour = {row.id: row.labels["colour"] for row in engine.rows}
    lines = jsonl_lines(tmp_path / "per")
    assert len(lines) == len(engine.rows)
    for line in lines:
        assert line["per_value"] == colour[line["id"]]
        assert {colour[n["id"]] for n in line["neighbors"]} == {colour[line["id"]]}
        live = engine.similar_to_item(line["id"], 4, filters={"colour": colour[line["id"]]})
        assert_same_neighbors(line["neighbors"], live["neighbors"])
    # The parquet's per_value column holds the item's own value on each of its rows.
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "per" / PANELS_PARQUET).to_pylist()
    assert all(row["per_value"] == colour[row["id"]] == colour[row["neighbor_id"]] for row in rows)


def test_per_column_must_be_a_label_column_and_k_in_range(engine, tmp_path):
    with pytest.raises(FilterError, match="not a label column"):
        write_panels(engine, tmp_path / "p", K, "nope")
    with pytest.raises(QueryError):
        write_panels(engine, tmp_path / "p", 0)
    assert not (tmp_path / "p").exists()


def test_an_existing_folder_is_refused_unless_overwrite(engine, tmp_path):
    out = tmp_path / "p"
    write_panels(engine, out, 2)
    with pytest.raises(PanelsError, match="already exists"):
        write_panels(engine, out, 3)
    assert read_panels_manifest(out).k == 2
    write_panels(engine, out, 3, overwrite=True)
    assert read_panels_manifest(out).k == 3
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temporary folder left beside it


def test_a_job_killed_before_the_manifest_leaves_no_folder(tiny_bundle, tmp_path):
    out = tmp_path / "p"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RECOMMENDER_PAUSE_AT": "panels-manifest:60"}
    command = [sys.executable, "-m", "recommender", "panels", "--bundle", str(tiny_bundle), "--out", str(out)]
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in job.stderr:
            if line.strip() == "checkpoint panels-manifest":
                break
        else:
            raise AssertionError("the job ended before its checkpoint")
        temporary = [p for p in tmp_path.iterdir() if p.name.startswith(".p.tmp-")]
        assert len(temporary) == 1 and (temporary[0] / PANELS_PARQUET).is_file()  # files written, not yet renamed
        os.kill(job.pid, signal.SIGKILL)
    finally:
        job.wait(timeout=60)
        job.stderr.close()
    assert not out.exists()


def test_a_tampered_or_truncated_file_is_refused(engine, panels, tmp_path):
    for name in (PANELS_PARQUET, PANELS_JSONL):
        copy = tmp_path / name
        shutil.copytree(panels, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 1
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(PanelsError, match=f"{name} does not match its sha256"):
            verify_panels(copy)
        with pytest.raises(PanelsError, match=name):
            load_panel_map(copy, engine.bundle_id, bundle_manifest_sha256(engine.path), [r.id for r in engine.rows])
    truncated = tmp_path / "truncated"
    shutil.copytree(panels, truncated)
    (truncated / PANELS_JSONL).write_bytes((truncated / PANELS_JSONL).read_bytes()[:-10])
    with pytest.raises(PanelsError, match="bytes"):
        verify_panels(truncated)
    broken = tmp_path / "broken"
    shutil.copytree(panels, broken)
    manifest = json.loads((broken / PANELS_MANIFEST).read_text())
    del manifest["k"]
    (broken / PANELS_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PanelsError, match="k: expected an integer"):
        verify_panels(broken)


def test_panels_of_another_bundle_are_refused(engine, panels):
    ids = [row.id for row in engine.rows]
    with pytest.raises(PanelsMismatchError, match="not of bundle other"):
        load_panel_map(panels, "other", bundle_manifest_sha256(engine.path), ids)
    with pytest.raises(PanelsMismatchError):
        load_panel_map(panels, engine.bundle_id, "0" * 64, ids)
    loaded = load_panel_map(panels, engine.bundle_id, bundle_manifest_sha256(engine.path), ids)
    assert loaded.positions.shape == (len(ids), K) and loaded.positions.dtype.itemsize == 4


def test_default_panels_root_is_beside_the_artifact_roots_bundles(tmp_path):
    assert default_panels_root(tmp_path / "root" / "bundles" / "b1") == tmp_path / "root" / "panels"
    assert default_panels_root(tmp_path / "somewhere" / "b1") is None


# -- the command ---------------------------------------------------------------------------


def test_cli_writes_panels_and_prints_a_report(tiny_bundle, engine, tmp_path, capsys):
    assert main(["panels", "--bundle", str(tiny_bundle), "--out", str(tmp_path / "p"), "--k", "3"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["items"] == len(engine.rows) and report["k"] == 3 and report["items_per_second"] > 0
    assert "items/s" in captured.err
    assert read_panels_manifest(tmp_path / "p").k == 3


def test_cli_errors_exit_1_with_one_line(tiny_bundle, tmp_path, capsys):
    cases = [
        (["--bundle", str(tmp_path / "missing"), "--out", str(tmp_path / "a")], "bundle not found"),
        (["--bundle", str(tmp_path), "--out", str(tmp_path / "b")], "no manifest.json"),
        (["--bundle", str(tiny_bundle), "--out", str(tmp_path / "c"), "--per", "nope"], "not a label column"),
        (["--bundle", str(tiny_bundle), "--out", str(tmp_path / "d"), "--k", "101"], "k must be"),
        (["--bundle", str(tiny_bundle), "--out", str(tiny_bundle)], "already exists"),
    ]
    for flags, message in cases:
        assert main(["panels", *flags]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["panels", "--bundle", str(tiny_bundle), "--out", str(tmp_path / "e"), "--k", "0"])
    assert exit_info.value.code == 2


# -- the web app ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def panels_app(tiny_bundle, panels):
    from webapp import create_app

    return create_app({"bundle": tiny_bundle, "reload_interval_s": 3600, "panels": panels})


def test_the_item_endpoint_answers_from_panels_with_the_live_answer(panels_app, engine):
    client = panels_app.test_client()
    before = prometheus_sample(client.get("/metrics").text, "recommender_item_similar_answers_total", source="panels")
    for row in engine.rows[:20]:
        for k in (1, K):
            response = client.get(f"/api/v1/items/{row.id}/similar?k={k}")
            assert response.status_code == 200 and response.headers["X-Similar-Source"] == "panels"
            body = response.get_json()
            live = engine.similar_to_item(row.id, k)
            assert body["neighbors"][0].keys() == {**live["neighbors"][0], "image_url": ""}.keys()
            assert_same_neighbors(body["neighbors"], live["neighbors"])
            assert {key: body[key] for key in ("id", "labels")} == {key: live[key] for key in ("id", "labels")}
            assert body["bundle"] == engine.bundle_id
    after = prometheus_sample(client.get("/metrics").text, "recommender_item_similar_answers_total", source="panels")
    assert after - before == 40


def test_larger_k_filters_and_unknown_ids_fall_back_to_live_search(panels_app, engine):
    client = panels_app.test_client()
    item = engine.rows[3]
    response = client.get(f"/api/v1/items/{item.id}/similar?k={K + 1}")
    assert response.headers["X-Similar-Source"] == "live" and len(response.get_json()["neighbors"]) == K + 1
    response = client.get(f"/api/v1/items/{item.id}/similar?filter=colour:{item.labels['colour']}")
    assert response.headers["X-Similar-Source"] == "live" and "filter" in response.get_json()
    assert client.get("/api/v1/items/no-such-item/similar").status_code == 404


def test_panels_of_another_bundle_are_not_served(tiny_bundle, engine, tmp_path, caplog):
    """Panels written for a bundle with another id, and for the same id with another manifest, are ignored.

    Through ``ServedPanels``, the loader the app wraps around ``load_bundle`` (here around the
    session's engine, so no second app loads the model).
    """
    from webapp.panels import ServedPanels

    other_id = linked_copy(tiny_bundle, tmp_path / "other-id", bundle_id="another-bundle")
    same_id = linked_copy(tiny_bundle, tmp_path / "same-id", created_at="2000-01-01T00:00:00+00:00")
    for bundle in (other_id, same_id):
        out = tmp_path / f"panels-{bundle.name}"
        write_panels(bundle, out, K)
        caplog.clear()
        served = ServedPanels(out)
        assert served.attach(engine) is None
        assert served.answer(engine, engine.rows[0].id, K) is None  # the endpoint then searches live
        assert any("ignoring panels of another bundle" in record.getMessage() for record in caplog.records)
        # A folder of panels folders: only the one named by the served bundle's id is looked at.
        assert ServedPanels(tmp_path).attach(engine) is None
    assert ServedPanels(panels_root_of(engine, tmp_path)).attach(engine) is not None


def panels_root_of(engine, tmp_path: Path) -> Path:
    """A folder of panels folders holding the served bundle's panels under its id."""
    folder = tmp_path / "by-id"
    write_panels(engine, folder / engine.bundle_id, K)
    return folder


def test_a_tampered_panel_is_not_served(engine, panels, tmp_path, caplog):
    from webapp.panels import ServedPanels

    copy = tmp_path / "tampered"
    shutil.copytree(panels, copy)
    with open(copy / PANELS_PARQUET, "ab") as handle:
        handle.write(b"x")
    served = ServedPanels(copy)
    assert served.attach(engine) is None and served.answer(engine, engine.rows[0].id, K) is None
    assert any("refused the panels" in record.getMessage() for record in caplog.records)


# -- rebuild --panels ----------------------------------------------------------------------


def test_the_rebuild_hook_writes_the_published_bundles_panels(tiny_bundle, engine, tmp_path):
    """``rebuild --panels``'s step on a published bundle (a real bundle, linked into an artifact root)."""
    root = tmp_path / "root"
    (root / "bundles").mkdir(parents=True)
    (root / "bundles" / engine.bundle_id).symlink_to(tiny_bundle, target_is_directory=True)
    (root / "panels" / "pruned-one").mkdir(parents=True)
    (root / "runs").mkdir()
    summary = {"run_id": "run-1", "state": "published", "bundle_id": engine.bundle_id, "pruned": ["pruned-one"]}
    write_json(root / "runs" / "run-1.json", summary)
    add_panels(root, summary, K, None)  # what `recommender rebuild --panels` runs after rebuild() returned
    outcome = summary["panels"]
    assert outcome["state"] == "written" and outcome["items"] == len(engine.rows)
    assert json.loads((root / "runs" / "run-1.json").read_text())["panels"] == outcome
    assert verify_panels(root / "panels" / engine.bundle_id).bundle_id == engine.bundle_id
    assert not (root / "panels" / "pruned-one").exists()
    assert write_published_panels(root, {"state": "unchanged", "current": engine.bundle_id})["state"] == "kept"
    assert write_published_panels(root, {"state": "refused"})["state"] == "skipped"


def test_a_failed_panels_write_is_reported_not_raised(engine, tmp_path):
    root = tmp_path / "root"
    (root / "bundles" / engine.bundle_id).mkdir(parents=True)  # not a bundle: the write must fail
    outcome = write_published_panels(root, {"state": "published", "bundle_id": engine.bundle_id}, K)
    assert outcome["state"] == "failed" and "BundleError" in outcome["reason"]
    assert not (root / "panels" / engine.bundle_id).exists()


def test_the_app_finds_rebuild_panels_beside_the_artifact_roots_bundles(tiny_bundle, engine, tmp_path):
    """No setting: a bundle served from ROOT/bundles/<id> (through ROOT/current) answers from ROOT/panels/<id>."""
    from webapp import create_app

    root = tmp_path / "root"
    linked_copy(tiny_bundle, root / "bundles" / engine.bundle_id)
    (root / "current").symlink_to(Path("bundles") / engine.bundle_id)
    assert write_published_panels(root, {"state": "published", "bundle_id": engine.bundle_id}, K)["state"] == "written"
    app = create_app({"bundle": root / "current", "reload_interval_s": 3600})
    try:
        response = app.test_client().get(f"/api/v1/items/{engine.rows[7].id}/similar")
        assert response.headers["X-Similar-Source"] == "panels"
        assert_same_neighbors(response.get_json()["neighbors"], engine.similar_to_item(engine.rows[7].id)["neighbors"])
    finally:
        app.extensions["live_bundle"].stop()


def test_panels_follow_a_bundle_swap(tiny_bundle, engine, tmp_path):
    """After a swap the new bundle answers from its own panels; without panels of its own, live."""
    from webapp import create_app

    first = linked_copy(tiny_bundle, tmp_path / "bundles" / "first", bundle_id="first")
    second = linked_copy(tiny_bundle, tmp_path / "bundles" / "second", bundle_id="second")
    third = linked_copy(tiny_bundle, tmp_path / "bundles" / "third", bundle_id="third")
    panels = tmp_path / "panels"
    write_panels(first, panels / "first", K)
    write_panels(second, panels / "second", K)
    pointer = tmp_path / "current"
    pointer.symlink_to(first)
    app = create_app({"bundle": pointer, "reload_interval_s": 3600, "panels": panels})
    live = app.extensions["live_bundle"]
    item = engine.rows[2].id
    try:
        for bundle, source in ((first, "panels"), (second, "panels"), (third, "live")):
            if bundle is not first:
                replacement = tmp_path / "current.new"
                replacement.symlink_to(bundle)
                os.replace(replacement, pointer)
                assert live.check()
                live.wait_for_reload(60)
            response = app.test_client().get(f"/api/v1/items/{item}/similar")
            assert response.get_json()["bundle"] == bundle.name
            assert response.headers["X-Similar-Source"] == source
    finally:
        live.stop()
