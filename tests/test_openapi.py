"""The OpenAPI document at /api/v1/openapi.json is true: every route and only those, real answers
validate against its schemas, and schemathesis finds no failure against a live server."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path

import jsonschema_rs
import pytest
import schemathesis
from conftest import BAD_IMAGES, GOOD_IMAGES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection
from werkzeug.serving import make_server

from webapp import create_app
from webapp.openapi import ERROR_CODES, OPENAPI_VERSION

#: Routes the document covers: the JSON API and the health probes (not pages, images, /metrics).
DOCUMENTED = re.compile(r"^/api/v1/|^/healthz$|^/readyz$")

#: Generated requests per operation and mode: bounded so the whole module takes seconds, not minutes.
MAX_EXAMPLES = 15


@pytest.fixture(scope="module")
def app(tiny_bundle):
    return create_app({"bundle": tiny_bundle, "reload_interval_s": 3600})


@pytest.fixture(scope="module")
def document(app) -> dict:
    response = app.test_client().get("/api/v1/openapi.json")
    assert response.status_code == 200
    return response.get_json()


@pytest.fixture(scope="module")
def live_url(app):
    """The app on Flask's threaded server at 127.0.0.1 on a free port, stopped after this module."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="openapi-live-server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(10)


def _openapi_path(rule: str) -> str:
    """``/api/v1/items/<path:item_id>/similar`` -> ``/api/v1/items/{item_id}/similar``."""
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def test_the_document_names_every_route_and_method_and_nothing_else(app, document):
    assert document["openapi"] == OPENAPI_VERSION
    served = {}
    for rule in app.url_map.iter_rules():
        if DOCUMENTED.match(rule.rule):
            methods = {method.lower() for method in rule.methods} - {"head", "options"}
            served.setdefault(_openapi_path(rule.rule), set()).update(methods)
    documented = {path: set(operations) for path, operations in document["paths"].items()}
    assert documented == served
    for path, operations in document["paths"].items():
        for operation in operations.values():
            # Every documented answer says it carries the request id (and the server sends it: schemathesis checks).
            for answer in operation["responses"].values():
                assert "X-Request-ID" in answer["headers"], path


def test_filter_and_match_predicted_list_what_the_bundle_knows(document, engine):
    parameters = {p["name"]: p for p in document["paths"]["/api/v1/similar"]["post"]["parameters"]}
    known = {f"{column}:{value}" for column in engine.attributes.columns for value in engine.attributes.values(column)}
    assert set(parameters["filter"]["schema"]["items"]["enum"]) == known
    assert parameters["match_predicted"]["schema"]["items"]["enum"] == list(engine.label_columns)
    assert parameters["k"]["schema"]["maximum"] == 100


def _validator(document: dict, path: str, method: str, status: int):
    """A JSON Schema validator of one documented answer (its $refs resolved within the document)."""
    answers = document["paths"][path][method]["responses"]
    assert str(status) in answers, f"{method.upper()} {path} answered {status}, which the document does not list"
    schema = answers[str(status)]["content"]["application/json"]["schema"]
    return jsonschema_rs.Draft202012Validator({**schema, "components": document["components"]})


def _multipart(data: bytes, **fields):
    return {"image": (io.BytesIO(data), "photo.jpg"), **fields}


def test_real_answers_validate_against_the_document(app, document, engine, image_files):
    client = app.test_client()
    photo = image_files["rgb_jpeg"].read_bytes()
    catalog_photo = Path(engine.rows[3].path).read_bytes()
    item = engine.rows[0].id
    similar, items = "/api/v1/similar", "/api/v1/items/{item_id}/similar"
    calls = [
        (similar, "post", client.post(f"{similar}?k=3", data=_multipart(photo))),
        (similar, "post", client.post(similar, data=catalog_photo, content_type="image/jpeg")),
        (similar, "post", client.post(f"{similar}?filter=colour:red&match_predicted=label", data=_multipart(photo))),
        (similar, "post", client.post(similar, data=_multipart(photo, filter="label:dots", match_predicted="colour"))),
        (similar, "post", client.post(similar, data=image_files["garbage"].read_bytes(), content_type="image/png")),
        (similar, "post", client.post(similar, data={"filter": "colour:red"})),
        (similar, "post", client.post(f"{similar}?k=0", data=_multipart(photo))),
        (similar, "post", client.post(f"{similar}?filter=nope:x", data=_multipart(photo))),
        (similar, "post", client.post(similar, json={"image": "x"})),
        (items, "get", client.get(f"/api/v1/items/{item}/similar?k=4")),
        (items, "get", client.get(f"/api/v1/items/{item}/similar?filter=label:plain&filter=colour:blue&k=100")),
        (items, "get", client.get("/api/v1/items/no-such-item/similar")),
        (items, "get", client.get(f"/api/v1/items/{item}/similar?match_predicted=label")),
        ("/api/v1/openapi.json", "get", client.get("/api/v1/openapi.json")),
        ("/healthz", "get", client.get("/healthz")),
        ("/readyz", "get", client.get("/readyz")),
    ]
    statuses = set()
    for path, method, response in calls:
        assert response.headers.get("X-Request-ID"), path
        errors = list(_validator(document, path, method, response.status_code).iter_errors(response.get_json()))
        assert not errors, (path, response.status_code, [str(error) for error in errors])
        statuses.add((path, response.status_code))
    # The calls above reach every answer the document promises for the two API routes, but 413 and 503.
    assert {status for path, status in statuses if path == similar} == {200, 400, 415}
    assert {status for path, status in statuses if path == items} == {200, 400, 404}


