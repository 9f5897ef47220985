"""``recommender build``: flags, and the summary printed after :func:`indexer.build.build_bundle`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from indexer.commands.flags import add_build_settings, add_catalog_columns, build_config_from_args, build_label_help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``build`` flags.

    Args:
        parser: the ``build`` subcommand's parser.
    """
    parser.add_argument(
        "--catalog", required=True, help="catalog CSV, folder of class folders, or fashion-mnist[:IDX_DIR]"
    )
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    add_catalog_columns(parser, label_help=build_label_help())
    add_build_settings(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")


def run(args: argparse.Namespace) -> int:
    """Builds the bundle; prints left-out rows and a summary to stderr and one JSON line to stdout.

    Args:
        args: flags from :func:`add_arguments`.

    Returns:
        0 (errors are raised as :class:`recommender.errors.RecommenderError`).
    """
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
    return 0


def _resolve_catalog(spec: str) -> str:
    """Turns ``fashion-mnist[:IDX_DIR]`` into an ordinary catalog CSV; other specs pass through."""
    from recommender import fashion_mnist

    idx_dir = fashion_mnist.parse_source(spec)
    if idx_dir is None:
        return spec
    target = Path(idx_dir) / "catalog" if idx_dir else Path.home() / ".cache" / "recommender" / "fashion-mnist"
    print(f"fashion-mnist: writing the catalog into {target}", file=sys.stderr)
    return str(fashion_mnist.materialize(target, idx_dir or None))
