"""Web app settings: defaults in one frozen dataclass, overridden by environment variables, then by code."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from recommender.errors import RecommenderError

#: Environment variable -> WebConfig field. Development mode has no variable on purpose: the
#: debugger must never be switched on by a stray variable in a production environment.
ENVIRONMENT_VARIABLES = {
    "RECOMMENDER_BUNDLE": "bundle",
    "RECOMMENDER_MAX_UPLOAD_MB": "max_upload_mb",
    "RECOMMENDER_RELOAD_INTERVAL": "reload_interval_s",
    "RECOMMENDER_IMAGE_MAX_AGE": "image_max_age_s",
    "RECOMMENDER_CORS_ORIGINS": "cors_origins",
    "RECOMMENDER_LOG_FORMAT": "log_format",
    "RECOMMENDER_METRICS": "metrics",
    "RECOMMENDER_BATCH_WAIT_MS": "batch_wait_ms",
    "RECOMMENDER_MAX_BATCH": "max_batch",
    "RECOMMENDER_PANELS": "panels",
}

#: Values of ``log_format``: one JSON object per line, or a plain line for a terminal.
LOG_FORMATS = ("json", "text")

#: One allowed CORS origin: scheme and host (and port), nothing after them, as browsers send it.
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", re.IGNORECASE)


class ConfigError(RecommenderError):
    """A web setting is missing or malformed (e.g. no bundle path, a non-numeric size)."""


@dataclass(frozen=True)
class WebConfig:
    """Everything the web app needs, resolved once in ``create_app``.

    Attributes:
        bundle: bundle folder, or a ``current`` symlink to one (``$RECOMMENDER_BUNDLE``).
        max_upload_mb: largest accepted request body, in megabytes of 10**6 bytes; larger
            requests get 413 (``$RECOMMENDER_MAX_UPLOAD_MB``).
        reload_interval_s: seconds between a worker's checks of the bundle pointer (its watcher
            thread, whether requests come or not); 0 means as often as the watcher's floor,
            0.05 s (``$RECOMMENDER_RELOAD_INTERVAL``).
        image_max_age_s: ``Cache-Control: max-age`` of catalog images (``$RECOMMENDER_IMAGE_MAX_AGE``).
        default_k: neighbours when a request does not say (``?k=``).
        sample_items: catalog items shown on the demo page before any upload.
        development: Flask debug mode (tracebacks in the browser). Only ``serve --development``
            or an explicit ``config={"development": True}`` turns it on.
        cors_origins: browser origins (``https://shop.example``) allowed to call ``/api/v1/``
            from their pages, or ``("*",)`` for any; empty (the default) sends no CORS headers
            at all (``$RECOMMENDER_CORS_ORIGINS``, comma-separated).
        log_format: ``json`` (one object per line, the default) or ``text``, for the request
            lines and every other ``webapp`` log line (``$RECOMMENDER_LOG_FORMAT``).
        metrics: serve Prometheus metrics at ``/metrics`` (``$RECOMMENDER_METRICS``; on by
            default). Keep ``/metrics`` off the public address (the proxy blocks it).
        batch_wait_ms: above 0, concurrent uploads share one forward pass
            (``recommender.batching``): the upload leading a batch waits at most this long for
            uploads still being decoded to join it (a lone upload never waits); 5 is a good
            value. 0, the default, is off: each upload runs its own forward pass. Off by
            default because on the CPU machine measured (bench/upload.py, 2 cores, TFLite
            MobileNet) batching used 4-6% less CPU per upload but did not raise throughput at 8
            clients (0.76-1.04x); turn it on where the backbone gains from batches, such as a GPU
            (``$RECOMMENDER_BATCH_WAIT_MS``).
        max_batch: the most uploads in one forward pass; 0 or 1 also turns batching off
            (``$RECOMMENDER_MAX_BATCH``).
        panels: where precomputed similar-items panels are looked for (``$RECOMMENDER_PANELS``):
            a folder of panels folders named by bundle id, or one panels folder. None (the
            default): ``ROOT/panels`` when the bundle is published in an artifact root
            (``ROOT/bundles/<id>``), else none. Only panels of the served bundle (id and
            manifest sha256) are used; see ``webapp.panels``.
    """

    bundle: Path | None = None
    max_upload_mb: float = 10.0
    reload_interval_s: float = 5.0
    image_max_age_s: int = 3600
    default_k: int = 6
    sample_items: int = 12
    development: bool = False
    cors_origins: tuple[str, ...] = ()
    log_format: str = "json"
    metrics: bool = True
    batch_wait_ms: float = 0.0
    max_batch: int = 16
    panels: Path | None = None

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit in bytes (Flask's ``MAX_CONTENT_LENGTH``)."""
        return int(self.max_upload_mb * 1_000_000)


def _convert(name: str, value, origin: str):
    """Converts a setting from a string or a Python value to the field's type, or raises ConfigError."""
    field_type = {f.name: f.type for f in dataclasses.fields(WebConfig)}[name]
    if field_type == "tuple[str, ...]":
        return _origins(value, origin)
    if field_type == "str":
        if not isinstance(value, str) or value.strip().lower() not in LOG_FORMATS:
            raise ConfigError(f"{origin}: expected one of {', '.join(LOG_FORMATS)}, got {value!r}")
        return value.strip().lower()
    try:
        if field_type == "Path | None":
            converted = None if value in (None, "") else Path(value).expanduser()
        elif field_type == "bool":
            if isinstance(value, str):
                if value.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                    raise ValueError(value)
                converted = value.strip().lower() in ("1", "true", "yes", "on")
            else:
                converted = bool(value)
        elif field_type == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            converted = int(value)
        else:
            converted = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: expected {field_type}, got {value!r}") from None
    if field_type in ("int", "float") and converted < 0:
        raise ConfigError(f"{origin}: must not be negative, got {value!r}")
    return converted


def _origins(value, origin: str) -> tuple[str, ...]:
    """Reads CORS origins from a comma-separated string or a sequence of strings; checks each one.

    An origin is compared with the browser's ``Origin`` header exactly, so a path, a trailing
    slash or a wildcard inside a host would silently never match: they are refused here.
    """
    items = value.split(",") if isinstance(value, str) else value
    try:
        items = [str(item).strip() for item in items]
    except TypeError:
        raise ConfigError(f"{origin}: expected comma-separated origins, got {value!r}") from None
    origins = []
    for item in filter(None, items):
        if item != "*" and not _ORIGIN.fullmatch(item):
            raise ConfigError(
                f"{origin}: {item!r} is not an origin like https://shop.example or http://127.0.0.1:3000 "
                "(scheme and host, no path), nor *"
            )
        scheme, _, host = item.partition("://")
        origins.append(item if item == "*" else f"{scheme.lower()}://{host.lower()}")
    return tuple(dict.fromkeys(origins))


def resolve_config(overrides: Mapping | None = None, environ: Mapping[str, str] | None = None) -> WebConfig:
    """Resolves the web settings: defaults, then environment variables, then ``overrides``.

    Args:
        overrides: WebConfig field names -> values (e.g. from ``create_app(config=...)`` or CLI
            flags); ``None`` values are ignored. Upper-case keys are Flask settings and are
            left to the caller.
        environ: the environment (default: ``os.environ``).

    Returns:
        The resolved :class:`WebConfig`.

    Raises:
        ConfigError: an unknown setting or a value of the wrong type.
    """
    environ = os.environ if environ is None else environ
    fields = {f.name for f in dataclasses.fields(WebConfig)}
    values = {}
    for variable, name in ENVIRONMENT_VARIABLES.items():
        if environ.get(variable, "") != "":
            values[name] = _convert(name, environ[variable], f"${variable}")
    for key, value in (overrides or {}).items():
        if key.isupper() or value is None:
            continue
        if key not in fields:
            raise ConfigError(f"unknown web setting {key!r}; known: {', '.join(sorted(fields))}")
        values[key] = _convert(key, value, f"setting {key!r}")
    config = WebConfig(**values)
    if config.max_upload_bytes < 1:
        raise ConfigError(f"max_upload_mb must be positive, got {config.max_upload_mb}")
    return config
