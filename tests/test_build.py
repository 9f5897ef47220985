"""Building bundles: reports, the feature cache across builds, bad rows and their threshold."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from indexer.build import build_bundle, prepare_catalog
from recommender.errors import BundleError, CatalogError

#: The one product of :func:`make_catalog_with_a_singleton` whose class and colour no other row has.
SINGLETON_ID = "single-grid"


def short_training(config):
    """``config`` with two epochs and no baseline check: for builds whose tests are about rows
    and the feature cache, not about what the classifier learns."""
    return replace(config, train=replace(config.train, max_epochs=2, baseline=False))


def test_session_build_report(tiny_build):
    _, report = tiny_build
    assert report.items == 96 and report.bad_rows == [] and report.self_retrieval == 1.0
    assert report.extracted + report.cached == 96


def test_second_build_extracts_nothing_and_trains_on_a_sample_above_train_sample(
    generated_catalog, tiny_config, tiny_build, tmp_path
):
    from recommender.classifier import SAMPLE_FLOOR
    from recommender.engine import load_bundle

    assert tiny_build[1].train_rows == 96  # below --train-sample: every row
    config = replace(short_training(tiny_config), train_sample=40)
    report = build_bundle(generated_catalog, tmp_path / "again", config)
    assert report.extracted == 0 and report.cached == 96
    # Four classes of 24 keep their floor of rows each; every item is still indexed.
    assert report.train_rows == 4 * SAMPLE_FLOOR and report.items == 96
    bundle = load_bundle(tmp_path / "again", use_gpu=False)
    assert bundle.index.size == 96
    assert set(bundle.label_space.classes_of("label")) == {row.labels["label"] for row in bundle.rows}
    assert set(bundle.label_space.classes_of("colour")) == {row.labels["colour"] for row in bundle.rows}


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
    report = build_bundle(catalog, tmp_path / "b", replace(short_training(tiny_config), max_bad_fraction=0.06))
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


def make_catalog_with_a_singleton(generated_catalog):
    """The generated catalog plus one product whose class (``grid``) and colour (``green``)
    no other row has, as shop catalogs' long tails do; returns its CSV path."""
    import numpy as np
    from conftest import TINY_SIZE

    from recommender.synthetic import COLOURS, draw_product

    folder = generated_catalog.parent
    image = folder / "images" / f"{SINGLETON_ID}.jpg"
    if not image.exists():
        draw_product("grid", COLOURS["green"], TINY_SIZE, np.random.default_rng(5)).save(image, quality=92)
    row = f"{SINGLETON_ID},images/{SINGLETON_ID}.jpg,grid,green,prints,lines,cool|lined,Green grid T-shirt"
    path = folder / "with-singleton.csv"
    path.write_text("\n".join(generated_catalog.read_text().splitlines() + [row]) + "\n")
    return path


def test_min_class_examples_leaves_small_classes_out_as_bad_rows(generated_catalog, tiny_config):
    catalog = make_catalog_with_a_singleton(generated_catalog)
    prepared = prepare_catalog(catalog, replace(tiny_config, min_class_examples=2))
    reason = "class 'grid' of column 'label' has 1 row(s), fewer than --min-class-examples 2"
    assert [(bad.id, bad.line, bad.reason) for bad in prepared.bad_rows] == [(SINGLETON_ID, 98, reason)]
    assert len(prepared.extraction.rows) == 96 and SINGLETON_ID not in {row.id for row in prepared.extraction.rows}
    # These rows count toward --max-bad-fraction like any bad row.
    with pytest.raises(CatalogError, match=r"(?s)1 of 97 catalog rows are bad.*limit --max-bad-fraction 0.005.*grid"):
        prepare_catalog(catalog, replace(tiny_config, min_class_examples=2, max_bad_fraction=0.005))
