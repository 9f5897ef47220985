"""Slow clients against the production command: sync workers (``gunicorn -w 2``) vs the shipped config.

    python bench/slow_clients.py --bundle PATH [--slow 2] [--seconds 40]

For each server: start it on 127.0.0.1, wait until it answers, then open ``--slow``
connections that send an upload's headers and then one body byte a second, and meanwhile
probe ``GET /healthz`` once a second (3 s timeout each). Reported: probes answered / sent, the
slowest answered probe, and the WORKER TIMEOUT lines in the server's log. Both servers get
gunicorn's default worker timeout (30 s). Writes bench/results/slow_clients.json.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, machine, save_results  # noqa: E402

SERVERS = {
    "sync, gunicorn -w 2": ["-w", "2", "-b", "{bind}", "webapp:create_app()"],
    "shipped config (2 gthread workers x 8 threads)": ["-c", "python:webapp.gunicorn_conf", "webapp:create_app()"],
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str, timeout: float) -> tuple[int, float]:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    finally:
        connection.close()


def slow_upload(port: int, seconds: float, stop: threading.Event) -> None:
    """Headers, then one body byte a second until ``seconds`` pass or the server hangs up."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /api/v1/similar HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not stop.is_set():
                sock.sendall(b"\xff")
                time.sleep(1.0)
    except OSError:
        pass


def measure(name: str, arguments: list[str], bundle: Path, slow: int, seconds: float, workdir: Path) -> dict:
    port = free_port()
    log_path = workdir / f"{len(os.listdir(workdir))}.log"
    environment = {
        **os.environ,
        "RECOMMENDER_BUNDLE": str(bundle),
        "RECOMMENDER_BIND": f"127.0.0.1:{port}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    command = [sys.executable, "-m", "gunicorn", *[a.format(bind=f"127.0.0.1:{port}") for a in arguments]]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                get(port, "/readyz", 300)
                get(port, "/readyz", 300)
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit(f"{name}: server did not start:\n{log_path.read_text()[-2000:]}") from None
                time.sleep(0.5)
        stop = threading.Event()
        clients = [threading.Thread(target=slow_upload, args=(port, seconds, stop), daemon=True) for _ in range(slow)]
        for client in clients:
            client.start()
        time.sleep(1.0)
        answered, sent, slowest = 0, 0, 0.0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sent += 1
            started = time.monotonic()
            try:
                status, took = get(port, "/healthz", 3)
                if status == 200:
                    answered += 1
                    slowest = max(slowest, took)
            except OSError:
                pass
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        stop.set()
        log = log_path.read_text(errors="replace")
        row = {
            "server": name,
            "slow_clients": slow,
            "seconds": seconds,
            "probes_sent": sent,
            "probes_answered": answered,
            "slowest_answered_s": round(slowest, 3),
            "worker_timeouts": log.count("WORKER TIMEOUT"),
        }
        print(
            f"{name:<48} probes answered {answered}/{sent}, slowest {slowest:.2f} s, "
            f"WORKER TIMEOUT x{row['worker_timeouts']}",
            flush=True,
        )
        return row
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder to serve")
    parser.add_argument("--slow", type=int, default=2, help="slow uploading connections (default: 2)")
    parser.add_argument("--seconds", type=float, default=40.0, help="how long they drip (default: 40)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-slow-") as temporary:
        rows = [
            measure(name, arguments, args.bundle, args.slow, args.seconds, Path(temporary))
            for name, arguments in SERVERS.items()
        ]
    print(f"results: {save_results('slow_clients', {'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
