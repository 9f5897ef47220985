"""Web app on the session's tiny bundle: every endpoint and error, escaping, concurrency, a real browser."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import random
import re
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pytest
from conftest import BAD_IMAGES, GOOD_IMAGES
from PIL import Image
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

from recommender.bundle import write_json
from recommender.errors import BundleError
from recommender.images import read_image_bytes
from webapp import ConfigError, create_app
from webapp.config import WebConfig, resolve_config

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
EVIL_TITLE = "<script>alert('x')</script> & \"Tee\""
ODD_ID = "tees/red tee ?#%&é"
BAD_K = ("0", "101", "-1", "abc", "", "6.5", " 6", "+6", "1e2", "٣", "9" * 30)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tiny_bundle):
    """The web app over the session's tiny bundle (loaded once for this module)."""
    return create_app({"bundle": tiny_bundle, "reload_interval_s": 3600})


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def catalog_photo(engine) -> bytes:
    """The encoded bytes of a catalog item's photo."""
    return Path(engine.rows[5].path).read_bytes()


@pytest.fixture(scope="module")
def evil_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """A valid copy of the tiny bundle with a hostile title and an id full of URL syntax.

    Only ``catalog.jsonl`` changes; the manifest is rewritten with its new hash and size, so
    the bundle verifies like any published one.
    """
    from recommender.backbones import file_sha256

    out = tmp_path_factory.mktemp("evil") / "bundle"
    shutil.copytree(tiny_bundle, out)
    rows = [json.loads(line) for line in (out / "catalog.jsonl").read_text(encoding="utf-8").splitlines()]
    rows[0]["extra"]["title"] = EVIL_TITLE
    rows[1]["id"] = ODD_ID
    catalog = out / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"]["catalog.jsonl"] = {"sha256": file_sha256(catalog), "bytes": catalog.stat().st_size}
    write_json(out / "manifest.json", manifest)
    return out


@pytest.fixture(scope="module")
def evil_app(evil_bundle):
    """The app over the hostile bundle, with a 50 kB upload limit."""
    return create_app({"bundle": evil_bundle, "max_upload_mb": 0.05})


def error_of(response, status: int, code: str) -> str:
    """Asserts a JSON error response and returns its message."""
    assert response.status_code == status, response.data[:300]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    return body["error"]["message"]


def html_error(response, status: int) -> str:
    """Asserts a friendly HTML error page (no traceback) and returns its text."""
    assert response.status_code == status, response.data[:300]
    assert response.mimetype == "text/html"
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and "werkzeug" not in text.lower()
    assert 'href="/"' in text  # a way back to the shop
    return text


def form_post(client, url: str, data: bytes, field: str = "image", filename: str = "photo.jpg"):
    """POSTs ``data`` as a multipart file field, encoded in memory.

    (Werkzeug's test client spools bodies over 500 kB to a temporary file it never closes,
    a ResourceWarning that the strict warning filter turns into an error.)
    """
    boundary, body = encode_multipart({field: FileStorage(io.BytesIO(data), filename, content_type="image/jpeg")})
    return client.post(url, data=body, content_type=f"multipart/form-data; boundary={boundary}")


def upload(client, data: bytes, *, k=None, raw: bool = False):
    """POSTs a photo to the API, as multipart (default) or as the raw body."""
    url = "/api/v1/similar" + (f"?k={quote(str(k))}" if k is not None else "")
    if raw:
        return client.post(url, data=data, content_type="image/jpeg")
    return form_post(client, url, data)


def assert_same_neighbors(answered: list[dict], direct: list[dict]) -> None:
    """The API's neighbours are the engine's: same ids in order, same distances."""
    assert [n["id"] for n in answered] == [n["id"] for n in direct]
    assert [n["distance"] for n in answered] == pytest.approx([n["distance"] for n in direct], rel=1e-4, abs=1e-4)
    assert [n["labels"] for n in answered] == [n["labels"] for n in direct]


