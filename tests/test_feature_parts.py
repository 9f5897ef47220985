"""Part-file feature store: the FeatureStore contract on Parquet parts, nothing rewritten, kill-safe."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recommender.catalog import read_catalog
from recommender.errors import FeatureStoreError
from recommender.feature_parts import PartFeatureStore, PartWriter, open_feature_store
from recommender.features import FeatureStore, StoredFeatures, extract_features, take_rows


def digest(i: int) -> str:
    return f"{i:064x}"[::-1]  # spread over the hex prefixes, as real sha256s are


def test_round_trip_newest_wins_and_compaction_moves_rows_into_prefix_partitions(tmp_path):
    store = PartFeatureStore(tmp_path / "parts", "key1", 4)
    vectors = np.arange(40, dtype=np.float32).reshape(10, 4)
    store.add([digest(i) for i in range(10)], vectors)
    store.add([digest(3)], np.full((1, 4), 7, np.float32))  # the newer part wins
    store.add([digest(20)], np.ones((1, 4), np.float32), view="flipped")
    reopened = PartFeatureStore(tmp_path / "parts", "key1", 4)
    assert len(reopened) == 10 and reopened.contains(digest(20), "flipped") and not reopened.contains(digest(20))
    assert np.array_equal(reopened.get([digest(3), digest(0)]), [[7, 7, 7, 7], [0, 1, 2, 3]])
    assert list(reopened.missing([digest(1), digest(99)])) == [False, True]

    reopened.compact()
    incoming = list((tmp_path / "parts" / "key1").rglob("incoming/part-*.parquet"))
    partitions = {p.parent.name for p in (tmp_path / "parts" / "key1" / "original").glob("prefix=*/*.parquet")}
    assert not incoming and partitions == {f"prefix={digest(i)[:2]}" for i in range(10)}
    again = PartFeatureStore(tmp_path / "parts", "key1", 4)
    assert np.array_equal(
        again.get([digest(i) for i in range(10)])[[0, 3, 9]], [[0, 1, 2, 3], [7, 7, 7, 7], vectors[9]]
    )

    # Later rows go to new parts beside the old ones: no part is ever rewritten.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "parts").rglob("prefix=*/*.parquet")}
    again.add([digest(50)], np.zeros((1, 4), np.float32))
    again.compact()
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "parts").rglob("prefix=*/*.parquet")}
    assert all(after[p] == mtime for p, mtime in before.items()) and len(after) == len(before) + 1
    assert len(PartFeatureStore(tmp_path / "parts", "key1", 4)) == 11


def test_writers_without_a_store_handle_add_parts_a_reader_sees_after_refresh(tmp_path):
    """What Ray actors do: each writes its own parts; the driver's store reads them on refresh."""
    store = PartFeatureStore(tmp_path / "parts", "key", 2)
    PartWriter(tmp_path / "parts", "key", 2).write([digest(1)], np.ones((1, 2), np.float32))
    assert not store.contains(digest(1))
    store.refresh()
    assert np.array_equal(store.get([digest(1)]), [[1, 1]])


def test_a_killed_writer_or_compaction_leaves_a_readable_store(tmp_path):
    store = PartFeatureStore(tmp_path / "parts", "key", 2)
    store.add([digest(1), digest(2)], np.ones((2, 2), np.float32))
    incoming = tmp_path / "parts" / "key" / "original" / "incoming"
    (incoming / ".part-x.parquet.abcd1234.tmp").write_bytes(b"PAR1 half")  # a writer killed mid-write
    kept = next(incoming.glob("part-*.parquet")).read_bytes()
    store.compact()
    # A compaction killed after writing the partitions but before deleting the incoming part:
    (incoming / "part-00000000000000000001-deadbeef.parquet").write_bytes(kept)
    reopened = PartFeatureStore(tmp_path / "parts", "key", 2)
    assert len(reopened) == 2 and np.array_equal(reopened.get([digest(2)]), [[1, 1]])
    reopened.compact()
    assert not list(incoming.iterdir()) and len(PartFeatureStore(tmp_path / "parts", "key", 2)) == 2


