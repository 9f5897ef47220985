"""Backbones: weights from a file, random init recorded, offline ImageNet error, TFLite extractor."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MOBILENET, skip_without_shared

from recommender.backbones import BackboneSpec, load_backbone
from recommender.errors import BackboneError, WeightsUnavailableError
from recommender.images import load_image


@pytest.fixture(scope="module")
def images(image_files):
    return np.stack([load_image(image_files[name], 32) for name in ("rgb_jpeg", "cmyk_jpeg", "webp")])


def test_weights_file_path_is_loaded(tmp_path, images):
    random_init = load_backbone(BackboneSpec(weights="none", input_size=32, seed=5))
    path = tmp_path / "resnet50.weights.h5"
    random_init.save_weights(path)
    from_file = load_backbone(BackboneSpec(weights=str(path), input_size=32))
    assert from_file.identity["weights"] == "file" and len(from_file.identity["weights_sha256"]) == 64
    assert np.allclose(from_file.extract(images), random_init.extract(images), atol=1e-4)
    other_seed = load_backbone(BackboneSpec(weights="none", input_size=32, seed=6))
    assert other_seed.identity["key"] != random_init.identity["key"]


def test_random_init_is_recorded_and_reproducible(images):
    first = load_backbone(BackboneSpec(weights="none", input_size=32, seed=0))
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
