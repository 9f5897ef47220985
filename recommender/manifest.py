"""The data a bundle hands from the build to its readers, typed: :class:`Manifest` and :class:`CatalogRecord`.

``manifest.json`` and each line of ``catalog.jsonl`` are written by the build
(``indexer.build``) and read by the query engine, the nightly rebuild, the web app, the
demo and ``evaluate``. Each is a frozen dataclass with ``to_json``/``from_json``, validated
here and only here: a malformed file fails once, as one :class:`BundleError` naming the
field (``counts.items: expected an integer, got 'lots'``), instead of as a ``KeyError``
deep inside a reader. Readers use attributes, never string keys.

Layout of ``manifest.json`` (format version 3; versions 1 and 2 lack ``backbone.file``,
``catalog.image_root`` and the records' ``bytes``, and are read without them)::

    format_version, bundle_id, created_at, libraries {name: version}
    backbone   {spec {name, weights, input_size, seed}, identity {key, ...},
                file {path, source} | null}
    catalog    {source, label_columns [..], hierarchy [..] | null, tags_column | null,
                title_column | null, price_column | null, url_column | null,
                image_root | null}
    embedding  {dimension, flip_average, layer}
    index      {kind, size, parameters {factory, nlist, nprobe, pq_subquantizers, pq_bits,
                rerank_factor, training_points, hnsw_links, ef_search} | absent,
                bytes_per_vector, rerank_bytes_per_vector, embeddings_file,
                recall_at_6, recall_queries}   (all but kind and size absent before the
                compressed kinds; such bundles read as flat / hnsw records without them)
    counts     {items, catalog_rows, bad_rows, classes {column: n}, taxonomy_paths, tags}
    metrics    the classifier's build metrics (heads.COLUMN.validation_accuracy, ...)
    self_retrieval, max_pixels
    files      {relative path: {sha256, bytes}}
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from recommender.errors import BundleError

#: ``max_pixels`` of bundles that predate the field (the engine's limit then).
DEFAULT_MAX_PIXELS = 40_000_000


class _Reader:
    """Reads fields of one JSON object, naming the dotted path of whatever is wrong."""

    def __init__(self, payload: Any, where: str, source: str):
        self.where = where
        self.source = source
        if not isinstance(payload, Mapping):
            self.fail("", f"expected an object, got {_shown(payload)}")
        self.payload = payload

    def fail(self, name: str, problem: str):
        path = ".".join(part for part in (self.where, name) if part) or "(top level)"
        raise BundleError(f"{self.source}: {path}: {problem}")

    def child(self, name: str, optional: bool = False) -> _Reader | None:
        value = self.get(name, optional=optional)
        if value is None:
            return None
        return _Reader(value, ".".join(part for part in (self.where, name) if part), self.source)

    def get(self, name: str, optional: bool = False):
        if name not in self.payload:
            if optional:
                return None
            self.fail(name, "missing")
        value = self.payload[name]
        if value is None and not optional:
            self.fail(name, "missing (null)")
        return value

    def string(self, name: str, optional: bool = False) -> str | None:
        value = self.get(name, optional)
        if value is not None and not isinstance(value, str):
            self.fail(name, f"expected a string, got {_shown(value)}")
        return value

    def integer(self, name: str, optional: bool = False, minimum: int | None = 0) -> int | None:
        value = self.get(name, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"expected an integer, got {_shown(value)}")
        if minimum is not None and value < minimum:
            self.fail(name, f"expected an integer >= {minimum}, got {value}")
        return value

    def number(self, name: str, optional: bool = False) -> float | None:
        value = self.get(name, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(name, f"expected a finite number, got {_shown(value)}")
        return float(value)

    def boolean(self, name: str, optional: bool = False) -> bool | None:
        value = self.get(name, optional)
        if value is not None and not isinstance(value, bool):
            self.fail(name, f"expected true or false, got {_shown(value)}")
        return value

    def strings(self, name: str, optional: bool = False) -> tuple[str, ...] | None:
        value = self.get(name, optional)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.fail(name, f"expected a list of strings, got {_shown(value)}")
        return tuple(value)

    def string_map(self, name: str, optional: bool = False) -> Mapping[str, str] | None:
        value = self.get(name, optional)
        if value is None:
            return None
        if not isinstance(value, Mapping) or not all(
            isinstance(key, str) and isinstance(item, str) for key, item in value.items()
        ):
            self.fail(name, f"expected an object of strings, got {_shown(value)}")
        return MappingProxyType(dict(value))

    def mapping(self, name: str, optional: bool = False) -> Mapping[str, Any] | None:
        value = self.get(name, optional)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.fail(name, f"expected an object, got {_shown(value)}")
        return MappingProxyType(dict(value))


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain(value):
    """JSON-ready copy of a value that may hold read-only mappings and tuples."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class FileEntry:
    """One file of a bundle: its sha256 (hex) and size in bytes."""

    sha256: str
    bytes: int


