"""Shop data: title, price and URL columns from the catalog to the answers and the cards; unknown ids.

One small bundle of the generated catalog is built here with the shop's own column names
(``--title-column name --price-column cost --url-column link``); its features come from the
session's feature store and it trains two epochs: these tests are about what the bundle
carries, not what it learns.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest

from recommender.catalog import DisplayColumns, read_catalog
from recommender.errors import BundleError, CatalogError, UnknownItemError
from recommender.manifest import Manifest

EVIL_TITLE = "<script>alert('x')</script> Tee"
#: Product URLs no page may turn into a link (browsers drop the tab and read ``javascript:``).
UNSAFE_URLS = ("javascript:alert(1)", "java\tscript:alert(2)", "data:text/html,<b>x</b>", "/relative/page", "https://")


def shop_rows(generated_catalog: Path) -> list[dict]:
    """The generated catalog's rows with a shop's columns: ``name``, ``cost``, ``link``.

    The ``title`` column stays, so the bundle shows ``name`` only if ``--title-column`` is
    obeyed. Row 0 has a hostile name, rows 0..4 unsafe links, row 5 neither price nor link.
    """
    with generated_catalog.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for position, row in enumerate(rows):
        row["name"] = f"Shop name of {row['id']}"
        row["cost"] = f"{10 + position}.99 EUR"
        row["link"] = f"https://shop.example/p/{row['id']}?ref=similar&size=m"
    rows[0]["name"] = EVIL_TITLE
    for row, url in zip(rows, UNSAFE_URLS):
        row["link"] = url
    rows[5]["cost"] = rows[5]["link"] = ""
    return rows


@pytest.fixture(scope="module")
def shop_catalog(generated_catalog) -> Path:
    """``shop.csv`` beside the generated catalog (same photos, so the same feature-store entries)."""
    rows = shop_rows(generated_catalog)
    path = generated_catalog.parent / "shop.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def shop_bundle(shop_catalog, tiny_config, tmp_path_factory) -> Path:
    from indexer.build import build_bundle

    config = replace(
        tiny_config,
        title_column="name",
        price_column="cost",
        url_column="link",
        train=replace(tiny_config.train, max_epochs=2, baseline=False),
    )
    out = tmp_path_factory.mktemp("bundles") / "shop"
    build_bundle(shop_catalog, out, config)
    return out


@pytest.fixture(scope="module")
def shop_app(shop_bundle):
    from webapp import create_app

    # Every item on the demo page, so every card (hostile ones included) is rendered.
    return create_app({"bundle": shop_bundle, "reload_interval_s": 3600, "sample_items": 96})


@pytest.fixture(scope="module")
def shop_engine(shop_app):
    """The engine the app loaded (``load_bundle`` of the shop bundle), to compare pages with."""
    return shop_app.extensions["live_bundle"].current()


@pytest.fixture(scope="module")
def expected(generated_catalog) -> dict[str, dict]:
    """id -> the shop row as written."""
    return {row["id"]: row for row in shop_rows(generated_catalog)}


# -- the build ------------------------------------------------------------------------------


def test_display_columns_are_recorded_and_kept_in_extras(shop_engine, expected):
    catalog = shop_engine.manifest.catalog
    assert (catalog.title_column, catalog.price_column, catalog.url_column) == ("name", "cost", "link")
    for row in shop_engine.rows:
        assert {key: row.extra[key] for key in ("name", "cost", "link")} == {
            key: expected[row.id][key] for key in ("name", "cost", "link")
        }


def test_the_title_column_defaults_to_title_when_the_catalog_has_one(generated_catalog, tmp_path):
    read = read_catalog(generated_catalog, id_column="id", label_columns=["label"])
    assert read.display == DisplayColumns(title="title")
    plain = tmp_path / "plain.csv"
    plain.write_text("file,label\nimages/a.jpg,shirt\n")
    assert read_catalog(plain).display == DisplayColumns()


def test_a_display_column_that_is_also_a_label_column_is_still_in_extras(generated_catalog):
    read = read_catalog(generated_catalog, id_column="id", label_columns=["label"], display=DisplayColumns(title="id"))
    assert read.rows[0].extra["id"] == read.rows[0].id


@pytest.mark.parametrize("role", ["title", "price", "url"])
def test_a_missing_display_column_is_one_catalog_error_naming_its_flag(shop_catalog, role):
    with pytest.raises(CatalogError, match=rf"no column 'nope' for --{role}-column; the header has: id, file"):
        read_catalog(shop_catalog, id_column="id", display=DisplayColumns(**{role: "nope"}))


def test_a_display_column_needs_a_csv_catalog(tmp_path):
    (tmp_path / "shirt").mkdir()
    (tmp_path / "shirt" / "a.jpg").write_bytes(b"x")
    with pytest.raises(CatalogError, match="--url-column needs a CSV catalog"):
        read_catalog(tmp_path, display=DisplayColumns(url="link"))


def test_the_cli_reports_a_missing_column_as_one_error_line(shop_catalog, tmp_path, capsys):
    from recommender.cli import main

    code = main(["build", "--catalog", str(shop_catalog), "--out", str(tmp_path / "b"), "--id-column", "id",
                 "--weights", "none", "--image-size", "64", "--price-column", "price"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: ") and "no column 'price' for --price-column" in err
    assert not (tmp_path / "b").exists()


def test_the_flags_reach_the_build_config():
    from indexer.commands.flags import build_config_from_args
    from recommender.cli import make_parser

    args = make_parser().parse_args(
        ["build", "--catalog", "c.csv", "--out", "o", "--title-column", "name", "--price-column", "cost",
         "--url-column", "link"]
    )  # fmt: skip
    config = build_config_from_args(args)
    assert (config.title_column, config.price_column, config.url_column) == ("name", "cost", "link")


# -- the manifest ---------------------------------------------------------------------------


def _manifest_json(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))


def test_the_manifest_round_trips_the_display_columns_and_validates_them(shop_bundle):
    payload = _manifest_json(shop_bundle)
    assert Manifest.from_json(payload).to_json()["catalog"] == payload["catalog"]
    payload["catalog"]["price_column"] = 5
    with pytest.raises(BundleError, match="catalog.price_column: expected a string, got 5"):
        Manifest.from_json(payload)


def test_a_bundle_from_before_the_display_columns_shows_its_title_column(engine):
    """Older manifests name no display columns: they read, and a ``title`` column is the title.

    The engine is the session's, over the same files, with the older manifest (no second load).
    """
    from recommender.engine import Recommender

    payload = _manifest_json(engine.path)
    for key in ("title_column", "price_column", "url_column"):
        payload["catalog"].pop(key)
    manifest = Manifest.from_json(payload)
    assert (manifest.catalog.title_column, manifest.catalog.price_column, manifest.catalog.url_column) == (None,) * 3
    parts = (engine.backbone, engine.runner, engine.embedding_scaler, engine.index, engine.rows, engine.label_space)
    engine = Recommender(engine.path, manifest, *parts)
    neighbors = engine.similar_to_item(engine.rows[0].id, k=3)["neighbors"]
    assert [n["title"] for n in neighbors] == [engine.item(n["id"]).extra["title"] for n in neighbors]
    assert all("price" not in n and "url" not in n for n in neighbors)


# -- the engine and the API -----------------------------------------------------------------


def _check_neighbors(neighbors: list[dict], expected: dict[str, dict]) -> None:
    assert neighbors
    for neighbor in neighbors:
        row = expected[neighbor["id"]]
        assert neighbor["title"] == row["name"]
        assert neighbor["price"] == (row["cost"] or None)
        assert neighbor["url"] == (row["link"] or None)  # as written: the API is data, pages check links


def test_engine_neighbours_carry_title_price_and_url(shop_engine, expected):
    _check_neighbors(shop_engine.similar_to_item(shop_engine.rows[3].id, k=100)["neighbors"], expected)
    _check_neighbors(shop_engine.query(shop_engine.rows[7].path, k=10)["neighbors"], expected)


def test_api_neighbours_carry_title_price_and_url(shop_app, shop_engine, expected):
    client = shop_app.test_client()
    item = client.get(f"/api/v1/items/{shop_engine.rows[3].id}/similar?k=100")
    assert item.status_code == 200
    assert len(item.get_json()["neighbors"]) == 95
    _check_neighbors(item.get_json()["neighbors"], expected)
    photo = Path(shop_engine.rows[7].path).read_bytes()
    upload = client.post("/api/v1/similar?k=10", data={"image": (io.BytesIO(photo), "p.jpg")})
    assert upload.status_code == 200
    _check_neighbors(upload.get_json()["neighbors"], expected)


def test_an_unknown_id_is_a_typed_error_and_a_404(shop_engine, shop_app):
    import recommender

    assert recommender.UnknownItemError is UnknownItemError
    with pytest.raises(UnknownItemError, match="no catalog item with id 'nope'") as caught:
        shop_engine.similar_to_item("nope")
    assert isinstance(caught.value, KeyError)  # code that caught the bare KeyError still does
    client = shop_app.test_client()
    answer = client.get("/api/v1/items/nope/similar")
    assert answer.status_code == 404 and answer.get_json()["error"]["code"] == "unknown_item"
    assert client.get("/items/nope").status_code == 404


# -- the pages ------------------------------------------------------------------------------


class CardParser(HTMLParser):
    """Collects each ``li.card``: its title, price, and the attributes of every link in it."""

    def __init__(self):
        super().__init__()
        self.cards: list[dict] = []
        self.links: list[dict] = []  # every <a> on the page
        self._field: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "li" and "card" in classes:
            self.cards.append({"title": "", "price": "", "links": []})
        if tag == "a":
            self.links.append(attributes)
            if self.cards:
                self.cards[-1]["links"].append(attributes)
        if self.cards and tag == "h3" and "card-title" in classes:
            self._field = "title"
        if self.cards and tag == "p" and "price" in classes:
            self._field = "price"

    def handle_endtag(self, tag):
        if tag in ("h3", "p"):
            self._field = None

    def handle_data(self, data):
        if self._field:
            self.cards[-1][self._field] += data


def parse(html: str) -> CardParser:
    parser = CardParser()
    parser.feed(html)
    return parser


def test_cards_show_title_and_price_and_link_only_to_http_urls(shop_app, shop_engine, expected):
    page = shop_app.test_client().get("/").get_data(as_text=True)
    cards = parse(page).cards
    assert len(cards) == len(shop_engine.rows) == 96
    by_title = {card["title"]: card for card in cards}
    for row in shop_engine.rows:
        shop = expected[row.id]
        card = by_title[shop["name"]]  # the shop's name, never the file path or the title column
        assert card["price"] == shop["cost"]
        shop_links = [link for link in card["links"] if "card-shop" in (link.get("class") or "")]
        if shop["link"].startswith("https://shop.example/"):
            assert [link["href"] for link in shop_links] == [shop["link"]]
            assert "noopener" in shop_links[0]["rel"].split() and shop_links[0]["target"] == "_blank"
        else:
            assert shop_links == []
    assert not {row.image for row in shop_engine.rows} & set(by_title)
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; Tee" in page
    assert "&amp;size=m" in page  # the URL is escaped in its attribute


def test_no_page_links_to_an_unsafe_url(shop_app, shop_engine):
    client = shop_app.test_client()
    pages = [client.get("/").get_data(as_text=True)]
    pages += [client.get(f"/items/{row.id}").get_data(as_text=True) for row in shop_engine.rows[:6]]
    for html in pages:
        hrefs = [link.get("href") or "" for link in parse(html).links]
        assert all(href.startswith(("/", "#", "https://shop.example/")) for href in hrefs), hrefs
        assert "javascript:" not in html and "<script>alert" not in html


def test_the_item_page_shows_title_price_and_a_shop_link(shop_app, shop_engine, expected):
    row = shop_engine.rows[10]
    shop = expected[row.id]
    html = shop_app.test_client().get(f"/items/{row.id}").get_data(as_text=True)
    assert f"<h1>{shop['name']}</h1>" in html and f'<p class="price">{shop["cost"]}</p>' in html
    links = [link for link in parse(html).links if link.get("href") == shop["link"]]  # each item's own URL
    assert len(links) == 1 and "noopener" in links[0]["rel"].split()
    assert f"<dt>{shop_engine.title_column}</dt>" not in html  # shown once, as the title, not again as a detail
    evil = shop_app.test_client().get(f"/items/{shop_engine.rows[0].id}").get_data(as_text=True)
    assert "<h1>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; Tee</h1>" in evil


# -- the README's Python example ------------------------------------------------------------


def test_the_readme_python_example(tiny_bundle, generated_catalog, capsys):
    """The code of README "From Python", verbatim but for the bundle, photo and id.

    (The same lines as the README draft; kept here rather than parsed out of the README,
    so a README edit cannot silently turn this test into nothing.)
    """
    bundle, photo = str(tiny_bundle), str(generated_catalog.parent / "images" / "dots-blue-003.jpg")
    item_id = "stripes-red-001"

    from recommender import UnknownItemError, load_bundle

    engine = load_bundle(bundle)  # verifies, loads model + index once
    answer = engine.query(photo, k=6)  # a path, bytes or a binary file object
    for neighbor in answer["neighbors"]:
        print(neighbor["id"], neighbor["title"], round(neighbor["distance"], 2))
    panel = engine.similar_to_item(item_id, k=6)  # the item's stored embedding, no forward pass
    print(panel["neighbors"][0]["title"])
    try:
        engine.similar_to_item("no-such-sku")
    except UnknownItemError as error:
        print(error)  # no catalog item with id 'no-such-sku'

    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 8 and printed[-1] == "no catalog item with id 'no-such-sku'"
    first = answer["neighbors"][0]
    assert printed[0] == f"{first['id']} {engine.item(first['id']).extra['title']} {round(first['distance'], 2)}"
    assert printed[6] == engine.item(panel["neighbors"][0]["id"]).extra["title"]


# -- the nightly rebuild --------------------------------------------------------------------


def test_a_new_price_alone_makes_the_rebuild_publish_without_retraining(tmp_path):
    """A changed title, price or URL is a change (a new bundle), not a reason to retrain."""
    from indexer.build import ClassifierReuse
    from indexer.rebuild import decide_retrain, diff_catalog
    from recommender.catalog import CatalogRow
    from recommender.manifest import CatalogRecord

    def row(item_id: str, cost: str) -> CatalogRow:
        extra = {"name": f"Tee {item_id}", "cost": cost}
        return CatalogRow(id=item_id, image=f"{item_id}.jpg", path=tmp_path, labels={"label": "tee"}, extra=extra)

    current = [CatalogRecord.from_row(r, r.id, with_tags=False, size=1) for r in (row("x", "9.99"), row("y", "5"))]
    changes = diff_catalog(current, [row("x", "7.99"), row("y", "5")], ["x", "y"])
    assert changes.redescribed == ["x"] and changes.unchanged == 1 and changes.any
    assert changes.counts()["redescribed"] == 1
    reuse = ClassifierReuse(True, same_labels=True)
    assert decide_retrain("auto", changes, reuse, 0.2, 2) == (
        False,
        "0.0% of the catalog changed (threshold 20%): classifier reused",
    )
