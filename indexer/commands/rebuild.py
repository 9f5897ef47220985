"""``recommender rebuild``: the nightly job's flags, defaults read from :class:`RebuildConfig`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from indexer.commands.flags import add_build_settings, add_catalog_columns, build_config_from_args, build_label_help
from indexer.rebuild import RETRAIN_POLICIES, RebuildConfig
from recommender.engine import DEFAULT_K


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``rebuild`` flags: the job's policy, then the catalog and build flags of ``build``.

    Args:
        parser: the ``rebuild`` subcommand's parser.
    """
    defaults = RebuildConfig()
    parser.add_argument("--catalog", required=True, help="catalog CSV or folder of class folders")
    parser.add_argument(
        "--root", required=True, type=Path, help="artifact root (bundles/, current, features.h5, runs/)"
    )
    parser.add_argument(
        "--retrain",
        choices=RETRAIN_POLICIES,
        default=defaults.retrain,
        help="auto: retrain when the label set or more than --retrain-threshold of the catalog changed "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--retrain-threshold",
        type=float,
        default=defaults.retrain_threshold,
        help="share of changed items that makes auto retrain (default: %(default)s)",
    )
    parser.add_argument(
        "--keep",
        type=int,
        default=defaults.keep,
        help="bundles to keep (default: %(default)s; current is never pruned)",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=defaults.max_accuracy_drop,
        help="gate: largest allowed fall in validation accuracy (default: %(default)s)",
    )
    panels = parser.add_argument_group("panels (after a publish)")
    panels.add_argument(
        "--panels",
        action="store_true",
        help="write the published bundle's similar-items panels to ROOT/panels/<bundle id>/ "
        "(a failure is reported, the bundle stays published)",
    )
    panels.add_argument(
        "--panels-k", type=int, default=DEFAULT_K, metavar="K", help="neighbours per panel (default: %(default)s)"
    )
    panels.add_argument("--panels-per", metavar="COLUMN", default=None, help="panels within each item's own value")
    add_catalog_columns(parser, label_help=build_label_help())
    add_build_settings(parser)


def run(args: argparse.Namespace) -> int:
    """Runs the rebuild; prints its summary to stderr and its JSON to stdout.

    Args:
        args: flags from :func:`add_arguments`.

    Returns:
        0 when published or nothing changed; 1 when the validation gate refused the new bundle.
    """
    from indexer.rebuild import rebuild, summary_lines, to_json
    from recommender.errors import GateError

    config = RebuildConfig(
        retrain=args.retrain,
        retrain_threshold=args.retrain_threshold,
        keep=args.keep,
        max_accuracy_drop=args.max_accuracy_drop,
    )
    build_config = build_config_from_args(args)
    try:
        summary = rebuild(args.catalog, args.root, build_config, config, progress=sys.stderr.isatty())
    except GateError as error:
        print(f"error: validation gate refused the new bundle: {error}; current bundle unchanged", file=sys.stderr)
        return 1
    if args.panels:
        add_panels(args.root, summary, args.panels_k, args.panels_per, build_config)
    for line in summary_lines(summary):
        print(line, file=sys.stderr)
    if "panels" in summary:
        panels = summary["panels"]
        print(
            f"  panels: {panels['state']} {panels.get('path', '')} {panels.get('reason', '')}".rstrip(), file=sys.stderr
        )
    print(to_json(summary))
    return 0


def add_panels(root: Path, summary: dict, k: int, per_column: str | None, build_config=None) -> None:
    """Writes the published bundle's panels after the run and records the outcome in its summary.

    Runs after ``rebuild`` returned (the job lock released, ``current`` already swapped): the
    bundle is published whatever happens here. The outcome goes into ``summary["panels"]`` and
    into the run's log file (``ROOT/runs/<run id>.json``). With ``--engine ray`` (the build
    config's engine) the panels are computed in Ray tasks too.
    """
    from indexer.artifacts import ArtifactRoot
    from indexer.panels import write_published_panels
    from recommender.files import atomic_write_json

    engine = build_config.engine if build_config is not None else "local"
    ray_config = build_config.ray if build_config is not None else None
    summary["panels"] = write_published_panels(root, summary, k, per_column, engine=engine, ray_config=ray_config)
    run_log = ArtifactRoot(root).runs / f"{summary['run_id']}.json"
    if run_log.is_file():
        atomic_write_json(run_log, summary, default=str)
