"""Search speed and recall: the original scipy loop, numpy, FAISS exact, HNSW and IVF-SQ8 with refine.

    python bench/search.py [--sizes 10000,50000,100000,1000000] [--data clothing,clustered]
                           [--bundle BUNDLE] [--queries 200] [--quick]

Methods, all returning the 6 nearest of one query at a time (FAISS on one OpenMP thread, as
the engine serves single queries):

- ``original``: the original post, scipy ``euclidean`` to every item in a Python loop, then a
  sort (measured up to 50,000 items: seconds per query beyond);
- ``numpy``: one matrix-vector product and ``argpartition``;
- ``faiss flat``: ``recommender.index.VectorIndex`` exact (``IndexFlatL2``);
- ``faiss hnsw``: ``VectorIndex`` approximate with the engine's current HNSW settings;
- ``faiss ivf-sq8+refine``: the proposed approximate index, ``IVF{nlist},SQ8`` (8-bit codes
  scanned in ``nprobe`` lists) with an exact re-ranking of ``k_factor * k`` candidates
  (``IndexRefineFlat``), see :data:`PROPOSED`.

recall@6 of each approximate index is measured against the exact one. Two kinds of vectors,
since recall depends on their structure:

- ``clothing``: real embeddings (the 3,409 standardized, flip-averaged embeddings of a
  MobileNet bundle built on clothing-small, or those of ``--bundle``) tiled to the size with
  Gaussian noise shaped by their own covariance (noise variance = their variance), then
  standardized: keeps the low intrinsic dimension of real embeddings;
- ``clustered``: 200 Gaussian clusters with isotropic unit noise in all 512 dimensions, then
  standardized: a pessimistic case, much harder for graph and list indexes than real data.

Build time and index size (serialized bytes; the vectors themselves for the two brute-force
methods) are reported. Writes bench/results/search.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from common import CLOTHING, MOBILENET, machine, save_results  # noqa: E402
from scipy.spatial import distance  # noqa: E402

DIMENSION = 512
K = 6

#: Largest catalog the original scipy loop is timed on (0.2 s per query at 50,000 items).
ORIGINAL_UP_TO = 50_000

#: The proposed approximate index. nlist ~ 4 sqrt(n) rounded to a power of two (1,024 at
#: 100,000 items); nprobe lists scanned per query; k_factor * k candidates re-ranked exactly.
PROPOSED = {"nprobe": 96, "k_factor": 4, "training_points_per_list": 64}

TARGETS = {"approximate_ms_at_100k": 1.0, "recall_at_6": 0.95, "flat_vs_original_at_50k": 20.0}


def clustered(n: int, seed: int = 0, clusters: int = 200) -> np.ndarray:
    """(n, 512) float32: Gaussian clusters with unit noise, then standardized per column."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIMENSION)).astype(np.float32) * 1.5
    data = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, DIMENSION)).astype(np.float32)
    return ((data - data.mean(0)) / data.std(0)).astype(np.float32)


def tile_with_noise(base: np.ndarray, n: int, seed: int = 0, noise_share: float = 1.0) -> np.ndarray:
    """(n, d) float32: rows of ``base`` drawn at random plus noise with base's covariance.

    Args:
        base: (m, d) real embeddings.
        n: rows to make.
        seed: random seed (queries use another seed than the catalog).
        noise_share: noise covariance = this share of the base's covariance.

    Returns:
        Standardized (n, d) float32.
    """
    rng = np.random.default_rng(seed)
    base = np.asarray(base, np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(base.T))
    shaping = eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None) * noise_share)
    out = np.empty((n, base.shape[1]), np.float32)
    for start in range(0, n, 100_000):  # in blocks: 1M x 512 float64 noise would take 4 GB
        count = min(100_000, n - start)
        out[start : start + count] = (
            base[rng.integers(0, len(base), count)] + rng.normal(size=(count, base.shape[1])) @ shaping.T
        )
    mean, std = out.mean(0), out.std(0)
    return ((out - mean) / np.where(std > 0, std, 1)).astype(np.float32)


def real_embeddings(bundle: Path | None, workdir: Path) -> tuple[np.ndarray, str]:
    """Standardized embeddings of a real bundle (built from clothing-small when none is given)."""
    from recommender.index import VectorIndex

    if bundle is None:
        from dataclasses import replace

        from indexer.build import build_bundle
        from recommender.backbones import BackboneSpec
        from recommender.config import BuildConfig

        config = replace(
            BuildConfig(),
            splits=("train", "validation"),
            backbone=BackboneSpec(name=f"tflite:{MOBILENET}"),
            feature_store=workdir / "features.h5",
        )
        print("building a MobileNet bundle on clothing-small for real embeddings ...", flush=True)
        bundle = workdir / "clothing"
        build_bundle(CLOTHING / "labels.csv", bundle, config)
    index = VectorIndex.load(Path(bundle) / "index.faiss", use_gpu=False)
    vectors = np.stack([index.reconstruct(i) for i in range(index.size)])
    return vectors, f"{len(vectors)} real embeddings of {bundle}"


