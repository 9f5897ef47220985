"""``recommender serve``: the web app on Flask's built-in threaded server (demo and development).

Production runs the same app under gunicorn instead::

    RECOMMENDER_BUNDLE=artifacts/current gunicorn -w 2 -b 127.0.0.1:8000 'webapp:create_app()'
"""

from __future__ import annotations

import argparse
import os
import sys

from recommender.errors import RecommenderError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``serve`` flags to an argparse (sub)parser.

    Args:
        parser: the ``serve`` subcommand's parser.
    """
    parser.add_argument(
        "--bundle",
        default=None,
        help="bundle folder or a 'current' symlink to one; a newly published bundle is picked up "
        "without a restart (default: $RECOMMENDER_BUNDLE)",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (default: %(default)s)")
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=None,
        help="largest accepted upload in MB; larger ones get 413 (default: $RECOMMENDER_MAX_UPLOAD_MB or 10)",
    )
    parser.add_argument(
        "--reload-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="check the bundle path for a new bundle at most this often (default: $RECOMMENDER_RELOAD_INTERVAL or 5)",
    )
    parser.add_argument(
        "--development",
        action="store_true",
        help="Flask debug mode with the interactive Werkzeug debugger: never on a reachable address",
    )


def run_serve(args: argparse.Namespace) -> int:
    """Runs ``serve`` with parsed flags until Ctrl+C.

    Args:
        args: the namespace from a parser set up by :func:`add_serve_arguments`.

    Returns:
        Exit code: 0 after a clean stop, 1 when the address or the bundle cannot be used (one
        ``error: ...`` line on stderr).
    """
    overrides = {
        "bundle": args.bundle,
        "max_upload_mb": args.max_upload_mb,
        "reload_interval_s": args.reload_interval,
        "development": args.development or None,
    }
    return _serve(overrides, args.host, args.port)


def serve(bundle_path: str | os.PathLike, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """Serves a bundle on Flask's threaded server until Ctrl+C (used by the demo).

    Args:
        bundle_path: bundle folder or ``current`` symlink.
        host: address to listen on.
        port: port to listen on (0 picks a free one).

    Returns:
        Exit code, as :func:`run_serve`.
    """
    return _serve({"bundle": bundle_path}, host, port)


def _serve(overrides: dict, host: str, port: int) -> int:
    """Listens first (a busy port fails in a second, not after loading a model), then loads and serves."""
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
    try:
        try:
            app = create_app(overrides)
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
        server.server_close()
