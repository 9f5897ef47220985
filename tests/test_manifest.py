"""The typed manifest and catalog records: real bundles round-trip, malformed ones fail once, by field."""

from __future__ import annotations

import copy
import json

import pytest

from recommender.errors import BundleError
from recommender.manifest import CatalogRecord, Manifest


def _manifest_json(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "attribute_bundle"])
def test_built_manifests_round_trip_and_read_by_attribute(bundle_fixture, request):
    bundle = request.getfixturevalue(bundle_fixture)
    payload = _manifest_json(bundle)
    manifest = Manifest.from_json(payload)

    assert manifest.to_json() == payload
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.counts.items == payload["counts"]["items"] == len(manifest_rows(bundle))
    assert manifest.backbone.identity_key == payload["backbone"]["identity"]["key"]
    assert manifest.backbone.spec.input_size == payload["backbone"]["spec"]["input_size"]
    assert set(manifest.files) == set(payload["files"])
    for column, head in payload["metrics"]["heads"].items():
        assert manifest.metrics.accuracy(column) == head["validation_accuracy"]


def manifest_rows(bundle) -> list[CatalogRecord]:
    lines = (bundle / "catalog.jsonl").read_text(encoding="utf-8").splitlines()
    return [CatalogRecord.from_json(json.loads(line)) for line in lines]


def test_primary_column_is_the_hierarchy_leaf(attribute_bundle, tiny_bundle):
    hierarchical = Manifest.from_json(_manifest_json(attribute_bundle))
    assert hierarchical.catalog.hierarchy, "the attribute bundle is built with a hierarchy"
    assert hierarchical.primary_column == hierarchical.catalog.hierarchy[-1]
    flat = Manifest.from_json(_manifest_json(tiny_bundle))
    assert flat.primary_column == flat.catalog.label_columns[0]


def test_catalog_records_round_trip(attribute_bundle):
    lines = (attribute_bundle / "catalog.jsonl").read_text(encoding="utf-8").splitlines()
    for line in lines:
        payload = json.loads(line)
        record = CatalogRecord.from_json(payload)
        assert record.to_json() == payload
        assert record.tags is not None  # this bundle has a tags column


def _broken(payload: dict, edit) -> dict:
    payload = copy.deepcopy(payload)
    edit(payload)
    return payload


MALFORMED = {
    "backbone: {}": (lambda m: m.update(backbone={}), "backbone.spec: missing"),
    "counts: {}": (lambda m: m.update(counts={}), "counts.items: missing"),
    "file without bytes": (lambda m: next(iter(m["files"].values())).pop("bytes"), ".bytes: missing"),
    "max_pixels lots": (lambda m: m.update(max_pixels="lots"), "max_pixels: expected an integer, got 'lots'"),
    "unknown spec key": (lambda m: m["backbone"]["spec"].update(colour="red"), "backbone.spec.colour: unknown field"),
    "items negative": (lambda m: m["counts"].update(items=-1), "counts.items: expected an integer >= 0"),
    "identity without key": (lambda m: m["backbone"]["identity"].pop("key"), "backbone.identity.key: missing"),
    "accuracy as text": (
        lambda m: next(iter(m["metrics"]["heads"].values())).update(validation_accuracy="high"),
        "validation_accuracy: expected a finite number",
    ),
    "not an object": (lambda m: m.update(embedding=[512]), "embedding: expected an object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_is_one_bundle_error_naming_the_field(case, tiny_bundle):
    edit, message = MALFORMED[case]
    with pytest.raises(BundleError, match="manifest.json: ") as raised:
        Manifest.from_json(_broken(_manifest_json(tiny_bundle), edit))
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.pop("sha256"), "line 3: sha256: missing"),
        (lambda r: r.update(labels={"label": 7}), "line 3: labels: expected an object of strings"),
        (lambda r: r.update(tags="red"), "line 3: tags: expected a list of strings"),
    ],
)
def test_malformed_catalog_record_names_line_and_field(edit, message, tiny_bundle):
    line = (tiny_bundle / "catalog.jsonl").read_text(encoding="utf-8").splitlines()[2]
    with pytest.raises(BundleError) as raised:
        CatalogRecord.from_json(_broken(json.loads(line), edit), source="catalog.jsonl line 3")
    assert message in str(raised.value)


