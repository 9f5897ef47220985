"""Quality on every real catalog in ../shared: each head against a probe, alone, and the blog head.

    python bench/quality.py [--catalogs clothing-small,fashion-products-small,grocery-store]
                            [--seeds 0,1,2] [--feature-store PATH] [--alone all|primary]
                            [--set FIELD=VALUE ...] [--quick]

For each catalog (shared MobileNet v1 TFLite backbone, features cached in the feature store):

- ``clothing-small``: catalog = train+validation (3,409), queries = test (372); one head.
- ``fashion-products-small``: a seeded split (20% of each articleType with >= 5 photos as
  queries; rarer types stay in the catalog, so its long tail is trained on); 7 flat heads,
  articleType primary.
- ``grocery-store``: catalog = train+val, queries = test;
  ``category>coarse_class>fine_class`` hierarchy (decoded over valid paths), fine_class primary.

Per training seed it trains the default recipe with every head (exactly what a build trains),
the same model with each head alone, and the original blog post's head (primary label only,
no flips, no contrastive term, no refit), and measures on the query rows: every head's
accuracy and macro-F1, and P@6 of the primary label in the trained embedding (flip-averaged,
standardized, exact search). Seed-independent baselines: a logistic-regression probe per head
on the raw standardized features (``recommender.baseline.probe_metrics``) and P@6 of those raw
features. It prints one table per catalog (mean and min over seeds) with the issue's targets,
and writes bench/results/quality.json.

Training goes through the library's ``train_classifier`` and ``ClassifierRunner`` on the same
cached features a build uses; it skips the bundle writing and the query-time decoding (the
pixels are those ``load_image`` gave when the features were extracted).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from common import MOBILENET, SHARED, machine, save_results  # noqa: E402

from recommender.classifier import TrainConfig  # noqa: E402

DATASETS = SHARED / "datasets"

#: The issue's targets (mean over seeds, on every catalog).
TARGETS = {
    "primary_vs_probe": 0.01,  # primary head accuracy >= its probe + 0.01
    "other_vs_probe": -0.01,  # every other head >= its probe - 0.01
    "multihead_cost": 0.01,  # adding the other heads costs the primary head <= 0.01
    "p_at_6_vs_raw": 0.03,  # P@6 of the embedding >= raw features + 0.03
    "clothing_accuracy": 0.86,
    "clothing_p_at_6": 0.80,
}

#: The original blog post's head: the same layers, Adam 4e-4, batch 64, dropout 0.7, balanced
#: class weights, trained on the original photos only, early-stopped on the validation loss.
BLOG_HEAD = {
    "contrastive_weight": 0.0,
    "flip_augment": False,
    "refit_all": False,
    "stop_on": "loss",
    "dropout": 0.7,
    "class_weight_power": 1.0,
}


@dataclass(frozen=True)
class CatalogSpec:
    """One benchmark catalog: where its rows are, its heads, and how it splits into catalog and queries."""

    name: str
    label_columns: tuple[str, ...]
    hierarchy: tuple[str, ...] | None = None
    catalog_splits: tuple[str, ...] | None = None
    query_splits: tuple[str, ...] | None = None
    seeded_split_column: str | None = None  # no split column: hold out 20% of each class of this column

    @property
    def primary(self) -> str:
        return self.hierarchy[-1] if self.hierarchy else self.label_columns[0]


CATALOGS = {
    "clothing-small": CatalogSpec("clothing-small", ("label",), None, ("train", "validation"), ("test",)),
    "fashion-products-small": CatalogSpec(
        "fashion-products-small",
        ("articleType", "gender", "masterCategory", "subCategory", "baseColour", "season", "usage"),
        seeded_split_column="articleType",
    ),
    "grocery-store": CatalogSpec(
        "grocery-store",
        ("fine_class", "coarse_class", "category"),
        ("category", "coarse_class", "fine_class"),
        ("train", "val"),
        ("test",),
    ),
}


#: --quick (the test suite): the first rows of the seeded split's catalog and queries.
QUICK_CATALOG_ROWS = 400
QUICK_QUERY_ROWS = 120


def seeded_split(rows, column: str, share: float = 0.2, min_class: int = 5, seed: int = 0):
    """Holds out ``share`` of each class with >= ``min_class`` rows as queries; rarer classes stay in the catalog."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for position, row in enumerate(rows):
        by_class.setdefault(row.labels[column], []).append(position)
    held_out: set[int] = set()
    for name in sorted(by_class):
        positions = by_class[name]
        if len(positions) >= min_class:
            count = max(1, int(round(share * len(positions))))
            held_out.update(int(p) for p in rng.choice(positions, count, replace=False))
    catalog = [row for p, row in enumerate(rows) if p not in held_out]
    queries = [row for p, row in enumerate(rows) if p in held_out]
    return catalog, queries


