"""Evaluation: metric code against scikit-learn and hand-computed values; the report end to end."""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_COLOURS, TINY_PATTERNS, TINY_SIZE
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from recommender.catalog import read_catalog
from recommender.errors import CatalogError
from recommender.evaluate import (
    average_precision_at_k,
    classification_metrics,
    hit_rate_at_k,
    neighbor_relevance,
    precision_at_k,
    recall_at_k,
    relevant_totals,
    retrieval_metrics,
)
from recommender.manifest import CatalogRecord

# -- retrieval metrics by hand -------------------------------------------------------------

RELEVANT = np.array(
    [
        [1, 0, 1, 0, 0, 0],  # hits at ranks 1 and 3, R = 2
        [0, 0, 0, 0, 0, 0],  # no hit
        [1, 1, 1, 1, 1, 1],  # all hits, R = 10
        [0, 0, 0, 0, 0, 1],  # one hit at rank 6, R = 1
    ],
    bool,
)
TOTALS = np.array([2, 5, 10, 1])


def test_precision_at_k_by_hand():
    assert precision_at_k(RELEVANT) == pytest.approx((2 + 0 + 6 + 1) / 24)


def test_recall_at_k_is_the_share_of_each_querys_relevant_items_found():
    # query 1 finds both of its 2, query 2 none of its 5, query 3 six of its 10 (k = 6 < R
    # caps it at 0.6), query 4 its only one
    expected = [2 / 2, 0 / 5, 6 / 10, 1 / 1]
    assert recall_at_k(RELEVANT, TOTALS) == pytest.approx(np.mean(expected))
    assert retrieval_metrics(RELEVANT, TOTALS)["recall_at_k"] == pytest.approx(np.mean(expected))


def test_recall_at_k_of_a_query_without_relevant_items_is_zero_and_a_miscount_is_an_error():
    # R = 0: nothing could be found (its one item was the query itself), a miss like its P@k
    assert recall_at_k(np.zeros((1, 6), bool), [0]) == 0.0
    with pytest.raises(ValueError, match="more relevant neighbours than relevant items"):
        recall_at_k(RELEVANT, [1, 5, 10, 1])  # query 1 found 2 of a supposed 1
    with pytest.raises(ValueError, match="4 queries but 3 totals"):
        recall_at_k(RELEVANT, TOTALS[:3])


def test_hit_rate_at_k_is_the_share_of_queries_with_a_relevant_neighbour():
    assert hit_rate_at_k(RELEVANT) == pytest.approx(3 / 4)
    assert retrieval_metrics(RELEVANT, TOTALS)["hit_rate_at_k"] == pytest.approx(3 / 4)


def test_average_precision_at_k_by_hand():
    # query 1: (P@1 = 1 + P@3 = 2/3) / min(6, 2); query 3: 6 / 6; query 4: P@6 = 1/6 over min(6, 1)
    expected = [(1 + 2 / 3) / 2, 0.0, 1.0, 1 / 6]
    assert average_precision_at_k(RELEVANT, TOTALS) == pytest.approx(expected)
    figures = retrieval_metrics(RELEVANT, TOTALS)
    assert figures["map_at_k"] == pytest.approx(np.mean(expected))
    assert figures["queries"] == 4


def test_average_precision_over_the_whole_ranking_equals_scikit_learn():
    rng = np.random.default_rng(3)
    for _ in range(5):
        relevant = rng.random((1, 40)) < 0.3
        relevant[0, 7] = True  # at least one relevant item
        # k = the whole catalog and R = every relevant item: AP@k is plain average precision.
        ranking_scores = -np.arange(40)  # rank 1 has the highest score
        expected = average_precision_score(relevant[0], ranking_scores)
        assert average_precision_at_k(relevant, [relevant.sum()])[0] == pytest.approx(expected)


def test_no_relevant_item_anywhere_scores_zero_not_nan():
    assert average_precision_at_k(np.zeros((1, 6), bool), [0])[0] == 0.0


def record(item_id: str, labels: dict, sha256: str = "") -> CatalogRecord:
    return CatalogRecord(id=item_id, image="", path="", sha256=sha256, labels=labels)


