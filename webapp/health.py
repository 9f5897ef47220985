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

    Checks the bundle pointer first, so a load balancer polling this also notices a newly
    published bundle. ``reload_error`` names a refused new bundle while the old one serves.
    """
    live = current_app.extensions["live_bundle"]
    live.current()
    status = live.status()
    return jsonify({"status": "ready" if status["ready"] else "unavailable", **status}), 200 if status["ready"] else 503