class Page(HTMLParser):
    """What a test needs of a rendered page: the results form, attribute values, cards, active filters.

    Attributes:
        hidden: ``(name, value)`` of the results form's hidden fields, in order.
        buttons: attributes of the results form's buttons (``name``, ``value``, ``data-*``...).
        facets: attribute values shown (buttons, links or text): their attributes plus ``tag``
            and ``text``, in page order.
        cards: ``(item id, {(column, value)})`` of each product card, from its chips.
        active: ``(column, value)`` of each active-filter chip.
    """

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.hidden: list[tuple[str, str]] = []
        self.buttons: list[dict] = []
        self.facets: list[dict] = []
        self.cards: list[tuple[str, set]] = []
        self.active: list[tuple[str, str]] = []
        self._in_form = False
        self._facet: dict | None = None
        self._depth = 0
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        attributes = {name: value or "" for name, value in attrs}
        classes = attributes.get("class", "").split()
        if self._facet is not None:
            self._depth += 1
        if tag == "form" and "refine" in classes:
            self._in_form = True
        if self._in_form and tag == "input" and attributes.get("type") == "hidden":
            self.hidden.append((attributes["name"], attributes["value"]))
        if self._in_form and tag == "button":
            self.buttons.append(attributes)
        if "facet" in classes:
            self._facet = {**attributes, "tag": tag, "text": ""}
            self._depth = 0
            self.facets.append(self._facet)
        if tag == "a" and "card-link" in classes:
            self.cards.append((unquote(attributes["href"].removeprefix("/items/")), set()))
        if tag == "li" and "chip" in classes:
            self.cards[-1][1].add((attributes["data-column"], attributes["data-value"]))
        if "filter-chip" in classes:
            self.active.append((attributes["data-column"], attributes["data-value"]))

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False
        if self._facet is not None:
            if self._depth == 0:
                self._facet["text"] = " ".join(self._facet["text"].split())
                self._facet = None
            else:
                self._depth -= 1

    def handle_data(self, data):
        if self._facet is not None:
            self._facet["text"] += data

    @property
    def card_ids(self) -> list[str]:
        return [item_id for item_id, _ in self.cards]

    def facet(self, column: str, value: str) -> dict:
        """The attribute value shown for ``column:value`` (fails the test when absent)."""
        found = [f for f in self.facets if (f.get("data-column"), f.get("data-value")) == (column, value)]
        assert len(found) == 1, f"{column}:{value} shown {len(found)} times"
        return found[0]


def click(client, page: Page, name: str, value: str):
    """Submits the results page's form as a browser does when the button ``name=value`` is clicked."""
    assert any(b.get("name") == name and b.get("value") == value for b in page.buttons), f"no {name}={value} button"
    boundary, body = encode_multipart(MultiDict([*page.hidden, (name, value)]))
    return client.post("/", data=body, content_type=f"multipart/form-data; boundary={boundary}")


# -- configuration -------------------------------------------------------------------------


def test_config_defaults_then_environment_then_code():
    assert resolve_config({}, environ={}) == WebConfig()
    assert WebConfig().max_upload_bytes == 10_000_000
    environ = {
        "RECOMMENDER_BUNDLE": "/srv/current",
        "RECOMMENDER_MAX_UPLOAD_MB": "2.5",
        "RECOMMENDER_RELOAD_INTERVAL": "0",
    }
    from_environment = resolve_config(None, environ=environ)
    assert from_environment.bundle == Path("/srv/current")
    assert from_environment.max_upload_bytes == 2_500_000
    assert from_environment.reload_interval_s == 0
    overridden = resolve_config({"bundle": "/other", "max_upload_mb": None, "TESTING": True}, environ=environ)
    assert overridden.bundle == Path("/other")
    assert overridden.max_upload_mb == 2.5  # None means "not given", the environment stays


@pytest.mark.parametrize(
    "overrides, environ",
    [
        ({"no_such_setting": 1}, {}),
        ({}, {"RECOMMENDER_MAX_UPLOAD_MB": "ten"}),
        ({"reload_interval_s": -1}, {}),
        ({"max_upload_mb": 0}, {}),
        ({"image_max_age_s": 1.5}, {}),
        ({"development": "maybe"}, {}),
    ],
)
def test_config_refuses_malformed_settings(overrides, environ):
    with pytest.raises(ConfigError):
        resolve_config(overrides, environ=environ)