def test_neighbor_relevance_treats_missing_neighbours_as_wrong():
    rows = [record(str(i), {"label": name}) for i, name in enumerate(("a", "b", "a"))]
    positions = np.array([[0, 2, -1], [1, -1, -1]])
    relevant = neighbor_relevance(rows, positions, ["a", "b"], "label")
    assert relevant.tolist() == [[True, True, False], [True, False, False]]
    assert precision_at_k(relevant) == pytest.approx(3 / 6)


def test_relevant_totals_leave_out_the_query_itself():
    rows = [record("0", {"label": "a"}, "x"), record("1", {"label": "a"}, "y"), record("2", {"label": "b"}, "z")]
    assert relevant_totals(rows, ["a", "a", "b"], ["x", "new", "q"], "label").tolist() == [1, 2, 1]


# -- classification metrics against scikit-learn -------------------------------------------


def _random_predictions(seed: int, n: int = 200, classes: int = 4):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) + 2.0 * np.eye(classes)[truth] * rng.random((n, 1))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return truth, probabilities


def test_classification_metrics_equal_scikit_learn():
    truth, probabilities = _random_predictions(0)
    names = ["w", "x", "y", "z"]
    predicted = probabilities.argmax(axis=1)
    figures = classification_metrics(truth, probabilities, names)
    assert figures["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert 0.3 < figures["accuracy"] < 0.95  # a non-trivial case: some right, some wrong
    for average in ("macro", "micro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, average=average)
        assert figures["precision"][average] == pytest.approx(precision)
        assert figures["recall"][average] == pytest.approx(recall)
        assert figures["f1"][average] == pytest.approx(f1)
    for average in ("macro", "weighted"):
        expected = roc_auc_score(truth, probabilities, multi_class="ovr", average=average)
        assert figures["roc_auc_ovr"][average] == pytest.approx(expected)
    assert figures["roc_auc_ovr"]["classes_scored"] == 4
    assert figures["confusion_matrix"]["counts"] == confusion_matrix(truth, predicted).tolist()
    assert figures["confusion_matrix"]["labels"] == names
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted)
    for i, row in enumerate(figures["per_class"]):
        assert row["class"] == names[i]
        assert row["support"] == support[i]
        assert row["predicted"] == int((predicted == i).sum())
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision[i], recall[i], f1[i]))
        assert row["roc_auc"] == pytest.approx(roc_auc_score(truth == i, probabilities[:, i]))


def test_classification_metrics_by_hand_with_a_class_never_seen_in_the_queries():
    # Three queries of class 0 and 1; class 2 exists in the bundle but no query carries it.
    truth = np.array([0, 0, 1])
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.1, 0.7], [0.3, 0.6, 0.1]])
    figures = classification_metrics(truth, probabilities, ["a", "b", "c"])
    assert figures["accuracy"] == pytest.approx(2 / 3)
    # predicted 0, 2, 1: class a precision 1 recall 1/2, b 1 and 1, c 0 and 0 (never true)
    assert figures["precision"]["macro"] == pytest.approx((1 + 1 + 0) / 3)
    assert figures["recall"]["macro"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert figures["per_class"][2]["support"] == 0
    assert figures["per_class"][2]["roc_auc"] is None  # no positives: undefined, not a crash
    assert figures["roc_auc_ovr"]["classes_scored"] == 2
    # class a: scores 0.8, 0.2 (positives) vs 0.3 -> pairs won 1 of 2; class b: 0.6 beats 0.1, 0.2
    assert figures["per_class"][0]["roc_auc"] == pytest.approx(0.5)
    assert figures["per_class"][1]["roc_auc"] == pytest.approx(1.0)
    assert figures["roc_auc_ovr"]["weighted"] == pytest.approx((0.5 * 2 + 1.0 * 1) / 3)
    assert figures["confusion_matrix"]["counts"] == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]


def test_classification_metrics_judge_the_given_predictions_and_rank_by_the_probabilities():
    # A hierarchy level's prediction (from the most probable valid path) need not be the
    # argmax of its marginal: accuracy and the confusion matrix follow the prediction given.
    truth = np.array([0, 1, 1])
    probabilities = np.array([[0.6, 0.4], [0.55, 0.45], [0.2, 0.8]])
    figures = classification_metrics(truth, probabilities, ["a", "b"], predicted=np.array([0, 1, 1]))
    assert figures["accuracy"] == 1.0
    assert figures["confusion_matrix"]["counts"] == [[1, 0], [0, 2]]
    assert figures["per_class"][0]["roc_auc"] == pytest.approx(roc_auc_score(truth == 0, probabilities[:, 0]))
    assert classification_metrics(truth, probabilities, ["a", "b"])["accuracy"] == pytest.approx(2 / 3)


