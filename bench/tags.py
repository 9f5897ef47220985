"""Tag decision thresholds compared: 0.5, one tuned global threshold, or one per tag.

    python bench/tags.py [--seeds 0,1,2,3,4] [--feature-store PATH] [--quick]

A tags column gets one sigmoid head; a tag is predicted when its probability reaches its
threshold, tuned on the validation split for micro-F1 (``LabelSpace.tune_thresholds``):
``global`` picks one threshold for every tag, ``per_tag`` then gives each tag with at least
``MIN_POSITIVES_PER_TAG`` validation positives its own. The mode changes nothing in training,
only the tuning after it, so one model per seed serves all three: it is trained with
``per_tag`` through the project's own code (``LabelSpace.create`` -> ``train_classifier``,
default ``TrainConfig``), whose tuning first finds exactly the threshold ``global`` would
keep (reported as ``global_threshold``) and then the per-tag ones. Test rows run through
``ClassifierRunner`` flip-averaged, like a query, and are scored against their true tags:
micro-F1 (every (item, tag) decision pooled), macro-F1 (the mean of the tags' F1), precision
and recall.

Data: generated T-shirts (``recommender.synthetic``: 6 patterns x 5 colours, heads pattern
and colour, 8 tags that follow from what is drawn: warm, cool, bright, dark, striped, lined,
dotted, checked), random-init ResNet50 at 64 px; a training catalog of
:data:`PER_CLASS` images per (pattern, colour) and a separate test catalog drawn with
another seed. Two settings of the training catalog's tags (the test tags are always the true
ones):

- ``clean``: the tags as drawn. Colour tags are easy; pattern tags depend on telling
  patterns apart from random-init features.
- ``noisy``: tags as real catalogs fill them in, unevenly. Each tag gets its own omission
  rate, drawn per seed from U(0, :data:`MAX_OMISSION`), and that share of its true
  occurrences is left out of the training catalog; in addition every absent tag is added to
  a row with probability :data:`SPURIOUS_RATE`. The validation split is part of the training
  catalog, so thresholds are tuned on the noisy tags, as a shop would have to.

clothing-small is not used: it has one label per photo and no tags. Tags derived from the
class (e.g. "has sleeves") would be a relabelled classification, not a multi-label task, and
would say nothing about thresholds. Writes bench/results/tags.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from common import describe_comparison, machine, paired_comparison, save_results, training_arguments  # noqa: E402

#: Images per (pattern, colour) pair in the training catalog (and in --quick), and the test catalog.
PER_CLASS = 30
QUICK_PER_CLASS = 4
TEST_PER_CLASS = 8
TEST_SEED = 100
SIZE = 64

#: The noisy setting: per-tag omission rates drawn from U(0, MAX_OMISSION); spurious tags.
MAX_OMISSION = 0.6
SPURIOUS_RATE = 0.02

NOISE_TEXT = (
    f"training tags with per-tag omission rates ~ U(0, {MAX_OMISSION}) and {SPURIOUS_RATE:.0%} spurious tags; "
    "test tags true"
)

SETTINGS = ("clean", "noisy")
THRESHOLDS = ("0.5", "global", "per_tag")


def noisy_tags(tags: list[tuple[str, ...]], names: list[str], seed: int) -> tuple[list[tuple[str, ...]], dict]:
    """The training catalog's tags with uneven omissions and a few spurious tags.

    Returns:
        ``(per row its noisy tags, {tag: its omission rate})``.
    """
    rng = np.random.default_rng(1000 + seed)
    omission = {name: float(rng.uniform(0.0, MAX_OMISSION)) for name in names}
    noisy = []
    for row_tags in tags:
        kept = {tag for tag in row_tags if rng.random() >= omission[tag]}
        added = {tag for tag in names if tag not in row_tags and rng.random() < SPURIOUS_RATE}
        noisy.append(tuple(sorted(kept | added)))
    return noisy, omission


def multi_hot(tags: list[tuple[str, ...]], names: list[str]) -> np.ndarray:
    """(n, tags) bool."""
    lookup = {name: i for i, name in enumerate(names)}
    hot = np.zeros((len(tags), len(names)), bool)
    for row, row_tags in enumerate(tags):
        for tag in row_tags:
            hot[row, lookup[tag]] = True
    return hot


def scores(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Micro and macro F1, micro precision and recall of (n, tags) bool decisions.

    Macro averages the tags that occur in the truth (every tag does, in the test catalog).
    """
    true_positive = (truth & predicted).sum(axis=0).astype(float)
    false_positive = (~truth & predicted).sum(axis=0).astype(float)
    false_negative = (truth & ~predicted).sum(axis=0).astype(float)
    denominator = 2 * true_positive + false_positive + false_negative
    per_tag_f1 = np.divide(2 * true_positive, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    tp, fp, fn = true_positive.sum(), false_positive.sum(), false_negative.sum()
    return {
        "micro_f1": float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0,
        "macro_f1": float(per_tag_f1[truth.any(axis=0)].mean()),
        "precision": float(tp / (tp + fp)) if tp + fp else 0.0,
        "recall": float(tp / (tp + fn)) if tp + fn else 0.0,
        "per_tag_f1": [float(v) for v in per_tag_f1],
    }


def prepare(workdir: Path, feature_store: Path, quick: bool):
    """Generates the training and test catalogs and gets their features."""
    from indexer.build import prepare_catalog
    from recommender.backbones import BackboneSpec
    from recommender.config import BuildConfig
    from recommender.synthetic import generate_catalog

    per_class, test_per_class = (QUICK_PER_CLASS, 2) if quick else (PER_CLASS, TEST_PER_CLASS)
    config = replace(
        BuildConfig(),
        id_column="id",
        label_columns=("label", "colour"),
        tags_column="tags",
        backbone=BackboneSpec(name="resnet50", weights="none", input_size=SIZE, seed=0),
        feature_store=feature_store,
    )
    train_source = generate_catalog(workdir / "train", per_class=per_class, size=SIZE, seed=0)
    test_source = generate_catalog(workdir / "test", per_class=test_per_class, size=SIZE, seed=TEST_SEED)
    description = (
        f"generated T-shirts (6 patterns x 5 colours), ResNet50 random init {SIZE} px; catalog {per_class} per "
        f"pattern+colour (seed 0), test {test_per_class} per pair (seed {TEST_SEED}), heads pattern, colour, tags"
    )
    return prepare_catalog(train_source, config), prepare_catalog(test_source, config), config, description


def train_and_measure(catalog, test, config, setting: str, seed: int, train_config) -> dict:
    """Trains one model (tags tuned ``per_tag``) and scores the three threshold choices on the test rows."""
    from recommender.classifier import ClassifierRunner, train_classifier
    from recommender.labels import MIN_POSITIVES_PER_TAG, LabelSpace

    rows = catalog.extraction.rows
    labels = {column: [row.labels[column] for row in rows] for column in ("label", "colour")}
    tags = [row.tags for row in rows]
    names = sorted({tag for row_tags in tags for tag in row_tags})
    omission = None
    if setting == "noisy":
        tags, omission = noisy_tags(tags, names, seed)
    space = LabelSpace.create(labels, tags=tags, tags_column="tags", threshold_mode="per_tag")
    started = time.perf_counter()
    trained = train_classifier(
        catalog.extraction.features,
        labels,
        replace(train_config, seed=seed),
        flipped=catalog.extraction.flipped,
        space=space,
        tags=tags,
    )
    train_seconds = time.perf_counter() - started
    tuning = trained.metrics["tags"]
    validation_positives = multi_hot([tags[i] for i in trained.validation_index], space.tags).sum(axis=0)

    runner = ClassifierRunner(trained.model, trained.input_scaler, [head.name for head in space.heads])
    flips = config.flip_average
    _, outputs = runner.run(test.extraction.features, test.extraction.flipped if flips else None)
    probabilities = space.tag_probabilities(outputs)
    truth = multi_hot([row.tags for row in test.extraction.rows], space.tags)
    thresholds = {
        "0.5": np.full(len(space.tags), 0.5),
        "global": np.full(len(space.tags), tuning["global_threshold"]),
        "per_tag": np.asarray(space.thresholds, np.float64),
    }
    return {
        "setting": setting,
        "seed": seed,
        "tags": space.tags,
        "omission_rates": omission,
        "validation_positives": [int(v) for v in validation_positives],
        "tags_with_own_threshold": int((validation_positives >= MIN_POSITIVES_PER_TAG).sum()),
        "thresholds": {name: [float(t) for t in values] for name, values in thresholds.items()},
        "validation_micro_f1": {
            "0.5": tuning["validation_micro_f1_at_0.5"],
            "per_tag": tuning["validation_micro_f1_tuned"],
        },
        "test": {name: scores(truth, probabilities >= values[None, :]) for name, values in thresholds.items()},
        "train_seconds": train_seconds,
        "epochs": trained.metrics["epochs_run"],
    }


def summarise(runs: list[dict]) -> dict:
    """Per threshold choice and figure: mean, min, max over seeds."""
    summary = {}
    for name in THRESHOLDS:
        summary[name] = {}
        for figure in ("micro_f1", "macro_f1", "precision", "recall"):
            values = [run["test"][name][figure] for run in runs]
            summary[name][figure] = {
                "mean": float(np.mean(values)),
                "min": float(np.min(values)),
                "max": float(np.max(values)),
            }
    return summary


def compare(runs: list[dict], first: str, second: str, figure: str = "micro_f1") -> dict:
    """``first`` against ``second`` on one test figure, paired by seed (the same model)."""
    return paired_comparison(
        figure,
        first,
        second,
        [run["test"][first][figure] for run in runs],
        [run["test"][second][figure] for run in runs],
    )


def print_table(setting: str, runs: list[dict], summary: dict, comparisons: list[dict]) -> None:
    """One row per threshold choice and seed, then mean and min, then the verdicts."""
    print(f"\nsetting {setting}: " + ("training tags as drawn" if setting == "clean" else NOISE_TEXT))
    print(
        f"{'thresholds':12s}{'seed':>6s}{'micro-F1':>10s}{'macro-F1':>10s}{'precision':>11s}{'recall':>8s}   threshold(s)"
    )
    for run in runs:
        for name in THRESHOLDS:
            entry, values = run["test"][name], run["thresholds"][name]
            if name == "per_tag":
                what = (
                    f"{min(values):.3f}-{max(values):.3f} ({run['tags_with_own_threshold']} of {len(values)} tags own)"
                )
            else:
                what = f"{values[0]:.3f}"
            print(
                f"{name:12s}{run['seed']:6d}{entry['micro_f1']:10.3f}{entry['macro_f1']:10.3f}"
                f"{entry['precision']:11.3f}{entry['recall']:8.3f}   {what}"
            )
    for statistic in ("mean", "min"):
        for name in THRESHOLDS:
            entry = summary[name]
            print(
                f"{name:12s}{statistic:>6s}{entry['micro_f1'][statistic]:10.3f}{entry['macro_f1'][statistic]:10.3f}"
                f"{entry['precision'][statistic]:11.3f}{entry['recall'][statistic]:8.3f}"
            )
    for comparison in comparisons:
        print(describe_comparison(comparison))


def main() -> int:
    from recommender.labels import DEFAULT_THRESHOLD_MODE, MIN_POSITIVES_PER_TAG

    args, seeds, train_config = training_arguments(__doc__, "a small catalog, one seed, few epochs: keeps it working")
    load_before = os.getloadavg()
    print(f"machine: {machine()}; load average before: {load_before}")
    with tempfile.TemporaryDirectory() as temp:
        workdir = Path(temp)
        catalog, test, config, description = prepare(workdir, args.feature_store or workdir / "features.h5", args.quick)
    print(f"data: {description}; {len(catalog.extraction.rows)} catalog items, {len(test.extraction.rows)} test items")
    print(
        f"thresholds: 0.5 (untuned), global (one tuned), per_tag (own threshold with >= {MIN_POSITIVES_PER_TAG} "
        f"validation positives); seeds {','.join(map(str, seeds))}; training: default TrainConfig"
        + (" with max_epochs 4 (--quick)" if args.quick else "")
        + f"; library default: {DEFAULT_THRESHOLD_MODE}"
    )
    print(
        "clothing-small: not used (one label per photo, no tags; class-derived tags would be a relabelled classification)"
    )
    settings = []
    for setting in SETTINGS:
        runs = [train_and_measure(catalog, test, config, setting, seed, train_config) for seed in seeds]
        summary = summarise(runs)
        comparisons = [
            compare(runs, "per_tag", "global"),
            compare(runs, "per_tag", "global", "macro_f1"),
            compare(runs, "global", "0.5"),
        ]
        print_table(setting, runs, summary, comparisons)
        settings.append({"setting": setting, "runs": runs, "summary": summary, "comparisons": comparisons})
    load_after = os.getloadavg()
    print(f"\nload average after: {load_after}")
    path = save_results(
        "tags" + ("-quick" if args.quick else ""),
        {
            "data": description,
            "catalog_items": len(catalog.extraction.rows),
            "test_items": len(test.extraction.rows),
            "seeds": seeds,
            "noise": {"max_omission": MAX_OMISSION, "spurious_rate": SPURIOUS_RATE},
            "min_positives_per_tag": MIN_POSITIVES_PER_TAG,
            "library_default_mode": DEFAULT_THRESHOLD_MODE,
            "train_config": {"max_epochs": train_config.max_epochs, "default_otherwise": True},
            "settings": settings,
            "load_average": {"before": load_before, "after": load_after},
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
