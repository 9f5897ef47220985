"""The production command: gunicorn with the shipped config survives slow clients and follows a publish in every worker.

One gunicorn (``-c python:webapp.gunicorn_conf``, 2 workers of 4 threads, uploads batched) serves a
``current`` symlink on 127.0.0.1 for the whole module; it is killed when the module ends.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import prometheus_sample
from test_webapp_swap import publish

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 240
RELOAD_INTERVAL_S = 1
BODY_TIMEOUT_S = 4
WORKER_TIMEOUT_S = 5  # short: a blocked worker heartbeat would show up as WORKER TIMEOUT here


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A gunicorn process with the shipped config; its log (access and error lines) is kept in memory."""

    def __init__(self, pointer: Path, log_path: Path):
        self.port = free_port()
        self.log_path = log_path
        environment = {
            **os.environ,
            "RECOMMENDER_BUNDLE": str(pointer),
            "RECOMMENDER_RELOAD_INTERVAL": str(RELOAD_INTERVAL_S),
            "RECOMMENDER_BIND": f"127.0.0.1:{self.port}",
            "RECOMMENDER_WORKERS": "2",
            "RECOMMENDER_THREADS": "4",
            "RECOMMENDER_BODY_TIMEOUT": str(BODY_TIMEOUT_S),
            "RECOMMENDER_WORKER_TIMEOUT": str(WORKER_TIMEOUT_S),
            "RECOMMENDER_BATCH_WAIT_MS": "5",  # uploads batched: every test here runs through the batcher
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PROMETHEUS_MULTIPROC_DIR": str(log_path.parent / "metrics"),
        }
        self.metrics_dir = log_path.parent / "metrics"
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:webapp.gunicorn_conf", "webapp:create_app()"],
            cwd=ROOT,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_both_workers_ready(self) -> None:
        """Waits until both workers have answered (each loads TensorFlow and the bundle after the fork)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"gunicorn exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                self.get("/readyz", timeout=STARTUP_TIMEOUT_S)
            except OSError:
                time.sleep(0.5)  # not listening yet
                continue
            if len(set(self.pids_seen())) >= 2:
                return
        pytest.fail(f"gunicorn not ready after {STARTUP_TIMEOUT_S} s:\n{self.log()[-3000:]}")

    def pids_seen(self) -> list[str]:
        return re.findall(r"pid=<(\d+)>", self.log())

    def request(self, method: str, path: str, body: bytes | None = None, headers=None, timeout: float = 30):
        """One request on a fresh connection (so the two workers share them): ``(status, body, seconds)``."""
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read(), time.perf_counter() - started
        finally:
            connection.close()

    def get(self, path: str, timeout: float = 30):
        return self.request("GET", path, timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bundle):
    folder = tmp_path_factory.mktemp("serving")
    pointer = folder / "current"
    publish(pointer, tiny_bundle)
    running = Server(pointer, folder / "gunicorn.log")
    try:
        running.wait_until_both_workers_ready()
        running.pointer = pointer
        yield running
    finally:
        running.stop()


class SlowUpload(threading.Thread):
    """Sends an upload's headers, then a few body bytes every half second, as a slow phone would."""

    def __init__(self, port: int, declared: int = 5000, seconds: float = 8.0):
        super().__init__(daemon=True)
        self.port, self.declared, self.seconds = port, declared, seconds
        self.bytes_sent = 0
        self.ended_by_server_after: float | None = None
        self.answer = b""

    def run(self) -> None:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=self.seconds + 10) as sock:
            sock.sendall(
                b"POST /api/v1/similar HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                + f"Content-Length: {self.declared}\r\n\r\n".encode()
            )
            sock.settimeout(0.5)
            while time.monotonic() - started < self.seconds and self.bytes_sent < self.declared:
                try:
                    sock.sendall(b"\xff" * 4)
                    self.bytes_sent += 4
                except OSError:  # reset by the server
                    break
                try:
                    chunk = sock.recv(65536)  # waits up to 0.5 s: the pace of this client
                except TimeoutError:
                    continue
                except OSError:
                    break
                self.answer += chunk
                if not chunk or self.answer:
                    break
            self.ended_by_server_after = time.monotonic() - started if self.answer or self._closed(sock) else None

    @staticmethod
    def _closed(sock: socket.socket) -> bool:
        try:
            sock.settimeout(2)
            return sock.recv(1) == b""
        except (TimeoutError, OSError):
            return False


