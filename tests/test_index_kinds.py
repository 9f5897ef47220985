"""Compressed index kinds (IVF-SQ8, IVF-PQ): exact re-ranking, sharded builds, the memory rule,
files on disk, filtered search and a bundle built with one."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest

from recommender.errors import BundleError, IndexBuildError
from recommender.index import (
    EMBEDDINGS_FILE,
    IVF_KINDS,
    VectorIndex,
    build_sharded,
    choose_kind,
    measure_recall,
    resident_bytes,
)

DIMENSION = 64


@pytest.fixture(scope="module")
def vectors():
    """3,000 clustered 64-d vectors (enough for OPQ and 76 inverted lists)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, DIMENSION)) * 3
    return (centres[rng.integers(0, 40, 3000)] + rng.normal(size=(3000, DIMENSION))).astype(np.float32)


@pytest.fixture(scope="module", params=IVF_KINDS)
def built(request, vectors):
    """``(kind, index)`` for each IVF kind, built once per module."""
    return request.param, VectorIndex.build(vectors, request.param, use_gpu=False)


def exact_neighbours(stored: np.ndarray, query: np.ndarray, k: int, among: np.ndarray | None = None):
    """Brute-force ``k`` nearest of ``query`` among rows ``among`` of ``stored`` (float32 maths)."""
    among = np.arange(len(stored)) if among is None else among
    distances = np.sqrt(((stored[among].astype(np.float32) - query) ** 2).sum(1))
    order = np.argsort(distances, kind="stable")[:k]
    return among[order], distances[order]


def test_ivf_search_rerank_returns_exact_distances_to_the_stored_vectors(built, vectors):
    kind, index = built
    assert index.kind == kind and index.size == len(vectors) and index.device == "cpu"
    assert index.embeddings.dtype == np.float16
    stored = index.embeddings.astype(np.float32)
    queries = vectors[::100] + np.random.default_rng(1).normal(size=(30, DIMENSION)).astype(np.float32) * 0.3
    result = index.search(queries, 6)
    hits = 0
    for query, positions, distances in zip(queries, result.positions, result.distances):
        # Whatever the codes picked, the distances are exact ones to the float16 rows, in order.
        assert np.allclose(distances, np.sqrt(((stored[positions] - query) ** 2).sum(1)), rtol=1e-4, atol=1e-4)
        assert np.all(np.diff(distances) >= 0)
        hits += len(set(positions.tolist()) & set(exact_neighbours(stored, query, 6)[0].tolist()))
    assert hits / (6 * len(queries)) >= 0.9, f"{kind} recall@6 {hits / (6 * len(queries)):.3f}"
    assert measure_recall(index, vectors, queries=300) >= 0.9
    # Item vectors are the stored float16 ones, never decoded codes.
    assert np.array_equal(index.reconstruct(17), vectors[17].astype(np.float16).astype(np.float32))
    with pytest.raises(IndexError):
        index.reconstruct(len(vectors))


@pytest.mark.parametrize("kind", IVF_KINDS)
def test_sharded_build_equals_one_add(kind, vectors):
    """Train once, add uneven shards separately, merge: the index a single add makes."""
    single = VectorIndex.build(vectors, kind, use_gpu=False)
    calls = []

    def recording_map(function, *columns):
        calls.append(len(columns[0]))
        return map(function, *columns)

    sharded = build_sharded(vectors, kind, 7, map_shards=recording_map)
    assert calls == [7]
    assert sharded.size == single.size and sharded.parameters == single.parameters
    queries = vectors[5::97]
    first, second = single.search(queries, 6), sharded.search(queries, 6)
    assert np.array_equal(first.positions, second.positions)
    assert np.array_equal(first.distances, second.distances)
    assert np.array_equal(np.asarray(sharded.embeddings), np.asarray(single.embeddings))


@pytest.mark.parametrize("memory_map", [False, True], ids=["lists-in-memory", "lists-mapped"])
def test_saved_ivf_index_loads_and_answers_the_same(built, vectors, tmp_path, memory_map):
    kind, index = built
    index.save(tmp_path / "index.faiss")
    assert (tmp_path / EMBEDDINGS_FILE).is_file()
    loaded = VectorIndex.load(
        tmp_path / "index.faiss", use_gpu=False, parameters=index.parameters, memory_map=memory_map
    )
    assert loaded.kind == kind and loaded.parameters == index.parameters
    assert isinstance(loaded.embeddings, np.memmap)  # re-rank rows stay in the file's pages
    queries = vectors[3::150]
    before, after = index.search(queries, 6), loaded.search(queries, 6)
    assert np.array_equal(before.positions, after.positions)
    assert np.array_equal(before.distances, after.distances)
    assert np.array_equal(loaded.reconstruct(5), index.reconstruct(5))