def test_create_app_needs_a_valid_bundle(tmp_path, monkeypatch):
    monkeypatch.delenv("RECOMMENDER_BUNDLE", raising=False)
    with pytest.raises(ConfigError, match="RECOMMENDER_BUNDLE"):
        create_app()
    with pytest.raises(BundleError, match="not found"):
        create_app({"bundle": tmp_path / "missing"})


def test_bundle_is_loaded_once_and_no_debugger(app, client, catalog_photo):
    live = app.extensions["live_bundle"]
    served = live.current()
    for _ in range(3):
        assert upload(client, catalog_photo).status_code == 200
        assert client.get("/api/v1/items/plain-red-000/similar").status_code == 200
    assert live.current() is served
    assert not app.debug and not app.config["PROPAGATE_EXCEPTIONS"]


# -- demo pages ----------------------------------------------------------------------------


def test_home_page_has_a_plain_upload_form_and_catalog_samples(client, engine):
    response = client.get("/")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert 'method="post"' in page and 'enctype="multipart/form-data"' in page
    assert 'type="file"' in page and 'name="image"' in page
    assert 'name="viewport"' in page
    assert page.count('class="card"') == 12
    assert f"{len(engine.rows)} products" in page
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]


def test_search_form_shows_prediction_and_six_cards(client, engine, catalog_photo):
    response = client.post("/", data={"image": (io.BytesIO(catalog_photo), "shirt.jpg")})
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    direct = engine.query(catalog_photo, k=6)
    assert page.count('class="card"') == 6
    for neighbor in direct["neighbors"]:
        assert f'href="/items/{neighbor["id"]}"' in page
        assert f'src="/catalog/{neighbor["id"]}/image"' in page
        assert engine.item(neighbor["id"]).extra["title"] in page
    assert direct["predicted"]["label"]["label"] in page
    assert f"{direct['predicted']['label']['probability'] * 100:.0f}% sure" in page
    assert direct["predicted"]["colour"]["label"] in page
    assert 'src="data:image/jpeg;base64,' in page  # the query photo is shown back


def test_results_page_values_narrow_the_neighbours_on_a_bundle_without_tags(client, engine, catalog_photo):
    page = Page(form_post(client, "/", catalog_photo).get_data(as_text=True))
    direct = engine.query(catalog_photo, k=6)
    colour = direct["predicted"]["colour"]["label"]
    assert [(f["data-column"], f["tag"]) for f in page.facets] == [("label", "button"), ("colour", "button")]
    assert page.facet("colour", colour)["text"] == f"{colour} {direct['predicted']['colour']['probability'] * 100:.0f}%"

    narrowed = Page(click(client, page, "toggle", f"colour:{colour}").get_data(as_text=True))
    expected = engine.query(catalog_photo, k=6, filters={"colour": colour})
    assert narrowed.card_ids == [n["id"] for n in expected["neighbors"]]
    assert all(("colour", colour) in chips for _, chips in narrowed.cards)
    assert narrowed.active == [("colour", colour)] and ("filter", f"colour:{colour}") in narrowed.hidden
    assert narrowed.facet("colour", colour)["aria-pressed"] == "true"

    again = Page(click(client, narrowed, "toggle", f"colour:{colour}").get_data(as_text=True))
    assert again.card_ids == [n["id"] for n in direct["neighbors"]] and again.active == []


def test_search_form_without_a_photo_shows_the_form_again(client):
    response = client.post("/", data={"image": (io.BytesIO(b""), "")})
    page = html_error(response, 400)
    assert "Choose a photo first." in page and 'type="file"' in page
    page = html_error(client.post("/", data={}), 400)
    assert 'role="alert"' in page


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_search_form_with_a_bad_image_explains_why(client, image_files, name):
    response = client.post("/", data={"image": (io.BytesIO(image_files[name].read_bytes()), "upload.jpg")})
    page = html_error(response, 400)
    assert 'role="alert"' in page and "not a usable image" in page and 'type="file"' in page


