"""The bundle: an immutable directory holding everything a query needs, verified on load.

Layout (format version 3; version 2 bundles, which name a file backbone by its path on the
build machine and record no image root, and version 1 bundles, which also lack the heads,
taxonomy and tags in ``labels.json``, still load)::

    BUNDLE/
      model.keras             classifier (features -> embedding + heads)
      scalers.npz             input_* (backbone features) and embedding_* StandardScalers
      labels.json             label columns, class names, heads (softmax / sigmoid), the
                              learned taxonomy and the tags with their tuned thresholds
      index.faiss             FAISS index; id i = line i of catalog.jsonl
      catalog.jsonl           one catalog row per line: id, image, path, sha256, labels, extra
                              (and tags, with a tags column)
      history.json            per-epoch training curves
      build_report.json       counts and the rows left out, with reasons
      backbone.weights.h5     only for --weights none: the random-init backbone weights
      backbone/NAME           only for a file backbone (tflite:PATH, --weights PATH): a copy of
                              that file, the one a loaded bundle uses (never the original)
      manifest.json           written last: versions, backbone identity (the weights' sha256),
                              the catalog's image root, counts, metrics, and the sha256 and
                              size of every other file

A bundle is portable: it names no path relative to the build's working directory. The
backbone's file travels inside it; ImageNet weights, which Keras caches per machine, are
identified by their sha256 and checked when the bundle loads; catalog photos are recorded by
absolute path inside the recorded image root (``recommender.catalog.open_catalog_image``).

The bundle is written into a temporary sibling folder and renamed into place, so a reader
never sees a half-written bundle; :func:`verify_bundle` checks the manifest against the
files and raises :class:`BundleError` naming what is wrong.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from recommender.backbones import file_sha256
from recommender.errors import BackboneError, BundleError
from recommender.manifest import BackboneFile, Manifest

FORMAT_VERSION = 3
#: Format versions this code reads.
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
REQUIRED_FILES = ("model.keras", "scalers.npz", "labels.json", "index.faiss", "catalog.jsonl")
#: Folder of a bundle that holds the copy of a file backbone (TFLite model, weights file).
BACKBONE_DIR = "backbone"
#: The saved random-init backbone weights (``--weights none``).
RANDOM_WEIGHTS = "backbone.weights.h5"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a bundle depends on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in (
        "recommender",
        "tensorflow",
        "keras",
        "faiss-cpu",
        "faiss-gpu-cu12",
        "numpy",
        "scikit-learn",
        "h5py",
        "pillow",
    ):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def new_bundle_id() -> str:
    """A sortable unique id: UTC time plus a random suffix, e.g. ``20261122T073000Z-1a2b3c``."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def write_json(path: Path, payload) -> None:
    """Writes JSON with a trailing newline (UTF-8, stable key order as given)."""
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_bundle(out: str | os.PathLike, fill: Callable[[Path], dict], *, overwrite: bool = False) -> Path:
    """Writes a bundle atomically.

    Args:
        out: the bundle folder to create.
        fill: called with a fresh temporary folder; writes every file except the manifest
            and returns the manifest fields (``files`` and ``format_version`` are added here).
        overwrite: replace an existing bundle at ``out`` (the old one is removed only after
            the new one is in place).

    Returns:
        The bundle path.

    Raises:
        BundleError: ``out`` exists and ``overwrite`` is false.
        StorageError: the disk filled up or the quota ran out while writing (nothing is left
            at ``out``; an existing bundle there is untouched).
    """
    from recommender.files import storage_errors

    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; choose a new --out (bundles are immutable) or pass --overwrite")
    with storage_errors(out):
        return _write_bundle(out, fill)


def _write_bundle(out: Path, fill: Callable[[Path], dict]) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    temp.mkdir()
    try:
        fields = dict(fill(temp))
        files = {}
        for path in sorted(temp.rglob("*")):
            if path.is_file():
                files[path.relative_to(temp).as_posix()] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        # Through the reader's validation, so a bundle is never written that cannot be read back.
        manifest = Manifest.from_json({"format_version": FORMAT_VERSION, **fields, "files": files}, str(out / MANIFEST))
        write_json(temp / MANIFEST, manifest.to_json())
        for path in temp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(temp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, out)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return out


