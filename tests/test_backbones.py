"""Backbones: every registered one extracts, weights from a file, random init recorded, offline
ImageNet error, TFLite extractor, identities recorded in bundles unchanged."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from conftest import MOBILENET, skip_without_shared

from recommender.backbones import KERAS_APPLICATIONS, BackboneSpec, list_backbones, load_backbone, register_backbone
from recommender.errors import BackboneError, WeightsUnavailableError
from recommender.images import load_image


@pytest.fixture(scope="module")
def images(image_files):
    return np.stack([load_image(image_files[name], 32) for name in ("rgb_jpeg", "cmyk_jpeg", "webp")])


@pytest.fixture(scope="module")
def random_resnet():
    """ResNet50, random init with seed 0, at 32 px (built once: each build takes seconds)."""
    return load_backbone(BackboneSpec(weights="none", input_size=32, seed=0))


def _registered_spec(name: str) -> BackboneSpec:
    """A spec for a registered name: Keras ones random-init at 32 px, file-backed ones the shared model."""
    if name == "tflite:PATH":
        if not MOBILENET.is_file():
            pytest.skip(f"the TFLite backbone needs {MOBILENET} (the ../shared folder)")
        return BackboneSpec(name=f"tflite:{MOBILENET}")
    return BackboneSpec(name=name, weights="none", input_size=32, seed=0)


@pytest.mark.parametrize("name", list(list_backbones()))
def test_every_registered_backbone_extracts_features(name, image_files):
    backbone = load_backbone(_registered_spec(name))
    size = backbone.input_size
    batch = np.stack([load_image(image_files[key], size) for key in ("rgb_jpeg", "cmyk_jpeg", "webp", "tiny")])
    assert batch.shape == (4, size, size, 3) and batch.dtype == np.uint8
    features = backbone.extract(batch)
    table_width = {row.name: row.feature_dim for row in KERAS_APPLICATIONS}.get(name, backbone.feature_dim)
    assert features.shape == (4, table_width) and features.dtype == np.float32
    assert np.isfinite(features).all()
    assert np.array_equal(backbone.extract(batch), features)  # deterministic: inference mode, no dropout
    assert (features.max(axis=0) > features.min(axis=0)).any()  # the images are told apart


def test_registry_lists_names_and_refuses_unknown_ones():
    registered = list_backbones()
    assert next(iter(registered)) == BackboneSpec().name  # the default comes first
    assert {"resnet50", "tflite:PATH"} <= set(registered) and all(registered.values())
    for name in ("vgg", "tflite", "resnet50:model.h5"):
        with pytest.raises(BackboneError, match=f"unknown backbone '{name}'") as error:
            load_backbone(BackboneSpec(name=name))
        assert all(registered_name in str(error.value) for registered_name in registered)
    with pytest.raises(ValueError, match="taken"):
        register_backbone("resnet50", "a second ResNet50", lambda spec, random_weights_path=None: None)


def _key_as_bundles_record_it(identity: dict) -> str:
    """The feature-store/manifest key, spelled out: sorted ``k=v`` pairs joined by ``;``, sha256, 16 hex."""
    text = ";".join(f"{k}={identity[k]}" for k in sorted(identity) if k != "key")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_identity_recorded_in_bundles_is_unchanged(random_resnet):
    # Bundles and feature stores built before the registry hold these values; a change orphans them.
    identity = dict(random_resnet.identity)
    assert len(identity.pop("weights_sha256")) == 64
    assert identity.pop("key") == _key_as_bundles_record_it(random_resnet.identity)
    assert identity == {
        "kind": "resnet50",
        "input_size": 32,
        "feature_dim": 2048,
        "weights": "none (random init)",
        "seed": 0,
    }
    if MOBILENET.is_file():  # the shared model's file is fixed, and so is the key its bundles record
        tflite = load_backbone(BackboneSpec(name=f"tflite:{MOBILENET}"))
        assert tflite.identity["key"] == "90a3971b8226bb42" == _key_as_bundles_record_it(tflite.identity)


def test_weights_file_path_is_loaded(tmp_path, images):
    random_init = load_backbone(BackboneSpec(weights="none", input_size=32, seed=5))
    path = tmp_path / "resnet50.weights.h5"
    random_init.save_weights(path)
    from_file = load_backbone(BackboneSpec(weights=str(path), input_size=32))
    assert from_file.identity["weights"] == "file" and len(from_file.identity["weights_sha256"]) == 64
    assert np.allclose(from_file.extract(images), random_init.extract(images), atol=1e-4)
    other_seed = load_backbone(BackboneSpec(weights="none", input_size=32, seed=6))
    assert other_seed.identity["key"] != random_init.identity["key"]


def test_random_init_is_recorded_and_reproducible(images, random_resnet):
    first = random_resnet
    second = load_backbone(BackboneSpec(weights="none", input_size=32, seed=0))
    assert first.identity["weights"] == "none (random init)" and first.identity["seed"] == 0
    assert first.identity["key"] == second.identity["key"]
    features = first.extract(images)
    assert features.shape == (3, 2048) and features.dtype == np.float32
    assert np.isfinite(features).all()


def test_bad_weights_and_names(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="weights file not found"):
        load_backbone(BackboneSpec(weights=str(tmp_path / "missing.h5"), input_size=32))
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not hdf5")
    with pytest.raises(WeightsUnavailableError, match="cannot load ResNet50 weights"):
        load_backbone(BackboneSpec(weights=str(broken), input_size=32))
    with pytest.raises(BackboneError, match="unknown backbone 'vgg'"):
        load_backbone(BackboneSpec(name="vgg"))
    with pytest.raises(BackboneError, match="TFLite model not found"):
        load_backbone(BackboneSpec(name=f"tflite:{tmp_path / 'none.tflite'}"))


def test_imagenet_without_internet_is_a_clear_error():
    from pathlib import Path

    import keras

    cached = Path(keras.config.keras_home() if hasattr(keras.config, "keras_home") else "~/.keras").expanduser()
    if (cached / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5").exists():
        pytest.skip("ImageNet weights are in the Keras cache here")
    try:
        load_backbone(BackboneSpec(weights="imagenet", input_size=32))
    except WeightsUnavailableError as error:
        message = str(error)
        assert "could not get the ImageNet weights" in message and "--weights PATH" in message
        assert "\n" not in message  # one line for the CLI
    else:
        pytest.skip("this machine could download the ImageNet weights")


def test_tflite_extractor_batches_and_dequantizes(image_files):
    skip_without_shared()
    backbone = load_backbone(BackboneSpec(name=f"tflite:{MOBILENET}"))
    assert backbone.input_size == 224 and backbone.feature_dim == 1024
    batch = np.stack([load_image(image_files[name], 224) for name in ("rgb_jpeg", "cmyk_jpeg", "webp", "tiny")])
    together = backbone.extract(batch)
    one_by_one = np.concatenate([backbone.extract(batch[i : i + 1]) for i in range(len(batch))])
    assert together.dtype == np.float32 and together.shape == (4, 1024)
    assert np.allclose(together, one_by_one, atol=1e-5)
    assert together.min() >= 0 and 0 < together.max() < 256 * 0.0236  # dequantized with the output scale
    with pytest.raises(BackboneError, match="expects"):
        backbone.extract(batch[:, :100])


def test_both_tflite_runtimes_give_the_same_features(image_files, tmp_path):
    """ai-edge-litert (no TensorFlow import) and tf.lite, its fallback, agree bit for bit on the shared model."""
    skip_without_shared()
    if importlib.util.find_spec("ai_edge_litert") is None:
        pytest.skip("ai-edge-litert is not installed here (no wheel for this platform): tf.lite is the only runtime")
    batch = np.stack([load_image(image_files[name], 224) for name in ("rgb_jpeg", "cmyk_jpeg", "webp", "tiny")])
    np.save(tmp_path / "batch.npy", batch)
    code = f"""
import sys
sys.modules["ai_edge_litert"] = None  # import fails: the fallback runs
import numpy as np
from recommender.backbones import BackboneSpec, load_backbone
backbone = load_backbone(BackboneSpec(name={f"tflite:{MOBILENET}"!r}))
assert type(backbone._interpreter).__module__.startswith("tensorflow"), type(backbone._interpreter)
np.save({str(tmp_path / "tf_lite.npy")!r}, backbone.extract(np.load({str(tmp_path / "batch.npy")!r})))
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    litert = load_backbone(BackboneSpec(name=f"tflite:{MOBILENET}"))
    assert type(litert._interpreter).__module__.startswith("ai_edge_litert")
    assert np.array_equal(litert.extract(batch), np.load(tmp_path / "tf_lite.npy"))
