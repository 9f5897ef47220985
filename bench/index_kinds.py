"""Index kinds at catalog scale: build time, resident memory, single-query latency, recall@6.

    python bench/index_kinds.py [--size 1000000] [--kinds flat,ivf-sq8,ivf-pq] [--bundle BUNDLE]
                                [--queries 1000] [--nprobe 32,64,96] [--quick]

Data: the real-shaped synthetic embeddings of ``bench/search.py`` (a bundle's standardized
embeddings, by default a MobileNet bundle built on clothing-small, tiled to the size with
noise of their own covariance); queries are other such vectors. Exact ground truth: FAISS
``IndexFlatL2`` over the same vectors, batched.

Per kind (``recommender.index.VectorIndex``): the build (train on the seeded sample, add),
then, in a fresh process, the bundle's way of loading: ``VectorIndex.load`` (IVF lists read into
memory, the float16 re-rank file memory-mapped; ``--memory-map``: the lists mapped too) plus the ``catalog.jsonl`` rows (``bundle.read_catalog_rows`` of a synthetic
catalog with realistic fields: ``recommender.records.CatalogRecords``) with the lookups a loaded
``Recommender`` builds over them (id map, same-photo positions, attribute index) and the process's RSS split into anonymous and file-backed
pages (``/proc/self/status``) after each; p50 / p95 of one query at a time on one OpenMP
thread; recall@6 against exact. For IVF kinds each ``--nprobe`` value is measured too.
For 10,000,000 items the bytes and the kind the auto rule picks are computed, not measured.
Writes bench/results/index_kinds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from common import machine, save_results  # noqa: E402

K = 6
TARGETS = {"resident_gb_with_catalog": 2.5, "p50_ms": 2.0, "recall_at_6": 0.95}
BUDGETS_GB = (1, 2, 2.5, 4, 8, 16, 32)


def rss() -> dict:
    """This process's resident memory in MB: total, anonymous, file-backed (mapped files)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[key].split()[0]) / 1024 for name, key in
            (("total", "VmRSS"), ("anonymous", "RssAnon"), ("file", "RssFile"))}  # fmt: skip


def write_catalog(path: Path, count: int) -> None:
    """A ``catalog.jsonl`` of ``count`` records shaped like a real build's."""
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            record = {
                "id": f"sku-{i:08d}",
                "image": f"images/{i % 1000:03d}/{i:08d}.jpg",
                "path": f"/srv/shop/catalog/images/{i % 1000:03d}/{i:08d}.jpg",
                "sha256": f"{i:064x}",
                "labels": {"label": f"class-{i % 40}", "colour": f"colour-{i % 12}"},
                "extra": {"title": f"Product number {i}", "price": f"{(i % 500) + 0.99:.2f}"},
                "bytes": 40_000 + i % 9_000,
            }
            handle.write(json.dumps(record) + "\n")


