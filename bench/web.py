"""Web serving latency: POST /api/v1/similar at 1 and 8 clients, GET items/<id>/similar, next to a bare forward pass.

    python bench/web.py [--items 10000] [--requests 200] [--seconds 30] [--workers 2] [--server gunicorn] [--quick]

Builds a bundle with the shared MobileNet v1 TFLite backbone on clothing-small (train +
validation; features cached in bench/results/web/), then grows its index to ``--items`` with
synthetic embeddings (real embeddings plus Gaussian noise, as the issue allows: search cost
depends on the index size, not on where the vectors came from). Starts the production
command (gunicorn) or Flask's threaded server on 127.0.0.1 in a subprocess, and measures from
client threads in this process; every load loop is bounded by a request count and a time
budget. The bare forward pass (the model's whole forward pass for one decoded image, as a
query runs it) is measured in this process in the same run, while the server is idle.
Without ../shared, --quick uses a generated catalog and a random-init ResNet50 at 64 px.
Writes bench/results/web.json (or web-quick.json).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from common import CLOTHING, MOBILENET, RESULTS, ROOT, machine, save_results  # noqa: E402

#: Seconds the server may take to load the bundle and answer /readyz.
STARTUP_TIMEOUT_S = 300
#: Unrecorded requests per client before each measured level (connections, caches, tracing).
WARMUP_REQUESTS = 5


# -- the bundle ----------------------------------------------------------------------------


def build_base_bundle(workdir: Path, quick: bool) -> tuple[Path, list[Path]]:
    """Builds the real bundle and picks query photos.

    Returns:
        ``(bundle path, query photo paths)``; the photos are not in the catalog.
    """
    from indexer.build import build_bundle
    from recommender.backbones import BackboneSpec
    from recommender.catalog import read_catalog
    from recommender.config import BuildConfig

    store = RESULTS / "web" / "features.h5"
    store.parent.mkdir(parents=True, exist_ok=True)
    defaults = BuildConfig()
    if CLOTHING.is_dir() and MOBILENET.is_file():
        splits = ("validation",) if quick else ("train", "validation")
        config = replace(
            defaults,
            splits=splits,
            backbone=BackboneSpec(name=f"tflite:{MOBILENET}"),
            feature_store=store,
            train=replace(defaults.train, max_epochs=5 if quick else defaults.train.max_epochs),
        )
        catalog = CLOTHING / "labels.csv"
        photos = [row.path for row in read_catalog(catalog, splits=["test"]).rows]
    else:
        if not quick:
            raise SystemExit(f"needs {CLOTHING} and {MOBILENET} (or --quick)")
        from recommender.synthetic import generate_catalog

        catalog = generate_catalog(workdir / "catalog", per_class=6, size=64, seed=0)
        config = replace(
            defaults,
            id_column="id",
            label_columns=("label", "colour"),
            backbone=BackboneSpec(name="resnet50", weights="none", input_size=64),
            feature_store=store,
            train=replace(defaults.train, max_epochs=5),
        )
        photos = sorted((workdir / "catalog" / "images").glob("*.jpg"))[::7]
    print(f"building the base bundle ({config.backbone.name.split('/')[-1]}) ...", flush=True)
    started = time.perf_counter()
    report = build_bundle(catalog, workdir / "base", config)
    print(f"  {report.items} items in {time.perf_counter() - started:.0f} s ({report.extracted} extracted)", flush=True)
    return workdir / "base", photos


def grow_bundle(base: Path, out: Path, items: int, seed: int = 0) -> Path:
    """Writes a copy of ``base`` whose index holds ``items`` vectors: the real ones plus synthetic ones.

    Each synthetic vector is a random real embedding plus Gaussian noise (sd 0.5 per
    dimension of the standardized space), its catalog row a copy of that item's row under a
    new id and a made-up content hash (so it never counts as the same photo).
    """
    import hashlib

    from recommender.bundle import new_bundle_id, read_manifest, write_bundle
    from recommender.engine import load_bundle
    from recommender.index import VectorIndex

    engine = load_bundle(base)
    real = np.stack([engine.index.reconstruct(i) for i in range(engine.index.size)])
    rng = np.random.default_rng(seed)
    extra = max(0, items - len(real))
    sources = rng.integers(0, len(real), extra)
    synthetic = real[sources] + rng.normal(scale=0.5, size=(extra, real.shape[1])).astype(np.float32)
    vectors = np.concatenate([real, synthetic]).astype(np.float32)
    rows = list(engine.rows)
    for number, source in enumerate(sources):
        item_id = f"synthetic-{number:06d}"
        rows.append(replace(engine.rows[source], id=item_id, sha256=hashlib.sha256(item_id.encode()).hexdigest()))
    manifest = read_manifest(base)

    def fill(folder: Path) -> dict:
        for name in manifest.files:
            if name not in ("index.faiss", "catalog.jsonl"):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)  # backbone/<model file>
                shutil.copy2(base / name, folder / name)
        VectorIndex.build(vectors, "flat", use_gpu=False).save(folder / "index.faiss")
        with open(folder / "catalog.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row.to_json(), ensure_ascii=False) + "\n")
        fields = {key: value for key, value in manifest.to_json().items() if key not in ("files", "format_version")}
        fields["bundle_id"] = new_bundle_id()
        fields["counts"] = {**manifest.counts.to_json(), "items": len(rows)}
        fields["synthetic"] = {"items": extra, "from": manifest.bundle_id}
        fields["index"] = {"kind": "flat", "size": len(rows)}
        return fields

    return write_bundle(out, fill)


# -- the server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(kind: str, bundle: Path, port: int, workers: int, threads: int) -> subprocess.Popen:
    """Starts the web app on 127.0.0.1:port in a subprocess (its own process group)."""
    environ = {**os.environ, "RECOMMENDER_BUNDLE": str(bundle), "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if kind == "gunicorn":
        gunicorn = Path(sys.executable).with_name("gunicorn")
        command = [str(gunicorn), "-w", str(workers), "-b", f"127.0.0.1:{port}", "--timeout", "120"]
        if threads > 1:
            command += ["-k", "gthread", "--threads", str(threads)]
        command.append("webapp:create_app()")
    else:
        code = (
            f"import sys; from webapp import serve_bundle; sys.exit(serve_bundle({str(bundle)!r}, '127.0.0.1', {port}))"
        )
        command = [sys.executable, "-c", code]
    log = open(RESULTS / "web" / "server.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        command, cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_server(process: subprocess.Popen) -> None:
    """Stops the server we started (SIGTERM to its own process group, then SIGKILL)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, float]:
    """One HTTP request on a fresh connection (gunicorn's sync worker closes every connection).

    Returns:
        ``(status, body, milliseconds the app itself spent, from its Server-Timing header)``.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Content-Type": "image/jpeg"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        timing = response.getheader("Server-Timing", "app;dur=nan")
        return response.status, response.read(), float(timing.split("dur=")[1])
    finally:
        connection.close()


def wait_until_ready(port: int, process: subprocess.Popen) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {RESULTS / 'web' / 'server.log'}")
        try:
            status, body, _ = request(port, "GET", "/readyz")
            if status == 200:
                return json.loads(body)
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready after {STARTUP_TIMEOUT_S} s")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live children (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(child) for child in children)
        except (OSError, IndexError, ValueError):
            continue
    return total


# -- measuring -----------------------------------------------------------------------------


def percentiles(milliseconds: list[float]) -> dict:
    return {
        "p50_ms": float(np.percentile(milliseconds, 50)),
        "p95_ms": float(np.percentile(milliseconds, 95)),
        "p99_ms": float(np.percentile(milliseconds, 99)),
        "mean_ms": float(np.mean(milliseconds)),
    }


def timed(call, repeats: int, budget_s: float) -> list[float]:
    """Milliseconds of ``call()`` repeated up to ``repeats`` times or ``budget_s`` seconds."""
    call()
    times = []
    started = time.perf_counter()
    while len(times) < repeats and time.perf_counter() - started < budget_s:
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def measure_in_process(bundle: Path, photos: list[bytes], repeats: int, budget_s: float) -> dict:
    """The bare forward pass and an in-process query, with the same engine code the server runs."""
    from recommender.engine import load_bundle
    from recommender.images import load_image

    engine = load_bundle(bundle)
    size = engine.backbone.input_size
    decoded = [load_image(photo, size, max_pixels=engine.max_pixels) for photo in photos[:8]]
    one = decoded[0][None]
    batch = np.stack(decoded)
    results = {
        "forward pass, 1 image": percentiles(timed(lambda: engine.embed_images(one), repeats, budget_s)),
        "backbone only, 1 image": percentiles(timed(lambda: engine.backbone.extract(one), repeats, budget_s)),
        "decode + letterbox, 1 photo": percentiles(
            timed(lambda: load_image(photos[0], size, max_pixels=engine.max_pixels), repeats, budget_s)
        ),
        "engine.query in process": percentiles(timed(lambda: engine.query(photos[0], k=6), repeats, budget_s)),
    }
    per_batch = percentiles(timed(lambda: engine.embed_images(batch), max(10, repeats // 8), budget_s))
    results[f"forward pass, batch of {len(batch)}, per image"] = {
        key: value / len(batch) for key, value in per_batch.items()
    }
    results["flip_average"] = engine.flip_average
    return results


def load_level(port: int, clients: int, requests_per_client: int, budget_s: float, make_request) -> dict:
    """Runs ``clients`` threads, each sending up to ``requests_per_client`` requests within ``budget_s``."""
    latencies: list[float] = []
    app_times: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    # Throughput counts from the moment every client has warmed up.
    measuring_since: list[float] = []
    barrier = threading.Barrier(clients, action=lambda: measuring_since.append(time.perf_counter()))

    def client(number: int) -> None:
        for warmup in range(WARMUP_REQUESTS):
            make_request(number * 1000 + warmup)
        barrier.wait()
        deadline = time.monotonic() + budget_s
        for count in range(requests_per_client):
            if time.monotonic() > deadline:
                break
            started = time.perf_counter()
            try:
                status, _, app_ms = make_request(number * 1000 + WARMUP_REQUESTS + count)
            except OSError as error:
                with lock:
                    errors.append(str(error))
                continue
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)
                app_times.append(app_ms)
                statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - measuring_since[0]
    failed = sum(count for status, count in statuses.items() if status != 200) + len(errors)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": failed,
        "statuses": {str(k): v for k, v in statuses.items()},
        "throughput_per_s": len(latencies) / wall if wall else 0.0,
        **percentiles(latencies or [float("nan")]),
        "app_p50_ms": float(np.percentile(app_times, 50)) if app_times else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000, help="index size (default: %(default)s)")
    parser.add_argument(
        "--requests", type=int, default=400, help="requests per measured level, over all clients (default: 400)"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="time budget per level (default: 30)")
    parser.add_argument("--server", choices=("gunicorn", "flask"), default="gunicorn")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="gunicorn threads per worker (gthread when > 1)")
    parser.add_argument("--quick", action="store_true", help="small and short, to check the script works")
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the bundles in this folder, and reuse them from an earlier run"
    )
    args = parser.parse_args()
    if args.quick:
        args.items, args.requests, args.seconds = min(args.items, 2000), min(args.requests, 48), min(args.seconds, 10)

    load_before = os.getloadavg()[0]
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="bench-web-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (RESULTS / "web").mkdir(parents=True, exist_ok=True)
    try:
        bundle = workdir / "grown"
        photo_list = workdir / "photos.json"
        if bundle.is_dir() and photo_list.is_file():  # a --keep folder from an earlier run
            photo_paths = json.loads(photo_list.read_text())
            print(f"reusing the bundle in {bundle}", flush=True)
        else:
            base, photo_paths = build_base_bundle(workdir, args.quick)
            grow_bundle(base, bundle, args.items)
            photo_list.write_text(json.dumps([str(path) for path in photo_paths]))
        photos = [Path(path).read_bytes() for path in photo_paths]
        print(f"machine: {machine()}")
        in_process = measure_in_process(bundle, photos, repeats=max(50, args.requests // 2), budget_s=args.seconds)

        port = free_port()
        server = start_server(args.server, bundle, port, args.workers, args.threads)
        try:
            ready = wait_until_ready(port, server)
            with open(bundle / "catalog.jsonl", encoding="utf-8") as handle:
                item_ids = [json.loads(line)["id"] for line in handle][::97]

            def upload(number: int):
                return request(port, "POST", "/api/v1/similar?k=6", photos[number % len(photos)])

            def item(number: int):
                return request(port, "GET", f"/api/v1/items/{item_ids[number % len(item_ids)]}/similar?k=6")

            levels = []
            for name, make_request, clients in (
                ("POST /api/v1/similar", upload, 1),
                ("POST /api/v1/similar", upload, 8),
                ("GET /api/v1/items/<id>/similar", item, 1),
                ("GET /api/v1/items/<id>/similar", item, 8),
            ):
                per_client = max(1, args.requests // clients)
                cpu_before = process_cpu_seconds(server.pid)
                level = load_level(port, clients, per_client, args.seconds, make_request)
                level["server_cpu_ms_per_request"] = (
                    1000
                    * (process_cpu_seconds(server.pid) - cpu_before)
                    / max(1, level["requests"] + clients * WARMUP_REQUESTS)
                )
                levels.append({"endpoint": name, **level})
        finally:
            stop_server(server)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)

    forward = in_process["forward pass, 1 image"]["p50_ms"]
    server_name = f"{args.server} -w {args.workers}" + (f" --threads {args.threads}" if args.threads > 1 else "")
    print(
        f"bundle: {ready['items']} items ({ready['backbone'].get('file', ready['backbone'].get('kind'))}), server: {server_name}"
    )
    print(f"\n{'in process (no HTTP)':44s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name, figures in in_process.items():
        if isinstance(figures, dict):
            print(f"{name:44s} {figures['p50_ms']:8.2f} {figures['p99_ms']:8.2f}")
    header = f"{'over HTTP':34s} {'clients':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'app p50':>8s} {'req/s':>7s}"
    print(f"\n{header} {'errors':>6s} {'CPU ms/req':>10s}")
    for level in levels:
        print(
            f"{level['endpoint']:34s} {level['clients']:7d} {level['p50_ms']:8.2f} {level['p99_ms']:8.2f} "
            f"{level['app_p50_ms']:8.2f} {level['throughput_per_s']:7.1f} {level['errors']:6d} "
            f"{level['server_cpu_ms_per_request']:10.2f}"
        )
    print(
        f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} (other work skews figures)"
    )
    upload_one = levels[0]["p50_ms"]
    print(f"\nupload p50 / bare forward p50 = {upload_one / forward:.2f} (target <= 1.3)")
    print(
        f"items p50 = {levels[2]['p50_ms']:.2f} ms (target < 5); errors: {sum(level['errors'] for level in levels)} (target 0)"
    )
    batch_key = next(key for key in in_process if key.startswith("forward pass, batch"))
    gain = forward / in_process[batch_key]["p50_ms"]
    print(f"batching: one forward pass per image costs {gain:.2f}x less in a batch of 8 than alone")
    path = save_results(
        "web" + ("-quick" if args.quick else ""),
        {
            "server": server_name,
            "items": ready["items"],
            "backbone": ready["backbone"],
            "in_process": in_process,
            "levels": levels,
            "upload_over_forward": upload_one / forward,
            "batch_gain": gain,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
