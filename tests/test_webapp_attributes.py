"""Web app on the hierarchy + tags bundle: filtered neighbours in the API, attribute filters on the pages."""

from __future__ import annotations

import base64
import dataclasses
import io
from pathlib import Path
from urllib.parse import quote, urlencode

import numpy as np
import pytest
from PIL import Image
from test_webapp import (  # noqa: F401  (browser is a fixture)
    ARTIFACTS,
    Page,
    assert_same_neighbors,
    browser,
    click,
    error_of,
    form_post,
    html_error,
    serving,
)

from recommender.images import content_hash, load_image
from webapp import create_app
from webapp.query_photo import CARRY_AS_SENT_UP_TO_BYTES, QueryPhoto

ITEM = "plain-red-003"


@pytest.fixture(scope="module")
def app(attribute_bundle):
    """The web app over the session's hierarchy + tags bundle."""
    return create_app({"bundle": attribute_bundle, "reload_interval_s": 3600})


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def photo(attribute_engine) -> bytes:
    """A catalog photo (a black stripes T-shirt)."""
    return Path(attribute_engine.item("stripes-black-002").path).read_bytes()


@pytest.fixture(scope="module")
def large_photo() -> bytes:
    """A noisy 800 x 800 JPEG well above the size that travels as sent; in no catalog."""
    rng = np.random.default_rng(3)
    pixels = np.clip(rng.normal(128, 60, (800, 800, 3)), 0, 255).astype(np.uint8)
    pixels[200:600, 250:550] = (200, 30, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    assert buffer.tell() > CARRY_AS_SENT_UP_TO_BYTES
    return buffer.getvalue()


def api_upload(client, data: bytes, params: list[tuple[str, str]] = (), fields: list[tuple[str, str]] = ()):
    """POSTs a photo to the API with query-string ``params`` and extra multipart ``fields``."""
    from werkzeug.datastructures import FileStorage, MultiDict
    from werkzeug.test import encode_multipart

    parts = MultiDict([("image", FileStorage(io.BytesIO(data), "photo.jpg", content_type="image/jpeg")), *fields])
    boundary, body = encode_multipart(parts)
    url = "/api/v1/similar" + (f"?{urlencode(params)}" if params else "")
    return client.post(url, data=body, content_type=f"multipart/form-data; boundary={boundary}")


def has(neighbor_or_row: dict, column: str, value: str) -> bool:
    """Whether an item holds ``value`` in a label column or among its tags."""
    if column == "tags":
        return value in neighbor_or_row["tags"]
    return neighbor_or_row["labels"][column] == value


# -- the API -------------------------------------------------------------------------------


@pytest.mark.parametrize("sent_as", ["query string", "form fields"])
def test_upload_filters_answer_like_the_engine(client, attribute_engine, photo, sent_as):
    filters = [("filter", "colour:red"), ("filter", "colour:blue"), ("filter", "tags:striped")]
    if sent_as == "query string":
        response = api_upload(client, photo, params=filters)
    else:
        response = api_upload(client, photo, fields=filters)
    assert response.status_code == 200, response.data
    body = response.get_json()
    direct = attribute_engine.query(photo, k=6, filters={"colour": ["red", "blue"], "tags": "striped"})
    assert list(body) == ["predicted", "hierarchy", "tags", "neighbors", "filter", "bundle"]
    assert (
        body["filter"]
        == direct["filter"]
        == {
            "applied": {"colour": ["red", "blue"], "tags": ["striped"]},
            "matching_items": 16,
            "complete": True,
        }
    )
    assert body["hierarchy"]["path"] == direct["hierarchy"]["path"]
    assert [t["tag"] for t in body["tags"]] == [t["tag"] for t in direct["tags"]]
    assert_same_neighbors(body["neighbors"], direct["neighbors"])
    for neighbor in body["neighbors"]:
        assert neighbor["labels"]["colour"] in ("red", "blue") and "striped" in neighbor["tags"]


def test_item_filters_answer_like_the_engine(client, attribute_engine):
    response = client.get(f"/api/v1/items/{ITEM}/similar?k=8&filter=department:prints&filter=tags:cool")
    assert response.status_code == 200
    body = response.get_json()
    direct = attribute_engine.similar_to_item(ITEM, 8, filters={"department": "prints", "tags": "cool"})
    assert body["filter"] == direct["filter"] and body["filter"]["complete"]
    assert body["tags"] == list(attribute_engine.item(ITEM).tags)
    assert_same_neighbors(body["neighbors"], direct["neighbors"])
    assert all(has(n, "department", "prints") and has(n, "tags", "cool") for n in body["neighbors"])


def test_match_predicted_keeps_the_predicted_values(client, attribute_engine, photo):
    response = api_upload(client, photo, params=[("match_predicted", "colour"), ("match_predicted", "family")])
    assert response.status_code == 200, response.data
    body = response.get_json()
    predicted = {column: body["predicted"][column]["label"] for column in ("colour", "family")}
    assert body["filter"]["applied"] == {column: [value] for column, value in predicted.items()}
    direct = attribute_engine.query(photo, k=6, match_predicted=["colour", "family"])
    assert body["filter"] == direct["filter"]
    assert_same_neighbors(body["neighbors"], direct["neighbors"])
    assert all(has(n, column, value) for n in body["neighbors"] for column, value in predicted.items())


def test_fewer_matches_than_k_say_so(client, attribute_engine, image_files, photo):
    # A photo outside the catalog: all 8 red plain T-shirts match, 10 were asked for.
    outside = image_files["rgb_jpeg"].read_bytes()
    body = api_upload(client, outside, params=[("k", "10"), ("filter", "label:plain"), ("filter", "colour:red")])
    body = body.get_json()
    assert len(body["neighbors"]) == 8
    assert body["filter"] == {
        "applied": {"label": ["plain"], "colour": ["red"]},
        "matching_items": 8,
        "complete": False,
        "note": "only 8 catalog items match the filter (asked for 10)",
    }
    # The item itself is one of the 8 and is left out.
    body = client.get(f"/api/v1/items/{ITEM}/similar?k=10&filter=label:plain&filter=colour:red").get_json()
    direct = attribute_engine.similar_to_item(ITEM, 10, filters={"label": "plain", "colour": "red"})
    assert body["filter"] == direct["filter"] and not body["filter"]["complete"]
    assert body["filter"]["note"] == "only 7 other catalog items match the filter (asked for 10)"
    assert_same_neighbors(body["neighbors"], direct["neighbors"])
    assert len(body["neighbors"]) == 7 and ITEM not in [n["id"] for n in body["neighbors"]]
    # No item is plain and striped: an empty list with the reason, not an error.
    body = api_upload(client, photo, params=[("filter", "label:plain"), ("filter", "tags:striped")]).get_json()
    assert body["neighbors"] == [] and body["filter"]["matching_items"] == 0 and not body["filter"]["complete"]


BAD_FILTERS = [
    ("filter=colour", "malformed filter 'colour': expected COLUMN:VALUE"),
    ("filter=colour:", "malformed filter"),
    ("filter=:red", "malformed filter"),
    ("filter=size:M", "unknown filter column 'size'"),
    ("filter=colur:red", "did you mean 'colour'?"),
    ("filter=colour:purple", "unknown value 'purple' for filter column 'colour'"),
    ("filter=colour:Red", "did you mean 'red'?"),
    ("filter=tags:sale", "unknown value 'sale' for filter column 'tags'"),
]


@pytest.mark.parametrize("query, message", BAD_FILTERS, ids=[query for query, _ in BAD_FILTERS])
def test_bad_filters_are_400_with_the_reason_on_both_endpoints(client, photo, query, message):
    uploaded = client.post(f"/api/v1/similar?{query}", data=photo, content_type="image/jpeg")
    assert message in error_of(uploaded, 400, "invalid_filter")
    assert message in error_of(client.get(f"/api/v1/items/{ITEM}/similar?{query}"), 400, "invalid_filter")


@pytest.mark.parametrize(
    "params, message",
    [
        ([("filter", "colour:red"), ("match_predicted", "colour")], "both as a filter and in match_predicted"),
        ([("match_predicted", "tags")], "'tags' is not a predicted label column"),
        ([("match_predicted", "size")], "the bundle predicts: label, colour, department, family"),
        ([("match_predicted", " ")], "match_predicted needs a label column name"),
    ],
)
def test_bad_match_predicted_is_400(client, photo, params, message):
    assert message in error_of(api_upload(client, photo, params=params), 400, "invalid_filter")
    assert message in error_of(api_upload(client, photo, fields=params), 400, "invalid_filter")


def test_match_predicted_on_an_item_is_400(client):
    message = error_of(client.get(f"/api/v1/items/{ITEM}/similar?match_predicted=colour"), 400, "invalid_filter")
    assert "uploaded photo only" in message


# -- the results page ----------------------------------------------------------------------


def test_results_page_shows_every_attribute_as_a_filter(client, attribute_engine, photo):
    response = form_post(client, "/", photo)
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    page = Page(html)
    direct = attribute_engine.query(photo, k=6)
    predicted = direct["predicted"]
    path = direct["hierarchy"]["path"]
    assert path == [predicted[level]["label"] for level in ("department", "family", "label")]
    assert len(direct["tags"]) >= 1

    def percent(probability: float) -> str:
        return f"{probability * 100:.0f}%"

    # The hierarchy path first, in order, then the other heads, then the tags; all buttons.
    expected = [(level, value) for level, value in zip(("department", "family", "label"), path)]
    expected += [("colour", predicted["colour"]["label"])]
    expected += [("tags", tag["tag"]) for tag in direct["tags"]]
    assert [(f["data-column"], f["data-value"]) for f in page.facets] == expected
    for column, value in expected:
        facet = page.facet(column, value)
        assert facet["tag"] == "button" and facet["name"] == "toggle" and facet["value"] == f"{column}:{value}"
        assert facet["aria-pressed"] == "false"
        probability = (
            next(t["probability"] for t in direct["tags"] if t["tag"] == value)
            if column == "tags"
            else predicted[column]["probability"]
        )
        assert facet["text"] == f"{value} {percent(probability)}"
    assert "department › family › label" in html
    assert f"whole path {percent(direct['hierarchy']['probability'])}" in html
    # The photo travels in the form, nothing is kept on the server.
    assert dict(page.hidden) == {"query_image": base64.b64encode(photo).decode(), "query_sha256": content_hash(photo)}
    assert page.card_ids == [n["id"] for n in direct["neighbors"]] and page.active == []


@pytest.mark.parametrize("column", ["colour", "tags", "department"])
def test_clicking_an_attribute_narrows_the_neighbours(client, attribute_engine, photo, column):
    page = Page(form_post(client, "/", photo).get_data(as_text=True))
    direct = attribute_engine.query(photo, k=6)
    value = direct["tags"][0]["tag"] if column == "tags" else direct["predicted"][column]["label"]

    narrowed = Page(click(client, page, "toggle", f"{column}:{value}").get_data(as_text=True))
    expected = attribute_engine.query(photo, k=6, filters={column: value})
    assert narrowed.card_ids == [n["id"] for n in expected["neighbors"]]
    assert len(narrowed.cards) == 6 and all((column, value) in chips for _, chips in narrowed.cards)
    assert all(has(n, column, value) for n in expected["neighbors"])
    assert narrowed.active == [(column, value)]
    assert narrowed.facet(column, value)["aria-pressed"] == "true"
    assert ("filter", f"{column}:{value}") in narrowed.hidden

    # A second attribute narrows further (AND), the active filters stay.
    colour = direct["predicted"]["colour"]["label"]
    label = direct["predicted"]["label"]["label"]
    other, other_value = ("label", label) if column == "colour" else ("colour", colour)
    both = Page(click(client, narrowed, "toggle", f"{other}:{other_value}").get_data(as_text=True))
    expected = attribute_engine.query(photo, k=6, filters={column: value, other: other_value})
    assert both.card_ids == [n["id"] for n in expected["neighbors"]]
    assert set(both.active) == {(column, value), (other, other_value)}

    # Removing one, then clearing all.
    removed = Page(click(client, both, "remove", f"{other}:{other_value}").get_data(as_text=True))
    assert removed.active == [(column, value)] and removed.card_ids == narrowed.card_ids
    cleared = Page(click(client, both, "clear", "1").get_data(as_text=True))
    assert cleared.active == [] and cleared.card_ids == [n["id"] for n in direct["neighbors"]]
    # Clicking an active value again removes it.
    again = Page(click(client, narrowed, "toggle", f"{column}:{value}").get_data(as_text=True))
    assert again.active == [] and again.card_ids == cleared.card_ids


def test_a_second_value_of_one_column_replaces_the_first(client, attribute_engine, photo):
    """Tags are ORed by the engine; on the page every click narrows or switches, never widens."""
    page = Page(form_post(client, "/", photo).get_data(as_text=True))
    tags = [t["tag"] for t in attribute_engine.query(photo, k=6)["tags"]]
    assert len(tags) >= 2, tags
    first = Page(click(client, page, "toggle", f"tags:{tags[0]}").get_data(as_text=True))
    second = Page(click(client, first, "toggle", f"tags:{tags[1]}").get_data(as_text=True))
    assert second.active == [("tags", tags[1])]
    expected = attribute_engine.query(photo, k=6, filters={"tags": tags[1]})
    assert second.card_ids == [n["id"] for n in expected["neighbors"]]


def test_a_click_can_be_answered_by_another_worker(client, attribute_bundle, attribute_engine, photo):
    """Nothing is kept per user: a separately started app (another gunicorn worker) answers the click."""
    page = Page(form_post(client, "/", photo).get_data(as_text=True))
    colour = attribute_engine.query(photo, k=6)["predicted"]["colour"]["label"]
    other_worker = create_app({"bundle": attribute_bundle, "reload_interval_s": 3600}).test_client()
    narrowed = Page(click(other_worker, page, "toggle", f"colour:{colour}").get_data(as_text=True))
    expected = attribute_engine.query(photo, k=6, filters={"colour": colour})
    assert narrowed.card_ids == [n["id"] for n in expected["neighbors"]]


def test_a_catalog_photo_stays_out_of_its_own_narrowed_neighbours(client, attribute_engine, photo):
    page = Page(form_post(client, "/", photo).get_data(as_text=True))
    own = attribute_engine.item("stripes-black-002")
    narrowed = Page(click(client, page, "toggle", f"colour:{own.labels['colour']}").get_data(as_text=True))
    assert narrowed.cards and own.id not in narrowed.card_ids


def test_a_large_upload_travels_as_the_model_input_and_answers_the_same(client, attribute_engine, large_photo):
    page = Page(form_post(client, "/", large_photo).get_data(as_text=True))
    carried = base64.b64decode(dict(page.hidden)["query_image"])
    assert carried.startswith(b"\x89PNG") and len(carried) < len(large_photo) / 4
    assert dict(page.hidden)["query_sha256"] == content_hash(large_photo)
    size = attribute_engine.backbone.input_size
    assert np.array_equal(load_image(carried, size), load_image(large_photo, size))

    direct = attribute_engine.query(large_photo, k=6)
    assert page.card_ids == [n["id"] for n in direct["neighbors"]]
    colour = direct["predicted"]["colour"]["label"]
    narrowed = Page(click(client, page, "toggle", f"colour:{colour}").get_data(as_text=True))
    assert narrowed.card_ids == [
        n["id"] for n in attribute_engine.query(large_photo, 6, filters={"colour": colour})["neighbors"]
    ]
    cleared = Page(click(client, narrowed, "clear", "1").get_data(as_text=True))
    assert cleared.card_ids == page.card_ids


def test_a_carried_photo_may_be_as_large_as_the_upload_limit(client, attribute_engine, large_photo):
    """Form fields are held to the upload limit, not Werkzeug's 500 kB default."""
    encoded = base64.b64encode(large_photo).decode()
    assert len(encoded) > 500_000
    page = Page("")
    page.hidden = [("query_image", encoded), ("query_sha256", content_hash(large_photo))]
    page.buttons = [{"name": "toggle", "value": "colour:red"}]
    response = click(client, page, "toggle", "colour:red")
    assert response.status_code == 200, response.data[-300:]
    expected = attribute_engine.query(large_photo, k=6, filters={"colour": "red"})
    assert Page(response.get_data(as_text=True)).card_ids == [n["id"] for n in expected["neighbors"]]


def test_query_photo_keeps_small_uploads_and_the_upload_hash(attribute_engine, photo, large_photo):
    size, limit = attribute_engine.backbone.input_size, attribute_engine.max_pixels
    small = QueryPhoto.from_upload(photo, size, limit)
    assert small.data == photo and small.image_bytes().sha256 == content_hash(photo)
    large = QueryPhoto.from_upload(large_photo, size, limit)
    assert large.data != large_photo and large.image_bytes().sha256 == content_hash(large_photo)
    assert QueryPhoto.from_form(large.form_fields()) == large


def test_fewer_matches_show_the_note_on_both_pages(app, client, attribute_engine, photo, monkeypatch):
    monkeypatch.setitem(app.config, "WEB", dataclasses.replace(app.config["WEB"], default_k=10))
    own = attribute_engine.item("stripes-black-002").labels
    page = Page(form_post(client, "/", photo).get_data(as_text=True))
    narrowed = click(client, page, "toggle", f"colour:{own['colour']}")
    both = click(client, Page(narrowed.get_data(as_text=True)), "toggle", f"label:{own['label']}")
    html = both.get_data(as_text=True)
    assert len(Page(html).cards) == 7  # 8 black stripes T-shirts, the photo's own item left out
    assert "Only 7 other catalog items match the filter (asked for 10)." in html and 'class="note"' in html

    item = client.get(f"/items/{ITEM}?filter=label:plain&filter=colour:red").get_data(as_text=True)
    assert len(Page(item).cards) == 7 and "Only 7 other catalog items match the filter (asked for 10)." in item
    nothing = client.get(f"/items/{ITEM}?filter=label:plain&filter=tags:striped").get_data(as_text=True)
    assert Page(nothing).cards == [] and "No other catalog item has all of these attributes." in nothing
    assert "No catalog item matches the filter (asked for 10)." in nothing


@pytest.mark.parametrize(
    "fields, message",
    [
        ([("query_image", "not base64!"), ("query_sha256", "0" * 64), ("toggle", "colour:red")], "damaged"),
        ([("query_image", ""), ("query_sha256", "0" * 64)], "damaged"),
        ([("query_sha256", "0" * 64)], "Choose a photo first."),
        ([("query_image", "{photo}"), ("query_sha256", "xyz")], "damaged"),
        ([("query_image", "{photo}"), ("query_sha256", "{sha}"), ("toggle", "colour")], "malformed filter"),
        ([("query_image", "{photo}"), ("query_sha256", "{sha}"), ("toggle", "colour:pink")], "unknown value 'pink'"),
        ([("query_image", "{photo}"), ("query_sha256", "{sha}"), ("filter", "size:M")], "unknown filter column"),
    ],
)
def test_a_damaged_results_form_shows_the_upload_form_with_the_reason(client, photo, fields, message):
    values = {"{photo}": base64.b64encode(photo).decode(), "{sha}": content_hash(photo)}
    page = Page("")
    page.hidden = [(name, values.get(value, value)) for name, value in fields]
    page.buttons = [{"name": name, "value": value} for name, value in page.hidden]
    html = html_error(click(client, page, *page.hidden[-1]), 400)
    assert message in html.replace("&#39;", "'") and 'type="file"' in html and 'role="alert"' in html


# -- the item page -------------------------------------------------------------------------


def test_item_page_shows_its_attributes_as_filter_links(client, attribute_engine):
    row = attribute_engine.item(ITEM)
    page = Page(client.get(f"/items/{ITEM}").get_data(as_text=True))
    expected = [(level, row.labels[level]) for level in ("department", "family", "label")]
    expected += [("colour", row.labels["colour"])] + [("tags", tag) for tag in row.tags]
    assert [(f["data-column"], f["data-value"]) for f in page.facets] == expected
    assert all(f["tag"] == "a" and f["text"] == f["data-value"] for f in page.facets)
    assert page.facet("colour", "red")["href"] == f"/items/{ITEM}?filter=colour:red#similar"

    narrowed = Page(client.get(page.facet("colour", "red")["href"]).get_data(as_text=True))
    expected = attribute_engine.similar_to_item(ITEM, 6, filters={"colour": "red"})
    assert narrowed.card_ids == [n["id"] for n in expected["neighbors"]]
    assert all(("colour", "red") in chips for _, chips in narrowed.cards)
    assert narrowed.active == [("colour", "red")]
    # Another value keeps the first (AND); clicking an active one removes it.
    family = narrowed.facet("family", row.labels["family"])
    assert family["href"] == f"/items/{ITEM}?filter=colour:red&filter=family:solid#similar"
    assert narrowed.facet("colour", "red")["href"] == f"/items/{ITEM}#similar"
    both = Page(client.get(family["href"]).get_data(as_text=True))
    expected = attribute_engine.similar_to_item(ITEM, 6, filters={"colour": "red", "family": "solid"})
    assert both.card_ids == [n["id"] for n in expected["neighbors"]]


def test_item_page_with_a_bad_filter_is_a_friendly_400(client):
    assert "malformed filter" in html_error(client.get(f"/items/{ITEM}?filter=colour"), 400)
    page = html_error(client.get(f"/items/{ITEM}?filter=colour:{quote('<b>pink</b>')}"), 400)
    assert "unknown value" in page and "<b>pink" not in page


# -- a real browser ------------------------------------------------------------------------


def test_browser_narrows_by_a_tag_and_a_colour(browser, app, attribute_engine, photo):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(exist_ok=True)
    path = attribute_engine.item("stripes-black-002").path
    direct = attribute_engine.query(photo, k=6)
    tag = direct["tags"][0]["tag"]
    wait = WebDriverWait(browser, 60)

    def cards_have(column: str, value: str) -> list:
        cards = browser.find_elements(By.CSS_SELECTOR, ".result .card, #similar .card")
        assert len(cards) == 6
        for card in cards:
            card.find_element(By.CSS_SELECTOR, f'.chip.is-match[data-column="{column}"][data-value="{value}"]')
        return cards

    with serving(app) as base:
        browser.set_window_size(1280, 1100)
        browser.get(base + "/")
        browser.find_element(By.CSS_SELECTOR, "input[type=file][name=image]").send_keys(path)
        browser.find_element(By.CSS_SELECTOR, "form.upload button[type=submit]").click()
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".result .facets")))
        path_shown = [e.get_attribute("data-value") for e in browser.find_elements(By.CSS_SELECTOR, ".path .facet")]
        assert path_shown == direct["hierarchy"]["path"]

        browser.find_element(By.CSS_SELECTOR, f'button.facet[data-column="tags"][data-value="{tag}"]').click()
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".filter-bar")))
        cards_have("tags", tag)
        expected = attribute_engine.query(photo, k=6, filters={"tags": tag})["neighbors"]
        shown = [
            c.get_attribute("href").rsplit("/items/", 1)[1]
            for c in browser.find_elements(By.CSS_SELECTOR, ".result .card a")
        ]
        assert shown == [n["id"] for n in expected]
        browser.save_screenshot(str(ARTIFACTS / "webapp-filtered.png"))

        browser.set_window_size(390, 900)  # a phone: the attribute buttons wrap, nothing sticks out
        assert browser.execute_script("return document.documentElement.scrollWidth") <= browser.execute_script(
            "return window.innerWidth"
        )
        browser.save_screenshot(str(ARTIFACTS / "webapp-filtered-phone.png"))
        browser.set_window_size(1280, 1100)

        # The product page: its colour is a link that narrows its own similar items.
        browser.find_element(By.CSS_SELECTOR, ".result .card a").click()
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".product .facets")))
        item_id = browser.current_url.rsplit("/items/", 1)[1]
        colour = attribute_engine.item(item_id).labels["colour"]
        browser.find_element(By.CSS_SELECTOR, f'a.facet[data-column="colour"][data-value="{colour}"]').click()
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".filter-bar")))
        cards_have("colour", colour)
        browser.save_screenshot(str(ARTIFACTS / "webapp-item-filtered.png"))