def measure_loaded(folder: str, kind: str, nprobes: list[int], latency_queries: int, memory_map: bool = False) -> dict:
    """Runs in a fresh process: load catalog + index as a bundle does, then time and score it."""
    import faiss

    from recommender.bundle import read_catalog_rows
    from recommender.filters import AttributeIndex
    from recommender.index import VectorIndex
    from recommender.records import same_photo_positions

    folder = Path(folder)
    queries = np.load(folder / "queries.npy")
    exact = np.load(folder / "exact.npy")
    before = rss()
    rows = read_catalog_rows(folder, len(np.load(folder / "embeddings.f16.npy", mmap_mode="r"))) if (
        folder / "catalog.jsonl").exists() else []  # fmt: skip
    # The lookups a loaded Recommender builds over its rows: ids, same photos, attributes.
    by_id = {item_id: position for position, item_id in enumerate(getattr(rows, "ids", []))}
    by_hash = same_photo_positions(rows)
    attributes = AttributeIndex(rows, ["label", "colour"]) if len(rows) else None
    with_catalog = rss()
    index = VectorIndex.load(folder / f"{kind}.faiss", use_gpu=False, memory_map=memory_map)
    loaded = rss()
    settings = nprobes if index.kind.startswith("ivf") else [None]
    results = []
    for nprobe in settings:
        if nprobe is not None:
            index.nprobe = nprobe
            index._ivf.nprobe = nprobe
        times = []
        for query in queries[:latency_queries]:
            started = time.perf_counter()
            index.search(query[None, :], K)
            times.append((time.perf_counter() - started) * 1000)
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        found = index.search(queries, K).positions
        recall = float(np.mean([len(set(a) & set(e)) / K for a, e in zip(found.tolist(), exact.tolist())]))
        results.append({
            "nprobe": nprobe,
            "p50_ms": float(np.percentile(times, 50)),
            "p95_ms": float(np.percentile(times, 95)),
            "latency_queries": len(times),
            "recall_at_6": recall,
        })  # fmt: skip
    after = rss()
    return {
        "rss_mb": {"start": before, "catalog": with_catalog, "index": loaded, "after_queries": after},
        "catalog_rows": len(rows),
        "catalog_lookups": {
            "ids": len(by_id),
            "photos": len(by_hash),
            "attribute_columns": len(attributes.columns) if attributes else 0,
        },
        "settings": results,
    }