def load_features(spec: CatalogSpec, backbone, store, quick: bool = False):
    """``(catalog ExtractionResult, query ExtractionResult, catalog bad rows)`` of one catalog.

    ``quick`` keeps the first :data:`QUICK_CATALOG_ROWS` catalog rows and :data:`QUICK_QUERY_ROWS`
    query rows before extracting, so the test suite's run decodes only the photos it measures.
    """
    from recommender.catalog import read_catalog
    from recommender.features import extract_features

    source = DATASETS / spec.name / "labels.csv"
    columns = list(spec.label_columns)
    if spec.seeded_split_column:
        catalog = read_catalog(source, label_columns=columns)
        catalog_rows, query_rows = seeded_split(catalog.rows, spec.seeded_split_column)
        bad = catalog.bad_rows
    else:
        catalog = read_catalog(source, label_columns=columns, splits=list(spec.catalog_splits))
        catalog_rows, bad = catalog.rows, catalog.bad_rows
        query_rows = read_catalog(source, label_columns=columns, splits=list(spec.query_splits)).rows
    if quick:
        catalog_rows, query_rows = catalog_rows[:QUICK_CATALOG_ROWS], query_rows[:QUICK_QUERY_ROWS]
    found = [extract_features(rows, backbone, store, flips=True) for rows in (catalog_rows, query_rows)]
    store.compact()
    return found[0], found[1], bad


def train(spec: CatalogSpec, catalog, config: TrainConfig, only: str | None = None):
    """Trains the classifier on the catalog rows: every head (the build's layout), or one column alone."""
    from recommender.classifier import train_classifier
    from recommender.labels import LabelSpace, Taxonomy

    columns = [only] if only else list(spec.label_columns)
    labels = {column: [row.labels[column] for row in catalog.rows] for column in columns}
    taxonomy = None
    if spec.hierarchy and not only:
        taxonomy, conflicts = Taxonomy.learn([row.labels for row in catalog.rows], spec.hierarchy)
        if conflicts:
            raise SystemExit(f"{spec.name}: {len(conflicts)} rows break the hierarchy")
    space = LabelSpace.create(labels, taxonomy=taxonomy)
    flipped = catalog.flipped if config.flip_augment else None
    return train_classifier(catalog.features, labels, config, flipped=flipped, space=space)


def measure(trained, catalog, queries, flip_average: bool) -> dict:
    """Accuracy and macro-F1 of every head on the query rows, and the primary label's P@6."""
    from recommender.baseline import classification_summary, exact_precision_at_k
    from recommender.classifier import ClassifierRunner
    from recommender.scalers import fit_scaler, transform

    space = trained.label_space
    runner = ClassifierRunner(trained.model, trained.input_scaler, [head.name for head in space.heads])
    catalog_embeddings, _ = runner.run(catalog.features, catalog.flipped if flip_average else None)
    query_embeddings, outputs = runner.run(queries.features, queries.flipped if flip_average else None)
    predicted = space.predict(outputs)
    found = {"heads": {}}
    for column in space.columns:
        names = space.classes_of(column)
        truth = np.array([row.labels[column] for row in queries.rows], object)
        guess = np.array([names[code] for code in predicted[column][0]], object)
        known = np.isin(truth, names)  # a query label the catalog lacks can be predicted by no model
        found["heads"][column] = classification_summary(truth[known].astype(str), guess[known].astype(str))
    scaler = fit_scaler(catalog_embeddings)
    primary = space.primary_column
    found["p_at_6"] = exact_precision_at_k(
        transform(scaler, catalog_embeddings),
        [row.labels[primary] for row in catalog.rows],
        transform(scaler, query_embeddings),
        [row.labels[primary] for row in queries.rows],
    )["precision_at_k"]
    found["epochs"] = trained.metrics.get("best_epoch")
    return found


