"""Web app settings: defaults in one frozen dataclass, overridden by environment variables, then by code."""

from __future__ import annotations

import dataclasses
import os
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
}


class ConfigError(RecommenderError):
    """A web setting is missing or malformed (e.g. no bundle path, a non-numeric size)."""


@dataclass(frozen=True)
class WebConfig:
    """Everything the web app needs, resolved once in ``create_app``.

    Attributes:
        bundle: bundle folder, or a ``current`` symlink to one (``$RECOMMENDER_BUNDLE``).
        max_upload_mb: largest accepted request body, in megabytes of 10**6 bytes; larger
            requests get 413 (``$RECOMMENDER_MAX_UPLOAD_MB``).
        reload_interval_s: check the bundle pointer for a new bundle at most this often, in
            seconds; 0 checks on every request (``$RECOMMENDER_RELOAD_INTERVAL``).
        image_max_age_s: ``Cache-Control: max-age`` of catalog images (``$RECOMMENDER_IMAGE_MAX_AGE``).
        default_k: neighbours when a request does not say (``?k=``).
        sample_items: catalog items shown on the demo page before any upload.
        development: Flask debug mode (tracebacks in the browser). Only ``serve --development``
            or an explicit ``config={"development": True}`` turns it on.
    """

    bundle: Path | None = None
    max_upload_mb: float = 10.0
    reload_interval_s: float = 5.0
    image_max_age_s: int = 3600
    default_k: int = 6
    sample_items: int = 12
    development: bool = False

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit in bytes (Flask's ``MAX_CONTENT_LENGTH``)."""
        return int(self.max_upload_mb * 1_000_000)


def _convert(name: str, value, origin: str):
    """Converts a setting from a string or a Python value to the field's type, or raises ConfigError."""
    field_type = {f.name: f.type for f in dataclasses.fields(WebConfig)}[name]
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
