"""The trained dense classifier whose 512-d ``embedding`` layer makes the similarity space.

    features (n, d) float32 -> standardize (fit on training rows)
      -> Dense 1024 relu -> Dropout -> Dense 512 relu "embedding" -> Dropout
      -> one softmax head per label column (``head_0`` is the primary class)

One model, one forward pass for all heads. Rows are weighted equally by default; class
weights, when asked for, are per head sample weights (a multi-head model cannot take one
``class_weight``). Training is seeded; early stopping watches the primary head's validation
accuracy on a stratified split of the catalog (a class too small to hold a row out trains on
all its rows).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from recommender.baseline import classification_summary, compare_with_baseline
from recommender.checkpoints import checkpoint
from recommender.errors import TrainingError
from recommender.labels import HeadSpec, LabelSpace, path_score
from recommender.scalers import fit_scaler, transform

log = logging.getLogger(__name__)

EMBEDDING_LAYER = "embedding"


@dataclass(frozen=True)
class TrainConfig:
    """Classifier hyper-parameters (defaults measured on clothing-small; see README).

    Attributes:
        hidden_units: width of the first dense layer.
        embedding_units: width of the ``embedding`` layer.
        dropout: dropout rate after each dense layer.
        learning_rate: Adam learning rate.
        batch_size: training batch size.
        max_epochs: upper bound; early stopping usually ends sooner.
        patience: epochs without improvement of the primary head's validation loss before
            stopping (the best epoch's weights are restored).
        label_smoothing: categorical label smoothing.
        contrastive_weight: weight of the supervised contrastive (SupCon) loss on the
            embedding, which pulls same-class items together in the space the index searches;
            0 trains the heads alone (the original recipe).
        contrastive_temperature: SupCon temperature.
        refit_all: after the early-stopped selection fit, train the final model on every row
            (train + validation) for the selection fit's best number of epochs.
        stop_on: what early stopping watches on the validation rows: the primary head's
            ``accuracy`` (default) or its ``loss``. The weighted loss bottoms out early (5-10
            epochs) as the model grows confident, while accuracy and neighbour precision
            keep improving; refitting for the loss-chosen epoch count measured worse (README).
        validation_fraction: share of catalog rows held out (stratified) for early stopping.
        class_weight_power: per head, each row is weighted ``count(its class) ** -power``
            (scaled to a mean of 1): 1 is the original post's balanced weighting (every class
            counts equally), 0 weights every row the same (default). Measured on three real
            catalogs (README, Quality): balanced weights on long-tailed heads (classes of 1-2
            rows weighted 50x) wreck accuracy (baseColour 0.21 against 0.54 unweighted on
            fashion-products-small) without buying macro-F1 back.
        flip_augment: also train on features of mirrored images (when extracted).
        seed: seeds the split, initialisation, dropout and shuffling.
        baseline: also compare the selection fit with a logistic-regression probe per head
            and its embedding's validation P@6 with raw features' (``recommender.baseline``,
            recorded as ``metrics["baseline"]``; seconds); benchmarks that measure their own
            baselines turn it off.
    """

    hidden_units: int = 1024
    embedding_units: int = 512
    dropout: float = 0.5
    learning_rate: float = 4e-4
    batch_size: int = 64
    max_epochs: int = 32
    patience: int = 10
    label_smoothing: float = 0.0
    contrastive_weight: float = 1.0
    contrastive_temperature: float = 0.1
    refit_all: bool = True
    stop_on: str = "accuracy"
    validation_fraction: float = 0.1
    class_weight_power: float = 0.0
    flip_augment: bool = True
    seed: int = 0
    baseline: bool = True


@dataclass
class TrainedClassifier:
    """A fitted classifier and what the bundle records about it.

    Attributes:
        model: Keras model: input (n, d) standardized features -> {"embedding", "head_i"}.
        input_scaler: StandardScaler fit on the training rows' backbone features.
        label_space: the heads and how they map to label columns, taxonomy and tags.
        history: per-epoch training curves, JSON-ready.
        metrics: validation metrics, JSON-ready.
        train_index: catalog positions used for training.
        validation_index: catalog positions held out.
    """

    model: object
    input_scaler: object
    label_space: LabelSpace
    history: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    train_index: np.ndarray | None = None
    validation_index: np.ndarray | None = None

    @property
    def label_columns(self) -> list[str]:
        """Single-valued label columns; the first is the primary class."""
        return self.label_space.columns

    @property
    def classes(self) -> list[list[str]]:
        """Per label column, class names by index."""
        return self.label_space.classes


def build_model(feature_dim: int, heads: list[HeadSpec], config: TrainConfig):
    """Creates the Keras models.

    Args:
        feature_dim: backbone feature width.
        heads: the output heads (softmax or sigmoid), in order.
        config: hyper-parameters.

    Returns:
        ``(model, training_model)``: the same layers. ``model`` (saved in bundles, never
        compiled) outputs a dict with ``embedding`` (n, 512) and ``head_i`` (n, width_i);
        ``training_model`` outputs the heads, plus the embedding when the contrastive term
        is on (Keras wants a target and a loss per output).
    """
    import keras

    inputs = keras.Input((feature_dim,), name="features")
    hidden = keras.layers.Dense(config.hidden_units, activation="relu", name="hidden")(inputs)
    hidden = keras.layers.Dropout(config.dropout, name="hidden_dropout")(hidden)
    embedding = keras.layers.Dense(config.embedding_units, activation="relu", name=EMBEDDING_LAYER)(hidden)
    dropped = keras.layers.Dropout(config.dropout, name="embedding_dropout")(embedding)
    outputs = {
        head.name: keras.layers.Dense(len(head.classes), activation=head.kind, name=head.name)(dropped)
        for head in heads
    }
    model = keras.Model(inputs, {EMBEDDING_LAYER: embedding, **outputs}, name="classifier")
    training_outputs = {**outputs, EMBEDDING_LAYER: embedding} if config.contrastive_weight > 0 else outputs
    training_model = keras.Model(inputs, training_outputs, name="classifier_training")
    return model, training_model


def supervised_contrastive_loss(temperature: float):
    """SupCon (Khosla et al. 2020) over a batch: same-label rows are positives of each other.

    Returns:
        A Keras loss ``(labels (n,), embeddings (n, d)) -> (n,)`` on L2-normalised embeddings;
        rows without a positive in the batch contribute 0.
    """
    from keras import ops

    def loss(labels, embeddings):
        labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
        normalised = embeddings / (ops.norm(embeddings, axis=1, keepdims=True) + 1e-8)
        eye = ops.eye(ops.shape(normalised)[0])
        # -1e9 on the diagonal removes each row's similarity to itself from the softmax.
        similarity = ops.matmul(normalised, ops.transpose(normalised)) / temperature - 1e9 * eye
        log_probability = similarity - ops.logsumexp(similarity, axis=1, keepdims=True)
        positives = ops.cast(ops.equal(labels[:, None], labels[None, :]), "float32") * (1.0 - eye)
        return -ops.sum(positives * log_probability, axis=1) / ops.maximum(ops.sum(positives, axis=1), 1.0)

    return loss


#: A class needs at least this many rows for one to be held out for validation (sklearn's
#: stratified split needs two per class); smaller classes train on all their rows.
MIN_ROWS_TO_HOLD_OUT = 2


def stratified_split(labels: list[str], validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits positions into train/validation, stratified on the primary labels.

    Long tails are normal in shop catalogs (a product type with one photo): a class with
    fewer than :data:`MIN_ROWS_TO_HOLD_OUT` rows goes to train whole, so it is still learned,
    predicted and indexed, and the other rows are split stratified, ``validation_fraction`` of
    them held out. Without such classes the split is the plain stratified split of all rows.
    A held-out row never takes a class's last training row.

    Args:
        labels: the primary class of each row.
        validation_fraction: share of the splittable rows to hold out.
        seed: seeds the split.

    Returns:
        ``(train positions, validation positions)``, each sorted.

    Raises:
        TrainingError: fewer than 2 classes, or no validation rows possible (no class has 2
            rows, or too few rows for a stratified validation split).
    """
    counts = Counter(labels)
    if len(counts) < 2:
        raise TrainingError(f"need at least 2 classes to train a classifier, the catalog has {len(counts)}")
    positions = np.arange(len(labels))
    splittable = np.array([counts[label] >= MIN_ROWS_TO_HOLD_OUT for label in labels], bool)
    rest = positions[splittable]
    rest_labels = [labels[i] for i in rest]
    rest_classes = len(set(rest_labels))
    if not rest_classes:
        raise TrainingError(
            f"no class has {MIN_ROWS_TO_HOLD_OUT} or more examples, so none can be held out for validation "
            f"({len(counts)} classes of one row each); add examples"
        )
    n_validation = max(rest_classes, int(round(len(rest) * validation_fraction)))
    if len(rest) - n_validation < rest_classes:
        raise TrainingError(f"{len(rest)} rows are too few for {rest_classes} classes with a validation split")
    from sklearn.model_selection import train_test_split  # sklearn costs ~1 s to import: only when training

    train, validation = train_test_split(rest, test_size=n_validation, stratify=rest_labels, random_state=seed)
    # sklearn can hold out every row of a small class when more than half the rows are held
    # out; such rows go back to train (that class is then validated on nothing, and reported).
    trained = {labels[i] for i in train}
    stranded = np.array([labels[i] not in trained for i in validation], bool)
    if stranded.any():
        train, validation = np.concatenate([train, validation[stranded]]), validation[~stranded]
    if not len(validation):
        raise TrainingError(f"{len(rest)} rows are too few for {rest_classes} classes with a validation split")
    return np.sort(np.concatenate([train, positions[~splittable]])), np.sort(validation)


