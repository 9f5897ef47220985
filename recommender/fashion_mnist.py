"""Fashion-MNIST as an ordinary catalog: read the IDX files (or download via Keras) and write PNGs + catalog.csv."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from recommender.errors import CatalogError
from recommender.files import atomic_write_bytes

#: The ten class names, indexed by label (0..9).
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Split -> (images file, labels file), as published; each may also lie uncompressed (without ``.gz``).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: Image side in pixels.
IMAGE_SIZE = 28

#: Prefix of catalog specs that name Fashion-MNIST instead of a catalog file or folder.
SOURCE_PREFIX = "fashion-mnist"

#: Name of the file that records what a materialized folder was made from.
INFO_FILE = "fashion-mnist.json"

#: Bumped when the layout written by :func:`materialize` changes, so old folders are rewritten.
LAYOUT_VERSION = 1

# IDX type code -> element type. IDX stores multi-byte values big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Images written between two progress calls: often enough for a progress bar, rarely enough to cost nothing.
_PROGRESS_EVERY = 1000

_DOWNLOAD_HINT = (
    "get the four IDX files ({files}) from https://github.com/zalandoresearch/fashion-mnist "
    "(folder data/fashion) and pass their folder as fashion-mnist:DIR"
)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file, gzipped (``.gz``) or not.

    Args:
        path: the file.

    Returns:
        The array with the shape given by the file's header, in native byte order
        (e.g. ``(n, 28, 28) uint8`` for an images file, ``(n,) uint8`` for a labels file).

    Raises:
        CatalogError: the file is missing or unreadable, is not valid gzip, has a bad magic
            number or type code, or holds fewer or more data bytes than its dimensions say.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CatalogError(f"IDX file not found: {path}") from None
    except OSError as error:
        raise CatalogError(f"cannot read IDX file {path}: {error.strerror or error}") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            # BadGzipFile (an OSError) for a wrong header, EOFError for a cut-off stream.
            raise CatalogError(f"{path}: corrupt or truncated gzip data ({error})") from None

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise CatalogError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise CatalogError(f"{path}: unknown IDX type code 0x{type_code:02X}")
    if ndim == 0:
        raise CatalogError(f"{path}: IDX header has zero dimensions")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise CatalogError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions need {header_size})")
    # Dimensions are unsigned in practice; reading them as >u4 keeps a corrupt huge value from turning negative.
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_size
    if actual != expected:
        # A short file must fail here, not be reshaped into garbage.
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise CatalogError(
            f"{path}: {problem}: shape {shape} of {dtype.name} needs {expected} data bytes, the file has {actual}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # a writable native-order copy


def load_arrays(idx_dir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads the train and test splits from a folder holding the four IDX files.

    Args:
        idx_dir: folder with the files named in :data:`IDX_FILES`, each gzipped or not.

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}`` with images ``(n, 28, 28) uint8``
        and labels ``(n,) uint8`` in 0..9.

    Raises:
        CatalogError: the folder or a file is missing or unreadable, or the arrays are not
            Fashion-MNIST shaped (wrong shapes or types, image and label counts differ, labels outside 0..9).
    """
    folder = Path(idx_dir)
    if not folder.is_dir():
        raise CatalogError(f"Fashion-MNIST folder not found: {folder}")
    arrays = {}
    for split, (images_name, labels_name) in IDX_FILES.items():
        images_path, labels_path = _find_idx_file(folder, images_name), _find_idx_file(folder, labels_name)
        arrays[split] = _checked_split(read_idx(images_path), read_idx(labels_path), f"{images_path} / {labels_path}")
    return arrays


