"""The query engine: ``load_bundle(path).query(image, k=6)`` -> class + nearest catalog items.

Loading verifies the bundle and loads the backbone, classifier, scalers and index once. A
query is the build's data path up to the embedding (one image -> ``load_image`` -> backbone
-> standardize -> classifier, all heads in one forward pass -> standardize) plus one FAISS
search. The engine is safe to share between threads: Keras/TF calls are thread-safe, the
TFLite interpreter and the FAISS thread setting are guarded by locks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from recommender.bundle import load_bundle_backbone, read_catalog_rows, read_classifier, verify_bundle
from recommender.errors import BundleError, FilterError, QueryError, UnknownItemError
from recommender.images import ImageBytes, ImageSource, load_image, read_image_bytes
from recommender.manifest import CatalogRecord, Manifest
from recommender.records import CatalogRecords, same_photo_positions

log = logging.getLogger(__name__)

DEFAULT_K = 6
MAX_K = 100


@dataclass(frozen=True)
class DecodedImage:
    """A query image read and preprocessed, ready for the forward pass (:meth:`Recommender.decode`).

    Attributes:
        raw: the encoded bytes and their sha256 (self-exclusion looks the hash up).
        pixels: (s, s, 3) uint8 from ``images.load_image`` at the bundle's input size.
    """

    raw: ImageBytes
    pixels: np.ndarray


@dataclass(frozen=True)
class QueryOptions:
    """One query's checked parameters (:meth:`Recommender.query_options`); see :meth:`Recommender.query`.

    Attributes:
        k: neighbours, 1..100.
        exclude_self: leave out catalog items with the image's content hash.
        name: what the answer reports as ``"image"``.
        filters: ``{column: [values]}``, empty for none.
        match_predicted: label columns whose predicted value the neighbours must share.
    """

    k: int = DEFAULT_K
    exclude_self: bool = True
    name: str | None = None
    filters: Mapping[str, list[str]] = field(default_factory=dict)
    match_predicted: tuple[str, ...] = ()


class Recommender:
    """A loaded bundle that answers queries. Create it with :func:`load_bundle`.

    Attributes:
        path: the bundle folder.
        manifest: the verified manifest (``recommender.manifest.Manifest``).
        bundle_id: the bundle's id.
        rows: the catalog records (``recommender.manifest.CatalogRecord``), FAISS order.
        label_space: heads, taxonomy and tags of the classifier.
        label_columns: single-valued label columns.
        primary_column: the primary class (the hierarchy's leaf, else the first column).
        classes: per label column, class names by index.
        attributes: which catalog items hold which label value or tag (for filters).
        title_column, price_column, url_column: the ``extra`` columns holding each item's
            title (``title`` for bundles that predate the field), price and product URL; None
            where the bundle has none.
    """

    def __init__(self, path: Path, manifest: Manifest, backbone, runner, embedding_scaler, index, rows, label_space):
        from recommender.filters import AttributeIndex

        self.path = path
        self.manifest = manifest
        self.bundle_id = manifest.bundle_id
        self.backbone = backbone
        self.runner = runner
        self.embedding_scaler = embedding_scaler
        self.index = index
        self.rows = rows
        self.label_space = label_space
        self.label_columns = label_space.columns
        self.primary_column = label_space.primary_column
        self.classes = label_space.classes
        self.attributes = AttributeIndex(rows, label_space.columns, label_space.tags_column)
        self.flip_average = manifest.flip_average
        self.max_pixels = manifest.max_pixels
        self.title_column = manifest.catalog.title_column or "title"
        self.price_column = manifest.catalog.price_column
        self.url_column = manifest.catalog.url_column
        ids = rows.ids if isinstance(rows, CatalogRecords) else [row.id for row in rows]
        self._by_id = {item_id: position for position, item_id in enumerate(ids)}
        self._by_hash = same_photo_positions(rows)

    # -- embedding ---------------------------------------------------------------------
    def embed_outputs(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Embeds decoded images.

        Args:
            images: (n, s, s, 3) uint8 from ``load_image``.

        Returns:
            ``((n, 512) float32 standardized embeddings, {head name: (n, width) outputs})``.
        """
        from recommender.scalers import transform

        if self.flip_average:  # both views in one backbone call
            both = self.backbone.extract(np.concatenate([images, images[:, :, ::-1]]))
            features, flipped = both[: len(images)], both[len(images) :]
        else:
            features, flipped = self.backbone.extract(images), None
        embeddings, outputs = self.runner.run(features, flipped)
        return transform(self.embedding_scaler, embeddings), outputs

    def embed_images(self, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Embeds decoded images and gives each label column's class probabilities.

        Args:
            images: (n, s, s, 3) uint8 from ``load_image``.

        Returns:
            ``((n, 512) float32 standardized embeddings, per label column (n, classes)
            probabilities)``; hierarchy levels are the consistent (valid-path) marginals.
        """
        embeddings, outputs = self.embed_outputs(images)
        by_column = self.label_space.column_probabilities(outputs)
        return embeddings, [by_column[column].astype(np.float32) for column in self.label_columns]

    # -- queries -----------------------------------------------------------------------
    def query(
        self,
        image: ImageSource | ImageBytes,
        k: int = DEFAULT_K,
        *,
        exclude_self: bool = True,
        name: str | None = None,
        filters: Mapping[str, str | Sequence[str]] | None = None,
        match_predicted: Sequence[str] = (),
    ) -> dict:
        """Predicts the labels of one image and finds its ``k`` nearest catalog items.

        Args:
            image: a path, encoded bytes, a binary file object or ``ImageBytes``.
            k: number of neighbours, 1..100.
            exclude_self: leave out catalog items with the same content hash as the image.
            name: what to report as ``"image"`` (default: the path, or None for bytes).
            filters: only neighbours with these attribute values: ``{column: value or
                values}`` over label columns and the tags column (AND across columns, OR
                within one).
            match_predicted: label columns whose *predicted* value the neighbours must have
                (e.g. ``["gender"]``: search within the predicted gender).

        Returns:
            ``{"image", "predicted": {column: {"label", "probability"}}, "neighbors": [...]}``
            with neighbours nearest first (see :meth:`_neighbors`); with a hierarchy also
            ``"hierarchy"`` (the predicted path), with tags ``"tags"`` (those above their
            threshold), with filters ``"filter"`` (what was applied, how many catalog items
            match, and whether k were found).

        Raises:
            InvalidImageError: the image cannot be read.
            QueryError: ``k`` out of range; FilterError (a QueryError) for a bad filter.
        """
        return self.query_many(
            [image], k, exclude_self=exclude_self, names=[name], filters=filters, match_predicted=match_predicted
        )[0]

    def query_many(
        self,
        images: list,
        k: int = DEFAULT_K,
        *,
        exclude_self: bool = True,
        names: list | None = None,
        filters: Mapping[str, str | Sequence[str]] | None = None,
        match_predicted: Sequence[str] = (),
    ) -> list[dict]:
        """Like :meth:`query` for several images, in one batched forward pass and search.

        Raises:
            InvalidImageError: the first image that cannot be read.
            QueryError: ``k`` out of range; FilterError (a QueryError) for a bad filter.
        """
        names = names or [None] * len(images)
        checked = self.query_options(k, exclude_self=exclude_self, filters=filters, match_predicted=match_predicted)
        options = [replace(checked, name=name) for name in names]
        decoded = [self.decode(image) for image in images]
        answers = self.answer_decoded(decoded, options)
        for i, image in enumerate(images):
            if names[i] is None and isinstance(image, (str, os.PathLike)):
                answers[i]["image"] = str(image)
        return answers

    def query_options(
        self,
        k: int = DEFAULT_K,
        *,
        exclude_self: bool = True,
        name: str | None = None,
        filters: Mapping[str, str | Sequence[str]] | None = None,
        match_predicted: Sequence[str] = (),
    ) -> QueryOptions:
        """Checks one query's parameters against this bundle (before any image is decoded).

        Args:
            k, exclude_self, name, filters, match_predicted: as in :meth:`query`.

        Returns:
            The checked :class:`QueryOptions` (filters normalised to ``{column: [values]}``).

        Raises:
            QueryError: ``k`` out of range; FilterError (a QueryError) for a bad filter.
        """
        check_k(k)
        normal, columns = self._check_filters(filters, match_predicted)
        return QueryOptions(
            k=int(k),
            exclude_self=exclude_self,
            name=name,
            filters=normal,
            match_predicted=tuple(columns),
        )

    def decode(self, image: ImageSource | ImageBytes) -> DecodedImage:
        """Reads and preprocesses one query image (``images.load_image``, at this bundle's size and pixel limit).

        Returns:
            A :class:`DecodedImage`: the encoded bytes with their sha256 and (s, s, 3) uint8 pixels.

        Raises:
            InvalidImageError: the image cannot be read.
        """
        raw = image if isinstance(image, ImageBytes) else read_image_bytes(image)
        return DecodedImage(raw=raw, pixels=load_image(raw, self.backbone.input_size, max_pixels=self.max_pixels))

    def answer_decoded(self, decoded: Sequence[DecodedImage], options: Sequence[QueryOptions]) -> list[dict]:
        """Answers decoded queries, each with its own options, in ONE forward pass.

        This is what :meth:`query_many` and the web app's micro-batcher
        (``recommender.batching.QueryBatcher``) run: the backbone and classifier see all images
        at once; the search runs once per group of unfiltered queries with the same ``k``, and
        once per filtered query (filters differ per query and need the predicted labels).

        Args:
            decoded: images from :meth:`decode`.
            options: one :class:`QueryOptions` from :meth:`query_options` per image.

        Returns:
            One answer per image, as :meth:`query` gives it.
        """
        if len(decoded) != len(options):
            raise ValueError(f"{len(decoded)} images for {len(options)} query options")
        if not decoded:
            return []
        embeddings, outputs = self.embed_outputs(np.stack([image.pixels for image in decoded]))
        excluded_lists = [
            self._by_hash.get(image.raw.sha256, []) if option.exclude_self else []
            for image, option in zip(decoded, options)
        ]
        answers = [{"image": option.name, **self.label_space.describe(outputs, i)} for i, option in enumerate(options)]
        unfiltered: dict[int, list[int]] = {}
        for i, option in enumerate(options):
            if option.filters or option.match_predicted:
                applied = dict(option.filters)
                for column in option.match_predicted:
                    applied[column] = [answers[i]["predicted"][column]["label"]]
                answers[i]["neighbors"], answers[i]["filter"] = self._filtered(
                    embeddings[i], applied, excluded_lists[i], option.k
                )
            else:
                unfiltered.setdefault(option.k, []).append(i)
        for k, rows in unfiltered.items():
            result = self.index.search_excluding(embeddings[rows], [excluded_lists[i] for i in rows], k)
            for j, i in enumerate(rows):
                answers[i]["neighbors"] = self._neighbors(result.positions[j], result.distances[j])
        return answers

    def similar_to_item(
        self, item_id: str, k: int = DEFAULT_K, *, filters: Mapping[str, str | Sequence[str]] | None = None
    ) -> dict:
        """Neighbours of a catalog item from its stored embedding (no decoding, no forward pass).

        Args:
            item_id: a catalog id.
            k: number of neighbours, 1..100.
            filters: as in :meth:`query`.

        Returns:
            ``{"id", "labels", "neighbors"}`` (and ``"tags"``, ``"filter"`` when they apply).

        Raises:
            UnknownItemError: no catalog item has this id (also a ``KeyError``).
            QueryError: ``k`` out of range; FilterError (a QueryError) for a bad filter.
        """
        check_k(k)
        filters, _ = self._check_filters(filters, ())
        position = self._position(item_id)
        excluded = self._by_hash.get(self.rows[position].sha256, [position])
        # The stored embedding itself (compressed kinds: the float16 copy, never a decoded code).
        vector = self.index.reconstruct(position)
        if filters:
            answer = self.item_answer(item_id, [], [])
            answer["neighbors"], answer["filter"] = self._filtered(vector, filters, excluded, k)
            return answer
        result = self.index.search_excluding(vector[None, :], [excluded], k)
        return self.item_answer(item_id, result.positions[0], result.distances[0])

    def item_answer(self, item_id: str, positions: Sequence[int], distances: Sequence[float]) -> dict:
        """The answer of :meth:`similar_to_item` (unfiltered) for neighbours found beforehand.

        The one place that shapes an item's answer, so neighbours read from precomputed panels
        (``recommender.panels``) come back exactly as a live search's do.

        Args:
            item_id: a catalog id.
            positions: neighbour positions (FAISS order), nearest first; negative ones are skipped.
            distances: their Euclidean distances.

        Returns:
            ``{"id", "labels", "tags"?, "neighbors"}``.

        Raises:
            UnknownItemError: no catalog item has this id.
        """
        row = self.rows[self._position(item_id)]
        answer = {"id": item_id, "labels": dict(row.labels)}
        if row.tags is not None:
            answer["tags"] = list(row.tags)
        answer["neighbors"] = self._neighbors(positions, distances)
        return answer

    def item(self, item_id: str) -> CatalogRecord:
        """The catalog record of an id.

        Raises:
            UnknownItemError: no catalog item has this id (also a ``KeyError``).
        """
        return self.rows[self._position(item_id)]

    def display_fields(self, row: CatalogRecord) -> dict:
        """What a shop shows of a catalog item besides its photo: ``{"title", "price"?, "url"?}``.

        ``title`` is the title column's value, else the id; ``price`` and ``url`` are there
        when the bundle has that column (None for an empty cell), as written in the catalog:
        a page must check a URL's scheme before making it a link.
        """
        fields = {"title": row.extra.get(self.title_column) or row.id}
        if self.price_column:
            fields["price"] = row.extra.get(self.price_column) or None
        if self.url_column:
            fields["url"] = row.extra.get(self.url_column) or None
        return fields

    def position_of(self, item_id: str) -> int:
        """The catalog (FAISS) position of an id.

        Raises:
            UnknownItemError: no catalog item has this id (also a ``KeyError``).
        """
        return self._position(item_id)

    def _position(self, item_id: str) -> int:
        try:
            return self._by_id[item_id]
        except (KeyError, TypeError):  # TypeError: an unhashable id
            raise UnknownItemError(item_id) from None

    def _check_filters(self, filters, match_predicted) -> tuple[dict[str, list[str]], list[str]]:
        """Normalises filters to ``{column: [values]}`` and checks them (FilterError when bad)."""
        normal = {}
        for column, values in (filters or {}).items():
            normal[column] = [values] if isinstance(values, str) else list(values)
        if normal:
            self.attributes.mask(normal)  # raises FilterError naming an unknown column or value
        match_predicted = list(dict.fromkeys(match_predicted or ()))
        for column in match_predicted:
            if column not in self.label_columns:
                raise FilterError(
                    f"match_predicted column {column!r} is not a predicted label column "
                    f"(the bundle predicts: {', '.join(self.label_columns)})"
                )
            if column in normal:
                raise FilterError(f"column {column!r} is given both as a filter and in match_predicted; choose one")
        return normal, match_predicted

    def _filtered(self, vector: np.ndarray, filters: dict, excluded: list[int], k: int) -> tuple[list[dict], dict]:
        """Nearest neighbours among the catalog items matching ``filters``, and the filter report.

        Exact (what brute force over the matching items returns) on a flat index, and on the
        other kinds when at most ``index.exact_scan_up_to`` items match; above that the HNSW
        graph or the IVF lists are searched with the filter, approximate like an unfiltered
        search of that index.
        """
        allowed = self.attributes.mask(filters)
        matching = int(allowed.sum())
        if excluded:
            allowed = allowed.copy()
            allowed[excluded] = False
        candidates = int(allowed.sum())
        result = self.index.search(vector[None, :].astype(np.float32), k, allowed=allowed)
        neighbors = self._neighbors(result.positions[0], result.distances[0])
        report = {"applied": filters, "matching_items": matching, "complete": len(neighbors) == k}
        found = len(neighbors)
        if found < k and candidates > found:  # only an approximate (HNSW, IVF) search can miss matching items
            report["note"] = f"the approximate index found {found} of the {candidates} matching items (asked for {k})"
        elif found < k:
            # "other": the query's own item matches too but is never its own neighbour
            other = " other" if candidates < matching else ""
            if found == 0:
                report["note"] = f"no{other} catalog item matches the filter (asked for {k})"
            else:
                report["note"] = (
                    f"only {found}{other} catalog item{'s' if found != 1 else ''} "
                    f"match{'es' if found == 1 else ''} the filter (asked for {k})"
                )
        return neighbors, report

    def _neighbors(self, positions: np.ndarray, distances: np.ndarray) -> list[dict]:
        """The answer's neighbour entries for one row of search results (-1 padding skipped).

        Each is ``{"id", "distance", "labels", "image", "tags"?, "title", "price"?, "url"?}``:
        ``tags`` with a tags column, ``title`` / ``price`` / ``url`` as in :meth:`display_fields`.
        """
        found = []
        for position, distance in zip(positions, distances):
            if position < 0:
                continue
            row = self.rows[int(position)]
            neighbor = {"id": row.id, "distance": float(distance), "labels": dict(row.labels), "image": row.image}
            if row.tags is not None:
                neighbor["tags"] = list(row.tags)
            neighbor.update(self.display_fields(row))  # title, and price / url with those columns
            found.append(neighbor)
        return found


def check_k(k, name: str = "k") -> None:
    """The one range check of a neighbour count (queries, ``--k`` of ``query`` and ``evaluate``).

    Args:
        k: the count asked for.
        name: how the message names it (``--k`` on the command line).

    Raises:
        QueryError: ``k`` is not a whole number from 1 to :data:`MAX_K`.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise QueryError(f"{name} must be a whole number from 1 to {MAX_K}, got {k!r}")


def load_bundle(path: str | os.PathLike, *, use_gpu: bool = True, memory_map: bool | None = None) -> Recommender:
    """Verifies a bundle and loads everything a query needs, once.

    Args:
        path: the bundle folder (or a ``current`` symlink to one).
        use_gpu: move the FAISS index to a GPU when FAISS sees one.
        memory_map: map an IVF index's inverted lists from the file (shared between the
            processes that serve one bundle, half the scan speed) instead of reading them into
            memory; None: ``RECOMMENDER_INDEX_MMAP=1`` in the environment says so.

    Returns:
        A :class:`Recommender`.

    Raises:
        BundleError: the bundle is missing, tampered with, truncated or of another format.
        WeightsUnavailableError: the bundle's ImageNet backbone weights cannot be had here.
    """
    from recommender.classifier import ClassifierRunner
    from recommender.index import VectorIndex

    path = Path(path).resolve()
    manifest = verify_bundle(path)
    backbone = load_bundle_backbone(path, manifest)  # the bundle's own copy of a file backbone
    classifier, embedding_scaler = read_classifier(path, manifest)
    if memory_map is None:
        memory_map = os.environ.get("RECOMMENDER_INDEX_MMAP", "") == "1"
    index = VectorIndex.load(
        path / "index.faiss", use_gpu=use_gpu, parameters=manifest.index.parameters, memory_map=memory_map
    )
    if index.kind != manifest.index_kind:
        raise BundleError(f"{path}: index.faiss is a {index.kind} index, the manifest says {manifest.index_kind}")
    rows = read_catalog_rows(path, manifest.counts.items)
    if index.size != len(rows):
        raise BundleError(f"{path}: index has {index.size} vectors for {len(rows)} catalog rows")
    runner = ClassifierRunner(classifier.model, classifier.input_scaler, [h.name for h in classifier.label_space.heads])
    return Recommender(path, manifest, backbone, runner, embedding_scaler, index, rows, classifier.label_space)