@dataclass(frozen=True)
class BackboneFile:
    """The file a file-backed backbone was loaded from, carried inside the bundle.

    Attributes:
        path: where the bundle keeps its copy, relative to the bundle (``backbone/NAME``); its
            sha256 and size are in the manifest's ``files`` like every other file.
        source: the absolute path it was copied from at build time (for the record only: a
            loaded bundle never opens it).
    """

    path: str
    source: str


@dataclass(frozen=True)
class BackboneRecord:
    """The backbone a bundle was built with.

    Attributes:
        spec: what re-creates it (``recommender.backbones.BackboneSpec`` fields), with file
            paths as resolved at build time.
        identity: what it is (kind, weights, feature width, the weights' sha256 ...);
            ``identity_key`` is compared with the loaded backbone's so a bundle never meets
            other features.
        file: the bundle's copy of a TFLite model or explicit weights file; None for ImageNet
            weights (identified by ``identity["weights_sha256"]``, found in the Keras cache),
            random init (``backbone.weights.h5``) and bundles before format version 3.
    """

    name: str
    weights: str
    input_size: int
    seed: int
    identity: Mapping[str, Any]
    file: BackboneFile | None = None

    @property
    def identity_key(self) -> str:
        return self.identity["key"]

    @property
    def spec(self):
        """The :class:`recommender.backbones.BackboneSpec` that re-creates the backbone."""
        from recommender.backbones import BackboneSpec

        return BackboneSpec(name=self.name, weights=self.weights, input_size=self.input_size, seed=self.seed)

    def to_json(self) -> dict:
        payload = {
            "spec": {"name": self.name, "weights": self.weights, "input_size": self.input_size, "seed": self.seed},
            "identity": _plain(self.identity),
        }
        if self.file is not None:
            payload["file"] = {"path": self.file.path, "source": self.file.source}
        return payload


@dataclass(frozen=True)
class CatalogInfo:
    """Which catalog and which of its columns the bundle was trained on, and which it shows.

    ``title_column``, ``price_column`` and ``url_column`` name the ``extra`` columns that hold
    each product's title, price and product URL (``--title-column`` ...); None where the
    build had none, and in bundles that predate them (readers then use a ``title`` column).

    ``image_root`` is the folder (absolute, symlinks resolved) every catalog photo lay in at
    build time; the web app serves only files inside it. None in bundles before format 3.
    """

    source: str
    label_columns: tuple[str, ...]
    hierarchy: tuple[str, ...] | None = None
    tags_column: str | None = None
    title_column: str | None = None
    price_column: str | None = None
    url_column: str | None = None
    image_root: str | None = None

    @property
    def primary_column(self) -> str:
        """The primary class (``recommender.labels.primary_column_of``): the hierarchy's leaf, else the first column."""
        from recommender.labels import primary_column_of

        return primary_column_of(self.label_columns, self.hierarchy)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "label_columns": list(self.label_columns),
            "hierarchy": list(self.hierarchy) if self.hierarchy else None,
            "tags_column": self.tags_column,
            "title_column": self.title_column,
            "price_column": self.price_column,
            "url_column": self.url_column,
            "image_root": self.image_root,
        }