def download_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Gets Fashion-MNIST through Keras, which downloads it once into its cache (``~/.keras/datasets``).

    Returns:
        The same dictionary as :func:`load_arrays`.

    Raises:
        CatalogError: Keras is missing or the download failed (e.g. no internet); the message
            says how to get the IDX files instead.
    """
    try:
        import keras  # here, not at the top: importing TensorFlow costs seconds

        (train_images, train_labels), (test_images, test_labels) = keras.datasets.fashion_mnist.load_data()
    # Broad on purpose: whatever went wrong (no Keras, offline, bad cache), the remedy is the same.
    except Exception as error:
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise CatalogError(f"cannot download Fashion-MNIST through Keras ({reason}); {_download_hint()}") from error
    return {
        "train": _checked_split(train_images, train_labels, "Keras fashion_mnist train split"),
        "test": _checked_split(test_images, test_labels, "Keras fashion_mnist test split"),
    }


def class_slug(name: str) -> str:
    """Folder name for a class: lowercase, with ``/`` and spaces as ``-`` ("T-shirt/top" -> "t-shirt-top")."""
    return name.lower().replace("/", "-").replace(" ", "-")


def materialize(
    out_dir: str | os.PathLike,
    idx_dir: str | os.PathLike | None = None,
    *,
    limit_per_split: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Writes Fashion-MNIST as PNG files plus a ``catalog.csv`` that :func:`~recommender.catalog.read_catalog` reads.

    Layout: ``out_dir/images/<split>/<class slug>/<split>-<index:05d>.png`` (28x28 grayscale, the
    original pixels) and ``out_dir/catalog.csv`` with columns ``id,file,split,label`` (label is the
    class name). ``out_dir/fashion-mnist.json`` records the source and options; when it and the
    catalog match the request, nothing is rewritten. The catalog is written atomically and last, and
    any old one is removed first, so an interrupted run never leaves a catalog naming missing images.

    Args:
        out_dir: folder to write into (created if needed).
        idx_dir: folder with the four IDX files; ``None`` or ``""`` downloads through Keras.
        limit_per_split: if given, keep at most this many images of each split, drawn at random
            (by ``seed``) in turns over the classes, so every class keeps about the same number.
        seed: seed of the subset draw; ignored without ``limit_per_split``.
        progress: called with the number of images written after each batch of them.

    Returns:
        The path of ``catalog.csv``.

    Raises:
        CatalogError: the IDX files are missing or bad, the download failed, or ``out_dir`` cannot be written.
        ValueError: ``limit_per_split`` is less than 1.
    """
    if limit_per_split is not None and limit_per_split < 1:
        raise ValueError(f"limit_per_split must be at least 1, got {limit_per_split}")
    out = Path(out_dir)
    catalog_path = out / "catalog.csv"
    info_path = out / INFO_FILE
    request = {
        "layout_version": LAYOUT_VERSION,
        "source": _describe_source(idx_dir),
        "limit_per_split": limit_per_split,
        "seed": seed if limit_per_split is not None else None,
    }
    if _is_up_to_date(out, request):
        return catalog_path

    arrays = load_arrays(idx_dir) if idx_dir else download_arrays()
    rows = []  # (id, file, split, label name, pixels)
    for split_number, (split, (images, labels)) in enumerate(arrays.items()):
        if limit_per_split is None:
            chosen = np.arange(len(labels))
        else:
            chosen = _balanced_subset(labels, limit_per_split, np.random.default_rng([seed, split_number]))
        for index in chosen.tolist():
            name = CLASS_NAMES[labels[index]]
            file = f"images/{split}/{class_slug(name)}/{split}-{index:05d}.png"
            rows.append((f"{split}-{index:05d}", file, split, name, images[index]))

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["id", "file", "split", "label"])
    writer.writerows(row[:4] for row in rows)
    catalog_bytes = text.getvalue().encode("utf-8")

    try:
        # Gone before any image changes: a stale catalog must not outlive an interrupted rewrite.
        catalog_path.unlink(missing_ok=True)
        for folder in sorted({(out / row[1]).parent for row in rows}):
            folder.mkdir(parents=True, exist_ok=True)
        reported = 0
        for count, (_, file, _, _, pixels) in enumerate(rows, start=1):
            Image.fromarray(pixels).save(out / file, format="PNG")
            if progress and (count - reported >= _PROGRESS_EVERY or count == len(rows)):
                progress(count - reported)
                reported = count
        info = {**request, "counts": _split_counts(rows), "catalog_sha256": hashlib.sha256(catalog_bytes).hexdigest()}
        atomic_write_bytes(info_path, (json.dumps(info, indent=2) + "\n").encode("utf-8"))
        atomic_write_bytes(catalog_path, catalog_bytes)
    except OSError as error:
        raise CatalogError(f"cannot write the Fashion-MNIST catalog into {out}: {error}") from None
    return catalog_path


