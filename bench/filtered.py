"""Filtered neighbour search: cost and recall of ``VectorIndex.search(..., allowed=mask)``.

    python bench/filtered.py [--size 100000] [--queries 200] [--bundle BUNDLE] [--quick]

A catalog of ``--size`` realistic 512-d embeddings (``bench/search.py``'s ``clothing`` data:
real standardized embeddings of a MobileNet bundle on clothing-small, or of ``--bundle``,
tiled with noise shaped by their covariance; its ``clustered`` data when neither is there)
with attribute columns whose values each hold about 1%, 5%, 10%, 25% and 50% of the items
(100, 20, 10, 4 and 2 values). Each share comes twice:

- ``random``: values drawn independently of the vectors (a brand, a stock flag);
- ``cluster``: values follow the look, like the labels the embedding is trained on: k-means
  clusters of the catalog are dealt to the values, so a value is a few regions of the space.
  Queried two ways: ``same``, the value of the query's own cluster ("women's sandals like
  this sandal", the common case), and ``other``, a value away from the query (the hard case
  for a graph walk: few of the query's graph neighbours are allowed).

Each query gets its own value (drawn at random), so masks differ from query to query. For a
flat and an HNSW index (``recommender.index`` settings), one query at a time on one OpenMP
thread as the engine serves: unfiltered and filtered search of the same query timed back to
back (alternating which goes first), p50/p99 of both and their ratio; recall@6 against a
numpy brute force over the allowed subset; the time of ``AttributeIndex.mask`` for the
filter; which method ``VectorIndex`` used (exact scan or HNSW walk with a selector, see
``recommender.index.EXACT_SCAN_UP_TO``). Two more HNSW rows sit either side of that switch-over:
``scan-max``, random sets of exactly ``EXACT_SCAN_UP_TO`` items (the costliest exact scan), and
``walk-min``, one item more (the graph walk at its smallest share). Target (stated for 100,000
items): filtered p50 <= 2x unfiltered p50 for every filter matching >= 5% of the items.
Writes bench/results/filtered.json.
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
from search import clustered, real_embeddings, tile_with_noise  # noqa: E402

K = 6

#: Share of the items each value of a column holds -> number of values.
SHARES = {0.01: 100, 0.05: 20, 0.10: 10, 0.25: 4, 0.50: 2}

TARGET = {"max_ratio_p50": 2.0, "from_share": 0.05}


def column_name(assignment: str, share: float) -> str:
    return f"{assignment}_{round(share * 100)}pct"


def deal_clusters(sizes: np.ndarray, values: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster -> value, balancing the items per value (largest cluster to the lightest value)."""
    totals = np.zeros(values)
    owner = np.empty(len(sizes), dtype=np.int64)
    for cluster in np.argsort(-sizes + rng.random(len(sizes))):  # random order among equal sizes
        owner[cluster] = int(np.argmin(totals))
        totals[owner[cluster]] += sizes[cluster]
    return owner


def attribute_rows(catalog: np.ndarray, queries: np.ndarray, clusters: int, seed: int = 0):
    """Catalog rows with ``random_*`` and ``cluster_*`` columns, and each query's cluster values.

    Returns:
        ``(rows, query_values)``: catalog records (only ``id`` and ``labels`` filled);
        ``query_values[column]`` (m,) str: the value of each query's own cluster.
    """
    import faiss

    from recommender.manifest import CatalogRecord

    rng = np.random.default_rng(seed)
    kmeans = faiss.Kmeans(catalog.shape[1], clusters, niter=10, seed=seed, max_points_per_centroid=100)
    kmeans.train(catalog)
    item_cluster = kmeans.index.search(catalog, 1)[1][:, 0]
    query_cluster = kmeans.index.search(queries, 1)[1][:, 0]
    sizes = np.bincount(item_cluster, minlength=clusters)
    columns: dict[str, np.ndarray] = {}
    query_values: dict[str, np.ndarray] = {}
    for share, values in SHARES.items():
        names = np.array([f"v{i:03d}" for i in range(values)])
        columns[column_name("random", share)] = names[rng.integers(0, values, len(catalog))]
        owner = deal_clusters(sizes, values, rng)
        columns[column_name("cluster", share)] = names[owner[item_cluster]]
        query_values[column_name("cluster", share)] = names[owner[query_cluster]]
    rows = [
        CatalogRecord(id=str(i), image="", path="", sha256="", labels={c: str(v[i]) for c, v in columns.items()})
        for i in range(len(catalog))
    ]
    return rows, query_values


