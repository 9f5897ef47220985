"""Catalog reading and validation: a CSV manifest or a folder of class folders -> rows.

A catalog is a list of products, each with an id, one image file and one or more labels.
Reading checks what can be checked without decoding (file present, id unique, labels
non-empty); image decoding errors are found during feature extraction. Both kinds of bad
row are collected as :class:`BadRow` and judged together by :func:`check_bad_fraction`:
a build tolerates a few bad rows but refuses a catalog where too many are bad.

Photos are confined to an image root: the CSV's folder, the folder catalog itself, or an
explicit ``image_root`` (``--image-root``). A row whose image path resolves (symlinks
followed, ``os.path.realpath``) outside it is a bad row, and each good row's path is that
absolute resolved path, so a bundle serves its photos from any working directory.
:func:`open_catalog_image` is the serving side: it opens a recorded photo only inside the
recorded root, never through a symlink, and only while its size and sha256 are the build's.
"""

from __future__ import annotations

import csv
import hashlib
import os
import stat
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from recommender.errors import CatalogError, CatalogImageError

#: File endings taken from a folder-of-class-folders catalog.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

#: How many bad rows an error message lists before summarising the rest.
MAX_LISTED_BAD_ROWS = 20


@dataclass(frozen=True)
class CatalogRow:
    """One product.

    Attributes:
        id: unique product id (the image path as written when no id column is given).
        image: the image path as written in the catalog (relative to the catalog's folder).
        path: the image's absolute path on disk, symlinks resolved (inside the image root).
        labels: label column -> value, in the order of the label columns.
        extra: the row's other columns (e.g. title, split), kept for display.
        line: 1-based line in the CSV (header is line 1); 0 for folder catalogs.
        tags: the row's multi-label tags (with a tags column), sorted, no repeats.
    """

    id: str
    image: str
    path: Path
    labels: dict[str, str]
    extra: dict[str, str] = field(default_factory=dict)
    line: int = 0
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class BadRow:
    """A row left out of the build, and why.

    ``sha256`` is set where the photo's bytes were read but would not decode: the same bytes
    fail the same way, so a rebuild that finds them again knows the row without decoding it.
    """

    line: int
    id: str
    image: str
    reason: str
    sha256: str | None = None

    def describe(self) -> str:
        """One line for logs and error messages."""
        where = f"line {self.line}" if self.line else self.image
        return f"{where} (id {self.id!r}): {self.reason}"

    def to_json(self) -> dict:
        """JSON-ready form for the bundle's build report."""
        found = {"line": self.line, "id": self.id, "image": self.image, "reason": self.reason}
        return {**found, "sha256": self.sha256} if self.sha256 else found


@dataclass(frozen=True)
class DisplayColumns:
    """The catalog columns a shop shows with each product (their values are in ``extra``).

    Attributes:
        title: the product title (``--title-column``; ``title`` when the catalog has it), or None.
        price: the price as written (``--price-column``), or None.
        url: the product page's URL (``--url-column``), or None.
    """

    title: str | None = None
    price: str | None = None
    url: str | None = None

    def flags(self) -> list[tuple[str, str]]:
        """``(flag, column)`` of each role given a column."""
        named = (("--title-column", self.title), ("--price-column", self.price), ("--url-column", self.url))
        return [(flag, column) for flag, column in named if column]


@dataclass
class Catalog:
    """Rows that passed reading checks, the ones that did not, and where they came from.

    Attributes:
        rows: the good rows, in catalog order.
        bad_rows: rows rejected so far, with reasons.
        label_columns: label column names; the first is the primary class.
        root: folder that relative image paths are resolved against.
        source: the catalog path as given.
        total: number of data rows read (good + bad).
        tags_column: the multi-label column, or None.
        display: which columns hold each product's title, price and URL.
        image_root: the folder every row's photo lies in (absolute, symlinks resolved): the
            explicit image root, else ``root``'s; None only for catalogs made in code.
    """

    rows: list[CatalogRow]
    bad_rows: list[BadRow]
    label_columns: list[str]
    root: Path
    source: str
    total: int
    tags_column: str | None = None
    display: DisplayColumns = field(default_factory=DisplayColumns)
    image_root: Path | None = None

    def without(self, ids: set[str]) -> Catalog:
        """Returns a copy with the rows whose id is in ``ids`` removed (bad rows kept)."""
        return Catalog(
            rows=[row for row in self.rows if row.id not in ids],
            bad_rows=list(self.bad_rows),
            label_columns=list(self.label_columns),
            root=self.root,
            source=self.source,
            total=self.total,
            tags_column=self.tags_column,
            display=self.display,
            image_root=self.image_root,
        )


