"""The shipped gunicorn configuration: threaded workers that a few slow clients cannot take offline.

Production command (every setting below can be changed by environment variable, and gunicorn's
own flags, e.g. ``-b``, ``-w``, ``--threads``, override this file)::

    RECOMMENDER_BUNDLE=/srv/recommender/current \\
        gunicorn -c python:webapp.gunicorn_conf 'webapp:create_app()'

Why these choices (issue 12, case 4): with sync workers, a client that sends its upload at a
byte a second holds the whole worker; two of them held both workers of ``-w 2`` until the
arbiter killed them for WORKER TIMEOUT, over and over, and health checks failed meanwhile.
Here each worker runs ``threads`` request threads (gthread): a slow body ties one thread, the
worker's main thread keeps accepting, dispatching and heart-beating, and a body that has not
fully arrived within ``body_timeout_s`` is cut off. On a public address, put a buffering
reverse proxy (nginx with ``proxy_request_buffering on``) in front: it absorbs any number of
slow clients and hands gunicorn whole requests (see the README, "Serve it").
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

# -- settings: defaults, then environment variables --------------------------------------


@dataclass(frozen=True)
class ServerSettings:
    """The process-level serving settings, resolved once from the environment.

    Attributes:
        bind: address to listen on (``$RECOMMENDER_BIND``); loopback by default: the public
            edge is the reverse proxy.
        workers: worker processes, each loading its own copy of the bundle
            (``$RECOMMENDER_WORKERS``).
        threads: request threads per worker (``$RECOMMENDER_THREADS``); the number of slow
            uploads one worker survives while still answering others.
        timeout_s: a worker whose main loop is silent this long is killed and restarted
            (``$RECOMMENDER_WORKER_TIMEOUT``). With threaded workers this means a hung
            process, not a slow request.
        body_timeout_s: a request body must arrive within this many seconds of its headers,
            else the connection is dropped (``$RECOMMENDER_BODY_TIMEOUT``).
    """

    bind: str = "127.0.0.1:8000"
    workers: int = 2
    threads: int = 8
    timeout_s: int = 30
    body_timeout_s: float = 60.0

    @classmethod
    def from_environ(cls, environ=None) -> ServerSettings:
        """Reads ``RECOMMENDER_BIND/WORKERS/THREADS/WORKER_TIMEOUT/BODY_TIMEOUT`` over the defaults.

        Raises:
            ValueError: a variable that is not a positive number (gunicorn prints it and exits).
        """
        environ = os.environ if environ is None else environ
        defaults = cls()

        def number(variable: str, default, kind):
            text = environ.get(variable, "").strip()
            if not text:
                return default
            value = kind(text)
            if value <= 0:
                raise ValueError(f"${variable} must be positive, got {text!r}")
            return value

        return cls(
            bind=environ.get("RECOMMENDER_BIND", "").strip() or defaults.bind,
            workers=number("RECOMMENDER_WORKERS", defaults.workers, int),
            threads=number("RECOMMENDER_THREADS", defaults.threads, int),
            timeout_s=number("RECOMMENDER_WORKER_TIMEOUT", defaults.timeout_s, int),
            body_timeout_s=number("RECOMMENDER_BODY_TIMEOUT", defaults.body_timeout_s, float),
        )


settings = ServerSettings.from_environ()

# -- gunicorn settings ---------------------------------------------------------------------

bind = [settings.bind]
workers = settings.workers
worker_class = "gthread"
threads = settings.threads
# Each worker builds its own app (and loads TensorFlow and the bundle) after the fork: TensorFlow
# is not fork-safe, and the bundle watcher thread (webapp.bundles.LiveBundle) must run in the
# worker that serves from it. So no preload.
preload_app = False
timeout = settings.timeout_s
# A stopping worker finishes its requests in flight for this long (a query takes ~20-80 ms).
graceful_timeout = 30
# Idle kept-alive connections (from the proxy) are closed after this many seconds.
keepalive = 5
# Request line and headers: gunicorn's defaults, said here so they are part of the reviewed config.
# The body's own limit is the app's (RECOMMENDER_MAX_UPLOAD_MB, a 413 above it).
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
# Access log on stdout, errors (WORKER TIMEOUT, dropped bodies) on stderr. Each access line
# names the worker's pid and the time taken, so a slow or stuck worker can be told apart.
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s %(t)s "%(r)s" %(s)s %(b)s %(M)sms pid=%(p)s'

# -- slow request bodies -------------------------------------------------------------------


class _BodyDeadlineSocket:
    """The request's socket as the body reader sees it: each ``recv`` waits at most until the deadline.

    After the deadline ``recv`` answers b"" (end of data): the app sees a client that
    disconnected mid-body (Werkzeug: 400 ClientDisconnected) and the thread is free again.
    Only ``recv``/``recv_into`` are bounded; everything else goes to the real socket.
    """

    def __init__(self, sock: socket.socket, deadline: float, log):
        self._sock = sock
        self._deadline = deadline
        self._log = log
        self._dropped = False

    def _wait_budget(self) -> float | None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            if not self._dropped:
                self._dropped = True
                self._log.warning("request body not received within %.0f s: dropping it", settings.body_timeout_s)
            return None
        self._sock.settimeout(remaining)
        return remaining

    def recv(self, size: int, *flags) -> bytes:
        if self._wait_budget() is None:
            return b""
        try:
            return self._sock.recv(size, *flags)
        except TimeoutError:
            return self.recv(size, *flags)

    def recv_into(self, buffer, *args) -> int:
        if self._wait_budget() is None:
            return 0
        try:
            return self._sock.recv_into(buffer, *args)
        except TimeoutError:
            return self.recv_into(buffer, *args)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def pre_request(worker, req):
    """Bounds the time the app may wait for this request's body (slow uploads give up the thread)."""
    unreader = getattr(req, "unreader", None)
    sock = getattr(unreader, "sock", None)
    if isinstance(sock, _BodyDeadlineSocket):
        sock = sock._sock  # a kept-alive connection's next request: a fresh deadline
    if isinstance(sock, socket.socket):
        unreader.sock = _BodyDeadlineSocket(sock, time.monotonic() + settings.body_timeout_s, worker.log)