def test_item_page_shows_the_product_and_six_similar_items(client, engine):
    row = engine.rows[10]
    response = client.get(f"/items/{row.id}")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert row.extra["title"] in page and row.id in page
    assert f'src="/catalog/{row.id}/image"' in page
    assert page.count('class="card"') == 6
    for neighbor in engine.similar_to_item(row.id, 6)["neighbors"]:
        assert f'href="/items/{neighbor["id"]}"' in page
    assert f'href="/items/{row.id}"' not in page  # not its own neighbour


def test_unknown_pages_and_items_get_a_friendly_404(client):
    assert "no catalog item with id &#39;nope&#39;" in html_error(client.get("/items/nope"), 404)
    html_error(client.get("/no/such/page"), 404)


def test_wrong_methods_get_405(client):
    for response in (
        client.put("/"),
        client.post("/items/plain-red-000"),
        client.delete("/catalog/plain-red-000/image"),
    ):
        html_error(response, 405)
        assert "GET" in response.headers["Allow"]
    response = client.get("/api/v1/similar")
    error_of(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]
    error_of(client.post("/api/v1/items/plain-red-000/similar"), 405, "method_not_allowed")
    error_of(client.post("/healthz"), 405, "method_not_allowed")


# -- JSON API ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [False, True], ids=["multipart", "raw-body"])
def test_upload_answers_like_the_engine(client, engine, catalog_photo, raw):
    response = upload(client, catalog_photo, raw=raw)
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"predicted", "neighbors", "bundle"}
    assert body["bundle"] == engine.bundle_id
    direct = engine.query(catalog_photo, k=6)
    assert body["predicted"].keys() == direct["predicted"].keys()
    for column, prediction in direct["predicted"].items():
        assert body["predicted"][column]["label"] == prediction["label"]
        assert body["predicted"][column]["probability"] == pytest.approx(prediction["probability"], abs=1e-5)
    assert_same_neighbors(body["neighbors"], direct["neighbors"])
    assert read_image_bytes(catalog_photo).sha256 not in [engine.item(n["id"]).sha256 for n in body["neighbors"]]
    for neighbor in body["neighbors"]:
        assert neighbor["image_url"] == f"/catalog/{neighbor['id']}/image"


@pytest.mark.parametrize("name", GOOD_IMAGES)
def test_upload_accepts_every_awkward_good_image(client, image_files, name):
    response = upload(client, image_files[name].read_bytes(), k=3, raw=name.endswith("png"))
    assert response.status_code == 200, response.data
    assert len(response.get_json()["neighbors"]) == 3


@pytest.mark.parametrize("name", BAD_IMAGES)
@pytest.mark.parametrize("raw", [False, True], ids=["multipart", "raw-body"])
def test_upload_refuses_every_bad_image_with_400(client, image_files, name, raw):
    message = error_of(upload(client, image_files[name].read_bytes(), raw=raw), 400, "invalid_image")
    assert message.startswith("not a usable image")


@pytest.mark.parametrize("k", BAD_K)
def test_bad_k_is_400_on_both_endpoints(client, catalog_photo, k):
    assert "k must be a whole number from 1 to 100" in error_of(upload(client, catalog_photo, k=k), 400, "invalid_k")
    response = client.get(f"/api/v1/items/plain-red-000/similar?k={quote(k)}")
    error_of(response, 400, "invalid_k")


def test_k_bounds_are_accepted(client, engine, catalog_photo):
    assert len(upload(client, catalog_photo, k=1).get_json()["neighbors"]) == 1
    everything = upload(client, catalog_photo, k=100).get_json()["neighbors"]
    assert len(everything) == len(engine.rows) - 1  # all but the photo's own item
    answer = client.get("/api/v1/items/plain-red-000/similar?k=100").get_json()
    assert len(answer["neighbors"]) == len(engine.rows) - 1