@dataclass(frozen=True)
class Counts:
    """Sizes: indexed items, catalog rows read, rows left out, classes per column, paths, tags."""

    items: int
    catalog_rows: int
    bad_rows: int
    classes: Mapping[str, int]
    taxonomy_paths: int | None = None
    tags: int = 0

    def to_json(self) -> dict:
        return {
            "items": self.items,
            "catalog_rows": self.catalog_rows,
            "bad_rows": self.bad_rows,
            "classes": dict(self.classes),
            "taxonomy_paths": self.taxonomy_paths,
            "tags": self.tags,
        }


@dataclass(frozen=True)
class IndexParameters:
    """How the FAISS index was built and is searched (None: does not apply to its kind).

    Attributes:
        factory: the ``faiss.index_factory`` string (``IVF4000,SQ8``, ``OPQ64,IVF4000,PQ64``).
        nlist: inverted lists of an IVF kind.
        nprobe: lists scanned per query.
        pq_subquantizers: PQ codes per vector (bytes per vector at 8 bits), ``m``.
        pq_bits: bits per PQ code (8, fewer on tiny catalogs).
        rerank_factor: an IVF kind searches ``rerank_factor * k`` candidates on its codes and
            re-ranks them by exact L2 against ``embeddings.f16.npy``.
        training_points: the seeded sample the quantizers were trained on.
        hnsw_links: HNSW's ``M``.
        ef_search: HNSW's ``efSearch``.
    """

    factory: str | None = None
    nlist: int | None = None
    nprobe: int | None = None
    pq_subquantizers: int | None = None
    pq_bits: int | None = None
    rerank_factor: int | None = None
    training_points: int | None = None
    hnsw_links: int | None = None
    ef_search: int | None = None

    @classmethod
    def from_reader(cls, reader: _Reader | None) -> IndexParameters:
        if reader is None:
            return cls()
        return cls(
            factory=reader.string("factory", optional=True),
            nlist=reader.integer("nlist", optional=True, minimum=1),
            nprobe=reader.integer("nprobe", optional=True, minimum=1),
            pq_subquantizers=reader.integer("pq_subquantizers", optional=True, minimum=1),
            pq_bits=reader.integer("pq_bits", optional=True, minimum=1),
            rerank_factor=reader.integer("rerank_factor", optional=True, minimum=1),
            training_points=reader.integer("training_points", optional=True, minimum=1),
            hnsw_links=reader.integer("hnsw_links", optional=True, minimum=1),
            ef_search=reader.integer("ef_search", optional=True, minimum=1),
        )

    def to_json(self) -> dict:
        """The parameters that apply (None ones left out)."""
        return {name: value for name, value in self.__dict__.items() if value is not None}


