"""Rebuild speed and memory: full build vs no-change and 1%-change nightly rebuilds.

    python bench/rebuild.py [--quick]

On ../shared/datasets/clothing-small (all 3,781 real photos) with the shared MobileNet TFLite
backbone. Each run is a real `python -m recommender rebuild` subprocess; its wall time, the
job's own time (from its JSON summary, without interpreter start and imports) and its peak
memory (max RSS) are measured. Writes bench/results/rebuild.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import CLOTHING, MOBILENET, ROOT, machine, save_results  # noqa: E402

TARGETS = {"no change": 0.05, "1% changed": 0.10}
#: Wall-time target of an unchanged nightly rebuild, interpreter start included (issue 14).
WALL_TARGETS = {"no change": 2.0}


def run(catalog: Path, root: Path) -> dict:
    """One rebuild subprocess: wall seconds, job seconds, peak RSS in MB, summary."""
    command = [sys.executable, "-m", "recommender", "rebuild", "--catalog", str(catalog), "--root", str(root)]
    command += ["--backbone", f"tflite:{MOBILENET}", "--label-column", "label", "--id-column", "id"]
    command += ["--image-root", "/"]  # photos in ../shared and in the temp folder: no common folder to confine to
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    output, errors = process.stdout.read(), process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"rebuild failed:\n{errors[-3000:]}")
    summary = json.loads(output.strip().splitlines()[-1])
    return {"wall_s": wall, "job_s": summary["total_seconds"], "peak_mb": usage.ru_maxrss / 1024, "summary": summary}


def write_catalog(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "file", "split", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 photos, for the test that keeps this script working")
    args = parser.parse_args()
    if not CLOTHING.is_dir() or not MOBILENET.is_file():
        print(f"needs {CLOTHING} and {MOBILENET}", file=sys.stderr)
        return 1
    with open(CLOTHING / "labels.csv", newline="") as handle:
        rows = [{**row, "id": row["file"], "file": str(CLOTHING / row["file"])} for row in csv.DictReader(handle)]
    if args.quick:
        rows = rows[::12]
    from PIL import Image

    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        root = temp / "root"
        results = {}
        results["full build"] = run(write_catalog(temp / "full.csv", rows), root)
        results["no change"] = run(write_catalog(temp / "same.csv", rows), root)
        # 1% of the photos replaced by new files (mirrored copies) and 1% new products added.
        rng = random.Random(0)
        changed = [dict(row) for row in rows]
        count = max(1, len(rows) // 100)
        for i, row in enumerate(rng.sample(changed, count)):
            target = temp / f"changed-{i}.jpg"
            Image.open(row["file"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target, quality=90)
            row["file"] = str(target)
        for i, row in enumerate(rng.sample(rows, count)):
            target = temp / f"added-{i}.jpg"
            Image.open(row["file"]).rotate(3, fillcolor="white").save(target, quality=90)
            changed.append({**row, "id": f"added-{i}", "file": str(target)})
        results["1% changed"] = run(write_catalog(temp / "changed.csv", changed), root)
    full = results["full build"]
    print(f"machine: {machine()}; load average {os.getloadavg()}")
    print(f"clothing-small{' (quick subset)' if args.quick else ''}: {len(rows)} photos, MobileNet v1 TFLite backbone")
    print(
        f"{'run':14s} {'wall s':>8s} {'target':>8s} {'job s':>8s} {'% of full':>10s} {'target':>8s} {'peak MB':>8s}  counts"
    )
    table = []
    for name, result in results.items():
        share = result["job_s"] / full["job_s"]
        target = TARGETS.get(name)
        counts = result["summary"].get("counts", {})
        note = f"{counts.get('added', 0)} added, {counts.get('changed', 0)} changed, {counts.get('extracted', 0)} extracted, {result['summary']['state']}"
        if result["summary"].get("backbone_loaded") is False:
            note += ", backbone not loaded"
        if "retrain" in result["summary"]:
            note += f", classifier {'retrained' if result['summary']['retrain'] else 'reused'}"
        print(
            f"{name:14s} {result['wall_s']:8.2f} {('<= ' + format(WALL_TARGETS[name], '.0f') + ' s') if name in WALL_TARGETS else '':>8s} {result['job_s']:8.2f} {share:10.1%} {('<= ' + format(target, '.0%')) if target else '':>8s} {result['peak_mb']:8.0f}  {note}"
        )
        table.append(
            {
                "run": name,
                "wall_s": result["wall_s"],
                "wall_target_s": WALL_TARGETS.get(name),
                "backbone_loaded": result["summary"].get("backbone_loaded", True),
                "job_s": result["job_s"],
                "share_of_full": share,
                "target": target,
                "peak_mb": result["peak_mb"],
                "counts": counts,
                "state": result["summary"]["state"],
            }
        )
    print("job s = the rebuild's own time from its JSON summary; wall s adds interpreter start and imports")
    path = save_results("rebuild" + ("-quick" if args.quick else ""), {"rows": table, "photos": len(rows)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
