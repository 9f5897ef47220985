"""Precomputed panels: the job's items/s, and the item endpoint's latency from panels vs live search.

    python bench/panels.py [--sizes 20000,100000] [--bundle PATH] [--requests 500] [--quick]

1. The job (``indexer.panels.write_panels``, searching and writing every file) on catalogs of
   clustered 512-d vectors (``bench/search.py``'s generator; the index kind the build would
   choose: flat below 100,000 items, HNSW from there), plain and ``--per`` a 4-valued column,
   against the baseline of one ``similar_to_item``-style search per item (the same
   ``search_excluding`` call, one query at a time: what answering every product page live
   costs), timed on a sample of items.
2. ``GET /api/v1/items/<id>/similar`` through Flask's test client, in process, on a real
   bundle (``--bundle``; default: the tests' tiny bundle, built here) and on copies of it
   inflated to each catalog size (its rows repeated under new ids, clustered vectors in the
   index): the same requests answered by live search (no panels) and from panels. p50 / p95.

Writes bench/results/panels.json (or panels-quick.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from common import ROOT, machine, save_results  # noqa: E402
from search import clustered  # noqa: E402

K = 6
#: Values of the ``--per`` column: a shop's gender / department split.
PER_VALUES = 4


def synthetic_bundle(n: int, workdir: Path):
    """What the panels job reads of a bundle, for ``n`` clustered vectors (no model, no photos)."""
    from indexer.panels import _Bundle
    from recommender.filters import AttributeIndex
    from recommender.index import VectorIndex
    from recommender.manifest import CatalogRecord

    vectors = clustered(n, seed=0)
    index = VectorIndex.build(vectors, "auto", use_gpu=False)
    rng = np.random.default_rng(1)
    values = [f"v{i}" for i in rng.integers(0, PER_VALUES, n)]
    rows = [
        CatalogRecord(id=f"item-{i}", image="", path="", sha256=f"{i:064x}", labels={"department": values[i]})
        for i in range(n)
    ]
    folder = workdir / f"bundle-{n}"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"bundle_id": f"synthetic-{n}"}))
    attributes = AttributeIndex(rows, ["department"])
    return _Bundle(folder, f"synthetic-{n}", rows, index, attributes, ["department"])


def one_at_a_time(bundle, sample: int) -> float:
    """Items/s of one search per item, the way ``similar_to_item`` answers a request."""
    from recommender.engine import same_photo_positions

    by_hash = same_photo_positions(bundle.rows)
    positions = np.random.default_rng(2).choice(len(bundle.rows), size=min(sample, len(bundle.rows)), replace=False)
    started = time.perf_counter()
    for position in positions:
        vector = bundle.index.reconstruct(position)
        bundle.index.search_excluding(vector[None, :], [by_hash[bundle.rows[position].sha256]], K)
    return len(positions) / (time.perf_counter() - started)


def measure_job(sizes: list[int], sample: int, workdir: Path) -> list[dict]:
    from indexer.panels import write_panels

    rows = []
    for n in sizes:
        started = time.perf_counter()
        bundle = synthetic_bundle(n, workdir)
        built = time.perf_counter() - started
        baseline = one_at_a_time(bundle, sample)
        plain = write_panels(bundle, workdir / f"panels-{n}", K)
        per = write_panels(bundle, workdir / f"panels-{n}-per", K, "department")
        size_mb = sum(p.stat().st_size for p in (workdir / f"panels-{n}").iterdir()) / 1e6
        row = {
            "items": n,
            "index": bundle.index.kind,
            "index_build_s": round(built, 1),
            "one_search_per_item_items_per_s": round(baseline, 1),
            "panels_items_per_s": round(plain.items_per_second, 1),
            "panels_per_column_items_per_s": round(per.items_per_second, 1),
            "panels_seconds": round(plain.seconds, 2),
            "folder_mb": round(size_mb, 2),
        }
        rows.append(row)
        print(
            f"{n:>8} items ({row['index']}): one search per item {baseline:>9,.0f} items/s | "
            f"panels job {plain.items_per_second:>9,.0f} items/s ({plain.seconds:.1f} s, {size_mb:.1f} MB) | "
            f"--per department {per.items_per_second:>9,.0f} items/s",
            flush=True,
        )
    return rows


def build_tiny(workdir: Path) -> Path:
    """The tests' tiny bundle (random-init ResNet50 at 64 px, 96 generated photos)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_COLOURS, TINY_PATTERNS, TINY_PER_CLASS, TINY_SIZE, tiny_build_config

    from indexer.build import build_bundle
    from recommender.synthetic import generate_catalog

    catalog = generate_catalog(
        workdir / "catalog", per_class=TINY_PER_CLASS, patterns=TINY_PATTERNS, colours=TINY_COLOURS, size=TINY_SIZE
    )
    return Path(build_bundle(catalog, workdir / "tiny", tiny_build_config(workdir / "features.h5")).bundle)