def test_ivf_index_without_its_embeddings_is_a_bundle_error(built, tmp_path):
    kind, index = built
    index.save(tmp_path / "index.faiss")
    (tmp_path / EMBEDDINGS_FILE).unlink()
    with pytest.raises(BundleError, match=f"the {kind} index needs {EMBEDDINGS_FILE}"):
        VectorIndex.load(tmp_path / "index.faiss", use_gpu=False)
    np.save(tmp_path / EMBEDDINGS_FILE, np.zeros((10, DIMENSION), np.float16))
    with pytest.raises(BundleError, match=r"expected \(3000, 64\) float16 embeddings"):
        VectorIndex.load(tmp_path / "index.faiss", use_gpu=False)


def test_filtered_ivf_search_is_exact_on_small_subsets_and_only_allowed_above(built, vectors):
    kind, index = built
    stored = index.embeddings.astype(np.float32)
    rng = np.random.default_rng(2)
    allowed = np.zeros(len(vectors), bool)
    allowed[rng.choice(len(vectors), 200, replace=False)] = True
    assert index.filter_method(200) == "exact scan"
    queries = vectors[:10]
    result = index.search(queries, 6, allowed=allowed)
    for query, positions, distances in zip(queries, result.positions, result.distances):
        expected, expected_distances = exact_neighbours(stored, query, 6, np.flatnonzero(allowed))
        assert positions.tolist() == expected.tolist()
        assert np.allclose(distances, expected_distances, rtol=1e-4, atol=1e-4)
    # Above the scan limit the lists are searched with a selector: only allowed items come back.
    wide = rng.random(len(vectors)) < 0.5
    index.exact_scan_up_to = 100
    try:
        assert index.filter_method(int(wide.sum())) == "ivf + selector"
        walked = index.search(queries, 6, allowed=wide)
    finally:
        index.exact_scan_up_to = 4000
    assert wide[walked.positions[walked.positions >= 0]].all()
    assert (walked.positions >= 0).sum() >= 0.9 * walked.positions.size
    assert index.search(queries[:1], 6, allowed=np.zeros(len(vectors), bool)).positions.tolist() == [[-1] * 6]


def test_ivf_pq_on_a_catalog_smaller_than_the_dimension_drops_the_rotation(vectors):
    """OPQ needs d training points (faiss aborts below): plain PQ codes then, still re-ranked."""
    small = VectorIndex.build(vectors[:40], "ivf-pq", use_gpu=False)
    assert not small.parameters.factory.startswith("OPQ") and small.parameters.pq_bits == 1
    found = small.search(vectors[:5], 6)
    assert found.positions[:, 0].tolist() == [0, 1, 2, 3, 4]  # each finds itself first
    assert VectorIndex.build(vectors, "ivf-pq", use_gpu=False).parameters.factory.startswith("OPQ")
    with pytest.raises(IndexBuildError, match="needs at least 2 vectors"):
        VectorIndex.build(vectors[:1], "ivf-pq", use_gpu=False)


def test_auto_chooses_the_first_kind_that_fits_the_memory_budget(caplog):
    million = 1_000_000
    assert choose_kind(2_000) == "flat" and choose_kind(99_999) == "flat"
    assert choose_kind(million) == "hnsw"  # no budget
    sizes = {kind: resident_bytes(kind, million) for kind in ("flat", "hnsw", "ivf-sq8", "ivf-pq")}
    assert sizes["ivf-pq"] < sizes["ivf-sq8"] < sizes["flat"] < sizes["hnsw"]
    assert choose_kind(million, sizes["hnsw"]) == "hnsw"
    assert choose_kind(million, sizes["hnsw"] - 1) == "ivf-sq8"
    assert choose_kind(million, sizes["ivf-sq8"] - 1) == "ivf-pq"
    # A small catalog whose flat index would not fit the budget is compressed too (HNSW is
    # bigger than flat, so the next is IVF-SQ8).
    assert choose_kind(50_000, resident_bytes("flat", 50_000)) == "flat"
    assert choose_kind(50_000, resident_bytes("flat", 50_000) - 1) == "ivf-sq8"
    with caplog.at_level(logging.WARNING, logger="recommender.index"):
        assert choose_kind(million, 1_000_000) == "ivf-pq"
    assert "no index kind fits" in caplog.text
    # Per vector at 512-d: what the README's table says.
    assert round(sizes["ivf-sq8"] / million) == 520 + round(4 * 512 * 4000 / million)


