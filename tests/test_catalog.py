"""Catalog reading: CSV and folder layouts, bad rows with reasons, the bad-row threshold."""

from __future__ import annotations

import shutil

import pytest

from recommender.catalog import check_bad_fraction, read_catalog
from recommender.errors import CatalogError


def write_csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def photo_folder(tmp_path, image_files):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        shutil.copy(image_files["rgb_jpeg"], tmp_path / name)
    return tmp_path


def test_csv_with_chosen_columns(photo_folder):
    path = write_csv(
        photo_folder / "cat.csv",
        "sku,photo,kind,colour,title\n1,a.jpg,shirt,red,Red shirt\n2,b.jpg,shoe,blue,Blue shoe\n",
    )
    catalog = read_catalog(path, image_column="photo", id_column="sku", label_columns=["kind", "colour"])
    assert [row.id for row in catalog.rows] == ["1", "2"]
    assert catalog.rows[0].labels == {"kind": "shirt", "colour": "red"}
    assert catalog.rows[0].extra == {"title": "Red shirt"}
    assert catalog.rows[0].path == photo_folder / "a.jpg"
    assert catalog.label_columns == ["kind", "colour"] and catalog.bad_rows == [] and catalog.total == 2


def test_image_path_is_the_id_without_id_column(photo_folder):
    path = write_csv(photo_folder / "cat.csv", "file,label\na.jpg,shirt\nb.jpg,shoe\n")
    assert [row.id for row in read_catalog(path).rows] == ["a.jpg", "b.jpg"]


def test_paths_are_relative_to_the_csv_folder(photo_folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "photos").mkdir()
    shutil.copy(photo_folder / "a.jpg", elsewhere / "photos" / "a.jpg")
    path = write_csv(elsewhere / "cat.csv", "file,label\nphotos/a.jpg,shirt\n")
    row = read_catalog(path).rows[0]
    assert row.path == (elsewhere / "photos" / "a.jpg").resolve() and row.path.is_absolute()
    assert read_catalog(path).image_root == elsewhere.resolve()


def test_photos_outside_the_image_root_are_bad_rows(photo_folder, tmp_path_factory):
    """``../x``, an absolute path elsewhere and a symlinked folder leaving the CSV's folder are
    bad rows with their reason; an explicit image root that holds them admits them."""
    shop = tmp_path_factory.mktemp("shop")
    catalogs = shop / "catalogs"
    catalogs.mkdir()
    shutil.copy(photo_folder / "a.jpg", shop / "secret.png")
    shutil.copy(photo_folder / "b.jpg", catalogs / "inside.jpg")
    (catalogs / "linked").symlink_to(photo_folder)  # a folder link leading out of the catalog folder
    text = (
        "id,file,label\n1,inside.jpg,x\n2,../secret.png,x\n"
        f"3,{photo_folder / 'c.jpg'},x\n4,linked/d.jpg,x\n5,{catalogs / 'inside.jpg'},x\n"
    )
    path = write_csv(catalogs / "cat.csv", text)
    catalog = read_catalog(path, id_column="id")
    assert [row.id for row in catalog.rows] == ["1", "5"]  # an absolute path inside the root is fine
    reasons = {bad.id: bad.reason for bad in catalog.bad_rows}
    assert set(reasons) == {"2", "3", "4"}
    assert reasons["2"] == (
        f"image path resolves to {(shop / 'secret.png').resolve()}, outside the image root {catalogs.resolve()} "
        "(see --image-root)"
    )
    assert f"resolves to {(photo_folder / 'c.jpg').resolve()}, outside" in reasons["3"]
    assert f"resolves to {(photo_folder / 'd.jpg').resolve()}, outside" in reasons["4"]
    # A missing file outside the root is refused for leaving the root, the first problem.
    missing = read_catalog(write_csv(catalogs / "m.csv", "file,label\n../nothing.jpg,x\ninside.jpg,x\n"))
    assert "outside the image root" in missing.bad_rows[0].reason

    wider = read_catalog(path, id_column="id", image_root=shop)
    assert [row.id for row in wider.rows] == ["1", "2", "5"] and wider.image_root == shop.resolve()
    assert wider.rows[1].path == (shop / "secret.png").resolve()
    with pytest.raises(CatalogError, match="image root .* is not a folder"):
        read_catalog(path, image_root=shop / "nowhere")


