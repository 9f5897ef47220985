"""Operating the web app in one process: request ids, the JSON request log, /metrics and CORS.

The same app as production (``create_app`` on the session's tiny bundle), driven through
Flask's test client; gunicorn's multiprocess metrics are checked in ``test_serving``.
"""

from __future__ import annotations

import io
import json
import re

import pytest
from conftest import prometheus_sample

from webapp import create_app
from webapp.config import ConfigError, resolve_config
from webapp.observability import configure_logging


@pytest.fixture(scope="module")
def app(tiny_bundle):
    return create_app({"bundle": tiny_bundle, "reload_interval_s": 0})


@pytest.fixture(scope="module")
def cors_app(tiny_bundle):
    return create_app({"bundle": tiny_bundle, "cors_origins": "https://shop.example, http://127.0.0.1:3000"})


def test_request_ids_are_kept_when_sane_and_made_otherwise(app):
    client = app.test_client()
    assert client.get("/healthz", headers={"X-Request-ID": "shop-7f3a:12"}).headers["X-Request-ID"] == "shop-7f3a:12"
    for unsafe in ("", "has space", 'quo"te', "x" * 129, "tab\there", "<script>"):
        made = client.get("/healthz", headers={"X-Request-ID": unsafe}).headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", made), unsafe
    first, second = (client.get("/healthz").headers["X-Request-ID"] for _ in range(2))
    assert first != second
    # Error answers carry one too (a 404 from no route, a 400 from the API).
    assert client.get("/no/such/page").headers["X-Request-ID"]
    assert client.post("/api/v1/similar", data=b"not an image", content_type="image/png").headers["X-Request-ID"]


def test_one_json_log_line_per_request(app, engine, capsys):
    client = app.test_client()
    item = engine.rows[0].id
    capsys.readouterr()
    client.get(f"/api/v1/items/{item}/similar?k=2", headers={"X-Request-ID": "line-test-1"})
    client.post("/api/v1/similar", data=b"junk", content_type="image/jpeg", headers={"X-Request-ID": "line-test-2"})
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    requests_logged = {line["request_id"]: line for line in lines if line["logger"] == "webapp.requests"}
    ok, bad = requests_logged["line-test-1"], requests_logged["line-test-2"]
    assert ok["status"] == 200 and ok["method"] == "GET" and ok["endpoint"] == "/api/v1/items/<path:item_id>/similar"
    assert ok["bundle"] == engine.bundle_id and ok["duration_ms"] > 0 and ok["bytes"] > 0
    assert bad["status"] == 400 and bad["endpoint"] == "/api/v1/similar"
    assert {"time", "level", "message", "path", "remote_addr"} <= set(ok)


def test_text_log_format_for_a_terminal(tiny_bundle, capsys):
    app = create_app({"bundle": tiny_bundle, "log_format": "text"})
    try:
        capsys.readouterr()
        app.test_client().get("/healthz", headers={"X-Request-ID": "text-1"})
        err = capsys.readouterr().err
        assert re.search(r"INFO webapp\.requests: GET /healthz 200 [0-9.]+ ms \[text-1\]", err), err
        assert not any(line.startswith("{") for line in err.splitlines())
    finally:
        app.extensions["live_bundle"].stop()
        configure_logging("json")  # the handler is shared by every app in the process