#: Rows every class (and every value of the other label columns, and every tag) keeps in a
#: training sample when it has them: the long tail is kept whole, the big classes are thinned.
SAMPLE_FLOOR = 20


def training_sample(
    labels: dict[str, list[str]],
    primary: str,
    limit: int | None,
    seed: int,
    tags: list[tuple[str, ...]] | None = None,
) -> np.ndarray | None:
    """The catalog positions the classifier trains on when the catalog has more than ``limit`` rows.

    Stratified on the primary column: each class keeps ``min(its rows, SAMPLE_FLOOR)`` rows
    plus its share of the rest (proportional to its size), so a class of 3 photos is as
    present as in the whole catalog and a class of 100,000 is thinned. Values of the other
    label columns and tags that the primary draw missed get up to ``SAMPLE_FLOOR`` of their
    rows added (every value the label space knows has rows to learn from). The sample can
    therefore exceed ``limit`` by the floors. Seeded and sorted.

    Args:
        labels: label column -> n label strings (catalog order).
        primary: the column to stratify on.
        limit: the most rows to train on (None or 0: no limit).
        seed: seeds the draw.
        tags: per row, its tags, or None.

    Returns:
        (m,) int64 sorted positions, or None when every row is trained on.
    """
    primary_labels = labels[primary]
    total = len(primary_labels)
    if not limit or total <= limit:
        return None
    rng = np.random.default_rng(seed)
    by_class = _positions_by_value(primary_labels)
    floors = {label: min(len(rows), SAMPLE_FLOOR) for label, rows in by_class.items()}
    spare = max(0, limit - sum(floors.values()))
    above = sum(len(rows) - floors[label] for label, rows in by_class.items())
    chosen = np.zeros(total, bool)
    for label, rows in by_class.items():
        extra = int(round(spare * (len(rows) - floors[label]) / above)) if above else 0
        take = min(len(rows), floors[label] + extra)
        chosen[rng.choice(rows, size=take, replace=False)] = True
    groups = [_positions_by_value(labels[column]) for column in labels if column != primary]
    if tags is not None:
        by_tag: dict[str, list[int]] = {}
        for position, row_tags in enumerate(tags):
            for tag in row_tags:
                by_tag.setdefault(tag, []).append(position)
        groups.append({tag: np.asarray(rows) for tag, rows in by_tag.items()})
    for group in groups:
        for rows in group.values():
            have = int(chosen[rows].sum())
            if have < SAMPLE_FLOOR:
                candidates = rows[~chosen[rows]]
                want = min(len(candidates), SAMPLE_FLOOR - have)
                chosen[rng.choice(candidates, size=want, replace=False)] = True
    return np.flatnonzero(chosen).astype(np.int64)