def per_query_ms(search, queries: np.ndarray, budget_s: float = 5.0) -> tuple[float, float]:
    """p50 and p99 milliseconds of ``search(one_query)`` over the queries (stops at the budget)."""
    times = []
    started = time.perf_counter()
    for query in queries:
        t0 = time.perf_counter()
        search(query[None, :])
        times.append((time.perf_counter() - t0) * 1000)
        if time.perf_counter() - started > budget_s and len(times) >= 5:
            break
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def original_method(catalog: np.ndarray):
    """The original post: scipy euclidean distance to every item in a Python loop, then sort."""

    def search(query):
        distances = [distance.euclidean(query[0], item) for item in catalog]
        return np.argsort(distances)[:K]

    return search


def numpy_method(catalog: np.ndarray):
    """Brute force in numpy: ||x||^2 - 2 x.q, then a partial sort."""
    squared_norms = (catalog**2).sum(1)

    def search(query):
        distances = squared_norms - 2 * catalog @ query[0]
        top = np.argpartition(distances, K)[:K]
        return top[np.argsort(distances[top])]

    return search


def proposed_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: 4 sqrt(n) rounded to a power of two, at least 16."""
    return int(max(16, 2 ** round(np.log2(4 * np.sqrt(n)))))


def build_proposed(catalog: np.ndarray):
    """The proposed IVF-SQ8 index with exact refinement, trained on a sample. Returns the index."""
    import faiss

    nlist = proposed_nlist(len(catalog))
    index = faiss.index_factory(catalog.shape[1], f"IVF{nlist},SQ8,RFlat")
    sample_size = min(len(catalog), PROPOSED["training_points_per_list"] * nlist)
    sample = catalog[np.random.default_rng(0).choice(len(catalog), sample_size, replace=False)]
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index.train(sample)
    index.add(catalog)
    faiss.extract_index_ivf(index).nprobe = PROPOSED["nprobe"]
    index.k_factor = PROPOSED["k_factor"]
    return index


def faiss_search(index):
    """One query on one OpenMP thread, as ``VectorIndex.search`` runs single queries."""
    import faiss

    def search(query):
        faiss.omp_set_num_threads(1)
        return index.search(query, K)

    return search


def batch_positions(index, queries: np.ndarray) -> np.ndarray:
    """(m, 6) positions of a batch search on all cores (for recall)."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return index.search(queries, K)[1]


