"""Classifier training: stratified split rules, multi-head model layout, seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from recommender.classifier import (
    EMBEDDING_LAYER,
    SAMPLE_FLOOR,
    TrainConfig,
    build_model,
    split_coverage,
    stratified_split,
    train_classifier,
    training_sample,
)
from recommender.errors import TrainingError
from recommender.labels import HeadSpec


def blobs(n_per_class=30, classes=3, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 4
    labels = np.repeat(np.arange(classes), n_per_class)
    features = (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32)
    return features, [f"class-{i}" for i in labels]


def _heads(*widths, tags: int = 0) -> list[HeadSpec]:
    heads = [
        HeadSpec(f"head_{i}", "softmax", "column", f"c{i}", tuple(map(str, range(w)))) for i, w in enumerate(widths)
    ]
    if tags:
        heads.append(HeadSpec(f"head_{len(heads)}", "sigmoid", "tags", "tags", tuple(map(str, range(tags)))))
    return heads


def test_model_layout():
    model, training_model = build_model(2048, _heads(10, 4, tags=5), TrainConfig())
    layer = model.get_layer(EMBEDDING_LAYER)
    assert layer.units == 512 and layer.activation.__name__ == "relu"
    assert model.get_layer("hidden").units == 1024
    assert set(model.output) == {"embedding", "head_0", "head_1", "head_2"}
    assert model.get_layer("head_0").activation.__name__ == "softmax"
    assert model.get_layer("head_2").activation.__name__ == "sigmoid" and model.get_layer("head_2").units == 5
    assert set(training_model.output) == {"head_0", "head_1", "head_2", "embedding"}  # SupCon trains the embedding
    _, heads_only = build_model(2048, _heads(10, 4), TrainConfig(contrastive_weight=0.0))
    assert set(heads_only.output) == {"head_0", "head_1"}


def test_split_is_stratified_and_refuses_untrainable_catalogs():
    labels = ["a"] * 20 + ["b"] * 10
    train, validation = stratified_split(labels, 0.2, seed=0)
    assert len(set(train) | set(validation)) == 30 and not set(train) & set(validation)
    assert sorted(labels[i] for i in validation) == ["a"] * 4 + ["b"] * 2
    # Without rare classes the split is the plain stratified split of every row, as it always was.
    expected = train_test_split(np.arange(30), test_size=6, stratify=labels, random_state=0)
    assert all(np.array_equal(got, np.sort(want)) for got, want in zip((train, validation), expected))
    with pytest.raises(TrainingError, match="at least 2 classes"):
        stratified_split(["a"] * 5, 0.2, seed=0)
    with pytest.raises(TrainingError, match="no class has 2 or more examples"):
        stratified_split(["a", "b", "c"], 0.2, seed=0)


def test_classes_too_small_to_hold_out_train_on_all_their_rows():
    common = ["a"] * 20 + ["b"] * 10
    labels = ["c"] + common[:15] + ["d"] + common[15:] + ["e"]  # three one-row classes among them
    train, validation = stratified_split(labels, 0.2, seed=0)
    assert sorted(set(train) | set(validation)) == list(range(33)) and not set(train) & set(validation)
    assert {labels[i] for i in train} == {"a", "b", "c", "d", "e"}  # every class trains
    assert {0, 16, 32} <= set(train) and sorted(labels[i] for i in validation) == ["a"] * 4 + ["b"] * 2
    again = stratified_split(labels, 0.2, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip((train, validation), again))  # seeded
    assert split_coverage(labels, validation) == {
        "validation_classes": 2,
        "total_classes": 5,
        "train_only_classes": {"c": 1, "d": 1, "e": 1},
    }
    # A held-out row never takes a class's last training row, even when most rows are held out.
    small = ["a", "a", "b", "b", "c", "c", "d"]
    for seed in range(20):
        train, validation = stratified_split(small, 0.5, seed=seed)
        assert {small[i] for i in train} == {"a", "b", "c", "d"} and len(validation)


def test_training_learns_and_is_reproducible():
    features, labels = blobs()
    colour = ["warm" if int(x.split("-")[1]) % 2 else "cold" for x in labels]
    config = TrainConfig(max_epochs=8, hidden_units=64, embedding_units=32, dropout=0.2, learning_rate=3e-3)
    first = train_classifier(features, {"kind": labels, "tone": colour}, config)
    second = train_classifier(features, {"kind": labels, "tone": colour}, config)
    assert first.metrics["heads"]["kind"]["validation_accuracy"] >= 0.9
    assert first.classes == [["class-0", "class-1", "class-2"], ["cold", "warm"]]
    for a, b in zip(first.model.get_weights(), second.model.get_weights()):
        assert np.array_equal(a, b)
    assert first.history["val_loss"] == second.history["val_loss"]
    # The build's baseline check: every head beside its probe, reproducible but for its timing.
    baselines = [{**run.metrics["baseline"], "seconds": None} for run in (first, second)]
    assert baselines[0] == baselines[1] and set(baselines[0]["heads"]) == {"kind", "tone"}
    other_seed = train_classifier(
        features, {"kind": labels, "tone": colour}, TrainConfig(**{**config.__dict__, "seed": 1, "baseline": False})
    )
    assert not np.array_equal(first.model.get_weights()[0], other_seed.model.get_weights()[0])
    assert "baseline" not in other_seed.metrics  # switched off


def test_supervised_contrastive_loss_by_hand():
    from keras import ops

    from recommender.classifier import supervised_contrastive_loss

    labels = np.array([0, 0, 1], np.float32)
    embeddings = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    got = ops.convert_to_numpy(supervised_contrastive_loss(0.5)(labels, embeddings))
    # Row 0: similarities to rows 1, 2 are 1/0.5 = 2 and 0; its positive is row 1.
    expected_row0 = -(2 - np.log(np.exp(2) + np.exp(0)))
    assert np.allclose(got, [expected_row0, expected_row0, 0.0], atol=1e-5)  # row 2 has no positive
    # Pulling the positive away raises the loss.
    apart = np.array([[1, 0], [0, 1], [0, 1]], np.float32)
    assert ops.convert_to_numpy(supervised_contrastive_loss(0.5)(labels, apart))[0] > got[0]


def test_a_training_sample_keeps_the_long_tail_and_every_label_and_thins_big_classes():
    from collections import Counter

    rng = np.random.default_rng(0)
    n = 20_000
    # A long tail: class sizes from thousands down to single photos, as shop catalogs have.
    primary = [f"type-{int(x) % 200}" for x in rng.zipf(1.6, n)]
    colour = [f"colour-{int(x) % 40}" for x in rng.zipf(2.2, n)]
    tags = [tuple(f"tag-{int(t)}" for t in rng.integers(0, 60, 2)) for _ in range(n)]
    tags[7] = ("only-once",)
    labels = {"type": primary, "colour": colour}
    sample = training_sample(labels, "type", 2_000, seed=3, tags=tags)

    assert sample.dtype == np.int64 and np.all(np.diff(sample) > 0) and len(set(sample)) == len(sample)
    full, kept = Counter(primary), Counter(primary[i] for i in sample)
    assert all(kept[name] >= min(count, SAMPLE_FLOOR) for name, count in full.items())
    biggest = full.most_common(1)[0][0]
    assert kept[biggest] < full[biggest] / 5  # thinned in proportion
    assert {colour[i] for i in sample} == set(colour)  # other columns' values all present
    assert 7 in sample  # the one photo of a tag
    assert 2_000 <= len(sample) <= 2_000 + SAMPLE_FLOOR * (len(full) + 40 + 61)
    assert np.array_equal(sample, training_sample(labels, "type", 2_000, seed=3, tags=tags))
    assert not np.array_equal(sample, training_sample(labels, "type", 2_000, seed=4, tags=tags))
    assert training_sample(labels, "type", n, seed=3) is None and training_sample(labels, "type", 0, seed=3) is None
