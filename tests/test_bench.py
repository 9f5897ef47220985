"""The benchmark scripts run in their --quick mode, so they cannot rot: table printed, JSON written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def run_quick(quick_runs: dict, script: str) -> tuple[str, dict]:
    """Waits for this session's ``bench/<script>.py --quick`` (conftest's ``quick_runs``) and checks it.

    Returns:
        Its stdout and the JSON it wrote.
    """
    run = quick_runs[script].result()
    assert run.returncode == 0, run.stderr[-3000:]
    path = RESULTS / f"{script}-quick.json"
    assert run.mtime is not None and run.mtime >= run.started - 1, f"{path} was not rewritten"
    payload = json.loads(run.json_text)
    assert payload["machine"]["cores"] == os.cpu_count()
    assert len(payload["load_average"]["before"]) == 3
    assert "machine:" in run.stdout and f"wrote {path}" in run.stdout
    return run.stdout, payload


def test_extraction_quick(quick_runs):
    output, payload = run_quick(quick_runs, "extraction")
    assert "(a) original" in output and "(b) pipeline" in output and "(c) bare" in output
    assert payload["results"], "no backbone measured"
    for result in payload["results"]:
        rates = result["images_per_s"]
        assert set(rates) == {"original", "pipeline", "bare"}
        assert all(rate > 0 for rate in rates.values())
        assert result["pipeline_vs_original"] == pytest.approx(rates["pipeline"] / rates["original"])
        assert result["images"] == 8


def test_search_quick(quick_runs):
    output, payload = run_quick(quick_runs, "search")
    methods = {row["method"] for row in payload["rows"]}
    assert methods == {
        "original (scipy loop)",
        "numpy brute force",
        "faiss flat",
        "faiss hnsw",
        "faiss ivf-sq8+refine",
    }
    assert {row["data"] for row in payload["rows"]} == {"clothing", "clustered"}
    for row in payload["rows"]:
        assert row["p50_ms"] > 0 and row["memory_mb"] > 0
        if row["method"] in ("faiss hnsw", "faiss ivf-sq8+refine"):
            # 2,000 vectors: both approximate indexes find nearly all of the exact neighbours.
            assert 0.9 <= row["recall_at_6"] <= 1.0
        else:
            assert row["recall_at_6"] is None


def test_query_quick(quick_runs):
    output, payload = run_quick(quick_runs, "query")
    bundles = [result["bundle"] for result in payload["results"]]
    assert bundles == ["flip-averaged (default)", "no flips"]
    flipped, plain = payload["results"]
    assert flipped["flip_average"] is True and plain["flip_average"] is False
    for result in payload["results"]:
        assert result["queries"] == 5
        assert result["query"]["p50_ms"] > result["parts"]["search"]["p50_ms"] > 0
        assert result["ratio_p50"] == pytest.approx(result["query"]["p50_ms"] / result["bare_forward"]["p50_ms"])
        # The numpy re-computation of the classifier must be the same function.
        assert result["parts"]["classifier_in_numpy"]["max_relative_difference"] < 1e-4


def test_multihead_quick(quick_runs):
    output, payload = run_quick(quick_runs, "multihead")
    heads = payload["heads"]
    assert len(heads) >= 2
    for design in ("one_model", "separate_models"):
        entry = payload[design]
        assert set(entry["accuracy"]) == set(heads)
        assert all(0.0 <= value <= 1.0 for value in entry["accuracy"].values())
        assert entry["per_query"]["p50_ms"] > 0
    assert len(payload["separate_models"]["epochs"]) == len(heads)


def test_filtered_quick(quick_runs):
    output, payload = run_quick(quick_runs, "filtered")
    assert "target: filtered <= 2x unfiltered at >= 5% match" in output
    rows = payload["rows"]
    assert {(row["kind"], row["filter"]) for row in rows} == {
        ("flat", "random"),
        ("hnsw", "random"),
        ("hnsw", "same"),
        ("hnsw", "other"),
        ("hnsw", "scan-max"),
        ("hnsw", "walk-min"),
    }
    for row in rows:
        assert row["filtered_p50_ms"] > 0 and row["unfiltered_p50_ms"] > 0
        assert row["ratio_p50"] == pytest.approx(row["filtered_p50_ms"] / row["unfiltered_p50_ms"])
        assert sum(row["method"].values()) == payload["queries"]
        if row["method"] == {"exact scan": payload["queries"]}:
            assert row["recall_at_6"] == 1.0  # an exact scan is brute force over the subset
        else:
            assert 0.0 <= row["recall_at_6"] <= 1.0
        assert (row["target_met"] is None) == (row["share"] < 0.05)
    # The quick catalog (20,000 items) exercises both sides of the switch-over.
    methods = {method for row in rows for method in row["method"]}
    assert methods == {"exact scan", "hnsw + selector"}
    assert all(row["mask_p50_ms"] > 0 for row in rows if row["filter"] in ("random", "same", "other"))


@pytest.mark.slow
def test_quality_quick(quick_runs):
    """The multi-catalog quality suite on a fashion-products-small subset: every head beside its probe."""
    from conftest import skip_without_shared

    skip_without_shared()
    output, payload = run_quick(quick_runs, "quality")
    result = payload["catalogs"]["fashion-products-small"]
    summary = result["summary"]
    assert result["primary"] == "articleType" and len(result["heads"]) == 7
    assert set(summary["heads"]) == set(result["heads"])
    for column, figures in summary["heads"].items():
        for key in ("accuracy", "macro_f1"):
            assert 0.0 <= figures[key]["mean"] <= 1.0, (column, key)
        assert 0.0 < figures["probe_accuracy"] <= 1.0
    # Even 3 epochs on 400 rows beat chance by far on the coarse heads; the probe is a real fit.
    assert summary["heads"]["masterCategory"]["accuracy"]["mean"] > 0.8
    assert summary["heads"]["masterCategory"]["probe_accuracy"] > 0.8
    assert "alone_accuracy" in summary["heads"]["articleType"]
    assert 0.0 < summary["raw_p_at_6"] < 1.0 and 0.0 < summary["p_at_6"]["mean"] < 1.0
    assert set(summary["checks"]) >= {"articleType vs probe", "cost of the other heads", "P@6 vs raw"}
    assert "fashion-products-small: catalog" in output and "P@6 (articleType)" in output


def test_index_kinds_quick(quick_runs):
    output, payload = run_quick(quick_runs, "index_kinds")
    assert {row["kind"] for row in payload["rows"]} == {"flat", "ivf-sq8", "ivf-pq"}
    for row in payload["rows"]:
        assert row["n"] == 3000 and row["catalog_rows"] == 3000
        assert row["rss_mb"]["after_queries"]["total"] > 0
        for setting in row["settings"]:
            assert setting["p50_ms"] > 0 and 0.9 <= setting["recall_at_6"] <= 1.0
        if row["kind"] != "flat":
            assert row["rerank_file_mb"] == pytest.approx(3000 * 512 * 2 / 1e6, rel=0.01)
    assert row["parameters"]["factory"].startswith("OPQ")
    # The 10M figures are computed (not measured here) and say so.
    assert "computed, 10,000,000 x 512-d" in output


def test_panels_quick(quick_runs):
    output, payload = run_quick(quick_runs, "panels")
    assert payload["k"] == 6 and "item endpoint" in output
    (job,) = payload["job"]
    assert job["items"] == 2000 and job["index"] == "flat" and job["folder_mb"] > 0
    assert (
        min(job["panels_items_per_s"], job["panels_per_column_items_per_s"], job["one_search_per_item_items_per_s"]) > 0
    )
    # The tiny bundle, then it inflated to 2,000 items: each answered live and from its panels.
    assert [entry["bundle_items"] for entry in payload["endpoint"]] == [96, 2000]
    for entry in payload["endpoint"]:
        for source in ("live", "panels"):
            assert entry[source]["requests"] == 50 and 0 < entry[source]["p50_ms"] <= entry[source]["p95_ms"]


def test_ray_extraction_quick(quick_runs):
    """48 photos through the in-process loop and through Ray actors (in ``unshare -n``): same bits, both reported."""
    from conftest import skip_without_shared
    from test_ray_engine import namespace_problem

    pytest.importorskip("ray.data", reason="the Ray engine needs ray[data]")
    skip_without_shared()
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)
    output, payload = run_quick(quick_runs, "ray_extraction")
    assert payload["images"] == 48 and payload["max_difference"] == 0.0
    rows = {row["run"]: row for row in payload["rows"]}
    assert set(rows) == {"in process", "ray job", "ray incl. start"}
    assert all(row["images"] == 48 and row["img_per_s"] > 0 for row in rows.values())
    assert rows["in process"]["share_of_local"] == 1.0
    assert f"{rows['ray job']['share_of_local']:8.2f}" in output