def recall(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact 6 nearest that the approximate search also returns."""
    return float(np.mean([len(set(a) & set(e)) / K for a, e in zip(approximate, exact)]))


def measure_size(data: str, catalog: np.ndarray, queries: np.ndarray, budget_s: float) -> list[dict]:
    """Every method on one catalog. Returns result rows."""
    import faiss

    from recommender.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_LINKS, VectorIndex

    n = len(catalog)
    rows, exact = [], None
    methods = ["original (scipy loop)", "numpy brute force", "faiss flat", "faiss hnsw", "faiss ivf-sq8+refine"]
    for method in methods:
        if method.startswith("original") and n > ORIGINAL_UP_TO:
            continue
        started = time.perf_counter()
        index = None
        settings = None
        if method.startswith("original"):
            search, memory = original_method(catalog), catalog.nbytes
        elif method.startswith("numpy"):
            search, memory = numpy_method(catalog), catalog.nbytes
        elif method == "faiss flat":
            wrapped = VectorIndex.build(catalog, "flat", use_gpu=False)
            index, settings = wrapped.cpu_index, "IndexFlatL2"
            search = lambda query, wrapped=wrapped: wrapped.search(query, K)  # noqa: E731
        elif method == "faiss hnsw":
            wrapped = VectorIndex.build(catalog, "hnsw", use_gpu=False)
            index = wrapped.cpu_index
            settings = f"HNSW M={HNSW_LINKS}, efConstruction={HNSW_EF_CONSTRUCTION}, efSearch={HNSW_EF_SEARCH}"
            search = lambda query, wrapped=wrapped: wrapped.search(query, K)  # noqa: E731
        else:
            index = build_proposed(catalog)
            settings = (
                f"IVF{proposed_nlist(n)},SQ8 + IndexRefineFlat, nprobe={PROPOSED['nprobe']}, "
                f"k_factor={PROPOSED['k_factor']}"
            )
            search = faiss_search(index)
        build_seconds = time.perf_counter() - started
        if index is not None:
            memory = faiss.serialize_index(index).nbytes
        p50, p99 = per_query_ms(search, queries, budget_s=budget_s)
        found_recall = None
        if method == "faiss flat":
            exact = batch_positions(index, queries)
        elif index is not None and exact is not None:
            found_recall = recall(batch_positions(index, queries), exact)
        row = {
            "data": data,
            "n": n,
            "method": method,
            "settings": settings,
            "p50_ms": p50,
            "p99_ms": p99,
            "recall_at_6": found_recall,
            "build_s": build_seconds,
            "memory_mb": memory / 1e6,
        }
        rows.append(row)
        recall_text = f"{found_recall:9.3f}" if found_recall is not None else f"{'':9s}"
        print(
            f"{data:9s} {n:9d} {method:22s} {p50:9.3f} {p99:9.3f} {recall_text} {build_seconds:8.2f} {memory / 1e6:8.1f}",
            flush=True,
        )
        del index
    return rows


def summary(rows: list[dict]) -> dict:
    """The figures the targets are about."""

    def find(data, n, method):
        return next((r for r in rows if r["data"] == data and r["n"] == n and r["method"] == method), None)

    out = {}
    for data in sorted({r["data"] for r in rows}):
        original, flat = find(data, 50_000, "original (scipy loop)"), find(data, 50_000, "faiss flat")
        if original and flat:
            out[f"{data}: flat vs original at 50k"] = original["p50_ms"] / flat["p50_ms"]
        for method in ("faiss hnsw", "faiss ivf-sq8+refine"):
            row = find(data, 100_000, method)
            if row:
                out[f"{data}: {method} at 100k"] = {"p50_ms": row["p50_ms"], "recall_at_6": row["recall_at_6"]}
    return out


def main() -> int:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000,100000,1000000", help="catalog sizes (comma-separated)")
    parser.add_argument("--data", default="clothing,clustered", help="clothing and/or clustered (comma-separated)")
    parser.add_argument("--bundle", type=Path, default=None, help="take the real embeddings from this bundle")
    parser.add_argument("--queries", type=int, default=200, help="queries per size (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test that keeps this script working")
    args = parser.parse_args()
    sizes = [2000] if args.quick else [int(s) for s in args.sizes.split(",")]
    kinds = [kind.strip() for kind in args.data.split(",") if kind.strip()]
    query_count = 20 if args.quick else args.queries
    load_before = os.getloadavg()
    rows, notes = [], []
    print(f"machine: {machine()}; faiss {faiss.__version__}; load average before: {load_before}")
    with tempfile.TemporaryDirectory() as temp:
        base = None
        if "clothing" in kinds:
            if args.bundle is not None or (not args.quick and CLOTHING.is_dir() and MOBILENET.is_file()):
                base, source = real_embeddings(args.bundle, Path(temp))
            elif args.quick:
                # The test of this script must not build a bundle: tile a small clustered set.
                base, source = clustered(500, seed=2), "500 clustered vectors (quick mode stands in for real ones)"
            else:
                kinds.remove("clothing")
                notes.append(f"clothing data skipped: {CLOTHING} or {MOBILENET} absent and no --bundle")
            if base is not None:
                notes.append(f"clothing data: {source}, tiled with noise")
        print("\n".join(notes))
        header = f"{'data':9s} {'n':>9s} {'method':22s} {'p50 ms':>9s} {'p99 ms':>9s} {'recall@6':>9s} {'build s':>8s} {'MB':>8s}"
        print(header)
        for kind in kinds:
            for n in sizes:
                if kind == "clothing":
                    catalog, queries = tile_with_noise(base, n), tile_with_noise(base, query_count, seed=1)
                else:
                    catalog, queries = clustered(n), clustered(query_count, seed=1)
                rows += measure_size(kind, catalog, queries, budget_s=2.0 if args.quick else 10.0)
                del catalog
    load_after = os.getloadavg()
    figures = summary(rows)
    for name, value in figures.items():
        print(f"{name}: {value}")
    print(f"targets: {TARGETS}; load average after: {load_after}")
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    path = save_results(
        "search" + ("-quick" if args.quick else ""),
        {
            "rows": rows,
            "summary": figures,
            "targets": TARGETS,
            "proposed": PROPOSED,
            "notes": notes,
            "load_average": {"before": load_before, "after": load_after},
            "faiss_gpus": gpus,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
