"""FAISS index: exact search equals numpy brute force; HNSW is close; save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest

from recommender.errors import BundleError, QueryError
from recommender.index import VectorIndex


def brute_force(vectors, queries, k):
    distances = np.sqrt(((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(-1))
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(distances, order, axis=1)


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32)) * 3
    return (centres[rng.integers(0, 20, 2000)] + rng.normal(size=(2000, 32))).astype(np.float32)


def test_flat_equals_numpy_brute_force(vectors):
    index = VectorIndex.build(vectors, "flat", use_gpu=False)
    queries = vectors[:50] + np.random.default_rng(1).normal(size=(50, 32)).astype(np.float32)
    result = index.search(queries, 6)
    expected_positions, expected_distances = brute_force(vectors, queries, 6)
    assert np.array_equal(result.positions, expected_positions)
    assert np.allclose(result.distances, expected_distances, rtol=1e-4, atol=1e-3)


def test_single_query_matches_batch(vectors):
    index = VectorIndex.build(vectors, "flat", use_gpu=False)
    batch = index.search(vectors[:5], 6)
    for i in range(5):
        single = index.search(vectors[i : i + 1], 6)
        assert np.array_equal(single.positions[0], batch.positions[i])


def test_hnsw_recall_against_exact(vectors):
    exact = VectorIndex.build(vectors, "flat", use_gpu=False).search(vectors[:200], 6).positions
    approx = VectorIndex.build(vectors, "hnsw", use_gpu=False).search(vectors[:200], 6).positions
    recall = np.mean([len(set(a) & set(e)) / 6 for a, e in zip(approx, exact)])
    assert recall >= 0.95


def test_auto_picks_flat_for_small_catalogs(vectors):
    assert VectorIndex.build(vectors, "auto", use_gpu=False).kind == "flat"


def test_k_larger_than_catalog_and_bad_k(vectors):
    index = VectorIndex.build(vectors[:4], "flat", use_gpu=False)
    assert index.search(vectors[:1], 10).positions.shape == (1, 4)
    with pytest.raises(QueryError):
        index.search(vectors[:1], 0)
    with pytest.raises(QueryError):
        index.search(vectors[:1, :5], 3)


def test_save_load_round_trip(vectors, tmp_path):
    for kind in ("flat", "hnsw"):
        index = VectorIndex.build(vectors, kind, use_gpu=False)
        index.save(tmp_path / f"{kind}.faiss")
        loaded = VectorIndex.load(tmp_path / f"{kind}.faiss", use_gpu=False)
        assert loaded.kind == kind and loaded.size == len(vectors)
        assert np.array_equal(loaded.search(vectors[:10], 6).positions, index.search(vectors[:10], 6).positions)
        assert np.allclose(loaded.reconstruct(3), vectors[3])


def test_unreadable_index_file(tmp_path):
    path = tmp_path / "broken.faiss"
    path.write_bytes(b"not an index")
    with pytest.raises(BundleError, match="cannot read FAISS index"):
        VectorIndex.load(path, use_gpu=False)
