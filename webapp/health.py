"""Liveness and readiness probes: /healthz (the process answers) and /readyz (a bundle is served)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz():
    """``GET /healthz``: 200 while the process answers requests at all."""
    return jsonify({"status": "ok"})


@health.get("/readyz")
def readyz():
    """``GET /readyz``: 200 with the served bundle's id, item count and backbone; 503 without one.

    Reports what this process serves now; it checks and loads nothing itself. The process's
    watcher thread (:class:`webapp.bundles.LiveBundle`) follows the bundle pointer on its own
    every reload interval, traffic or not, so ``bundle`` changes within one interval (plus the
    load time) of a publish or a rollback; ``reloading`` is true while a new bundle is being
    loaded, and ``reload_error`` names a refused new bundle while the old one keeps serving.
    """
    live = current_app.extensions["live_bundle"]
    live.current()
    status = live.status()
    return jsonify({"status": "ready" if status["ready"] else "unavailable", **status}), 200 if status["ready"] else 503