# -- the report end to end on the session's tiny bundle ------------------------------------


@pytest.fixture(scope="module")
def test_catalog(tmp_path_factory, image_files) -> Path:
    """Fresh generated images the tiny bundle has not seen, plus bad rows of every kind.

    Rows: 2 per (pattern, colour) of the bundle's classes; 3 of a pattern the bundle never
    saw ("grid"); one missing file; one truncated JPEG.
    """
    from recommender.synthetic import generate_catalog

    folder = tmp_path_factory.mktemp("test-catalog")
    known = generate_catalog(
        folder / "known", per_class=2, patterns=TINY_PATTERNS, colours=TINY_COLOURS, size=TINY_SIZE, seed=7
    )
    unseen = generate_catalog(folder / "unseen", per_class=3, patterns=("grid",), colours=("red",), size=TINY_SIZE)
    broken = folder / "broken.jpg"
    broken.write_bytes(image_files["truncated_jpeg"].read_bytes())
    rows = []
    for source, prefix in ((known, "known"), (unseen, "unseen")):
        with open(source, newline="") as handle:
            for record in csv.DictReader(handle):
                rows.append({**record, "id": f"{prefix}-{record['id']}", "file": f"{prefix}/{record['file']}"})
    template = dict(rows[0])
    rows.append({**template, "id": "missing", "file": "known/images/not-there.jpg"})
    rows.append({**template, "id": "broken", "file": "broken.jpg"})
    catalog = folder / "test.csv"
    with open(catalog, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return catalog


def test_the_readme_metrics_table_is_the_documented_key_list():
    from indexer.evaluate import metrics_keys_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Evaluate a bundle") :]
    start = section.index("| key | meaning |\n")
    table = section[start : section.index("\n\n", start) + 1]
    # On a difference, paste the output of
    # python -c "from indexer.evaluate import metrics_keys_table; print(metrics_keys_table(), end='')"
    assert table == metrics_keys_table()


def _lookup(metrics: dict, key: str, head: str):
    """Resolves a documented key like ``heads.HEAD.retrieval.SPACE``."""
    value = metrics
    for part in key.replace("HEAD", head).split("."):
        assert isinstance(value, dict) and part in value, f"documented key {key!r} missing at {part!r}"
        value = value[part]
    return value


#: Sections that a bundle may not have; when not evaluated they hold only these keys for sure.
OPTIONAL_SECTIONS = ("hierarchy", "tags")


def check_documented_keys(metrics: dict, head: str) -> None:
    """Asserts that every documented key is in ``metrics`` (``HEAD`` = ``head``, both spaces).

    Under a section that was not evaluated (a bundle without hierarchy or tags) only its
    ``evaluated`` and ``reason`` keys are required.
    """
    from indexer.evaluate import documented_keys

    for key in documented_keys():
        section = key.split(".")[0]
        if section in OPTIONAL_SECTIONS and not metrics[section]["evaluated"]:
            if key.split(".")[-1] not in ("evaluated", "reason"):
                continue
        if ".SPACE" in key:
            for space in ("embedding", "raw_features"):
                _lookup(metrics, key.replace("SPACE", space), head)
        else:
            _lookup(metrics, key, head)


@pytest.fixture(scope="module")
def cli_report(tiny_bundle, test_catalog, tmp_path_factory):
    """The report written through the ``evaluate`` command functions; returns (exit code, folder)."""
    from indexer.evaluate import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path_factory.mktemp("report") / "report"
    args = parser.parse_args(
        ["--bundle", str(tiny_bundle), "--catalog", str(test_catalog), "--id-column", "id", "--out", str(out)]
        + ["--feature-store", str(tmp_path_factory.mktemp("report-store") / "features.h5")]
    )
    return run(args), out


def test_report_folder_has_valid_json_pngs_and_html(cli_report):
    code, out = cli_report
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    check_documented_keys(metrics, "label")
    # The tiny bundle has neither a hierarchy nor tags: said so, and no section on the page.
    assert metrics["hierarchy"] == {
        "evaluated": False,
        "reason": "the bundle has no label hierarchy",
        "mode": None,
        "levels": [],
    }
    assert metrics["tags"] == {"evaluated": False, "reason": "the bundle predicts no tags", "column": None}
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"training.png", "examples.png", "retrieval.png", "confusion-0-label.png"}
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"
    page = (out / "report.html").read_text()
    referenced = set(re.findall(r'<img src="([^"]+)"', page))
    assert referenced == {p.name for p in pngs}  # every plot shown, nothing dangling
    assert "http" not in page.replace("http-equiv", "")  # no external resource: opens offline
    assert "<h2>Hierarchy" not in page and "<h2>Tags" not in page
    # The build-time baseline check, copied from the manifest, and its table on the page.
    manifest = json.loads((Path(metrics["bundle"]["path"]) / "manifest.json").read_text())
    assert metrics["training"]["baseline"] == manifest["metrics"]["baseline"]
    assert "<h2>Build-time check: trained heads against a probe on raw features</h2>" in page
    assert "<th>probe accuracy</th>" in page and "<th>P@6 raw features</th>" in page
    for column in ("label", "colour"):
        for name in metrics["heads"][column]["plots"].values():
            assert (out / name).is_file()