def _positions_by_value(values: list[str]) -> dict[str, np.ndarray]:
    """Value -> (k,) positions of the rows that have it."""
    found: dict[str, list[int]] = {}
    for position, value in enumerate(values):
        found.setdefault(value, []).append(position)
    return {value: np.asarray(rows) for value, rows in found.items()}


def split_coverage(labels: list[str], validation_index: np.ndarray) -> dict:
    """Over which primary classes the validation metrics are computed.

    Args:
        labels: the primary class of each catalog row.
        validation_index: positions of the held-out rows.

    Returns:
        JSON-ready: ``validation_classes`` (classes with a validation row), ``total_classes``,
        and ``train_only_classes``: class -> row count of the classes without one (trained on
        all their rows, not measured), sorted by name.
    """
    counts = Counter(labels)
    validated = {labels[int(i)] for i in validation_index}
    return {
        "validation_classes": len(validated),
        "total_classes": len(counts),
        "train_only_classes": {name: int(counts[name]) for name in sorted(set(counts) - validated, key=str)},
    }


def train_classifier(
    features: np.ndarray,
    labels: dict[str, list[str]],
    config: TrainConfig = TrainConfig(),
    *,
    flipped: np.ndarray | None = None,
    space: LabelSpace | None = None,
    tags: list[tuple[str, ...]] | None = None,
    verbose: int = 0,
    progress: bool = False,
) -> TrainedClassifier:
    """Trains the multi-head classifier on catalog features.

    Two fits: a *selection* fit on a stratified train split, early-stopped on the held-out
    validation rows (its validation metrics are what the bundle reports, and the tag
    thresholds are tuned on its validation predictions), then, with ``config.refit_all``, a
    fresh model trained on every row for the selection fit's best number of epochs (the
    final model: 10% more data and less dependence on which rows the split held out; on
    clothing-small it raised test P@6 by about 0.02, see the README).

    Args:
        features: (n, d) float32 backbone features, catalog order.
        labels: label column -> n label strings.
        config: hyper-parameters.
        flipped: (n, d) float32 features of the mirrored images, used as extra training rows
            when ``config.flip_augment``.
        space: the heads to train (taxonomy, tags); default one softmax head per column,
            the first column primary.
        tags: per row, its tags (when ``space`` has a tags head).
        verbose: Keras fit verbosity.
        progress: show an epoch progress bar (tqdm, stderr) for each fit.

    Returns:
        The trained classifier with its validation metrics and history.

    Raises:
        TrainingError: fewer than 2 classes, or too few examples for a validation split.
    """
    space = space or LabelSpace.create(labels)
    train_index, validation_index = stratified_split(
        labels[space.primary_column], config.validation_fraction, config.seed
    )
    targets = space.encode(labels, tags)
    use_flips = config.flip_augment and flipped is not None

    def rows(index):
        """Features and targets of catalog positions, with their mirrored copies when augmenting."""
        x = np.concatenate([features[index], flipped[index]]) if use_flips else features[index]
        found = {name: np.concatenate([t[index], t[index]]) if use_flips else t[index] for name, t in targets.items()}
        return x, found

    x_train, train_targets = rows(train_index)
    scaler = fit_scaler(x_train)
    validation_targets = {name: t[validation_index] for name, t in targets.items()}
    model, fit = _fit(
        transform(scaler, x_train),
        train_targets,
        space,
        config,
        epochs=config.max_epochs,
        validation=(transform(scaler, features[validation_index]), validation_targets),
        verbose=verbose,
        progress="training" if progress else None,
    )
    history = {name: [float(v) for v in values] for name, values in fit.history.items()}
    outputs = model.predict(transform(scaler, features[validation_index]), batch_size=1024, verbose=0)
    metrics = {"validation_rows": int(len(validation_index)), "train_rows": int(len(train_index))}
    metrics.update(split_coverage(labels[space.primary_column], validation_index))
    metrics.update(validation_metrics(space, outputs, {c: [labels[c][i] for i in validation_index] for c in labels}))
    if config.baseline:  # the selection model: the refit below trains on the validation rows too
        metrics["baseline"] = compare_with_baseline(
            features, labels, space, train_index, validation_index, outputs, flipped=flipped, seed=config.seed,
            embed=lambda rows: model.predict(transform(scaler, rows), batch_size=1024, verbose=0)[EMBEDDING_LAYER],
        ).to_json()  # fmt: skip
    if space.tags_column is not None:
        metrics["tags"] = space.tune_thresholds(
            validation_targets[_tags_head(space).name], outputs[_tags_head(space).name]
        )
    metrics["epochs_run"] = len(history.get("loss", []))
    losses = history.get(f"val_{space.primary_head.name}_loss") or []
    metrics["best_validation_loss"] = float(min(losses)) if losses else None
    metrics["best_epoch"] = fit.best_epoch
    metrics["config"] = asdict(config)

    if config.refit_all and metrics["best_epoch"]:
        all_index = np.arange(len(features))
        x_all, all_targets = rows(all_index)
        scaler = fit_scaler(x_all)
        model, refit = _fit(
            transform(scaler, x_all),
            all_targets,
            space,
            config,
            epochs=metrics["best_epoch"],
            verbose=verbose,
            progress="refit on all rows" if progress else None,
        )
        history.update({f"refit_{name}": [float(v) for v in values] for name, values in refit.history.items()})
        metrics["refit_rows"] = int(len(all_index))
    return TrainedClassifier(
        model=model,
        input_scaler=scaler,
        label_space=space,
        history=history,
        metrics=metrics,
        train_index=train_index,
        validation_index=validation_index,
    )