@dataclass(frozen=True)
class IndexRecord:
    """The manifest's ``index``: which FAISS index the bundle holds and how good it is.

    Bundles from before the compressed kinds record only ``kind`` and ``size``; the rest is
    then None (and ``parameters`` empty).

    Attributes:
        kind: ``flat``, ``hnsw``, ``ivf-sq8`` or ``ivf-pq`` (``recommender.index``).
        size: vectors in the index.
        parameters: how it was built and is searched.
        bytes_per_vector: estimated resident bytes per vector of the loaded index, its
            fixed parts (centroids, rotation, tables) spread over the vectors
            (``recommender.index.resident_bytes``).
        rerank_bytes_per_vector: bytes per vector of ``embeddings_file`` (float16, memory-mapped,
            so not resident; 0 for flat and HNSW, which store float32 vectors inside).
        embeddings_file: the bundle's (n, d) float16 standardized embeddings for exact
            re-ranking and item vectors (IVF kinds), or None.
        recall_at_6: recall@6 of the index against exact search, measured at build on
            ``recall_queries`` seeded catalog vectors.
        recall_queries: how many.
    """

    kind: str = "flat"
    size: int | None = None
    parameters: IndexParameters = field(default_factory=IndexParameters)
    bytes_per_vector: float | None = None
    rerank_bytes_per_vector: int | None = None
    embeddings_file: str | None = None
    recall_at_6: float | None = None
    recall_queries: int | None = None

    @classmethod
    def from_reader(cls, reader: _Reader | None) -> IndexRecord:
        if reader is None:
            return cls()
        recall = reader.number("recall_at_6", optional=True)
        if recall is not None and not 0.0 <= recall <= 1.0:
            reader.fail("recall_at_6", f"expected a share from 0 to 1, got {recall}")
        return cls(
            kind=reader.string("kind", optional=True) or "flat",
            size=reader.integer("size", optional=True),
            parameters=IndexParameters.from_reader(reader.child("parameters", optional=True)),
            bytes_per_vector=reader.number("bytes_per_vector", optional=True),
            rerank_bytes_per_vector=reader.integer("rerank_bytes_per_vector", optional=True),
            embeddings_file=reader.string("embeddings_file", optional=True),
            recall_at_6=recall,
            recall_queries=reader.integer("recall_queries", optional=True),
        )

    def to_json(self) -> dict:
        """``{kind, size}`` plus whatever else is recorded (an old record writes back unchanged)."""
        payload: dict[str, Any] = {"kind": self.kind, "size": self.size}
        parameters = self.parameters.to_json()
        if parameters:
            payload["parameters"] = parameters
        for name in (
            "bytes_per_vector",
            "rerank_bytes_per_vector",
            "embeddings_file",
            "recall_at_6",
            "recall_queries",
        ):
            value = getattr(self, name)
            if value is not None:
                payload[name] = value
        return payload


@dataclass(frozen=True)
class HeadMetrics:
    """One head's figures on the build's validation split (None where it had no rows)."""

    validation_accuracy: float | None
    validation_macro_f1: float | None = None