def test_report_figures_agree_with_the_engines_own_answers(cli_report, engine, test_catalog):
    _, out = cli_report
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [r for r in read_catalog(test_catalog, id_column="id", label_columns=["label", "colour"]).rows]
    known = [r for r in rows if r.labels["label"] != "grid" and r.id not in ("broken", "missing")]
    # What serving answers (Recommender.query_many), scored here by hand.
    answers = engine.query_many([row.path for row in known], k=6)
    class_sizes = Counter(item.labels["label"] for item in engine.rows)
    right, shares, found, hits = [], [], [], []
    for row, answer in zip(known, answers):
        truth = row.labels["label"]
        same = [neighbour["labels"]["label"] == truth for neighbour in answer["neighbors"]]
        right.append(answer["predicted"]["label"]["label"] == truth)
        shares.append(sum(same) / 6)
        found.append(sum(same) / class_sizes[truth])  # fresh images: no query is a catalog item
        hits.append(any(same))
    label = metrics["heads"]["label"]
    assert label["queries"] == len(known) == 24
    assert label["accuracy"] == pytest.approx(np.mean(right))
    embedding = label["retrieval"]["embedding"]
    assert embedding["precision_at_k"] == pytest.approx(np.mean(shares))
    assert embedding["recall_at_k"] == pytest.approx(np.mean(found))
    assert embedding["hit_rate_at_k"] == pytest.approx(np.mean(hits))
    assert embedding["recall_at_k"] <= 6 / min(class_sizes.values())  # at most k / class size
    # The generated patterns are easy: far above the 1-in-4 chance level.
    assert label["accuracy"] >= 0.75
    assert label["retrieval"]["embedding"]["precision_at_k"] >= 0.6
    raw = label["retrieval"]["raw_features"]
    assert raw is not None and 0.0 <= raw["precision_at_k"] <= 1.0


def test_bad_input_is_reported_not_a_crash(cli_report):
    _, out = cli_report
    metrics = json.loads((out / "metrics.json").read_text())
    reasons = {bad["id"]: bad["reason"] for bad in metrics["catalog"]["bad_rows"]}
    assert set(reasons) == {"missing", "broken"}
    assert "not found" in reasons["missing"] and "truncated" in reasons["broken"]
    assert metrics["catalog"]["rows"] == 29 and metrics["catalog"]["evaluated"] == 27
    assert metrics["heads"]["label"]["unknown_labels"] == {"grid": 3}
    assert metrics["heads"]["colour"]["unknown_labels"] == {}  # "red" is a known colour
    assert metrics["heads"]["colour"]["queries"] == 27
    problems = " ".join(metrics["problems"])
    assert "'grid'" in problems and "2 test row(s) left out" in problems
    page = (out / "report.html").read_text()
    assert "never saw" in page and "not-there.jpg" in page