def test_folder_catalog_confines_its_photos(tmp_path, image_files):
    (tmp_path / "shirt").mkdir()
    shutil.copy(image_files["rgb_jpeg"], tmp_path / "shirt" / "0.jpg")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jpg"
    shutil.copy(image_files["rgb_jpeg"], outside)
    (tmp_path / "shirt" / "1.jpg").symlink_to(outside)
    catalog = read_catalog(tmp_path, label_columns=["category"])
    assert [row.id for row in catalog.rows] == ["shirt/0.jpg"] and catalog.total == 2
    assert catalog.bad_rows[0].id == "shirt/1.jpg" and "outside the image root" in catalog.bad_rows[0].reason


def test_bad_rows_are_reported_with_reasons(photo_folder):
    text = "id,file,label\n1,a.jpg,shirt\n2,missing.jpg,shirt\n1,b.jpg,shoe\n4,c.jpg,\n5,,shoe\n6,d.jpg,shoe\n"
    catalog = read_catalog(write_csv(photo_folder / "cat.csv", text), id_column="id")
    assert [row.id for row in catalog.rows] == ["1", "6"]
    reasons = {bad.line: bad.reason for bad in catalog.bad_rows}
    assert reasons[3] == "image file not found"
    assert reasons[4].startswith("duplicate id (first on line 2)")
    assert "empty label" in reasons[5]
    assert "empty 'file'" in reasons[6]
    assert catalog.total == 6


def test_missing_columns_are_named(photo_folder):
    path = write_csv(photo_folder / "cat.csv", "path,category\na.jpg,shirt\n")
    with pytest.raises(CatalogError, match="missing column.*file.*label.*header has: path, category"):
        read_catalog(path)


def test_missing_empty_and_binary_catalogs(tmp_path, image_files):
    with pytest.raises(CatalogError, match="not found"):
        read_catalog(tmp_path / "nope.csv")
    with pytest.raises(CatalogError, match="empty file"):
        read_catalog(write_csv(tmp_path / "empty.csv", ""))
    with pytest.raises(CatalogError, match="no data rows"):
        read_catalog(write_csv(tmp_path / "header.csv", "file,label\n"))
    with pytest.raises(CatalogError, match="UTF-8"):
        read_catalog(image_files["truncated_jpeg"])


def test_folder_of_class_folders(tmp_path, image_files):
    for label in ("shirt", "shoe"):
        (tmp_path / label).mkdir()
        for number in range(2):
            shutil.copy(image_files["rgb_jpeg"], tmp_path / label / f"{number}.jpg")
    (tmp_path / "shoe" / "notes.txt").write_text("not an image")
    catalog = read_catalog(tmp_path, label_columns=["category"])
    assert [(row.id, row.labels["category"]) for row in catalog.rows] == [
        ("shirt/0.jpg", "shirt"),
        ("shirt/1.jpg", "shirt"),
        ("shoe/0.jpg", "shoe"),
        ("shoe/1.jpg", "shoe"),
    ]


def test_split_filter(photo_folder):
    text = "file,split,label\na.jpg,train,x\nb.jpg,test,x\nc.jpg,validation,y\n"
    catalog = read_catalog(write_csv(photo_folder / "cat.csv", text), splits=["train", "validation"])
    assert [row.image for row in catalog.rows] == ["a.jpg", "c.jpg"]
    assert catalog.total == 2


def test_bad_fraction_threshold(photo_folder):
    text = "file,label\na.jpg,x\nmissing.jpg,x\nb.jpg,y\nc.jpg,y\n"
    catalog = read_catalog(write_csv(photo_folder / "cat.csv", text))
    check_bad_fraction(catalog.total, catalog.bad_rows, 0.25)  # 1 of 4 is allowed
    with pytest.raises(CatalogError, match=r"(?s)1 of 4 catalog rows are bad.*line 3.*image file not found") as caught:
        check_bad_fraction(catalog.total, catalog.bad_rows, 0.2)
    assert len(caught.value.bad_rows) == 1