def test_slow_uploads_do_not_stop_health_checks_or_other_uploads(server, engine):
    photo = Path(engine.rows[3].path).read_bytes()
    slow = [SlowUpload(server.port) for _ in range(3)]
    for client in slow:
        client.start()
    time.sleep(1.0)  # the slow bodies are being read by their threads now
    probes, uploads = [], []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        probes.append(server.get("/healthz", timeout=5))
        uploads.append(server.request("POST", "/api/v1/similar?k=3", photo, {"Content-Type": "image/jpeg"}, 10))
        time.sleep(0.25)
    for client in slow:
        client.join(20)

    assert probes and all(status == 200 for status, _, _ in probes), probes
    assert max(seconds for _, _, seconds in probes) < 2.0
    assert all(status == 200 for status, _, _ in uploads)
    assert all(json.loads(body)["neighbors"] for _, body, _ in uploads)
    # The slow bodies were cut off at the body deadline, long before they could finish.
    for client in slow:
        assert client.ended_by_server_after is not None, "the server must drop a body that does not arrive"
        assert client.ended_by_server_after < BODY_TIMEOUT_S + 4 and client.bytes_sent < client.declared
    log = server.log()
    assert "WORKER TIMEOUT" not in log and log.count("Booting worker") == 2, log[-3000:]
    assert "request body not received within" in log


def _bundle_answers(server, item_id: str, count: int) -> list[tuple[str, str]]:
    """``(bundle id, worker pid)`` of item requests, each on its own connection.

    At least ``count`` of them, and more (for up to 20 s) until both workers have answered: which
    worker accepts a connection is up to the kernel, and a worker that has just swapped bundles
    is busy collecting the old one for a moment (120 probes in 0.7 s all went to the other one).
    """
    answers = []
    deadline = time.monotonic() + 20
    while len(answers) < count or (len({pid for _, pid in answers}) < 2 and time.monotonic() < deadline):
        marker = f"probe-{time.monotonic_ns()}"
        status, body, _ = server.get(f"/api/v1/items/{item_id}/similar?k=2&{marker}")
        assert status == 200
        pid = re.search(rf"{marker}[^\n]*pid=<(\d+)>", _wait_for_log(server, marker)).group(1)
        answers.append((json.loads(body)["bundle"], pid))
    return answers


def _wait_for_log(server, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log()
        if text in log:
            return log
        time.sleep(0.05)
    pytest.fail(f"{text!r} not in the log")


def test_concurrent_uploads_share_forward_passes_in_the_workers(server, engine):
    """With batching on, concurrent uploads in gthread workers are answered as alone, in fewer forward passes."""
    photos = [Path(row.path).read_bytes() for row in engine.rows[::6][:8]]
    expected = [[n["id"] for n in engine.query(photo, k=3)["neighbors"]] for photo in photos]

    def counts() -> tuple[float, float]:
        exposition = server.get("/metrics")[1].decode()
        return (
            prometheus_sample(exposition, "recommender_upload_forward_passes_total"),
            prometheus_sample(exposition, "recommender_upload_batch_size_sum"),
        )

    def upload(number: int):
        return server.request("POST", "/api/v1/similar?k=3", photos[number % 8], {"Content-Type": "image/jpeg"})

    for _ in range(4):  # which requests meet is up to timing; a few rounds make a shared pass certain
        passes_before, uploads_before = counts()
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(upload, range(16)))
        for number, (status, body, _) in enumerate(answers):
            assert status == 200, body[:300]
            assert [n["id"] for n in json.loads(body)["neighbors"]] == expected[number % 8]
        passes, uploads = counts()
        assert uploads - uploads_before == 16
        if passes - passes_before < 16:
            break
    assert passes - passes_before < uploads - uploads_before


