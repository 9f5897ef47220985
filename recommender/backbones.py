"""Backbone registry: image batches (n, s, s, 3) uint8 -> features (n, d) float32.

In the spirit of timm (``register_model`` / ``list_models`` / ``create_model``): every backbone
is registered under a name with a one-line description, :func:`list_backbones` lists them and
:func:`load_backbone` creates one from a :class:`BackboneSpec`. Two kinds are registered:

- Keras applications, one row each of :data:`KERAS_APPLICATIONS`: ``resnet50`` (the default)
  and ``mobilenet_v2``. Each row carries its constructor, feature width, default input size,
  ``preprocess_input`` (applied inside the compiled call) and where its ImageNet no-top weights
  come from. Weights are ``imagenet`` (Keras download/cache, identified by the cached file's
  sha256), a local weights file, or ``none`` (random init, only when asked; the random weights
  are saved in the bundle so queries see the same network).
- ``tflite:PATH``, file-backed: any TFLite image feature extractor, e.g. the quantized
  MobileNet in ``../shared/models`` (uint8 in, uint8 out: the output is dequantized).

TensorFlow is imported only inside this module's functions so that catalog, image, index and
bundle code load fast; the table therefore names Keras constructors rather than holding them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from recommender.errors import BackboneError, WeightsUnavailableError
from recommender.quiet import native_log_filtered


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
        name: a registered name (``resnet50``, ``mobilenet_v2``) or ``tflite:PATH``, as given
            by the user; see :func:`list_backbones`.
        weights: ``imagenet``, ``none`` or a weights file path (Keras applications only).
        input_size: side of the square image the backbone takes.
        seed: seed of the random init when ``weights == "none"``.
    """

    name: str = "resnet50"
    weights: str = "imagenet"
    input_size: int = 224
    seed: int = 0


def resolved_spec(spec: BackboneSpec) -> BackboneSpec:
    """The spec with its file path (``tflite:PATH`` or a weights file) made absolute, ``~`` and
    symlinks resolved: a bundle records where the file was, not where it was relative to the
    working directory of the build."""
    kind, colon, path = spec.name.partition(":")
    if colon and path:
        return replace(spec, name=f"{kind}:{os.path.realpath(Path(path).expanduser())}")
    if spec.weights not in ("imagenet", "none", "file"):
        return replace(spec, weights=os.path.realpath(Path(spec.weights).expanduser()))
    return spec


class Backbone:
    """A loaded feature extractor. Subclasses implement :meth:`_forward`.

    Attributes:
        spec: how it was asked for.
        identity: JSON-ready description (kind, weights identity, sha256s, sizes), recorded in
            the bundle manifest; ``identity["key"]`` keys the feature store.
        input_size: side of the square input, pixels.
        feature_dim: number of features per image.
        model_file: the file the network was loaded from that a bundle must carry to re-create
            it (a TFLite model or an explicit weights file), absolute; None for ImageNet
            weights (the Keras cache's file, identified by ``identity["weights_sha256"]``) and
            random init (saved with :meth:`KerasApplicationBackbone.save_weights`).
    """

    spec: BackboneSpec
    identity: dict
    input_size: int
    feature_dim: int
    model_file: Path | None = None

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


@dataclass(frozen=True)
class KerasApplication:
    """One ``keras.applications`` network as a backbone: its row of :data:`KERAS_APPLICATIONS`.

    Attributes:
        name: registry name, as given to ``--backbone``. It is recorded in bundles as the spec
            name and as the identity's ``kind`` (which keys the feature store), so renaming a
            row orphans the bundles and cached features built with it.
        constructor: attribute of ``keras.applications`` that builds the network
            (``"ResNet50"``); called with ``include_top=False, pooling="avg"``.
        preprocessing: submodule of ``keras.applications`` whose ``preprocess_input`` the
            ImageNet weights were trained with (``"resnet50"``: caffe-style BGR mean
            subtraction; ``"mobilenet_v2"``: scale to [-1, 1]).
        feature_dim: width of the pooled features; checked against the built network.
        input_size: side the ImageNet weights were trained at, pixels (the default size).
        weights_file: file name of the no-top ImageNet weights in the Keras cache
            (``~/.keras/models/``); ``{size}`` stands for the weights' input size where Keras
            publishes one file per size.
        weights_base_url: the folder Keras downloads ``weights_file`` from.
        weights_hash: digest Keras checks the download against (``keras.utils.get_file`` takes
            md5 or sha256; Keras publishes md5 for these files), or None where Keras checks none.
        weights_sizes: input sizes with their own weights file (``{size}`` files only); any
            other size gets the ``input_size`` file, as Keras does.
    """

    name: str
    constructor: str
    preprocessing: str
    feature_dim: int
    input_size: int
    weights_file: str
    weights_base_url: str
    weights_hash: str | None = None
    weights_sizes: tuple[int, ...] = ()

    @property
    def description(self) -> str:
        """One line for ``--backbone`` help and :func:`list_backbones`."""
        return (
            f"keras.applications.{self.constructor}, {self.feature_dim} features, "
            f"ImageNet weights at {self.input_size} px"
        )

    def weights_file_for(self, input_size: int) -> str:
        """Name of the no-top ImageNet weights file Keras uses at this input size."""
        size = input_size if input_size in self.weights_sizes else self.input_size
        return self.weights_file.format(size=size)


