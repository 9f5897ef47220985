"""Search speed: the original scipy loop, numpy brute force, FAISS exact and FAISS HNSW.

    python bench/search.py [--sizes 10000,100000] [--queries 200] [--quick]

Vectors are clustered synthetic 512-d data shaped like standardized embeddings (200 Gaussian
clusters, unit noise), since recall of an approximate index depends on that structure.
Per-query times are single queries, one at a time, FAISS on one OpenMP thread (as served).
Writes bench/results/search.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from common import machine, save_results  # noqa: E402

DIMENSION = 512


def clustered(n: int, seed: int = 0, clusters: int = 200) -> np.ndarray:
    """(n, 512) float32: Gaussian clusters with unit noise, then standardized per column."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIMENSION)).astype(np.float32) * 1.5
    data = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, DIMENSION)).astype(np.float32)
    return ((data - data.mean(0)) / data.std(0)).astype(np.float32)


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
    from scipy.spatial import distance

    def search(query):
        distances = [distance.euclidean(query[0], item) for item in catalog]
        return np.argsort(distances)[:6]

    return search


def main() -> int:
    import faiss

    from recommender.index import VectorIndex

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test that keeps this script working")
    args = parser.parse_args()
    sizes = [2000] if args.quick else [int(s) for s in args.sizes.split(",")]
    rows = []
    print(f"machine: {machine()}; faiss {faiss.__version__}; data: clustered synthetic 512-d")
    print(f"{'n':>9s} {'method':22s} {'p50 ms':>9s} {'p99 ms':>9s} {'recall@6':>9s} {'build s':>8s} {'MB':>7s}")
    for n in sizes:
        catalog = clustered(n)
        queries = clustered(args.queries if not args.quick else 20, seed=1)
        exact_positions = None
        for method in ("original (scipy loop)", "numpy brute force", "faiss flat", "faiss hnsw"):
            build_started = time.perf_counter()
            if method.startswith("original"):
                if n > 50_000:
                    continue  # minutes per query at this size; measured up to 50k
                search = original_method(catalog)
                memory = catalog.nbytes
            elif method.startswith("numpy"):
                squared_norms = (catalog**2).sum(1)

                def search(query, squared_norms=squared_norms, catalog=catalog):
                    distances = squared_norms - 2 * catalog @ query[0]
                    top = np.argpartition(distances, 6)[:6]
                    return top[np.argsort(distances[top])]

                memory = catalog.nbytes
            else:
                index = VectorIndex.build(catalog, "flat" if method.endswith("flat") else "hnsw", use_gpu=False)
                search = lambda q, index=index: index.search(q, 6)  # noqa: E731
                memory = faiss.serialize_index(index.cpu_index).nbytes
            build_seconds = time.perf_counter() - build_started
            p50, p99 = per_query_ms(search, queries, budget_s=2.0 if args.quick else 10.0)
            recall = None
            if method == "faiss flat":
                exact_positions = index.search(queries, 6).positions
            if method == "faiss hnsw" and exact_positions is not None:
                approx = index.search(queries, 6).positions
                recall = float(np.mean([len(set(a) & set(e)) / 6 for a, e in zip(approx, exact_positions)]))
            rows.append(
                {
                    "n": n,
                    "method": method,
                    "p50_ms": p50,
                    "p99_ms": p99,
                    "recall_at_6": recall,
                    "build_s": build_seconds,
                    "memory_mb": memory / 1e6,
                }
            )
            recall_text = f"{recall:9.3f}" if recall is not None else f"{'':9s}"
            print(
                f"{n:9d} {method:22s} {p50:9.3f} {p99:9.3f} {recall_text} {build_seconds:8.2f} {memory / 1e6:7.1f}",
                flush=True,
            )
    path = save_results("search" + ("-quick" if args.quick else ""), {"rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