@dataclass(frozen=True)
class BuildMetrics:
    """The classifier's build metrics.

    ``heads`` is typed; the rest (split sizes, ``hierarchy``, ``tags``, ``baseline``,
    ``config``, epochs ...) stays as recorded, read-only, in ``recorded`` and round-trips
    unchanged; ``recommender.baseline.BuildBaseline.from_json`` reads ``get("baseline")``.
    """

    heads: Mapping[str, HeadMetrics]
    recorded: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, payload, source: str = "metrics") -> BuildMetrics:
        reader = _Reader(payload or {}, "metrics", source)
        heads = {}
        head_reader = reader.child("heads", optional=True)
        for column in head_reader.payload if head_reader else ():
            entry = head_reader.child(column)
            heads[column] = HeadMetrics(
                validation_accuracy=entry.number("validation_accuracy", optional=True),
                validation_macro_f1=entry.number("validation_macro_f1", optional=True),
            )
        return cls(heads=MappingProxyType(heads), recorded=MappingProxyType(dict(reader.payload)))

    def get(self, name: str, default=None):
        """A recorded figure other than the heads (e.g. ``"hierarchy"``, ``"tags"``, ``"reused_from"``)."""
        return self.recorded.get(name, default)

    def accuracy(self, column: str) -> float | None:
        """The validation accuracy of ``column``'s head, None when not recorded."""
        head = self.heads.get(column)
        return head.validation_accuracy if head else None

    def to_json(self) -> dict:
        return _plain(self.recorded)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: what a bundle is and everything needed to check it (see the module docstring)."""

    format_version: int
    bundle_id: str
    backbone: BackboneRecord
    catalog: CatalogInfo
    embedding_dimension: int
    flip_average: bool
    index: IndexRecord
    counts: Counts
    metrics: BuildMetrics
    files: Mapping[str, FileEntry]
    created_at: str | None = None
    libraries: Mapping[str, str] = field(default_factory=dict)
    embedding_layer: str = "embedding"
    self_retrieval: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def primary_column(self) -> str:
        return self.catalog.primary_column

    @property
    def index_kind(self) -> str:
        """The FAISS index kind (``index.kind``)."""
        return self.index.kind

    @property
    def index_size(self) -> int | None:
        """Vectors in the index (``index.size``)."""
        return self.index.size

    @classmethod
    def from_json(cls, payload, source: str = "manifest.json") -> Manifest:
        """Validates a parsed ``manifest.json``.

        Args:
            payload: the parsed JSON.
            source: named in errors (usually the manifest's path).

        Raises:
            BundleError: the first missing or malformed field, by its dotted path.
        """
        reader = _Reader(payload, "", source)
        backbone = reader.child("backbone")
        spec = backbone.child("spec")
        identity = backbone.child("identity")
        identity.string("key")
        unknown = sorted(set(spec.payload) - {"name", "weights", "input_size", "seed"})
        if unknown:
            spec.fail(unknown[0], "unknown field (a bundle from a newer version?)")
        backbone_file = backbone.child("file", optional=True)
        catalog = reader.child("catalog", optional=True)
        embedding = reader.child("embedding")
        index = reader.child("index", optional=True)
        counts = reader.child("counts")
        classes = counts.child("classes", optional=True)
        files = reader.child("files")
        entries = {}
        for name in files.payload:
            entry = files.child(name)
            entries[name] = FileEntry(sha256=entry.string("sha256"), bytes=entry.integer("bytes"))
        known = {
            "format_version",
            "bundle_id",
            "created_at",
            "libraries",
            "backbone",
            "catalog",
            "embedding",
            "index",
            "counts",
            "metrics",
            "self_retrieval",
            "max_pixels",
            "files",
        }
        return cls(
            format_version=reader.integer("format_version"),
            bundle_id=reader.string("bundle_id"),
            created_at=reader.string("created_at", optional=True),
            libraries=reader.string_map("libraries", optional=True) or MappingProxyType({}),
            backbone=BackboneRecord(
                name=spec.string("name"),
                weights=spec.string("weights"),
                input_size=spec.integer("input_size", minimum=1),
                seed=spec.integer("seed", minimum=None),
                identity=MappingProxyType(dict(identity.payload)),
                file=BackboneFile(path=backbone_file.string("path"), source=backbone_file.string("source"))
                if backbone_file
                else None,
            ),
            catalog=CatalogInfo(
                source=catalog.string("source", optional=True) or "",
                label_columns=catalog.strings("label_columns", optional=True) or (),
                hierarchy=catalog.strings("hierarchy", optional=True),
                tags_column=catalog.string("tags_column", optional=True),
                title_column=catalog.string("title_column", optional=True),
                price_column=catalog.string("price_column", optional=True),
                url_column=catalog.string("url_column", optional=True),
                image_root=catalog.string("image_root", optional=True),
            )
            if catalog
            else CatalogInfo(source="", label_columns=tuple(classes.payload) if classes else ()),
            embedding_dimension=embedding.integer("dimension", minimum=1),
            flip_average=bool(embedding.boolean("flip_average", optional=True)),
            embedding_layer=embedding.string("layer", optional=True) or "embedding",
            index=IndexRecord.from_reader(index),
            counts=Counts(
                items=counts.integer("items"),
                catalog_rows=counts.integer("catalog_rows", optional=True) or counts.payload.get("items"),
                bad_rows=counts.integer("bad_rows", optional=True) or 0,
                classes=MappingProxyType({column: classes.integer(column) for column in classes.payload})
                if classes
                else MappingProxyType({}),
                taxonomy_paths=counts.integer("taxonomy_paths", optional=True),
                tags=counts.integer("tags", optional=True) or 0,
            ),
            metrics=BuildMetrics.from_json(reader.mapping("metrics", optional=True), source),
            self_retrieval=reader.number("self_retrieval", optional=True),
            max_pixels=reader.integer("max_pixels", optional=True, minimum=1) or DEFAULT_MAX_PIXELS,
            files=MappingProxyType(entries),
            extra=MappingProxyType({key: value for key, value in reader.payload.items() if key not in known}),
        )

    def to_json(self) -> dict:
        """The JSON object :meth:`from_json` reads back to an equal manifest."""
        payload = {
            "format_version": self.format_version,
            "bundle_id": self.bundle_id,
            "created_at": self.created_at,
            "libraries": dict(self.libraries),
            "backbone": self.backbone.to_json(),
            "catalog": self.catalog.to_json(),
            "embedding": {
                "dimension": self.embedding_dimension,
                "flip_average": self.flip_average,
                "layer": self.embedding_layer,
            },
            "index": self.index.to_json(),
            "counts": self.counts.to_json(),
            "metrics": self.metrics.to_json(),
            "self_retrieval": self.self_retrieval,
            "max_pixels": self.max_pixels,
            **_plain(self.extra),
            "files": {name: {"sha256": entry.sha256, "bytes": entry.bytes} for name, entry in self.files.items()},
        }
        return payload


@dataclass(frozen=True)
class CatalogRecord:
    """One line of ``catalog.jsonl``: an indexed product (line i is FAISS id i).

    Attributes:
        id: the product id.
        image: the image path as written in the catalog.
        path: the image's absolute path at build time, symlinks resolved (inside the
            manifest's ``catalog.image_root``), so any working directory serves it.
        sha256: hex digest of the image bytes (the feature store's key).
        bytes: the image file's size at build time; None in bundles before format 3.
        labels: label column -> value.
        extra: the row's other columns (title, price ...), kept for display.
        tags: the row's tags (with a tags column), sorted; None without one.
    """

    id: str
    image: str
    path: str
    sha256: str
    labels: Mapping[str, str]
    extra: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] | None = None
    bytes: int | None = None

    @classmethod
    def from_row(cls, row, sha256: str, with_tags: bool, size: int | None = None) -> CatalogRecord:
        """The record of a build's ``recommender.catalog.CatalogRow`` whose image hashes to ``sha256``.

        Args:
            row: the catalog row.
            sha256: the hex digest of its image bytes.
            with_tags: the catalog has a tags column.
            size: the image's size in bytes (read from the file when not given).
        """
        path = os.path.realpath(row.path)
        return cls(
            id=row.id,
            image=row.image,
            path=path,
            bytes=os.stat(path).st_size if size is None else size,
            sha256=sha256,
            labels=MappingProxyType(dict(row.labels)),
            extra=MappingProxyType(dict(row.extra)),
            tags=tuple(row.tags) if with_tags else None,
        )

    @classmethod
    def from_json(cls, payload, source: str = "catalog.jsonl") -> CatalogRecord:
        """Validates one parsed line.

        Raises:
            BundleError: a missing or malformed field, named with ``source`` (file and line).
        """
        reader = _Reader(payload, "", source)
        return cls(
            id=reader.string("id"),
            image=reader.string("image"),
            path=reader.string("path"),
            sha256=reader.string("sha256"),
            bytes=reader.integer("bytes", optional=True),
            labels=reader.string_map("labels"),
            extra=reader.string_map("extra", optional=True) or MappingProxyType({}),
            tags=reader.strings("tags", optional=True),
        )

    def to_json(self) -> dict:
        record = {
            "id": self.id,
            "image": self.image,
            "path": self.path,
            "sha256": self.sha256,
            "labels": dict(self.labels),
            "extra": dict(self.extra),
        }
        if self.bytes is not None:
            record["bytes"] = self.bytes
        if self.tags is not None:
            record["tags"] = list(self.tags)
        return record
