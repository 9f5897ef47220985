"""Attribute filters: parsing, mask semantics, and filtered search equal to brute force over the subset."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from recommender.errors import QueryError
from recommender.filters import AttributeIndex, parse_filters
from recommender.index import EXACT_SCAN_UP_TO, VectorIndex
from recommender.manifest import CatalogRecord


def as_records(rows: list[dict]) -> list[CatalogRecord]:
    """Catalog records of rows written as in catalog.jsonl (image, path and hash do not matter here)."""
    return [
        CatalogRecord(
            id=row["id"],
            image=row.get("image", ""),
            path="",
            sha256="",
            labels=row["labels"],
            tags=tuple(row["tags"]) if "tags" in row else None,
        )
        for row in rows
    ]


GENDERS = ("Women", "Men", "Unisex")
CATEGORIES = tuple(f"category-{i:02d}" for i in range(12))
TAGS = ("sale", "new", "eco", "limited")
RARE = "category-rare"


def brute_force_subset(vectors, queries, allowed, k):
    """(m, k) positions and distances of the nearest allowed vectors, padded with -1 / inf."""
    subset = np.flatnonzero(allowed)
    distances = np.sqrt(((queries[:, None, :].astype(np.float64) - vectors[subset][None, :, :]) ** 2).sum(-1))
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    positions = np.full((len(queries), k), -1, dtype=np.int64)
    found = np.full((len(queries), k), np.inf)
    positions[:, : order.shape[1]] = subset[order]
    found[:, : order.shape[1]] = np.take_along_axis(distances, order, axis=1)
    return positions, found


def make_rows(count: int, seed: int = 0) -> list[dict]:
    """Catalog rows as in catalog.jsonl: gender (3 values), category (12, uneven), tags (0-3)."""
    rng = np.random.default_rng(seed)
    category_weights = np.arange(1, len(CATEGORIES) + 1, dtype=float)
    category_weights /= category_weights.sum()
    rows = []
    for i in range(count):
        tags = sorted(rng.choice(TAGS, size=rng.integers(0, 4), replace=False).tolist())
        rows.append(
            {
                "id": f"item-{i}",
                "image": f"images/{i}.jpg",
                "labels": {
                    "gender": str(rng.choice(GENDERS)),
                    "category": str(rng.choice(CATEGORIES, p=category_weights)),
                },
                "extra": {},
                "tags": tags,
            }
        )
    for i, gender in enumerate(("Women", "Men", "Women")):  # a rare value: filters matching < k or no items
        rows[i]["labels"] = {"gender": gender, "category": RARE}
    return rows


@pytest.fixture(scope="module")
def catalog():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32)) * 3
    vectors = (centres[rng.integers(0, 20, 2000)] + rng.normal(size=(2000, 32))).astype(np.float32)
    rows = make_rows(len(vectors))
    queries = (vectors[rng.integers(0, len(vectors), 30)] + rng.normal(size=(30, 32))).astype(np.float32)
    return vectors, rows, AttributeIndex(as_records(rows), ["gender", "category"], "tags"), queries


@pytest.fixture(scope="module")
def indexes(catalog):
    vectors = catalog[0]
    return {kind: VectorIndex.build(vectors, kind, use_gpu=False) for kind in ("flat", "hnsw")}


def random_filters(rng, count: int) -> list[dict]:
    """Seeded filters over one to three columns with one or more values each."""
    choices = {"gender": GENDERS, "category": (*CATEGORIES, RARE), "tags": TAGS}
    filters = [{"category": RARE}, {"category": RARE, "gender": "Unisex"}, {"category": [RARE], "gender": "Women"}]
    for _ in range(count):
        columns = rng.choice(list(choices), size=rng.integers(1, 4), replace=False)
        filters.append(
            {
                str(c): rng.choice(choices[c], size=rng.integers(1, 3), replace=False).tolist()
                if rng.random() < 0.5
                else str(rng.choice(choices[c]))
                for c in columns
            }
        )
    return filters


# -- parse_filters ---------------------------------------------------------------------------


def test_parse_filters_forms():
    assert parse_filters(["gender=Women"], "=") == {"gender": ["Women"]}
    assert parse_filters(["gender:Women", " category : Sandals "], ":") == {
        "gender": ["Women"],
        "category": ["Sandals"],
    }
    # Split on the first separator only: values may contain it.
    assert parse_filters(["size=EU=38"], "=") == {"size": ["EU=38"]}
    assert parse_filters(["time:12:30"], ":") == {"time": ["12:30"]}
    # Repeated columns accumulate values (OR), without repeats, in the order given.
    assert parse_filters(["tags=sale", "gender=Men", "tags=new", "tags=sale", "gender=Women"], "=") == {
        "tags": ["sale", "new"],
        "gender": ["Men", "Women"],
    }
    assert parse_filters([], "=") == {} and parse_filters(None, "=") == {}


@pytest.mark.parametrize("item", ["gender", "=Women", "gender=", "  =  ", " gender :Women"])
def test_parse_filters_rejects_malformed_items(item):
    with pytest.raises(QueryError, match="malformed filter") as raised:
        parse_filters(["category=Shoes", item], "=")
    assert repr(item) in str(raised.value) and "COLUMN=VALUE" in str(raised.value)


# -- AttributeIndex --------------------------------------------------------------------------


def small_index() -> AttributeIndex:
    rows = [
        {"id": "a", "labels": {"gender": "Women", "category": "Sandals"}, "tags": ["sale", "new"]},
        {"id": "b", "labels": {"gender": "Women", "category": "Boots"}, "tags": []},
        {"id": "c", "labels": {"gender": "Men", "category": "Sandals"}, "tags": ["sale"]},
        {"id": "d", "labels": {"gender": "Men", "category": "Boots"}, "tags": ["new", "new"]},
        {"id": "e", "labels": {"gender": "Unisex", "category": "Sneakers"}},
    ]
    return AttributeIndex(as_records(rows), ["gender", "category"], "tags")


def test_columns_and_values():
    attributes = small_index()
    assert attributes.size == 5 and attributes.columns == ["gender", "category", "tags"]
    assert attributes.values("gender") == {"Men": 2, "Unisex": 1, "Women": 2}
    assert list(attributes.values("category")) == ["Boots", "Sandals", "Sneakers"]
    assert attributes.values("tags") == {"new": 2, "sale": 2}  # a repeated tag counts once
    with pytest.raises(QueryError, match="unknown filter column 'colour'"):
        attributes.values("colour")
    without_tags = AttributeIndex(as_records([{"id": "m", "labels": {"gender": "Men"}}]), ["gender"])
    assert without_tags.columns == ["gender"]


def test_mask_and_across_columns_or_within_one():
    attributes = small_index()
    assert attributes.mask({"gender": "Women"}).tolist() == [True, True, False, False, False]
    assert attributes.mask({"gender": ["Women", "Unisex"]}).tolist() == [True, True, False, False, True]
    assert attributes.mask({"gender": "Women", "category": "Sandals"}).tolist() == [True, False, False, False, False]
    assert attributes.mask({"gender": ["Women", "Men"], "category": ["Sandals", "Boots"]}).sum() == 4
    assert attributes.mask({"tags": "new"}).tolist() == [True, False, False, True, False]
    assert attributes.mask({"tags": ["new", "sale"]}).tolist() == [True, False, True, True, False]
    assert attributes.mask({"tags": "sale", "gender": "Men"}).tolist() == [False, False, True, False, False]
    assert attributes.mask({"gender": "Unisex", "tags": "sale"}).tolist() == [False] * 5
    assert attributes.mask({}).all() and attributes.mask(None).all()
    assert attributes.count({"category": "Boots"}) == 2 and attributes.count(None) == 5
    mask = attributes.mask({"gender": "Women"})
    mask[:] = False  # callers may change the mask they get: it is theirs
    assert attributes.count({"gender": "Women"}) == 2


def test_mask_matches_a_python_filter_on_random_rows(catalog):
    _, rows, attributes, _ = catalog
    for filters in random_filters(np.random.default_rng(3), 50):
        expected = []
        for row in rows:
            passes = True
            for column, values in filters.items():
                values = [values] if isinstance(values, str) else values
                held = row["tags"] if column == "tags" else [row["labels"][column]]
                passes &= any(value in held for value in values)
            expected.append(passes)
        assert attributes.mask(filters).tolist() == expected, filters


def test_unknown_column_lists_the_filterable_ones():
    with pytest.raises(QueryError) as raised:
        small_index().mask({"gendre": "Women"})
    message = str(raised.value)
    assert "unknown filter column 'gendre'" in message and "did you mean 'gender'" in message
    assert "filterable columns: gender, category, tags" in message


def test_unknown_value_names_the_column_and_suggests():
    attributes = small_index()
    with pytest.raises(QueryError) as raised:
        attributes.mask({"gender": "women"})
    message = str(raised.value)
    assert "unknown value 'women' for filter column 'gender'" in message
    assert "did you mean 'Women'" in message and "known values: Men, Unisex, Women" in message
    # An unknown value in a later column fails even when an earlier column matches nothing.
    with pytest.raises(QueryError, match="for filter column 'tags'"):
        attributes.mask({"gender": "Unisex", "tags": ["sale", "clearance"]})


def test_unknown_value_lists_at_most_ten_known_values(catalog):
    attributes = catalog[2]
    with pytest.raises(QueryError) as raised:
        attributes.mask({"category": "shoes"})
    message = str(raised.value)
    assert "category-09" in message and "category-10" not in message and "(13 in all)" in message


def test_empty_value_list_is_an_error():
    with pytest.raises(QueryError, match="no values given for filter column 'gender'"):
        small_index().mask({"gender": []})


# -- filtered search -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_filtered_search_equals_brute_force_over_the_subset(catalog, indexes, kind):
    vectors, _, attributes, queries = catalog
    index = indexes[kind]
    assert len(vectors) <= EXACT_SCAN_UP_TO  # every filter of this catalog takes the exact scan
    rng = np.random.default_rng(1)
    sizes = []
    for filters in random_filters(rng, 60):
        allowed = attributes.mask(filters)
        sizes.append(int(allowed.sum()))
        query = queries[rng.integers(0, len(queries))][None, :]
        result = index.search(query, 6, allowed=allowed)
        positions, distances = brute_force_subset(vectors, query, allowed, 6)
        assert np.array_equal(result.positions, positions), filters
        assert np.allclose(result.distances, distances, rtol=1e-4, atol=1e-3)
    # The random filters cover empty, fewer-than-k and large subsets.
    assert min(sizes) == 0 and any(0 < size < 6 for size in sizes) and max(sizes) > 500


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_few_or_no_allowed_items_pad_with_minus_one_and_inf(catalog, indexes, kind):
    vectors, _, _, queries = catalog
    index = indexes[kind]
    allowed = np.zeros(len(vectors), dtype=bool)
    result = index.search(queries[:3], 6, allowed=allowed)
    assert (result.positions == -1).all() and np.isinf(result.distances).all()
    assert result.positions.shape == (3, 6) and result.distances.dtype == np.float32
    allowed[[5, 1700, 42]] = True
    result = index.search(queries[:3], 6, allowed=allowed)
    positions, distances = brute_force_subset(vectors, queries[:3], allowed, 6)
    assert np.array_equal(result.positions, positions)
    assert (result.positions[:, 3:] == -1).all() and np.isinf(result.distances[:, 3:]).all()
    assert np.allclose(result.distances[:, :3], distances[:, :3], rtol=1e-4, atol=1e-3)


def test_batch_queries_and_k_beyond_the_catalog(catalog, indexes):
    vectors, _, attributes, queries = catalog
    allowed = attributes.mask({"gender": ["Women", "Unisex"], "tags": "eco"})
    for index in indexes.values():
        result = index.search(queries, 10, allowed=allowed)
        assert np.array_equal(result.positions, brute_force_subset(vectors, queries, allowed, 10)[0])
    small = VectorIndex.build(vectors[:4], "flat", use_gpu=False)
    allowed = np.array([True, False, True, True])
    result = small.search(queries[:1], 10, allowed=allowed)  # k is capped at the 4 items
    assert result.positions.shape == (1, 4) and result.positions[0, 3] == -1
    assert np.array_equal(result.positions, brute_force_subset(vectors[:4], queries[:1], allowed, 4)[0])


def test_everything_allowed_equals_unfiltered_flat(catalog, indexes):
    vectors, _, _, queries = catalog
    index = indexes["flat"]
    unfiltered = index.search(queries, 6)
    filtered = index.search(queries, 6, allowed=np.ones(len(vectors), dtype=bool))
    assert np.array_equal(filtered.positions, unfiltered.positions)
    assert np.allclose(filtered.distances, unfiltered.distances, rtol=1e-5)


def test_hnsw_graph_walk_above_the_switch_over(catalog):
    vectors, _, attributes, queries = catalog
    index = VectorIndex.build(vectors, "hnsw", use_gpu=False)
    allowed = attributes.mask({"gender": ["Women", "Men"]})  # about two thirds of the items
    assert index.filter_method(int(allowed.sum())) == "exact scan"
    index.exact_scan_up_to = 0  # what a catalog far larger than this one gets
    assert index.filter_method(int(allowed.sum())) == "hnsw + selector"
    result = index.search(queries, 6, allowed=allowed)
    assert allowed[result.positions].all()
    assert (np.diff(result.distances, axis=1) >= 0).all()
    exact = brute_force_subset(vectors, queries, allowed, 6)[0]
    recall = np.mean([len(set(a) & set(e)) / 6 for a, e in zip(result.positions, exact)])
    assert recall >= 0.9
    assert VectorIndex.build(vectors, "flat", use_gpu=False).filter_method(len(vectors)) == "exact scan"


def test_loaded_hnsw_index_filters_exactly(catalog, indexes, tmp_path):
    vectors, _, attributes, queries = catalog
    indexes["hnsw"].save(tmp_path / "hnsw.faiss")
    loaded = VectorIndex.load(tmp_path / "hnsw.faiss", use_gpu=False)
    allowed = attributes.mask({"category": ["category-00", "category-01"]})
    result = loaded.search(queries, 6, allowed=allowed)
    assert np.array_equal(result.positions, brute_force_subset(vectors, queries, allowed, 6)[0])


def test_concurrent_filtered_searches_agree_with_sequential_ones(catalog, indexes):
    vectors, _, attributes, queries = catalog
    filters = random_filters(np.random.default_rng(7), 40)
    masks = [attributes.mask(f) for f in filters]

    def one(i):
        index = indexes["hnsw" if i % 2 else "flat"]
        return index.search(queries[i % len(queries)][None, :], 6, allowed=masks[i]).positions

    sequential = [one(i) for i in range(len(masks))]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(one, range(len(masks))))
    assert all(np.array_equal(a, b) for a, b in zip(sequential, concurrent))


def test_bad_masks_are_refused(catalog, indexes):
    vectors, _, _, queries = catalog
    index = indexes["flat"]
    with pytest.raises(QueryError, match="bool mask"):
        index.search(queries[:1], 6, allowed=np.ones(len(vectors) - 1, dtype=bool))
    with pytest.raises(QueryError, match="bool mask"):
        index.search(queries[:1], 6, allowed=np.ones(len(vectors), dtype=np.int64))
