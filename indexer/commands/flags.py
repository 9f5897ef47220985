"""Flags shared by the indexer's commands, with defaults read from :class:`BuildConfig`.

:func:`add_catalog_columns` is the one definition of the catalog-column flags (build, rebuild
and evaluate); :func:`add_build_settings` the backbone, training and index flags (build and
rebuild); :func:`build_config_from_args` resolves both into one :class:`BuildConfig`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # recommender.config loads the training stack's scikit-learn
    from recommender.config import BuildConfig


def add_catalog_columns(
    parser: argparse.ArgumentParser, *, label_help: str, with_label_structure: bool = True
) -> argparse._ArgumentGroup:
    """Adds the flags that say where a catalog CSV keeps what, as one ``catalog columns`` group.

    Args:
        parser: a subcommand's parser.
        label_help: what ``--label-column`` means to this command (heads to train, to score).
        with_label_structure: also add ``--hierarchy``, ``--tags-column``,
            ``--tags-separator`` and the display columns ``--title-column``, ``--price-column``
            and ``--url-column`` (``evaluate`` reads those from the bundle instead).

    Returns:
        The group, for callers that add more columns to it.
    """
    from recommender.config import BuildConfig

    defaults = BuildConfig()
    group = parser.add_argument_group("catalog columns")
    group.add_argument(
        "--image-column",
        default=defaults.image_column,
        help="CSV column with image paths, relative to the CSV's folder (default: %(default)s)",
    )
    group.add_argument(
        "--id-column",
        default=defaults.id_column,
        help="CSV column with product ids (default: the image path is the id)",
    )
    group.add_argument("--label-column", action="append", dest="label_columns", metavar="COLUMN", help=label_help)
    group.add_argument(
        "--image-root",
        type=Path,
        default=defaults.image_root,
        metavar="FOLDER",
        help="folder every catalog photo must lie in, symlinks resolved; rows whose photo lies outside are bad rows "
        "and the web app serves only files inside it (default: the CSV's folder, or the folder catalog itself)",
    )
    if with_label_structure:
        group.add_argument(
            "--hierarchy",
            default=defaults.hierarchy,
            metavar="A>B>C",
            help="label columns from root to leaf forming a taxonomy, e.g. masterCategory>subCategory>articleType; "
            "predictions always follow a path that occurs in the catalog (levels not given with --label-column "
            "are added)",
        )
        group.add_argument(
            "--tags-column",
            default=defaults.tags_column,
            help="column with several tags per product (one multi-label sigmoid head)",
        )
        group.add_argument(
            "--tags-separator",
            default=defaults.tags_separator,
            help="separator of tags in one cell (default: %(default)s)",
        )
        group.add_argument(
            "--title-column",
            default=defaults.title_column,
            metavar="COLUMN",
            help="column with the product title shown on cards and in answers (default: title, when the catalog "
            "has it; else the id)",
        )
        group.add_argument(
            "--price-column",
            default=defaults.price_column,
            metavar="COLUMN",
            help="column with the price, shown as written on cards and in answers (default: none)",
        )
        group.add_argument(
            "--url-column",
            default=defaults.url_column,
            metavar="COLUMN",
            help="column with the product page's URL: answers carry it, cards link to it when it is http(s) "
            "(default: none)",
        )
    group.add_argument(
        "--split",
        action="append",
        dest="splits",
        metavar="NAME",
        help="keep only rows of this split (repeatable), read from --split-column",
    )
    group.add_argument(
        "--split-column",
        default=defaults.split_column,
        help="CSV column naming each row's split (default: %(default)s)",
    )
    return group


def build_label_help() -> str:
    """``--label-column`` help of the commands that train heads (build, rebuild)."""
    from recommender.config import BuildConfig

    return (
        "label column, repeatable: one head each; the primary class is the first, or the hierarchy's leaf "
        f"with --hierarchy (default: {', '.join(BuildConfig().label_columns)}, or the hierarchy's levels)"
    )


def add_build_settings(parser: argparse.ArgumentParser) -> None:
    """Adds the backbone, training and index flags of ``build`` and ``rebuild``.

    Args:
        parser: a subcommand's parser.
    """
    from recommender.backbones import KERAS_APPLICATIONS, list_backbones
    from recommender.config import ENGINES, BuildConfig
    from recommender.index import INDEX_KINDS

    defaults = BuildConfig()
    keras_names = ", ".join(application.name for application in KERAS_APPLICATIONS)
    parser.add_argument(
        "--hierarchy-mode",
        choices=("hierarchical", "combined"),
        default=defaults.hierarchy_mode,
        help="hierarchical: one head per level; combined: one head over full paths (default: %(default)s)",
    )
    parser.add_argument(
        "--tag-thresholds",
        choices=("global", "per_tag"),
        default=defaults.tag_threshold_mode,
        help="tune one threshold for all tags, or one per tag with enough examples (default: %(default)s)",
    )
    parser.add_argument(
        "--backbone",
        default=defaults.backbone.name,
        help="; ".join(f"{name}: {description}" for name, description in list_backbones().items())
        + " (default: %(default)s)",
    )
    parser.add_argument(
        "--weights",
        default=defaults.backbone.weights,
        help=f"weights of a Keras backbone ({keras_names}): imagenet (Keras download/cache), none (random init), "
        "or a weights file PATH; a tflite model carries its own (default: %(default)s)",
    )
    sizes = ", ".join(f"{application.name} {application.input_size}" for application in KERAS_APPLICATIONS)
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"backbone input size in pixels (default: the backbone's own: {sizes}; a tflite model's from its file)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.train.seed,
        help="seed of the split, training and random init (default: %(default)s)",
    )
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=defaults.max_bad_fraction,
        help="fail when more than this share of rows is bad (default: %(default)s)",
    )
    parser.add_argument(
        "--min-class-examples",
        type=non_negative_int,
        default=defaults.min_class_examples,
        metavar="N",
        help="leave out (as bad rows) the rows of primary classes with fewer than N rows (default: %(default)s, "
        "off: a class too small to hold a row out for validation trains on all its rows)",
    )
    parser.add_argument(
        "--feature-store",
        type=Path,
        default=None,
        help="feature cache: an HDF5 file (.h5) or a folder of Parquet parts (default: "
        "$RECOMMENDER_CACHE/features.h5 or ~/.cache/recommender/features.h5)",
    )
    parser.add_argument(
        "--index",
        choices=INDEX_KINDS,
        default=defaults.index_kind,
        help="FAISS index kind: flat (exact), hnsw, ivf-sq8 or ivf-pq (compressed, re-ranked exactly); "
        "default %(default)s: flat below 100,000 items, else the first of hnsw, ivf-sq8, ivf-pq within --index-memory",
    )
    parser.add_argument(
        "--index-memory",
        type=memory_size,
        default=defaults.index_memory_bytes,
        metavar="SIZE",
        help="resident memory the index may take, e.g. 2GB or 512MiB; --index auto picks the kind that fits "
        "(default: no limit)",
    )
    parser.add_argument(
        "--no-flips",
        action="store_true",
        help="do not use mirrored images (no flip augmentation, no flip-averaged embeddings)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"maximum training epochs (default: {defaults.train.max_epochs}; early stopping usually ends sooner)",
    )
    parser.add_argument(
        "--train-sample",
        type=non_negative_int,
        default=defaults.train_sample,
        metavar="ROWS",
        help="above this many rows, train the classifier on a stratified sample of about this size "
        "(every class keeps up to 20 rows); 0 trains on every row (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=defaults.batch_size,
        help="photos per backbone forward pass (and per stored feature part) (default: %(default)s)",
    )
    engine = parser.add_argument_group("engine (README: Scaling out)")
    engine.add_argument(
        "--engine",
        choices=ENGINES,
        default=defaults.engine,
        help="local: extract features in this process; ray: in Ray Data actors, features as Parquet parts "
        "(FEATURE_STORE with .parts for .h5) (default: %(default)s)",
    )
    engine.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (auto, or ray://HOST:10001); default: start a private local Ray for the job",
    )
    engine.add_argument(
        "--ray-actors",
        type=positive_int,
        default=None,
        help="extraction actors (default: one per GPU, else per 4 CPUs)",
    )
    engine.add_argument(
        "--ray-gpus-per-actor",
        type=float,
        default=None,
        help="GPUs each actor takes (default: 1 when the cluster has GPUs, else 0)",
    )
    engine.add_argument(
        "--ray-object-store-mb",
        type=positive_int,
        default=None,
        help="object store of a local Ray, MB (default: Ray's own, 30%% of memory)",
    )


def positive_int(text: str) -> int:
    """argparse type: a whole number from 1."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