# Adding a Keras application is one row here; the loop at the end of the module registers it.
# The first row is the default backbone (``BackboneSpec.name``).
KERAS_APPLICATIONS: tuple[KerasApplication, ...] = (
    KerasApplication(
        name="resnet50",
        constructor="ResNet50",
        preprocessing="resnet50",
        feature_dim=2048,
        input_size=224,
        weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weights_base_url="https://storage.googleapis.com/tensorflow/keras-applications/resnet/",
        weights_hash="4d473c1dd8becc155b73f8504c6f6626",  # md5, from keras.applications.resnet
    ),
    KerasApplication(
        name="mobilenet_v2",
        constructor="MobileNetV2",
        preprocessing="mobilenet_v2",
        feature_dim=1280,
        input_size=224,
        weights_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5",
        weights_base_url="https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/",
        weights_sizes=(96, 128, 160, 192, 224),
    ),
)


class KerasApplicationBackbone(Backbone):
    """A ``keras.applications`` network (one :class:`KerasApplication` row), batched through one ``tf.function``."""

    def __init__(
        self,
        spec: BackboneSpec,
        random_weights_path: str | os.PathLike | None = None,
        *,
        application: KerasApplication,
    ):
        """Builds the network.

        Args:
            spec: the backbone spec; ``spec.weights`` is ``imagenet``, ``none`` or a file path.
            random_weights_path: for ``weights="none"`` when loading a bundle: the saved
                random weights, so the bundle's network is the one it was built with.
            application: the table row of the network to build.

        Raises:
            WeightsUnavailableError: ImageNet weights could not be downloaded or read.
            BackboneError: the network's feature width is not the table's.
        """
        import keras
        import tensorflow as tf

        self.spec = spec
        self.input_size = spec.input_size
        self.feature_dim = application.feature_dim
        shape = (spec.input_size, spec.input_size, 3)
        constructor = getattr(keras.applications, application.constructor)

        def build(weights):
            return constructor(include_top=False, pooling="avg", weights=weights, input_shape=shape)

        # Key order as it always was: manifests list it this way (the key itself is order-free).
        identity = {"kind": application.name, "input_size": spec.input_size, "feature_dim": application.feature_dim}
        weights_file = application.weights_file_for(spec.input_size)
        if spec.weights == "imagenet":
            try:
                # Keras reports the download on stdout, which the CLI keeps for JSON answers.
                with contextlib.redirect_stdout(sys.stderr):
                    # What weights="imagenet" does inside Keras, done here to learn which file
                    # it is ($KERAS_HOME, ~/.keras or /tmp/.keras): bundles record its sha256.
                    cached = keras.utils.get_file(
                        weights_file,
                        application.weights_base_url + weights_file,
                        cache_subdir="models",
                        file_hash=application.weights_hash,
                    )
                    model = build(cached)
            except Exception as error:  # network errors come in many types (URLError, OSError, ...)
                checksum = f" (md5 {application.weights_hash})" if application.weights_hash else ""
                raise WeightsUnavailableError(
                    f"could not get the ImageNet weights for {application.constructor} "
                    f"({type(error).__name__}: {error}); on a machine with internet download "
                    f"{application.weights_base_url}{weights_file}{checksum} and pass "
                    f"--weights PATH (or put it in ~/.keras/models/), or use --weights none for "
                    f"random init (poor quality) or --backbone tflite:PATH"
                ) from None
            identity["weights"] = "imagenet"
            identity["weights_sha256"] = file_sha256(cached)
        elif spec.weights == "none":
            if random_weights_path is not None:
                model = build(None)
                model.load_weights(random_weights_path)
            else:
                keras.utils.set_random_seed(spec.seed)
                model = build(None)
            identity["weights"] = "none (random init)"
            identity["seed"] = spec.seed
            identity["weights_sha256"] = _weights_digest(model)
        else:
            path = Path(os.path.realpath(Path(spec.weights).expanduser()))
            if not path.is_file():
                raise WeightsUnavailableError(f"weights file not found: {spec.weights}")
            try:
                model = build(str(path))
            except Exception as error:
                raise WeightsUnavailableError(
                    f"cannot load {application.constructor} weights from {path} "
                    f"({type(error).__name__}: {error}); expected the no-top file {weights_file}"
                ) from None
            identity["weights"] = "file"
            identity["weights_sha256"] = file_sha256(path)
            self.spec = replace(spec, weights=str(path))
            self.model_file = path
        if model.output_shape[-1] != application.feature_dim:
            # A wrong table row would otherwise surface later as a feature-store shape error.
            raise BackboneError(
                f"{application.name}: the network gives {model.output_shape[-1]} features, "
                f"the table says {application.feature_dim}"
            )
        identity["key"] = _identity_key(identity)
        self.identity = identity
        self.model = model
        preprocess = getattr(keras.applications, application.preprocessing).preprocess_input

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
        given = spec.name.split(":", 1)[1]
        path = Path(os.path.realpath(Path(given).expanduser()))
        if not path.is_file():
            raise BackboneError(f"TFLite model not found: {given}")
        interpreter_class = _tflite_interpreter_class()
        try:
            with warnings.catch_warnings(), native_log_filtered():
                # TF 2.20+ announces that tf.lite.Interpreter moves to ai_edge_litert.
                warnings.simplefilter("ignore", UserWarning)
                self._interpreter = interpreter_class(
                    model_path=str(path), num_threads=num_threads or os.cpu_count() or 1
                )
                self._interpreter.allocate_tensors()  # prints "INFO: Created ... XNNPACK delegate" once
        except Exception as error:
            raise BackboneError(f"cannot load TFLite model {path}: {error}") from None
        self._lock = threading.Lock()
        self._batch = None
        input_detail = self._interpreter.get_input_details()[0]
        output_detail = self._interpreter.get_output_details()[0]
        size = int(input_detail["shape"][1])
        self.spec = BackboneSpec(name=f"tflite:{path}", weights="file", input_size=size, seed=spec.seed)
        self.model_file = path
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