def test_measuring_writes_nothing_and_leaves_the_plots_to_the_report(engine, test_catalog, tmp_path, monkeypatch):
    from indexer.evaluate import measure_bundle, write_report

    monkeypatch.chdir(tmp_path)
    rows = read_catalog(test_catalog, id_column="id", label_columns=["label", "colour"]).rows[:6]
    evaluation = measure_bundle(engine, rows, 4, raw_features=False)
    assert list(tmp_path.iterdir()) == []
    assert evaluation.metrics["training"]["plot"] is None and evaluation.metrics["examples"]["plot"] is None
    assert "plots" not in evaluation.metrics["heads"]["label"]
    assert len(evaluation.run.rows) == 6 and evaluation.run.positions.shape == (6, 4)
    written = write_report(engine, evaluation, tmp_path / "r", examples=1)
    assert written["examples"]["plot"] == "examples.png" and "plots" in written["heads"]["label"]
    assert written["heads"]["label"]["retrieval"] == evaluation.metrics["heads"]["label"]["retrieval"]
    assert "plots" not in evaluation.metrics["heads"]["label"]  # the evaluation is left as it was
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == written


def test_report_without_raw_features_and_a_head_missing(engine, test_catalog, tmp_path):
    from indexer.evaluate import evaluate_bundle

    catalog = read_catalog(test_catalog, id_column="id", label_columns=["colour"])
    metrics = evaluate_bundle(engine, catalog.rows[:12], tmp_path / "r", 3, raw_features=False, examples=1)
    assert metrics["heads"]["label"] == {"evaluated": False, "queries": 0, "unknown_labels": {}}
    assert metrics["heads"]["colour"]["retrieval"]["raw_features"] is None
    assert metrics["retrieval_spaces"]["raw_features"]["measured"] is False
    assert metrics["k"] == 3
    assert any("'label' not evaluated" in p for p in metrics["problems"])
    assert len(metrics["examples"]["correct"]) + len(metrics["examples"]["wrong"]) <= 2
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["heads"]["colour"]["queries"] == 12


def test_catalog_items_as_queries_do_not_find_themselves(engine, generated_catalog, tmp_path):
    from indexer.evaluate import evaluate_bundle
    from recommender.evaluate import run_queries

    rows = read_catalog(generated_catalog, id_column="id", label_columns=["label", "colour"]).rows[::8]
    metrics = evaluate_bundle(engine, rows, tmp_path / "r", raw_features=False, examples=0)
    assert metrics["catalog"]["self_matches"] == len(rows) == 12
    assert metrics["examples"]["plot"] == "examples.png"
    run = run_queries(engine, rows, 6)
    class_sizes = Counter(item.labels["label"] for item in engine.rows)
    found = []
    for i, row in enumerate(run.rows):
        neighbours = [engine.rows[p].id for p in run.positions[i]]
        assert len(neighbours) == 6 and row.id not in neighbours
        same = sum(engine.rows[p].labels["label"] == row.labels["label"] for p in run.positions[i])
        found.append(same / (class_sizes[row.labels["label"]] - 1))  # its own item is not findable
    assert metrics["heads"]["label"]["retrieval"]["embedding"]["recall_at_k"] == pytest.approx(np.mean(found))
    with_self = run_queries(engine, rows, 6, exclude_self=False)
    assert [engine.rows[p].id for p in with_self.positions[:, 0]] == [row.id for row in rows]


def test_the_report_template_ships_with_the_package():
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    templates = [path.relative_to(root / "indexer").as_posix() for path in (root / "indexer" / "templates").rglob("*")]
    assert "templates/report.html" in templates
    for name in templates:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in package_data["indexer"]), f"{name} would not ship"


def test_nothing_to_evaluate_is_an_error(engine, test_catalog, tmp_path):
    from indexer.evaluate import evaluate_bundle

    rows = read_catalog(test_catalog, id_column="id").rows
    broken = [row for row in rows if row.id == "broken"]
    with pytest.raises(CatalogError, match="none of the 1 test rows could be read"):
        evaluate_bundle(engine, broken, tmp_path / "r")
    unlabelled = read_catalog(test_catalog, id_column="id", label_columns=["title"]).rows
    with pytest.raises(CatalogError, match="none of the bundle's label columns"):
        evaluate_bundle(engine, unlabelled, tmp_path / "r")