def test_upload_without_an_image_field_is_400(client):
    response = form_post(client, "/api/v1/similar", b"x", field="photo")
    error_of(response, 400, "missing_image")
    as_text = client.post("/api/v1/similar", data={"image": "not a file"}, content_type="multipart/form-data")
    error_of(as_text, 400, "missing_image")


@pytest.mark.parametrize(
    "content_type, data",
    [
        ("application/json", b'{"image": "x"}'),
        ("text/plain", b"hello"),
        ("application/x-www-form-urlencoded", b"image=abc"),
    ],
)
def test_upload_of_a_non_image_content_type_is_415(client, content_type, data):
    message = error_of(
        client.post("/api/v1/similar", data=data, content_type=content_type), 415, "unsupported_media_type"
    )
    assert "multipart/form-data" in message


def test_upload_limit_is_413_above_and_accepted_at_the_limit(client):
    limit = WebConfig().max_upload_bytes
    error_of(upload(client, b"\0" * (limit + 1), raw=True), 413, "payload_too_large")
    error_of(upload(client, b"\0" * limit), 413, "payload_too_large")  # multipart framing adds bytes
    error_of(upload(client, b"\0" * limit, raw=True), 400, "invalid_image")  # read, then refused as no image
    page = html_error(form_post(client, "/", b"\0" * (limit + 1)), 413)
    assert "larger than the limit of 10 MB" in page and 'type="file"' in page


def test_items_similar_answers_like_the_engine(client, engine):
    for row in engine.rows[::17]:
        response = client.get(f"/api/v1/items/{row.id}/similar?k=4")
        assert response.status_code == 200
        body = response.get_json()
        direct = engine.similar_to_item(row.id, 4)
        assert body["id"] == row.id and body["labels"] == row.labels and body["bundle"] == engine.bundle_id
        assert_same_neighbors(body["neighbors"], direct["neighbors"])
        assert row.id not in [n["id"] for n in body["neighbors"]]
    assert len(client.get(f"/api/v1/items/{engine.rows[0].id}/similar").get_json()["neighbors"]) == 6


def test_filters_on_a_bundle_without_hierarchy_or_tags(client, engine, catalog_photo):
    body = form_post(client, "/api/v1/similar?filter=colour:blue&filter=label:dots", catalog_photo).get_json()
    direct = engine.query(catalog_photo, k=6, filters={"colour": "blue", "label": "dots"})
    assert set(body) == {"predicted", "neighbors", "filter", "bundle"}
    assert body["filter"] == direct["filter"]
    assert_same_neighbors(body["neighbors"], direct["neighbors"])
    assert all(n["labels"]["colour"] == "blue" and n["labels"]["label"] == "dots" for n in body["neighbors"])
    message = error_of(client.get("/api/v1/items/plain-red-000/similar?filter=tags:warm"), 400, "invalid_filter")
    assert "unknown filter column 'tags'" in message and "label, colour" in message


def test_unknown_ids_and_routes_are_json_404_under_api(client):
    assert "nope" in error_of(client.get("/api/v1/items/nope/similar"), 404, "unknown_item")
    error_of(client.get("/api/v1/no-such-endpoint"), 404, "not_found")
    error_of(client.get("/api/v2/similar"), 404, "not_found")


def test_unexpected_failure_is_a_clean_500_and_the_server_keeps_answering(app, client, catalog_photo, monkeypatch):
    served = app.extensions["live_bundle"].current()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug /secret/path")

    # answer_decoded: where every upload is answered, batched (recommender.batching) or not.
    monkeypatch.setattr(served, "answer_decoded", broken)
    message = error_of(upload(client, catalog_photo), 500, "internal_error")
    assert "secret" not in message
    assert "secret" not in html_error(client.post("/", data={"image": (io.BytesIO(catalog_photo), "a.jpg")}), 500)
    monkeypatch.undo()
    assert upload(client, catalog_photo).status_code == 200


# -- catalog images, health ----------------------------------------------------------------


