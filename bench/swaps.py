"""Memory over repeated bundle swaps: RSS of a serving process after each of N swaps.

    python bench/swaps.py [--swaps 20] [--bundle-a PATH --bundle-b PATH] [--quick]

A :class:`webapp.bundles.LiveBundle` serves a ``current`` symlink that is republished
alternately to two bundles, the way ``recommender rebuild`` / ``rollback`` do; after each swap
one query runs on the new bundle and the process's RSS is read. Reported: RSS after the first
swap, after the last, and the growth per swap (least-squares slope over swaps 2..N; the first
swap also pays one-off costs: TensorFlow's kernels for the second model, allocator pools).
Without bundles given, two small bundles are built from a generated catalog (random-init
ResNet50 at 64 px). Writes bench/results/swaps.json (or swaps-quick.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from common import ROOT, machine, save_results  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build_two(workdir: Path) -> tuple[Path, Path]:
    """Two small bundles of one generated catalog, trained with different seeds."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_COLOURS, TINY_PATTERNS, TINY_PER_CLASS, TINY_SIZE, tiny_build_config

    from indexer.build import build_bundle
    from recommender.synthetic import generate_catalog

    catalog = generate_catalog(
        workdir / "catalog", per_class=TINY_PER_CLASS, patterns=TINY_PATTERNS, colours=TINY_COLOURS, size=TINY_SIZE
    )
    config = tiny_build_config(workdir / "features.h5")
    build_bundle(catalog, workdir / "a", config)
    build_bundle(catalog, workdir / "b", dataclasses.replace(config, train=dataclasses.replace(config.train, seed=1)))
    return workdir / "a", workdir / "b"


def publish(pointer: Path, bundle: Path) -> None:
    temporary = pointer.with_name(pointer.name + ".new")
    if temporary.is_symlink():
        temporary.unlink()
    temporary.symlink_to(bundle, target_is_directory=True)
    os.replace(temporary, pointer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--bundle-a", type=Path, default=None)
    parser.add_argument("--bundle-b", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="4 swaps")
    args = parser.parse_args()
    swaps = 4 if args.quick else args.swaps

    from recommender.engine import load_bundle
    from webapp.bundles import LiveBundle

    with tempfile.TemporaryDirectory(prefix="bench-swaps-") as temporary:
        workdir = Path(temporary)
        if args.bundle_a and args.bundle_b:
            bundles = (args.bundle_a, args.bundle_b)
        else:
            bundles = build_two(workdir)
        pointer = workdir / "current"
        publish(pointer, bundles[0])
        live = LiveBundle(pointer, check_interval_s=3600, loader=load_bundle)
        live.load_now()
        size = live.current().backbone.input_size
        photo = np.full((1, size, size, 3), 200, dtype=np.uint8)
        gc.collect()
        start_rss = rss_mb()
        figures = []
        for number in range(1, swaps + 1):
            publish(pointer, bundles[number % 2])
            started = time.perf_counter()
            live.check()
            live.wait_for_reload(300)
            engine = live.current()
            engine.embed_images(photo)
            del engine
            gc.collect()
            figures.append({"swap": number, "rss_mb": rss_mb(), "seconds": time.perf_counter() - started})
            print(f"swap {number:>3}: RSS {figures[-1]['rss_mb']:.1f} MB ({figures[-1]['seconds']:.1f} s)", flush=True)
        getattr(live, "stop", lambda: None)()  # (the watcher thread; older LiveBundles have none)
    steady = figures[1:] if len(figures) > 2 else figures
    slope = (
        float(np.polyfit([f["swap"] for f in steady], [f["rss_mb"] for f in steady], 1)[0]) if len(steady) > 1 else 0
    )
    summary = {
        "swaps": swaps,
        "rss_before_mb": start_rss,
        "rss_after_first_mb": figures[0]["rss_mb"],
        "rss_after_last_mb": figures[-1]["rss_mb"],
        "growth_per_swap_mb": slope,
    }
    print(f"machine: {machine()}")
    print(
        f"RSS before {start_rss:.1f} MB, after swap 1 {figures[0]['rss_mb']:.1f} MB, after swap {swaps} "
        f"{figures[-1]['rss_mb']:.1f} MB; growth {slope:.2f} MB per swap (slope over swaps 2..{swaps})"
    )
    path = save_results("swaps" + ("-quick" if args.quick else ""), {**summary, "per_swap": figures})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