def test_other_widths_formats_and_broken_parts_are_clear_errors(tmp_path):
    PartFeatureStore(tmp_path / "parts", "key", 4).add([digest(1)], np.ones((1, 4), np.float32))
    with pytest.raises(FeatureStoreError, match="4 values, the backbone gives 5"):
        PartFeatureStore(tmp_path / "parts", "key", 5)
    assert not PartFeatureStore(tmp_path / "parts", "other", 3).contains(digest(1))  # kept apart by key
    part = next((tmp_path / "parts").rglob("part-*.parquet"))
    part.write_bytes(b"garbage")
    with pytest.raises(FeatureStoreError, match="unreadable.*delete it"):
        PartFeatureStore(tmp_path / "parts", "key", 4)
    (tmp_path / "parts" / "store.json").write_text(json.dumps({"format": "recommender-feature-parts", "version": 9}))
    with pytest.raises(FeatureStoreError, match="version 9"):
        PartFeatureStore(tmp_path / "parts", "key", 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_are_refused(bad, tmp_path):
    store = PartFeatureStore(tmp_path / "parts", "key", 2)
    with pytest.raises(FeatureStoreError, match=r"non-finite .*1 image\(s\)"):
        store.add([digest(1), digest(2)], np.array([[1, 2], [bad, 0]], np.float32))
    assert not store.contains(digest(1)) and not list(tmp_path.rglob("part-*.parquet"))


def test_open_feature_store_picks_the_kind_by_path(tmp_path):
    assert isinstance(open_feature_store(tmp_path / "f.h5", "key", 2), FeatureStore)
    assert isinstance(open_feature_store(tmp_path / "features.parts", "key", 2), PartFeatureStore)


def test_extraction_gives_the_same_features_with_either_store(generated_catalog, tiny_backbone, tmp_path):
    catalog = read_catalog(generated_catalog, label_columns=["label"])
    rows = catalog.rows[:12]
    by_store = {}
    for name in ("f.h5", "f.parts"):
        store = open_feature_store(tmp_path / name, tiny_backbone.identity["key"], tiny_backbone.feature_dim)
        first = extract_features(rows, tiny_backbone, store, flips=True, batch_size=5)
        again = extract_features(rows, tiny_backbone, store, flips=True, batch_size=5)  # all from the store
        assert first.extracted == 12 and again.extracted == 0
        assert np.array_equal(first.features, again.features) and np.array_equal(first.flipped, again.flipped)
        by_store[name] = again
    assert np.array_equal(by_store["f.h5"].features, by_store["f.parts"].features)
    assert by_store["f.h5"].hashes == by_store["f.parts"].hashes


def test_stored_features_read_only_the_rows_asked_and_part_order_groups_rows_by_file(tmp_path):
    store = PartFeatureStore(tmp_path / "parts", "key1", 3)
    vectors = np.arange(60, dtype=np.float32).reshape(20, 3)
    for start in range(0, 20, 5):  # four parts of five rows
        store.add([digest(i) for i in range(start, start + 5)], vectors[start : start + 5])
    asked = [digest(i) for i in (17, 2, 11, 3, 16)]
    lazy = StoredFeatures(store, asked)
    assert lazy.shape == (5, 3) and len(lazy) == 5
    assert np.array_equal(lazy.take([4, 0]), vectors[[16, 17]])
    subset = lazy.subset([1, 3])  # still in the store
    assert isinstance(subset, StoredFeatures) and np.array_equal(take_rows(subset, [0, 1]), vectors[[2, 3]])
    assert np.array_equal(take_rows(vectors, [5, 1]), vectors[[5, 1]])

    order = store.part_order(asked)
    assert sorted(order.tolist()) == [0, 1, 2, 3, 4]
    rows = (17, 2, 11, 3, 16)
    files = [rows[i] // 5 for i in order]  # digest(i) is in part i // 5
    assert files == sorted(files)  # rows of one part are next to each other
    with pytest.raises(FeatureStoreError, match="no stored original features"):
        store.part_order([digest(99)])
    with pytest.raises(FeatureStoreError, match="no stored flipped features"):
        StoredFeatures(store, asked, "flipped").take([0])