def baselines(spec: CatalogSpec, catalog, queries) -> dict:
    """The seed-independent baselines: a probe per head and raw-feature P@6 (original photos only)."""
    from recommender.baseline import exact_precision_at_k, probe_metrics
    from recommender.scalers import fit_scaler, transform

    probes = {}
    for column in spec.label_columns:
        probe = probe_metrics(
            catalog.features,
            [row.labels[column] for row in catalog.rows],
            queries.features,
            [row.labels[column] for row in queries.rows],
        )
        probes[column] = {"accuracy": probe["accuracy"], "macro_f1": probe["macro_f1"], "seconds": probe["seconds"]}
    scaler = fit_scaler(catalog.features)
    raw = exact_precision_at_k(
        transform(scaler, catalog.features),
        [row.labels[spec.primary] for row in catalog.rows],
        transform(scaler, queries.features),
        [row.labels[spec.primary] for row in queries.rows],
    )
    return {"probe": probes, "raw_p_at_6": raw["precision_at_k"]}


def run_catalog(spec: CatalogSpec, backbone, store, seeds, config: TrainConfig, alone: str, quick: bool) -> dict:
    """Every measurement of one catalog."""
    catalog, queries, bad = load_features(spec, backbone, store, quick)
    result = {
        "catalog_items": len(catalog.rows),
        "queries": len(queries.rows),
        "bad_rows": len(bad),
        "primary": spec.primary,
        "heads": list(spec.label_columns),
        "hierarchy": list(spec.hierarchy) if spec.hierarchy else None,
        **baselines(spec, catalog, queries),
        "runs": [],
    }
    alone_columns = list(spec.label_columns) if alone == "all" else [spec.primary]
    for seed in seeds:
        seeded = replace(config, seed=seed)
        started = time.perf_counter()
        run = {"seed": seed, "multi": measure(train(spec, catalog, seeded), catalog, queries, seeded.flip_augment)}
        run["multi"]["seconds"] = time.perf_counter() - started
        run["alone"] = {}
        for column in alone_columns:
            if len(spec.label_columns) == 1:
                run["alone"][column] = run["multi"]  # one head: alone is the same model
                continue
            trained = train(spec, catalog, seeded, only=column)
            run["alone"][column] = measure(trained, catalog, queries, seeded.flip_augment)
        blog = replace(seeded, **BLOG_HEAD)
        run["blog"] = measure(train(spec, catalog, blog, only=spec.primary), catalog, queries, False)
        result["runs"].append(run)
        print(f"  {spec.name} seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return result


def summarize(result: dict) -> dict:
    """Means and minima over seeds, and the targets met or not."""

    def stats(values):
        values = [v for v in values if v is not None]
        return {"mean": float(np.mean(values)), "min": float(np.min(values))} if values else None

    runs = result["runs"]
    heads = {}
    for column in result["heads"]:
        heads[column] = {
            "accuracy": stats([r["multi"]["heads"][column]["accuracy"] for r in runs]),
            "macro_f1": stats([r["multi"]["heads"][column]["macro_f1"] for r in runs]),
            "probe_accuracy": result["probe"][column]["accuracy"],
            "probe_macro_f1": result["probe"][column]["macro_f1"],
        }
        if all(column in r["alone"] for r in runs):
            heads[column]["alone_accuracy"] = stats([r["alone"][column]["heads"][column]["accuracy"] for r in runs])
            heads[column]["alone_macro_f1"] = stats([r["alone"][column]["heads"][column]["macro_f1"] for r in runs])
    primary = result["primary"]
    summary = {
        "heads": heads,
        "p_at_6": stats([r["multi"]["p_at_6"] for r in runs]),
        "alone_p_at_6": stats([r["alone"][primary]["p_at_6"] for r in runs]),
        "blog_accuracy": stats([r["blog"]["heads"][primary]["accuracy"] for r in runs]),
        "blog_macro_f1": stats([r["blog"]["heads"][primary]["macro_f1"] for r in runs]),
        "blog_p_at_6": stats([r["blog"]["p_at_6"] for r in runs]),
        "raw_p_at_6": result["raw_p_at_6"],
    }
    checks = {}
    for column, figures in heads.items():
        margin = TARGETS["primary_vs_probe"] if column == primary else TARGETS["other_vs_probe"]
        difference = figures["accuracy"]["mean"] - figures["probe_accuracy"]
        checks[f"{column} vs probe"] = {"difference": difference, "target": margin, "met": difference >= margin}
    cost = heads[primary]["alone_accuracy"]["mean"] - heads[primary]["accuracy"]["mean"]
    checks["cost of the other heads"] = {"difference": cost, "target": TARGETS["multihead_cost"], "met": cost <= 0.01}
    gain = summary["p_at_6"]["mean"] - summary["raw_p_at_6"]
    checks["P@6 vs raw"] = {"difference": gain, "target": TARGETS["p_at_6_vs_raw"], "met": gain >= 0.03}
    summary["checks"] = checks
    return summary


def print_table(name: str, result: dict, summary: dict, flush: bool = False) -> None:
    def cell(figure):
        return "–" if figure is None else f"{figure['mean']:.3f} ({figure['min']:.3f})"

    seeds = len(result["runs"])
    print(
        f"\n{name}: catalog {result['catalog_items']}, queries {result['queries']}, primary {result['primary']}"
        f"{', hierarchy ' + '>'.join(result['hierarchy']) if result['hierarchy'] else ''}; {seeds} seed(s), mean (min)"
    )
    print(
        f"{'head':16s} {'acc, all heads':>16s} {'acc, alone':>16s} {'probe':>6s} {'macro-F1':>16s} {'alone':>16s} {'probe':>6s}"
    )
    for column, h in summary["heads"].items():
        print(
            f"{column[:16]:16s} {cell(h['accuracy']):>16s} {cell(h.get('alone_accuracy')):>16s} {h['probe_accuracy']:6.3f}"
            f" {cell(h['macro_f1']):>16s} {cell(h.get('alone_macro_f1')):>16s} {h['probe_macro_f1']:6.3f}"
        )
    print(
        f"blog head ({result['primary']}): accuracy {cell(summary['blog_accuracy'])}, macro-F1 "
        f"{cell(summary['blog_macro_f1'])}, P@6 {cell(summary['blog_p_at_6'])}"
    )
    print(
        f"P@6 ({result['primary']}): embedding {cell(summary['p_at_6'])}, alone {cell(summary['alone_p_at_6'])}, "
        f"raw features {summary['raw_p_at_6']:.3f}"
    )
    for check, c in summary["checks"].items():
        print(f"  {'met' if c['met'] else 'NOT MET':7s} {check}: {c['difference']:+.3f} (target {c['target']:+.2f})")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalogs", default=",".join(CATALOGS), help="comma-separated catalogs (default: all)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: 0,1,2)")
    parser.add_argument("--feature-store", type=Path, default=None, help="feature cache (default: a temp file)")
    parser.add_argument("--alone", choices=("all", "primary"), default="all", help="which heads to also train alone")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a TrainConfig field"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fashion-products-small subset, seed 0, 3 epochs, primary alone (tests)"
    )
    args = parser.parse_args()
    if not DATASETS.is_dir() or not MOBILENET.is_file():
        print(f"needs {DATASETS} and {MOBILENET}", file=sys.stderr)
        return 1
    config = TrainConfig()
    if hasattr(config, "baseline"):  # the bench measures its own baselines on the query rows
        config = replace(config, baseline=False)
    for item in args.set:
        name, _, value = item.partition("=")
        kind = type(getattr(config, name))
        config = replace(config, **{name: value.lower() in ("1", "true") if kind is bool else kind(value)})
    names = args.catalogs.split(",")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.quick:
        names, seeds, config = ["fashion-products-small"], [0], replace(config, max_epochs=3)
        args.alone = "primary"
    from recommender.backbones import BackboneSpec, load_backbone
    from recommender.features import FeatureStore

    backbone = load_backbone(BackboneSpec(name=f"tflite:{MOBILENET}"))
    load_before = list(os.getloadavg())
    results = {}
    with tempfile.TemporaryDirectory() as temp:
        store = FeatureStore(
            args.feature_store or Path(temp) / "features.h5", backbone.identity["key"], backbone.feature_dim
        )
        for name in names:
            result = run_catalog(CATALOGS[name], backbone, store, seeds, config, args.alone, args.quick)
            results[name] = {**result, "summary": summarize(result)}
            print_table(name, result, results[name]["summary"], flush=True)
    print(f"machine: {machine()}; training overrides: {args.set or 'none (defaults)'}")
    if "clothing-small" in results:
        s = results["clothing-small"]["summary"]
        print(
            f"\nclothing-small: accuracy {s['heads']['label']['accuracy']['mean']:.3f} (target >= "
            f"{TARGETS['clothing_accuracy']}), P@6 {s['p_at_6']['mean']:.3f} (target >= {TARGETS['clothing_p_at_6']})"
        )
    path = save_results(
        "quality-quick" if args.quick else "quality",
        {
            "catalogs": results,
            "targets": TARGETS,
            "overrides": args.set,
            "seeds": seeds,
            "load_average": {"before": load_before, "after": list(os.getloadavg())},
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
