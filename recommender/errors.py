"""Typed exceptions raised by the library; only the CLI and the web layer turn them into messages."""

from __future__ import annotations


class RecommenderError(Exception):
    """Base class of every error the library raises on purpose (user or data errors)."""


class InvalidImageError(RecommenderError):
    """An image could not be read: empty, truncated, not an image, or too many pixels."""


class CatalogError(RecommenderError):
    """A catalog is missing, malformed, or has too many bad rows to build from.

    Attributes:
        bad_rows: the rejected rows as ``(row, reason)`` pairs, where known.
    """

    def __init__(self, message: str, bad_rows: list | None = None):
        super().__init__(message)
        self.bad_rows = list(bad_rows or [])


class CatalogImageError(RecommenderError):
    """A catalog photo cannot be served: missing, outside the bundle's image root, or changed.

    Attributes:
        reason: ``missing``, ``outside_root`` or ``changed`` (size or sha256 not the build's).
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class BackboneError(RecommenderError):
    """A backbone name is unknown or its model file cannot be loaded."""


class WeightsUnavailableError(BackboneError):
    """Pretrained weights could not be downloaded or read (offline, missing or wrong file)."""


class FeatureStoreError(RecommenderError):
    """The HDF5 feature store is unreadable, was written for another backbone, or holds non-finite features.

    Attributes:
        digests: the sha256 of the images whose features are at fault, where known.
    """

    def __init__(self, message: str, digests: list[str] | None = None):
        super().__init__(message)
        self.digests = list(digests or [])


class TrainingError(RecommenderError):
    """The classifier cannot be trained on this data (e.g. too few examples per class)."""


class IndexBuildError(RecommenderError):
    """The chosen FAISS index kind cannot be built for these vectors (e.g. ``ivf-pq`` on a tiny catalog)."""


class BundleError(RecommenderError):
    """A bundle is missing, incomplete, tampered with, or of an unsupported format version."""


class PanelsError(RecommenderError):
    """A panels folder is missing, incomplete, tampered with, or of an unsupported format version."""


class PanelsMismatchError(PanelsError):
    """Panels were computed for another bundle (another id or manifest) than the one at hand."""


class QueryError(RecommenderError):
    """A query is malformed (e.g. k out of range)."""


class FilterError(QueryError):
    """A filter is malformed or names a column or value the bundle does not have."""


class UnknownItemError(RecommenderError, KeyError):
    """A catalog id the bundle does not have.

    Also a ``KeyError``, so code written when an unknown id raised a bare ``KeyError``
    (``except KeyError``) keeps working; its message is the plain sentence, not KeyError's
    quoted repr.

    Attributes:
        item_id: the id asked for.
    """

    def __init__(self, item_id: str):
        super().__init__(f"no catalog item with id {item_id!r}")
        self.item_id = item_id

    def __str__(self) -> str:
        return str(self.args[0])


class JobLockedError(RecommenderError):
    """Another rebuild holds the artifact root's lock."""


class GateError(RecommenderError):
    """A new bundle failed the validation gate; the current bundle stays published."""


class PublishError(RecommenderError):
    """The artifact root's layout does not allow publishing or rolling back as asked."""


class RayEngineError(RecommenderError):
    """The Ray engine cannot run: Ray is not installed, the cluster cannot be joined, or the job failed on it."""


class StorageError(RecommenderError):
    """A file could not be written for lack of space (disk full, ``ENOSPC``, or quota exceeded, ``EDQUOT``).

    Attributes:
        path: the file or folder being written.
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path