def exact_neighbours(catalog: np.ndarray, queries: np.ndarray):
    """A numpy brute force over any allowed subset: ``neighbours(i, allowed) -> (6,) positions``.

    All query-item squared distances are computed once in float32 (one matrix product); each
    call takes the 4k nearest allowed by those and re-ranks them in float64, so float32
    rounding cannot swap near neighbours.
    """
    norms = (catalog.astype(np.float64) ** 2).sum(1).astype(np.float32)
    squared = norms[:, None] - 2 * catalog @ queries.T  # (n, m); + |q|^2 does not change the order

    def neighbours(i: int, allowed: np.ndarray) -> np.ndarray:
        subset = np.flatnonzero(allowed)
        if len(subset) == 0:
            return np.empty(0, dtype=np.int64)
        column = squared[subset, i]
        take = min(4 * K, len(subset))
        candidates = subset[np.argpartition(column, take - 1)[:take]]
        exact = ((catalog[candidates].astype(np.float64) - queries[i].astype(np.float64)) ** 2).sum(1)
        return candidates[np.argsort(exact, kind="stable")[:K]]

    return neighbours


def percentiles(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def measure_row(index, queries, masks, mask_ms, neighbours, kind, assignment, share) -> dict:
    """Times unfiltered and filtered search of each query back to back; recall of the filtered one."""
    unfiltered_ms, filtered_ms, recalls, methods = [], [], [], {}
    for i, (query, allowed) in enumerate(zip(queries, masks)):
        query = query[None, :]
        order = (False, True) if i % 2 else (True, False)  # which goes first alternates
        for filtered in order:
            started = time.perf_counter()
            result = index.search(query, K, allowed=allowed if filtered else None)
            elapsed = (time.perf_counter() - started) * 1000
            (filtered_ms if filtered else unfiltered_ms).append(elapsed)
            if filtered:
                found = result.positions[0]
        exact = neighbours(i, allowed)
        if len(exact):
            recalls.append(len(set(found.tolist()) & set(exact.tolist())) / len(exact))
        method = index.filter_method(int(allowed.sum()))
        methods[method] = methods.get(method, 0) + 1
    unfiltered, filtered = percentiles(unfiltered_ms), percentiles(filtered_ms)
    match = float(np.mean([m.mean() for m in masks]))
    ratio_p50 = filtered[0] / unfiltered[0]
    in_target = share >= TARGET["from_share"]
    return {
        "kind": kind,
        "filter": assignment,
        "share": share,
        "mean_match": match,
        "mean_matching_items": float(np.mean([m.sum() for m in masks])),
        "method": methods,
        "unfiltered_p50_ms": unfiltered[0],
        "unfiltered_p99_ms": unfiltered[1],
        "filtered_p50_ms": filtered[0],
        "filtered_p99_ms": filtered[1],
        "ratio_p50": ratio_p50,
        "ratio_p99": filtered[1] / unfiltered[1],
        "recall_at_6": float(np.mean(recalls)) if recalls else None,
        "mask_p50_ms": percentiles(mask_ms)[0] if mask_ms else None,
        "mask_p99_ms": percentiles(mask_ms)[1] if mask_ms else None,
        "target_met": (ratio_p50 <= TARGET["max_ratio_p50"]) if in_target else None,
    }


def filters_for(assignment: str, share: float, attributes, query_values, count: int, rng) -> list[dict]:
    """One single-value filter per query for this column."""
    column = column_name("random" if assignment == "random" else "cluster", share)
    values = list(attributes.values(column))
    filters = []
    for i in range(count):
        if assignment == "same":
            value = str(query_values[column][i])
        elif assignment == "other":
            value = str(rng.choice([v for v in values if v != query_values[column][i]]))
        else:
            value = str(rng.choice(values))
        filters.append({column: value})
    return filters


def print_row(row: dict) -> None:
    methods = ", ".join(f"{name} {count}" for name, count in row["method"].items())
    recall = f"{row['recall_at_6']:8.3f}" if row["recall_at_6"] is not None else f"{'':8s}"
    mask = f"{row['mask_p50_ms']:7.3f}" if row["mask_p50_ms"] is not None else f"{'':7s}"
    if row["target_met"] is None:
        target = "n/a (< 5%)"
    else:
        target = "met" if row["target_met"] else "NOT MET"
    print(
        f"{row['kind']:5s} {row['filter']:8s} {row['mean_match'] * 100:6.1f}% "
        f"{row['unfiltered_p50_ms']:8.3f} {row['unfiltered_p99_ms']:8.3f} "
        f"{row['filtered_p50_ms']:8.3f} {row['filtered_p99_ms']:8.3f} "
        f"{row['ratio_p50']:6.2f} {row['ratio_p99']:6.2f} {recall} "
        f"{mask} {target:11s} {methods}",
        flush=True,
    )


def main() -> int:
    import faiss

    from recommender.filters import AttributeIndex
    from recommender.index import EXACT_SCAN_UP_TO, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_LINKS, VectorIndex

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000, help="catalog items (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=200, help="queries per row (default: %(default)s)")
    parser.add_argument("--bundle", type=Path, default=None, help="take the real embeddings from this bundle")
    parser.add_argument(
        "--quick", action="store_true", help="20,000 items, for the test that keeps this script working"
    )
    args = parser.parse_args()
    size = 20_000 if args.quick else args.size
    query_count = 20 if args.quick else args.queries
    load_before = os.getloadavg()
    notes = []
    print(f"machine: {machine()}; faiss {faiss.__version__}; load average before: {load_before}")
    with tempfile.TemporaryDirectory() as temp:
        if args.quick:
            # The test of this script must not build a bundle: tile a small clustered set.
            base, data = clustered(500, seed=2), "500 clustered vectors tiled with noise (quick mode)"
        elif args.bundle is not None or (CLOTHING.is_dir() and MOBILENET.is_file()):
            base, source = real_embeddings(args.bundle, Path(temp))
            data = f"clothing: {source}, tiled with noise"
        else:
            base, data = None, f"clustered (bench/search.py): {CLOTHING} or {MOBILENET} absent and no --bundle"
    if base is None:
        catalog, queries = clustered(size), clustered(query_count, seed=1)
    else:
        catalog, queries = tile_with_noise(base, size), tile_with_noise(base, query_count, seed=1)
    clusters = 100 if args.quick else 500
    print(f"data: {size} items of {data}; {query_count} queries; k={K}")
    started = time.perf_counter()
    rows, query_values = attribute_rows(catalog, queries, clusters)
    attributes = AttributeIndex(rows, list(rows[0].labels))
    notes.append(f"cluster columns: {clusters} k-means clusters dealt to the values")
    print(f"attributes: {len(attributes.columns)} columns, built in {time.perf_counter() - started:.1f} s")
    neighbours = exact_neighbours(catalog, queries)
    indexes = {}
    for kind in ("flat", "hnsw"):
        started = time.perf_counter()
        indexes[kind] = VectorIndex.build(catalog, kind, use_gpu=False)
        print(f"{kind} index built in {time.perf_counter() - started:.1f} s")
    settings = f"HNSW M={HNSW_LINKS}, efConstruction={HNSW_EF_CONSTRUCTION}, efSearch={HNSW_EF_SEARCH}"
    print(f"{settings}; exact scan up to {EXACT_SCAN_UP_TO} allowed items")
    print(
        f"{'index':5s} {'filter':8s} {'match':>7s} {'unf p50':>8s} {'unf p99':>8s} {'filt p50':>8s} "
        f"{'filt p99':>8s} {'x p50':>6s} {'x p99':>6s} {'recall@6':>8s} {'mask ms':>7s} {'target':11s} method (queries)"
    )
    rng = np.random.default_rng(1)
    # Warm up as many masks as a row holds, so the first row's are not timed on fresh pages.
    warm_up = [attributes.mask({column_name("random", 0.5): "v000"}) for _ in range(query_count)]
    del warm_up
    results = []
    for kind, index in indexes.items():
        # A flat index scans the allowed vectors exactly whatever they are: only its cost matters.
        assignments = ("random",) if kind == "flat" else ("random", "same", "other")
        for assignment in assignments:
            for share in SHARES:
                filters = filters_for(assignment, share, attributes, query_values, query_count, rng)
                masks, mask_ms = [], []
                for one in filters:
                    mask_started = time.perf_counter()
                    masks.append(attributes.mask(one))
                    mask_ms.append((time.perf_counter() - mask_started) * 1000)
                row = measure_row(index, queries, masks, mask_ms, neighbours, kind, assignment, share)
                results.append(row)
                print_row(row)
    # Either side of the switch-over: the largest random subset still scanned exactly (the
    # costliest scan) and the smallest that walks the graph (its lowest recall on random items).
    for name, count in (("scan-max", EXACT_SCAN_UP_TO), ("walk-min", EXACT_SCAN_UP_TO + 1)):
        if count >= size:
            continue
        masks = []
        for _ in range(query_count):
            mask = np.zeros(size, dtype=bool)
            mask[rng.choice(size, count, replace=False)] = True
            masks.append(mask)
        row = measure_row(indexes["hnsw"], queries, masks, [], neighbours, "hnsw", name, count / size)
        results.append(row)
        print_row(row)
    load_after = os.getloadavg()
    checked = [row for row in results if row["target_met"] is not None]
    met = all(row["target_met"] for row in checked)
    print(
        f"target: filtered <= {TARGET['max_ratio_p50']:g}x unfiltered at >= {TARGET['from_share']:.0%} match "
        f"(p50): {'met' if met else 'NOT MET'} in {sum(r['target_met'] for r in checked)} of {len(checked)} rows"
    )
    print("x p50 / x p99 = filtered / unfiltered of the same queries; match = mean share of items allowed")
    print(f"load average after: {load_after}")
    path = save_results(
        "filtered" + ("-quick" if args.quick else ""),
        {
            "size": size,
            "queries": query_count,
            "data": data,
            "k": K,
            "hnsw": settings,
            "exact_scan_up_to": EXACT_SCAN_UP_TO,
            "faiss": faiss.__version__,
            "rows": results,
            "target": TARGET,
            "target_met": met,
            "notes": notes,
            "load_average": {"before": load_before, "after": load_after},
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
