"""Bundle format: atomic write, manifest, and refusal of tampered, truncated or foreign bundles."""

from __future__ import annotations

import json
import shutil

import pytest

from recommender.bundle import FORMAT_VERSION, verify_bundle, write_bundle
from recommender.engine import load_bundle
from recommender.errors import BundleError


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(tiny_bundle, target)
    return target


def test_manifest_records_what_a_bundle_needs(tiny_bundle, tiny_build):
    manifest = verify_bundle(tiny_bundle)
    report = tiny_build[1]
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.bundle_id == report.bundle_id
    assert manifest.backbone.identity["weights"] == "none (random init)"
    assert manifest.backbone.spec.input_size == 64
    assert {"tensorflow", "keras", "numpy", "scikit-learn", "h5py", "pillow"} <= set(manifest.libraries)
    assert manifest.counts.items == report.items == 96
    assert manifest.counts.classes == {"label": 4, "colour": 3}
    assert set(manifest.metrics.heads) == {"label", "colour"}
    for name in ("model.keras", "scalers.npz", "labels.json", "index.faiss", "catalog.jsonl", "backbone.weights.h5"):
        assert len(manifest.files[name].sha256) == 64
    assert not any(p.name.endswith((".pkl", ".pickle")) for p in tiny_bundle.iterdir())


@pytest.mark.parametrize("name", ["labels.json", "catalog.jsonl", "index.faiss", "model.keras", "scalers.npz"])
def test_tampered_file_is_refused(bundle_copy, name):
    path = bundle_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name} does not match its sha256"):
        load_bundle(bundle_copy)


def test_truncated_file_is_refused(bundle_copy):
    path = bundle_copy / "index.faiss"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BundleError, match="index.faiss has 100 bytes.*truncated"):
        load_bundle(bundle_copy)


def test_missing_extra_and_manifest_problems(bundle_copy, tmp_path):
    (bundle_copy / "notes.txt").write_text("hello")
    with pytest.raises(BundleError, match="not in the manifest: notes.txt"):
        verify_bundle(bundle_copy)
    (bundle_copy / "notes.txt").unlink()
    (bundle_copy / "labels.json").unlink()
    with pytest.raises(BundleError, match="labels.json is missing"):
        verify_bundle(bundle_copy)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99"):
        verify_bundle(bundle_copy)
    (bundle_copy / "manifest.json").write_text("{broken")
    with pytest.raises(BundleError, match="not valid JSON"):
        verify_bundle(bundle_copy)
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        verify_bundle(bundle_copy)
    with pytest.raises(BundleError, match="bundle not found"):
        verify_bundle(tmp_path / "nowhere")


def test_write_is_atomic_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "b"

    def failing(folder):
        (folder / "model.keras").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_bundle(out, failing)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half bundle, no temp left

    def fill(folder, **changes):
        (folder / "a.txt").write_text("x")
        spec = {"name": "resnet50", "weights": "none", "input_size": 64, "seed": 0}
        fields = {"bundle_id": "one", "backbone": {"spec": spec, "identity": {"key": "k"}}}
        return {**fields, "embedding": {"dimension": 512}, "counts": {"items": 0}, **changes}

    # A manifest the readers would refuse is never written: the job fails, nothing is left.
    with pytest.raises(BundleError, match=r"manifest.json: counts.items: expected an integer, got 'lots'"):
        write_bundle(out, lambda folder: fill(folder, counts={"items": "lots"}))
    assert not out.exists() and list(tmp_path.iterdir()) == []

    write_bundle(out, fill)
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(out, fill)
    write_bundle(out, fill, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["files"]["a.txt"]["bytes"] == 1


def _rewrite(bundle, name: str, payload) -> None:
    """Replaces a bundle file and re-signs it in the manifest (a consistent, not a tampered, bundle)."""
    from recommender.backbones import file_sha256

    path = bundle / name
    path.write_text(json.dumps(payload))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return manifest


def test_version_1_bundle_still_loads_and_answers(bundle_copy, engine, generated_catalog):
    labels = json.loads((bundle_copy / "labels.json").read_text())
    manifest = _rewrite(bundle_copy, "labels.json", {"columns": labels["columns"], "classes": labels["classes"]})
    manifest["format_version"] = 1
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    old = load_bundle(bundle_copy)
    image = next(generated_catalog.parent.glob("images/*.jpg"))
    assert old.query(image) == {**engine.query(image)}
    assert [h.name for h in old.label_space.heads] == ["head_0", "head_1"]


def test_labels_that_do_not_fit_the_model_are_refused(bundle_copy):
    labels = json.loads((bundle_copy / "labels.json").read_text())
    labels["heads"][0]["classes"] = labels["heads"][0]["classes"][:-1]
    labels["classes"][0] = labels["classes"][0][:-1]
    manifest = _rewrite(bundle_copy, "labels.json", labels)
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="head_0 has 3 classes, the model's output has 4"):
        load_bundle(bundle_copy)