def post_request(worker, req, environ, resp):
    """Gives the connection its plain socket back, so the next request's headers are read unbounded by it."""
    unreader = getattr(req, "unreader", None)
    sock = getattr(unreader, "sock", None)
    if isinstance(sock, _BodyDeadlineSocket):
        unreader.sock = sock._sock


# -- process hooks: Prometheus multiprocess mode ------------------------------------------
# Each worker counts its own requests; /metrics, answered by any one worker, must report all of
# them. prometheus-client's multiprocess mode does this through files in $PROMETHEUS_MULTIPROC_DIR,
# which must be set before a worker first imports prometheus_client (the workers import the app
# after the fork: no preload) and must start empty. When the deployment sets none, a fresh private
# folder is made here, in the arbiter, and removed when it exits.

_METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_made_metrics_dir: str | None = None
if not os.environ.get(_METRICS_DIR_VARIABLE):
    import tempfile

    _made_metrics_dir = tempfile.mkdtemp(prefix="recommender-metrics-")
    os.environ[_METRICS_DIR_VARIABLE] = _made_metrics_dir


def on_starting(server):
    """Empties the metrics folder: counts from an earlier run must not be added to this one's."""
    folder = os.environ[_METRICS_DIR_VARIABLE]
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".db"):
            os.unlink(os.path.join(folder, name))


def child_exit(server, worker):
    """A worker that ended (restart, WORKER TIMEOUT): its live gauges no longer count; its counters stay."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Removes the metrics folder this config made (one the deployment named is left alone)."""
    if _made_metrics_dir is not None:
        import shutil

        shutil.rmtree(_made_metrics_dir, ignore_errors=True)