def _tags_head(space: LabelSpace) -> HeadSpec:
    return next(head for head in space.heads if head.kind == "sigmoid")


def validation_metrics(space: LabelSpace, outputs: dict[str, np.ndarray], truth: dict[str, list[str]]) -> dict:
    """Per-column accuracy and macro-F1 of the (consistent) predictions, and the hierarchy's path score.

    Args:
        space: the label space.
        outputs: head name -> (n, width) model outputs.
        truth: label column -> n true labels.

    Returns:
        ``{"heads": {column: {"validation_accuracy", "validation_macro_f1"}}, "hierarchy": {...}}``
        (macro-F1 over the classes in the truth or the predictions, ``baseline.classification_summary``;
        the hierarchy only with a taxonomy: ``path_score`` is the mean number of correct levels
        per row, one point per level as the original comparison counted it; ``path_accuracy``
        the share of rows with every level right).
    """
    predicted = space.predict(outputs)
    correct, found = {}, {"heads": {}}
    for column, (codes, _) in predicted.items():
        names = space.classes_of(column)
        labels = [names[c] for c in codes]
        correct[column] = np.array([p == t for p, t in zip(labels, truth[column])], bool)
        summary = classification_summary([str(t) for t in truth[column]], [str(p) for p in labels])
        found["heads"][column] = {
            "validation_accuracy": float(np.mean(correct[column])),
            "validation_macro_f1": summary["macro_f1"],
        }
    found["heads"] = {c: found["heads"][c] for c in space.columns}
    if space.taxonomy:
        levels = np.stack([correct[level] for level in space.taxonomy.levels], axis=1)
        found["hierarchy"] = {
            "mode": space.hierarchy_mode,
            "levels": list(space.taxonomy.levels),
            **path_score(levels),
        }
    return found


