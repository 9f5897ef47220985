"""Tests for recommender.fashion_mnist on tiny IDX files written in code (no download, no Keras)."""

from __future__ import annotations

import csv
import gzip
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recommender.catalog import read_catalog
from recommender.errors import CatalogError
from recommender.fashion_mnist import (
    CLASS_NAMES,
    IDX_FILES,
    class_slug,
    load_arrays,
    materialize,
    parse_source,
    read_idx,
)

TRAIN_COUNT, TEST_COUNT = 30, 20


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """Encodes an array as IDX: magic (0, 0, type, ndim), big-endian int32 dims, big-endian data."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_idx_dir(folder: Path, arrays: dict, *, gzipped: bool) -> Path:
    """Writes the four IDX files, gzipped under the published names or uncompressed without ``.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, names in IDX_FILES.items():
        for name, array in zip(names, arrays[split], strict=True):
            data = idx_bytes(array)
            if gzipped:
                (folder / name).write_bytes(gzip.compress(data))
            else:
                (folder / name.removesuffix(".gz")).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def arrays() -> dict:
    rng = np.random.default_rng(7)
    return {
        split: (
            rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8),
            (np.arange(count) % 10).astype(np.uint8),
        )
        for split, count in (("train", TRAIN_COUNT), ("test", TEST_COUNT))
    }


@pytest.fixture(params=["gzipped", "uncompressed"])
def idx_dir(request, tmp_path, arrays) -> Path:
    return write_idx_dir(tmp_path / "idx", arrays, gzipped=request.param == "gzipped")


def read_rows(catalog_path: Path) -> list[dict]:
    with catalog_path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# read_idx


@pytest.mark.parametrize("type_code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_round_trips_every_type(tmp_path, type_code):
    array = np.arange(-12, 12).reshape(2, 3, 4)
    if type_code == 0x08:
        array = array + 12
    path = tmp_path / "data.idx"
    path.write_bytes(idx_bytes(array, type_code))
    result = read_idx(path)
    assert result.shape == (2, 3, 4)
    np.testing.assert_array_equal(result, array)
    assert result.dtype.isnative


def test_read_idx_round_trips_images_and_labels(idx_dir, arrays):
    for split, names in IDX_FILES.items():
        for name, expected in zip(names, arrays[split], strict=True):
            path = idx_dir / name if (idx_dir / name).exists() else idx_dir / name.removesuffix(".gz")
            result = read_idx(path)
            assert result.dtype == np.uint8
            np.testing.assert_array_equal(result, expected)


def test_read_idx_refuses_truncated_file(tmp_path, arrays):
    data = idx_bytes(arrays["train"][0])
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(data[:-100])
    with pytest.raises(CatalogError, match="truncated") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_read_idx_refuses_truncated_gzip_stream(tmp_path, arrays):
    compressed = gzip.compress(idx_bytes(arrays["train"][0]))
    path = tmp_path / "cut-idx3-ubyte.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(CatalogError, match="gzip") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_read_idx_refuses_non_gzip_data_named_gz(tmp_path, arrays):
    path = tmp_path / "plain-idx3-ubyte.gz"
    path.write_bytes(idx_bytes(arrays["train"][0]))
    with pytest.raises(CatalogError, match="gzip"):
        read_idx(path)


def test_read_idx_refuses_trailing_bytes(tmp_path, arrays):
    path = tmp_path / "long-idx1-ubyte"
    path.write_bytes(idx_bytes(arrays["train"][1]) + b"\0")
    with pytest.raises(CatalogError, match="trailing"):
        read_idx(path)


@pytest.mark.parametrize(
    "header",
    [b"", b"\x00", b"\x01\x00\x08\x01", b"\x00\x01\x08\x01", b"PK\x03\x04"],
    ids=["empty", "one-byte", "first-byte", "second-byte", "zip"],
)
def test_read_idx_refuses_bad_magic(tmp_path, header):
    path = tmp_path / "bad-magic"
    path.write_bytes(header + b"\x00" * 8)
    with pytest.raises(CatalogError, match="magic") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_read_idx_refuses_unknown_type_code(tmp_path):
    path = tmp_path / "bad-type"
    path.write_bytes(bytes([0, 0, 0x0A, 1]) + struct.pack(">i", 1) + b"\x00")
    with pytest.raises(CatalogError, match="type code 0x0A"):
        read_idx(path)


def test_read_idx_refuses_truncated_header(tmp_path):
    path = tmp_path / "short-header"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">i", 5))
    with pytest.raises(CatalogError, match="header"):
        read_idx(path)


