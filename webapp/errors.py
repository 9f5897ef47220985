"""Typed library errors and HTTP errors -> status codes: JSON under /api/, a friendly page elsewhere."""

from __future__ import annotations

import logging

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, InternalServerError

from recommender.errors import InvalidImageError, QueryError, RecommenderError

log = logging.getLogger(__name__)

#: HTTP status -> machine-readable ``error.code`` for errors Werkzeug raises.
STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
    503: "unavailable",
}

#: Short human titles of the error page.
TITLES = {
    400: "That did not work",
    404: "Not found",
    405: "Not allowed",
    413: "That file is too large",
    415: "Unsupported file",
    500: "Something went wrong on our side",
    503: "Temporarily unavailable",
}

#: Paths answered with JSON errors besides /api/.
JSON_PATHS = ("/healthz", "/readyz")


class UnknownItem(HTTPException):
    """404 for a catalog id the served bundle does not have."""

    code = 404

    def __init__(self, item_id: str):
        super().__init__(description=f"no catalog item with id {item_id!r}")
        self.code_name = "unknown_item"


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in JSON_PATHS


def error_response(status: int, code_name: str, message: str, headers=None):
    """Builds the error response of the current request.

    Args:
        status: HTTP status.
        code_name: the JSON ``error.code``.
        message: the human message (escaped by the template on HTML pages).
        headers: extra headers to keep (e.g. ``Allow`` of a 405).

    Returns:
        A Flask response: ``{"error": {"code", "message"}}`` on JSON paths, else the error page
        (or the demo page with the message, for a failed search form).
    """
    if _wants_json():
        response = jsonify({"error": {"code": code_name, "message": message}})
    elif request.endpoint == "pages.search":
        # The search form failed: show the form again with the reason, not a dead end.
        from webapp.pages import render_home

        response = render_home(error=message)
    else:
        response = render_template(
            "error.html", status=status, title=TITLES.get(status, "That did not work"), message=message
        )
    response = response if hasattr(response, "status_code") else Flask.response_class(response)
    response.status_code = status
    for name, value in headers or []:
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    """Installs the handlers that turn every error into a clean 4xx/5xx response."""

    @app.errorhandler(InvalidImageError)
    def invalid_image(error: InvalidImageError):
        return error_response(400, "invalid_image", f"not a usable image: {error}")

    @app.errorhandler(QueryError)
    def invalid_query(error: QueryError):
        # The views check k and filters first and raise their own codes; this is the fallback.
        return error_response(400, "invalid_query", str(error))

    @app.errorhandler(RecommenderError)
    def library_error(error: RecommenderError):
        # Any other library error at request time is the server's state, not the client's input.
        log.error("%s while answering %s %s: %s", type(error).__name__, request.method, request.path, error)
        return error_response(503, "unavailable", "the recommender cannot answer right now; try again shortly")

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if isinstance(error, InternalServerError):
            return unexpected(error.original_exception or error)
        status = error.code or 500
        code_name = getattr(error, "code_name", None) or STATUS_CODES.get(status, "error")
        message = error.description or TITLES.get(status, "error")
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"the upload is larger than the limit of {limit / 1e6:g} MB" if limit else message
        return error_response(status, code_name, message, error.get_headers())

    @app.errorhandler(Exception)
    def unexpected(error: BaseException):
        log.exception("unhandled error while answering %s %s", request.method, request.path, exc_info=error)
        return error_response(500, "internal_error", "unexpected server error; it has been logged")
