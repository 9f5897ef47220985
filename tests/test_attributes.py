"""Hierarchies, multi-label tags and filtered neighbours through the real build and engine."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import ATTRIBUTE_HIERARCHY, attribute_build_config

from recommender.errors import CatalogError, QueryError
from recommender.images import load_image, read_image_bytes
from recommender.synthetic import PATTERN_TAXONOMY, product_tags


def _catalog_rows(generated_catalog) -> list[dict]:
    with open(generated_catalog, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_build_records_taxonomy_heads_and_tags(attribute_build):
    bundle, report = attribute_build
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format_version"] == 3
    assert (
        manifest["catalog"]["hierarchy"] == list(ATTRIBUTE_HIERARCHY) and manifest["catalog"]["tags_column"] == "tags"
    )
    labels = json.loads((bundle / "labels.json").read_text())
    expected_paths = sorted([list(PATTERN_TAXONOMY[p]) + [p] for p in ("plain", "stripes", "dots", "checks")])
    assert labels["taxonomy"]["paths"] == expected_paths
    assert [h["kind"] for h in labels["heads"]].count("sigmoid") == 1
    assert labels["tags"]["names"] == ["checked", "cool", "dark", "dotted", "striped", "warm"]
    rows = [json.loads(line) for line in (bundle / "catalog.jsonl").read_text().splitlines()]
    for row in rows:
        pattern, colour = row["labels"]["label"], row["labels"]["colour"]
        assert row["tags"] == list(product_tags(pattern, colour))
        assert [row["labels"]["department"], row["labels"]["family"]] == list(PATTERN_TAXONOMY[pattern])
    hierarchy = report.metrics["hierarchy"]
    assert hierarchy["mode"] == "hierarchical" and 0 <= hierarchy["path_score"] <= 3
    tags = report.metrics["tags"]
    assert tags["validation_micro_f1_tuned"] >= tags["validation_micro_f1_at_0.5"]


def test_query_answers_a_valid_path_and_tags_above_threshold(attribute_engine, generated_catalog):
    space = attribute_engine.label_space
    rows = _catalog_rows(generated_catalog)[::5]
    answers = attribute_engine.query_many([generated_catalog.parent / r["file"] for r in rows], k=6)
    valid = set(space.taxonomy.paths)
    right_tags = 0
    for row, answer in zip(rows, answers):
        path = tuple(answer["hierarchy"]["path"])
        assert path in valid
        assert [answer["predicted"][level]["label"] for level in ATTRIBUTE_HIERARCHY] == list(path)
        thresholds = dict(zip(space.tags, space.thresholds))
        assert all(t["probability"] >= thresholds[t["tag"]] for t in answer["tags"])
        right_tags += {t["tag"] for t in answer["tags"]} == set(row["tags"].split("|"))
        assert all("tags" in n for n in answer["neighbors"])
    # Generated shirts: colour and pattern tags are easy even for random-init features.
    assert right_tags / len(rows) >= 0.8


def test_taxonomy_violation_in_the_catalog_is_reported(generated_catalog, session_store, tmp_path):
    from indexer.build import load_catalog, prepare_catalog

    rows = _catalog_rows(generated_catalog)
    broken = next(r for r in rows if r["label"] == "stripes")
    broken["family"] = "shapes"  # stripes sit under lines everywhere else
    path = generated_catalog.parent / "broken_taxonomy.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = attribute_build_config(session_store)
    prepared = prepare_catalog(load_catalog(path, config), config)
    reasons = {bad.id: bad.reason for bad in prepared.bad_rows}
    assert "under family 'shapes' here but under 'lines'" in reasons[broken["id"]]
    assert ("prints", "shapes", "stripes") not in prepared.taxonomy.paths
    assert len(prepared.extraction.rows) == len(rows) - 1
    with pytest.raises(CatalogError, match="one parent"):
        strict = replace(config, max_bad_fraction=0.0)
        prepare_catalog(load_catalog(path, strict), strict)


# -- filtered neighbours ---------------------------------------------------------------------


def _stored_vectors(engine) -> np.ndarray:
    return np.stack([engine.index.reconstruct(i) for i in range(engine.index.size)])


def _brute_force(engine, vectors, query_vector, filters, excluded, k) -> list[str]:
    allowed = []
    for position, row in enumerate(engine.rows):
        if position in excluded:
            continue
        keep = all(
            (set(values) & set(row.tags or ())) if column == "tags" else row.labels[column] in values
            for column, values in filters.items()
        )
        if keep:
            allowed.append(position)
    distances = ((vectors[allowed] - query_vector) ** 2).sum(axis=1)
    order = np.argsort(distances, kind="stable")[:k]
    return [engine.rows[allowed[i]].id for i in order]


def _random_filters(engine, rng) -> dict[str, list[str]]:
    columns = list(engine.attributes.columns)
    chosen = rng.choice(columns, size=int(rng.integers(1, 3)), replace=False)
    filters = {}
    for column in chosen:
        values = sorted(engine.attributes.values(column))
        filters[str(column)] = [
            str(v) for v in rng.choice(values, size=int(rng.integers(1, min(3, len(values)) + 1)), replace=False)
        ]
    return filters


def test_filtered_queries_equal_brute_force_over_the_matching_items(attribute_engine, generated_catalog):
    engine = attribute_engine
    vectors = _stored_vectors(engine)
    rng = np.random.default_rng(0)
    rows = _catalog_rows(generated_catalog)
    short = 0
    for _trial in range(40):
        row = rows[int(rng.integers(len(rows)))]
        image = generated_catalog.parent / row["file"]
        filters = _random_filters(engine, rng)
        k = int(rng.choice([1, 6, 10, 30]))
        answer = engine.query(image, k=k, filters=filters)
        raw = read_image_bytes(image)
        embedding, _ = engine.embed_outputs(load_image(raw, engine.backbone.input_size)[None])
        excluded = set(engine._by_hash.get(raw.sha256, []))
        expected = _brute_force(engine, vectors, embedding[0], filters, excluded, k)
        assert [n["id"] for n in answer["neighbors"]] == expected, (filters, k)
        report = answer["filter"]
        assert report["applied"] == filters and report["complete"] == (len(expected) == k)
        if len(expected) < k:
            short += 1
            assert report["note"].startswith(f"only {len(expected)} " if expected else "no ")
        # similar_to_item with the same filters: brute force from the stored vector
        item = engine.similar_to_item(row["id"], k=k, filters=filters)
        position = engine._by_id[row["id"]]
        same = set(engine._by_hash[engine.rows[position].sha256])
        assert [n["id"] for n in item["neighbors"]] == _brute_force(
            engine, vectors, vectors[position], filters, same, k
        )
    assert short > 0  # some filters matched fewer than k items


def test_match_predicted_searches_within_the_predicted_value(attribute_engine, generated_catalog):
    rows = _catalog_rows(generated_catalog)[::7]
    for row in rows:
        answer = attribute_engine.query(
            generated_catalog.parent / row["file"], k=6, match_predicted=["colour", "family"]
        )
        colour = answer["predicted"]["colour"]["label"]
        family = answer["predicted"]["family"]["label"]
        assert answer["filter"]["applied"] == {"colour": [colour], "family": [family]}
        assert answer["neighbors"] and all(
            n["labels"]["colour"] == colour and n["labels"]["family"] == family for n in answer["neighbors"]
        )


@pytest.mark.parametrize(
    ("filters", "match_predicted", "message"),
    [
        ({"size": "XL"}, (), "size"),
        ({"colour": "purple"}, (), "purple"),
        ({"tags": "sparkly"}, (), "sparkly"),
        ({"colour": []}, (), "colour"),
        ({}, ["tags"], "tags"),
        ({"colour": "red"}, ["colour"], "both"),
    ],
)
def test_bad_filters_are_refused(attribute_engine, generated_catalog, filters, match_predicted, message):
    image = generated_catalog.parent / _catalog_rows(generated_catalog)[0]["file"]
    with pytest.raises(QueryError, match=message):
        attribute_engine.query(image, filters=filters, match_predicted=match_predicted)
    if not match_predicted:
        with pytest.raises(QueryError, match=message):
            attribute_engine.similar_to_item(attribute_engine.rows[0].id, filters=filters)


# -- the combined mode, built through the CLI --------------------------------------------------


def test_cli_builds_combined_mode_and_filters_queries(combined_cli_build, generated_catalog, capsys):
    from recommender.cli import main

    out, code, stderr = combined_cli_build
    assert code == 0, stderr
    assert "hierarchy (combined): path score" in stderr and "tags: validation micro-F1" in stderr
    # Every hierarchy level gets a probe too, also with one head over full paths; tags do not.
    for column in ("label", "colour", "department", "family"):
        assert f"\n{column}: validation accuracy " in stderr
    assert "tags: validation accuracy" not in stderr and "P@6 on validation: embedding " in stderr
    labels = json.loads((out / "labels.json").read_text())
    assert labels["hierarchy_mode"] == "combined"
    assert [h["target"] for h in labels["heads"]] == ["path", "column", "tags"]

    image = generated_catalog.parent / _catalog_rows(generated_catalog)[0]["file"]
    code = main(["query", "--bundle", str(out), "--filter", "colour=blue", "--filter", "tags=dotted", str(image)])
    answer = json.loads(capsys.readouterr().out)
    assert code == 0 and answer["hierarchy"]["mode"] == "combined"
    assert tuple(answer["hierarchy"]["path"]) in {tuple(p) for p in labels["taxonomy"]["paths"]}
    assert answer["neighbors"] and all(
        n["labels"]["colour"] == "blue" and "dotted" in n["tags"] for n in answer["neighbors"]
    )
    for bad in (["--filter", "colour"], ["--filter", "colour=purple"], ["--match-predicted", "size"]):
        code = main(["query", "--bundle", str(out), *bad, str(image)])
        captured = capsys.readouterr()
        assert code == 1 and captured.err.startswith("error: ") and "Traceback" not in captured.err