#: Units of :func:`memory_size`: decimal (kB, MB, GB, TB) and binary (KiB, MiB, GiB, TiB).
MEMORY_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def memory_size(text: str) -> int:
    """argparse type: a size in bytes from ``2GB``, ``1.5 GiB``, ``800MB`` or a plain number of bytes."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit and unit not in MEMORY_UNITS):
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 512MiB or 800000000, got {text!r}")
    value = int(float(match.group(1)) * MEMORY_UNITS[unit or "b"])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number from 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_config_from_args(args: argparse.Namespace) -> BuildConfig:
    """Resolves the flags of :func:`add_catalog_columns` and :func:`add_build_settings` into one
    :class:`BuildConfig` (the only place they are read).

    Args:
        args: parsed flags of ``build`` or ``rebuild``.

    Returns:
        ``BuildConfig()`` with every flag applied.

    Raises:
        CatalogError: a malformed ``--hierarchy``.
    """
    from recommender.backbones import BackboneSpec, default_input_size, resolved_spec
    from recommender.config import BuildConfig, RayConfig
    from recommender.labels import parse_hierarchy

    defaults = BuildConfig()
    hierarchy = parse_hierarchy(args.hierarchy) if args.hierarchy else None
    # With a hierarchy and no --label-column, the hierarchy's levels are the label columns.
    label_columns = tuple(args.label_columns or (hierarchy or defaults.label_columns))
    spec = BackboneSpec(
        name=args.backbone,
        weights=args.weights,
        input_size=args.image_size or default_input_size(args.backbone),
        seed=args.seed,
    )
    train = replace(defaults.train, seed=args.seed, **({"max_epochs": args.epochs} if args.epochs else {}))
    return replace(
        defaults,
        image_column=args.image_column,
        id_column=args.id_column,
        title_column=args.title_column,
        price_column=args.price_column,
        url_column=args.url_column,
        label_columns=label_columns,
        hierarchy=hierarchy,
        hierarchy_mode=args.hierarchy_mode,
        tags_column=args.tags_column,
        tags_separator=args.tags_separator,
        tag_threshold_mode=args.tag_thresholds,
        split_column=args.split_column,
        splits=tuple(args.splits) if args.splits else None,
        image_root=args.image_root,
        backbone=resolved_spec(spec),  # a file backbone's path absolute: the bundle records no cwd
        train=train,
        train_sample=args.train_sample,
        flips=not args.no_flips,
        flip_average=not args.no_flips,
        index_kind=args.index,
        index_memory_bytes=getattr(args, "index_memory", None),
        max_bad_fraction=args.max_bad_fraction,
        min_class_examples=args.min_class_examples,
        feature_store=getattr(args, "feature_store", None) or defaults.feature_store,
        batch_size=args.batch_size,
        engine=args.engine,
        ray=RayConfig(
            address=args.ray_address,
            actors=args.ray_actors,
            gpus_per_actor=args.ray_gpus_per_actor,
            object_store_bytes=args.ray_object_store_mb * 2**20 if args.ray_object_store_mb else None,
        ),
    )
