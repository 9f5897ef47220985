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
from pathlib import Path

import numpy as np

from recommender.backbones import BackboneSpec, load_backbone
from recommender.bundle import read_catalog_rows, read_classifier, verify_bundle
from recommender.errors import BundleError, QueryError
from recommender.images import ImageBytes, ImageSource, load_image, read_image_bytes

log = logging.getLogger(__name__)

DEFAULT_K = 6
MAX_K = 100


class Recommender:
    """A loaded bundle that answers queries. Create it with :func:`load_bundle`.

    Attributes:
        path: the bundle folder.
        manifest: the verified manifest.
        bundle_id: the bundle's id.
        rows: catalog rows (dicts with id, image, path, sha256, labels, extra), FAISS order.
        label_columns: label column per head; the first is the primary class.
        classes: per head, class names by index.
    """

    def __init__(self, path: Path, manifest: dict, backbone, runner, embedding_scaler, index, rows, labels):
        self.path = path
        self.manifest = manifest
        self.bundle_id = manifest["bundle_id"]
        self.backbone = backbone
        self.runner = runner
        self.embedding_scaler = embedding_scaler
        self.index = index
        self.rows = rows
        self.label_columns = labels["columns"]
        self.classes = labels["classes"]
        self.flip_average = bool(manifest["embedding"].get("flip_average"))
        self.max_pixels = int(manifest.get("max_pixels", 40_000_000))
        self._by_id = {row["id"]: position for position, row in enumerate(rows)}
        self._by_hash: dict[str, list[int]] = {}
        for position, row in enumerate(rows):
            self._by_hash.setdefault(row["sha256"], []).append(position)

    # -- embedding ---------------------------------------------------------------------
    def embed_images(self, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Embeds decoded images.

        Args:
            images: (n, s, s, 3) uint8 from ``load_image``.

        Returns:
            ``((n, 512) float32 standardized embeddings, per head (n, classes) probabilities)``.
        """
        from recommender.scalers import transform

        features = self.backbone.extract(images)
        flipped = self.backbone.extract(images[:, :, ::-1]) if self.flip_average else None
        embeddings, probabilities = self.runner.run(features, flipped)
        return transform(self.embedding_scaler, embeddings), probabilities

    # -- queries -----------------------------------------------------------------------
    def query(
        self, image: ImageSource | ImageBytes, k: int = DEFAULT_K, *, exclude_self: bool = True, name: str | None = None
    ) -> dict:
        """Predicts the labels of one image and finds its ``k`` nearest catalog items.

        Args:
            image: a path, encoded bytes, a binary file object or ``ImageBytes``.
            k: number of neighbours, 1..100.
            exclude_self: leave out catalog items with the same content hash as the image.
            name: what to report as ``"image"`` (default: the path, or None for bytes).

        Returns:
            ``{"image", "predicted": {column: {"label", "probability"}}, "neighbors": [...]}``
            with neighbours nearest first (see :meth:`neighbors`).

        Raises:
            InvalidImageError: the image cannot be read.
            QueryError: ``k`` out of range.
        """
        return self.query_many([image], k, exclude_self=exclude_self, names=[name])[0]

    def query_many(
        self, images: list, k: int = DEFAULT_K, *, exclude_self: bool = True, names: list | None = None
    ) -> list[dict]:
        """Like :meth:`query` for several images, in one batched forward pass and search.

        Raises:
            InvalidImageError: the first image that cannot be read.
        """
        _check_k(k)
        raws = [image if isinstance(image, ImageBytes) else read_image_bytes(image) for image in images]
        decoded = np.stack([load_image(raw, self.backbone.input_size, max_pixels=self.max_pixels) for raw in raws])
        embeddings, probabilities = self.embed_images(decoded)
        names = names or [None] * len(images)
        answers = []
        excluded_lists = [self._by_hash.get(raw.sha256, []) if exclude_self else [] for raw in raws]
        widest = max(len(e) for e in excluded_lists)
        result = self.index.search(embeddings, k + widest)
        for i, image in enumerate(images):
            label = (
                names[i] if names[i] is not None else (str(image) if isinstance(image, (str, os.PathLike)) else None)
            )
            answers.append(
                {
                    "image": label,
                    "predicted": self._predicted([p[i] for p in probabilities]),
                    "neighbors": self._neighbors(result.positions[i], result.distances[i], set(excluded_lists[i]), k),
                }
            )
        return answers

    def similar_to_item(self, item_id: str, k: int = DEFAULT_K) -> dict:
        """Neighbours of a catalog item from its stored embedding (no decoding, no forward pass).

        Raises:
            KeyError: unknown id.
            QueryError: ``k`` out of range.
        """
        _check_k(k)
        position = self._by_id[item_id]
        row = self.rows[position]
        excluded = set(self._by_hash.get(row["sha256"], [position]))
        vector = self.index.reconstruct(position)[None, :]
        result = self.index.search(vector, k + len(excluded))
        return {
            "id": item_id,
            "labels": row["labels"],
            "neighbors": self._neighbors(result.positions[0], result.distances[0], excluded, k),
        }

    def item(self, item_id: str) -> dict:
        """The catalog row of an id (KeyError when unknown)."""
        return self.rows[self._by_id[item_id]]

    def _predicted(self, probabilities: list[np.ndarray]) -> dict:
        predicted = {}
        for column, names, probs in zip(self.label_columns, self.classes, probabilities):
            best = int(np.argmax(probs))
            predicted[column] = {"label": names[best], "probability": float(probs[best])}
        return predicted

    def _neighbors(self, positions: np.ndarray, distances: np.ndarray, excluded: set[int], k: int) -> list[dict]:
        found = []
        for position, distance in zip(positions, distances):
            if position < 0 or int(position) in excluded:
                continue
            row = self.rows[int(position)]
            found.append({"id": row["id"], "distance": float(distance), "labels": row["labels"], "image": row["image"]})
            if len(found) == k:
                break
        return found


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise QueryError(f"k must be a whole number from 1 to {MAX_K}, got {k!r}")


def load_bundle(path: str | os.PathLike, *, use_gpu: bool = True) -> Recommender:
    """Verifies a bundle and loads everything a query needs, once.

    Args:
        path: the bundle folder (or a ``current`` symlink to one).
        use_gpu: move the FAISS index to a GPU when FAISS sees one.

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
    spec = BackboneSpec(**manifest["backbone"]["spec"])
    random_weights = path / "backbone.weights.h5" if (path / "backbone.weights.h5").exists() else None
    backbone = load_backbone(spec, random_weights_path=random_weights)
    if backbone.identity["key"] != manifest["backbone"]["identity"]["key"]:
        raise BundleError(
            f"{path}: the backbone here ({backbone.identity}) differs from the one the bundle was built with "
            f"({manifest['backbone']['identity']}); rebuild the bundle or supply the same weights"
        )
    classifier, embedding_scaler = read_classifier(path, manifest)
    labels = {"columns": classifier.label_columns, "classes": classifier.classes}
    index = VectorIndex.load(path / "index.faiss", use_gpu=use_gpu)
    rows = read_catalog_rows(path, manifest["counts"]["items"])
    if index.size != len(rows):
        raise BundleError(f"{path}: index has {index.size} vectors for {len(rows)} catalog rows")
    runner = ClassifierRunner(classifier.model, classifier.input_scaler, len(labels["columns"]))
    return Recommender(path, manifest, backbone, runner, embedding_scaler, index, rows, labels)
