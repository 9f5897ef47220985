"""Zero-downtime bundle swap: a ``current`` symlink republished under load, then pointed at a broken bundle."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from recommender.errors import BundleError
from webapp import create_app
from webapp.bundles import LiveBundle

SWAP_TIMEOUT_S = 120


def publish(pointer: Path, bundle: Path) -> None:
    """Points ``pointer`` at ``bundle`` the way the nightly job does: a new symlink, os.replace'd."""
    temporary = pointer.with_name(pointer.name + ".new")
    if temporary.is_symlink():
        temporary.unlink()
    temporary.symlink_to(bundle, target_is_directory=True)
    os.replace(temporary, pointer)


def wait_for(condition, timeout: float = SWAP_TIMEOUT_S, what: str = "condition"):
    """Polls ``condition()`` until it returns something true; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def second_bundle(generated_catalog, tiny_config, tmp_path_factory) -> Path:
    """Another bundle of the same catalog, trained with seed 1 (features come from the session store)."""
    from indexer.build import build_bundle

    out = tmp_path_factory.mktemp("second") / "bundle"
    config = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, seed=1))
    build_bundle(generated_catalog, out, config)
    return out


@pytest.fixture(scope="module")
def broken_bundle(second_bundle, tmp_path_factory) -> Path:
    """A copy of the second bundle with one byte of its catalog changed: refused by verification."""
    out = tmp_path_factory.mktemp("broken") / "bundle"
    shutil.copytree(second_bundle, out)
    catalog = out / "catalog.jsonl"
    data = bytearray(catalog.read_bytes())
    data[10] ^= 0x01
    catalog.write_bytes(bytes(data))
    return out


class Traffic:
    """Client threads that keep sending item and upload requests until stopped; records every answer."""

    def __init__(self, app, item_ids: list[str], photo: bytes, threads: int = 4):
        self.app = app
        self.item_ids = item_ids
        self.photo = photo
        self.results: list[tuple[str, int, dict]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, number: int) -> None:
        client = self.app.test_client()
        count = 0
        while not self._stop.is_set():
            if (count + number) % 3 == 0:
                kind = "upload"
                response = client.post("/api/v1/similar?k=4", data=self.photo, content_type="image/jpeg")
            else:
                kind = self.item_ids[count % len(self.item_ids)]
                response = client.get(f"/api/v1/items/{kind}/similar?k=4")
            with self._lock:
                self.results.append((kind, response.status_code, response.get_json(silent=True) or {}))
            count += 1

    def bundles_seen(self) -> set[str]:
        with self._lock:
            return {body.get("bundle") for _, _, body in self.results}


def test_publishing_a_new_bundle_swaps_without_failures_and_a_broken_one_is_refused(
    tmp_path, tiny_bundle, second_bundle, broken_bundle, engine, caplog
):
    from recommender.engine import load_bundle

    caplog.set_level(logging.INFO, logger="webapp")
    pointer = tmp_path / "artifacts" / "current"
    pointer.parent.mkdir()
    publish(pointer, tiny_bundle)
    app = create_app({"bundle": pointer, "reload_interval_s": 0})
    client = app.test_client()
    first_id = engine.bundle_id
    assert client.get("/readyz").get_json()["bundle"] == first_id
    second = load_bundle(second_bundle)
    assert second.bundle_id != first_id

    item_ids = [row.id for row in engine.rows[::8]]
    photo = Path(engine.rows[7].path).read_bytes()
    expected = {
        bundle.bundle_id: {
            "upload": bundle.query(photo, k=4)["neighbors"],
            **{item: bundle.similar_to_item(item, 4)["neighbors"] for item in item_ids},
        }
        for bundle in (engine, second)
    }
    assert expected[first_id] != expected[second.bundle_id]  # another seed: other neighbours

    with Traffic(app, item_ids, photo) as traffic:
        wait_for(lambda: len(traffic.results) >= 20, what="traffic on the first bundle")
        publish(pointer, second_bundle)
        wait_for(lambda: client.get("/readyz").get_json()["bundle"] == second.bundle_id, what="the swap")
        wait_for(lambda: second.bundle_id in traffic.bundles_seen(), what="answers from the new bundle")
        served_after_swap = len(traffic.results)
        wait_for(lambda: len(traffic.results) >= served_after_swap + 20, what="traffic on the new bundle")

        publish(pointer, broken_bundle)
        refused = wait_for(lambda: client.get("/readyz").get_json()["reload_error"], what="the refusal")
        refused_at = len(traffic.results)
        wait_for(lambda: len(traffic.results) >= refused_at + 20, what="traffic after the refusal")

    assert {status for _, status, _ in traffic.results} == {200}, "no request may fail during a swap"
    assert traffic.bundles_seen() == {first_id, second.bundle_id}
    for kind, _, body in traffic.results:
        neighbors = body["neighbors"]
        reference = expected[body["bundle"]][kind]
        assert [n["id"] for n in neighbors] == [n["id"] for n in reference], (kind, body["bundle"])
        assert [n["distance"] for n in neighbors] == pytest.approx([n["distance"] for n in reference], abs=1e-4)
    assert all(body["bundle"] == second.bundle_id for _, _, body in traffic.results[refused_at:])

    ready = client.get("/readyz")
    assert ready.status_code == 200
    status = ready.get_json()
    assert status["bundle"] == second.bundle_id and status["path"] == str(second_bundle.resolve())
    assert refused["target"] == str(broken_bundle.resolve())
    assert "catalog.jsonl" in refused["message"] and "sha256" in refused["message"]
    assert any(
        record.levelno == logging.ERROR and str(broken_bundle.resolve()) in record.getMessage()
        for record in caplog.records
    )
    assert any(second.bundle_id in record.getMessage() for record in caplog.records if record.levelno == logging.INFO)

    # Rolling the pointer back to the bundle being served clears the refusal (at the watcher's next check).
    publish(pointer, second_bundle)
    wait_for(lambda: client.get("/readyz").get_json()["reload_error"] is None, what="the refusal to clear")
    assert client.get("/readyz").get_json()["bundle"] == second.bundle_id


# -- the swap mechanics, with a stand-in loader (fast, no TensorFlow) ----------------------


def _stand_in_engine(path: Path):
    """The least an engine needs for warm-up and /readyz; its id is the bundle's manifest id."""
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("broken"):
        raise BundleError(f"{path}: broken on purpose")
    return SimpleNamespace(
        bundle_id=manifest["bundle_id"],
        path=path,
        manifest=SimpleNamespace(
            backbone=SimpleNamespace(identity={"kind": "stand-in"}), counts=SimpleNamespace(items=1)
        ),
        backbone=SimpleNamespace(input_size=2),
        rows=[SimpleNamespace(id="a")],
        embed_images=lambda images: (np.zeros((len(images), 1)), []),
        similar_to_item=lambda item_id, k: {"neighbors": []},
    )