def _fit(
    x,
    targets,
    space: LabelSpace,
    config: TrainConfig,
    *,
    epochs: int,
    validation=None,
    verbose: int = 0,
    progress: str | None = None,
):
    """Builds a fresh seeded model and trains it; with ``validation``, early-stops on it.

    Args:
        x: (n, d) float32 standardized training features.
        targets: head name -> (n,) class indices (softmax) or (n, tags) multi-hot (sigmoid).
        space: the heads.
        config: hyper-parameters.
        epochs: epochs to train (the maximum, with early stopping).
        validation: ``(x, targets)`` of held-out rows, or None.
        verbose: Keras fit verbosity.
        progress: label of an epoch progress bar on stderr (tqdm), or None for no bar.

    Returns:
        ``(inference model, Keras History)``.
    """
    import keras

    keras.utils.set_random_seed(config.seed)
    model, training_model = build_model(x.shape[1], space.heads, config)
    primary = space.primary_head.name
    losses = {
        head.name: keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
        if head.kind == "softmax"
        else keras.losses.BinaryCrossentropy()
        for head in space.heads
    }
    loss_weights = {head.name: 1.0 for head in space.heads}
    contrastive = config.contrastive_weight > 0
    if contrastive:
        losses[EMBEDDING_LAYER] = supervised_contrastive_loss(config.contrastive_temperature)
        loss_weights[EMBEDDING_LAYER] = config.contrastive_weight
    training_model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=losses,
        loss_weights=loss_weights,
        metrics={head.name: ["accuracy"] for head in space.heads if head.kind == "softmax"},
    )

    def encoded(head_targets):
        found = {
            head.name: keras.utils.to_categorical(head_targets[head.name], len(head.classes))
            if head.kind == "softmax"
            else head_targets[head.name]
            for head in space.heads
        }
        if contrastive:  # SupCon's positives are rows of the same primary class
            found[EMBEDDING_LAYER] = head_targets[primary].astype(np.float32)
        return found

    def row_weights(head_targets):
        if not config.class_weight_power:
            return None
        rows = len(head_targets[primary])
        found = {
            head.name: class_weights(head_targets[head.name], config.class_weight_power)
            if head.kind == "softmax"
            else np.ones(rows, np.float32)
            for head in space.heads
        }
        if contrastive:
            found[EMBEDDING_LAYER] = found[primary]
        return found

    # Lets a fault-injection test pause (and kill) the job in the middle of training.
    callbacks = [keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: checkpoint("train"))]
    if progress:
        callbacks.append(_epoch_bar(epochs, progress, primary if validation is not None else None))
    validation_data = None
    if validation is not None:
        # Validation rows are weighted like training rows (with class weights on, early stopping
        # then judges every class equally too). It watches the primary head only: the total loss also holds the
        # contrastive term, whose scale depends on the batch composition.
        validation_data = (validation[0], encoded(validation[1]), row_weights(validation[1]))
        best = _early_stopping_class()(primary, config.stop_on, config.patience)
        callbacks.append(best)
    fit = training_model.fit(
        x,
        encoded(targets),
        sample_weight=row_weights(targets),
        validation_data=validation_data,
        batch_size=config.batch_size,
        epochs=epochs,
        callbacks=callbacks,
        shuffle=True,
        verbose=verbose,
    )
    fit.best_epoch = best.best_epoch if validation is not None else None
    return model, fit


