"""``recommender rollback``: point ``current`` back at an earlier bundle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``rollback`` flags.

    Args:
        parser: the ``rollback`` subcommand's parser.
    """
    parser.add_argument("--root", required=True, type=Path, help="artifact root")
    parser.add_argument(
        "--to", default=None, metavar="BUNDLE_ID", help="bundle id (default: the newest one older than current)"
    )


def run(args: argparse.Namespace) -> int:
    """Swaps ``current``; says so on stderr and prints the result as JSON.

    Args:
        args: flags from :func:`add_arguments`.

    Returns:
        0 (an impossible rollback raises :class:`recommender.errors.RecommenderError`).
    """
    from indexer.artifacts import rollback

    result = rollback(args.root, args.to)
    print(f"current is now {result['current']} (was {result['previous']})", file=sys.stderr)
    print(json.dumps(result))
    return 0
