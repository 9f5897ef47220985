"""Backbone registry: image batches (n, s, s, 3) uint8 -> features (n, d) float32.

Two kinds are registered:

- ``resnet50`` (default): ``keras.applications.ResNet50(include_top=False, pooling="avg")``,
  2048 features, ``resnet50.preprocess_input`` applied inside the compiled call. Weights are
  ``imagenet`` (Keras download/cache), a local weights file, or ``none`` (random init, only
  when asked; the random weights are saved in the bundle so queries see the same network).
- ``tflite:PATH``: any TFLite image feature extractor, e.g. the quantized MobileNet in
  ``../shared/models`` (uint8 in, uint8 out: the output is dequantized).

TensorFlow is imported only inside this module's functions so that catalog, image, index and
bundle code load fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recommender.errors import BackboneError, WeightsUnavailableError

RESNET50_WEIGHTS_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
RESNET50_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + RESNET50_WEIGHTS_FILE


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Returns the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class BackboneSpec:
    """What a bundle records to re-create its backbone.

    Attributes:
        name: ``resnet50`` or ``tflite:PATH`` (as given by the user).
        weights: ``imagenet``, ``none`` or a weights file path (resnet50 only).
        input_size: side of the square image the backbone takes.
        seed: seed of the random init when ``weights == "none"``.
    """

    name: str = "resnet50"
    weights: str = "imagenet"
    input_size: int = 224
    seed: int = 0


class Backbone:
    """A loaded feature extractor. Subclasses implement :meth:`_forward`.

    Attributes:
        spec: how it was asked for.
        identity: JSON-ready description (kind, weights identity, sha256s, sizes), recorded in
            the bundle manifest; ``identity["key"]`` keys the feature store.
        input_size: side of the square input, pixels.
        feature_dim: number of features per image.
    """

    spec: BackboneSpec
    identity: dict
    input_size: int
    feature_dim: int

    def extract(self, images: np.ndarray) -> np.ndarray:
        """Runs the backbone on a batch.

        Args:
            images: (n, s, s, 3) uint8 RGB, as made by ``images.load_image``.

        Returns:
            (n, feature_dim) float32.
        """
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (self.input_size, self.input_size, 3):
            raise BackboneError(
                f"backbone expects (n, {self.input_size}, {self.input_size}, 3) uint8, got {images.shape}"
            )
        if len(images) == 0:
            return np.zeros((0, self.feature_dim), np.float32)
        return np.asarray(self._forward(images), dtype=np.float32)

    def _forward(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


def _identity_key(identity: dict) -> str:
    fields = {k: v for k, v in identity.items() if k != "key"}
    text = ";".join(f"{k}={fields[k]}" for k in sorted(fields))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class KerasResNet50(Backbone):
    """ResNet50 from keras.applications, batched through one ``tf.function``."""

    def __init__(self, spec: BackboneSpec, random_weights_path: str | os.PathLike | None = None):
        """Builds the network.

        Args:
            spec: the backbone spec; ``spec.weights`` is ``imagenet``, ``none`` or a file path.
            random_weights_path: for ``weights="none"`` when loading a bundle: the saved
                random weights, so the bundle's network is the one it was built with.

        Raises:
            WeightsUnavailableError: ImageNet weights could not be downloaded or read.
        """
        import keras
        import tensorflow as tf

        self.spec = spec
        self.input_size = spec.input_size
        self.feature_dim = 2048
        shape = (spec.input_size, spec.input_size, 3)
        identity = {"kind": "resnet50", "input_size": spec.input_size, "feature_dim": 2048}
        if spec.weights == "imagenet":
            try:
                # Keras reports the download on stdout, which the CLI keeps for JSON answers.
                with contextlib.redirect_stdout(sys.stderr):
                    model = keras.applications.ResNet50(
                        include_top=False, pooling="avg", weights="imagenet", input_shape=shape
                    )
            except Exception as error:  # network errors come in many types (URLError, OSError, ...)
                raise WeightsUnavailableError(
                    f"could not get the ImageNet weights for ResNet50 ({type(error).__name__}: {error}); "
                    f"on a machine with internet download {RESNET50_WEIGHTS_URL} and pass "
                    f"--weights PATH (or put it in ~/.keras/models/), or use --weights none for "
                    f"random init (poor quality) or --backbone tflite:PATH"
                ) from None
            cached = Path(keras.config.keras_home() if hasattr(keras.config, "keras_home") else "~/.keras") / "models"
            cached = cached.expanduser() / RESNET50_WEIGHTS_FILE
            identity["weights"] = "imagenet"
            identity["weights_sha256"] = file_sha256(cached) if cached.exists() else None
        elif spec.weights == "none":
            if random_weights_path is not None:
                model = keras.applications.ResNet50(include_top=False, pooling="avg", weights=None, input_shape=shape)
                model.load_weights(random_weights_path)
            else:
                keras.utils.set_random_seed(spec.seed)
                model = keras.applications.ResNet50(include_top=False, pooling="avg", weights=None, input_shape=shape)
            identity["weights"] = "none (random init)"
            identity["seed"] = spec.seed
            identity["weights_sha256"] = _weights_digest(model)
        else:
            path = Path(spec.weights).expanduser()
            if not path.is_file():
                raise WeightsUnavailableError(f"weights file not found: {path}")
            try:
                model = keras.applications.ResNet50(
                    include_top=False, pooling="avg", weights=str(path), input_shape=shape
                )
            except Exception as error:
                raise WeightsUnavailableError(
                    f"cannot load ResNet50 weights from {path} ({type(error).__name__}: {error}); "
                    f"expected the no-top file {RESNET50_WEIGHTS_FILE}"
                ) from None
            identity["weights"] = "file"
            identity["weights_sha256"] = file_sha256(path)
        identity["key"] = _identity_key(identity)
        self.identity = identity
        self.model = model
        preprocess = keras.applications.resnet50.preprocess_input

        @tf.function(input_signature=[tf.TensorSpec([None, *shape], tf.uint8)], reduce_retracing=True)
        def forward(batch):
            return model(preprocess(tf.cast(batch, tf.float32)), training=False)

        self._compiled = forward

    def _forward(self, images: np.ndarray) -> np.ndarray:
        return self._compiled(images).numpy()

    def save_weights(self, path: str | os.PathLike) -> None:
        """Saves the network's weights (used for random-init backbones in bundles)."""
        self.model.save_weights(str(path))