def read_catalog(
    source: str | Path,
    *,
    image_column: str = "file",
    id_column: str | None = None,
    label_columns: list[str] | tuple[str, ...] = ("label",),
    split_column: str = "split",
    splits: list[str] | tuple[str, ...] | None = None,
    tags_column: str | None = None,
    tags_separator: str = "|",
    display: DisplayColumns | None = None,
    image_root: str | Path | None = None,
) -> Catalog:
    """Reads a CSV manifest or a folder of class folders.

    Args:
        source: a ``.csv`` file, or a folder whose subfolders are class names.
        image_column: CSV column with the image path, relative to the CSV's folder.
        id_column: CSV column with the product id; without it the image path is the id.
        label_columns: one or more label columns; the first is the primary class. A folder
            catalog has one label column, named by the first entry.
        split_column: column that names each row's split, used only with ``splits``.
        splits: if given, keep only rows whose ``split_column`` is one of these.
        tags_column: CSV column holding several tags per product (multi-label), or None.
            An empty cell means no tags.
        tags_separator: what separates the tags in one cell.
        display: the title, price and URL columns; a title column left None is ``title``
            when the CSV has one. Their values are kept in each row's ``extra``.
        image_root: the folder photos must lie in (default: the CSV's folder, or the folder
            catalog itself). Relative image paths are still relative to the CSV's folder; a
            row whose photo resolves outside the root is a bad row.

    Returns:
        The catalog, with rows that failed reading checks in ``bad_rows``.

    Raises:
        CatalogError: the catalog is missing, empty, or lacks a named column; the image root
            is not a folder.
    """
    label_columns = list(label_columns)
    if not label_columns:
        raise CatalogError("at least one label column is needed")
    if len(set(label_columns)) != len(label_columns):
        raise CatalogError(f"label columns repeat: {label_columns}")
    if tags_column is not None and tags_column in label_columns:
        raise CatalogError(f"column {tags_column!r} cannot be both a label column and the tags column")
    if tags_column is not None and not tags_separator:
        raise CatalogError("the tags separator cannot be empty")
    path = Path(source)
    if not path.exists():
        raise CatalogError(f"catalog not found: {path}")
    if image_root is not None and not Path(image_root).is_dir():
        raise CatalogError(f"image root {image_root} is not a folder")
    confine = _real(image_root if image_root is not None else (path if path.is_dir() else path.parent))
    if path.is_dir():
        if splits:
            raise CatalogError("--split filters need a CSV catalog with a split column")
        if tags_column:
            raise CatalogError("a tags column needs a CSV catalog")
        if display is not None and display.flags():
            raise CatalogError(f"{display.flags()[0][0]} needs a CSV catalog")
        return _read_folder(path, label_columns[0], confine)
    return _read_csv(
        path,
        image_column,
        id_column,
        label_columns,
        split_column,
        splits,
        tags_column,
        tags_separator,
        confine,
        display=display,
    )


