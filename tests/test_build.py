"""Building bundles: reports, the feature cache across builds, bad rows and their threshold."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from indexer.build import build_bundle
from recommender.errors import BundleError, CatalogError


def test_session_build_report(tiny_build):
    _, report = tiny_build
    assert report.items == 96 and report.bad_rows == [] and report.self_retrieval == 1.0
    assert report.extracted + report.cached == 96


def test_second_build_extracts_nothing(generated_catalog, tiny_config, tiny_build, tmp_path):
    report = build_bundle(generated_catalog, tmp_path / "again", tiny_config)
    assert report.extracted == 0 and report.cached == 96


def test_existing_bundle_is_not_overwritten(generated_catalog, tiny_config, tiny_bundle):
    with pytest.raises(BundleError, match="already exists"):
        build_bundle(generated_catalog, tiny_bundle, tiny_config)


def make_catalog_with_bad_rows(generated_catalog, tmp_path, image_files, bad_count):
    folder = generated_catalog.parent
    shutil.copy(image_files["truncated_jpeg"], folder / "broken.jpg")
    shutil.copy(image_files["text_file"], folder / "text.jpg")
    lines = generated_catalog.read_text().splitlines()
    bad = [
        "bad-missing,images/nope.jpg,plain,red,x",
        "bad-truncated,broken.jpg,plain,red,x",
        f"{lines[1].split(',')[0]},{lines[2].split(',')[1]},plain,red,duplicate id",
        "bad-empty-label,images/plain-red-000.jpg,,red,x",
        "bad-text,text.jpg,plain,red,x",
    ][:bad_count]
    path = folder / f"with-{bad_count}-bad.csv"
    path.write_text("\n".join(lines + bad) + "\n")
    return path


def test_bad_rows_are_left_out_and_reported(generated_catalog, tiny_config, tmp_path, image_files):
    catalog = make_catalog_with_bad_rows(generated_catalog, tmp_path, image_files, 5)
    report = build_bundle(catalog, tmp_path / "b", replace(tiny_config, max_bad_fraction=0.06))
    reasons = {row["id"]: row["reason"] for row in report.bad_rows}
    assert report.items == 96 and len(reasons) == 5
    assert reasons["bad-missing"] == "image file not found"
    assert "truncated" in reasons["bad-truncated"]
    assert "not an image" in reasons["bad-text"]
    assert "empty label" in reasons["bad-empty-label"]
    assert any("duplicate id" in reason for reason in reasons.values())
    assert (tmp_path / "b" / "build_report.json").is_file()


def test_too_many_bad_rows_fail_with_the_list(generated_catalog, tiny_config, tmp_path, image_files):
    catalog = make_catalog_with_bad_rows(generated_catalog, tmp_path, image_files, 5)
    with pytest.raises(
        CatalogError, match=r"(?s)5 of 101 catalog rows are bad.*bad-missing.*image file not found"
    ) as caught:
        build_bundle(catalog, tmp_path / "b", replace(tiny_config, max_bad_fraction=0.04))
    assert len(caught.value.bad_rows) == 5
    assert not (tmp_path / "b").exists()
