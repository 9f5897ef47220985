"""The baseline inside every build: a logistic-regression probe and raw-feature P@k on the validation split.

A trained head is worth its training only if it beats what a linear model on the raw
backbone features gets from the same rows. Every build therefore fits, per single-valued
label column, a plain logistic regression on the standardized backbone features of the
selection fit's training split and scores it on the validation split beside the head; and
it measures P@k of the validation rows against the training rows in both spaces (raw
standardized features, standardized trained embeddings) for the primary column.

    train_features (n, d) float32, train labels (n,)    -> probe -> validation accuracy, macro-F1
    catalog vectors (n, d) float32 + query vectors (m, d) -> exact L2 neighbours -> P@k

The comparison uses the *selection* model (trained on the training split only): the final
refit model has seen the validation rows. Validation rows whose class never occurs in the
training rows can be predicted by neither side; they are left out of both and counted.

:class:`BuildBaseline` is what the build records (``metrics["baseline"]`` in the build report
and the manifest); the CLI summary and ``evaluate``'s report read it through
:meth:`BuildBaseline.from_json`. The functions here need numpy, scikit-learn and FAISS only.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from recommender.errors import BundleError

if TYPE_CHECKING:
    from recommender.labels import LabelSpace

log = logging.getLogger(__name__)

#: Neighbours per query of the build's retrieval comparison (the README's P@6).
BASELINE_K = 6

#: lbfgs iterations of the probe. On 2,000-3,000 rows x 1,024 MobileNet features of the
#: shared data sets it converged in 33-113 iterations (10-102 classes); the cap keeps a
#: catalog where it would not to a few seconds (the probe is a yardstick, not a model to
#: ship), and the probe's ``converged`` flag says when it was hit.
PROBE_MAX_ITER = 300


def probe_metrics(
    train_features: np.ndarray,
    train_labels,
    validation_features: np.ndarray,
    validation_labels,
    seed: int = 0,
) -> dict:
    """Fits a logistic-regression probe on training rows and scores it on validation rows.

    Standardization (``StandardScaler``) is fit on the training rows; the probe is a plain,
    unweighted ``LogisticRegression`` (lbfgs, L2, C = 1), seeded. Validation rows whose label
    does not occur in the training rows are left out (the probe cannot predict them).

    Args:
        train_features: (n, d) float backbone features of the training rows.
        train_labels: n labels (strings or ints).
        validation_features: (m, d) float features of the validation rows.
        validation_labels: m labels.
        seed: the probe's ``random_state``.

    Returns:
        ``{"accuracy", "macro_f1", "validation_rows", "left_out_rows", "left_out_classes",
        "classes", "iterations", "converged", "seconds"}``: accuracy and macro-F1 (over the
        classes in the truth or the predictions, 0 for a class never predicted) on the
        ``validation_rows`` kept, None when none is kept; ``left_out_*`` count the rows and
        classes absent from training.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    train_labels = np.asarray(train_labels, dtype=object)
    validation_labels = np.asarray(validation_labels, dtype=object)
    known = set(train_labels.tolist())
    kept = np.array([label in known for label in validation_labels.tolist()], bool)
    found = {
        "validation_rows": int(kept.sum()),
        "left_out_rows": int((~kept).sum()),
        "left_out_classes": len(set(validation_labels[~kept].tolist())),
        "classes": len(known),
        "accuracy": None,
        "macro_f1": None,
        "iterations": 0,
        "converged": True,
    }
    if kept.any():
        if len(known) == 1:  # nothing to learn: the one class is always right
            predicted = np.full(int(kept.sum()), next(iter(known)), dtype=object)
        else:
            scaler = StandardScaler().fit(np.asarray(train_features, np.float64))
            probe = LogisticRegression(max_iter=PROBE_MAX_ITER, random_state=seed)
            # One BLAS thread: these products are small, and on a 2-core machine with other work
            # running, OpenBLAS's default threads made the fit 20-30x slower (3,000 x 1,024,
            # 10 classes: 8.8-13.3 s against 0.4 s on one thread, measured).
            with warnings.catch_warnings(), threadpool_limits(limits=1):
                # Hitting the iteration cap is recorded in "converged", not raised.
                warnings.simplefilter("ignore", ConvergenceWarning)
                probe.fit(scaler.transform(np.asarray(train_features, np.float64)), train_labels.astype(str))
                rows = scaler.transform(np.asarray(validation_features, np.float64)[kept])
                predicted = probe.predict(rows).astype(object)
            iterations = int(np.max(probe.n_iter_))
            found.update(iterations=iterations, converged=iterations < PROBE_MAX_ITER)
        truth = validation_labels[kept].astype(str)
        found.update(classification_summary(truth, predicted.astype(str)))
    found["seconds"] = time.perf_counter() - started
    return found


