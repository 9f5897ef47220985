"""The FAISS vector index over standardized embeddings: build, search, save, load.

Vectors are (n, 512) float32 standardized embeddings; FAISS id ``i`` is catalog row ``i`` of
the bundle (``catalog.jsonl`` line ``i``). Exact search (``IndexFlatL2``) is the default; an
HNSW graph is chosen automatically from :data:`APPROXIMATE_FROM` vectors (or by asking for
``kind="hnsw"``). When FAISS sees a GPU the flat index is moved there; HNSW has no GPU
version and stays on the CPU. Distances returned are Euclidean (the square root of what
FAISS reports).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from recommender.errors import BundleError, QueryError

#: Catalog size from which ``kind="auto"`` builds an approximate (HNSW) index. Below it exact
#: search of 512-d vectors costs a few ms per query on one core (see README "Performance").
APPROXIMATE_FROM = 100_000

#: HNSW parameters: 32 links per node; efSearch 128 keeps recall@6 high at 100k vectors.
HNSW_LINKS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128

INDEX_KINDS = ("auto", "flat", "hnsw")


@dataclass
class SearchResult:
    """Neighbours of each query: (m, k) int64 positions (-1 = none) and float32 distances."""

    positions: np.ndarray
    distances: np.ndarray


class VectorIndex:
    """A FAISS index over (n, d) float32 vectors, searched by L2 distance.

    Args:
        index: a CPU FAISS index (moved to the GPU here when one is available and ``use_gpu``).
        kind: ``flat`` or ``hnsw``.
        use_gpu: move a flat index to the GPU if FAISS sees one.
    """

    def __init__(self, index, kind: str, *, use_gpu: bool = True):
        import faiss

        self.kind = kind
        self.cpu_index = index
        self.dimension = index.d
        self.size = index.ntotal
        self.device = "cpu"
        self._index = index
        # omp_set_num_threads is process-wide; the lock keeps a batch search from running with
        # the single-query setting of a concurrent request (and vice versa).
        self._lock = threading.Lock()
        if use_gpu and kind == "flat" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self._gpu_resources = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
            self.device = "gpu"

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str = "auto", *, use_gpu: bool = True) -> VectorIndex:
        """Builds an index over (n, d) float32 vectors.

        Args:
            vectors: (n, d) float32, row i becomes FAISS id i.
            kind: ``auto`` (flat below :data:`APPROXIMATE_FROM` vectors, else HNSW), ``flat``
                or ``hnsw``.
            use_gpu: move a flat index to the GPU when FAISS sees one.
        """
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"need (n, d) vectors with n > 0, got {vectors.shape}")
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        if kind == "auto":
            kind = "hnsw" if len(vectors) >= APPROXIMATE_FROM else "flat"
        dimension = vectors.shape[1]
        if kind == "flat":
            index = faiss.IndexFlatL2(dimension)
        else:
            index = faiss.IndexHNSWFlat(dimension, HNSW_LINKS)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = HNSW_EF_SEARCH
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        index.add(vectors)
        return cls(index, kind, use_gpu=use_gpu)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Finds the ``k`` nearest vectors of each query.

        Args:
            queries: (m, d) float32.
            k: neighbours per query (capped at the index size).

        Returns:
            Positions (m, k) int64 and Euclidean distances (m, k) float32, nearest first.
        """
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise QueryError(f"query vectors must be (m, {self.dimension}), got {queries.shape}")
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        k = min(k, self.size)
        with self._lock:
            # One query is faster on one thread (no OpenMP fan-out cost); batches use all cores.
            faiss.omp_set_num_threads(1 if len(queries) == 1 else (os.cpu_count() or 1))
            squared, positions = self._index.search(queries, k)
        distances = np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)
        return SearchResult(positions=positions.astype(np.int64), distances=distances)

    def reconstruct(self, position: int) -> np.ndarray:
        """Returns the stored vector of one catalog position, (d,) float32."""
        return np.asarray(self.cpu_index.reconstruct(int(position)), dtype=np.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the CPU version of the index to ``path``."""
        import faiss

        faiss.write_index(self.cpu_index, str(path))

    @classmethod
    def load(cls, path: str | os.PathLike, *, use_gpu: bool = True) -> VectorIndex:
        """Reads an index written by :meth:`save`.

        Raises:
            BundleError: the file is not a FAISS index of a known kind.
        """
        import faiss

        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise BundleError(f"cannot read FAISS index {path}: {str(error).splitlines()[0]}") from None
        if isinstance(index, faiss.IndexFlatL2):
            kind = "flat"
        elif isinstance(index, faiss.IndexHNSWFlat):
            kind = "hnsw"
            index.hnsw.efSearch = HNSW_EF_SEARCH
        else:
            raise BundleError(f"{path}: unsupported FAISS index type {type(index).__name__}")
        return cls(index, kind, use_gpu=use_gpu)