def parse_source(spec: str) -> str | None:
    """Recognises catalog specs that name Fashion-MNIST.

    Args:
        spec: a catalog spec as given on the command line.

    Returns:
        ``DIR`` for ``"fashion-mnist:DIR"``, ``""`` for plain ``"fashion-mnist"`` (download through
        Keras), ``None`` for anything else (an ordinary catalog path).
    """
    if spec == SOURCE_PREFIX:
        return ""
    if spec.startswith(SOURCE_PREFIX + ":"):
        return spec[len(SOURCE_PREFIX) + 1 :]
    return None


def _download_hint() -> str:
    return _DOWNLOAD_HINT.format(files=", ".join(name for pair in IDX_FILES.values() for name in pair))


def _find_idx_file(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise CatalogError(f"IDX file not found: {folder / name} (or uncompressed {name.removesuffix('.gz')})")


def _checked_split(images, labels, where: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise CatalogError(f"{where}: images must be (n, 28, 28) uint8, got {images.shape} {images.dtype}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise CatalogError(f"{where}: labels must be (n,) uint8, got {labels.shape} {labels.dtype}")
    if len(images) != len(labels):
        raise CatalogError(f"{where}: {len(images)} images but {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(CLASS_NAMES):
        raise CatalogError(f"{where}: label {int(labels.max())} outside 0..{len(CLASS_NAMES) - 1}")
    return images, labels


def _balanced_subset(labels: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Returns up to ``limit`` indices, sorted, taken in turns over the classes in random order."""
    if limit >= len(labels):
        return np.arange(len(labels))
    classes = rng.permutation(np.unique(labels))
    turn = np.empty(len(labels), dtype=np.int64)  # 0 for each class's first pick, 1 for its second...
    for cls in classes:
        members = np.flatnonzero(labels == cls)
        turn[rng.permutation(members)] = np.arange(len(members))
    class_position = np.empty(int(labels.max()) + 1, dtype=np.int64)
    class_position[classes] = np.arange(len(classes))
    # Earlier turns first; within a turn the shuffled class order decides who gets the remainder.
    order = np.lexsort((class_position[labels], turn))
    return np.sort(order[:limit])


def _describe_source(idx_dir) -> dict:
    if not idx_dir:
        return {"kind": "keras"}
    folder = Path(idx_dir).resolve()
    if not folder.is_dir():
        raise CatalogError(f"Fashion-MNIST folder not found: {folder}")
    files = {}
    for pair in IDX_FILES.values():
        for name in pair:
            path = _find_idx_file(folder, name)
            # Content hashes, so new files under the same folder name are noticed.
            files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"kind": "idx", "folder": str(folder), "files": files}


def _is_up_to_date(out: Path, request: dict) -> bool:
    try:
        info = json.loads((out / INFO_FILE).read_text(encoding="utf-8"))
        catalog_bytes = (out / "catalog.csv").read_bytes()
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or {key: info.get(key) for key in request} != request:
        return False
    if info.get("catalog_sha256") != hashlib.sha256(catalog_bytes).hexdigest():
        return False
    # Images deleted by hand since the last run mean a rewrite.
    reader = csv.DictReader(io.StringIO(catalog_bytes.decode("utf-8")))
    return all((out / row["file"]).is_file() for row in reader)


def _split_counts(rows) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[2]] = counts.get(row[2], 0) + 1
    return counts