def _real(path: str | os.PathLike) -> Path:
    """The absolute path with every symlink resolved (``os.path.realpath``)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def outside_root_reason(real: Path, image_root: Path) -> str | None:
    """Why a resolved photo path may not be built from, or None when it lies inside the root."""
    if real == image_root or real.is_relative_to(image_root):
        return None
    return f"image path resolves to {real}, outside the image root {image_root} (see --image-root)"


def _read_folder(folder: Path, label_column: str, image_root: Path) -> Catalog:
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise CatalogError(f"{folder}: no class folders (expected FOLDER/<class>/<image>)")
    rows: list[CatalogRow] = []
    bad: list[BadRow] = []
    for class_dir in class_dirs:
        for image_path in sorted(class_dir.rglob("*")):
            if image_path.is_file() and image_path.suffix.lower() in IMAGE_SUFFIXES:
                relative = image_path.relative_to(folder).as_posix()
                real = _real(image_path)
                reason = outside_root_reason(real, image_root)
                if reason is not None:
                    bad.append(BadRow(line=0, id=relative, image=relative, reason=reason))
                    continue
                rows.append(CatalogRow(id=relative, image=relative, path=real, labels={label_column: class_dir.name}))
    if not rows and not bad:
        raise CatalogError(f"{folder}: no image files in its class folders")
    return Catalog(
        rows=rows,
        bad_rows=bad,
        label_columns=[label_column],
        root=folder,
        source=str(folder),
        total=len(rows) + len(bad),
        image_root=image_root,
    )


def _read_csv(
    path: Path,
    image_column: str,
    id_column: str | None,
    label_columns: list[str],
    split_column: str,
    splits,
    tags_column: str | None = None,
    tags_separator: str = "|",
    image_root: Path | None = None,
    display: DisplayColumns | None = None,
) -> Catalog:
    image_root = image_root or _real(path.parent)
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as error:
        raise CatalogError(f"cannot open catalog {path}: {error.strerror}") from None
    with handle:
        try:
            reader = csv.DictReader(handle)
            header = reader.fieldnames
            if not header:
                raise CatalogError(f"{path}: empty file, expected a CSV header line")
            needed = (
                [image_column, *label_columns]
                + ([id_column] if id_column else [])
                + ([split_column] if splits else [])
                + ([tags_column] if tags_column else [])
            )
            missing = [column for column in needed if column not in header]
            if missing:
                raise CatalogError(
                    f"{path}: missing column(s) {', '.join(missing)}; the header has: {', '.join(header)} "
                    f"(choose columns with --image-column, --id-column, --label-column, --tags-column)"
                )
            display = _display_columns(path, header, display or DisplayColumns())
            records = list(reader)
        except UnicodeDecodeError:
            raise CatalogError(f"{path}: not a UTF-8 text CSV file") from None
        except csv.Error as error:
            raise CatalogError(f"{path}: malformed CSV ({error})") from None
    if splits:
        wanted = set(splits)
        records = [
            (line, r) for line, r in enumerate(records, start=2) if (r.get(split_column) or "").strip() in wanted
        ]
    else:
        records = list(enumerate(records, start=2))
    if not records:
        raise CatalogError(f"{path}: no data rows" + (f" in split(s) {', '.join(splits)}" if splits else ""))

    root = path.parent
    rows: list[CatalogRow] = []
    bad: list[BadRow] = []
    seen_ids: dict[str, int] = {}
    shown = {column for _, column in display.flags()}  # kept in extra even when also a label or id
    for line, record in records:
        image = (record.get(image_column) or "").strip()
        row_id = (record.get(id_column) or "").strip() if id_column else image
        reason = None
        if None in record:
            reason = "more fields than the header has columns"
        elif not image:
            reason = f"empty {image_column!r}"
        elif not row_id:
            reason = f"empty id in column {id_column!r}"
        elif row_id in seen_ids:
            reason = f"duplicate id (first on line {seen_ids[row_id]})"
        else:
            empty = [c for c in label_columns if not (record.get(c) or "").strip()]
            if empty:
                reason = f"empty label in column(s) {', '.join(empty)}"
        image_path = _real(root / image) if image else root
        if reason is None:
            reason = outside_root_reason(image_path, image_root)
        if reason is None and not image_path.is_file():
            reason = "image file not found" if not image_path.exists() else "image path is not a file"
        if reason is not None:
            bad.append(BadRow(line=line, id=row_id, image=image, reason=reason))
            continue
        seen_ids[row_id] = line
        labels = {c: record[c].strip() for c in label_columns}
        extra = {
            k: (v or "")
            for k, v in record.items()
            if k is not None and (k in shown or (k not in labels and k not in (image_column, id_column, tags_column)))
        }
        tags = split_tags(record.get(tags_column) or "", tags_separator) if tags_column else ()
        rows.append(
            CatalogRow(id=row_id, image=image, path=image_path, labels=labels, extra=extra, line=line, tags=tags)
        )
    return Catalog(
        rows=rows,
        bad_rows=bad,
        label_columns=label_columns,
        root=root,
        source=str(path),
        total=len(records),
        tags_column=tags_column,
        display=display,
        image_root=image_root,
    )


def _display_columns(path: Path, header: list[str], display: DisplayColumns) -> DisplayColumns:
    """The display columns with the default title column resolved; a named column must exist."""
    for flag, column in display.flags():
        if column not in header:
            raise CatalogError(f"{path}: no column {column!r} for {flag}; the header has: {', '.join(header)}")
    if display.title is None and "title" in header:
        return DisplayColumns(title="title", price=display.price, url=display.url)
    return display


def split_tags(cell: str, separator: str) -> tuple[str, ...]:
    """``"v-neck| striped |v-neck"`` -> ``("striped", "v-neck")``: stripped, no empties, no repeats."""
    return tuple(sorted({tag.strip() for tag in cell.split(separator) if tag.strip()}, key=str))


def describe_bad_rows(bad_rows: list[BadRow], limit: int = MAX_LISTED_BAD_ROWS) -> str:
    """Formats bad rows one per line, listing at most ``limit`` of them."""
    lines = [f"  {bad.describe()}" for bad in bad_rows[:limit]]
    if len(bad_rows) > limit:
        lines.append(f"  ... and {len(bad_rows) - limit} more")
    return "\n".join(lines)


def check_bad_fraction(total: int, bad_rows: list[BadRow], max_bad_fraction: float) -> None:
    """Refuses a catalog where more than ``max_bad_fraction`` of the rows are bad.

    Raises:
        CatalogError: too many bad rows (the error lists them and carries them in ``bad_rows``).
    """
    if total and len(bad_rows) / total > max_bad_fraction:
        raise CatalogError(
            f"{len(bad_rows)} of {total} catalog rows are bad ({len(bad_rows) / total:.1%}, "
            f"limit --max-bad-fraction {max_bad_fraction:g}):\n{describe_bad_rows(bad_rows)}",
            bad_rows=bad_rows,
        )


def label_counts(rows: list[CatalogRow], column: str) -> Counter:
    """Counts the values of one label column."""
    return Counter(row.labels[column] for row in rows)


def drop_rare_classes(rows: list[CatalogRow], column: str, min_examples: int) -> tuple[list[int], list[BadRow]]:
    """Leaves out the rows whose class in ``column`` has fewer than ``min_examples`` rows.

    Off by default: a class too small to hold a row out for validation still trains on all
    its rows (see ``classifier.stratified_split``); this is the opt-in ``--min-class-examples``
    for shops that would rather not learn such classes.

    Args:
        rows: the catalog rows (e.g. those with features).
        column: the label column to count (the primary class).
        min_examples: the least number of rows a class needs; 0 or 1 keeps every row.

    Returns:
        ``(positions of the rows kept, the other rows as bad rows, each with its reason)``.
    """
    counts = label_counts(rows, column)
    kept, dropped = [], []
    for position, row in enumerate(rows):
        value = row.labels[column]
        if counts[value] >= min_examples:
            kept.append(position)
        else:
            reason = (
                f"class {value!r} of column {column!r} has {counts[value]} row(s), "
                f"fewer than --min-class-examples {min_examples}"
            )
            dropped.append(BadRow(line=row.line, id=row.id, image=row.image, reason=reason))
    return kept, dropped


# -- serving catalog photos ------------------------------------------------------------------

#: How many verified photos :func:`open_catalog_image` remembers (path, sha256 -> file stamp).
VERIFIED_CACHE_SIZE = 100_000

_verified: OrderedDict[tuple[str, str], tuple[int, ...]] = OrderedDict()
_verified_lock = threading.Lock()


@dataclass(frozen=True)
class CatalogImage:
    """A catalog photo as served: its bytes, checked against the bundle's record.

    Attributes:
        data: the file's content (its sha256 is the record's).
        path: the absolute path it was read from.
        mtime: its modification time (seconds since the epoch), for ``Last-Modified``.
    """

    data: bytes
    path: str
    mtime: float


def open_catalog_image(record, image_root: str | None) -> CatalogImage:
    """Reads a bundle's catalog photo, only if it is still the file the bundle was built from.

    The rule is the resolved path: ``os.path.realpath(record.path)`` must lie inside
    ``image_root`` (for a bundle without a recorded root, before format 3: must be
    ``record.path`` itself, which the build resolved). The file is then opened one path
    component at a time from the root with ``O_NOFOLLOW``, so a symlink swapped in after the
    check is refused too. Its size must be the record's ``bytes`` and its sha256 the record's
    ``sha256``; the hash is computed once per file state (device, inode, size, mtime, ctime)
    and remembered, so a hot photo is not hashed on every request.

    Args:
        record: the photo's ``manifest.CatalogRecord``.
        image_root: the manifest's ``catalog.image_root`` (None for older bundles).

    Returns:
        The photo's bytes, path and mtime.

    Raises:
        CatalogImageError: ``reason`` ``missing`` (no such file, or not a regular file),
            ``outside_root`` (it resolves outside the root, or a path component is a symlink)
            or ``changed`` (size or sha256 differ from the build's).
    """
    real = os.path.realpath(record.path)
    root = image_root if image_root is not None else os.path.sep
    if image_root is None and real != record.path:
        raise CatalogImageError(f"{record.path} is now a symlink (to {real})", "outside_root")
    if outside_root_reason(Path(real), Path(root)) is not None:
        raise CatalogImageError(f"{record.path} resolves to {real}, outside the image root {root}", "outside_root")
    descriptor = _open_inside(root, Path(real).relative_to(root).parts, record.path)
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(handle.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise CatalogImageError(f"{record.path} is not a regular file", "missing")
        if record.bytes is not None and status.st_size != record.bytes:
            raise CatalogImageError(
                f"{record.path} has {status.st_size} bytes, the bundle recorded {record.bytes} (changed)", "changed"
            )
        data = handle.read()
    key = (record.path, record.sha256)
    stamp = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    with _verified_lock:
        known = _verified.get(key) == stamp
        if known:
            _verified.move_to_end(key)
    if not known:
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise CatalogImageError(f"{record.path} does not match its sha256 in the bundle (changed)", "changed")
        with _verified_lock:
            _verified[key] = stamp
            while len(_verified) > VERIFIED_CACHE_SIZE:
                _verified.popitem(last=False)
    return CatalogImage(data=data, path=real, mtime=status.st_mtime)


def _open_inside(root: str, parts: tuple[str, ...], shown: str) -> int:
    """Opens ``root/parts...`` for reading without following a symlink at any component."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    directory_flags = flags | getattr(os, "O_DIRECTORY", 0)
    try:
        current = os.open(root, directory_flags)
    except OSError as error:
        raise CatalogImageError(f"image root {root} cannot be opened ({error.strerror})", "missing") from None
    try:
        for position, part in enumerate(parts):
            last = position == len(parts) - 1
            try:
                opened = os.open(part, flags if last else directory_flags, dir_fd=current)
            except FileNotFoundError:
                raise CatalogImageError(f"{shown} is missing", "missing") from None
            except OSError as error:  # ELOOP / ENOTDIR: a symlink took a component's place
                raise CatalogImageError(f"{shown} cannot be opened inside the image root ({error.strerror})",
                                        "outside_root") from None  # fmt: skip
            os.close(current)
            current = opened
        if not parts:
            raise CatalogImageError(f"{shown} is the image root itself, not a file", "missing")
        return current
    except BaseException:
        os.close(current)
        raise
