"""``recommender rebuild``: the nightly job's flags, defaults read from :class:`RebuildConfig`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from indexer.commands.flags import add_build_settings, add_catalog_columns, build_config_from_args, build_label_help
from indexer.rebuild import RETRAIN_POLICIES, RebuildConfig


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
    try:
        summary = rebuild(args.catalog, args.root, build_config_from_args(args), config, progress=sys.stderr.isatty())
    except GateError as error:
        print(f"error: validation gate refused the new bundle: {error}; current bundle unchanged", file=sys.stderr)
        return 1
    for line in summary_lines(summary):
        print(line, file=sys.stderr)
    print(to_json(summary))
    return 0