def _weights_digest(model) -> str:
    """sha256 over all weight arrays: identifies a random-init network exactly."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


class TFLiteBackbone(Backbone):
    """A TFLite image feature extractor (uint8 or float input), one interpreter per thread size.

    The interpreter is not thread-safe, so calls are serialised with a lock; batches are run by
    resizing the input tensor to the batch size (re-allocating only when the size changes).
    """

    def __init__(self, spec: BackboneSpec, num_threads: int | None = None):
        path = Path(spec.name.split(":", 1)[1]).expanduser()
        if not path.is_file():
            raise BackboneError(f"TFLite model not found: {path}")
        interpreter_class = _tflite_interpreter_class()
        try:
            with warnings.catch_warnings():
                # TF 2.20+ announces that tf.lite.Interpreter moves to ai_edge_litert.
                warnings.simplefilter("ignore", UserWarning)
                self._interpreter = interpreter_class(
                    model_path=str(path), num_threads=num_threads or os.cpu_count() or 1
                )
        except Exception as error:
            raise BackboneError(f"cannot load TFLite model {path}: {error}") from None
        self._lock = threading.Lock()
        self._batch = None
        input_detail = self._interpreter.get_input_details()[0]
        output_detail = self._interpreter.get_output_details()[0]
        size = int(input_detail["shape"][1])
        self.spec = BackboneSpec(name=spec.name, weights="file", input_size=size, seed=spec.seed)
        self.input_size = size
        self.feature_dim = int(np.prod(output_detail["shape"][1:]))
        self._input_dtype = input_detail["dtype"]
        self._input_index = input_detail["index"]
        self._output_index = output_detail["index"]
        self._out_scale, self._out_zero = output_detail["quantization"]
        identity = {
            "kind": "tflite",
            "file": path.name,
            "weights": "file",
            "weights_sha256": file_sha256(path),
            "input_size": size,
            "feature_dim": self.feature_dim,
        }
        identity["key"] = _identity_key(identity)
        self.identity = identity

    def _forward(self, images: np.ndarray) -> np.ndarray:
        if self._input_dtype == np.uint8:
            batch = images
        else:
            # Float-input extractors conventionally take [-1, 1] (MobileNet/EfficientNet-lite).
            batch = images.astype(np.float32) / 127.5 - 1.0
        with self._lock:
            if self._batch != len(batch):
                self._interpreter.resize_tensor_input(self._input_index, list(batch.shape))
                self._interpreter.allocate_tensors()
                self._batch = len(batch)
            self._interpreter.set_tensor(self._input_index, batch)
            self._interpreter.invoke()
            raw = self._interpreter.get_tensor(self._output_index)
        features = raw.reshape(len(batch), -1).astype(np.float32)
        if self._out_scale:
            features = (features - self._out_zero) * self._out_scale
        return features


def _tflite_interpreter_class():
    try:  # the successor package, where installed
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        import tensorflow as tf

        return tf.lite.Interpreter


def load_backbone(spec: BackboneSpec, *, random_weights_path: str | os.PathLike | None = None) -> Backbone:
    """Creates the backbone a spec names.

    Args:
        spec: ``resnet50`` or ``tflite:PATH`` plus weights and input size.
        random_weights_path: saved random-init weights (bundles built with ``--weights none``).

    Raises:
        BackboneError: unknown name or unreadable model file.
        WeightsUnavailableError: pretrained weights cannot be had.
    """
    if spec.name == "resnet50":
        return KerasResNet50(spec, random_weights_path=random_weights_path)
    if spec.name.startswith("tflite:"):
        return TFLiteBackbone(spec)
    raise BackboneError(f"unknown backbone {spec.name!r}: use 'resnet50' or 'tflite:PATH'")
