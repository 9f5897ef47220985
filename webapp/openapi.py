"""The OpenAPI 3.1 document of ``/api/v1`` (and the health probes), served at ``/api/v1/openapi.json``.

Built in code from the served bundle, so it is exact for that bundle: ``filter`` lists the
``column:value`` pairs the bundle knows (up to :data:`MAX_LISTED_FILTERS`; a larger catalog
gets the column names as a pattern instead), ``match_predicted`` its predicted label
columns, and ``item_id`` an example id that exists. ``tests/test_openapi.py`` keeps it true:
every route is in it and nothing else, real answers validate against its schemas, and
schemathesis runs against a live server with it.
"""

from __future__ import annotations

import re

from recommender.engine import MAX_K

OPENAPI_VERSION = "3.1.0"

#: Above this many known ``column:value`` pairs, ``filter`` is described by a pattern over the
#: column names rather than an enum of every pair (the document stays small).
MAX_LISTED_FILTERS = 500

#: Every ``error.code`` the API answers with (webapp.inputs, webapp.errors).
ERROR_CODES = (
    "bad_request",
    "invalid_k",
    "invalid_filter",
    "invalid_image",
    "invalid_query",
    "missing_image",
    "not_found",
    "unknown_item",
    "method_not_allowed",
    "payload_too_large",
    "unsupported_media_type",
    "unavailable",
)


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict:
    return {
        "description": description,
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
        "content": {"application/json": {"schema": _ref("Error")}},
    }


def _ok(description: str, schema: dict) -> dict:
    return {
        "description": description,
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
        "content": {"application/json": {"schema": schema}},
    }


def _filter_items(engine) -> dict:
    """The schema of one ``filter`` value for this bundle: an enum of pairs, or a pattern over its columns."""
    attributes = engine.attributes
    pairs = [f"{column}:{value}" for column in attributes.columns for value in attributes.values(column)]
    if pairs and len(pairs) <= MAX_LISTED_FILTERS:
        return {"type": "string", "enum": pairs}
    columns = "|".join(re.escape(column) for column in attributes.columns) or "(?!)"
    return {"type": "string", "pattern": f"^({columns}):.*\\S"}


