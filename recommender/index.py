"""The FAISS vector index over standardized embeddings: build, search, save, load.

Vectors are (n, 512) float32 standardized embeddings; FAISS id ``i`` is catalog row ``i`` of
the bundle (``catalog.jsonl`` line ``i``). Exact search (``IndexFlatL2``) is the default; an
HNSW graph is chosen automatically from :data:`APPROXIMATE_FROM` vectors (or by asking for
``kind="hnsw"``). When FAISS sees a GPU the flat index is moved there; HNSW has no GPU
version and stays on the CPU. Distances returned are Euclidean (the square root of what
FAISS reports).

Filtered search (``search(..., allowed=mask)``) returns only allowed items. It is exact on a
flat index and, on an HNSW index, whenever at most :data:`EXACT_SCAN_UP_TO` items are allowed;
above that it walks the graph with an ID selector and is approximate like unfiltered HNSW
search. It always runs on the CPU copy of the index (see :meth:`VectorIndex.search`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from recommender.errors import BundleError, QueryError
from recommender.files import NO_SPACE_ERRNOS, storage_error

#: Catalog size from which ``kind="auto"`` builds an approximate (HNSW) index. Below it exact
#: search of 512-d vectors costs a few ms per query on one core (see README "Performance").
APPROXIMATE_FROM = 100_000

#: HNSW parameters: 32 links per node; efSearch 128 keeps recall@6 high at 100k vectors.
HNSW_LINKS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128

INDEX_KINDS = ("auto", "flat", "hnsw")

#: Filtered HNSW search scans the allowed vectors exactly when at most this many are allowed,
#: and walks the graph with an ID selector above. Measured with ``bench/filtered.py`` (100,000
#: clothing-like 512-d vectors, one query on one thread, 2-core AMD EPYC, faiss 1.15, three
#: runs): the exact scan costs ~0.15-0.2 us per allowed vector (p50 0.17-0.21 ms for 1,000
#: items, 0.58-0.74 ms = 1.3-1.4x an unfiltered query for 4,000); the graph walk costs 1.1-1.2x
#: an unfiltered one (p50 0.42-0.60 ms) at any share from 4% to 50%. So 4,000 sends every
#: filter matching >= 5% of a 100,000-item catalog to the walk, inside the 2x target with room,
#: and keeps the scan under 1.5x. A count, not a share: the scan's cost grows with the allowed
#: items, the walk's hardly with the catalog. Below it the scan is also what keeps recall: a
#: selector walk stops after the same ``efSearch`` candidates as an unfiltered one, so when few
#: of the query's graph neighbours are allowed it misses true ones. recall@6 of the walk:
#: 0.96-0.98 for values drawn at random or holding the query's own cluster, 0.86 (5%), 0.92
#: (10%), 0.97 (25-50%) for values in clusters away from the query (unfiltered: 0.978,
#: bench/search.py).
EXACT_SCAN_UP_TO = 4_000


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
        # Filtered exact scans search the flat vectors with an ID selector: the index itself when
        # flat, else the HNSW graph's flat storage (same vectors, same FAISS ids).
        self._flat_vectors = index if kind == "flat" else faiss.downcast_index(index.storage)
        #: Filtered HNSW searches allowing at most this many items scan them exactly.
        self.exact_scan_up_to = EXACT_SCAN_UP_TO
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

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None) -> SearchResult:
        """Finds the ``k`` nearest vectors of each query, optionally among allowed items only.

        With ``allowed``, only allowed positions are returned, nearest first, and rows are padded
        with position -1 and distance +inf when fewer than ``k`` items are allowed. How:

        - flat index: an exact scan of the allowed vectors (``IDSelectorArray``, which FAISS
          runs as a distance loop over just those ids): the same neighbours as brute force over
          the allowed subset, in ``O(allowed)`` time;
        - HNSW index: the same exact scan of its flat storage when at most
          :attr:`exact_scan_up_to` items are allowed (:data:`EXACT_SCAN_UP_TO`, chosen by
          measurement, see there), else an HNSW walk with an ``IDSelectorBitmap`` and the
          index's ``efSearch``: approximate, at about the cost of an unfiltered search.

        Filtered searches always run on the CPU copy of the index, also when the flat index
        was moved to a GPU: whether a GPU index honours an ID selector depends on the FAISS
        build, while the CPU scan of the allowed subset is exact and costs ``O(allowed)``
        (0.2-6 ms at 1-50% of 100,000 items). Not exercised on a GPU: none was at hand.

        Args:
            queries: (m, d) float32.
            k: neighbours per query (capped at the index size).
            allowed: (size,) bool mask of the positions that may be returned; None searches
                all (the unfiltered path, unchanged).

        Returns:
            Positions (m, k) int64 and Euclidean distances (m, k) float32, nearest first.

        Raises:
            QueryError: queries of the wrong shape, ``k < 1`` or a mask of the wrong shape.
        """
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise QueryError(f"query vectors must be (m, {self.dimension}), got {queries.shape}")
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        k = min(k, self.size)
        if allowed is not None:
            return self._search_allowed(queries, k, allowed)
        with self._lock:
            # One query is faster on one thread (no OpenMP fan-out cost); batches use all cores.
            faiss.omp_set_num_threads(1 if len(queries) == 1 else (os.cpu_count() or 1))
            squared, positions = self._index.search(queries, k)
        distances = np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)
        return SearchResult(positions=positions.astype(np.int64), distances=distances)

    def search_excluding(self, queries: np.ndarray, excluded: Sequence[Collection[int]], k: int) -> SearchResult:
        """The ``k`` nearest vectors of each query, leaving out that query's ``excluded`` positions.

        This is how "the query itself" is left out of its neighbours: a query photo that is a
        catalog item excludes every position with its image content (the engine and the
        evaluation both pass those positions). Searches ``k`` plus the largest excluded set,
        then keeps the first ``k`` others of each row, nearest first.

        Args:
            queries: (m, d) float32.
            excluded: m collections of positions to leave out (empty: none).
            k: neighbours per query.

        Returns:
            (m, k) int64 positions padded with -1 and (m, k) float32 distances padded with +inf.

        Raises:
            QueryError: as :meth:`search`.
        """
        widest = max((len(positions) for positions in excluded), default=0)
        found = self.search(queries, k + widest)
        return drop_excluded(found, excluded, k)

    def filter_method(self, allowed_count: int) -> str:
        """How a search allowing ``allowed_count`` items runs: ``"exact scan"`` or ``"hnsw + selector"``."""
        if self.kind == "flat" or allowed_count <= self.exact_scan_up_to:
            return "exact scan"
        return "hnsw + selector"

    def _search_allowed(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> SearchResult:
        """The filtered search of :meth:`search`; queries and ``k`` are already checked."""
        import faiss

        allowed = np.asarray(allowed)
        if allowed.shape != (self.size,) or allowed.dtype != np.bool_:
            raise QueryError(f"allowed must be a ({self.size},) bool mask, got {allowed.dtype} {allowed.shape}")
        allowed_count = int(np.count_nonzero(allowed))
        if allowed_count == 0:
            return SearchResult(
                positions=np.full((len(queries), k), -1, dtype=np.int64),
                distances=np.full((len(queries), k), np.inf, dtype=np.float32),
            )
        # The selector points into these numpy arrays: they must outlive the search call.
        if self.filter_method(allowed_count) == "exact scan":
            subset = np.flatnonzero(allowed).astype(np.int64, copy=False)
            selector = faiss.IDSelectorArray(len(subset), faiss.swig_ptr(subset))
            index, parameters = self._flat_vectors, faiss.SearchParameters(sel=selector)
        else:
            bitmap = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bitmap))
            parameters = faiss.SearchParametersHNSW(sel=selector, efSearch=self.cpu_index.hnsw.efSearch)
            index = self.cpu_index
        with self._lock:
            faiss.omp_set_num_threads(1 if len(queries) == 1 else (os.cpu_count() or 1))
            squared, positions = index.search(queries, k, params=parameters)
        positions = positions.astype(np.int64)
        distances = np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)
        distances[positions < 0] = np.inf  # FAISS pads with -1 and float max
        return SearchResult(positions=positions, distances=distances)

    def reconstruct(self, position: int) -> np.ndarray:
        """Returns the stored vector of one catalog position, (d,) float32."""
        return np.asarray(self.cpu_index.reconstruct(int(position)), dtype=np.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the CPU version of the index to ``path``.

        Raises:
            StorageError: the disk is full or the quota exceeded.
        """
        import faiss

        try:
            faiss.write_index(self.cpu_index, str(path))
        except RuntimeError as error:
            # FAISS reports a failed write as a RuntimeError quoting strerror, not as an OSError.
            for code in NO_SPACE_ERRNOS:
                if os.strerror(code) in str(error):
                    raise storage_error(OSError(code, os.strerror(code)), path) from None
            raise

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


def drop_excluded(found: SearchResult, excluded: Sequence[Collection[int]], k: int) -> SearchResult:
    """Keeps the first ``k`` neighbours of each row of ``found`` that are not in its excluded set.

    Args:
        found: (m, n) positions and distances of a search with n >= k (or the whole index).
        excluded: m collections of positions to leave out.
        k: neighbours to keep.

    Returns:
        (m, k) positions (-1 padded) and (m, k) distances (+inf padded).
    """
    positions = np.full((len(found.positions), k), -1, np.int64)
    distances = np.full((len(found.positions), k), np.inf, np.float32)
    for i, (row_positions, row_distances) in enumerate(zip(found.positions, found.distances)):
        left_out = excluded[i]
        keep = [j for j, p in enumerate(row_positions) if p >= 0 and int(p) not in left_out][:k]
        positions[i, : len(keep)] = row_positions[keep]
        distances[i, : len(keep)] = row_distances[keep]
    return SearchResult(positions=positions, distances=distances)
