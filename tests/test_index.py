"""FAISS index: exact search equals numpy brute force; HNSW is close; save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest

from recommender.errors import BundleError, QueryError
from recommender.index import SearchResult, VectorIndex, drop_excluded


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


def test_drop_excluded_keeps_the_first_k_others_in_order():
    found = SearchResult(
        positions=np.array([[4, 1, 7, 2], [3, 5, 6, 0]]),
        distances=np.array([[0.0, 1.0, 2.0, 3.0], [0.5, 1.5, 2.5, 3.5]], np.float32),
    )
    kept = drop_excluded(found, [{4}, set()], 2)
    assert kept.positions.tolist() == [[1, 7], [3, 5]]
    assert kept.distances.tolist() == [[1.0, 2.0], [0.5, 1.5]]
    padded = drop_excluded(SearchResult(np.array([[4, -1]]), np.zeros((1, 2), np.float32)), [{4}], 2)
    assert padded.positions.tolist() == [[-1, -1]] and np.isinf(padded.distances).all()


def test_search_excluding_equals_brute_force_over_the_others(vectors):
    """What "leave the query itself out" means for the engine and the evaluation alike."""
    index = VectorIndex.build(vectors, "flat", use_gpu=False)
    queries = vectors[:20]
    excluded = [{i, (i + 7) % 20} if i % 2 else set() for i in range(20)]  # some exclude a twin too
    result = index.search_excluding(queries, excluded, 6)
    for i, query in enumerate(queries):
        others = [p for p in range(len(vectors)) if p not in excluded[i]]
        order, distances = brute_force(vectors[others], query[None], 6)
        assert result.positions[i].tolist() == [others[p] for p in order[0]]
        assert np.allclose(result.distances[i], distances[0], rtol=1e-4, atol=1e-3)
    tiny = VectorIndex.build(vectors[:3], "flat", use_gpu=False)
    padded = tiny.search_excluding(vectors[:1], [{0}], 6)  # fewer items than asked: padded
    assert sorted(padded.positions[0, :2].tolist()) == [1, 2] and padded.positions[0, 2:].tolist() == [-1] * 4


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