def copy_backbone_file(backbone, folder: Path) -> dict | None:
    """Copies a file backbone's file into a bundle being written; checks the copy's sha256.

    Args:
        backbone: the loaded ``backbones.Backbone`` the bundle was built with.
        folder: the bundle's temporary folder (see :func:`write_bundle`).

    Returns:
        The manifest's ``backbone.file`` entry (``{"path": "backbone/NAME", "source": ABSOLUTE}``),
        or None when the backbone has no file to carry (ImageNet, random init).

    Raises:
        BundleError: the copy is not the file the backbone was loaded from (it changed since).
    """
    source = getattr(backbone, "model_file", None)
    if source is None:
        return None
    relative = f"{BACKBONE_DIR}/{Path(source).name}"
    target = folder / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    # Checked against the hash of the file as it was loaded, so a file replaced during the build
    # cannot ship under the identity of another.
    if file_sha256(target) != backbone.identity.get("weights_sha256"):
        raise BundleError(f"{source} changed while the bundle was built (its sha256 is not the loaded one's)")
    return {"path": relative, "source": str(source)}


def backbone_spec(bundle: str | os.PathLike, manifest: Manifest):
    """The ``backbones.BackboneSpec`` that re-creates a bundle's backbone from the bundle itself.

    A file backbone is loaded from the bundle's copy (``backbone/NAME``), never from the path
    it was built from; other specs are returned as recorded.

    Raises:
        BundleError: ``backbone.file`` names a path outside the bundle or one ``files`` does not
            list (so it would escape the hash check).
    """
    from dataclasses import replace

    spec = manifest.backbone.spec
    carried = manifest.backbone.file
    if carried is None:
        return spec
    path = _carried_path(Path(bundle), manifest, carried)
    kind, colon, _ = spec.name.partition(":")
    if colon:
        return replace(spec, name=f"{kind}:{path}")
    return replace(spec, weights=str(path))


def _carried_path(bundle: Path, manifest: Manifest, carried: BackboneFile) -> Path:
    parts = Path(carried.path).parts
    if Path(carried.path).is_absolute() or ".." in parts or parts[:1] != (BACKBONE_DIR,):
        raise BundleError(f"{bundle}: backbone.file.path {carried.path!r} is not a path under {BACKBONE_DIR}/")
    if carried.path not in manifest.files:
        raise BundleError(f"{bundle}: backbone.file.path {carried.path} is not listed in the manifest's files")
    return bundle / carried.path


def load_bundle_backbone(bundle: str | os.PathLike, manifest: Manifest):
    """Loads a verified bundle's backbone and checks it is the one the bundle was built with.

    Args:
        bundle: the bundle folder (verified: :func:`verify_bundle`).
        manifest: its manifest.

    Returns:
        The loaded ``backbones.Backbone``.

    Raises:
        BundleError: the weights found here (e.g. the Keras cache's ImageNet file) hash to
            another sha256 than the recorded one, the backbone's identity differs otherwise,
            or a version-2 bundle's model file cannot be found from this working directory.
        WeightsUnavailableError: ImageNet weights cannot be had here.
    """
    from recommender.backbones import load_backbone

    bundle = Path(bundle)
    spec = backbone_spec(bundle, manifest)
    random_weights = bundle / RANDOM_WEIGHTS if (bundle / RANDOM_WEIGHTS).exists() else None
    try:
        backbone = load_backbone(spec, random_weights_path=random_weights)
    except BackboneError as error:
        if manifest.backbone.file is None and ":" in spec.name and type(error) is BackboneError:
            raise BundleError(
                f"{bundle}: {error}; a format {manifest.format_version} bundle names its model by the path it "
                f"was built with (relative to the build's working directory): serve it from there, or rebuild "
                f"it with this version, which copies the model into the bundle"
            ) from None
        raise
    recorded, found = manifest.backbone.identity, backbone.identity
    if recorded.get("weights_sha256") != found.get("weights_sha256"):
        what = "the ImageNet weights in this machine's Keras cache" if spec.weights == "imagenet" else "its weights"
        raise BundleError(
            f"{bundle}: {what} have sha256 {found.get('weights_sha256')}, the bundle was built with "
            f"{recorded.get('weights_sha256')}; supply the same weights file or rebuild the bundle"
        )
    if found["key"] != manifest.backbone.identity_key:
        raise BundleError(
            f"{bundle}: the backbone here ({found}) differs from the one the bundle was built with "
            f"({dict(recorded)}); rebuild the bundle or supply the same weights"
        )
    return backbone