def test_read_idx_names_missing_file(tmp_path):
    path = tmp_path / "nowhere-idx3-ubyte.gz"
    with pytest.raises(CatalogError, match="not found") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


# load_arrays


def test_load_arrays_reads_both_splits(idx_dir, arrays):
    loaded = load_arrays(idx_dir)
    assert set(loaded) == {"train", "test"}
    for split in ("train", "test"):
        images, labels = loaded[split]
        assert images.shape == (len(arrays[split][0]), 28, 28) and images.dtype == np.uint8
        assert labels.shape == (len(arrays[split][1]),) and labels.dtype == np.uint8
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(labels, arrays[split][1])


def test_load_arrays_accepts_mixed_compression(tmp_path, arrays):
    folder = write_idx_dir(tmp_path / "idx", arrays, gzipped=True)
    name = IDX_FILES["test"][1]
    (folder / name.removesuffix(".gz")).write_bytes(gzip.decompress((folder / name).read_bytes()))
    (folder / name).unlink()
    np.testing.assert_array_equal(load_arrays(folder)["test"][1], arrays["test"][1])


def test_load_arrays_names_missing_file(tmp_path, arrays):
    folder = write_idx_dir(tmp_path / "idx", arrays, gzipped=True)
    missing = IDX_FILES["test"][0]
    (folder / missing).unlink()
    with pytest.raises(CatalogError, match="not found") as caught:
        load_arrays(folder)
    assert missing in str(caught.value)


def test_load_arrays_refuses_missing_folder(tmp_path):
    with pytest.raises(CatalogError, match="not found"):
        load_arrays(tmp_path / "absent")


def test_load_arrays_refuses_count_mismatch(tmp_path, arrays):
    short_labels = {**arrays, "train": (arrays["train"][0], arrays["train"][1][:-1])}
    folder = write_idx_dir(tmp_path / "idx", short_labels, gzipped=False)
    with pytest.raises(CatalogError, match=f"{TRAIN_COUNT} images but {TRAIN_COUNT - 1} labels"):
        load_arrays(folder)


def test_load_arrays_refuses_label_out_of_range(tmp_path, arrays):
    labels = arrays["test"][1].copy()
    labels[3] = 10
    folder = write_idx_dir(tmp_path / "idx", {**arrays, "test": (arrays["test"][0], labels)}, gzipped=False)
    with pytest.raises(CatalogError, match="label 10"):
        load_arrays(folder)


def test_load_arrays_refuses_wrong_image_shape(tmp_path, arrays):
    images = np.zeros((TEST_COUNT, 32, 32), dtype=np.uint8)
    folder = write_idx_dir(tmp_path / "idx", {**arrays, "test": (images, arrays["test"][1])}, gzipped=True)
    with pytest.raises(CatalogError, match="28, 28"):
        load_arrays(folder)


# materialize


def test_materialize_writes_catalog_of_original_pixels(tmp_path, idx_dir, arrays):
    out = tmp_path / "out"
    catalog_path = materialize(out, idx_dir)
    assert catalog_path == out / "catalog.csv"
    rows = read_rows(catalog_path)
    assert list(rows[0]) == ["id", "file", "split", "label"]
    assert Counter(row["split"] for row in rows) == {"train": TRAIN_COUNT, "test": TEST_COUNT}
    for row in rows:
        split, index = row["split"], int(row["id"].split("-")[1])
        assert row["id"] == f"{split}-{index:05d}"
        label = CLASS_NAMES[arrays[split][1][index]]
        assert row["label"] == label
        assert row["file"] == f"images/{split}/{class_slug(label)}/{split}-{index:05d}.png"
        with Image.open(out / row["file"]) as image:
            assert image.format == "PNG" and image.mode == "L" and image.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(image), arrays[split][0][index])
    # The library's own reader accepts it without a single bad row.
    catalog = read_catalog(catalog_path, id_column="id")
    assert not catalog.bad_rows and len(catalog.rows) == TRAIN_COUNT + TEST_COUNT


def test_class_slugs():
    assert class_slug("T-shirt/top") == "t-shirt-top"
    assert class_slug("Ankle boot") == "ankle-boot"
    assert len({class_slug(name) for name in CLASS_NAMES}) == len(CLASS_NAMES)