def _schemas() -> dict:
    probability = {"type": "number", "minimum": 0, "maximum": 1}
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "additionalProperties": False,
                    "properties": {
                        "code": {"type": "string", "enum": list(ERROR_CODES)},
                        "message": {"type": "string"},
                    },
                }
            },
        },
        "Prediction": {
            "type": "object",
            "required": ["label", "probability"],
            "additionalProperties": False,
            "properties": {"label": {"type": "string"}, "probability": probability},
        },
        "Hierarchy": {
            "type": "object",
            "description": "The predicted path through the label hierarchy (bundles with one).",
            "required": ["levels", "path", "probability", "mode"],
            "additionalProperties": False,
            "properties": {
                "levels": {"type": "array", "items": {"type": "string"}},
                "path": {"type": "array", "items": {"type": "string"}},
                "probability": probability,
                "mode": {"type": "string"},
            },
        },
        "Tag": {
            "type": "object",
            "required": ["tag", "probability"],
            "additionalProperties": False,
            "properties": {"tag": {"type": "string"}, "probability": probability},
        },
        "Neighbor": {
            "type": "object",
            "description": "A catalog item, nearest first.",
            "required": ["id", "distance", "labels", "image", "image_url"],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string"},
                "distance": {"type": "number", "minimum": 0},
                "labels": string_map,
                "tags": {"type": "array", "items": {"type": "string"}},
                "image": {"type": "string", "description": "The image path as written in the catalog."},
                "image_url": {"type": "string", "description": "Where to fetch the item's photo."},
                "title": {"type": ["string", "null"], "description": "The catalog's title, when it has one."},
                "price": {"type": ["number", "string", "null"], "description": "The catalog's price, when it has one."},
                "url": {"type": ["string", "null"], "description": "The product page, when the catalog has one."},
            },
        },
        "FilterReport": {
            "type": "object",
            "description": "What was filtered on, how many catalog items match, and whether k were found.",
            "required": ["applied", "matching_items", "complete"],
            "additionalProperties": False,
            "properties": {
                "applied": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
                "matching_items": {"type": "integer", "minimum": 0},
                "complete": {"type": "boolean"},
                "note": {"type": "string", "description": "Why fewer than k neighbours came back."},
            },
        },
        "UploadAnswer": {
            "type": "object",
            "required": ["predicted", "neighbors", "bundle"],
            "additionalProperties": False,
            "properties": {
                "predicted": {"type": "object", "additionalProperties": _ref("Prediction")},
                "hierarchy": _ref("Hierarchy"),
                "tags": {"type": "array", "items": _ref("Tag")},
                "neighbors": {"type": "array", "items": _ref("Neighbor"), "maxItems": MAX_K},
                "filter": _ref("FilterReport"),
                "bundle": {"type": "string", "description": "Id of the bundle that answered."},
            },
        },
        "ItemAnswer": {
            "type": "object",
            "required": ["id", "labels", "neighbors", "bundle"],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string"},
                "labels": string_map,
                "tags": {"type": "array", "items": {"type": "string"}},
                "neighbors": {"type": "array", "items": _ref("Neighbor"), "maxItems": MAX_K},
                "filter": _ref("FilterReport"),
                "bundle": {"type": "string"},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "ok"}},
        },
        "Readiness": {
            "type": "object",
            "description": "The served bundle and the last reload (webapp.bundles.LiveBundle.status).",
            "required": ["status", "ready", "bundle", "items", "reload_error"],
            "properties": {
                "status": {"type": "string", "enum": ["ready", "unavailable"]},
                "ready": {"type": "boolean"},
                "bundle": {"type": ["string", "null"]},
                "items": {"type": ["integer", "null"], "minimum": 0},
                "backbone": {"type": ["object", "null"]},
                "path": {"type": ["string", "null"]},
                "pointer": {"type": "string"},
                "loaded_at": {"type": ["string", "null"]},
                "reloading": {"type": "boolean"},
                "reload_error": {
                    "type": ["object", "null"],
                    "description": "The last refused bundle: target, message, at.",
                },
            },
        },
    }