def read_manifest(bundle: str | os.PathLike) -> Manifest:
    """Reads and validates ``manifest.json`` (no file hashing).

    Raises:
        BundleError: no bundle, no or broken manifest, an unsupported format version, or a
            missing or malformed field (named).
    """
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle not found: {bundle}")
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST} (not a bundle, or its build did not finish)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_VERSIONS)
        raise BundleError(f"{bundle}: bundle format version {version!r}, this version reads {readable}")
    return Manifest.from_json(manifest, str(path))


def verify_bundle(bundle: str | os.PathLike) -> Manifest:
    """Checks every file against the manifest: present, same size, same sha256; no extras.

    Returns:
        The manifest.

    Raises:
        BundleError: naming the first file that is missing, truncated, changed or unexpected.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    files = manifest.files
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{bundle}: manifest does not list required file {name}")
    if manifest.backbone.file is not None:
        _carried_path(bundle, manifest, manifest.backbone.file)
    for name, expected in files.items():
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{bundle}: file {name} is missing")
        size = path.stat().st_size
        if size != expected.bytes:
            raise BundleError(
                f"{bundle}: file {name} has {size} bytes, the manifest says {expected.bytes} (truncated or changed)"
            )
        if file_sha256(path) != expected.sha256:
            raise BundleError(f"{bundle}: file {name} does not match its sha256 in the manifest (changed or corrupt)")
    extra = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST)
    unexpected = [name for name in extra if name not in files]
    if unexpected:
        raise BundleError(f"{bundle}: files not in the manifest: {', '.join(unexpected)}")
    return manifest


def read_catalog_rows(bundle: Path, expected: int):
    """Reads ``catalog.jsonl`` (line i is FAISS id i); checks it has ``expected`` rows.

    Returns:
        A ``recommender.records.CatalogRecords``: a ``Sequence[CatalogRecord]`` held as the
        file's bytes plus lookup columns (every line validated here, once).

    Raises:
        BundleError: a line that is not JSON or not a valid record (file and line named), or
            another number of rows than ``expected``.
    """
    from recommender.records import CatalogRecords

    rows = CatalogRecords.read(bundle / "catalog.jsonl")
    if len(rows) != expected:
        raise BundleError(f"{bundle}: catalog.jsonl has {len(rows)} rows, the manifest says {expected}")
    return rows


def read_label_space(bundle: str | os.PathLike):
    """Reads a bundle's ``labels.json`` (heads, taxonomy, tags) as a ``labels.LabelSpace``.

    Raises:
        BundleError: the file is missing or malformed.
    """
    from recommender.labels import LabelSpace

    path = Path(bundle) / "labels.json"
    try:
        return LabelSpace.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise BundleError(f"{path}: cannot read the label space ({error})") from None


def read_classifier(bundle: str | os.PathLike, manifest: Manifest | None = None, label_space=None):
    """Loads a bundle's trained classifier (model, input scaler, classes, history, metrics).

    Args:
        bundle: a verified bundle folder.
        manifest: its manifest (read if not given).
        label_space: its ``labels.LabelSpace`` when the caller has read it already
            (:func:`read_label_space`).

    Returns:
        ``(classifier.TrainedClassifier, embedding StandardScaler)``.

    Raises:
        BundleError: the model or the scalers cannot be loaded.
    """
    import keras
    import numpy as np

    from recommender.classifier import TrainedClassifier
    from recommender.scalers import scaler_from_arrays

    bundle = Path(bundle)
    manifest = manifest or read_manifest(bundle)
    space = label_space or read_label_space(bundle)
    try:
        history_path = bundle / "history.json"
        history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.exists() else {}
        model = keras.saving.load_model(bundle / "model.keras", compile=False)
        with np.load(bundle / "scalers.npz") as arrays:
            input_scaler = scaler_from_arrays(arrays, "input")
            embedding_scaler = scaler_from_arrays(arrays, "embedding")
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise BundleError(f"{bundle}: cannot load model, labels or scalers ({error})") from None
    layers = {layer.name: layer for layer in model.layers}
    for head in space.heads:
        width = int(layers[head.name].units) if head.name in layers else None
        if width != len(head.classes):
            raise BundleError(
                f"{bundle}: labels.json head {head.name} has {len(head.classes)} classes, the model's output has "
                f"{width if width is not None else 'no such layer'}"
            )
    classifier = TrainedClassifier(
        model=model,
        input_scaler=input_scaler,
        label_space=space,
        history=history,
        metrics=manifest.metrics.to_json(),
    )
    return classifier, embedding_scaler
