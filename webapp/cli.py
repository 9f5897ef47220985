"""``recommender serve``: flags for :func:`webapp.server.serve_app` (Flask's threaded server).

Production runs the same app under gunicorn with the shipped config (:mod:`webapp.gunicorn_conf`:
threaded workers that slow clients cannot take offline; loopback bind, behind a buffering proxy)::

    RECOMMENDER_BUNDLE=artifacts/current gunicorn -c python:webapp.gunicorn_conf 'webapp:create_app()'
"""

from __future__ import annotations

import argparse

from webapp.server import DEFAULT_HOST, DEFAULT_PORT, serve_app


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
    """Runs ``serve`` with parsed flags until Ctrl+C.

    Args:
        args: the namespace from a parser set up by :func:`add_arguments`.

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
    return serve_app(overrides, args.host, args.port)
