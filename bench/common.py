"""Shared helpers of the benchmark scripts: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

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