def test_catalog_file_with_a_broken_line_names_file_and_line(tmp_path, tiny_bundle):
    from recommender.bundle import read_catalog_rows

    lines = (tiny_bundle / "catalog.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    (tmp_path / "catalog.jsonl").write_text("\n".join([lines[0], "{not json", lines[2]]) + "\n", encoding="utf-8")
    with pytest.raises(BundleError, match=r"catalog.jsonl line 2: not valid JSON"):
        read_catalog_rows(tmp_path, 3)
    (tmp_path / "catalog.jsonl").write_bytes(lines[0].encode() + b"\n\xff\xfe\n")
    with pytest.raises(BundleError, match=r"catalog.jsonl line 2: not valid JSON"):
        read_catalog_rows(tmp_path, 2)
    (tmp_path / "catalog.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [row.id for row in read_catalog_rows(tmp_path, 3)] == [json.loads(line)["id"] for line in lines]
    with pytest.raises(BundleError, match="catalog.jsonl has 3 rows, the manifest says 4"):
        read_catalog_rows(tmp_path, 4)


def _rehash(bundle, name: str) -> None:
    """Records ``name``'s new size and sha256 in the manifest, so only its content is wrong."""
    import hashlib

    manifest = _manifest_json(bundle)
    data = (bundle / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def _edit_manifest(edit):
    def apply(bundle):
        manifest = _manifest_json(bundle)
        edit(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")

    return apply


def _edit_catalog_line(edit):
    def apply(bundle):
        lines = (bundle / "catalog.jsonl").read_text(encoding="utf-8").splitlines()
        lines[1] = edit(lines[1])
        (bundle / "catalog.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        _rehash(bundle, "catalog.jsonl")

    return apply


def _without_sha256(line: str) -> str:
    record = json.loads(line)
    record.pop("sha256")
    return json.dumps(record)


#: Issue 12's malformed bundles: each must be one `error:` line from the CLI and one BundleError
#: from the web app's factory, naming the file and field (line), never a traceback.
MALFORMED_BUNDLES = {
    "backbone: {}": (_edit_manifest(lambda m: m.update(backbone={})), "manifest.json: backbone.spec: missing"),
    "counts: {}": (_edit_manifest(lambda m: m.update(counts={})), "manifest.json: counts.items: missing"),
    "file without bytes": (
        _edit_manifest(lambda m: m["files"]["labels.json"].pop("bytes")),
        "manifest.json: files.labels.json.bytes: missing",
    ),
    "max_pixels lots": (
        _edit_manifest(lambda m: m.update(max_pixels="lots")),
        "manifest.json: max_pixels: expected an integer, got 'lots'",
    ),
    "unknown spec key": (
        _edit_manifest(lambda m: m["backbone"]["spec"].update(colour="red")),
        "manifest.json: backbone.spec.colour: unknown field",
    ),
    "bad catalog.jsonl line": (_edit_catalog_line(lambda line: "{not json"), "catalog.jsonl line 2: not valid JSON"),
    "row without sha256": (_edit_catalog_line(_without_sha256), "catalog.jsonl line 2: sha256: missing"),
}


@pytest.mark.parametrize("case", list(MALFORMED_BUNDLES))
def test_malformed_bundle_is_one_error_line_from_the_cli_and_the_web_app(
    case, tiny_bundle, generated_catalog, tmp_path, capsys
):
    import shutil

    from recommender.cli import main
    from webapp import create_app

    edit, message = MALFORMED_BUNDLES[case]
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    edit(bundle)
    photo = next(generated_catalog.parent.rglob("*.jpg"))
    code = main(["query", "--bundle", str(bundle), str(photo)])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err
    assert "Traceback" not in captured.err
    if "catalog.jsonl" in message:
        return  # read after the model loads, by the same load_bundle as below: the CLI run is enough
    with pytest.raises(BundleError) as raised:
        create_app({"bundle": str(bundle), "reload_interval_s": 0})
    assert message in str(raised.value)


def test_catalog_records_decode_each_row_as_written_and_give_their_columns_without_decoding(tmp_path, tiny_bundle):
    from recommender.bundle import read_catalog_rows
    from recommender.records import CatalogRecords, same_photo_positions

    lines = (tiny_bundle / "catalog.jsonl").read_text(encoding="utf-8").splitlines()
    parsed = [json.loads(line) for line in lines]
    parsed[1] = {**parsed[1], "tags": ["sale", "new"], "labels": {"label": parsed[1]["labels"]["label"]}}
    parsed[4] = {**parsed[4], "sha256": parsed[2]["sha256"]}  # a duplicate listing of row 2's photo
    (tmp_path / "catalog.jsonl").write_text("".join(json.dumps(p) + "\n" for p in parsed), encoding="utf-8")
    rows = read_catalog_rows(tmp_path, len(parsed))

    assert isinstance(rows, CatalogRecords) and len(rows) == len(parsed)
    expected = [CatalogRecord.from_json(p) for p in parsed]
    assert list(rows) == expected and rows[-1] == expected[-1] and rows[2:5] == expected[2:5]
    with pytest.raises(IndexError):
        rows[len(parsed)]
    assert rows.ids == [p["id"] for p in parsed]
    assert rows.label_values("colour") == [p["labels"].get("colour") for p in parsed]  # row 1 has none
    assert rows.label_values("label") == [p["labels"]["label"] for p in parsed]
    assert rows.tag_values()[:3] == [None, ("sale", "new"), None] == [row.tags for row in expected[:3]]
    by_hash = same_photo_positions(rows)
    assert by_hash.get(parsed[2]["sha256"]) == [2, 4] and parsed[4]["sha256"] in by_hash
    assert by_hash.get(parsed[0]["sha256"], []) == [0] and by_hash.get("0" * 64, []) == [] and "0" * 64 not in by_hash
    assert same_photo_positions(expected).get(parsed[2]["sha256"]) == [2, 4]  # from plain records too
    # The last line may lack its newline.
    (tmp_path / "catalog.jsonl").write_text("\n".join(lines[:2]), encoding="utf-8")
    assert read_catalog_rows(tmp_path, 2)[1].id == parsed[1]["id"]
