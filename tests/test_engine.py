"""Query engine on the session's tiny bundle: answers, self-exclusion, agreement with brute force."""

from __future__ import annotations

import numpy as np
import pytest

from recommender.errors import InvalidImageError, QueryError, UnknownItemError
from recommender.images import load_image


def test_answer_shape(engine, generated_catalog):
    row = engine.rows[0]
    answer = engine.query(row.path, k=6)
    assert set(answer) == {"image", "predicted", "neighbors"}
    assert answer["image"] == row.path
    assert set(answer["predicted"]) == {"label", "colour"}
    for head, names in zip(engine.label_columns, engine.classes):
        assert answer["predicted"][head]["label"] in names
        assert 0.0 <= answer["predicted"][head]["probability"] <= 1.0
    assert len(answer["neighbors"]) == 6
    for neighbor in answer["neighbors"]:
        assert set(neighbor) == {"id", "distance", "labels", "image", "title"}  # no price / url columns here
        assert neighbor["title"] == engine.item(neighbor["id"]).extra["title"]  # the default title column
        assert set(neighbor["labels"]) == {"label", "colour"}
    distances = [n["distance"] for n in answer["neighbors"]]
    assert distances == sorted(distances)


def test_each_catalog_image_finds_itself_first_when_not_excluded(engine):
    for row in engine.rows[::7]:
        answer = engine.query(row.path, k=1, exclude_self=False)
        assert answer["neighbors"][0]["id"] == row.id
        assert answer["neighbors"][0]["distance"] < 1e-2


def test_query_item_is_excluded_from_its_own_neighbors(engine):
    for row in engine.rows[::11]:
        answer = engine.query(row.path, k=6)
        assert row.id not in [n["id"] for n in answer["neighbors"]]
        assert len(answer["neighbors"]) == 6


def test_bytes_query_equals_path_query_and_is_also_excluded(engine):
    row = engine.rows[3]
    from_path = engine.query(row.path)
    with open(row.path, "rb") as handle:
        from_bytes = engine.query(handle.read())
    assert [n["id"] for n in from_bytes["neighbors"]] == [n["id"] for n in from_path["neighbors"]]
    assert from_bytes["image"] is None


def test_neighbors_equal_brute_force_over_catalog_embeddings(engine):
    vectors = np.stack([engine.index.reconstruct(i) for i in range(engine.index.size)])
    images = np.stack([load_image(row.path, engine.backbone.input_size) for row in engine.rows[:10]])
    queries, _ = engine.embed_images(images)
    distances = np.sqrt(((queries[:, None] - vectors[None]) ** 2).sum(-1))
    for i, row in enumerate(engine.rows[:10]):
        expected = [engine.rows[j].id for j in np.argsort(distances[i], kind="stable") if engine.rows[j].id != row.id][
            :6
        ]
        got = [n["id"] for n in engine.query(row.path)["neighbors"]]
        assert got == expected


def test_new_image_gets_sensible_answer(engine, tmp_path):
    from recommender.synthetic import COLOURS, draw_product

    rng = np.random.default_rng(99)
    correct = 0
    for pattern in ("stripes", "checks"):
        for colour in ("red", "blue"):
            path = tmp_path / f"{pattern}-{colour}.jpg"
            draw_product(pattern, COLOURS[colour], 64, rng).save(path)
            answer = engine.query(path)
            correct += answer["predicted"]["colour"]["label"] == colour
            assert path.name and answer["neighbors"]
    assert correct >= 3  # colour is easy even for random-init features


def test_similar_to_item_uses_stored_embedding(engine):
    row = engine.rows[5]
    by_item = engine.similar_to_item(row.id, k=6)
    by_image = engine.query(row.path, k=6)
    assert row.id not in [n["id"] for n in by_item["neighbors"]]
    assert [n["id"] for n in by_item["neighbors"]] == [n["id"] for n in by_image["neighbors"]]
    with pytest.raises(UnknownItemError, match="no catalog item with id 'no-such-id'") as caught:
        engine.similar_to_item("no-such-id")
    assert isinstance(caught.value, KeyError) and caught.value.item_id == "no-such-id"
    with pytest.raises(UnknownItemError, match="'no-such-id'"):
        engine.item("no-such-id")


@pytest.mark.parametrize("k", [0, 101, -1, 2.5, "6", True])
def test_bad_k_is_refused(engine, k):
    with pytest.raises(QueryError, match="k must be"):
        engine.query(engine.rows[0].path, k=k)


def test_bad_image_is_refused(engine, image_files):
    for name in ("zero_bytes", "truncated_jpeg", "text_file", "huge_png"):
        with pytest.raises(InvalidImageError):
            engine.query(image_files[name])


def test_trained_embedding_neighbors_agree_on_label_more_than_raw_features(engine):
    """On new images, the trained embedding's 6 nearest share the query's label more often."""
    from conftest import TINY_COLOURS, TINY_PATTERNS

    from recommender.images import fit_square
    from recommender.scalers import fit_scaler, transform
    from recommender.synthetic import COLOURS, draw_product

    size = engine.backbone.input_size
    catalog_images = np.stack([load_image(row.path, size) for row in engine.rows])
    catalog_labels = np.array([row.labels["label"] for row in engine.rows])
    rng = np.random.default_rng(2024)
    queries, query_labels = [], []
    for pattern in TINY_PATTERNS:
        for colour in TINY_COLOURS:
            for _ in range(3):
                queries.append(fit_square(draw_product(pattern, COLOURS[colour], size, rng), size))
                query_labels.append(pattern)
    queries, query_labels = np.stack(queries), np.array(query_labels)

    def precision_at_6(catalog_vectors, query_vectors):
        distances = ((query_vectors[:, None] - catalog_vectors[None]) ** 2).sum(-1)
        nearest = np.argsort(distances, axis=1)[:, :6]
        return float(np.mean(catalog_labels[nearest] == query_labels[:, None]))

    raw_scaler = fit_scaler(engine.backbone.extract(catalog_images))
    raw = precision_at_6(
        transform(raw_scaler, engine.backbone.extract(catalog_images)),
        transform(raw_scaler, engine.backbone.extract(queries)),
    )
    trained = precision_at_6(
        np.stack([engine.index.reconstruct(i) for i in range(engine.index.size)]), engine.embed_images(queries)[0]
    )
    print(f"P@6 on new images: trained {trained:.3f}, raw {raw:.3f}")
    assert trained > raw + 0.03