def run(args) -> int:
    import faiss
    from search import clustered, real_embeddings, tile_with_noise

    from recommender.index import (
        BUILT_KINDS,
        VectorIndex,
        choose_kind,
        rerank_bytes_per_vector,
        resident_bytes,
    )

    size = 3000 if args.quick else args.size
    kinds = [kind for kind in args.kinds.split(",") if kind]
    query_count = 50 if args.quick else args.queries
    load_before = os.getloadavg()
    print(f"machine: {machine()}; faiss {faiss.__version__}; load average before: {load_before}", flush=True)
    rows, notes = [], []
    with tempfile.TemporaryDirectory(dir=args.workdir) as temp:
        folder = Path(temp)
        if args.quick:
            base, source = clustered(500, seed=2), "500 clustered vectors (quick mode stands in for real ones)"
        else:
            base, source = real_embeddings(args.bundle, folder)
        notes.append(f"data: {source}, tiled with noise to {size:,}")
        print(notes[-1], flush=True)
        started = time.perf_counter()
        catalog = tile_with_noise(base, size)
        queries = tile_with_noise(base, query_count, seed=1)
        np.save(folder / "queries.npy", queries)
        np.save(folder / "embeddings.f16.npy", catalog.astype(np.float16))  # the catalog size for the rows check
        print(f"data generated in {time.perf_counter() - started:.1f} s", flush=True)
        started = time.perf_counter()
        exact_index = faiss.IndexFlatL2(catalog.shape[1])
        exact_index.add(catalog)
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        exact = np.concatenate([exact_index.search(queries[s : s + 100], K)[1] for s in range(0, query_count, 100)])
        del exact_index
        np.save(folder / "exact.npy", exact)
        print(f"exact ground truth for {query_count} queries in {time.perf_counter() - started:.1f} s", flush=True)
        started = time.perf_counter()
        write_catalog(folder / "catalog.jsonl", size)
        print(f"catalog.jsonl written in {time.perf_counter() - started:.1f} s", flush=True)
        # Memory of the catalog rows alone, for the "index + catalog" figure.
        header = f"{'kind':8s} {'nprobe':>6s} {'build s':>8s} {'RSS MB':>8s} {'anon MB':>8s} {'file MB':>8s} " \
                 f"{'p50 ms':>7s} {'p95 ms':>7s} {'recall@6':>8s}"  # fmt: skip
        for kind in kinds:
            started = time.perf_counter()
            index = VectorIndex.build(catalog, kind, use_gpu=False)
            build_seconds = time.perf_counter() - started
            index.save(folder / f"{kind}.faiss")  # IVF kinds rewrite embeddings.f16.npy: the same vectors
            parameters = index.parameters.to_json()
            del index
            # IVF kinds twice: lists read into memory (the default) and memory-mapped ("*").
            for memory_map in (False, True) if kind.startswith("ivf") else (False,):
                label = kind + ("*" if memory_map else "")
                command = [sys.executable, __file__, "--measure", str(folder), kind, args.nprobe or "",
                           str(200 if kind == "flat" else query_count), "1" if memory_map else "0"]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                row = {
                    "kind": kind,
                    "lists": ("mapped" if memory_map else "in memory") if kind.startswith("ivf") else None,
                    "n": size,
                    "build_s": build_seconds,
                    "parameters": parameters,
                    "file_mb": (folder / f"{kind}.faiss").stat().st_size / 1e6,
                    "estimated_resident_mb": resident_bytes(kind, size) / 1e6,
                    "rerank_file_mb": rerank_bytes_per_vector(kind) * size / 1e6,
                    **measured,
                }
                rows.append(row)
                if len(rows) == 1:
                    print(header)
                memory = measured["rss_mb"]
                index_rss = memory["after_queries"]
                for setting in measured["settings"]:
                    print(
                        f"{label:8s} {str(setting['nprobe'] or '-'):>6s} {build_seconds:8.1f} {index_rss['total']:8.0f} "
                        f"{index_rss['anonymous']:8.0f} {index_rss['file']:8.0f} {setting['p50_ms']:7.3f} "
                        f"{setting['p95_ms']:7.3f} {setting['recall_at_6']:8.3f}",
                        flush=True,
                    )
                print(
                    f"         RSS MB: start {memory['start']['total']:.0f}, + catalog rows {memory['catalog']['total']:.0f}, "
                    f"+ index {memory['index']['total']:.0f} (anon {memory['index']['anonymous']:.0f}), after queries "
                    f"{index_rss['total']:.0f}; estimate {row['estimated_resident_mb']:.0f} MB, file {row['file_mb']:.0f} MB",
                    flush=True,
                )
    computed = {}
    for count in (1_000_000, 10_000_000):
        computed[count] = {
            "bytes": {kind: resident_bytes(kind, count) for kind in BUILT_KINDS},
            "rerank_file_bytes": rerank_bytes_per_vector("ivf-pq") * count,
            "auto": {f"{gb} GB": choose_kind(count, int(gb * 1e9)) for gb in BUDGETS_GB},
        }
        sizes = ", ".join(f"{kind} {value / 1e9:.2f} GB" for kind, value in computed[count]["bytes"].items())
        print(f"computed, {count:,} x 512-d: resident {sizes}; float16 re-rank file {count * 1024 / 1e9:.2f} GB")
        print(f"  auto picks: {computed[count]['auto']}")
    load_after = os.getloadavg()
    print(f"targets: {TARGETS}; load average after: {load_after}")
    path = save_results(
        "index_kinds" + ("-quick" if args.quick else ""),
        {
            "rows": rows,
            "computed": {str(count): value for count, value in computed.items()},
            "targets": TARGETS,
            "notes": notes,
            "load_average": {"before": load_before, "after": load_after},
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        folder, kind, nprobe_text, latency, mapped = sys.argv[2:7]
        nprobe_values = [int(value) for value in nprobe_text.split(",") if value]
        print(json.dumps(measure_loaded(folder, kind, nprobe_values or [None], int(latency), mapped == "1")))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1_000_000, help="catalog size (default: %(default)s)")
    parser.add_argument("--kinds", default="flat,ivf-sq8,ivf-pq", help="kinds to build (comma-separated)")
    parser.add_argument("--bundle", type=Path, default=None, help="take the real embeddings from this bundle")
    parser.add_argument("--queries", type=int, default=1000, help="queries (default: %(default)s)")
    parser.add_argument("--nprobe", default="", help="IVF nprobe values to measure (default: the built one)")
    parser.add_argument("--workdir", default=None, help="folder for the temporary files (default: the system's)")
    parser.add_argument("--quick", action="store_true", help="tiny size, for the test that keeps this script working")
    sys.exit(run(parser.parse_args()))
