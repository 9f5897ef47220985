"""``recommender panels``: precompute every catalog item's "similar items" panel from a bundle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from indexer.panels import DEFAULT_BATCH_SIZE
from recommender.engine import DEFAULT_K


def _count(text: str) -> int:
    """A whole number >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``panels`` flags.

    Args:
        parser: the ``panels`` subcommand's parser.
    """
    parser.add_argument("--bundle", required=True, type=Path, help="bundle folder (or a current symlink to one)")
    parser.add_argument("--out", required=True, type=Path, help="panels folder to create")
    parser.add_argument(
        "--k", type=_count, default=DEFAULT_K, help="neighbours per item, 1..100 (default: %(default)s)"
    )
    parser.add_argument(
        "--per",
        metavar="COLUMN",
        default=None,
        help="search each item's neighbours among the items with its own value in this label column",
    )
    parser.add_argument(
        "--batch-size", type=_count, default=DEFAULT_BATCH_SIZE, help="items per index search (default: %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing panels folder at --out")
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: search in this process; ray: the items split over Ray tasks, one per cluster CPU "
        "(every node must read the bundle) (default: %(default)s)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (auto, HOST:PORT or ray://HOST:10001); default: a private local Ray for the job",
    )


def run(args: argparse.Namespace) -> int:
    """Writes the panels; a summary line on stderr and the report as one JSON line on stdout.

    Args:
        args: flags from :func:`add_arguments`.

    Returns:
        0 (errors are raised as :class:`recommender.errors.RecommenderError`).
    """
    from indexer.panels import write_panels
    from recommender.config import RayConfig

    if args.engine == "ray" and args.ray_address:
        from indexer.ray_engine import check_reachable

        check_reachable(args.ray_address)
    report = write_panels(
        args.bundle,
        args.out,
        args.k,
        args.per,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=sys.stderr.isatty(),
        engine=args.engine,
        ray_config=RayConfig(address=args.ray_address),
    )
    per = f" within each item's {report.per_column}" if report.per_column else ""
    left_out = f"; {report.items_without_value} without a {report.per_column} left out" if report.per_column else ""
    print(
        f"panels of {report.items} items (k={report.k}{per}) for bundle {report.bundle_id} in {report.out}: "
        f"{report.seconds:.2f} s, {report.items_per_second:,.0f} items/s{left_out}",
        file=sys.stderr,
    )
    print(json.dumps(report.to_json()))
    return 0