def test_materialize_limit_keeps_every_class(tmp_path, idx_dir):
    rows = read_rows(materialize(tmp_path / "out", idx_dir, limit_per_split=12, seed=3))
    for split in ("train", "test"):
        per_class = Counter(row["label"] for row in rows if row["split"] == split)
        assert sum(per_class.values()) == 12
        assert set(per_class) == set(CLASS_NAMES)
        assert max(per_class.values()) - min(per_class.values()) <= 1


def test_materialize_limit_is_seeded(tmp_path, idx_dir):
    first = read_rows(materialize(tmp_path / "a", idx_dir, limit_per_split=10, seed=1))
    again = read_rows(materialize(tmp_path / "b", idx_dir, limit_per_split=10, seed=1))
    other = read_rows(materialize(tmp_path / "c", idx_dir, limit_per_split=10, seed=2))
    assert [row["id"] for row in first] == [row["id"] for row in again]
    assert [row["id"] for row in first] != [row["id"] for row in other]


def test_materialize_limit_above_split_size_keeps_all(tmp_path, idx_dir):
    rows = read_rows(materialize(tmp_path / "out", idx_dir, limit_per_split=TRAIN_COUNT + 5))
    assert Counter(row["split"] for row in rows) == {"train": TRAIN_COUNT, "test": TEST_COUNT}


def test_materialize_refuses_bad_limit(tmp_path, idx_dir):
    with pytest.raises(ValueError, match="limit_per_split"):
        materialize(tmp_path / "out", idx_dir, limit_per_split=0)


def test_materialize_twice_does_not_rewrite(tmp_path, idx_dir):
    out = tmp_path / "out"
    catalog_path = materialize(out, idx_dir)
    image_path = out / read_rows(catalog_path)[0]["file"]
    before = (catalog_path.stat().st_mtime_ns, image_path.stat().st_mtime_ns, (out / "fashion-mnist.json").read_text())
    assert materialize(out, idx_dir) == catalog_path
    after = (catalog_path.stat().st_mtime_ns, image_path.stat().st_mtime_ns, (out / "fashion-mnist.json").read_text())
    assert after == before
    info = json.loads((out / "fashion-mnist.json").read_text())
    assert info["counts"] == {"train": TRAIN_COUNT, "test": TEST_COUNT}
    assert info["source"]["kind"] == "idx"


def test_materialize_rewrites_when_options_change(tmp_path, idx_dir):
    out = tmp_path / "out"
    materialize(out, idx_dir)
    rows = read_rows(materialize(out, idx_dir, limit_per_split=10))
    assert Counter(row["split"] for row in rows) == {"train": 10, "test": 10}


def test_materialize_rewrites_when_an_image_is_missing(tmp_path, idx_dir):
    out = tmp_path / "out"
    catalog_path = materialize(out, idx_dir)
    image_path = out / read_rows(catalog_path)[0]["file"]
    image_path.unlink()
    materialize(out, idx_dir)
    assert image_path.is_file()


def test_materialize_rewrites_when_catalog_was_edited(tmp_path, idx_dir):
    out = tmp_path / "out"
    catalog_path = materialize(out, idx_dir)
    original = catalog_path.read_text()
    catalog_path.write_text(original.replace("Ankle boot", "Boot"))
    materialize(out, idx_dir)
    assert catalog_path.read_text() == original


def test_materialize_leaves_no_temporary_files(tmp_path, idx_dir):
    out = tmp_path / "out"
    materialize(out, idx_dir)
    assert sorted(path.name for path in out.iterdir()) == ["catalog.csv", "fashion-mnist.json", "images"]


def test_materialize_reports_progress(tmp_path, idx_dir):
    done = []
    materialize(tmp_path / "out", idx_dir, progress=done.append)
    assert sum(done) == TRAIN_COUNT + TEST_COUNT


def test_materialize_missing_idx_dir_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CatalogError, match="not found"):
        materialize(out, tmp_path / "absent")
    assert not (out / "catalog.csv").exists()


# parse_source


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("fashion-mnist", ""),
        ("fashion-mnist:/data/fashion", "/data/fashion"),
        ("fashion-mnist:relative/dir", "relative/dir"),
        ("fashion-mnist:C:/data", "C:/data"),
        ("fashion-mnist:", ""),
        ("data/catalog.csv", None),
        ("fashion-mnist.csv", None),
        ("fashion-mnist-small", None),
        ("./fashion-mnist", None),
        ("", None),
    ],
)
def test_parse_source(spec, expected):
    assert parse_source(spec) == expected
