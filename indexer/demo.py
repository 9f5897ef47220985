"""The README's main command: generate a demo catalog, build a bundle, run example queries.

Works offline. It asks for ImageNet ResNet50 weights first; where they cannot be had (no
internet, no Keras cache) it says so and uses a random-init ResNet50 instead, which is
recorded in the bundle and is only meaningful on generated images like these.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from recommender.backbones import BackboneSpec, resolved_spec
from recommender.bundle import read_manifest
from recommender.config import BuildConfig
from recommender.engine import DEFAULT_K
from recommender.errors import BundleError, WeightsUnavailableError

#: Demo catalog: 6 patterns x 5 colours x this many images each.
DEMO_PER_CLASS = 10
#: Generated image side and backbone input size (small keeps the offline demo quick).
DEMO_IMAGE_SIZE = 128
#: The generated catalog's known taxonomy (see recommender.synthetic.PATTERN_TAXONOMY).
DEMO_HIERARCHY = ("department", "family", "label")
DEMO_QUERIES = (("stripes", "red"), ("dots", "blue"), ("checks", "green"), ("diagonal", "black"))

RANDOM_INIT_NOTE = (
    "Quality note: random-init ResNet50 features separate colours and simple patterns like these, "
    "but not real products (0.20 accuracy measured on real clothing photos). For a real catalog "
    "use --weights imagenet on a machine that can download them, --weights PATH, or "
    "--backbone tflite:PATH."
)


def default_demo_folder() -> Path:
    """``data/demo`` in the repository checkout."""
    return Path(__file__).resolve().parents[1] / "data" / "demo"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_demo(
    weights: str = "imagenet",
    folder: Path | None = None,
    rebuild: bool = False,
    serve: bool = True,
    host: str | None = None,
    port: int | None = None,
) -> int:
    """Builds (or reuses) the demo bundle, prints example queries as JSON lines, serves the page.

    Args:
        weights: ``imagenet``, ``none`` or a weights file path for ResNet50.
        folder: where the catalog, queries, feature store and bundle go.
        rebuild: build a new bundle even if one exists.
        serve: end by serving the demo page (until Ctrl+C).
        host: address of the demo page (None: the web app's default).
        port: its port (None: the web app's default).

    Returns:
        Exit code 0.
    """
    import numpy as np

    from indexer.build import build_bundle
    from recommender.backbones import load_backbone
    from recommender.engine import load_bundle
    from recommender.synthetic import CATALOG_COLUMNS, COLOURS, draw_product, generate_catalog

    folder = Path(folder or default_demo_folder())
    catalog_csv = folder / "catalog" / "catalog.csv"
    if not catalog_csv.exists() or _header(catalog_csv) != CATALOG_COLUMNS:  # absent, or from an older version
        _say(f"generating the demo catalog in {catalog_csv.parent} ...")
        generate_catalog(catalog_csv.parent, per_class=DEMO_PER_CLASS, size=DEMO_IMAGE_SIZE, seed=0)

    # Resolved as the build records it, so the reuse check below compares like with like.
    spec = resolved_spec(BackboneSpec(name="resnet50", weights=weights, input_size=DEMO_IMAGE_SIZE))
    if weights == "imagenet":
        try:
            load_backbone(spec)
        except WeightsUnavailableError as error:
            _say(f"ImageNet weights are not available here: {error}")
            _say("The demo continues with a RANDOM-INIT ResNet50 (--weights none); the bundle records it.")
            spec = replace(spec, weights="none")

    bundle = folder / (
        "bundle-imagenet"
        if spec.weights == "imagenet"
        else "bundle-random-init"
        if spec.weights == "none"
        else "bundle-file"
    )
    reuse = False
    if bundle.exists() and not rebuild:
        try:
            manifest = read_manifest(bundle)
            reuse = (
                manifest.backbone.spec == spec
                and manifest.catalog.hierarchy == tuple(DEMO_HIERARCHY)
                and manifest.catalog.tags_column == "tags"
            )
        except BundleError:
            reuse = False
    if not reuse:
        _say(f"building the demo bundle in {bundle} (backbone resnet50, weights {spec.weights}) ...")
        config = replace(
            BuildConfig(),
            id_column="id",
            label_columns=("label", "colour"),
            hierarchy=DEMO_HIERARCHY,
            tags_column="tags",
            backbone=spec,
            feature_store=folder / "features.h5",
        )
        report = build_bundle(catalog_csv, bundle, config, overwrite=True, progress=sys.stderr.isatty())
        heads = ", ".join(f"{c} {v['validation_accuracy']:.2f}" for c, v in report.metrics["heads"].items())
        _say(f"built {report.items} items in {report.seconds['total']:.0f} s; validation accuracy: {heads}")
    else:
        _say(f"reusing the demo bundle in {bundle} (pass --rebuild to build it again)")

    queries = folder / "queries"
    queries.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(12345)
    paths = []
    for pattern, colour in DEMO_QUERIES:
        path = queries / f"{pattern}-{colour}.jpg"
        if not path.exists():
            draw_product(pattern, COLOURS[colour], DEMO_IMAGE_SIZE, rng).save(path, quality=92)
        paths.append(path)

    recommender = load_bundle(bundle)
    _say("")
    for (pattern, _colour), path in zip(DEMO_QUERIES, paths):
        answer = recommender.query(path, k=DEFAULT_K, name=str(path))
        print(json.dumps(answer, ensure_ascii=False))
        predicted = answer["predicted"]
        same = sum(n["labels"]["label"] == pattern for n in answer["neighbors"])
        tags = ", ".join(t["tag"] for t in answer.get("tags", [])) or "none"
        _say(
            f"query {path.name}: predicted {' > '.join(answer['hierarchy']['path'])} "
            f"({predicted['label']['probability']:.2f}), colour {predicted['colour']['label']} "
            f"({predicted['colour']['probability']:.2f}), tags {tags}; "
            f"{same}/{DEFAULT_K} neighbours have {pattern}: " + ", ".join(n["id"] for n in answer["neighbors"])
        )
    colour = DEMO_QUERIES[0][1]
    narrowed = recommender.query(paths[0], k=DEFAULT_K, filters={"colour": colour})
    _say(
        f"query {paths[0].name} with filter colour={colour}: "
        + ", ".join(n["id"] for n in narrowed["neighbors"])
        + f" ({narrowed['filter']['matching_items']} catalog items match)"
    )
    identity = recommender.manifest.backbone.identity
    _say("")
    _say(f"bundle: {bundle} (id {recommender.bundle_id})")
    _say(f"backbone: resnet50, weights: {identity['weights']}, input {identity['input_size']} px")
    if spec.weights == "none":
        _say(RANDOM_INIT_NOTE)
    _say(f"try: python -m recommender query --bundle {bundle} {paths[0]}")
    if not serve:
        return 0
    from webapp import DEFAULT_HOST, DEFAULT_PORT, serve_bundle

    _say("")
    return serve_bundle(bundle, DEFAULT_HOST if host is None else host, DEFAULT_PORT if port is None else port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``demo`` flags.

    Args:
        parser: the ``demo`` subcommand's parser.
    """
    from webapp import DEFAULT_HOST, DEFAULT_PORT

    parser.add_argument(
        "--weights",
        default=BackboneSpec().weights,
        help="imagenet (default; random init is used, and said, when it cannot be had), none, or PATH",
    )
    parser.add_argument("--folder", type=Path, default=None, help="demo folder (default: data/demo in the repository)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the demo bundle even if it exists")
    parser.add_argument(
        "--no-serve", action="store_true", help="print the example queries and exit, without serving the page"
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address of the demo page (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port of the demo page (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Runs :func:`run_demo` with flags from :func:`add_arguments`."""
    return run_demo(
        weights=args.weights,
        folder=args.folder,
        rebuild=args.rebuild,
        serve=not args.no_serve,
        host=args.host,
        port=args.port,
    )


def _header(catalog_csv: Path) -> list[str]:
    with open(catalog_csv, encoding="utf-8") as handle:
        return handle.readline().strip().split(",")
