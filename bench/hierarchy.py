"""Hierarchy modes compared: one softmax head per level against one head over full paths.

    python bench/hierarchy.py [--seeds 0,1,2,3,4] [--feature-store PATH] [--quick]

A build with ``--hierarchy a>b>c`` predicts the taxonomy either ``hierarchical`` (one softmax
head per level; the answer is the valid path with the highest product of level
probabilities) or ``combined`` (one softmax head over the full paths; parents follow from the
leaf). Both are trained here with the project's own code on the same cached features
(``prepare_catalog`` -> ``LabelSpace.create`` with the learned ``Taxonomy`` ->
``train_classifier`` with the default ``TrainConfig`` -> ``ClassifierRunner``, flip-averaged
like a query -> ``LabelSpace.predict``), and measured on held-out rows the model never saw:

- per-level accuracy of the decoded (always valid) path;
- the path score: correct levels per item, one point per level as the original comparison
  counted it (max = the number of levels), and the share of items with every level right;
- P@6 of the trained embedding on the leaf label (test rows against the training catalog).

Datasets:

- clothing-small (real photos, ImageNet-pretrained MobileNet v1 TFLite features; catalog =
  train + validation rows, test = test rows) with a two-level ``department > label``
  hierarchy: the ten classes grouped into departments (:data:`DEPARTMENTS`), written with the
  photos' paths into a temporary CSV. Skipped with a reason without ../shared and in --quick.
- generated T-shirts (``recommender.synthetic``: 6 patterns x 5 colours, the known
  ``department > family > label`` taxonomy) with a random-init ResNet50 at 64 px: a training
  catalog of :data:`GENERATED_PER_CLASS` images per (pattern, colour) and a separate test
  catalog drawn with another seed. Few images per class keep the leaf level off its ceiling.

The training seed varies; the data stays the same. Writes bench/results/hierarchy.json.
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    CLOTHING,
    MOBILENET,
    describe_comparison,
    machine,
    paired_comparison,
    save_results,
    training_arguments,
)

MODES = ("hierarchical", "combined")

#: Test figures the verdict lines compare; the path score decides (as in the issue).
COMPARED = ("path_score", "path_accuracy", "p_at_6")

#: clothing-small class -> department (the root level of its two-level hierarchy).
DEPARTMENTS = {
    "t-shirt": "tops",
    "shirt": "tops",
    "longsleeve": "tops",
    "outwear": "tops",
    "pants": "bottoms",
    "shorts": "bottoms",
    "skirt": "bottoms",
    "dress": "dresses",
    "shoes": "footwear",
    "hat": "headwear",
}

#: Generated catalogs: images per (pattern, colour) pair, full run / --quick.
GENERATED_PER_CLASS = 5
GENERATED_TEST_PER_CLASS = 10
GENERATED_SIZE = 64
GENERATED_TEST_SEED = 100


@dataclass
class Dataset:
    """A training catalog and held-out test rows with their features, and their settings.

    Attributes:
        name: short name for tables and the JSON.
        description: one line on data and backbone.
        catalog: the prepared training catalog (features, flipped features, taxonomy).
        test: the prepared test rows.
        config: the build settings both were prepared with.
    """

    name: str
    description: str
    catalog: object
    test: object
    config: object

    @property
    def levels(self) -> tuple[str, ...]:
        return self.catalog.taxonomy.levels


def clothing_dataset(workdir: Path, feature_store: Path, quick: bool) -> tuple[Dataset | None, str]:
    """clothing-small with a ``department`` column; ``(None, reason)`` when it cannot be used."""
    from indexer.build import prepare_catalog
    from recommender.backbones import BackboneSpec
    from recommender.config import BuildConfig

    if quick:
        return None, "skipped in --quick (real photos take minutes to train)"
    if not CLOTHING.is_dir() or not MOBILENET.is_file():
        return None, f"skipped: needs {CLOTHING} and {MOBILENET} (../shared is absent)"
    source = workdir / "clothing-departments.csv"
    with open(CLOTHING / "labels.csv", newline="", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))
    unknown = sorted({r["label"] for r in records} - set(DEPARTMENTS))
    if unknown:
        return None, f"skipped: classes without a department: {', '.join(unknown)}"
    with open(source, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "split", "department", "label"])
        writer.writeheader()
        for record in records:
            writer.writerow(
                {
                    "file": str((CLOTHING / record["file"]).resolve()),  # absolute: the CSV lives elsewhere
                    "split": record["split"],
                    "department": DEPARTMENTS[record["label"]],
                    "label": record["label"],
                }
            )
    config = replace(
        BuildConfig(),
        label_columns=("label",),
        hierarchy=("department", "label"),
        splits=("train", "validation"),
        backbone=BackboneSpec(name=f"tflite:{MOBILENET}"),
        feature_store=feature_store,
        image_root=CLOTHING,  # the CSV lives in the work folder, the photos in ../shared
    )
    catalog = prepare_catalog(source, config)
    test = prepare_catalog(source, replace(config, splits=("test",)))
    description = (
        "clothing-small photos, MobileNet v1 TFLite (ImageNet) features; catalog = train+validation, test = test"
    )
    return Dataset("clothing-small", description, catalog, test, config), ""


def generated_dataset(workdir: Path, feature_store: Path, quick: bool) -> Dataset:
    """Generated T-shirts (all patterns and colours) with a random-init ResNet50 at 64 px."""
    from indexer.build import prepare_catalog
    from recommender.backbones import BackboneSpec
    from recommender.config import BuildConfig
    from recommender.synthetic import generate_catalog

    per_class, test_per_class = (3, 3) if quick else (GENERATED_PER_CLASS, GENERATED_TEST_PER_CLASS)
    train_source = generate_catalog(workdir / "generated-train", per_class=per_class, size=GENERATED_SIZE, seed=0)
    test_source = generate_catalog(
        workdir / "generated-test", per_class=test_per_class, size=GENERATED_SIZE, seed=GENERATED_TEST_SEED
    )
    config = replace(
        BuildConfig(),
        id_column="id",
        label_columns=("label",),
        hierarchy=("department", "family", "label"),
        backbone=BackboneSpec(name="resnet50", weights="none", input_size=GENERATED_SIZE, seed=0),
        feature_store=feature_store,
    )
    description = (
        f"generated T-shirts (6 patterns x 5 colours), ResNet50 random init {GENERATED_SIZE} px; "
        f"catalog {per_class} per pattern+colour (seed 0), test {test_per_class} per pair (seed {GENERATED_TEST_SEED})"
    )
    return Dataset(
        "generated", description, prepare_catalog(train_source, config), prepare_catalog(test_source, config), config
    )


def labels_of(rows, columns) -> dict[str, list[str]]:
    """Label column -> one value per row."""
    return {column: [row.labels[column] for row in rows] for column in columns}


def train_and_measure(dataset: Dataset, mode: str, seed: int, train_config) -> dict:
    """Trains one mode with one seed and measures it on the test rows."""
    from recommender.classifier import ClassifierRunner, train_classifier, validation_metrics
    from recommender.index import VectorIndex
    from recommender.labels import LabelSpace
    from recommender.scalers import fit_scaler, transform

    catalog, test = dataset.catalog.extraction, dataset.test.extraction
    columns = dataset.catalog.catalog.label_columns
    labels = labels_of(catalog.rows, columns)
    space = LabelSpace.create(labels, taxonomy=dataset.catalog.taxonomy, hierarchy_mode=mode)
    started = time.perf_counter()
    trained = train_classifier(
        catalog.features, labels, replace(train_config, seed=seed), flipped=catalog.flipped, space=space
    )
    train_seconds = time.perf_counter() - started

    # Flip-averaged like a build embeds its catalog and the engine its queries.
    runner = ClassifierRunner(trained.model, trained.input_scaler, [head.name for head in space.heads])
    flips = dataset.config.flip_average
    catalog_embeddings, _ = runner.run(catalog.features, catalog.flipped if flips else None)
    test_embeddings, outputs = runner.run(test.features, test.flipped if flips else None)
    scores = validation_metrics(space, outputs, labels_of(test.rows, columns))  # any held-out rows

    leaf = dataset.levels[-1]
    scaler = fit_scaler(catalog_embeddings)
    index = VectorIndex.build(transform(scaler, catalog_embeddings), "flat", use_gpu=False)
    positions = index.search(transform(scaler, test_embeddings), 6).positions
    catalog_leaf = np.array(labels[leaf])
    test_leaf = np.array([row.labels[leaf] for row in test.rows])
    return {
        "mode": mode,
        "seed": seed,
        "level_accuracy": {level: scores["heads"][level]["validation_accuracy"] for level in dataset.levels},
        "path_score": scores["hierarchy"]["path_score"],
        "path_score_max": scores["hierarchy"]["path_score_max"],
        "path_accuracy": scores["hierarchy"]["path_accuracy"],
        "p_at_6": float(np.mean(catalog_leaf[positions] == test_leaf[:, None])),
        "train_seconds": train_seconds,
        "epochs": trained.metrics["epochs_run"],
        "heads": [head.target for head in space.heads],
    }


def figures(run: dict) -> dict[str, float]:
    """The compared figures of one run, flat."""
    return {
        **{f"accuracy {level}": value for level, value in run["level_accuracy"].items()},
        "path_score": run["path_score"],
        "path_accuracy": run["path_accuracy"],
        "p_at_6": run["p_at_6"],
        "train_seconds": run["train_seconds"],
    }


def summarise(runs: list[dict]) -> dict:
    """Per mode and figure: mean, min, max over seeds."""
    summary = {}
    for mode in MODES:
        values = [figures(run) for run in runs if run["mode"] == mode]
        summary[mode] = {
            name: {
                "mean": float(np.mean([v[name] for v in values])),
                "min": float(np.min([v[name] for v in values])),
                "max": float(np.max([v[name] for v in values])),
            }
            for name in values[0]
        }
    return summary


def compare(runs: list[dict], figure: str) -> dict:
    """hierarchical against combined on one test figure, paired by seed (same data, same seed)."""
    by_seed: dict[int, dict[str, float]] = {}
    for run in runs:
        by_seed.setdefault(run["seed"], {})[run["mode"]] = figures(run)[figure]
    seeds = sorted(by_seed)
    return paired_comparison(
        figure,
        "hierarchical",
        "combined",
        [by_seed[s]["hierarchical"] for s in seeds],
        [by_seed[s]["combined"] for s in seeds],
    )


def print_table(dataset: Dataset, runs: list[dict], summary: dict, comparisons: list[dict]) -> None:
    """One row per mode and seed, then mean and min per mode, then the verdicts."""
    levels = dataset.levels
    print(
        f"\n{dataset.name}: {dataset.description}\n"
        f"hierarchy {' > '.join(levels)} ({len(dataset.catalog.taxonomy.paths)} paths); "
        f"catalog {len(dataset.catalog.extraction.rows)} items, test {len(dataset.test.extraction.rows)} items"
    )
    header = f"{'mode':14s}{'seed':>6s}" + "".join(f"{'acc ' + level:>16s}" for level in levels)
    header += f"{f'path score/{len(levels)}':>15s}{'all right':>11s}{'P@6':>8s}{'train s':>9s}{'epochs':>8s}"
    print(header)
    for run in runs:
        cells = "".join(f"{run['level_accuracy'][level]:16.3f}" for level in levels)
        print(
            f"{run['mode']:14s}{run['seed']:6d}{cells}{run['path_score']:15.3f}{run['path_accuracy']:11.3f}"
            f"{run['p_at_6']:8.3f}{run['train_seconds']:9.1f}{run['epochs']:8d}"
        )
    for statistic in ("mean", "min"):
        for mode in MODES:
            entry = summary[mode]
            cells = "".join(f"{entry['accuracy ' + level][statistic]:16.3f}" for level in levels)
            print(
                f"{mode:14s}{statistic:>6s}{cells}{entry['path_score'][statistic]:15.3f}"
                f"{entry['path_accuracy'][statistic]:11.3f}{entry['p_at_6'][statistic]:8.3f}"
                f"{entry['train_seconds'][statistic]:9.1f}"
            )
    for comparison in comparisons:
        print(describe_comparison(comparison))


def main() -> int:
    from recommender.labels import DEFAULT_HIERARCHY_MODE

    args, seeds, train_config = training_arguments(__doc__, "generated data, one seed, few epochs: keeps it working")
    load_before = os.getloadavg()
    print(f"machine: {machine()}; load average before: {load_before}")
    print(
        f"modes: {', '.join(MODES)}; seeds {','.join(map(str, seeds))}; training: default TrainConfig"
        + (" with max_epochs 4 (--quick)" if args.quick else "")
        + f"; library default mode: {DEFAULT_HIERARCHY_MODE}"
    )
    results = []
    with tempfile.TemporaryDirectory() as temp:
        workdir = Path(temp)
        store = args.feature_store or workdir / "features.h5"
        clothing, reason = clothing_dataset(workdir, store, args.quick)
        datasets = [generated_dataset(workdir, store, args.quick)]
        if clothing is None:
            print(f"clothing-small: {reason}")
        else:
            datasets.insert(0, clothing)
        for dataset in datasets:
            runs = [train_and_measure(dataset, mode, seed, train_config) for mode in MODES for seed in seeds]
            summary = summarise(runs)
            comparisons = [compare(runs, figure) for figure in COMPARED]
            print_table(dataset, runs, summary, comparisons)
            results.append(
                {
                    "name": dataset.name,
                    "description": dataset.description,
                    "levels": list(dataset.levels),
                    "paths": len(dataset.catalog.taxonomy.paths),
                    "catalog_items": len(dataset.catalog.extraction.rows),
                    "test_items": len(dataset.test.extraction.rows),
                    "runs": runs,
                    "summary": summary,
                    "comparisons": comparisons,
                }
            )
    load_after = os.getloadavg()
    print(f"\nload average after: {load_after}")
    path = save_results(
        "hierarchy" + ("-quick" if args.quick else ""),
        {
            "seeds": seeds,
            "train_config": {"max_epochs": train_config.max_epochs, "default_otherwise": True},
            "library_default_mode": DEFAULT_HIERARCHY_MODE,
            "skipped": None if clothing is not None else {"clothing-small": reason},
            "datasets": results,
            "load_average": {"before": load_before, "after": load_after},
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
