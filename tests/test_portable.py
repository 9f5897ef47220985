"""Portable bundles (issue 12, case 2) and confined catalog photos (case 6).

A bundle built with a file backbone given by a relative path, moved to another folder after
the original model is gone, answers the same from a third working directory; its copy of the
model is hash-checked; catalog rows leaving the image root are bad rows; the image endpoint
serves a photo only while it is inside the root and unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import MOBILENET, ROOT, shared_present, tiny_build_config

from recommender.errors import BundleError

QUERIES = 3


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """A tflite bundle built from ``shop/`` with ``--backbone tflite:../models/m.tflite`` (a temp
    copy of the shared model), on a 24-photo catalog plus two rows leaving its folder; then the
    bundle is moved and the model copy deleted. Returns a dict of paths and the reference
    answers the bundle gave in place, before anything moved."""
    if not shared_present():
        pytest.skip(f"the portable-bundle tests need the TFLite model {MOBILENET} (the ../shared folder)")
    from indexer.build import build_bundle
    from recommender.engine import load_bundle
    from recommender.synthetic import generate_catalog

    work = tmp_path_factory.mktemp("portable")
    shop, models = work / "shop", work / "models"
    models.mkdir()
    shutil.copy(MOBILENET, models / "m.tflite")
    catalog = generate_catalog(
        shop / "catalog", per_class=3, patterns=("plain", "stripes", "dots", "checks"), colours=("red", "blue"), size=64
    )
    photos = sorted((shop / "catalog" / "images").glob("*.jpg"))
    shutil.copy(photos[0], shop / "secret.png")  # beside the catalog folder, not in it
    shutil.copy(photos[1], work / "outside.png")
    lines = catalog.read_text().splitlines()
    header, first = lines[0].split(","), dict(zip(lines[0].split(","), lines[1].split(",")))
    with open(catalog, "a", encoding="utf-8") as handle:
        for item_id, image in (("evil-relative", "../secret.png"), ("evil-absolute", str(work / "outside.png"))):
            handle.write(",".join({**first, "id": item_id, "file": image}[column] for column in header) + "\n")
    config = tiny_build_config(work / "features.h5")
    config = replace(
        config,
        backbone=replace(config.backbone, name="tflite:../models/m.tflite", weights="imagenet", input_size=224),
        train=replace(config.train, max_epochs=3, baseline=False),  # the answers' equality is tested, not quality
        max_bad_fraction=0.1,
    )
    built = work / "built" / "bundle"
    before = os.getcwd()
    os.chdir(shop)  # the model path is relative to this working directory
    try:
        report = build_bundle(Path("catalog") / "catalog.csv", built, config)
    finally:
        os.chdir(before)
    reference = load_bundle(built)
    queries = [str(path) for path in photos[:QUERIES]]
    answers = [reference.query(path, k=5) for path in queries]
    moved = work / "elsewhere" / "deeper" / "bundle"
    moved.parent.mkdir(parents=True)
    shutil.move(built, moved)
    (models / "m.tflite").unlink()  # the bundle must not need the original any more
    third = work / "x" / "y" / "z"
    third.mkdir(parents=True)
    return {
        "work": work,
        "shop": shop,
        "bundle": moved,
        "third": third,
        "report": report,
        "queries": queries,
        "answers": answers,
        "photos": photos,
    }


@pytest.fixture
def in_third_directory(portable, monkeypatch):
    monkeypatch.chdir(portable["third"])
    return portable["third"]


def test_moved_bundle_answers_the_same_from_a_third_directory(portable, in_third_directory):
    from recommender.bundle import read_manifest
    from recommender.engine import load_bundle
    from webapp import create_app

    bundle = portable["bundle"]
    manifest = read_manifest(bundle)
    assert manifest.format_version == 3
    # The model travels inside the bundle, listed and hashed like every other file.
    assert manifest.backbone.file.path == "backbone/m.tflite"
    assert manifest.backbone.file.source == str(portable["work"].resolve() / "models" / "m.tflite")
    assert manifest.files["backbone/m.tflite"].sha256 == manifest.backbone.identity["weights_sha256"]
    assert manifest.backbone.name == f"tflite:{manifest.backbone.file.source}"  # resolved at build time
    assert manifest.backbone.identity["file"] == "m.tflite"  # the copy keeps the name the identity key holds
    assert manifest.catalog.image_root == str((portable["shop"] / "catalog").resolve())
    assert Path(manifest.catalog.source).is_absolute()

    engine = load_bundle(bundle)
    assert engine.backbone.model_file == bundle.resolve() / "backbone" / "m.tflite"
    assert [engine.query(path, k=5) for path in portable["queries"]] == portable["answers"]

    client = create_app({"bundle": str(bundle), "reload_interval_s": 0}).test_client()
    with open(portable["queries"][0], "rb") as photo:
        response = client.post("/api/v1/similar?k=5", data=photo.read(), content_type="image/jpeg")
    assert response.status_code == 200, response.get_json()
    served = [neighbor["id"] for neighbor in response.get_json()["neighbors"]]
    assert served == [neighbor["id"] for neighbor in portable["answers"][0]["neighbors"]]
    first = engine.rows[0]
    image = client.get(f"/catalog/{first.id}/image")
    assert image.status_code == 200 and image.data == Path(first.path).read_bytes()


def test_cli_query_from_a_third_directory(portable, in_third_directory):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-m", "recommender", "query", "--bundle", str(portable["bundle"]), "--k", "5",
         *portable["queries"]],
        capture_output=True, text=True, env=env, timeout=180, cwd=in_third_directory,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [json.loads(line) for line in done.stdout.strip().splitlines()]
    for answer, expected in zip(answers, portable["answers"], strict=True):
        assert answer["predicted"].keys() == expected["predicted"].keys()
        for column, predicted in answer["predicted"].items():
            assert predicted["label"] == expected["predicted"][column]["label"]
            assert predicted["probability"] == pytest.approx(expected["predicted"][column]["probability"], abs=1e-5)
        assert [n["id"] for n in answer["neighbors"]] == [n["id"] for n in expected["neighbors"]]
        distances = [n["distance"] for n in expected["neighbors"]]
        assert [n["distance"] for n in answer["neighbors"]] == pytest.approx(distances, abs=1e-4)


def test_rows_leaving_the_catalog_folder_are_bad_rows_not_built(portable):
    report = portable["report"]
    root = (portable["shop"] / "catalog").resolve()
    reasons = {row["id"]: row["reason"] for row in report.bad_rows}
    assert reasons == {
        "evil-relative": f"image path resolves to {portable['shop'].resolve() / 'secret.png'}, "
        f"outside the image root {root} (see --image-root)",
        "evil-absolute": f"image path resolves to {portable['work'].resolve() / 'outside.png'}, "
        f"outside the image root {root} (see --image-root)",
    }
    assert report.items == 24 and report.total_rows == 26
    rows = [json.loads(line) for line in (portable["bundle"] / "catalog.jsonl").read_text().splitlines()]
    assert all(Path(row["path"]).is_relative_to(root) and Path(row["path"]).is_absolute() for row in rows)
    assert all(row["bytes"] == Path(row["path"]).stat().st_size for row in rows)


def _copy(bundle: Path, target: Path) -> Path:
    shutil.copytree(bundle, target)
    return target


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_tampered_or_misplaced_backbone_copy_is_refused(portable, tmp_path):
    from recommender.engine import load_bundle

    tampered = _copy(portable["bundle"], tmp_path / "tampered")
    model = tampered / "backbone" / "m.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="file backbone/m.tflite does not match its sha256"):
        load_bundle(tampered)

    misplaced = _copy(portable["bundle"], tmp_path / "misplaced")
    manifest = _manifest(misplaced)
    manifest["backbone"]["file"]["path"] = "../m.tflite"  # would load a file outside, unhashed
    (misplaced / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"backbone.file.path '../m.tflite' is not a path under backbone/"):
        load_bundle(misplaced)


def test_format_2_bundle_with_a_relative_model_path(portable, tmp_path, monkeypatch):
    """A bundle from before format 3 names its model by the build's relative path: it loads from
    a directory where that path leads to the model, and fails elsewhere with one BundleError."""
    from recommender.engine import load_bundle

    old = _copy(portable["bundle"], tmp_path / "old")
    manifest = _manifest(old)
    manifest["format_version"] = 2
    del manifest["backbone"]["file"], manifest["files"]["backbone/m.tflite"]
    manifest["backbone"]["spec"]["name"] = "tflite:../models/m.tflite"
    (old / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(old / "backbone")
    monkeypatch.chdir(portable["third"])
    with pytest.raises(BundleError, match=r"TFLite model not found: \.\./models/m\.tflite; a format 2 bundle names"):
        load_bundle(old)
    (tmp_path / "models").mkdir()
    shutil.copy(MOBILENET, tmp_path / "models" / "m.tflite")
    monkeypatch.chdir(tmp_path / "old")  # ../models/m.tflite is there from this directory
    assert load_bundle(old).query(portable["queries"][0], k=5) == portable["answers"][0]


def test_explicit_weights_file_travels_in_the_bundle(tmp_path, image_files, monkeypatch):
    """--weights PATH (a small MobileNetV2 weights file): copied into the bundle, used from there."""
    from indexer.build import build_bundle
    from recommender.backbones import BackboneSpec, file_sha256, load_backbone
    from recommender.bundle import read_manifest
    from recommender.engine import load_bundle
    from recommender.synthetic import generate_catalog

    catalog = generate_catalog(
        tmp_path / "catalog", per_class=2, patterns=("plain", "stripes"), colours=("red", "blue"), size=32
    )
    spec = BackboneSpec(name="mobilenet_v2", weights="none", input_size=32, seed=3)
    weights = tmp_path / "weights" / "mobilenet.weights.h5"
    weights.parent.mkdir()
    load_backbone(spec).save_weights(weights)
    monkeypatch.chdir(tmp_path)
    config = tiny_build_config(tmp_path / "features.h5")
    config = replace(
        config,
        backbone=replace(spec, weights="weights/mobilenet.weights.h5"),  # relative to the build's cwd
        train=replace(config.train, max_epochs=2, baseline=False),
        flips=False,
        flip_average=False,
    )
    build_bundle(catalog, tmp_path / "bundle", config)
    manifest = read_manifest(tmp_path / "bundle")
    assert manifest.backbone.weights == str(weights.resolve())
    assert manifest.backbone.file.path == "backbone/mobilenet.weights.h5"
    assert manifest.files["backbone/mobilenet.weights.h5"].sha256 == file_sha256(weights)
    expected = load_bundle(tmp_path / "bundle").query(image_files["rgb_jpeg"], k=3)
    shutil.rmtree(tmp_path / "weights")
    shutil.move(tmp_path / "bundle", tmp_path / "moved")
    assert load_bundle(tmp_path / "moved").query(image_files["rgb_jpeg"], k=3) == expected


# -- serving catalog photos (last: it changes photos of the module's catalog) ------------------


def test_image_endpoint_serves_only_unchanged_photos_inside_the_root(portable, tmp_path):
    from recommender.manifest import CatalogRecord
    from webapp import create_app

    bundle = portable["bundle"]
    client = create_app({"bundle": str(bundle), "reload_interval_s": 0}).test_client()
    rows = [CatalogRecord.from_json(json.loads(line)) for line in (bundle / "catalog.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row.path not in portable["queries"]]
    unchanged, linked_out, same_size, in_place, inner_link, removed = rows[:6]

    response = client.get(f"/catalog/{unchanged.id}/image")
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    assert response.data == Path(unchanged.path).read_bytes() and response.headers["ETag"] == f'"{unchanged.sha256}"'
    assert client.get(f"/catalog/{unchanged.id}/image", headers={"If-None-Match": unchanged.sha256}).status_code == 304
    for item_id in ("evil-relative", "evil-absolute"):  # left out at build time: no such item
        assert client.get(f"/catalog/{item_id}/image").status_code == 404

    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    Path(linked_out.path).unlink()
    Path(linked_out.path).symlink_to(secret)
    response = client.get(f"/catalog/{linked_out.id}/image")
    assert response.status_code == 403 and b"root:x" not in response.data
    assert "outside the image root of the catalog" in response.get_data(as_text=True)
    api_style = client.get(f"/catalog/{linked_out.id}/image", headers={"Accept": "application/json"})
    assert b"root:x" not in api_style.data

    # Same size, other bytes, written to a new file renamed over the photo (what most tools do).
    client.get(f"/catalog/{same_size.id}/image")  # verified once: a later change is still caught
    data = Path(same_size.path).read_bytes()
    fresh = Path(same_size.path).with_suffix(".new")
    fresh.write_bytes(data[:-3] + bytes(255 - b for b in data[-3:]))
    os.replace(fresh, same_size.path)
    response = client.get(f"/catalog/{same_size.id}/image")
    assert response.status_code == 404 and "changed since the bundle was built" in response.get_data(as_text=True)

    # Rewritten in place with the same size, before any request verified it.
    data = Path(in_place.path).read_bytes()
    with open(in_place.path, "r+b") as handle:
        handle.write(bytes(255 - b for b in data[:3]))
    assert client.get(f"/catalog/{in_place.id}/image").status_code == 404

    # A symlink to another photo inside the root: allowed by the root, refused by size or hash.
    Path(inner_link.path).unlink()
    Path(inner_link.path).symlink_to(unchanged.path)
    assert client.get(f"/catalog/{inner_link.id}/image").status_code == 404

    Path(removed.path).unlink()
    assert client.get(f"/catalog/{removed.id}/image").status_code == 404
    assert client.get(f"/catalog/{unchanged.id}/image").status_code == 200


def test_open_catalog_image_refuses_with_a_typed_reason(portable, tmp_path):
    """The library function the endpoint uses: each refusal a CatalogImageError with its reason."""
    from recommender.catalog import open_catalog_image
    from recommender.errors import CatalogImageError
    from recommender.manifest import CatalogRecord

    root = tmp_path / "root"
    root.mkdir()
    photo = root / "a.jpg"
    shutil.copy(portable["photos"][0], photo)
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    record = CatalogRecord(
        id="a", image="a.jpg", path=str(photo.resolve()), sha256=digest, labels={}, bytes=photo.stat().st_size
    )
    assert open_catalog_image(record, str(root.resolve())).data == photo.read_bytes()
    with pytest.raises(CatalogImageError, match="outside the image root") as refused:
        open_catalog_image(record, str((tmp_path / "elsewhere").resolve()))
    assert refused.value.reason == "outside_root"
    # A folder on the way replaced by a symlink leaving the root.
    (root / "sub").mkdir()
    inner = root / "sub" / "b.jpg"
    shutil.copy(photo, inner)
    nested = replace(record, path=str(inner.resolve()))
    assert open_catalog_image(nested, str(root.resolve())).data == photo.read_bytes()
    outside = tmp_path / "outside"
    shutil.move(root / "sub", outside)
    (root / "sub").symlink_to(outside)
    with pytest.raises(CatalogImageError) as refused:
        open_catalog_image(nested, str(root.resolve()))
    assert refused.value.reason == "outside_root"
    photo.write_bytes(photo.read_bytes() + b"x")
    with pytest.raises(CatalogImageError, match=r"has \d+ bytes, the bundle recorded") as refused:
        open_catalog_image(record, str(root.resolve()))
    assert refused.value.reason == "changed"


def _legacy_weights_file(path: Path, seed: int) -> None:
    """Writes a random-init MobileNetV2 (96 px, no top) in the legacy HDF5 layout Keras's ImageNet files use."""
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    from recommender.backbones import BackboneSpec, load_backbone

    model = load_backbone(BackboneSpec(name="mobilenet_v2", weights="none", input_size=96, seed=seed)).model
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        save_weights_to_hdf5_group(handle, model)


