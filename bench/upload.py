"""Upload cost: one upload against the bare forward pass it computes, and batching concurrent uploads.

    python bench/upload.py [--items 10000] [--seconds 10] [--waits 5] [--rounds 3] [--queries 60] [--keep DIR] [--quick]

1. In process, per test photo, interleaved so that load on the machine hits all alike: the
   bare forward pass of what an upload computes (``engine.embed_outputs`` on the decoded
   photo: the backbone on the photo and its mirror as one batch of 2 when the bundle
   flip-averages, then the classifier), the same with the backbone called once per view (how
   it was before both views went in one call), and the whole upload in process
   (``engine.query(bytes)`` + ``json.dumps``). Also the parts (decode, backbone, classifier,
   search) and what sharing a forward pass can save: ``answer_decoded`` per upload for
   batches of 1 to 16.
2. Over HTTP: the production command (``gunicorn -c python:webapp.gunicorn_conf``: 2 gthread
   workers of 8 threads) on 127.0.0.1, one server per setting, all running for the whole
   measurement: batching off (``RECOMMENDER_BATCH_WAIT_MS=0``) and on with each ``--waits``
   value (batches of up to 16). POST /api/v1/similar from 1 and 8 client threads; each level
   is timed on every server in the order off, on..., ...on, off (``--rounds`` times at 8
   clients), so drift in the machine's load hits each alike, and the runs are pooled.
   Throughput, p50 / p95 latency, server CPU per upload, uploads per forward pass (from
   ``/metrics``), and each run's throughput (their spread is the noise).

The bundle: MobileNet v1 TFLite (../shared) on clothing-small, its index grown to ``--items``
with synthetic embeddings (bench/web.py's helpers). Writes bench/results/upload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from common import RESULTS, ROOT, machine, save_results  # noqa: E402
from web import (  # noqa: E402
    WARMUP_REQUESTS,
    build_base_bundle,
    free_port,
    grow_bundle,
    load_level,
    process_cpu_seconds,
    request,
    stop_server,
    wait_until_ready,
)

#: Target: an upload costs at most this many times the bare forward pass it computes.
TARGET_RATIO = 1.3
#: The batching wait measured against off unless --waits says otherwise (the web app's default).
DEFAULT_WAIT_MS = 5.0
MAX_BATCH = 16
#: Batch sizes whose per-upload cost is timed in process.
BATCH_SIZES = (1, 2, 4, 8, 16)


def milliseconds(values: list[float]) -> dict:
    """p50 / p95 / p99 of a list of milliseconds."""
    return {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 95, 99)}


def measure_in_process(bundle: Path, photos: list[bytes], count: int) -> dict:
    """Upload in process against the bare forward pass, interleaved photo by photo; the parts alone."""
    from recommender.engine import load_bundle
    from recommender.images import load_image
    from recommender.scalers import transform

    engine = load_bundle(bundle)
    backbone = engine.backbone
    photos = (photos * (count // max(1, len(photos)) + 1))[:count]
    decoded = [load_image(photo, backbone.input_size, max_pixels=engine.max_pixels) for photo in photos]

    def two_calls(image):  # the backbone once per view, then the classifier (the old way)
        features = backbone.extract(image[None])
        flipped = backbone.extract(image[None, :, ::-1]) if engine.flip_average else None
        embeddings, outputs = engine.runner.run(features, flipped)
        return transform(engine.embedding_scaler, embeddings), outputs

    for photo, image in zip(photos[:3], decoded[:3]):  # warm every compiled call
        json.dumps(engine.query(photo))
        engine.embed_outputs(image[None])
        two_calls(image)
    times: dict[str, list[float]] = {"bare": [], "bare_two_calls": [], "upload": []}
    for photo, image in zip(photos, decoded):
        for name, call in (
            ("bare", lambda image=image: engine.embed_outputs(image[None])),
            ("bare_two_calls", lambda image=image: two_calls(image)),
            ("upload", lambda photo=photo: json.dumps(engine.query(photo))),
        ):
            started = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - started) * 1000)
    parts: dict[str, list[float]] = {"decode": [], "backbone (both views)": [], "classifier": [], "search": []}
    for photo, image in zip(photos, decoded):
        started = time.perf_counter()
        engine.decode(photo)
        parts["decode"].append((time.perf_counter() - started) * 1000)
        views = np.stack([image, image[:, ::-1]]) if engine.flip_average else image[None]
        started = time.perf_counter()
        features = backbone.extract(views)
        parts["backbone (both views)"].append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        embeddings, _ = engine.runner.run(features[:1], features[1:] if engine.flip_average else None)
        parts["classifier"].append((time.perf_counter() - started) * 1000)
        vector = transform(engine.embedding_scaler, embeddings)
        started = time.perf_counter()
        engine.index.search_excluding(vector, [[]], 6)
        parts["search"].append((time.perf_counter() - started) * 1000)
    # What sharing a forward pass can save at most: per upload, answer_decoded over n decoded uploads.
    options = engine.query_options(6)
    ready = [engine.decode(photo) for photo in (photos * 32)[:32]]  # --quick has fewer photos
    per_upload: dict[int, list[float]] = {size: [] for size in BATCH_SIZES}
    for size in BATCH_SIZES:
        engine.answer_decoded(ready[:size], [options] * size)
    for repeat in range(max(4, count // 5)):
        for size in BATCH_SIZES:
            batch = ready[repeat % 16 :][:size]
            started = time.perf_counter()
            engine.answer_decoded(batch, [options] * len(batch))
            per_upload[size].append((time.perf_counter() - started) * 1000 / len(batch))
    figures = {name: milliseconds(values) for name, values in times.items()}
    return {
        "answer_decoded_per_upload_by_batch": {str(size): milliseconds(values) for size, values in per_upload.items()},
        "flip_average": engine.flip_average,
        "photos": len(photos),
        **figures,
        "parts": {name: milliseconds(values) for name, values in parts.items()},
        "upload_over_bare_p50": figures["upload"]["p50_ms"] / figures["bare"]["p50_ms"],
    }


def start_shipped_server(bundle: Path, port: int, wait_ms: float, max_batch: int, log: Path) -> subprocess.Popen:
    """``gunicorn -c python:webapp.gunicorn_conf 'webapp:create_app()'`` on 127.0.0.1:port (own process group)."""
    environ = {
        **os.environ,
        "RECOMMENDER_BUNDLE": str(bundle),
        "RECOMMENDER_BIND": f"127.0.0.1:{port}",
        "RECOMMENDER_BATCH_WAIT_MS": str(wait_ms),
        "RECOMMENDER_MAX_BATCH": str(max_batch),
        "RECOMMENDER_LOG_FORMAT": "json",
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each server makes its own (webapp.gunicorn_conf)
    command = [sys.executable, "-m", "gunicorn", "-c", "python:webapp.gunicorn_conf", "webapp:create_app()"]
    handle = open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        command, cwd=ROOT, env=environ, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def metric(exposition: str, name: str) -> float:
    """A label-less sample of a Prometheus text exposition (0 when absent)."""
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def batch_figures(port: int) -> tuple[float, float]:
    """``(forward passes, uploads)`` so far, from the server's /metrics (all workers)."""
    _, body, _ = request(port, "GET", "/metrics")
    text = body.decode()
    return metric(text, "recommender_upload_forward_passes_total"), metric(text, "recommender_upload_batch_size_sum")