def test_metrics_count_requests_by_route_status_and_latency(app, engine):
    client = app.test_client()
    before = client.get("/metrics").get_data(as_text=True)
    item = engine.rows[1].id
    for _ in range(3):
        assert client.get(f"/api/v1/items/{item}/similar?k=2").status_code == 200
    assert client.get("/api/v1/items/no-such-item/similar").status_code == 404
    assert client.get("/no/such/page").status_code == 404
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    after = response.get_data(as_text=True)
    route = "/api/v1/items/<path:item_id>/similar"
    counted = {
        status: prometheus_sample(after, "recommender_http_requests_total", endpoint=route, method="GET", status=status)
        - prometheus_sample(before, "recommender_http_requests_total", endpoint=route, method="GET", status=status)
        for status in ("200", "404")
    }
    assert counted == {"200": 3, "404": 1}
    # Raw paths never become labels (a scanner's probes cannot grow the series without bound).
    assert "no-such-item" not in after and "/no/such/page" not in after
    assert (
        prometheus_sample(after, "recommender_http_requests_total", endpoint="unmatched", method="GET", status="404")
        >= 1
    )
    assert (
        prometheus_sample(after, "recommender_http_request_duration_seconds_count", endpoint=route, method="GET") >= 3
    )
    assert (
        f'recommender_bundle_info{{backbone="{engine.manifest.backbone.name}",bundle="{engine.bundle_id}"}} 1.0'
        in after
    )
    assert re.search(rf"^recommender_bundle_items {len(engine.rows)}\.0$", after, re.MULTILINE)
    assert re.search(r"^recommender_bundle_ready 1\.0$", after, re.MULTILINE)
    assert re.search(r"^recommender_bundle_reload_failing 0\.0$", after, re.MULTILINE)


def test_metrics_can_be_turned_off(tiny_bundle):
    app = create_app({"bundle": tiny_bundle, "metrics": False})
    try:
        assert app.test_client().get("/metrics").status_code == 404
    finally:
        app.extensions["live_bundle"].stop()
    assert resolve_config({"bundle": tiny_bundle}, environ={"RECOMMENDER_METRICS": "0"}).metrics is False


def test_cors_is_off_by_default(app):
    response = app.test_client().get("/healthz", headers={"Origin": "https://shop.example"})
    api = app.test_client().post(
        "/api/v1/similar", data=b"x", content_type="image/png", headers={"Origin": "https://shop.example"}
    )
    for answer in (response, api):
        assert not [name for name in answer.headers.keys() if name.lower().startswith("access-control-")]


def test_cors_answers_only_the_configured_origins_on_the_api(cors_app, engine, image_files):
    client = cors_app.test_client()
    item = engine.rows[0].id
    allowed = client.get(f"/api/v1/items/{item}/similar?k=2", headers={"Origin": "https://shop.example"})
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert "X-Request-ID" in allowed.headers["Access-Control-Expose-Headers"]
    assert "Origin" in allowed.headers["Vary"]
    assert "Access-Control-Allow-Credentials" not in allowed.headers

    other = client.get(f"/api/v1/items/{item}/similar?k=2", headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers

    preflight = client.options(
        "/api/v1/similar",
        headers={
            "Origin": "http://127.0.0.1:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Content-Type, X-Request-ID",
        },
    )
    assert preflight.status_code == 204
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:3000"
    assert "X-Request-ID" in preflight.headers["Access-Control-Allow-Headers"]
    refused = client.options(
        "/api/v1/similar", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "Access-Control-Allow-Origin" not in refused.headers

    upload = client.post(
        "/api/v1/similar",
        data={"image": (io.BytesIO(image_files["rgb_jpeg"].read_bytes()), "photo.jpg")},
        headers={"Origin": "https://shop.example"},
    )
    assert upload.status_code == 200 and upload.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    # Pages and catalog photos stay same-origin.
    page = client.get("/", headers={"Origin": "https://shop.example"})
    assert "Access-Control-Allow-Origin" not in page.headers


@pytest.mark.parametrize(
    "setting",
    ["https://shop.example/", "https://shop.example/path", "shop.example", "https://*.example", "ftp://x"],
)
def test_a_cors_origin_that_could_never_match_is_a_config_error(tiny_bundle, setting):
    with pytest.raises(ConfigError, match="not an origin"):
        resolve_config({"bundle": tiny_bundle}, environ={"RECOMMENDER_CORS_ORIGINS": setting})


def test_cors_origins_from_the_environment(tiny_bundle):
    config = resolve_config({"bundle": tiny_bundle}, environ={"RECOMMENDER_CORS_ORIGINS": "HTTPS://Shop.Example,*"})
    assert config.cors_origins == ("https://shop.example", "*")
    with pytest.raises(ConfigError, match="json, text"):
        resolve_config({"bundle": tiny_bundle}, environ={"RECOMMENDER_LOG_FORMAT": "xml"})
