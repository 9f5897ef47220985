"""The ``recommender`` command: build, query and demo subcommands.

Exit codes: 0 success, 1 user or data error (one clear line on stderr, no traceback),
2 usage error (argparse). Library errors are typed (``recommender.errors``); this is the only
layer, with the web app, that turns them into messages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _quiet_tensorflow() -> None:
    """Imports TensorFlow with its C++ start-up chatter (oneDNN, CUDA probing) hidden.

    TF 2.20+ writes those lines to file descriptor 2 before its logging is initialised, so
    TF_CPP_MIN_LOG_LEVEL cannot silence them; stderr is pointed at a temp file during the
    import and the first device query, and replayed if the import fails. ``-v`` keeps them.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _add_build_flags(parser: argparse.ArgumentParser, with_output: bool = True) -> None:
    from recommender.backbones import list_backbones
    from recommender.config import BuildConfig

    defaults = BuildConfig()
    parser.add_argument(
        "--image-column",
        default=defaults.image_column,
        help="CSV column with image paths, relative to the CSV's folder (default: %(default)s)",
    )
    parser.add_argument(
        "--id-column", default=None, help="CSV column with product ids (default: the image path is the id)"
    )
    parser.add_argument(
        "--label-column",
        action="append",
        dest="label_columns",
        metavar="COLUMN",
        help="label column, repeatable: one head each; the first is the primary class (default: label)",
    )
    parser.add_argument(
        "--hierarchy",
        default=None,
        metavar="A>B>C",
        help="label columns from root to leaf forming a taxonomy, e.g. masterCategory>subCategory>articleType; "
        "predictions always follow a path that occurs in the catalog (levels not given with --label-column are added)",
    )
    parser.add_argument(
        "--hierarchy-mode",
        choices=("hierarchical", "combined"),
        default=defaults.hierarchy_mode,
        help="hierarchical: one head per level; combined: one head over full paths (default: %(default)s)",
    )
    parser.add_argument(
        "--tags-column", default=None, help="column with several tags per product (one multi-label sigmoid head)"
    )
    parser.add_argument(
        "--tags-separator", default=defaults.tags_separator, help="separator of tags in one cell (default: %(default)s)"
    )
    parser.add_argument(
        "--tag-thresholds",
        choices=("global", "per_tag"),
        default=defaults.tag_threshold_mode,
        help="tune one threshold for all tags, or one per tag with enough examples (default: %(default)s)",
    )
    parser.add_argument(
        "--split",
        action="append",
        dest="splits",
        metavar="NAME",
        help="keep only rows of this split (repeatable), read from --split-column",
    )
    parser.add_argument(
        "--split-column",
        default=defaults.split_column,
        help="CSV column naming each row's split (default: %(default)s)",
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
        help="resnet50 weights: imagenet (default, Keras download/cache), none (random init), or a weights file PATH",
    )
    parser.add_argument("--image-size", type=int, default=None, help="resnet50 input size in pixels (default 224)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, training and random init (default: 0)")
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=defaults.max_bad_fraction,
        help="fail when more than this share of rows is bad (default: %(default)s)",
    )
    parser.add_argument(
        "--min-class-examples",
        type=_non_negative_int,
        default=defaults.min_class_examples,
        metavar="N",
        help="leave out (as bad rows) the rows of primary classes with fewer than N rows (default: 0, off: "
        "a class too small to hold a row out for validation trains on all its rows)",
    )
    parser.add_argument(
        "--feature-store",
        type=Path,
        default=None,
        help="HDF5 feature cache (default: $RECOMMENDER_CACHE/features.h5 or ~/.cache/recommender/features.h5)",
    )
    parser.add_argument(
        "--index",
        choices=("auto", "flat", "hnsw"),
        default=defaults.index_kind,
        help="FAISS index kind (default: auto = exact below 100,000 items)",
    )
    parser.add_argument(
        "--no-flips",
        action="store_true",
        help="do not use mirrored images (no flip augmentation, no flip-averaged embeddings)",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="maximum training epochs (early stopping usually ends sooner)"
    )
    if with_output:
        parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")