BackboneFactory = Callable[..., Backbone]
"""Creates a backbone: ``factory(spec, random_weights_path=None) -> Backbone``."""


@dataclass(frozen=True)
class _Registration:
    name: str
    description: str
    factory: BackboneFactory
    file_backed: bool

    @property
    def usage(self) -> str:
        """How ``--backbone`` names it: ``resnet50``, or ``tflite:PATH`` for a file-backed kind."""
        return f"{self.name}:PATH" if self.file_backed else self.name


_REGISTRY: dict[str, _Registration] = {}


def register_backbone(name: str, description: str, factory: BackboneFactory, *, file_backed: bool = False) -> None:
    """Registers a backbone under a name.

    Args:
        name: registry name; a file-backed kind is asked for as ``NAME:PATH``.
        description: one line, shown by :func:`list_backbones` and ``--backbone`` help.
        factory: ``factory(spec, random_weights_path=None) -> Backbone``.
        file_backed: the backbone is a model file named in the spec (``tflite:PATH``).

    Raises:
        ValueError: the name is taken or contains ``:``.
    """
    if ":" in name or name in _REGISTRY:
        raise ValueError(f"cannot register backbone {name!r}: the name contains ':' or is taken")
    _REGISTRY[name] = _Registration(name, description, factory, file_backed)


def list_backbones() -> dict[str, str]:
    """The registered backbones, in registration order (the default first).

    Returns:
        ``{name as given to --backbone: one-line description}``, e.g.
        ``{"resnet50": "keras.applications.ResNet50, ...", ..., "tflite:PATH": "..."}``.
    """
    return {registration.usage: registration.description for registration in _REGISTRY.values()}


