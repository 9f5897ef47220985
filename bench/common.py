"""Shared helpers of the benchmark scripts: machine description, result files, paired comparisons."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CLOTHING = SHARED / "datasets" / "clothing-small"
MOBILENET = SHARED / "models" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    """Cores, CPU model, Python and OS of this machine (printed with every benchmark)."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "python": platform.python_version(), "system": platform.platform()}


def save_results(name: str, payload: dict) -> Path:
    """Writes ``bench/results/<name>.json`` with the machine and a timestamp."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def training_arguments(description: str, quick_help: str):
    """The command line of the benchmarks that train per seed: ``--seeds``, ``--feature-store``, ``--quick``.

    Returns:
        ``(args, seeds, train_config)``: ``--quick`` means seed 0 and at most 4 epochs of the
        default ``TrainConfig``; the build's baseline check is off (it would only add seconds to
        the training times these benchmarks report).
    """
    from dataclasses import replace

    from recommender.classifier import TrainConfig

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds (default: 0,1,2,3,4)")
    parser.add_argument("--feature-store", type=Path, default=None, help="feature cache (default: a temp file)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args()
    seeds = [0] if args.quick else [int(seed) for seed in args.seeds.split(",")]
    train_config = replace(TrainConfig(), baseline=False, **({"max_epochs": 4} if args.quick else {}))
    return args, seeds, train_config


#: Differences smaller than this are equality (figures are shares of a few hundred items).
TIE_TOLERANCE = 1e-9


def paired_comparison(figure: str, first: str, second: str, first_values, second_values) -> dict:
    """``first`` against ``second`` on one figure, paired by seed (same data, same seed).

    Args:
        figure: the figure's name.
        first, second: the two compared choices.
        first_values, second_values: the figure per seed, in the same seed order.

    Returns:
        ``pair``, ``better`` (by the mean over seeds, or ``tie``), the mean ``difference``
        (first - second), the per-seed ``paired_differences``, on how many seeds ``first`` is
        ``ahead`` / ``tied`` / ``behind``, the ``seed_spread`` (the larger max - min of the two)
        and ``exceeds_spread`` (the mean difference is larger than it; None with one seed: no
        spread measured).
    """
    first_values = np.asarray(first_values, np.float64)
    second_values = np.asarray(second_values, np.float64)
    paired = first_values - second_values
    difference = float(paired.mean())
    spread = float(max(np.ptp(first_values), np.ptp(second_values)))
    better = "tie" if abs(difference) < TIE_TOLERANCE else (first if difference > 0 else second)
    return {
        "figure": figure,
        "pair": [first, second],
        "better": better,
        "difference": difference,
        "paired_differences": [float(d) for d in paired],
        "ahead": int(np.sum(paired > TIE_TOLERANCE)),
        "tied": int(np.sum(np.abs(paired) <= TIE_TOLERANCE)),
        "behind": int(np.sum(paired < -TIE_TOLERANCE)),
        "seed_spread": spread,
        "exceeds_spread": bool(abs(difference) > spread) if len(paired) > 1 else None,
    }


def describe_comparison(comparison: dict) -> str:
    """One line on a :func:`paired_comparison`."""
    c = comparison
    first, second = c["pair"]
    paired = ", ".join(f"{d:+.3f}" for d in c["paired_differences"])
    if c["better"] == "tie":
        head = f"{c['figure']}: {first} and {second} tie"
    else:
        head = f"{c['figure']}: {c['better']} better by {abs(c['difference']):.3f}"
    seeds = f"{first} ahead on {c['ahead']}, tied on {c['tied']}, behind on {c['behind']} seed(s)"
    if c["exceeds_spread"] is None:
        spread = "one seed: no seed-to-seed spread measured"
    else:
        larger = "larger" if c["exceeds_spread"] else "not larger"
        spread = f"seed-to-seed spread {c['seed_spread']:.3f}: the difference is {larger}"
    return f"{head} (mean); per seed {first} - {second}: {paired} ({seeds}); {spread}"
