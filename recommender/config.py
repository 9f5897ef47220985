"""Build defaults in one frozen dataclass, resolved once at the entry point and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from recommender.backbones import BackboneSpec
from recommender.classifier import TrainConfig
from recommender.images import DEFAULT_MAX_PIXELS
from recommender.labels import DEFAULT_HIERARCHY_MODE, DEFAULT_THRESHOLD_MODE


def default_feature_store() -> Path:
    """``$RECOMMENDER_CACHE/features.h5``, else ``~/.cache/recommender/features.h5``."""
    root = os.environ.get("RECOMMENDER_CACHE") or Path.home() / ".cache" / "recommender"
    return Path(root) / "features.h5"


#: Where a build's feature extraction runs: in this process, or in actors on a Ray cluster.
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class RayConfig:
    """How the Ray engine runs (``--engine ray``; README "Scaling out").

    Attributes:
        address: the cluster to join (``auto``: the one ``ray start`` runs on this machine, or
            ``ray://HOST:10001``); None starts a private local Ray for the job.
        actors: extraction actors, each holding one backbone; None: one per GPU when the cluster
            has GPUs, else one per four CPUs (TensorFlow runs its own threads inside each).
        gpus_per_actor: GPUs each actor asks for; None: 1 when the cluster has GPUs, else 0.
        object_store_bytes: object store size of a local Ray (None: Ray's default, 30% of RAM).
        driver_embed_rows: catalogs of at most this many rows are embedded on the driver from
            the stored features; larger ones in embedding actors, so the driver never reads
            all features (an actor's start, ~10 s of TensorFlow import, costs more than
            embedding one 2,048-row chunk).
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    object_store_bytes: int | None = None
    driver_embed_rows: int = 2048


#: Rows the classifier trains on at most, by default (a stratified sample above it).
DEFAULT_TRAIN_SAMPLE = 200_000


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build needs besides the catalog path and the output folder.

    Attributes:
        image_column: CSV column with image paths (relative to the CSV's folder).
        id_column: CSV column with product ids; None uses the image path as the id.
        title_column: CSV column with the product title shown on cards and in answers; None
            uses ``title`` when the catalog has that column.
        price_column: CSV column with the price as displayed (kept as written), or None.
        url_column: CSV column with the product page's URL, or None.
        label_columns: single-valued label columns; the first is the primary class (the
            hierarchy's leaf level when there is a hierarchy).
        hierarchy: label columns from root to leaf forming a taxonomy (``a>b>c``), or None.
        hierarchy_mode: ``hierarchical`` (one head per level, decoded over valid paths) or
            ``combined`` (one head over full paths).
        tags_column: a column with several tags per product (one sigmoid head), or None.
        tags_separator: separator of the tags in one cell.
        tag_threshold_mode: ``global`` (one tuned threshold) or ``per_tag``.
        split_column: CSV column naming each row's split (used with ``splits``).
        splits: keep only rows of these splits (e.g. train, validation); None keeps all.
        image_root: the folder catalog photos must lie in (default None: the CSV's folder, or
            the folder catalog itself); rows whose photo resolves outside it are bad rows.
        backbone: backbone name, weights, input size and init seed.
        train: classifier hyper-parameters (its ``seed`` is the build's seed).
        train_sample: above this many rows the classifier trains on a stratified sample of
            about this size (``recommender.classifier.training_sample``: every class keeps
            its long tail), read from the feature store; 0 trains on every row. At 200,000
            rows with both views that is 3.3 GB of ResNet50 features on the training node.
        flips: extract mirrored-image features (training augmentation, flip-averaged
            embeddings).
        flip_average: embed catalog items and queries as the mean of the image's and its
            mirror's features (needs ``flips``).
        index_kind: ``auto``, ``flat``, ``hnsw``, ``ivf-sq8`` or ``ivf-pq``
            (``recommender.index``).
        index_memory_bytes: the resident memory the index may take; ``auto`` picks the first
            of HNSW, IVF-SQ8, IVF-PQ that fits (``recommender.index.choose_kind``); None: no
            limit (HNSW from 100,000 items).
        max_bad_fraction: refuse the catalog when more than this share of rows is bad.
        min_class_examples: leave out, as bad rows, the rows whose primary class has fewer
            than this many rows; 0 (default) keeps every class: a class too small to hold a
            row out for validation trains on all its rows.
        max_pixels: decompression-bomb limit for every image.
        batch_size: images per backbone forward pass.
        feature_store: feature cache: an HDF5 file (``.h5``) or a folder of Parquet parts
            (:mod:`recommender.feature_parts`; what the Ray engine needs).
        use_gpu: move the FAISS index to a GPU when one is visible.
        engine: ``local`` (extract in this process) or ``ray`` (in actors on a Ray cluster).
        ray: settings of the Ray engine.
    """

    image_column: str = "file"
    id_column: str | None = None
    title_column: str | None = None
    price_column: str | None = None
    url_column: str | None = None
    label_columns: tuple[str, ...] = ("label",)
    hierarchy: tuple[str, ...] | None = None
    hierarchy_mode: str = DEFAULT_HIERARCHY_MODE
    tags_column: str | None = None
    tags_separator: str = "|"
    tag_threshold_mode: str = DEFAULT_THRESHOLD_MODE
    split_column: str = "split"
    splits: tuple[str, ...] | None = None
    image_root: Path | None = None
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    train_sample: int = DEFAULT_TRAIN_SAMPLE
    flips: bool = True
    flip_average: bool = True
    index_kind: str = "auto"
    index_memory_bytes: int | None = None
    max_bad_fraction: float = 0.05
    min_class_examples: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 32
    feature_store: Path = field(default_factory=default_feature_store)
    use_gpu: bool = True
    engine: str = "local"
    ray: RayConfig = field(default_factory=RayConfig)