def openapi_document(engine, settings) -> dict:
    """The OpenAPI 3.1 document for the bundle ``engine`` serves and the app's ``settings``.

    Args:
        engine: the served ``recommender.engine.Recommender``.
        settings: the app's ``webapp.config.WebConfig`` (default k, upload limit).

    Returns:
        The document as a JSON-ready dict.
    """
    k = {
        "name": "k",
        "in": "query",
        "required": False,
        "description": f"Neighbours to return, 1 to {MAX_K}.",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": settings.default_k},
    }
    filter_parameter = {
        "name": "filter",
        "in": "query",
        "required": False,
        "description": (
            "`column:value`, repeatable: only neighbours with that value in a label column or among "
            "their tags. Columns are ANDed, the values of one column ORed; the value is everything "
            "after the first `:`. An unknown column or value is a 400 `invalid_filter`."
        ),
        "style": "form",
        "explode": True,
        "schema": {"type": "array", "items": _filter_items(engine)},
    }
    label_columns = list(engine.label_columns)
    match_items = {"type": "string", "enum": label_columns}
    match_predicted = {
        "name": "match_predicted",
        "in": "query",
        "required": False,
        "description": (
            "A predicted label column, repeatable: only neighbours whose value in it equals the photo's "
            "predicted value. A column cannot also be a `filter` column (400 `invalid_filter`)."
        ),
        "style": "form",
        "explode": True,
        "schema": {"type": "array", "items": match_items},
    }
    binary = {"type": "string", "format": "binary"}
    limit_mb = f"{settings.max_upload_bytes / 1e6:g} MB"
    example_id = engine.rows[0].id if engine.rows else "sku-1"
    upload_errors = {
        "400": _error(
            "`invalid_image` (not an image, truncated, empty, too many pixels), `missing_image`, `invalid_k`, "
            "`invalid_filter`, or a malformed request (`bad_request`)."
        ),
        "413": _error(f"`payload_too_large`: the body is above the upload limit ({limit_mb})."),
        "415": _error("`unsupported_media_type`: the body is neither multipart nor an image."),
        "503": _error("`unavailable`: the recommender cannot answer right now; try again shortly."),
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Visual similarity recommender API",
            "version": "1",
            "description": (
                "Similar catalog items for an uploaded photo or for a catalog item, optionally filtered "
                f"on attributes. This document describes the bundle `{engine.bundle_id}` being served: "
                "`filter` and `match_predicted` list what it knows. Errors are "
                '`{"error": {"code", "message"}}`. Every response carries `X-Request-ID` (the one sent, '
                "when it is 1-128 characters of `[A-Za-z0-9._:+=/-]`, else a new one)."
            ),
        },
        "paths": {
            "/api/v1/similar": {
                "post": {
                    "operationId": "similarToUpload",
                    "summary": "Predicted labels and the k nearest catalog items of an uploaded photo",
                    "description": (
                        "The photo is the multipart field `image`, or the raw body (`image/*` or "
                        "`application/octet-stream`). A photo that is itself a catalog item is left out "
                        "of its own neighbours. `filter` and `match_predicted` may also be multipart fields."
                    ),
                    "parameters": [k, filter_parameter, match_predicted],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["image"],
                                    "properties": {
                                        "image": binary,
                                        "filter": {"type": "array", "items": _filter_items(engine)},
                                        "match_predicted": {"type": "array", "items": match_items},
                                    },
                                },
                                "encoding": {"image": {"contentType": "image/*, application/octet-stream"}},
                            },
                            "application/octet-stream": {"schema": binary},
                            "image/*": {"schema": binary},
                        },
                    },
                    "responses": {
                        "200": _ok("Predictions, then the neighbours, nearest first.", _ref("UploadAnswer")),
                        **upload_errors,
                    },
                }
            },
            "/api/v1/items/{item_id}/similar": {
                "get": {
                    "operationId": "similarToItem",
                    "summary": "The k nearest catalog items of a catalog item (the item itself left out)",
                    "description": "Uses the item's stored embedding: no image decoding, no forward pass.",
                    "parameters": [
                        {
                            "name": "item_id",
                            "in": "path",
                            "required": True,
                            "description": "A catalog id.",
                            "schema": {"type": "string", "minLength": 1},
                            "example": example_id,
                        },
                        k,
                        filter_parameter,
                    ],
                    "responses": {
                        "200": {
                            **_ok("The item's labels, then its neighbours, nearest first.", _ref("ItemAnswer")),
                            "headers": {
                                "X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"},
                                "X-Similar-Source": {
                                    "description": "`panels`: read from the bundle's precomputed panels; "
                                    "`live`: searched for this request. The answer is the same.",
                                    "required": True,
                                    "schema": {"type": "string", "enum": ["panels", "live"]},
                                },
                            },
                        },
                        "400": _error("`invalid_k`, `invalid_filter` (also for `match_predicted`, uploads only)."),
                        "404": _error("`unknown_item`: no catalog item with this id."),
                        "503": upload_errors["503"],
                    },
                }
            },
            "/api/v1/openapi.json": {
                "get": {
                    "operationId": "openapiDocument",
                    "summary": "This document",
                    "responses": {"200": _ok("The OpenAPI 3.1 document.", {"type": "object"})},
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness: 200 while the process answers",
                    "responses": {"200": _ok("Alive.", _ref("Health"))},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Readiness: 200 with the served bundle, 503 without one",
                    "responses": {
                        "200": _ok("A bundle is served.", _ref("Readiness")),
                        "503": _ok("No bundle is served.", _ref("Readiness")),
                    },
                }
            },
        },
        "components": {
            "schemas": _schemas(),
            "headers": {
                "X-Request-ID": {
                    "description": "This request's id, also in its log line.",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:+=/-]{1,128}$"},
                }
            },
        },
    }