def classification_summary(truth, predicted) -> dict:
    """``{"accuracy", "macro_f1"}`` of predicted against true labels.

    Macro-F1 averages over the classes that occur in the truth or the predictions, with 0 for
    a class never predicted (scikit-learn's rule, as ``evaluate.classification_metrics``).

    Args:
        truth: n true labels.
        predicted: n predicted labels (same type as ``truth``).
    """
    from sklearn.metrics import f1_score

    truth, predicted = np.asarray(truth), np.asarray(predicted)
    if not len(truth):
        return {"accuracy": None, "macro_f1": None}
    return {
        "accuracy": float(np.mean(truth == predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
    }


def exact_precision_at_k(
    catalog_vectors: np.ndarray,
    catalog_labels,
    query_vectors: np.ndarray,
    query_labels,
    k: int = BASELINE_K,
) -> dict:
    """P@k of queries against a catalog by exact L2 neighbours (FAISS ``IndexFlatL2``).

    The queries are not catalog items (no self match to leave out). A query whose label
    no catalog item carries can have no relevant neighbour; it is left out and counted.
    With fewer than ``k`` catalog items the missing neighbours count as wrong.

    Args:
        catalog_vectors: (n, d) float32.
        catalog_labels: n labels.
        query_vectors: (m, d) float32.
        query_labels: m labels.
        k: neighbours per query.

    Returns:
        ``{"k", "precision_at_k", "queries", "left_out_queries"}``; P@k is
        ``evaluate.precision_at_k`` of the (queries, k) relevance, None for no query.
    """
    from recommender.evaluate import precision_at_k
    from recommender.index import VectorIndex

    catalog_labels = np.asarray(catalog_labels, dtype=object)
    query_labels = np.asarray(query_labels, dtype=object)
    known = set(catalog_labels.tolist())
    kept = np.array([label in known for label in query_labels.tolist()], bool)
    found = {"k": int(k), "precision_at_k": None, "queries": int(kept.sum()), "left_out_queries": int((~kept).sum())}
    if not kept.any():
        return found
    index = VectorIndex.build(np.asarray(catalog_vectors, np.float32), "flat", use_gpu=False)
    positions = index.search(np.asarray(query_vectors, np.float32)[kept], k).positions
    if positions.shape[1] < k:
        positions = np.pad(positions, ((0, 0), (0, k - positions.shape[1])), constant_values=-1)
    # -1 (no neighbour) indexes the trailing None, which never equals a label.
    neighbour_labels = np.append(catalog_labels, None)[positions]
    found["precision_at_k"] = precision_at_k(neighbour_labels == query_labels[kept][:, None])
    return found


# -- what the build records ----------------------------------------------------------------


@dataclass(frozen=True)
class HeadBaseline:
    """One single-valued head beside its probe, on the same validation rows.

    Attributes:
        column: the label column.
        validation_rows: validation rows compared (their class occurs in the training rows).
        left_out_rows: validation rows whose class the training rows lack.
        validation_accuracy / validation_macro_f1: the selection model's head.
        probe_validation_accuracy / probe_validation_macro_f1: the logistic-regression probe.
        probe_converged: whether lbfgs converged within :data:`PROBE_MAX_ITER`.
    """

    column: str
    validation_rows: int
    left_out_rows: int
    validation_accuracy: float | None
    validation_macro_f1: float | None
    probe_validation_accuracy: float | None
    probe_validation_macro_f1: float | None
    probe_converged: bool = True

    @property
    def below_probe(self) -> bool:
        """The head's validation accuracy is lower than the probe's."""
        if self.validation_accuracy is None or self.probe_validation_accuracy is None:
            return False
        return self.validation_accuracy < self.probe_validation_accuracy


@dataclass(frozen=True)
class RetrievalBaseline:
    """P@k of the validation rows (queries) against the training rows (catalog), primary column.

    Attributes:
        column: the primary label column.
        k: neighbours per query.
        queries: validation rows scored.
        left_out_queries: validation rows whose class the training rows lack.
        embedding_p_at_k: in the selection model's standardized (flip-averaged) embedding.
        raw_features_p_at_k: in the standardized raw backbone features (original view).
    """

    column: str
    k: int
    queries: int
    left_out_queries: int
    embedding_p_at_k: float | None
    raw_features_p_at_k: float | None


@dataclass(frozen=True)
class BuildBaseline:
    """The build's comparison of the trained model with untrained baselines (``metrics["baseline"]``).

    Attributes:
        heads: per single-valued label column (hierarchy levels included; not tags).
        retrieval: the primary column's P@k in both spaces.
        seconds: wall time of the whole comparison.
    """

    heads: tuple[HeadBaseline, ...]
    retrieval: RetrievalBaseline
    seconds: float

    def to_json(self) -> dict:
        """JSON-ready form: ``{"heads": {column: {...}}, "retrieval": {...}, "seconds"}``."""
        heads = {}
        for head in self.heads:
            entry = dict(vars(head))
            del entry["column"]
            heads[head.column] = entry
        return {"heads": heads, "retrieval": dict(vars(self.retrieval)), "seconds": self.seconds}

    @classmethod
    def from_json(cls, payload: dict) -> BuildBaseline:
        """Reads :meth:`to_json` output (e.g. a manifest's ``metrics.baseline``).

        Raises:
            BundleError: a missing or malformed field, named.
        """
        try:
            heads = tuple(
                HeadBaseline(
                    column=column,
                    validation_rows=int(entry["validation_rows"]),
                    left_out_rows=int(entry["left_out_rows"]),
                    validation_accuracy=_optional_float(entry["validation_accuracy"]),
                    validation_macro_f1=_optional_float(entry["validation_macro_f1"]),
                    probe_validation_accuracy=_optional_float(entry["probe_validation_accuracy"]),
                    probe_validation_macro_f1=_optional_float(entry["probe_validation_macro_f1"]),
                    probe_converged=bool(entry.get("probe_converged", True)),
                )
                for column, entry in payload["heads"].items()
            )
            found = payload["retrieval"]
            retrieval = RetrievalBaseline(
                column=str(found["column"]),
                k=int(found["k"]),
                queries=int(found["queries"]),
                left_out_queries=int(found["left_out_queries"]),
                embedding_p_at_k=_optional_float(found["embedding_p_at_k"]),
                raw_features_p_at_k=_optional_float(found["raw_features_p_at_k"]),
            )
            return cls(heads=heads, retrieval=retrieval, seconds=float(payload["seconds"]))
        except KeyError as error:
            raise BundleError(f"metrics.baseline: missing field {error.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise BundleError(f"metrics.baseline is malformed: {error}") from None

    def shortfalls(self) -> list[str]:
        """One sentence per head whose validation accuracy is below its probe's."""
        return [
            f"head {head.column!r} validation accuracy {head.validation_accuracy:.3f} is below a "
            f"logistic-regression probe on the raw features ({head.probe_validation_accuracy:.3f}): "
            "training did not pay off for it"
            for head in self.heads
            if head.below_probe
        ]

    def summary_lines(self) -> list[str]:
        """The build summary: one line per head, one for retrieval, then ``warning: ...`` lines."""
        lines = []
        for head in self.heads:
            left_out = f" ({head.left_out_rows} validation row(s) of classes absent from training left out)"
            lines.append(
                f"{head.column}: validation accuracy {_figure(head.validation_accuracy, 3)} "
                f"(probe {_figure(head.probe_validation_accuracy, 3)}), macro-F1 "
                f"{_figure(head.validation_macro_f1, 2)} (probe {_figure(head.probe_validation_macro_f1, 2)})"
                + (left_out if head.left_out_rows else "")
            )
        retrieval = self.retrieval
        lines.append(
            f"P@{retrieval.k} on validation: embedding {_figure(retrieval.embedding_p_at_k, 2)}, "
            f"raw features {_figure(retrieval.raw_features_p_at_k, 2)}"
        )
        return lines + [f"warning: {line}" for line in self.shortfalls()]


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _figure(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def compare_with_baseline(
    features: np.ndarray,
    labels: dict[str, list[str]],
    space: LabelSpace,
    train_index: np.ndarray,
    validation_index: np.ndarray,
    outputs: dict[str, np.ndarray],
    *,
    embed: Callable[[np.ndarray], np.ndarray],
    flipped: np.ndarray | None = None,
    seed: int = 0,
    k: int = BASELINE_K,
) -> BuildBaseline:
    """Compares the selection model with a probe per head and with raw features for retrieval.

    Every single-valued label column (hierarchy levels included, in either hierarchy mode;
    not the tags) gets a probe; the retrieval comparison is on the primary column.

    Args:
        features: (n, d) float32 backbone features, catalog order.
        labels: label column -> n labels.
        space: the label space of the model.
        train_index: positions the selection model was trained on.
        validation_index: positions it was early-stopped on.
        outputs: head name -> (m, width) outputs of the selection model on the validation
            rows (``validation_index`` order); decoded with ``space.predict``.
        embed: (m, d) float32 backbone features -> (m, e) float32 embeddings of the selection
            model.
        flipped: (n, d) float32 mirrored-image features; when given, embeddings are the mean
            of both views, as the bundle's index holds them. The probe and the raw-feature
            neighbours use the original view only (the plain backbone).
        seed: the probe's seed.
        k: neighbours per query.

    Returns:
        The comparison; each shortfall it finds is also logged as a warning.
    """
    from recommender.scalers import fit_scaler, transform

    started = time.perf_counter()
    train_features, validation_features = features[train_index], features[validation_index]
    decoded = space.predict(outputs)
    heads = []
    for column in space.columns:
        names = space.classes_of(column)
        predicted = np.array([names[c] for c in decoded[column][0]], dtype=object)
        truth = np.asarray(labels[column], dtype=object)
        train_truth, validation_truth = truth[train_index], truth[validation_index]
        probe = probe_metrics(train_features, train_truth, validation_features, validation_truth, seed)
        known = set(train_truth.tolist())
        kept = np.array([label in known for label in validation_truth.tolist()], bool)
        head = classification_summary(validation_truth[kept].astype(str), predicted[kept].astype(str))
        heads.append(
            HeadBaseline(
                column=column,
                validation_rows=probe["validation_rows"],
                left_out_rows=probe["left_out_rows"],
                validation_accuracy=head["accuracy"],
                validation_macro_f1=head["macro_f1"],
                probe_validation_accuracy=probe["accuracy"],
                probe_validation_macro_f1=probe["macro_f1"],
                probe_converged=probe["converged"],
            )
        )

    # One embedding call per view for all rows (each model.predict call has a fixed cost).
    order = np.concatenate([train_index, validation_index])
    values = np.asarray(embed(features[order]), np.float32)
    if flipped is not None:
        values = (values + np.asarray(embed(flipped[order]), np.float32)) / 2
    train_embeddings, validation_embeddings = values[: len(train_index)], values[len(train_index) :]

    primary_column = space.primary_column
    primary = np.asarray(labels[primary_column], dtype=object)
    raw_scaler = fit_scaler(train_features)
    raw = exact_precision_at_k(
        transform(raw_scaler, train_features),
        primary[train_index],
        transform(raw_scaler, validation_features),
        primary[validation_index],
        k,
    )
    # Standardized with a scaler fit on the catalog (here: the training rows), as the bundle does.
    embedding_scaler = fit_scaler(train_embeddings)
    trained = exact_precision_at_k(
        transform(embedding_scaler, train_embeddings),
        primary[train_index],
        transform(embedding_scaler, validation_embeddings),
        primary[validation_index],
        k,
    )
    retrieval = RetrievalBaseline(
        column=primary_column,
        k=int(k),
        queries=trained["queries"],
        left_out_queries=trained["left_out_queries"],
        embedding_p_at_k=trained["precision_at_k"],
        raw_features_p_at_k=raw["precision_at_k"],
    )
    baseline = BuildBaseline(heads=tuple(heads), retrieval=retrieval, seconds=time.perf_counter() - started)
    for line in baseline.shortfalls():
        log.warning("%s", line)
    return baseline