def test_catalog_image_is_served_by_id_with_caching_headers(client, engine):
    row = engine.rows[3]
    # A file response must be closed, as a WSGI server does, or its file stays open.
    with client.get(f"/catalog/{row.id}/image") as response:
        assert response.status_code == 200
        assert response.data == Path(row.path).read_bytes()
        assert response.mimetype == "image/jpeg"
        assert response.headers["ETag"] == f'"{row.sha256}"'
        assert "public" in response.headers["Cache-Control"] and "max-age=3600" in response.headers["Cache-Control"]
    with client.get(f"/catalog/{row.id}/image", headers={"If-None-Match": response.headers["ETag"]}) as again:
        assert again.status_code == 304 and again.data == b""


@pytest.mark.parametrize(
    "attempt",
    [
        "../../../../etc/passwd",
        "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "//etc/passwd",
        "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "images/plain-red-000.jpg",  # a catalog file's own relative path is not an id
        "plain-red-000/../../../../etc/passwd",
    ],
)
def test_catalog_image_route_never_takes_a_path(client, attempt):
    response = client.get(f"/catalog/{attempt}/image")
    assert response.status_code in (404, 308), response.status_code
    assert b"root:" not in response.data
    assert not response.mimetype.startswith("image/")


def test_healthz_and_readyz(client, engine):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ready" and body["ready"] is True
    assert body["bundle"] == engine.bundle_id == engine.manifest.bundle_id
    assert body["items"] == engine.manifest.counts.items == len(engine.rows)
    assert body["backbone"]["kind"] == "resnet50" and body["backbone"]["input_size"] == 64
    assert body["reload_error"] is None


# -- escaping, odd ids, a small upload limit -----------------------------------------------


def test_titles_are_escaped(evil_app, evil_bundle):
    client = evil_app.test_client()
    rows = evil_app.extensions["live_bundle"].current().rows
    page = client.get(f"/items/{rows[0].id}").get_data(as_text=True)
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &#34;Tee&#34;" in page
    home = client.get("/").get_data(as_text=True)
    assert "<script>alert" not in home and "&lt;script&gt;" in home


def test_ids_with_url_syntax_work_on_every_route(evil_app):
    client = evil_app.test_client()
    quoted = quote(ODD_ID, safe="/")
    item = client.get(f"/items/{quoted}")
    assert item.status_code == 200
    assert "tees/red tee ?#%&amp;é" in item.get_data(as_text=True)
    answer = client.get(f"/api/v1/items/{quoted}/similar?k=2")
    assert answer.status_code == 200 and answer.get_json()["id"] == ODD_ID
    with client.get(f"/catalog/{quoted}/image") as image:
        assert image.status_code == 200
    # Links the pages build to it lead back to it.
    neighbors = client.get(
        f"/api/v1/items/{quote(evil_app.extensions['live_bundle'].current().rows[2].id)}/similar?k=100"
    )
    link = next(n["image_url"] for n in neighbors.get_json()["neighbors"] if n["id"] == ODD_ID)
    with client.get(link) as image:
        assert image.status_code == 200


def test_configured_upload_limit(evil_app, catalog_photo):
    client = evil_app.test_client()
    assert len(catalog_photo) < 50_000
    assert upload(client, catalog_photo, raw=True).status_code == 200
    message = error_of(upload(client, b"\xff" * 50_001, raw=True), 413, "payload_too_large")
    assert "0.05 MB" in message


