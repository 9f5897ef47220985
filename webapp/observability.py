"""Operating the web app: a request id on every request, one log line per request (JSON or text), Prometheus metrics.

Installed by :func:`install` from ``create_app``. Nothing here changes what a request answers;
it only adds the ``X-Request-ID`` header, writes the log line and counts.

Metrics live in a registry of the app's own (several apps in one process, as in the tests,
never collide). Under gunicorn, ``webapp.gunicorn_conf`` sets ``PROMETHEUS_MULTIPROC_DIR``
before any worker imports ``prometheus_client``: every worker then writes its counters to
files in that folder, and ``/metrics`` on any worker sums them over all workers
(prometheus-client's multiprocess mode). The bundle figures (id, age, items) are read from
the answering worker's served bundle at scrape time.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from flask import Flask, Response, g, has_request_context, request

#: Header a client (or the proxy) may send and that every response carries.
REQUEST_ID_HEADER = "X-Request-ID"

#: A client's request id is kept when it is this safe to log and echo (bounded, no spaces or
#: quotes, nothing a log parser or a header could trip on); otherwise a new one is made.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")

#: The logger of the one-line-per-request log (a child of ``webapp``, so it shares its handler).
REQUEST_LOGGER = "webapp.requests"

#: Request methods counted by name; anything else is counted as ``other`` (bounded labels).
COUNTED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

#: Latency histogram buckets, seconds: a query takes ~20-80 ms, an item lookup ~1 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Upload batch size histogram buckets (uploads per forward pass).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

#: ``endpoint`` label of a request that matched no route (a 404 or a scanner's probe).
UNMATCHED = "unmatched"

request_log = logging.getLogger(REQUEST_LOGGER)


def request_id_from(sent: str | None) -> str:
    """The id of this request: the client's ``X-Request-ID`` when it is sane, else a new uuid4 hex.

    Args:
        sent: the header as received, or None.

    Returns:
        1 to 128 characters from ``[A-Za-z0-9._:+=/-]``.
    """
    if sent is not None and _SAFE_REQUEST_ID.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


# -- logging ---------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, then the record's fields.

    A record logged with ``extra={"fields": {...}}`` gets those keys; a record logged while a
    request is being answered gets its ``request_id``; an exception, its traceback as
    ``exception``.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", None) or {})
        if "request_id" not in line and has_request_context() and g.get("request_id"):
            line["request_id"] = g.request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``2026-11-22 10:00:00,123 INFO webapp.requests: GET /api/v1/similar 200 ... [request id]``."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None) or {}
        request_id = fields.get("request_id") or (g.get("request_id") if has_request_context() else None)
        return f"{text} [{request_id}]" if request_id and request_id not in text else text


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (not the stream at creation).

    Test runners and servers swap ``sys.stderr``; holding the first one would write to a
    closed stream later.
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(log_format: str) -> None:
    """Gives the ``webapp`` logger (app, bundle swaps, errors, request lines) one stderr handler in ``log_format``.

    Idempotent: a second app in the process reuses the handler (and sets its format). A
    handler someone else put on ``webapp`` (a deployment's own logging config) is left alone
    and none is added. Records still propagate to the root logger; where root has a handler
    too (``recommender serve`` configures one), :func:`webapp.server.serve_app` stops the
    propagation while it serves so each line is written once.

    Args:
        log_format: ``json`` or ``text`` (``WebConfig.log_format``).
    """
    logger = logging.getLogger("webapp")
    ours = [handler for handler in logger.handlers if isinstance(handler, _StderrHandler)]
    if not logger.handlers:
        ours = [_StderrHandler()]
        logger.addHandler(ours[0])
    for handler in ours:
        handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)  # one line per request and bundle swaps are the point


# -- metrics ---------------------------------------------------------------------------


def multiprocess_mode() -> bool:
    """Whether prometheus-client writes to ``$PROMETHEUS_MULTIPROC_DIR`` (decided when it was imported)."""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


class BundleCollector:
    """The served bundle's figures, read at scrape time from :meth:`webapp.bundles.LiveBundle.status`.

    Args:
        live: the app's ``LiveBundle``.
        created_at: ``engine -> creation time in seconds since the epoch, or None``.
    """

    def __init__(self, live, created_at: Callable):
        self._live = live
        self._created_at = created_at

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        status = self._live.status()
        engine = self._live._engine  # the engine serving now; status() has its id, not the object
        info = InfoMetricFamily("recommender_bundle", "The bundle this worker serves (its id and backbone).")
        ready = GaugeMetricFamily("recommender_bundle_ready", "1 while a bundle is served, else 0.")
        ready.add_metric([], 1.0 if status["ready"] else 0.0)
        failing = GaugeMetricFamily(
            "recommender_bundle_reload_failing",
            "1 while the newest published bundle is refused and the previous one keeps serving.",
        )
        failing.add_metric([], 1.0 if status.get("reload_error") else 0.0)
        metrics = [ready, failing]
        if status["ready"]:
            backbone = engine.manifest.backbone.name if engine is not None else ""
            info.add_metric([], {"bundle": str(status["bundle"]), "backbone": str(backbone)})
            items = GaugeMetricFamily("recommender_bundle_items", "Catalog items in the served bundle's index.")
            items.add_metric([], float(status["items"] or 0))
            metrics += [info, items]
            created = self._created_at(engine) if engine is not None else None
            if created is not None:
                age = GaugeMetricFamily(
                    "recommender_bundle_age_seconds", "Seconds since the served bundle was built (its manifest)."
                )
                age.add_metric([], max(0.0, time.time() - created))
                metrics.append(age)
        yield from metrics


def bundle_created_at(engine) -> float | None:
    """The bundle's build time (manifest ``created_at``, ISO 8601) in seconds since the epoch, or None."""
    text = getattr(engine.manifest, "created_at", None)
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class Metrics:
    """The app's Prometheus metrics.

    Attributes:
        registry: what ``/metrics`` exposes in a single process.
        requests: ``recommender_http_requests_total{endpoint, method, status}``.
        latency: ``recommender_http_request_duration_seconds{endpoint, method}`` (histogram).
        reload_failures: ``recommender_bundle_reload_failures_total``: published bundles refused.
        swaps: ``recommender_bundle_swaps_total``: new bundles swapped in without downtime.
        forward_passes: ``recommender_upload_forward_passes_total``: forward passes run for
            uploads (with batching on, fewer than the uploads answered).
        batch_size: ``recommender_upload_batch_size`` (histogram): uploads per forward pass.
        item_answers: ``recommender_item_similar_answers_total{source}``: item answers read from
            panels (``panels``) or searched (``live``).

    Args:
        live: the app's ``LiveBundle`` (read at scrape time; its reload outcomes are counted).
    """

    def __init__(self, live):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "recommender_http_requests",
            "HTTP requests answered, by route (the URL rule, not the raw path), method and status.",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "recommender_http_request_duration_seconds",
            "Time from the request reaching the app to its response being ready, by route and method.",
            ["endpoint", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.reload_failures = Counter(
            "recommender_bundle_reload_failures",
            "Newly published bundles that failed to load or verify (the previous one kept serving).",
            registry=self.registry,
        )
        self.swaps = Counter(
            "recommender_bundle_swaps", "New bundles loaded and swapped in while serving.", registry=self.registry
        )
        self.forward_passes = Counter(
            "recommender_upload_forward_passes",
            "Forward passes (backbone + classifier) run for uploaded photos; batching shares one between uploads.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "recommender_upload_batch_size",
            "Uploads answered per forward pass (1 without batching).",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.item_answers = Counter(
            "recommender_item_similar_answers",
            "Answers of /api/v1/items/<id>/similar by source: precomputed panels or a live search.",
            ["source"],
            registry=self.registry,
        )
        self._live = live
        self._bundle = BundleCollector(live, bundle_created_at)
        self.registry.register(self._bundle)
        live.listeners.append(self.reload_outcome)

    def reload_outcome(self, outcome: str) -> None:
        """Counts a background reload's outcome (``LiveBundle`` calls this: ``swapped`` or ``refused``)."""
        (self.swaps if outcome == "swapped" else self.reload_failures).inc()

    def forward_pass(self, uploads: int) -> None:
        """Counts one forward pass that answered ``uploads`` uploads (the batcher's listener)."""
        self.forward_passes.inc()
        self.batch_size.observe(uploads)

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Counts one answered request and its latency."""
        method = method if method in COUNTED_METHODS else "other"
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, method).observe(seconds)

    def exposition(self) -> bytes:
        """The text ``/metrics`` answers: this process's metrics, or every worker's summed under gunicorn."""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        if not multiprocess_mode():
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(self._bundle)
        return generate_latest(registry)


# -- installing ------------------------------------------------------------------------


def install(app: Flask, live, *, metrics_enabled: bool) -> None:
    """Adds request ids, the request log line and (when enabled) metrics and ``/metrics`` to ``app``.

    Call before any other ``before_request`` hook is registered: an earlier hook that answers
    by itself (a CORS preflight) would otherwise leave the request without an id.

    Args:
        app: the Flask app being built.
        live: its ``LiveBundle``.
        metrics_enabled: ``WebConfig.metrics``.
    """
    metrics = Metrics(live) if metrics_enabled else None
    app.extensions["metrics"] = metrics
    batcher = app.extensions.get("query_batcher")
    if metrics is not None and batcher is not None:
        batcher.listeners.append(metrics.forward_pass)

    @app.before_request
    def start_request():
        g.request_started = time.perf_counter()
        g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))

    @app.after_request
    def finish_request(response: Response) -> Response:
        request_id = g.get("request_id") or request_id_from(None)
        response.headers[REQUEST_ID_HEADER] = request_id
        started = g.get("request_started")
        seconds = time.perf_counter() - started if started is not None else 0.0
        endpoint = request.url_rule.rule if request.url_rule is not None else UNMATCHED
        if metrics is not None:
            metrics.observe(endpoint, request.method, response.status_code, seconds)
        engine = g.get("engine")
        fields = {
            "request_id": request_id,
            "method": request.method,
            "path": request.path[:1000],
            "endpoint": endpoint,
            "status": response.status_code,
            "duration_ms": round(seconds * 1000, 2),
            "bytes": response.calculate_content_length(),
            "remote_addr": request.remote_addr,
            "bundle": engine.bundle_id if engine is not None else None,
        }
        request_log.info(
            "%s %s %s %.1f ms",
            request.method,
            fields["path"],
            response.status_code,
            seconds * 1000,
            extra={"fields": fields},
        )
        return response

    if metrics is not None:

        def metrics_view():
            """``GET /metrics``: Prometheus text exposition. Not for the public address: the proxy blocks it."""
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)

        app.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])