def _non_negative_int(text: str) -> int:
    """argparse type: a whole number from 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_config_from_args(args: argparse.Namespace):
    """Resolves build flags into one :class:`BuildConfig` (the only place flags are read)."""
    from recommender.backbones import BackboneSpec
    from recommender.config import BuildConfig
    from recommender.labels import parse_hierarchy

    defaults = BuildConfig()
    hierarchy = parse_hierarchy(args.hierarchy) if args.hierarchy else None
    # With a hierarchy and no --label-column, the hierarchy's levels are the label columns.
    label_columns = list(args.label_columns or (hierarchy or ("label",)))
    spec = BackboneSpec(name=args.backbone, weights=args.weights, input_size=args.image_size or 224, seed=args.seed)
    train = replace(defaults.train, seed=args.seed, **({"max_epochs": args.epochs} if args.epochs else {}))
    return replace(
        defaults,
        image_column=args.image_column,
        id_column=args.id_column,
        label_columns=tuple(label_columns),
        hierarchy=hierarchy,
        hierarchy_mode=args.hierarchy_mode,
        tags_column=args.tags_column,
        tags_separator=args.tags_separator,
        tag_threshold_mode=args.tag_thresholds,
        split_column=args.split_column,
        splits=tuple(args.splits) if args.splits else None,
        backbone=spec,
        train=train,
        flips=not args.no_flips,
        flip_average=not args.no_flips,
        index_kind=args.index,
        max_bad_fraction=args.max_bad_fraction,
        min_class_examples=args.min_class_examples,
        feature_store=getattr(args, "feature_store", None) or defaults.feature_store,
    )


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m recommender``."""
    parser = argparse.ArgumentParser(
        prog="recommender",
        description="Visual similarity recommender: build a bundle from a catalog, then ask it about photos.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (library logs at INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build",
        help="build a bundle from a catalog",
        description="Read a catalog, extract features, train the classifier, index every item and write a bundle.",
    )
    build.add_argument(
        "--catalog", required=True, help="catalog CSV, folder of class folders, or fashion-mnist[:IDX_DIR]"
    )
    build.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    _add_build_flags(build)

    query = commands.add_parser(
        "query",
        help="ask a bundle about images",
        description="Print one JSON object per image: predicted labels and the k nearest catalog items.",
    )
    query.add_argument("--bundle", required=True, type=Path, help="bundle folder")
    query.add_argument("--k", type=int, default=6, help="neighbours per image, 1..100 (default: 6)")
    query.add_argument("--include-self", action="store_true", help="keep a catalog item among its own neighbours")
    query.add_argument(
        "--filter",
        action="append",
        dest="filters",
        default=[],
        metavar="COLUMN=VALUE",
        help="only neighbours with this label value or tag; repeatable (AND across columns, OR within one)",
    )
    query.add_argument(
        "--match-predicted",
        action="append",
        default=[],
        metavar="COLUMN",
        help="only neighbours with the image's predicted value of this label column; repeatable",
    )
    query.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s)")

    rebuild = commands.add_parser(
        "rebuild",
        help="nightly job: bring the published bundle up to date with a catalog",
        description="Incremental rebuild into ARTIFACT_ROOT: reuse stored features, retrain when needed, gate, publish atomically, prune.",
    )
    rebuild.add_argument("--catalog", required=True, help="catalog CSV or folder of class folders")
    rebuild.add_argument(
        "--root", required=True, type=Path, help="artifact root (bundles/, current, features.h5, runs/)"
    )
    rebuild.add_argument(
        "--retrain",
        choices=("auto", "always", "never"),
        default="auto",
        help="auto (default): retrain when the label set or more than --retrain-threshold of the catalog changed",
    )
    rebuild.add_argument(
        "--retrain-threshold",
        type=float,
        default=0.2,
        help="share of changed items that makes auto retrain (default: %(default)s)",
    )
    rebuild.add_argument(
        "--keep", type=int, default=5, help="bundles to keep (default: %(default)s; current is never pruned)"
    )
    rebuild.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.05,
        help="gate: largest allowed fall in validation accuracy (default: %(default)s)",
    )
    _add_build_flags(rebuild, with_output=False)

    rollback = commands.add_parser("rollback", help="point current back at an earlier bundle")
    rollback.add_argument("--root", required=True, type=Path, help="artifact root")
    rollback.add_argument(
        "--to", default=None, metavar="BUNDLE_ID", help="bundle id (default: the newest one older than current)"
    )

    status = commands.add_parser("status", help="show the artifact root: current bundle, bundles, lock, last runs")
    status.add_argument("--root", required=True, type=Path, help="artifact root")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")

    serve = commands.add_parser(
        "serve",
        help="serve the demo page and the JSON API (Flask's server; see the README for gunicorn)",
        description="Serve a bundle over HTTP: the demo page, /api/v1/similar, /api/v1/items/<id>/similar.",
    )
    from webapp.cli import add_serve_arguments

    add_serve_arguments(serve)

    evaluate = commands.add_parser(
        "evaluate",
        help="measure a bundle on a labelled test catalog and write an HTML report",
        description="Accuracy, precision/recall/F1, ROC AUC, retrieval P@k/recall@k/hit rate/mAP@k and plots, in REPORT_DIR.",
    )
    from indexer.evaluate import add_evaluate_arguments

    add_evaluate_arguments(evaluate)

    demo = commands.add_parser(
        "demo",
        help="build a demo bundle from generated images and query it",
        description="Generate a small catalog in data/demo, build a bundle, run example queries.",
    )
    demo.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (default; random init is used, and said, when it cannot be had), none, or PATH",
    )
    demo.add_argument("--folder", type=Path, default=None, help="demo folder (default: data/demo in the repository)")
    demo.add_argument("--rebuild", action="store_true", help="rebuild the demo bundle even if it exists")
    demo.add_argument(
        "--no-serve", action="store_true", help="print the example queries and exit, without serving the page"
    )
    demo.add_argument("--host", default="127.0.0.1", help="address of the demo page (default: %(default)s)")
    demo.add_argument("--port", type=int, default=8000, help="port of the demo page (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        _quiet_tensorflow()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from recommender.errors import RecommenderError

    try:
        if args.command == "build":
            return _run_build(args)
        if args.command == "query":
            return _run_query(args)
        if args.command == "rebuild":
            return _run_rebuild(args)
        if args.command == "rollback":
            from indexer.artifacts import rollback

            result = rollback(args.root, args.to)
            print(f"current is now {result['current']} (was {result['previous']})", file=sys.stderr)
            print(json.dumps(result))
            return EXIT_OK
        if args.command == "status":
            return _run_status(args)
        if args.command == "serve":
            from webapp.cli import run_serve

            return run_serve(args)
        if args.command == "evaluate":
            from indexer.evaluate import run_evaluate

            return run_evaluate(args)
        if args.command == "demo":
            from indexer.demo import run_demo

            return run_demo(
                weights=args.weights,
                folder=args.folder,
                rebuild=args.rebuild,
                serve=not args.no_serve,
                host=args.host,
                port=args.port,
            )
    except RecommenderError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def _resolve_catalog(spec: str) -> str:
    """Turns ``fashion-mnist[:IDX_DIR]`` into an ordinary catalog CSV; other specs pass through."""
    from recommender import fashion_mnist

    idx_dir = fashion_mnist.parse_source(spec)
    if idx_dir is None:
        return spec
    target = Path(idx_dir) / "catalog" if idx_dir else Path.home() / ".cache" / "recommender" / "fashion-mnist"
    print(f"fashion-mnist: writing the catalog into {target}", file=sys.stderr)
    return str(fashion_mnist.materialize(target, idx_dir or None))


def _run_build(args: argparse.Namespace) -> int:
    from indexer.build import build_bundle, load_catalog
    from recommender.catalog import describe_bad_rows

    config = build_config_from_args(args)
    catalog = load_catalog(_resolve_catalog(args.catalog), config)
    report = build_bundle(catalog, args.out, config, overwrite=args.overwrite, progress=sys.stderr.isatty())
    if report.bad_rows:
        from recommender.catalog import BadRow

        bad = [BadRow(**row) for row in report.bad_rows]
        print(f"{len(bad)} of {report.total_rows} rows left out:\n{describe_bad_rows(bad)}", file=sys.stderr)
    heads = ", ".join(
        f"{column} {values['validation_accuracy']:.3f}" for column, values in report.metrics["heads"].items()
    )
    print(
        f"built {report.bundle} (id {report.bundle_id}): {report.items} items, "
        f"{report.extracted} images through the backbone, {report.cached} from the feature store; "
        f"validation accuracy: {heads}; {report.seconds.get('total', 0):.1f} s",
        file=sys.stderr,
    )
    train_only = report.metrics.get("train_only_classes")
    if train_only:
        print(
            f"{len(train_only)} class(es) too small to hold out trained on all their rows "
            f"(validation covers {report.metrics['validation_classes']} of {report.metrics['total_classes']} classes)",
            file=sys.stderr,
        )
    if "hierarchy" in report.metrics:
        found = report.metrics["hierarchy"]
        print(
            f"hierarchy ({found['mode']}): path score {found['path_score']:.3f} of {found['path_score_max']}, "
            f"every level right {found['path_accuracy']:.3f}",
            file=sys.stderr,
        )
    if "tags" in report.metrics:
        found = report.metrics["tags"]
        print(
            f"tags: validation micro-F1 {found['validation_micro_f1_tuned']:.3f} with tuned thresholds "
            f"({found['mode']}), {found['validation_micro_f1_at_0.5']:.3f} at 0.5",
            file=sys.stderr,
        )
    if "baseline" in report.metrics:  # each head beside a probe, then a warning per head below it
        from recommender.baseline import BuildBaseline

        for line in BuildBaseline.from_json(report.metrics["baseline"]).summary_lines():
            print(line, file=sys.stderr)
    print(
        json.dumps(
            {
                "bundle": report.bundle,
                "bundle_id": report.bundle_id,
                "items": report.items,
                "bad_rows": len(report.bad_rows),
                "extracted": report.extracted,
                "metrics": report.metrics["heads"],
            }
        )
    )
    return EXIT_OK


def _run_query(args: argparse.Namespace) -> int:
    from recommender.engine import MAX_K, load_bundle
    from recommender.errors import InvalidImageError

    if not 1 <= args.k <= MAX_K:
        print(f"error: --k must be from 1 to {MAX_K}, got {args.k}", file=sys.stderr)
        return EXIT_USAGE
    from recommender.filters import parse_filters

    filters = parse_filters(args.filters, "=")
    recommender = load_bundle(args.bundle)
    failed = 0
    for image in args.images:
        try:
            answer = recommender.query(
                image,
                k=args.k,
                exclude_self=not args.include_self,
                name=image,
                filters=filters,
                match_predicted=args.match_predicted,
            )
        except InvalidImageError as error:
            failed += 1
            print(f"error: {image}: {error}", file=sys.stderr)
            continue
        print(json.dumps(answer, ensure_ascii=False), flush=True)
    return EXIT_ERROR if failed else EXIT_OK


def main_entry() -> None:
    """Console-script entry point (``recommender``)."""
    sys.exit(main())


def _run_rebuild(args: argparse.Namespace) -> int:
    from indexer.rebuild import RebuildConfig, rebuild, summary_lines, to_json
    from recommender.errors import GateError

    config = RebuildConfig(
        retrain=args.retrain,
        retrain_threshold=args.retrain_threshold,
        keep=args.keep,
        max_accuracy_drop=args.max_accuracy_drop,
    )
    try:
        summary = rebuild(args.catalog, args.root, build_config_from_args(args), config, progress=sys.stderr.isatty())
    except GateError as error:
        print(f"error: validation gate refused the new bundle: {error}; current bundle unchanged", file=sys.stderr)
        return EXIT_ERROR
    for line in summary_lines(summary):
        print(line, file=sys.stderr)
    print(to_json(summary))
    return EXIT_OK


def _run_status(args: argparse.Namespace) -> int:
    from indexer.artifacts import status

    report = status(args.root)
    if args.json:
        print(json.dumps(report, default=str))
        return EXIT_OK
    print(f"root: {report['root']}")
    print(f"current: {report['current'] or 'none (nothing published yet)'}")
    print(f"lock: {report['lock'] or 'free'}")
    print("bundles:")
    for bundle in report["bundles"]:
        mark = "*" if bundle["current"] else " "
        detail = bundle.get("error") or f"{bundle['items']} items, created {bundle['created_at']}"
        print(f"  {mark} {bundle['id']}  {detail}")
    print("last runs:")
    for run in report["runs"]:
        counts = run.get("counts") or {}
        changed = ", ".join(f"{k} {v}" for k, v in counts.items())
        print(
            f"  {run['run_id']}  {run['state']:<11s} {run.get('bundle_id') or run.get('reason') or run.get('message') or ''}  {changed}"
        )
    return EXIT_OK