def test_a_photo_too_large_to_travel_back_shows_its_attributes_without_buttons(evil_app):
    """Re-posting the photo must fit the upload limit; where it would not, the values are plain text."""
    client = evil_app.test_client()
    noise = np.random.default_rng(0).integers(0, 256, (110, 110, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    assert 36_000 < buffer.tell() < 40_000  # under the 50 kB limit, but not as base64 with the form
    response = form_post(client, "/", buffer.getvalue(), filename="noise.png")
    assert response.status_code == 200
    page = Page(response.get_data(as_text=True))
    assert page.hidden == [] and page.buttons == [] and len(page.cards) == 6
    assert [(f["tag"], f["data-column"]) for f in page.facets] == [("span", "label"), ("span", "colour")]


def test_chunked_uploads_are_held_to_the_limit_too(evil_app, catalog_photo):
    """A chunked body has no Content-Length: the limit must still give 413, not a cut-off image."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, evil_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def chunked(data: bytes) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=60)
        try:
            pieces = (data[i : i + 4096] for i in range(0, len(data), 4096))
            connection.request(
                "POST", "/api/v1/similar", body=pieces, headers={"Content-Type": "image/jpeg"}, encode_chunked=True
            )
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    try:
        assert chunked(catalog_photo)[0] == 200
        status, body = chunked(b"\xff" * 50_000)  # exactly at the limit: read, then refused as no image
        assert (status, body["error"]["code"]) == (400, "invalid_image")
        status, body = chunked(catalog_photo + b"\xff" * 50_000)
        assert (status, body["error"]["code"]) == (413, "payload_too_large")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# -- concurrency on a real server ----------------------------------------------------------


@contextlib.contextmanager
def serving(app):
    """Serves ``app`` on Werkzeug's threaded server at 127.0.0.1:<free port>; yields the base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="test-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def live_server(app):
    """The module's app on a real threaded server; yields the base URL."""
    with serving(app) as url:
        yield url


def _http(base: str, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": content_type} if content_type else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_concurrent_mixed_requests_are_all_answered_correctly(live_server, engine, image_files):
    photos = [Path(row.path).read_bytes() for row in engine.rows[::9]] + [
        image_files[name].read_bytes() for name in GOOD_IMAGES
    ]
    requests = []  # (method, path, body, content type, expected status, expected neighbours or None)
    for index, photo in enumerate(photos):
        k = 1 + index % 7
        requests.append(
            ("POST", f"/api/v1/similar?k={k}", photo, "image/jpeg", 200, engine.query(photo, k=k)["neighbors"])
        )
    for name in BAD_IMAGES:
        requests.append(("POST", "/api/v1/similar", image_files[name].read_bytes(), "image/png", 400, None))
    for row in engine.rows[::6]:
        requests.append(
            (
                "GET",
                f"/api/v1/items/{row.id}/similar?k=5",
                None,
                None,
                200,
                engine.similar_to_item(row.id, 5)["neighbors"],
            )
        )
    requests += [("GET", "/api/v1/items/nope/similar", None, None, 404, None)] * 4
    requests += [("POST", "/api/v1/similar?k=0", photos[0], "image/jpeg", 400, None)] * 4
    requests += [("POST", "/api/v1/similar", b"{}", "application/json", 415, None)] * 4
    requests += [("GET", "/readyz", None, None, 200, None)] * 4
    work = requests * 3
    random.Random(0).shuffle(work)

    def run(request):
        method, path, body, content_type, expected_status, expected = request
        status, data = _http(live_server, method, path, body, content_type)
        return request, status, data

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(run, work))
    assert len(results) == len(work)
    for (method, path, _body, _type, expected_status, expected), status, data in results:
        assert status < 500 and status == expected_status, (method, path, status, data[:200])
        if expected is not None:
            assert_same_neighbors(json.loads(data)["neighbors"], expected)


# -- a real browser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's chromium + chromium-driver) driven by Selenium."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip(
            "the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,1100",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_browser_upload_results_and_item_page(browser, live_server, engine):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(exist_ok=True)
    photo = engine.rows[40].path
    browser.get(live_server + "/")
    assert "Search by photo" in browser.title
    browser.find_element(By.CSS_SELECTOR, "input[type=file][name=image]").send_keys(photo)
    browser.find_element(By.CSS_SELECTOR, "form.upload button[type=submit]").click()
    wait = WebDriverWait(browser, 60)
    wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".result")))
    cards = browser.find_elements(By.CSS_SELECTOR, ".result .card")
    assert len(cards) == 6
    expected = engine.query(Path(photo).read_bytes(), k=6)
    assert (
        browser.find_element(By.CSS_SELECTOR, ".predicted-label").text.lower()
        == expected["predicted"]["label"]["label"]
    )
    # Every thumbnail really loaded (naturalWidth is 0 for a broken image).
    wait.until(
        lambda driver: all(
            driver.execute_script("return arguments[0].naturalWidth", img) > 0
            for img in driver.find_elements(By.CSS_SELECTOR, ".result .card img")
        )
    )
    browser.save_screenshot(str(ARTIFACTS / "webapp-results.png"))

    # Clicking the predicted colour re-posts the photo with that filter: only items of that colour.
    colour = expected["predicted"]["colour"]["label"]
    browser.find_element(By.CSS_SELECTOR, f'button.facet[value="colour:{colour}"]').click()
    wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".filter-bar")))
    narrowed = engine.query(Path(photo).read_bytes(), k=6, filters={"colour": colour})
    cards = browser.find_elements(By.CSS_SELECTOR, ".result .card")
    assert [
        card.find_element(By.CSS_SELECTOR, "a").get_attribute("href").rsplit("/items/", 1)[1] for card in cards
    ] == [n["id"] for n in narrowed["neighbors"]]
    for card in cards:
        card.find_element(By.CSS_SELECTOR, f'.chip.is-match[data-column="colour"][data-value="{colour}"]')

    first = narrowed["neighbors"][0]
    cards[0].find_element(By.CSS_SELECTOR, "a").click()
    wait.until(expected_conditions.url_contains(f"/items/{first['id']}"))
    assert browser.find_element(By.CSS_SELECTOR, "h1").text == engine.item(first["id"]).extra["title"]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".card")) == 6
    browser.save_screenshot(str(ARTIFACTS / "webapp-item.png"))

    browser.set_window_size(390, 900)  # a phone: nothing may stick out sideways
    for path, name in ((f"/items/{first['id']}", "webapp-item-phone.png"), ("/", "webapp-home-phone.png")):
        browser.get(live_server + path)
        assert browser.execute_script("return document.documentElement.scrollWidth") <= browser.execute_script(
            "return window.innerWidth"
        )
        browser.save_screenshot(str(ARTIFACTS / name))