def test_index_memory_flag_reads_decimal_and_binary_sizes(tmp_path):
    from indexer.commands.flags import build_config_from_args, memory_size
    from recommender.cli import make_parser

    assert memory_size("2GB") == 2 * 10**9
    assert memory_size("512MiB") == 512 * 2**20
    assert memory_size("1.5 GiB") == int(1.5 * 2**30)
    assert memory_size("800000000") == 800_000_000
    for bad in ("2XB", "0", "-1GB", "GB", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            memory_size(bad)
    parser = make_parser()
    args = parser.parse_args(["build", "--out", str(tmp_path / "b"), "--catalog", "c.csv", "--index-memory", "3GB"])
    assert build_config_from_args(args).index_memory_bytes == 3 * 10**9
    args = parser.parse_args(["rebuild", "--root", str(tmp_path), "--catalog", "c.csv", "--index", "ivf-pq"])
    assert build_config_from_args(args).index_kind == "ivf-pq"


@pytest.fixture(scope="module")
def ivf_bundle(generated_catalog, tiny_config, tmp_path_factory):
    """The tiny catalog built with ``--index ivf-sq8`` (features come from the session's store)."""
    from indexer.build import build_bundle

    out = tmp_path_factory.mktemp("ivf") / "bundle"
    build_bundle(generated_catalog, out, replace(tiny_config, index_kind="ivf-sq8"))
    return out


def test_a_bundle_with_a_compressed_index_records_it_and_answers_exactly(ivf_bundle):
    from recommender.bundle import verify_bundle
    from recommender.engine import load_bundle
    from recommender.manifest import Manifest

    manifest = verify_bundle(ivf_bundle)
    record = manifest.index
    assert record.kind == "ivf-sq8" and record.size == manifest.counts.items
    assert record.parameters.factory == f"IVF{record.parameters.nlist},SQ8"
    assert record.embeddings_file == EMBEDDINGS_FILE and EMBEDDINGS_FILE in manifest.files
    assert record.rerank_bytes_per_vector == 2 * manifest.embedding_dimension
    assert 0.9 <= record.recall_at_6 <= 1.0 and record.recall_queries == record.size
    assert Manifest.from_json(manifest.to_json()) == manifest

    engine = load_bundle(ivf_bundle)
    assert engine.index.kind == "ivf-sq8" and engine.index.rerank_factor == record.parameters.rerank_factor
    stored = np.load(ivf_bundle / EMBEDDINGS_FILE).astype(np.float32)
    ids = [row.id for row in engine.rows]
    for position in (0, 13, 50):
        answer = engine.similar_to_item(ids[position], 6)
        same_image = {p for p, row in enumerate(engine.rows) if row.sha256 == engine.rows[position].sha256}
        others = np.array([p for p in range(len(ids)) if p not in same_image])
        expected, _ = exact_neighbours(stored, stored[position], 6, others)
        # nprobe covers every list of a 96-item catalog: the answer is the exact one.
        assert [neighbour["id"] for neighbour in answer["neighbors"]] == [ids[p] for p in expected]


def test_an_old_index_record_and_a_tampered_embeddings_file(ivf_bundle, tmp_path):
    from recommender.bundle import verify_bundle
    from recommender.manifest import Manifest

    payload = json.loads((ivf_bundle / "manifest.json").read_text())
    old = {**payload, "index": {"kind": "flat", "size": payload["index"]["size"]}}
    manifest = Manifest.from_json(old)
    assert manifest.index.parameters.to_json() == {} and manifest.index.recall_at_6 is None
    assert manifest.to_json()["index"] == old["index"]  # an old record writes back unchanged
    with pytest.raises(BundleError, match="recall_at_6"):
        Manifest.from_json({**payload, "index": {**payload["index"], "recall_at_6": 1.5}})

    copy = tmp_path / "bundle"
    shutil.copytree(ivf_bundle, copy)
    embeddings = np.load(copy / EMBEDDINGS_FILE)
    embeddings[0, 0] += 1
    np.save(copy / EMBEDDINGS_FILE, embeddings)
    with pytest.raises(BundleError, match=EMBEDDINGS_FILE):
        verify_bundle(copy)


def test_panels_of_a_compressed_bundle_equal_similar_to_item(ivf_bundle):
    """Panels start from the stored float16 vectors (an IVF index has no float32 copy to read)."""
    from indexer.panels import compute_panels
    from recommender.engine import load_bundle

    engine = load_bundle(ivf_bundle)
    ids = [row.id for row in engine.rows]
    for per_column in (None, "colour"):
        positions, neighbors, distances = compute_panels(ivf_bundle, 6, per_column)
        assert positions == list(range(len(ids)))
        for position in positions:
            filters = {per_column: engine.rows[position].labels[per_column]} if per_column else None
            expected = engine.similar_to_item(ids[position], 6, filters=filters)["neighbors"]
            assert [ids[p] for p in neighbors[position] if p >= 0] == [n["id"] for n in expected]
            assert np.allclose(distances[position][: len(expected)], [n["distance"] for n in expected], atol=1e-4)
    with pytest.raises(IndexError):
        engine.index.reconstruct_batch(np.array([0, len(ids)]))
