"""What the classifier predicts: label columns, an optional taxonomy, optional multi-label tags.

A :class:`LabelSpace` maps a catalog's labels to the model's output heads and back:

- every plain label column gets a softmax head;
- a hierarchy (``--hierarchy masterCategory>subCategory>articleType``) is learned from the
  catalog as a :class:`Taxonomy` (the set of valid paths) and predicted either
  ``hierarchical`` (one softmax head per level) or ``combined`` (one softmax head over full
  paths). Both are decoded the same way: a distribution over *valid paths* (the product of
  the levels' probabilities, renormalised, or the combined head itself), whose most probable
  path is the prediction and whose sums give each level's probability. A predicted child is
  therefore never outside its predicted parent;
- a tags column (several labels per product) gets one sigmoid head; a tag is predicted when
  its probability reaches its threshold, tuned on the validation split for micro-F1.

Head outputs are ``{"head_i": (n, width_i) float32}``; everything here is numpy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from recommender.errors import CatalogError, TrainingError

HIERARCHY_MODES = ("hierarchical", "combined")
THRESHOLD_MODES = ("global", "per_tag")

#: Default decoding of a hierarchy (measured: README, "Hierarchies: combined or hierarchical").
DEFAULT_HIERARCHY_MODE = "hierarchical"

#: Default tag thresholds (measured: README, "Tags: one threshold or one per tag").
DEFAULT_THRESHOLD_MODE = "global"

#: A tag gets its own threshold only with at least this many validation positives (per_tag mode).
MIN_POSITIVES_PER_TAG = 10

#: Thresholds tried when tuning.
THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.025), 3)


def parse_hierarchy(text: str) -> tuple[str, ...]:
    """``"a>b>c"`` -> ``("a", "b", "c")``.

    Raises:
        CatalogError: fewer than two levels, an empty or a repeated level.
    """
    levels = tuple(part.strip() for part in text.split(">"))
    if len(levels) < 2 or not all(levels):
        raise CatalogError(f"a hierarchy needs two or more column names separated by '>', got {text!r}")
    if len(set(levels)) != len(levels):
        raise CatalogError(f"a hierarchy names a column twice: {text!r}")
    return levels


def primary_column_of(label_columns: list[str] | tuple[str, ...], hierarchy: tuple[str, ...] | None) -> str:
    """The primary class column: the hierarchy's leaf level (the most specific class) when
    there is a hierarchy, else the first label column. It stratifies the validation split and
    defines the contrastive positives."""
    return hierarchy[-1] if hierarchy else label_columns[0]


@dataclass(frozen=True)
class TaxonomyConflict:
    """A catalog row whose value at ``level`` sits under another parent than the taxonomy's."""

    position: int
    reason: str


@dataclass(frozen=True)
class Taxonomy:
    """The valid paths of a label hierarchy, learned from a catalog.

    Attributes:
        levels: label columns from the root level to the leaf level.
        paths: every valid path (one value per level), sorted.
    """

    levels: tuple[str, ...]
    paths: tuple[tuple[str, ...], ...]

    @classmethod
    def learn(cls, labels: list[dict[str, str]], levels: tuple[str, ...]) -> tuple[Taxonomy, list[TaxonomyConflict]]:
        """Learns which child occurs under which parent, level by level from the root.

        A child value has exactly one parent. When rows put a child under several parents,
        the parent most rows agree on wins (ties: the first in sort order) and the other rows
        are returned as conflicts, with a reason, and left out of the taxonomy.

        Args:
            labels: per catalog row, label column -> value.
            levels: the hierarchy's columns, root first.

        Returns:
            ``(taxonomy, conflicts)``.
        """
        conflicted: dict[int, str] = {}
        for depth in range(1, len(levels)):
            parent_level, child_level = levels[depth - 1], levels[depth]
            parents: dict[str, Counter] = {}
            for position, row in enumerate(labels):
                if position not in conflicted:
                    parents.setdefault(row[child_level], Counter())[row[parent_level]] += 1
            winner = {child: min(counts, key=lambda p: (-counts[p], p)) for child, counts in parents.items()}
            for position, row in enumerate(labels):
                if position in conflicted:
                    continue
                child, parent = row[child_level], row[parent_level]
                if parent != winner[child]:
                    agreeing = parents[child][winner[child]]
                    conflicted[position] = (
                        f"{child_level} {child!r} is under {parent_level} {parent!r} here but under "
                        f"{winner[child]!r} in {agreeing} row(s); in a hierarchy a child has one parent"
                    )
        paths = sorted(
            {tuple(row[level] for level in levels) for position, row in enumerate(labels) if position not in conflicted}
        )
        conflicts = [TaxonomyConflict(position, reason) for position, reason in sorted(conflicted.items())]
        return cls(tuple(levels), tuple(paths)), conflicts

    def values(self, level: str) -> list[str]:
        """The sorted values of one level."""
        depth = self.levels.index(level)
        return sorted({path[depth] for path in self.paths}, key=str)

    def to_json(self) -> dict:
        """JSON-ready form."""
        return {"levels": list(self.levels), "paths": [list(path) for path in self.paths]}

    @classmethod
    def from_json(cls, payload: dict) -> Taxonomy:
        """Inverse of :meth:`to_json`."""
        return cls(tuple(payload["levels"]), tuple(tuple(path) for path in payload["paths"]))


