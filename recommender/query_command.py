"""``recommender query``: one JSON object per image, from a bundle on disk."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recommender.engine import DEFAULT_K, MAX_K

#: The exit code of a usage error, as argparse's (an out-of-range ``--k``).
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``query`` flags.

    Args:
        parser: the ``query`` subcommand's parser.
    """
    parser.add_argument("--bundle", required=True, type=Path, help="bundle folder")
    parser.add_argument(
        "--k", type=int, default=DEFAULT_K, help=f"neighbours per image, 1..{MAX_K} (default: %(default)s)"
    )
    parser.add_argument("--include-self", action="store_true", help="keep a catalog item among its own neighbours")
    parser.add_argument(
        "--filter",
        action="append",
        dest="filters",
        default=[],
        metavar="COLUMN=VALUE",
        help="only neighbours with this label value or tag; repeatable (AND across columns, OR within one)",
    )
    parser.add_argument(
        "--match-predicted",
        action="append",
        default=[],
        metavar="COLUMN",
        help="only neighbours with the image's predicted value of this label column; repeatable",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s)")


def run(args: argparse.Namespace) -> int:
    """Answers each image; an unreadable image gets an ``error:`` line and the rest still run.

    Args:
        args: flags from :func:`add_arguments`.

    Returns:
        0 when every image was answered, 1 when one was not, 2 for an out-of-range ``--k``.
    """
    from recommender.engine import check_k, load_bundle
    from recommender.errors import InvalidImageError, QueryError
    from recommender.filters import parse_filters

    try:
        check_k(args.k, "--k")
    except QueryError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
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
    return 1 if failed else 0