def class_weights(codes: np.ndarray, power: float) -> np.ndarray:
    """(n,) float32 sample weights ``count(class) ** -power``, scaled to a mean of 1 over the rows."""
    _, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    weights = counts[inverse].astype(np.float64) ** -power
    return (weights / weights.mean()).astype(np.float32)


def _best_key(logs: dict, head: str, stop_on: str) -> tuple[float, float]:
    """Ranks an epoch: higher is better; ties on accuracy go to the lower validation loss."""
    # A model with a single output (one head, no contrastive term) logs unprefixed names.
    loss = float(logs.get(f"val_{head}_loss", logs.get("val_loss")))
    if stop_on == "accuracy":
        return float(logs.get(f"val_{head}_accuracy", logs.get("val_accuracy"))), -loss
    return -loss, 0.0


def _epoch_bar(epochs: int, description: str, head: str | None):
    """A Keras callback showing one tqdm bar over the epochs, with the primary head's validation accuracy."""
    import keras
    from tqdm import tqdm

    class EpochBar(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.bar = tqdm(total=epochs, desc=description, unit="epoch", leave=False)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            accuracy = logs.get(f"val_{head}_accuracy", logs.get("val_accuracy")) if head else None
            if accuracy is not None:
                self.bar.set_postfix_str(f"validation accuracy {float(accuracy):.3f}")
            self.bar.update(1)

        def on_train_end(self, logs=None):
            self.bar.close()

    return EpochBar()


def _early_stopping_class():
    """The early-stopping callback class (made here so that importing this module needs no Keras)."""
    import keras

    class BestEpoch(keras.callbacks.Callback):
        """Early stopping that keeps the best epoch's weights, ranked by :func:`_best_key`.

        Keras's EarlyStopping ranks by one number; on small validation splits accuracy ties
        often, and the first of the tied epochs is usually undertrained.
        """

        def __init__(self, head: str, stop_on: str, patience: int):
            super().__init__()
            self.head, self.stop_on, self.patience = head, stop_on, patience
            self.best_key, self.best_epoch, self.best_weights = None, None, None

        def on_epoch_end(self, epoch, logs=None):
            key = _best_key(logs or {}, self.head, self.stop_on)
            if self.best_key is None or key > self.best_key:
                self.best_key, self.best_epoch = key, epoch + 1
                self.best_weights = self.model.get_weights()
            elif epoch + 1 - self.best_epoch >= self.patience:
                self.model.stop_training = True

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)

    return BestEpoch


