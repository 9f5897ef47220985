"""Cross-origin access to ``/api/v1/`` for the configured browser origins only (off by default).

With ``WebConfig.cors_origins`` empty nothing here is installed and no response carries a
CORS header: browsers then refuse other sites' scripts the answers, which is the safe default.
With origins set, an API response to an allowed ``Origin`` names that exact origin in
``Access-Control-Allow-Origin`` (never ``*``, and ``Vary: Origin`` so caches keep answers per
origin), and a preflight ``OPTIONS`` is answered 204 with the route's methods. No credentials
are allowed: the API has no cookies or logins to share.
"""

from __future__ import annotations

from flask import Flask, Response, request

#: Only these paths take part in CORS; pages and catalog images stay same-origin.
CORS_PREFIX = "/api/v1/"

#: Request headers a cross-origin script may send (beyond the CORS-safelisted ones).
ALLOWED_HEADERS = ("Content-Type", "X-Request-ID")

#: Response headers a cross-origin script may read (beyond the CORS-safelisted ones).
EXPOSED_HEADERS = ("X-Request-ID", "Server-Timing")

#: Seconds a browser may cache a preflight answer.
PREFLIGHT_MAX_AGE_S = 600


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a browser ``Origin`` header is one of the allowed origins (``*`` allows any)."""
    if not origin or origin == "null":
        return False
    return "*" in allowed or origin.lower() in allowed


def install(app: Flask, allowed: tuple[str, ...]) -> None:
    """Adds the preflight answer and the CORS response headers for ``allowed`` origins; nothing when empty.

    Args:
        app: the Flask app being built (after :func:`webapp.observability.install`, so a
            preflight answer still gets its request id).
        allowed: ``WebConfig.cors_origins``, normalised (lower-case scheme and host).
    """
    if not allowed:
        return

    @app.before_request
    def answer_preflight():
        if request.method != "OPTIONS" or not request.path.startswith(CORS_PREFIX):
            return None
        wanted = request.headers.get("Access-Control-Request-Method")
        rule = request.url_rule
        if wanted is None or rule is None or not origin_allowed(request.headers.get("Origin"), allowed):
            return None  # not a preflight we accept: Flask's own OPTIONS / 404 answer, without CORS headers
        if wanted.upper() not in (rule.methods or ()):
            return None
        methods = sorted((rule.methods or set()) - {"HEAD"})
        return Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": ", ".join(methods),
                "Access-Control-Allow-Headers": ", ".join(ALLOWED_HEADERS),
                "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
            },
        )

    @app.after_request
    def add_cors_headers(response: Response) -> Response:
        if not request.path.startswith(CORS_PREFIX):
            return response
        response.vary.add("Origin")
        origin = request.headers.get("Origin")
        if origin_allowed(origin, allowed):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = ", ".join(EXPOSED_HEADERS)
        return response