def test_every_worker_follows_a_publish_and_a_rollback_without_traffic(server, engine, tiny_bundle, attribute_bundle):
    from recommender.bundle import read_manifest

    second_bundle = attribute_bundle  # the same catalog with more heads: the same item ids
    item_id = engine.rows[0].id
    first_id = engine.bundle_id
    second_id = read_manifest(second_bundle).bundle_id
    before = _bundle_answers(server, item_id, 12)
    assert {bundle for bundle, _ in before} == {first_id} and len({pid for _, pid in before}) == 2

    for target, expected in ((second_bundle, second_id), (tiny_bundle, first_id)):
        swaps_before = server.log().count(f"now serving bundle {expected}")
        publish(server.pointer, target)
        # No request is sent meanwhile: each worker's watcher loads the bundle on its own.
        deadline = time.monotonic() + 180
        while server.log().count(f"now serving bundle {expected}") < swaps_before + 2:
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.25)
        after = _bundle_answers(server, item_id, 12)
        assert {bundle for bundle, _ in after} == {expected}, after
        assert len({pid for _, pid in after}) == 2, "both workers must have answered"


def test_metrics_sum_both_workers_and_every_request_has_an_id_and_a_json_log_line(server):
    """/metrics on either worker reports the requests of both (multiprocess mode); X-Request-ID is kept and logged."""
    before = server.get("/metrics")[1].decode()
    baseline = prometheus_sample(
        before, "recommender_http_requests_total", endpoint="/healthz", method="GET", status="200"
    )
    sent, workers = [], set()
    while len(sent) < 16 or (len(workers) < 2 and len(sent) < 160):  # until both workers answered some
        request_id = f"ops-{len(sent)}-{time.monotonic_ns()}"
        status, _, _ = server.request("GET", f"/healthz?{request_id}", headers={"X-Request-ID": request_id})
        assert status == 200
        workers.add(re.search(rf"{request_id}[^\n]*pid=<(\d+)>", _wait_for_log(server, f"?{request_id} HTTP")).group(1))
        sent.append(request_id)
    # Multiprocess mode: each worker that counted writes its own file, and /metrics sums them.
    # (Which worker accepts a connection is up to the kernel: usually both answer some of these.)
    counting = {path.name.rsplit("_", 1)[-1].removesuffix(".db") for path in server.metrics_dir.glob("counter_*.db")}
    assert workers <= counting, (workers, counting)
    log = server.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"webapp.requests"' in line]
    logged = {line["request_id"]: line for line in lines}
    assert set(sent) <= set(logged), "one JSON line per request, carrying the id the client sent"
    assert {logged[request_id]["status"] for request_id in sent} == {200}
    assert {logged[request_id]["endpoint"] for request_id in sent} == {"/healthz"}

    # Several scrapes, landing on either worker: each reports all of them (not one worker's share).
    for _ in range(6):
        status, body, _ = server.get("/metrics")
        assert status == 200
        exposition = body.decode()
        counted = prometheus_sample(
            exposition, "recommender_http_requests_total", endpoint="/healthz", method="GET", status="200"
        )
        assert counted >= baseline + len(sent), exposition[:2000]
        assert "recommender_http_request_duration_seconds_bucket" in exposition
        assert re.search(r"^recommender_bundle_info\{.*bundle=\"[^\"]+\"", exposition, re.MULTILINE)
        assert re.search(r"^recommender_bundle_age_seconds [0-9.e+]+$", exposition, re.MULTILINE)

    # An id that is not safe to log or echo is replaced by a fresh one, which the response names.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", "/healthz", headers={"X-Request-ID": 'a b"c' * 3})
        response = connection.getresponse()
        response.read()
        assert re.fullmatch(r"[0-9a-f]{32}", response.getheader("X-Request-ID") or "")
    finally:
        connection.close()
