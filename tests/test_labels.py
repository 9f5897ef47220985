"""Label spaces: taxonomy learning, consistent hierarchy decoding, tags and their thresholds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import f1_score

from recommender.errors import CatalogError, TrainingError
from recommender.labels import LabelSpace, Taxonomy, micro_f1, parse_hierarchy

LEVELS = ("department", "family", "label")
#: A known taxonomy: 2 departments, 4 families, 7 leaves (one leaf name reused under two
#: families would break it, so every leaf is unique).
KNOWN_PATHS = [
    ("basics", "solid", "plain"),
    ("basics", "solid", "melange"),
    ("prints", "lines", "stripes"),
    ("prints", "lines", "grid"),
    ("prints", "shapes", "dots"),
    ("prints", "shapes", "checks"),
    ("sport", "mesh", "airmesh"),
]


def _rows(paths, repeat=3):
    return [dict(zip(LEVELS, path)) for path in paths for _ in range(repeat)]


def _space(mode: str, tags=None) -> LabelSpace:
    rows = _rows(KNOWN_PATHS)
    taxonomy, conflicts = Taxonomy.learn(rows, LEVELS)
    assert conflicts == []
    labels = {column: [row[column] for row in rows] for column in ("label", "department", "family")}
    labels["colour"] = ["red", "blue", "black"] * (len(rows) // 3)
    return LabelSpace.create(
        labels, taxonomy=taxonomy, hierarchy_mode=mode, tags=tags, tags_column="tags" if tags else None
    )


def test_taxonomy_is_learned_from_rows():
    taxonomy, conflicts = Taxonomy.learn(_rows(KNOWN_PATHS), LEVELS)
    assert conflicts == []
    assert set(taxonomy.paths) == set(KNOWN_PATHS) and taxonomy.levels == LEVELS
    assert taxonomy.values("family") == ["lines", "mesh", "shapes", "solid"]
    assert Taxonomy.from_json(taxonomy.to_json()) == taxonomy


def test_child_under_two_parents_is_reported_and_left_out():
    rows = _rows(KNOWN_PATHS)
    rows.append({"department": "prints", "family": "shapes", "label": "stripes"})  # stripes is under lines
    rows.append({"department": "sport", "family": "lines", "label": "stripes"})  # lines is under prints
    taxonomy, conflicts = Taxonomy.learn(rows, LEVELS)
    assert [c.position for c in conflicts] == [len(rows) - 2, len(rows) - 1]
    assert "label 'stripes' is under family 'shapes' here but under 'lines'" in conflicts[0].reason
    assert "family 'lines' is under department 'sport' here but under 'prints'" in conflicts[1].reason
    assert set(taxonomy.paths) == set(KNOWN_PATHS)


@pytest.mark.parametrize("text", ["a", "a>", "a>>b", "a>b>a", ""])
def test_bad_hierarchy_spec_is_refused(text):
    with pytest.raises(CatalogError):
        parse_hierarchy(text)


def _random_outputs(space: LabelSpace, rng, n: int) -> dict[str, np.ndarray]:
    outputs = {}
    for head in space.heads:
        width = len(head.classes)
        if head.kind == "softmax":  # sharp and flat distributions both
            outputs[head.name] = rng.dirichlet(np.full(width, rng.choice([0.1, 1.0, 5.0])), size=n).astype(np.float32)
        else:
            outputs[head.name] = rng.uniform(size=(n, width)).astype(np.float32)
    return outputs


@pytest.mark.parametrize("mode", ["hierarchical", "combined"])
def test_predicted_paths_are_always_valid_and_most_probable(mode):
    """Property test: over many random head outputs, the decoded path exists in the
    taxonomy, maximises the path score among valid paths, and the marginals are consistent."""
    space = _space(mode)
    rng = np.random.default_rng(0)
    valid = set(KNOWN_PATHS)
    for _ in range(50):
        outputs = _random_outputs(space, rng, 40)
        predicted = space.predict(outputs)
        distribution = space.path_distribution(outputs)
        assert np.allclose(distribution.sum(axis=1), 1.0)
        marginals = space.column_probabilities(outputs)
        for column, matrix in marginals.items():
            assert np.allclose(matrix.sum(axis=1), 1.0), column
        for row in range(40):
            path = tuple(space.classes_of(level)[predicted[level][0][row]] for level in LEVELS)
            assert path in valid
            if mode == "hierarchical":  # brute force: product of level probabilities over valid paths
                heads = {h.column: h for h in space.heads}
                scores = {
                    p: np.prod([outputs[heads[lv].name][row, heads[lv].classes.index(v)] for lv, v in zip(LEVELS, p)])
                    for p in valid
                }
                assert scores[path] == pytest.approx(max(scores.values()), rel=1e-5)
            for level, value in zip(LEVELS, path):
                expected = sum(distribution[row, i] for i, p in enumerate(space.taxonomy.paths) if value in p)
                assert predicted[level][1][row] == pytest.approx(expected, rel=1e-6)


def test_inconsistent_level_argmaxes_are_resolved_to_a_valid_path():
    """Leaf says 'stripes' (under lines), family says 'shapes': the answer is one valid path."""
    space = _space("hierarchical")
    heads = {h.column: h for h in space.heads}
    outputs = {h.name: np.full((1, len(h.classes)), 1e-3, np.float32) for h in space.heads}
    outputs[heads["department"].name][0, heads["department"].classes.index("prints")] = 0.9
    outputs[heads["family"].name][0, heads["family"].classes.index("shapes")] = 0.6
    outputs[heads["family"].name][0, heads["family"].classes.index("lines")] = 0.4
    outputs[heads["label"].name][0, heads["label"].classes.index("stripes")] = 0.5
    outputs[heads["label"].name][0, heads["label"].classes.index("dots")] = 0.3
    answer = space.describe(outputs, 0)
    path = answer["hierarchy"]["path"]
    assert tuple(path) in set(KNOWN_PATHS)
    # 0.9 * 0.4 * 0.5 (lines > stripes) = 0.18 beats 0.9 * 0.6 * 0.3 (shapes > dots) = 0.162
    assert path == ["prints", "lines", "stripes"]
    assert answer["predicted"]["family"]["label"] == "lines" and answer["predicted"]["label"]["label"] == "stripes"


def test_combined_head_covers_paths_and_encodes_them():
    space = _space("combined")
    path_heads = [h for h in space.heads if h.target == "path"]
    assert len(path_heads) == 1 and len(path_heads[0].classes) == len(KNOWN_PATHS)
    assert {h.column for h in space.heads if h.target == "column"} == {"colour"}
    rows = _rows(KNOWN_PATHS, repeat=1)
    labels = {c: [r[c] for r in rows] for c in ("label", "department", "family")}
    labels["colour"] = ["red"] * len(rows)
    codes = space.encode(labels)[path_heads[0].name]
    assert [path_heads[0].classes[c] for c in codes] == [" > ".join(p) for p in KNOWN_PATHS]
    labels["label"][0] = "unseen"
    with pytest.raises(TrainingError, match="unknown to the model"):
        space.encode(labels)


def test_label_space_round_trips_through_json_and_reads_version_1():
    tags = [("warm",), ("cool", "striped"), ()] * 7
    space = _space("hierarchical", tags=tags)
    space.thresholds = np.array([0.3, 0.6, 0.45])
    again = LabelSpace.from_json(space.to_json())
    assert again.heads == space.heads and again.taxonomy == space.taxonomy and again.tags == ["cool", "striped", "warm"]
    assert np.array_equal(again.thresholds, space.thresholds)
    version_1 = LabelSpace.from_json({"columns": ["label", "colour"], "classes": [["a", "b"], ["red"]]})
    assert [(h.name, h.kind, h.column) for h in version_1.heads] == [
        ("head_0", "softmax", "label"),
        ("head_1", "softmax", "colour"),
    ]


def test_micro_f1_equals_scikit_learn():
    rng = np.random.default_rng(3)
    for _ in range(20):
        truth = rng.uniform(size=(30, 6)) < 0.3
        predicted = rng.uniform(size=(30, 6)) < 0.4
        assert micro_f1(truth, predicted) == pytest.approx(f1_score(truth, predicted, average="micro", zero_division=0))
    assert micro_f1(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0


@pytest.mark.parametrize("mode", ["global", "per_tag"])
def test_threshold_tuning_raises_validation_micro_f1_over_one_half(mode):
    """Scores that are systematically low (a common sigmoid-head outcome under class imbalance):
    every threshold at 0.5 misses positives; the tuned ones recover them."""
    rng = np.random.default_rng(1)
    truth = rng.uniform(size=(400, 5)) < 0.25
    scores = np.clip(0.35 * truth + rng.normal(0.1, 0.1, truth.shape), 0, 1)
    space = LabelSpace.create(
        {"label": ["a", "b"] * 200},
        tags=[tuple(f"t{j}" for j in np.flatnonzero(row)) for row in truth],
        tags_column="tags",
        threshold_mode=mode,
    )
    found = space.tune_thresholds(truth, scores)
    assert found["validation_micro_f1_tuned"] > found["validation_micro_f1_at_0.5"] + 0.2
    assert found["validation_micro_f1_tuned"] == pytest.approx(micro_f1(truth, scores >= space.thresholds[None, :]))
    assert all(0.05 <= t <= 0.95 for t in space.thresholds)
    if mode == "global":
        assert len(set(space.thresholds.tolist())) == 1


def test_per_tag_thresholds_fit_tags_that_need_different_cuts():
    rng = np.random.default_rng(2)
    truth = rng.uniform(size=(600, 2)) < 0.3
    scores = np.empty(truth.shape)
    scores[:, 0] = np.where(truth[:, 0], rng.uniform(0.25, 0.35, 600), rng.uniform(0.0, 0.2, 600))
    scores[:, 1] = np.where(truth[:, 1], rng.uniform(0.85, 0.95, 600), rng.uniform(0.4, 0.8, 600))
    tags = [tuple(f"t{j}" for j in np.flatnonzero(row)) for row in truth]
    results = {}
    for mode in ("global", "per_tag"):
        space = LabelSpace.create({"label": ["a", "b"] * 300}, tags=tags, tags_column="tags", threshold_mode=mode)
        results[mode] = space.tune_thresholds(truth, scores)["validation_micro_f1_tuned"]
    assert results["per_tag"] == pytest.approx(1.0) and results["global"] < 0.95


def test_tags_column_without_tags_is_refused():
    with pytest.raises(TrainingError, match="holds no tags"):
        LabelSpace.create({"label": ["a", "b"]}, tags=[(), ()], tags_column="tags")


def test_every_valid_path_can_be_predicted():
    """Each valid path is the answer when its own levels are confident (no path is unreachable)."""
    for mode in ("hierarchical", "combined"):
        space = _space(mode)
        for path in KNOWN_PATHS:
            outputs = {h.name: np.full((1, len(h.classes)), 0.01, np.float32) for h in space.heads}
            for head in space.heads:
                if head.target == "path":
                    outputs[head.name][0, head.classes.index(" > ".join(path))] = 0.9
                elif head.column in LEVELS:
                    outputs[head.name][0, head.classes.index(path[LEVELS.index(head.column)])] = 0.9
            assert tuple(space.describe(outputs, 0)["hierarchy"]["path"]) == path


def test_all_pairs_of_levels_stay_consistent():
    """No predicted child sits outside its predicted parent, for every adjacent pair of levels."""
    space = _space("hierarchical")
    rng = np.random.default_rng(5)
    outputs = _random_outputs(space, rng, 500)
    predicted = space.predict(outputs)
    parent_of = {(p[d + 1], d + 1): p[d] for p in KNOWN_PATHS for d in range(len(LEVELS) - 1)}
    for (parent_level, child_level), depth in zip(itertools.pairwise(LEVELS), range(1, len(LEVELS))):
        parents = [space.classes_of(parent_level)[c] for c in predicted[parent_level][0]]
        children = [space.classes_of(child_level)[c] for c in predicted[child_level][0]]
        assert all(parent_of[(child, depth)] == parent for parent, child in zip(parents, children))
