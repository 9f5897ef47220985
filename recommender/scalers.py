"""scikit-learn StandardScaler fitting and its pickle-free (npz) persistence."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # importing scikit-learn costs ~1 s: only where a scaler is made
    from sklearn.preprocessing import StandardScaler


def fit_scaler(values: np.ndarray) -> StandardScaler:
    """Fits a StandardScaler on (n, d) values; constant columns get scale 1 (sklearn's rule).

    Computed in float64. Above :data:`FIT_CHUNK` rows the float64 copy is made a chunk at a
    time (``partial_fit``): a catalog's float32 embeddings are not doubled in memory.
    """
    from sklearn.preprocessing import StandardScaler

    if len(values) <= FIT_CHUNK:
        return StandardScaler().fit(np.asarray(values, np.float64))
    scaler = StandardScaler()
    for start in range(0, len(values), FIT_CHUNK):
        scaler.partial_fit(np.asarray(values[start : start + FIT_CHUNK], np.float64))
    return scaler


#: Rows of float64 :func:`fit_scaler` converts at once (64 MB at 512 columns).
FIT_CHUNK = 16_384


def scaler_arrays(scaler: StandardScaler, prefix: str) -> dict[str, np.ndarray]:
    """The arrays that define a fitted scaler, keyed ``<prefix>_mean`` etc. (for an npz)."""
    return {
        f"{prefix}_mean": np.asarray(scaler.mean_, np.float64),
        f"{prefix}_scale": np.asarray(scaler.scale_, np.float64),
        f"{prefix}_var": np.asarray(scaler.var_, np.float64),
        f"{prefix}_n_samples_seen": np.asarray(scaler.n_samples_seen_, np.int64),
    }


def scaler_from_arrays(arrays, prefix: str) -> StandardScaler:
    """Rebuilds a fitted StandardScaler from :func:`scaler_arrays` output (or a loaded npz)."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    scaler.mean_ = np.asarray(arrays[f"{prefix}_mean"], np.float64)
    scaler.scale_ = np.asarray(arrays[f"{prefix}_scale"], np.float64)
    scaler.var_ = np.asarray(arrays[f"{prefix}_var"], np.float64)
    scaler.n_samples_seen_ = np.asarray(arrays[f"{prefix}_n_samples_seen"]).item()
    scaler.n_features_in_ = scaler.mean_.shape[0]
    return scaler


def transform(scaler: StandardScaler, values: np.ndarray) -> np.ndarray:
    """Standardizes (n, d) values; returns (n, d) float32 (the dtype FAISS and Keras take)."""
    values = np.asarray(values, np.float32)
    out = np.subtract(values, scaler.mean_.astype(np.float32))
    out /= scaler.scale_.astype(np.float32)  # in place: one (n, d) result, no temporaries
    return out


def transform_in_place(scaler: StandardScaler, values: np.ndarray) -> np.ndarray:
    """:func:`transform` into ``values`` itself ((n, d) float32, owned by the caller): the
    same numbers without a second catalog-sized array."""
    if values.dtype != np.float32:
        raise TypeError(f"transform_in_place needs float32 values, got {values.dtype}")
    np.subtract(values, scaler.mean_.astype(np.float32), out=values)
    values /= scaler.scale_.astype(np.float32)
    return values
