"""Visual similarity recommender: catalog photos -> trained embeddings -> "class + 6 nearest".

Public entry points: :func:`load_bundle` (query engine) and the typed errors; building is in
``indexer.build.build_bundle`` and the ``recommender`` command.
"""

from recommender.errors import (
    BackboneError,
    BundleError,
    CatalogError,
    FeatureStoreError,
    FilterError,
    InvalidImageError,
    QueryError,
    RecommenderError,
    TrainingError,
    UnknownItemError,
    WeightsUnavailableError,
)

__version__ = "0.1.0"

__all__ = [
    "BackboneError",
    "BundleError",
    "CatalogError",
    "FeatureStoreError",
    "FilterError",
    "InvalidImageError",
    "QueryError",
    "RecommenderError",
    "TrainingError",
    "UnknownItemError",
    "WeightsUnavailableError",
    "load_bundle",
]


def load_bundle(path, **kwargs):
    """Verifies and loads a bundle; see :func:`recommender.engine.load_bundle`."""
    from recommender.engine import load_bundle as _load_bundle

    return _load_bundle(path, **kwargs)