def default_input_size(name: str) -> int:
    """The input size a backbone gets when none is asked for (``--image-size`` left out).

    Args:
        name: as given to ``--backbone``.

    Returns:
        A Keras application's row's ``input_size`` (the size its ImageNet weights were trained
        at); for any other name :class:`BackboneSpec`'s default, which a TFLite model replaces
        with its file's own size when it loads.
    """
    for application in KERAS_APPLICATIONS:
        if application.name == name:
            return application.input_size
    return BackboneSpec().input_size


def keras_cache_file(file_name: str) -> Path | None:
    """The Keras cache's copy of a weights file, found the way ``keras.utils.get_file`` looks
    (``$KERAS_HOME`` or ``~/.keras``, then ``/tmp/.keras``), without importing Keras; None if absent."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    for base in (home, os.path.join("/tmp", ".keras")):
        candidate = Path(base) / "models" / file_name
        if candidate.is_file():
            return candidate
    return None


def recorded_backbone_matches(spec: BackboneSpec, record, libraries: dict[str, str]) -> bool | None:
    """Whether ``spec`` would load the backbone a bundle records, decided without loading it.

    Loading a backbone imports TensorFlow (4-16 s); the nightly rebuild of an unchanged catalog
    must not pay that just to learn that nothing changed. The answer compares what identifies
    the network: a TFLite or weights file by its sha256, ImageNet weights by the sha256 of the
    Keras cache's file, random init by its seed and the Keras and TensorFlow versions that drew it.

    Args:
        spec: the backbone a build would use.
        record: the bundle's :class:`recommender.manifest.BackboneRecord`.
        libraries: the bundle's recorded library versions (``Manifest.libraries``).

    Returns:
        True: the same network and weights; False: another one; None: it cannot be told without
        loading (a file or the cached weights are missing: loading reports why).
    """
    from importlib.metadata import PackageNotFoundError, version

    identity = record.identity
    kind, colon, given = spec.name.partition(":")
    if colon:
        if kind != "tflite" or identity.get("kind") != "tflite":
            return False
        path = Path(os.path.realpath(Path(given).expanduser()))
        return file_sha256(path) == identity.get("weights_sha256") if path.is_file() else None
    application = next((a for a in KERAS_APPLICATIONS if a.name == spec.name), None)
    if application is None or identity.get("kind") != spec.name or identity.get("input_size") != spec.input_size:
        return False
    if spec.weights == "imagenet":
        if identity.get("weights") != "imagenet":
            return False
        cached = keras_cache_file(application.weights_file_for(spec.input_size))
        return file_sha256(cached) == identity.get("weights_sha256") if cached else None
    if spec.weights == "none":
        if identity.get("weights") != "none (random init)" or identity.get("seed") != spec.seed:
            return False
        for package in ("keras", "tensorflow"):
            try:
                if version(package) != libraries.get(package):
                    return None  # another version may draw other weights from the same seed
            except PackageNotFoundError:
                return None
        return True
    path = Path(os.path.realpath(Path(spec.weights).expanduser()))
    if identity.get("weights") != "file":
        return False
    return file_sha256(path) == identity.get("weights_sha256") if path.is_file() else None


def load_backbone(spec: BackboneSpec, *, random_weights_path: str | os.PathLike | None = None) -> Backbone:
    """Creates the backbone a spec names.

    Args:
        spec: a registered name (see :func:`list_backbones`) plus weights and input size.
        random_weights_path: saved random-init weights (bundles built with ``--weights none``).

    Raises:
        BackboneError: unknown name or unreadable model file.
        WeightsUnavailableError: pretrained weights cannot be had.
    """
    kind, colon, _ = spec.name.partition(":")
    registration = _REGISTRY.get(kind)
    if registration is None or registration.file_backed != bool(colon):
        names = ", ".join(list_backbones())
        raise BackboneError(f"unknown backbone {spec.name!r}: registered backbones are {names}")
    return registration.factory(spec, random_weights_path=random_weights_path)


def _load_tflite(spec: BackboneSpec, random_weights_path: str | os.PathLike | None = None) -> Backbone:
    return TFLiteBackbone(spec)  # the model file is the whole network: no separate weights


for _application in KERAS_APPLICATIONS:
    register_backbone(
        _application.name, _application.description, partial(KerasApplicationBackbone, application=_application)
    )
del _application
register_backbone(
    "tflite",
    "a TFLite image feature extractor file (uint8 or float input; quantized outputs dequantized)",
    _load_tflite,
    file_backed=True,
)
