"""The evaluation report's plots (matplotlib, Agg backend, no display needed) and HTML page.

``indexer.evaluate`` measures a bundle and calls :func:`write_plots` and :func:`render_html`.
The page references the PNGs beside it by relative path, so the report folder opens offline
and can be copied as a whole.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from recommender.errors import InvalidImageError

#: Side of the thumbnails in the example grid, pixels.
THUMBNAIL_SIZE = 112

#: The neighbour spaces compared in the report, in table order.
RETRIEVAL_SPACES = ("embedding", "raw_features")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "head"


# -- plots ---------------------------------------------------------------------------------


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> str:
    figure.savefig(path, format="png")
    return path.name


def write_plots(
    recommender, run, heads: dict, history: dict, out_dir: Path, k: int, examples: int, problems: list[str]
) -> dict:
    """Draws every plot into ``out_dir``.

    Args:
        recommender: the measured bundle.
        run: its ``evaluate.QueryRun`` of the test rows.
        heads: the ``heads`` entry of the metrics.
        history: the bundle's ``history.json``.
        out_dir: the report folder.
        k: neighbours per query.
        examples: correct and wrong example queries to show (each).
        problems: appended to when a plot cannot be made.

    Returns:
        ``{"heads": {column: {"confusion_matrix", "roc", "precision_recall"}}, "training",
        "retrieval", "examples": {"plot", "head", "correct", "wrong"}}``: PNG file names,
        None where a plot could not be made.
    """
    plots: dict = {"heads": {}, "training": None, "examples": None}
    if history.get("loss"):
        plots["training"] = _save(
            plot_training(history, head_titles(recommender.label_space)), out_dir / "training.png"
        )
    else:
        problems.append("no training curves: the bundle has no history.json (or it is empty)")
    for head, (column, classes) in enumerate(zip(recommender.label_columns, recommender.classes)):
        entry = heads[column]
        if not entry.get("evaluated"):
            continue
        lookup = {name: i for i, name in enumerate(classes)}
        known = np.array([row.labels[column] in lookup for row in run.rows], bool)
        truth = np.array([lookup[row.labels[column]] for row, ok in zip(run.rows, known) if ok])
        probabilities = run.probabilities[head][known]
        stem = f"{head}-{_slug(column)}"
        plots["heads"][column] = {
            "confusion_matrix": _save(
                plot_confusion_matrix(entry["confusion_matrix"], column), out_dir / f"confusion-{stem}.png"
            ),
            "roc": _save(plot_curves(truth, probabilities, classes, column, "roc"), out_dir / f"roc-{stem}.png"),
            "precision_recall": _save(
                plot_curves(truth, probabilities, classes, column, "pr"), out_dir / f"pr-{stem}.png"
            ),
        }
    retrieval = {c: e["retrieval"] for c, e in heads.items() if e.get("evaluated")}
    plots["retrieval"] = _save(plot_retrieval(retrieval, k), out_dir / "retrieval.png") if retrieval else None
    primary = next((i for i, c in enumerate(recommender.label_columns) if heads[c].get("evaluated")), None)
    if primary is not None:
        chosen = choose_examples(recommender, run, primary, examples)
        figure = plot_examples(recommender, run, primary, chosen, k)
        plots["examples"] = {
            "plot": _save(figure, out_dir / "examples.png"),
            "head": recommender.label_columns[primary],
            "correct": [run.rows[i].id for i in chosen["correct"]],
            "wrong": [run.rows[i].id for i in chosen["wrong"]],
        }
    else:
        plots["examples"] = {"plot": None, "head": None, "correct": [], "wrong": []}
    return plots


def head_titles(label_space) -> list[str]:
    """What each model output head predicts, in head order (Keras names them ``head_i``).

    A combined hierarchy's head predicts full paths and a tags head several tags, so head
    ``i`` is not label column ``i`` in general.
    """
    titles = []
    for head in label_space.heads:
        if head.target == "path":
            titles.append("path (" + " > ".join(label_space.taxonomy.levels) + ")")
        elif head.target == "tags":
            titles.append(f"tags ({head.column})")
        else:
            titles.append(head.column)
    return titles


def plot_training(history: dict, label_columns: list[str]):
    """Loss and accuracy per epoch, training and validation, one accuracy line per head.

    Args:
        history: the bundle's ``history.json`` (Keras ``History.history``).
        label_columns: what each head predicts, in head order (Keras calls them ``head_i``;
            see :func:`head_titles`). Heads without an accuracy metric (tags) draw no line.

    Returns:
        A matplotlib Figure.
    """
    figure = _figure(10, 3.8)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    epochs = np.arange(1, len(history["loss"]) + 1)
    loss_axes.plot(epochs, history["loss"], label="training")
    if "val_loss" in history:
        loss_axes.plot(epochs, history["val_loss"], label="validation", linestyle="--")
    loss_axes.set(title="loss (sum over heads)", xlabel="epoch")
    loss_axes.legend()
    for index, column in enumerate(label_columns):
        # A one-head Keras model may name its metric plain "accuracy".
        for key, style, kind in (
            (f"head_{index}_accuracy", "-", "training"),
            (f"val_head_{index}_accuracy", "--", "validation"),
        ):
            values = history.get(key) or (
                history.get(key.replace(f"head_{index}_", "")) if len(label_columns) == 1 else None
            )
            if values:
                accuracy_axes.plot(
                    epochs[: len(values)], values, linestyle=style, color=f"C{index}", label=f"{column} {kind}"
                )
    accuracy_axes.set(title="accuracy per head", xlabel="epoch", ylim=(0, 1.02))
    accuracy_axes.legend(fontsize="small")
    return figure


def plot_confusion_matrix(confusion: dict, column: str):
    """Confusion matrix, rows normalised to the true class, annotated with counts.

    Args:
        confusion: ``{"labels", "counts"}`` as in ``metrics.json``.
        column: the head's name, for the title.
    """
    labels = confusion["labels"]
    counts = np.asarray(confusion["counts"], np.int64)
    side = max(4.0, 0.45 * len(labels) + 2.5)
    figure = _figure(side + 1, side)
    axes = figure.subplots()
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set(xlabel="predicted", ylabel="true", title=f"{column}: confusion matrix (row share, counts)")
    if len(labels) <= 30:  # past that the numbers are unreadable anyway
        for i in range(len(labels)):
            for j in range(len(labels)):
                if counts[i, j]:
                    colour = "white" if shares[i, j] > 0.5 else "black"
                    axes.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, color=colour)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return figure


def plot_curves(truth: np.ndarray, probabilities: np.ndarray, classes: list[str], column: str, kind: str):
    """One-vs-rest ROC or precision-recall curves, one per class with positives, plus micro-average.

    Args:
        truth: (n,) int class indices.
        probabilities: (n, classes) float.
        classes: class names.
        column: the head's name, for the title.
        kind: ``roc`` or ``pr``.
    """
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    figure = _figure(7.5, 5)
    axes = figure.subplots()
    onehot = np.eye(len(classes), dtype=bool)[truth]
    curves = [(name, onehot[:, i], probabilities[:, i]) for i, name in enumerate(classes)]
    curves.append(("micro-average", onehot.ravel(), probabilities.ravel()))
    for name, positives, scores in curves:
        if not positives.any() or positives.all():
            continue  # undefined for a class without positives (or negatives) among the queries
        style = {"color": "black", "linewidth": 2.2} if name == "micro-average" else {"linewidth": 1}
        if kind == "roc":
            false_positive, true_positive, _ = roc_curve(positives, scores)
            axes.plot(
                false_positive, true_positive, label=f"{name} ({auc(false_positive, true_positive):.3f})", **style
            )
        else:
            precision, recall, _ = precision_recall_curve(positives, scores)
            score = average_precision_score(positives, scores)
            axes.plot(recall, precision, label=f"{name} (AP {score:.3f})", drawstyle="steps-post", **style)
    if kind == "roc":
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axes.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{column}: ROC, one-vs-rest (AUC)")
    else:
        axes.set(xlabel="recall", ylabel="precision", title=f"{column}: precision-recall, one-vs-rest")
    axes.set(xlim=(0, 1), ylim=(0, 1.02))
    axes.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def plot_retrieval(retrieval: dict, k: int):
    """Grouped bars: P@k, recall@k, hit rate@k and mAP@k of the trained embedding next to raw features, per head."""
    figure = _figure(max(5.0, 4.0 * len(retrieval)), 3.6)
    all_axes = np.atleast_1d(figure.subplots(1, len(retrieval)))
    names = (
        ("precision_at_k", f"P@{k}"),
        ("recall_at_k", f"recall@{k}"),
        ("hit_rate_at_k", f"hit rate@{k}"),
        ("map_at_k", f"mAP@{k}"),
    )
    for axes, (column, spaces) in zip(all_axes, retrieval.items()):
        positions = np.arange(len(names))
        for offset, space, colour in ((-0.2, "embedding", "tab:blue"), (0.2, "raw_features", "tab:grey")):
            values = spaces.get(space)
            if values is None:
                continue
            heights = [values[key] for key, _ in names]
            bars = axes.bar(positions + offset, heights, width=0.4, label=space.replace("_", " "), color=colour)
            axes.bar_label(bars, fmt="%.2f", fontsize=7)
        axes.set_xticks(positions, [label for _, label in names])
        axes.set(title=f"{column}: neighbours", ylim=(0, 1.1))
        axes.legend(fontsize="x-small", loc="lower right")
    return figure


def choose_examples(recommender, run, head: int, count: int) -> dict[str, list[int]]:
    """Picks up to ``count`` correctly and ``count`` wrongly predicted queries (seeded, spread out).

    Returns:
        ``{"correct": [row indices], "wrong": [row indices]}`` into ``run.rows``.
    """
    column, classes = recommender.label_columns[head], recommender.classes[head]
    right = np.array([classes[p] == row.labels[column] for p, row in zip(run.predicted[head], run.rows)], bool)
    rng = np.random.default_rng(0)
    chosen = {}
    for name, mask in (("correct", right), ("wrong", ~right)):
        candidates = np.flatnonzero(mask)
        picked = rng.choice(candidates, size=min(count, len(candidates)), replace=False) if len(candidates) else []
        chosen[name] = sorted(int(i) for i in picked)
    return chosen


def _thumbnail(path: str | Path, size: int) -> np.ndarray:
    """The image as the backbone sees it (``load_image``), or a grey square when unreadable."""
    from recommender.images import load_image

    try:
        return load_image(path, size)
    except InvalidImageError:
        return np.full((size, size, 3), 200, np.uint8)


def plot_examples(recommender, run, head: int, chosen: dict[str, list[int]], k: int):
    """Grid: each chosen query, then its k neighbours framed green (same label) or red (other).

    Args:
        recommender: the loaded bundle.
        run: the ``evaluate.QueryRun``.
        head: index of the head whose labels decide right and wrong.
        chosen: from :func:`choose_examples`.
        k: neighbours per query.
    """
    column, classes = recommender.label_columns[head], recommender.classes[head]
    order = [("correct", i) for i in chosen["correct"]] + [("wrong", i) for i in chosen["wrong"]]
    columns = k + 1
    figure = _figure(1.45 * columns, 1.75 * max(1, len(order)))
    if not order:
        figure.text(0.5, 0.5, "no queries to show", ha="center")
        return figure
    grid = np.atleast_2d(figure.subplots(len(order), columns, squeeze=False))
    for line, (kind, index) in enumerate(order):
        row = run.rows[index]
        predicted = classes[int(run.predicted[head][index])]
        query_axes = grid[line, 0]
        query_axes.imshow(_thumbnail(row.path, THUMBNAIL_SIZE))
        _frame(query_axes, "tab:green" if kind == "correct" else "tab:red", 3)
        query_axes.set_title(f"query ({kind})\ntrue {row.labels[column]}\npredicted {predicted}", fontsize=7)
        for rank in range(k):
            axes = grid[line, rank + 1]
            position = int(run.positions[index, rank])
            if position < 0:
                axes.axis("off")
                continue
            neighbour = recommender.rows[position]
            same = neighbour.labels.get(column) == row.labels[column]
            axes.imshow(_thumbnail(neighbour.path, THUMBNAIL_SIZE))
            _frame(axes, "tab:green" if same else "tab:red", 2)
            axes.set_title(f"{rank + 1}. {neighbour.labels.get(column)}\n{'right' if same else 'wrong'}", fontsize=7)
    figure.suptitle(f"example queries and their {k} nearest catalog items ({column}: green = same label)", fontsize=9)
    return figure


def _frame(axes, colour: str, width: float) -> None:
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


# -- HTML ----------------------------------------------------------------------------------

#: What the page says about each hierarchy mode.
HIERARCHY_MODE_TEXT = {
    "hierarchical": "hierarchical: one softmax head per level, combined over the valid paths",
    "combined": "combined: one softmax head over the full paths",
}


def _number(value, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` decimals, None as a dash (the template escapes the text)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@functools.cache
def _templates():
    """The Jinja environment of ``indexer/templates`` (autoescaped; an unknown name is an error)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    environment = Environment(
        loader=PackageLoader("indexer", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["number"] = _number
    return environment


def render_html(metrics: dict, plots: dict) -> str:
    """The report page (``templates/report.html``): summary, problems, per-head tables and the plots.

    Args:
        metrics: as written to ``metrics.json``.
        plots: file names from :func:`write_plots`, linked by relative path.

    Returns:
        A complete HTML document (no scripts, no external resources).
    """
    from recommender.baseline import BuildBaseline

    baseline = metrics["training"].get("baseline")
    return (
        _templates()
        .get_template("report.html")
        .render(
            metrics=metrics,
            plots=plots,
            k=metrics["k"],
            spaces=RETRIEVAL_SPACES,
            hierarchy_modes=HIERARCHY_MODE_TEXT,
            baseline_shortfalls=BuildBaseline.from_json(baseline).shortfalls() if baseline else [],
        )
    )