def test_imagenet_weights_are_identified_by_the_cached_files_hash(tmp_path, monkeypatch):
    """No download here: a stand-in file sits in a Keras cache ($KERAS_HOME) under the ImageNet name
    (mobilenet_v2's files have no published hash for Keras to check). Its sha256 is what the
    identity records, and a bundle meeting another cached file is refused naming both hashes."""
    from recommender.backbones import KERAS_APPLICATIONS, BackboneSpec, file_sha256, load_backbone
    from recommender.bundle import load_bundle_backbone
    from recommender.manifest import Manifest

    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(tmp_path / "keras"))
    application = next(row for row in KERAS_APPLICATIONS if row.name == "mobilenet_v2")
    cached = tmp_path / "keras" / "models" / application.weights_file_for(96)
    _legacy_weights_file(cached, seed=1)
    spec = BackboneSpec(name="mobilenet_v2", weights="imagenet", input_size=96)
    backbone = load_backbone(spec)
    assert backbone.identity["weights"] == "imagenet" and backbone.model_file is None  # not copied into bundles
    assert backbone.identity["weights_sha256"] == file_sha256(cached)
    fields = {
        "format_version": 3,
        "bundle_id": "imagenet",
        "backbone": {"spec": {"name": "mobilenet_v2", "weights": "imagenet", "input_size": 96, "seed": 0},
                     "identity": backbone.identity},
        "embedding": {"dimension": 512},
        "counts": {"items": 0},
        "files": {},
    }  # fmt: skip
    manifest = Manifest.from_json(fields)
    assert load_bundle_backbone(tmp_path, manifest).identity == backbone.identity
    recorded = file_sha256(cached)
    _legacy_weights_file(cached, seed=2)  # another file under the same name in this machine's cache
    with pytest.raises(
        BundleError, match=f"Keras cache have sha256 {file_sha256(cached)}, the bundle was built with {recorded}"
    ):
        load_bundle_backbone(tmp_path, manifest)