class ClassifierRunner:
    """Runs a trained model for inference through one compiled call (no ``model.predict``).

    Args:
        model: the Keras classifier.
        input_scaler: StandardScaler of the backbone features.
        head_names: the model's head outputs (``head_i``), in order.
    """

    def __init__(self, model, input_scaler, head_names: list[str]):
        import tensorflow as tf

        self.model = model
        self.input_scaler = input_scaler
        self.head_names = list(head_names)
        width = int(model.inputs[0].shape[-1])

        # autograph=False: the body is one plain call, and autograph's source inspection of
        # this closure only produces warnings.
        @tf.function(input_signature=[tf.TensorSpec([None, width], tf.float32)], reduce_retracing=True, autograph=False)
        def forward(batch):
            return model(batch, training=False)

        self._forward = forward

    def run(
        self, features: np.ndarray, flipped: np.ndarray | None = None, batch_size: int = 4096
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Embeds backbone features and predicts every head.

        Args:
            features: (n, d) float32 backbone features.
            flipped: (n, d) float32 features of the mirrored images; when given, the result
                is the mean of both views (flip-averaged), computed in the same call.
            batch_size: rows per compiled call.

        Returns:
            ``((n, 512) float32 embeddings, {head name: (n, width) float32 outputs})``.
        """
        width = int(self.model.get_layer(EMBEDDING_LAYER).units)
        embeddings, heads = [], {name: [] for name in self.head_names}
        step = batch_size if flipped is None else max(1, batch_size // 2)
        for start in range(0, len(features), step):
            part = features[start : start + step]
            rows = len(part)
            batch = part if flipped is None else np.concatenate([part, flipped[start : start + step]])
            outputs = self._forward(transform(self.input_scaler, batch))
            for name, target in ((EMBEDDING_LAYER, embeddings), *((n, heads[n]) for n in self.head_names)):
                values = outputs[name].numpy()
                target.append(values if flipped is None else (values[:rows] + values[rows:]) / 2)
        if not embeddings:
            return np.zeros((0, width), np.float32), {
                name: np.zeros((0, int(self.model.get_layer(name).units)), np.float32) for name in self.head_names
            }
        return (
            np.concatenate(embeddings).astype(np.float32),
            {name: np.concatenate(values).astype(np.float32) for name, values in heads.items()},
        )
