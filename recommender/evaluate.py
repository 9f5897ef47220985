"""Measuring a bundle on labelled query images: accuracy per head and neighbour precision P@k."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recommender.catalog import BadRow, CatalogRow
from recommender.errors import InvalidImageError
from recommender.images import load_image


@dataclass
class QueryEvaluation:
    """Figures of a bundle answering labelled queries.

    Attributes:
        queries: number of queries answered.
        accuracy: per label column, share of queries whose predicted label is right.
        precision_at_k: per label column, mean share of the k neighbours with the query's label.
        k: neighbours per query.
        bad_rows: queries whose image could not be read.
    """

    queries: int
    accuracy: dict[str, float]
    precision_at_k: dict[str, float]
    k: int
    bad_rows: list[BadRow] = field(default_factory=list)


def evaluate_queries(recommender, rows: list[CatalogRow], k: int = 6, batch_size: int = 64) -> QueryEvaluation:
    """Queries every row's image (batched) and scores the answers against its labels.

    Args:
        recommender: a loaded ``engine.Recommender``.
        rows: labelled query rows (e.g. a test split); their label columns must be the bundle's.
        k: neighbours per query.
        batch_size: images per forward pass.

    Returns:
        Accuracy and P@k per label column that the rows carry.
    """
    columns = [c for c in recommender.label_columns if rows and c in rows[0].labels]
    hits = {c: [] for c in columns}
    precision = {c: [] for c in columns}
    bad: list[BadRow] = []
    size = recommender.backbone.input_size
    for start in range(0, len(rows), batch_size):
        batch, images = [], []
        for row in rows[start : start + batch_size]:
            try:
                images.append(load_image(row.path, size, max_pixels=recommender.max_pixels))
                batch.append(row)
            except InvalidImageError as error:
                bad.append(BadRow(line=row.line, id=row.id, image=row.image, reason=str(error)))
        if not batch:
            continue
        embeddings, probabilities = recommender.embed_images(np.stack(images))
        result = recommender.index.search(embeddings, k)
        for head, (column, names) in enumerate(zip(recommender.label_columns, recommender.classes)):
            if column not in hits:
                continue
            predicted = np.argmax(probabilities[head], axis=1)
            for i, row in enumerate(batch):
                truth = row.labels[column]
                hits[column].append(names[predicted[i]] == truth)
                labels = [recommender.rows[p]["labels"][column] for p in result.positions[i] if p >= 0]
                precision[column].append(np.mean([label == truth for label in labels]))
    return QueryEvaluation(
        queries=len(rows) - len(bad),
        accuracy={c: float(np.mean(v)) for c, v in hits.items() if v},
        precision_at_k={c: float(np.mean(v)) for c, v in precision.items() if v},
        k=k,
        bad_rows=bad,
    )
