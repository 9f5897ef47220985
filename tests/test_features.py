"""Feature store and extraction: cached by content hash, crash-safe segments, batched extraction."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from recommender.catalog import read_catalog
from recommender.errors import FeatureStoreError
from recommender.features import FeatureStore, extract_features


def test_store_round_trip_and_compaction(tmp_path):
    store = FeatureStore(tmp_path / "f.h5", "key1", 4)
    store.add(["aa", "bb"], np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32))
    store.add(["cc"], np.array([[9, 9, 9, 9]], np.float32), view="flipped")
    reopened = FeatureStore(tmp_path / "f.h5", "key1", 4)  # segments alone are enough
    assert np.array_equal(reopened.get(["bb", "aa"]), [[5, 6, 7, 8], [1, 2, 3, 4]])
    assert reopened.contains("cc", "flipped") and not reopened.contains("cc")
    reopened.compact()
    assert not list((tmp_path / "f.h5.segments").glob("*.h5"))
    again = FeatureStore(tmp_path / "f.h5", "key1", 4)
    assert len(again) == 2 and np.array_equal(again.get(["aa"]), [[1, 2, 3, 4]])
    assert np.array_equal(again.get(["cc"], "flipped"), [[9, 9, 9, 9]])


def test_other_backbones_are_kept_apart(tmp_path):
    FeatureStore(tmp_path / "f.h5", "resnet", 4).add(["aa"], np.ones((1, 4), np.float32))
    other = FeatureStore(tmp_path / "f.h5", "mobilenet", 3)
    assert not other.contains("aa")
    other.add(["aa"], np.zeros((1, 3), np.float32))
    other.compact()
    assert FeatureStore(tmp_path / "f.h5", "resnet", 4).contains("aa")  # compaction kept the other group
    with pytest.raises(FeatureStoreError, match="4 values"):
        FeatureStore(tmp_path / "f.h5", "resnet", 5)


def test_killed_writer_leaves_a_readable_store(tmp_path):
    store = FeatureStore(tmp_path / "f.h5", "key", 2)
    store.add(["aa"], np.ones((1, 2), np.float32))
    store.compact()
    # What a kill in the middle of writing leaves: a half-written temp file.
    (tmp_path / "f.h5.segments").mkdir(exist_ok=True)
    (tmp_path / "f.h5.segments" / ".0001.h5.abcd.tmp").write_bytes(b"\x89HDF\r\n half")
    (tmp_path / ".f.h5.1234.tmp").write_bytes(b"half")
    reopened = FeatureStore(tmp_path / "f.h5", "key", 2)
    assert reopened.contains("aa") and len(reopened) == 1
    reopened.add(["bb"], np.zeros((1, 2), np.float32))
    reopened.compact()
    assert not list((tmp_path / "f.h5.segments").glob(".*.tmp"))
    assert len(FeatureStore(tmp_path / "f.h5", "key", 2)) == 2


def test_corrupt_store_is_a_clear_error(tmp_path):
    (tmp_path / "f.h5").write_bytes(b"garbage")
    with pytest.raises(FeatureStoreError, match="unreadable.*delete it"):
        FeatureStore(tmp_path / "f.h5", "key", 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused_on_write(bad, tmp_path):
    store = FeatureStore(tmp_path / "f.h5", "key", 2)
    with pytest.raises(FeatureStoreError, match=r"refusing to store non-finite .*1 image\(s\) \(sha256 bbbbbbbbbbbb\)"):
        store.add(["a" * 64, "b" * 64], np.array([[1, 2], [bad, 0]], np.float32))
    assert not store.contains("a" * 64) and not list(tmp_path.rglob("*.h5"))  # nothing half-stored


def test_tampered_non_finite_features_are_a_clear_error_on_read(tmp_path):
    """A store holding NaN or inf (tampered, or an older version's) names the image on read,
    instead of feeding NaN to training and the gate; compaction drops such entries."""
    store = FeatureStore(tmp_path / "f.h5", "key", 2)
    store.add(["a" * 64, "b" * 64, "c" * 64], np.arange(6, dtype=np.float32).reshape(3, 2))
    store.compact()
    with h5py.File(tmp_path / "f.h5", "r+") as handle:
        handle["key"]["original"]["features"][1, 1] = np.nan
    reopened = FeatureStore(tmp_path / "f.h5", "key", 2)
    assert np.array_equal(reopened.get(["c" * 64, "a" * 64]), [[4, 5], [0, 1]])  # the others still read
    with pytest.raises(FeatureStoreError, match=r"f.h5 holds non-finite .*sha256 bbbbbbbbbbbb.*delete it") as raised:
        reopened.get(["a" * 64, "b" * 64])
    assert raised.value.digests == ["b" * 64]
    reopened.add(["d" * 64], np.ones((1, 2), np.float32))
    reopened.compact()
    again = FeatureStore(tmp_path / "f.h5", "key", 2)
    assert not again.contains("b" * 64) and len(again) == 3


def test_extraction_uses_cache_and_reports_bad_images(tmp_path, generated_catalog, image_files, tiny_backbone):
    folder = generated_catalog.parent
    shutil.copy(image_files["truncated_jpeg"], folder / "broken-for-features.jpg")
    csv = tmp_path / "cat.csv"
    lines = generated_catalog.read_text().splitlines()
    csv.write_text("\n".join(lines[:6] + ["broken,broken-for-features.jpg,plain,red,Broken"]) + "\n")
    shutil.copy(csv, folder / "subset.csv")
    catalog = read_catalog(folder / "subset.csv", id_column="id", label_columns=["label", "colour"])
    store = FeatureStore(tmp_path / "f.h5", tiny_backbone.identity["key"], tiny_backbone.feature_dim)
    first = extract_features(catalog.rows, tiny_backbone, store, flips=True, batch_size=2)
    assert first.extracted == 5 and [bad.id for bad in first.bad_rows] == ["broken"]
    assert "truncated" in first.bad_rows[0].reason
    assert first.features.shape == (5, 2048) and first.flipped.shape == (5, 2048)
    assert first.features.dtype == np.float32
    second = extract_features(catalog.rows, tiny_backbone, store, flips=True, batch_size=2)
    assert second.extracted == 0
    assert np.allclose(second.features, first.features) and np.allclose(second.flipped, first.flipped)
    # The features are those of a direct forward pass (cached rows keep catalog order).
    from recommender.images import load_image

    direct = tiny_backbone.extract(np.stack([load_image(row.path, tiny_backbone.input_size) for row in first.rows]))
    assert np.allclose(direct, first.features, rtol=1e-4, atol=1e-4)
    with h5py.File(tmp_path / "f.h5") as handle:
        assert handle[tiny_backbone.identity["key"]]["original"]["features"].shape == (5, 2048)
    # Tampered: the cached features of one image become inf; extraction names its catalog row.
    with h5py.File(tmp_path / "f.h5", "r+") as handle:
        group = handle[tiny_backbone.identity["key"]]["flipped"]
        row = [h.decode() for h in group["hashes"][:]].index(first.hashes[2])
        group["features"][row, 7] = np.inf
    tampered = FeatureStore(tmp_path / "f.h5", tiny_backbone.identity["key"], tiny_backbone.feature_dim)
    item = first.rows[2]
    with pytest.raises(FeatureStoreError, match=rf"catalog item '{item.id}' \(line {item.line}\): .*non-finite"):
        extract_features(catalog.rows, tiny_backbone, tampered, flips=True, batch_size=2)
