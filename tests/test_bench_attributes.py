"""The hierarchy and tag benchmarks run in their --quick mode: tables printed, JSON sane."""

from __future__ import annotations

import pytest
from test_bench import run_quick


def check_comparison(comparison: dict, names: set[str], seeds: int) -> None:
    """A verdict names a winner (or a tie) and its per-seed differences add up."""
    assert comparison["better"] in names | {"tie"}
    assert len(comparison["paired_differences"]) == seeds
    assert comparison["ahead"] + comparison["tied"] + comparison["behind"] == seeds
    assert comparison["difference"] == pytest.approx(sum(comparison["paired_differences"]) / seeds)
    assert comparison["seed_spread"] >= 0
    assert (comparison["exceeds_spread"] is None) == (seeds == 1)


def test_hierarchy_quick(quick_runs):
    output, payload = run_quick(quick_runs, "hierarchy")
    assert payload["seeds"] == [0]
    assert payload["library_default_mode"] in ("hierarchical", "combined")
    # --quick trains on generated data only; clothing-small is skipped with its reason.
    assert "clothing-small: skipped" in output and payload["skipped"]["clothing-small"]
    (dataset,) = payload["datasets"]
    assert dataset["name"] == "generated"
    assert dataset["levels"] == ["department", "family", "label"]
    assert dataset["paths"] == 6 and dataset["catalog_items"] > 0 and dataset["test_items"] > 0
    for column in ("acc department", "acc family", "acc label", "path score/3", "all right", "P@6", "train s"):
        assert column in output
    runs = dataset["runs"]
    assert sorted(run["mode"] for run in runs) == ["combined", "hierarchical"]
    for run in runs:
        assert set(run["level_accuracy"]) == set(dataset["levels"])
        assert all(0.0 <= value <= 1.0 for value in run["level_accuracy"].values())
        assert run["path_score_max"] == 3
        # One point per correct level: the score is the sum of the level accuracies.
        assert run["path_score"] == pytest.approx(sum(run["level_accuracy"].values()))
        assert 0.0 <= run["path_accuracy"] <= min(run["level_accuracy"].values())
        assert 0.0 <= run["p_at_6"] <= 1.0
        assert run["train_seconds"] > 0 and run["epochs"] >= 1
    heads = {run["mode"]: run["heads"] for run in runs}
    assert heads == {"hierarchical": ["column", "column", "column"], "combined": ["path"]}
    assert [c["figure"] for c in dataset["comparisons"]] == ["path_score", "path_accuracy", "p_at_6"]
    for comparison in dataset["comparisons"]:
        check_comparison(comparison, {"hierarchical", "combined"}, seeds=1)
    assert "path_score: " in output


def test_tags_quick(quick_runs):
    output, payload = run_quick(quick_runs, "tags")
    assert payload["seeds"] == [0]
    assert payload["library_default_mode"] in ("global", "per_tag")
    assert "clothing-small: not used" in output
    assert [entry["setting"] for entry in payload["settings"]] == ["clean", "noisy"]
    for column in ("micro-F1", "macro-F1", "precision", "recall"):
        assert column in output
    for entry in payload["settings"]:
        (run,) = entry["runs"]
        assert run["tags"] == sorted(run["tags"]) and len(run["tags"]) == 8
        assert (run["omission_rates"] is None) == (entry["setting"] == "clean")
        if run["omission_rates"] is not None:
            assert all(0.0 <= rate <= payload["noise"]["max_omission"] for rate in run["omission_rates"].values())
        assert set(run["test"]) == {"0.5", "global", "per_tag"}
        for figures in run["test"].values():
            for name in ("micro_f1", "macro_f1", "precision", "recall"):
                assert 0.0 <= figures[name] <= 1.0
        thresholds = run["thresholds"]
        assert set(thresholds["0.5"]) == {0.5} and len(set(thresholds["global"])) == 1
        assert all(0.0 < t < 1.0 for t in thresholds["per_tag"])
        # Tags without enough validation positives keep the global threshold.
        own = [count >= payload["min_positives_per_tag"] for count in run["validation_positives"]]
        assert run["tags_with_own_threshold"] == sum(own)
        for has_own, per_tag, shared in zip(own, thresholds["per_tag"], thresholds["global"]):
            if not has_own:
                assert per_tag == pytest.approx(shared)
        comparisons = entry["comparisons"]
        assert [(c["pair"], c["figure"]) for c in comparisons] == [
            (["per_tag", "global"], "micro_f1"),
            (["per_tag", "global"], "macro_f1"),
            (["global", "0.5"], "micro_f1"),
        ]
        for comparison in comparisons:
            check_comparison(comparison, set(comparison["pair"]), seeds=1)