def _write_stand_in(folder: Path, bundle_id: str, broken: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"bundle_id": bundle_id, "broken": broken}))
    return folder


def test_live_bundle_checks_at_most_every_interval_and_retries_only_on_change(tmp_path):
    loads = []

    def loader(path):
        loads.append(path)
        return _stand_in_engine(path)

    served = tmp_path / "served"
    _write_stand_in(served, "one")
    live = LiveBundle(served, check_interval_s=3600, loader=loader)
    live.load_now()
    assert live.current().bundle_id == "one"

    # A folder replaced in place (same path, new manifest) is a new bundle, found at the next check.
    os.rename(served, tmp_path / "old")
    _write_stand_in(served, "two")
    assert live.current().bundle_id == "one"  # not checked yet: the interval has not passed
    assert live.check()
    live.wait_for_reload(10)
    assert live.current().bundle_id == "two" and len(loads) == 2

    # A broken bundle is refused once and not reloaded on every check.
    os.rename(served, tmp_path / "older")
    _write_stand_in(served, "three", broken=True)
    assert live.check()
    live.wait_for_reload(10)
    assert not live.check()
    assert live.current().bundle_id == "two" and len(loads) == 3
    assert "broken on purpose" in live.status()["reload_error"]["message"]

    # Fixed: the next change is loaded.
    os.rename(served, tmp_path / "oldest")
    _write_stand_in(served, "four")
    assert live.check()
    live.wait_for_reload(10)
    status = live.status()
    assert status["bundle"] == "four" and status["reload_error"] is None and status["ready"]


class _Engine:
    """A stand-in engine that can be weakly referenced (to see that a swapped-out one is freed)."""

    def __init__(self, path: Path):
        vars(self).update(vars(_stand_in_engine(path)))


def test_the_watcher_swaps_without_any_request_and_releases_the_old_engine(tmp_path):
    import gc
    import weakref

    pointer = tmp_path / "current"
    publish(pointer, _write_stand_in(tmp_path / "one", "one"))
    live = LiveBundle(pointer, check_interval_s=0.1, loader=_Engine)
    live.load_now()
    try:
        first = weakref.ref(live.current())
        publish(pointer, _write_stand_in(tmp_path / "two", "two"))
        # Nothing calls current() or check(): the watcher thread alone notices the new pointer.
        wait_for(lambda: live.status()["bundle"] == "two", timeout=10, what="the watcher's swap")
        gc.collect()
        assert first() is None, "the swapped-out engine must be freed"
        publish(pointer, tmp_path / "one")  # a rollback is followed the same way
        wait_for(lambda: live.status()["bundle"] == "one", timeout=10, what="the rollback")
    finally:
        live.stop()
    assert not live._watcher.is_alive()