@dataclass(frozen=True)
class HeadSpec:
    """One output head of the classifier.

    Attributes:
        name: Keras output name, ``head_<i>``.
        kind: ``softmax`` (one class per product) or ``sigmoid`` (multi-label tags).
        target: ``column`` (a label column), ``path`` (full taxonomy paths) or ``tags``.
        column: the label column (``column`` target), the hierarchy's leaf level (``path``)
            or the tags column (``tags``).
        classes: output index -> class name (for ``path``: the path joined with ``" > "``).
    """

    name: str
    kind: str
    target: str
    column: str
    classes: tuple[str, ...]

    def to_json(self) -> dict:
        """JSON-ready form."""
        return {
            "name": self.name,
            "kind": self.kind,
            "target": self.target,
            "column": self.column,
            "classes": list(self.classes),
        }


@dataclass
class LabelSpace:
    """The classifier's outputs and how they map to label columns, a taxonomy and tags.

    Attributes:
        columns: single-valued label columns, in catalog order (hierarchy levels included).
        classes: per column, its sorted values.
        heads: output heads in model order.
        taxonomy: the learned hierarchy, or None.
        hierarchy_mode: ``hierarchical`` or ``combined`` (None without a hierarchy).
        tags_column: the multi-label column, or None.
        tags: tag names by sigmoid output index.
        thresholds: (tags,) float decision thresholds.
        threshold_mode: ``global`` or ``per_tag``.
        tags_separator: how the catalog separates tags in one cell.
    """

    columns: list[str]
    classes: list[list[str]]
    heads: list[HeadSpec]
    taxonomy: Taxonomy | None = None
    hierarchy_mode: str | None = None
    tags_column: str | None = None
    tags: list[str] = field(default_factory=list)
    thresholds: np.ndarray | None = None
    threshold_mode: str = "global"
    tags_separator: str = "|"

    # -- construction ------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        labels: dict[str, list[str]],
        *,
        taxonomy: Taxonomy | None = None,
        hierarchy_mode: str = DEFAULT_HIERARCHY_MODE,
        tags: list[tuple[str, ...]] | None = None,
        tags_column: str | None = None,
        tags_separator: str = "|",
        threshold_mode: str = DEFAULT_THRESHOLD_MODE,
    ) -> LabelSpace:
        """Lays out the heads for a catalog's labels.

        Args:
            labels: label column -> one value per row (catalog order of the columns).
            taxonomy: the hierarchy over some of these columns, or None.
            hierarchy_mode: ``hierarchical`` or ``combined``.
            tags: per row, its tags (with ``tags_column``).
            tags_column: name of the tags column.
            tags_separator: recorded for display and rebuilds.
            threshold_mode: ``global`` or ``per_tag``.

        Raises:
            TrainingError: an unknown mode, or a tags column whose rows carry no tag at all.
        """
        if hierarchy_mode not in HIERARCHY_MODES:
            raise TrainingError(f"hierarchy mode must be one of {', '.join(HIERARCHY_MODES)}, got {hierarchy_mode!r}")
        if threshold_mode not in THRESHOLD_MODES:
            raise TrainingError(f"threshold mode must be one of {', '.join(THRESHOLD_MODES)}, got {threshold_mode!r}")
        columns = list(labels)
        classes = [sorted(set(labels[c]), key=str) for c in columns]
        heads: list[HeadSpec] = []
        levels = set(taxonomy.levels) if taxonomy else set()
        for column, names in zip(columns, classes):
            if taxonomy and hierarchy_mode == "combined" and column in levels:
                if column == taxonomy.levels[-1]:
                    joined = tuple(" > ".join(path) for path in taxonomy.paths)
                    heads.append(HeadSpec(f"head_{len(heads)}", "softmax", "path", column, joined))
                continue
            heads.append(HeadSpec(f"head_{len(heads)}", "softmax", "column", column, tuple(names)))
        tag_names: list[str] = []
        if tags_column is not None:
            tag_names = sorted({tag for row_tags in (tags or []) for tag in row_tags}, key=str)
            if not tag_names:
                raise TrainingError(f"the tags column {tags_column!r} holds no tags in any row")
            heads.append(HeadSpec(f"head_{len(heads)}", "sigmoid", "tags", tags_column, tuple(tag_names)))
        return cls(
            columns=columns,
            classes=classes,
            heads=heads,
            taxonomy=taxonomy,
            hierarchy_mode=hierarchy_mode if taxonomy else None,
            tags_column=tags_column,
            tags=tag_names,
            thresholds=np.full(len(tag_names), 0.5) if tag_names else None,
            threshold_mode=threshold_mode,
            tags_separator=tags_separator,
        )

    # -- layout --------------------------------------------------------------------------
    @property
    def primary_column(self) -> str:
        """The class that stratifies the split and defines SupCon positives (:func:`primary_column_of`)."""
        return primary_column_of(self.columns, self.taxonomy.levels if self.taxonomy else None)

    @property
    def primary_head(self) -> HeadSpec:
        """The head of the primary class (early stopping watches it)."""
        for head in self.heads:
            if head.kind == "softmax" and head.column == self.primary_column:
                return head
        raise AssertionError("no head for the primary column")  # create() always makes one

    def classes_of(self, column: str) -> list[str]:
        """The sorted values of a label column."""
        return self.classes[self.columns.index(column)]

    def encode(self, labels: dict[str, list[str]], tags: list[tuple[str, ...]] | None = None) -> dict[str, np.ndarray]:
        """Training targets per head: (n,) int class indices, or (n, tags) float32 multi-hot.

        Raises:
            TrainingError: a label, path or tag unknown to this label space.
        """
        n = len(next(iter(labels.values())))
        targets = {}
        for head in self.heads:
            if head.target == "column":
                values = labels[head.column]
            elif head.target == "path":
                values = [" > ".join(parts) for parts in zip(*(labels[level] for level in self.taxonomy.levels))]
            else:
                lookup = {tag: i for i, tag in enumerate(head.classes)}
                hot = np.zeros((n, len(head.classes)), np.float32)
                for row, row_tags in enumerate(tags or [()] * n):
                    for tag in row_tags:
                        if tag not in lookup:
                            raise TrainingError(f"tag {tag!r} is unknown to the model; retrain it")
                        hot[row, lookup[tag]] = 1.0
                targets[head.name] = hot
                continue
            lookup = {name: i for i, name in enumerate(head.classes)}
            unknown = sorted({v for v in values if v not in lookup}, key=str)
            if unknown:
                what = "path" if head.target == "path" else f"label in column {head.column!r}"
                raise TrainingError(
                    f"{what} {', '.join(repr(u) for u in unknown[:10])} unknown to the model; retrain it"
                )
            targets[head.name] = np.array([lookup[v] for v in values], np.int64)
        return targets

    # -- decoding ------------------------------------------------------------------------
    def path_distribution(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """(n, paths) float64: the probability of each valid taxonomy path, rows summing to 1.

        Combined: the path head itself. Hierarchical: the product of the levels' softmax
        probabilities along each valid path, renormalised over the valid paths.
        """
        heads = {head.column: head for head in self.heads if head.kind == "softmax"}
        if self.hierarchy_mode == "combined":
            distribution = np.asarray(outputs[heads[self.taxonomy.levels[-1]].name], np.float64)
        else:
            log_score = 0.0
            for depth, level in enumerate(self.taxonomy.levels):
                head = heads[level]
                index = {name: i for i, name in enumerate(head.classes)}
                columns = np.array([index[path[depth]] for path in self.taxonomy.paths])
                log_score = (
                    log_score + np.log(np.clip(np.asarray(outputs[head.name], np.float64), 1e-12, None))[:, columns]
                )
            distribution = np.exp(log_score - log_score.max(axis=1, keepdims=True))
        return distribution / distribution.sum(axis=1, keepdims=True)

    def column_probabilities(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per label column, (n, classes) float probabilities over :meth:`classes_of` the column.

        Hierarchy levels are the sums of the valid-path distribution (consistent marginals).
        """
        found = {}
        for head in self.heads:
            if head.target == "column" and not (self.taxonomy and head.column in self.taxonomy.levels):
                found[head.column] = np.asarray(outputs[head.name], np.float64)
        if self.taxonomy:
            distribution = self.path_distribution(outputs)
            for depth, level in enumerate(self.taxonomy.levels):
                names = self.classes_of(level)
                index = {name: i for i, name in enumerate(names)}
                membership = np.zeros((len(self.taxonomy.paths), len(names)))
                for p, path in enumerate(self.taxonomy.paths):
                    membership[p, index[path[depth]]] = 1.0
                found[level] = distribution @ membership
        return {column: found[column] for column in self.columns}

    def predict(self, outputs: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per label column, ``((n,) predicted class index, (n,) its probability)``.

        Hierarchy levels follow the most probable valid path; each level's probability is
        its marginal (the summed probability of the valid paths through that value).
        """
        probabilities = self.column_probabilities(outputs)
        predicted = {}
        for column, matrix in probabilities.items():
            best = np.argmax(matrix, axis=1)
            predicted[column] = (best, matrix[np.arange(len(best)), best])
        if self.taxonomy:
            best_path = np.argmax(self.path_distribution(outputs), axis=1)
            for depth, level in enumerate(self.taxonomy.levels):
                index = {name: i for i, name in enumerate(self.classes_of(level))}
                codes = np.array([index[self.taxonomy.paths[p][depth]] for p in best_path], np.int64)
                matrix = probabilities[level]
                predicted[level] = (codes, matrix[np.arange(len(codes)), codes])
        return predicted

    def tag_probabilities(self, outputs: dict[str, np.ndarray]) -> np.ndarray | None:
        """(n, tags) float sigmoid probabilities, or None without a tags head."""
        for head in self.heads:
            if head.kind == "sigmoid":
                return np.asarray(outputs[head.name], np.float64)
        return None

    def predicted_tags(self, outputs: dict[str, np.ndarray]) -> np.ndarray | None:
        """(n, tags) bool: probability at or above the tag's threshold."""
        scores = self.tag_probabilities(outputs)
        return None if scores is None else scores >= self.thresholds[None, :]

    def describe(self, outputs: dict[str, np.ndarray], row: int) -> dict:
        """The JSON answer for one row: ``predicted`` per column, ``hierarchy``, ``tags``."""
        predicted = self.predict({name: values[row : row + 1] for name, values in outputs.items()})
        answer: dict = {
            "predicted": {
                column: {"label": self.classes_of(column)[int(codes[0])], "probability": float(probs[0])}
                for column, (codes, probs) in predicted.items()
            }
        }
        if self.taxonomy:
            distribution = self.path_distribution({name: values[row : row + 1] for name, values in outputs.items()})
            best = int(np.argmax(distribution[0]))
            answer["hierarchy"] = {
                "levels": list(self.taxonomy.levels),
                "path": list(self.taxonomy.paths[best]),
                "probability": float(distribution[0, best]),
                "mode": self.hierarchy_mode,
            }
        scores = self.tag_probabilities(outputs)
        if scores is not None:
            chosen = [
                {"tag": tag, "probability": float(scores[row, i])}
                for i, tag in enumerate(self.tags)
                if scores[row, i] >= self.thresholds[i]
            ]
            answer["tags"] = sorted(chosen, key=lambda t: -t["probability"])
        return answer

    # -- thresholds ----------------------------------------------------------------------
    def tune_thresholds(self, truth: np.ndarray, scores: np.ndarray) -> dict:
        """Sets the tag thresholds that maximise micro-F1 on validation rows.

        ``global``: one threshold from :data:`THRESHOLD_GRID`. ``per_tag``: starts from the
        global one, then, for each tag with at least :data:`MIN_POSITIVES_PER_TAG` validation
        positives, picks the threshold that maximises the overall micro-F1 with the others fixed.

        Args:
            truth: (n, tags) multi-hot validation targets.
            scores: (n, tags) predicted probabilities.

        Returns:
            JSON-ready: micro-F1 at 0.5, after tuning, and the thresholds.
        """
        truth = truth.astype(bool)
        at_half = micro_f1(truth, scores >= 0.5)
        best_global = max(THRESHOLD_GRID, key=lambda t: (micro_f1(truth, scores >= t), -abs(t - 0.5)))
        thresholds = np.full(truth.shape[1], float(best_global))
        if self.threshold_mode == "per_tag":
            for tag in np.flatnonzero(truth.sum(axis=0) >= MIN_POSITIVES_PER_TAG):

                def score_with(value, tag=tag):
                    trial = thresholds.copy()
                    trial[tag] = value
                    return micro_f1(truth, scores >= trial[None, :]), -abs(value - best_global)

                thresholds[tag] = max(THRESHOLD_GRID, key=score_with)
        self.thresholds = thresholds
        return {
            "mode": self.threshold_mode,
            "validation_micro_f1_at_0.5": at_half,
            "validation_micro_f1_tuned": micro_f1(truth, scores >= thresholds[None, :]),
            "global_threshold": float(best_global),
            "thresholds": {tag: float(t) for tag, t in zip(self.tags, thresholds)},
        }

    # -- persistence ---------------------------------------------------------------------
    def to_json(self) -> dict:
        """``labels.json`` (``columns`` and ``classes`` keep the version-1 meaning)."""
        payload = {
            "columns": self.columns,
            "classes": self.classes,
            "heads": [head.to_json() for head in self.heads],
            "taxonomy": self.taxonomy.to_json() if self.taxonomy else None,
            "hierarchy_mode": self.hierarchy_mode,
            "tags": None,
        }
        if self.tags_column is not None:
            payload["tags"] = {
                "column": self.tags_column,
                "separator": self.tags_separator,
                "names": self.tags,
                "thresholds": [float(t) for t in self.thresholds],
                "threshold_mode": self.threshold_mode,
            }
        return payload

    @classmethod
    def from_json(cls, payload: dict) -> LabelSpace:
        """Reads ``labels.json``; a version-1 file (no ``heads``) means one softmax head per column.

        Raises:
            KeyError / ValueError: a malformed file (the bundle reader names the bundle).
        """
        columns = list(payload["columns"])
        classes = [list(names) for names in payload["classes"]]
        if len(columns) != len(classes):
            raise ValueError("labels.json: columns and classes differ in length")
        if "heads" in payload:
            heads = [
                HeadSpec(h["name"], h["kind"], h["target"], h["column"], tuple(h["classes"])) for h in payload["heads"]
            ]
        else:
            heads = [
                HeadSpec(f"head_{i}", "softmax", "column", c, tuple(n))
                for i, (c, n) in enumerate(zip(columns, classes))
            ]
        taxonomy = Taxonomy.from_json(payload["taxonomy"]) if payload.get("taxonomy") else None
        tags = payload.get("tags")
        space = cls(
            columns=columns,
            classes=classes,
            heads=heads,
            taxonomy=taxonomy,
            hierarchy_mode=payload.get("hierarchy_mode"),
            tags_column=tags["column"] if tags else None,
            tags=list(tags["names"]) if tags else [],
            thresholds=np.array(tags["thresholds"], np.float64) if tags else None,
            threshold_mode=tags["threshold_mode"] if tags else "global",
            tags_separator=tags["separator"] if tags else "|",
        )
        if tags and len(space.thresholds) != len(space.tags):
            raise ValueError("labels.json: one threshold per tag expected")
        return space


def path_score(correct: np.ndarray) -> dict:
    """The path score of predicted taxonomy paths, from which levels each row got right.

    Args:
        correct: (n, levels) bool, root first: whether the predicted path's value at that
            level is right.

    Returns:
        ``{"path_score"``: mean correct levels per row, one point per level as the original
        comparison of combined and hierarchical heads counted it; ``"path_score_max"``: the
        number of levels; ``"path_accuracy"``: share of rows with every level right``}``; NaN
        figures for no rows.
    """
    correct = np.asarray(correct, bool)
    empty = not len(correct)
    return {
        "path_score": float("nan") if empty else float(correct.sum(axis=1).mean()),
        "path_score_max": int(correct.shape[1]),
        "path_accuracy": float("nan") if empty else float(correct.all(axis=1).mean()),
    }


def micro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Micro-averaged F1 of (n, tags) bool arrays (0.0 when nothing is true or predicted)."""
    true_positive = float(np.logical_and(truth, predicted).sum())
    denominator = float(truth.sum() + predicted.sum())
    return 2.0 * true_positive / denominator if denominator else 0.0
