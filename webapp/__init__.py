"""Flask web app: ``create_app()`` builds the demo shop pages and the JSON API over one served bundle;
``serve_bundle()`` serves one on Flask's threaded server."""

from __future__ import annotations

import time
from collections.abc import Mapping

from flask import Flask, g

from recommender import quiet
from webapp.config import ConfigError, WebConfig, resolve_config
from webapp.server import DEFAULT_HOST, DEFAULT_PORT, serve_bundle

quiet.install()  # gunicorn imports us, not the CLI: TensorFlow's C++ start-up lines stay off stderr

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "ConfigError", "WebConfig", "create_app", "serve_bundle"]

#: Sent with every response: no MIME sniffing, no framing, only our own scripts and styles.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
}


def create_app(config: Mapping | None = None) -> Flask:
    """Builds the web app and loads its bundle (once per process; the app is thread-safe).

    Settings come from :class:`webapp.config.WebConfig` defaults, then ``RECOMMENDER_*``
    environment variables, then ``config``. Upper-case keys of ``config`` (e.g. ``TESTING``)
    go to Flask's own ``app.config``. For gunicorn::

        RECOMMENDER_BUNDLE=artifacts/current gunicorn -c python:webapp.gunicorn_conf 'webapp:create_app()'

    Args:
        config: web settings by field name, e.g. ``{"bundle": path, "reload_interval_s": 0}``.

    Returns:
        The Flask app, already serving the bundle (verified, loaded and warmed up).

    Raises:
        ConfigError: no bundle path, or a malformed setting.
        BundleError: the bundle is missing, invalid or tampered with.
        WeightsUnavailableError: the bundle's backbone weights cannot be had here.
    """
    from recommender.batching import BatchSettings, QueryBatcher
    from recommender.engine import load_bundle
    from webapp import cors, observability
    from webapp.api import api
    from webapp.bundles import LiveBundle
    from webapp.errors import register_error_handlers
    from webapp.health import health
    from webapp.pages import pages
    from webapp.panels import ServedPanels

    settings = resolve_config(config)
    if settings.bundle is None:
        raise ConfigError("no bundle to serve: set RECOMMENDER_BUNDLE or pass --bundle / config={'bundle': PATH}")

    # Before Flask first touches app.logger, so it finds our handler and adds none of its own.
    observability.configure_logging(settings.log_format)
    app = Flask(__name__)
    app.config.update(
        WEB=settings,
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        # The results page re-posts the searched photo as a base64 form field (webapp.query_photo);
        # hold form fields to the upload limit rather than Werkzeug's 500 kB default.
        MAX_FORM_MEMORY_SIZE=settings.max_upload_bytes,
        DEBUG=settings.development,
    )
    app.config.update({key: value for key, value in (config or {}).items() if key.isupper()})
    app.json.sort_keys = False  # keep the engine's order: nearest neighbour first, primary head first

    panels = ServedPanels(settings.panels)
    app.extensions["panels"] = panels
    live = LiveBundle(settings.bundle, settings.reload_interval_s, panels.wrap(load_bundle))
    live.load_now()
    app.extensions["live_bundle"] = live
    batching = BatchSettings(max_wait_ms=settings.batch_wait_ms, max_batch=settings.max_batch)
    # No thread of its own: concurrent request threads take turns running the shared forward pass.
    app.extensions["query_batcher"] = QueryBatcher(batching) if batching.enabled else None

    # Request id, timer, request log line and metrics first: every other hook sees the id.
    observability.install(app, live, metrics_enabled=settings.metrics)
    cors.install(app, settings.cors_origins)
    app.register_blueprint(pages)
    app.register_blueprint(api)
    app.register_blueprint(health)
    register_error_handlers(app)

    @app.after_request
    def add_headers(response):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        started = g.get("request_started")
        if started is not None:
            # Time spent in the app, so a client can tell it from network and server overhead.
            response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
        return response

    return app