# -- the serve command ---------------------------------------------------------------------


def _serve_args(**values):
    import argparse

    from webapp.cli import add_arguments

    parser = argparse.ArgumentParser(prog="recommender serve")
    add_arguments(parser)
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in values.items()]
    return parser.parse_args(flags)


def test_serve_flags_and_defaults():
    args = _serve_args()
    assert (args.bundle, args.host, args.port, args.development) == (None, "127.0.0.1", 8000, False)


def test_serve_fails_with_one_line_on_a_missing_bundle_or_a_busy_port(tmp_path, capsys, monkeypatch):
    import webapp
    from webapp.cli import run

    assert run(_serve_args(bundle=tmp_path / "missing", port=0)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: bundle not found: {tmp_path / 'missing'}"

    def must_not_load(config=None):
        raise AssertionError("a busy port must fail before the bundle is loaded")

    monkeypatch.setattr(webapp, "create_app", must_not_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert run(_serve_args(bundle=tmp_path, port=port)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: cannot listen on 127.0.0.1:{port}"


def test_serve_prints_its_url_and_serves(tiny_bundle, capsys, monkeypatch):
    import werkzeug.serving

    from webapp import serve_bundle

    servers = []
    make_server = werkzeug.serving.make_server

    def keep_server(*args, **kwargs):  # so the test can stop what serve() started
        servers.append(make_server(*args, **kwargs))
        return servers[-1]

    monkeypatch.setattr(werkzeug.serving, "make_server", keep_server)
    exit_codes = []
    thread = threading.Thread(target=lambda: exit_codes.append(serve_bundle(tiny_bundle, "127.0.0.1", 0)), daemon=True)
    thread.start()
    printed = ""
    deadline = time.monotonic() + 120
    while "open http://" not in printed and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
        printed += capsys.readouterr().out
    url = re.search(r"open (http://127\.0\.0\.1:\d+)/ ", printed).group(1)
    try:
        status, body = _http(url, "GET", "/readyz")
        assert status == 200 and json.loads(body)["bundle"] in printed
        assert _http(url, "GET", "/")[0] == 200
    finally:
        servers[0].shutdown()
        thread.join(30)
    assert exit_codes == [0]