def inflated_bundle(bundle: Path, n: int, workdir: Path) -> Path:
    """A valid copy of ``bundle`` with ``n`` catalog items: its rows repeated under new ids, clustered vectors.

    The item endpoint reads only the catalog rows and the index, so this measures its latency at
    a catalog size no small test bundle has, without training on ``n`` photos. Other files are
    hard links; the manifest is rewritten with the new counts and hashes.
    """
    from recommender.backbones import file_sha256
    from recommender.bundle import write_json
    from recommender.index import VectorIndex

    out = workdir / f"inflated-{n}"
    out.mkdir()
    for path in bundle.iterdir():
        if path.name not in ("manifest.json", "catalog.jsonl", "index.faiss"):
            os.link(path, out / path.name)
    rows = [json.loads(line) for line in (bundle / "catalog.jsonl").read_text(encoding="utf-8").splitlines()]
    with open(out / "catalog.jsonl", "w", encoding="utf-8") as handle:
        for i in range(n):
            row = {**rows[i % len(rows)], "id": f"{rows[i % len(rows)]['id']}-{i}", "sha256": f"{i:064x}"}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    VectorIndex.build(clustered(n, seed=5), "auto", use_gpu=False).save(out / "index.faiss")
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    manifest["bundle_id"] = f"inflated-{n}"
    manifest["counts"].update(items=n, catalog_rows=n)
    manifest["index"] = {**manifest["index"], "size": n, "kind": "flat" if n < 100_000 else "hnsw"}
    for name in ("catalog.jsonl", "index.faiss"):
        manifest["files"][name] = {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size}
    write_json(out / "manifest.json", manifest)
    return out


def percentiles_ms(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50) * 1000), float(np.percentile(times, 95) * 1000)


def measure_endpoint(bundle: Path, requests: int, workdir: Path) -> dict:
    from indexer.panels import write_panels
    from webapp import create_app

    panels = workdir / f"endpoint-panels-{bundle.name}"
    write_panels(bundle, panels, K)
    results = {}
    for source, setting in (("live", workdir / "no-panels-here"), ("panels", panels)):
        app = create_app({"bundle": bundle, "reload_interval_s": 3600, "panels": setting, "metrics": False})
        logging.getLogger("webapp.requests").setLevel(logging.WARNING)  # one line per request would be timed too
        client = app.test_client()
        ids = [row.id for row in app.extensions["live_bundle"].current().rows]
        for item_id in ids[:20]:  # warm-up
            client.get(f"/api/v1/items/{item_id}/similar?k={K}")
        times = []
        for i in range(requests):
            started = time.perf_counter()
            response = client.get(f"/api/v1/items/{ids[(i * 7919) % len(ids)]}/similar?k={K}")  # spread out
            times.append(time.perf_counter() - started)
            assert response.headers["X-Similar-Source"] == source, response.headers
        p50, p95 = percentiles_ms(times)
        results[source] = {"p50_ms": round(p50, 3), "p95_ms": round(p95, 3), "requests": requests}
        app.extensions["live_bundle"].stop()
        print(
            f"item endpoint, {len(ids):>7} items, {source:>6}: p50 {p50:.3f} ms, p95 {p95:.3f} ms ({requests} requests)",
            flush=True,
        )
    return {"bundle_items": len(ids), **results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20000,100000", help="catalog sizes (comma-separated)")
    parser.add_argument("--sample", type=int, default=1000, help="items timed one search at a time")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle for the endpoint (default: build one)")
    parser.add_argument("--requests", type=int, default=500, help="requests per endpoint variant")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to keep this script working")
    args = parser.parse_args()
    sizes = [2000] if args.quick else [int(size) for size in args.sizes.split(",")]
    requests = 50 if args.quick else args.requests
    print(f"machine: {machine()}", flush=True)
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(temporary)
        job = measure_job(sizes, 200 if args.quick else args.sample, workdir)
        bundle = args.bundle or build_tiny(workdir)
        endpoint = [measure_endpoint(bundle, requests, workdir)]
        for n in sizes:
            endpoint.append(measure_endpoint(inflated_bundle(bundle, n, workdir), requests, workdir))
    load = {"before": load_before, "after": list(os.getloadavg())}
    path = save_results(
        "panels-quick" if args.quick else "panels", {"k": K, "job": job, "endpoint": endpoint, "load_average": load}
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
