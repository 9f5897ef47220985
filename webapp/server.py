"""Serving the web app on Flask's built-in threaded server (demo and development).

:func:`serve_bundle` is the public entry point for a job that ends by serving a bundle (the
demo); ``recommender serve`` (:mod:`webapp.cli`) calls :func:`serve_app` with its flags.
Production runs the same app under gunicorn instead (see :mod:`webapp.cli`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from recommender.errors import RecommenderError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def serve_bundle(bundle_path: str | os.PathLike, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """Serves a bundle on Flask's threaded server until Ctrl+C.

    Args:
        bundle_path: bundle folder or ``current`` symlink.
        host: address to listen on.
        port: port to listen on (0 picks a free one).

    Returns:
        Exit code, as :func:`serve_app`.
    """
    return serve_app({"bundle": bundle_path}, host, port)


def serve_app(overrides: Mapping, host: str, port: int) -> int:
    """Listens first (a busy port fails in a second, not after loading a model), then loads and serves.

    Args:
        overrides: web settings for :func:`webapp.create_app` (``bundle``, ``max_upload_mb``...).
        host: address to listen on.
        port: port to listen on (0 picks a free one).

    Returns:
        Exit code: 0 after a clean stop (Ctrl+C), 1 when the address or the bundle cannot be
        used (one ``error: ...`` line on stderr).
    """
    from werkzeug.serving import make_server

    from webapp import create_app

    def not_ready_yet(environ, start_response):  # never called: serving starts once the app is built
        start_response("503 Service Unavailable", [("Content-Type", "text/plain"), ("Retry-After", "5")])
        return [b"loading the bundle\n"]

    try:
        server = make_server(host, port, not_ready_yet, threaded=True)
    except SystemExit:
        # Werkzeug has already printed why (the port is in use) and asked to exit.
        print(f"error: cannot listen on {host}:{port}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: cannot listen on {host}:{port} ({error.strerror or error})", file=sys.stderr)
        return 1
    # The app writes its own log lines (JSON or text, webapp.observability); the CLI's root handler
    # would write each of them a second time.
    webapp_log = logging.getLogger("webapp")
    propagated, webapp_log.propagate = webapp_log.propagate, False
    try:
        try:
            app = create_app(dict(overrides))
        except RecommenderError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        server.app = app
        if app.debug:
            from werkzeug.debug import DebuggedApplication

            server.app = DebuggedApplication(app, evalex=True)
            print("development mode: the interactive debugger is ON; never expose this server", file=sys.stderr)
        live = app.extensions["live_bundle"].status()
        shown_host = f"[{host}]" if ":" in host else host
        print(f"serving bundle {live['bundle']} ({live['items']} items) from {live['path']}", flush=True)
        print(f"open http://{shown_host}:{server.server_port}/  (Ctrl+C to stop)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
        return 0
    finally:
        webapp_log.propagate = propagated
        server.server_close()