def run_level(port: int, pid: int, clients: int, seconds: float, photos: list[bytes]) -> dict:
    """One load level on one server: ``clients`` threads uploading for ``seconds``."""

    def upload(number: int):
        return request(port, "POST", "/api/v1/similar?k=6", photos[number % len(photos)])

    cpu_before = process_cpu_seconds(pid)
    passes_before, uploads_before = batch_figures(port)
    level = load_level(port, clients, 100_000, seconds, upload)
    passes, uploads = batch_figures(port)
    level["server_cpu_ms_per_upload"] = (
        1000 * (process_cpu_seconds(pid) - cpu_before) / max(1, level["requests"] + clients * WARMUP_REQUESTS)
    )
    level["uploads_per_forward_pass"] = (uploads - uploads_before) / max(1.0, passes - passes_before)
    return level


def pooled(halves: list[dict]) -> dict:
    """The runs of one level on one server, pooled: summed requests over summed time, mean of percentiles."""
    seconds = [half["requests"] / half["throughput_per_s"] for half in halves if half["throughput_per_s"]]
    requests = sum(half["requests"] for half in halves)
    return {
        "clients": halves[0]["clients"],
        "requests": requests,
        "errors": sum(half["errors"] for half in halves),
        "throughput_per_s": requests / sum(seconds) if seconds else 0.0,
        "p50_ms": float(np.mean([half["p50_ms"] for half in halves])),
        "p95_ms": float(np.mean([half["p95_ms"] for half in halves])),
        "server_cpu_ms_per_upload": float(np.mean([half["server_cpu_ms_per_upload"] for half in halves])),
        "uploads_per_forward_pass": float(np.mean([half["uploads_per_forward_pass"] for half in halves])),
        "throughput_runs": [half["throughput_per_s"] for half in halves],
        "halves": halves,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000, help="index size (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per timed level (default: 10)")
    parser.add_argument("--queries", type=int, default=60, help="photos timed in process (default: 60)")
    parser.add_argument(
        "--waits",
        type=lambda text: [float(value) for value in text.split(",")],
        default=[DEFAULT_WAIT_MS],
        help="batching waits (ms) measured against off, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="off, on, on, off rounds at 8 clients (default: %(default)s)"
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the bundle here, and reuse it from an earlier run"
    )
    parser.add_argument("--quick", action="store_true", help="small and short, to check the script works")
    args = parser.parse_args()
    if args.quick:
        args.items, args.seconds, args.queries = min(args.items, 2000), min(args.seconds, 3), min(args.queries, 10)
        args.rounds = 1
    load_before = os.getloadavg()
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="bench-upload-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (RESULTS / "upload").mkdir(parents=True, exist_ok=True)
    servers = {}
    try:
        bundle, photo_list = workdir / "grown", workdir / "photos.json"
        if bundle.is_dir() and photo_list.is_file():
            print(f"reusing the bundle in {bundle}", flush=True)
        else:
            base, paths = build_base_bundle(workdir, args.quick)
            grow_bundle(base, bundle, args.items)
            photo_list.write_text(json.dumps([str(path) for path in paths]))
        photos = [Path(path).read_bytes() for path in json.loads(photo_list.read_text())]
        print(f"machine: {machine()}; load average before: {load_before}", flush=True)
        in_process = measure_in_process(bundle, photos, args.queries)

        variants = {"off": 0.0, **{f"on {wait:g} ms": wait for wait in args.waits}}
        for name, wait_ms in variants.items():
            port = free_port()
            log = RESULTS / "upload" / f"server-{name.replace(' ', '-')}.log"
            servers[name] = (port, start_shipped_server(bundle, port, wait_ms, MAX_BATCH, log))
        for port, process in servers.values():
            ready = wait_until_ready(port, process)
        halves: dict[tuple[str, int], list[dict]] = {}
        for clients in (1, 8):
            order = [*variants, *reversed(variants)]  # drift in the machine's load hits each alike
            for name in order * (1 if clients == 1 else args.rounds):
                port, process = servers[name]
                level = run_level(port, process.pid, clients, args.seconds, photos)
                halves.setdefault((name, clients), []).append(level)
                print(
                    f"  batching {name}, {clients} client(s): {level['throughput_per_s']:.1f} uploads/s, "
                    f"p50 {level['p50_ms']:.1f} ms",
                    flush=True,
                )
    finally:
        for _, process in servers.values():
            stop_server(process)
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    levels = {f"{name}-{clients}": pooled(values) for (name, clients), values in halves.items()}

    print(f"\nbundle: {ready['items']} items, backbone {ready['backbone'].get('file', ready['backbone'].get('kind'))}")
    print(f"flip-averaged: {in_process['flip_average']}; {in_process['photos']} photos, interleaved\n")
    print(f"{'in process':52s} {'p50 ms':>8s} {'p95 ms':>8s}")
    rows = (
        ("bare forward pass (both views in one call + classifier)", in_process["bare"]),
        ("  same, backbone called once per view (before)", in_process["bare_two_calls"]),
        ("upload: engine.query(bytes) + json.dumps", in_process["upload"]),
        *((f"  part: {name}", figures) for name, figures in in_process["parts"].items()),
    )
    for name, figures in rows:
        print(f"{name:52s} {figures['p50_ms']:8.2f} {figures['p95_ms']:8.2f}")
    for size, figures in in_process["answer_decoded_per_upload_by_batch"].items():
        print(
            f"{'forward pass + search, batch of ' + size + ', per upload':52s} {figures['p50_ms']:8.2f} {figures['p95_ms']:8.2f}"
        )
    bare = in_process["bare"]["p50_ms"]
    print(
        f"upload / bare forward pass, in process: {in_process['upload_over_bare_p50']:.2f} (target <= {TARGET_RATIO})"
    )

    print(f"\nover HTTP (gunicorn -c python:webapp.gunicorn_conf: 2 workers x 8 threads; batches of up to {MAX_BATCH})")
    print(
        f"{'batching':11s} {'clients':>7s} {'uploads/s':>9s} {'p50 ms':>8s} {'p95 ms':>8s} "
        f"{'CPU ms/upload':>13s} {'uploads/pass':>12s} {'errors':>6s}"
    )
    for clients in (1, 8):
        for name in variants:
            level = levels[f"{name}-{clients}"]
            runs = ", ".join(f"{value:.1f}" for value in level["throughput_runs"])
            print(
                f"{name:11s} {clients:7d} {level['throughput_per_s']:9.1f} {level['p50_ms']:8.2f} {level['p95_ms']:8.2f} "
                f"{level['server_cpu_ms_per_upload']:13.2f} {level['uploads_per_forward_pass']:12.2f} {level['errors']:6d}"
                f"   runs: {runs} uploads/s"
            )
    over_http = {name: levels[f"{name}-1"]["p50_ms"] / bare for name in variants}
    gain = {
        name: levels[f"{name}-8"]["throughput_per_s"] / max(1e-9, levels["off-8"]["throughput_per_s"])
        for name in variants
        if name != "off"
    }
    ratios = ", ".join(f"{value:.2f} {name}" for name, value in over_http.items())
    print(f"upload / bare forward pass over HTTP, 1 client: {ratios} (target <= {TARGET_RATIO})")
    print("throughput at 8 clients against off: " + ", ".join(f"{value:.2f}x {name}" for name, value in gain.items()))
    print(f"load average before / after: {load_before} / {load_after} (other work on the machine skews figures)")
    path = save_results(
        "upload" + ("-quick" if args.quick else ""),
        {
            "items": ready["items"],
            "backbone": ready["backbone"],
            "in_process": in_process,
            "http": levels,
            "batching": {"max_wait_ms": list(args.waits), "max_batch": MAX_BATCH},
            "upload_over_bare_http_1_client": over_http,
            "throughput_gain_8_clients": gain,
            "target_ratio": TARGET_RATIO,
            "load_average": {"before": load_before, "after": load_after},
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