def test_every_werkzeug_error_code_is_documented():
    """The codes the error handlers give HTTP errors are in the document's enum (500 is never promised)."""
    from webapp.errors import STATUS_CODES

    assert set(STATUS_CODES.values()) - {"internal_error"} <= set(ERROR_CODES)


# -- schemathesis against the live server ------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(live_url):
    config = schemathesis.Config.from_dict(
        {
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
        }
    )
    return schemathesis.openapi.from_url(f"{live_url}/api/v1/openapi.json", config=config)


#: The operations schemathesis exercises (a test checks the document has exactly these).
OPERATIONS = (
    ("POST", "/api/v1/similar"),
    ("GET", "/api/v1/items/{item_id}/similar"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
)


def _real_image(case, image_files) -> bytes:
    """A good photo of an awkward kind (CMYK, 16-bit, EXIF-rotated...), chosen from the case deterministically."""
    name = GOOD_IMAGES[sum(map(ord, repr(case.query))) % len(GOOD_IMAGES)]
    return image_files[name].read_bytes()


def _with_a_real_photo(case, image_files):
    """The case as schema-valid data means it: a real photo instead of random bytes, and no column
    both in ``filter`` and ``match_predicted`` (a rule between two parameters that a schema cannot say)."""
    photo = _real_image(case, image_files)
    body = case.body
    if isinstance(body, dict):
        body = {**body, "image": photo}
    else:
        body = photo
    query = dict(case.query or {})
    filters = list(query.get("filter") or []) + list(body.get("filter") or [] if isinstance(body, dict) else [])
    filtered = {item.partition(":")[0] for item in filters}
    for container in (query, body if isinstance(body, dict) else {}):
        if container.get("match_predicted"):
            container["match_predicted"] = [c for c in container["match_predicted"] if c not in filtered]
    case.body = body
    case.query = query
    return case


def test_schemathesis_exercises_every_documented_operation(document):
    documented = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    assert documented == set(OPERATIONS)


#: Operations with parameters or a body: only these have negative data to send (the others take nothing).
WITH_INPUT = OPERATIONS[:2]
RUNS = [(*operation, GenerationMode.POSITIVE) for operation in OPERATIONS] + [
    (*operation, GenerationMode.NEGATIVE) for operation in WITH_INPUT
]


@pytest.mark.parametrize(("method", "path", "mode"), RUNS, ids=[f"{m} {p}-{mode.value}" for m, p, mode in RUNS])
def test_schemathesis_finds_no_failure(api_schema, image_files, method, path, mode):
    """All of schemathesis' checks on generated requests (and the document's examples), 0 failures.

    An upload with random bytes must be a 400 (never a 500); each valid-by-schema upload is then
    sent again with a real photo, where positive data must be accepted (200).
    """
    operation = api_schema[path][method]
    strategies = [operation.as_strategy(generation_mode=mode)]
    if mode == GenerationMode.POSITIVE:
        strategies += api_schema.get_strategies_from_examples(operation)

    @given(case=st.one_of(strategies))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        # The examples strategy can yield cases schemathesis itself marks negative: those are
        # checked as negative data (rejected), never sent again with a real photo.
        generated_positive = case.meta is None or not case.meta.generation.mode.is_negative
        if path == "/api/v1/similar" and mode == GenerationMode.POSITIVE and generated_positive:
            response = case.call()
            assert response.status_code in (200, 400), (response.status_code, response.text[:300])
            _with_a_real_photo(case, image_files)
            # Schemathesis re-validates an edited body and counts binary content as not matching
            # the schema, which would relabel this case negative: every other check still runs.
            response = case.call_and_validate(excluded_checks=[negative_data_rejection])
            assert response.status_code == 200, response.text[:300]
        else:
            case.call_and_validate()

    check()


def test_bad_images_are_400_on_the_live_server(live_url, image_files):
    """The raw-body upload of every bad file is a 400 ``invalid_image`` over real HTTP (what schemathesis' random bytes hit)."""
    import requests

    for name in BAD_IMAGES:
        response = requests.post(
            f"{live_url}/api/v1/similar",
            data=image_files[name].read_bytes(),
            headers={"Content-Type": "image/jpeg"},
            timeout=30,
        )
        assert response.status_code == 400, name
        assert response.json()["error"]["code"] == "invalid_image", name
