"""The FAISS vector index over standardized embeddings: build, search, save, load.

Vectors are (n, 512) float32 standardized embeddings; FAISS id ``i`` is catalog row ``i`` of
the bundle (``catalog.jsonl`` line ``i``). Distances returned are Euclidean (the square root
of what FAISS reports). Four kinds (:data:`BUILT_KINDS`), with their resident bytes per
512-d vector (:func:`resident_bytes`):

- ``flat``: exact search (``IndexFlatL2``), 2,048 B; moved to a GPU when FAISS sees one;
- ``hnsw``: an HNSW graph over the float32 vectors (M 32), ~2,320 B;
- ``ivf-sq8``: ``IVF{nlist},SQ8``, 8-bit scalar codes in inverted lists, 512 B + an 8 B id;
- ``ivf-pq``: ``OPQ64,IVF{nlist},PQ64``, a learned rotation then 64 one-byte product codes,
  64 B + an 8 B id, plus the coarse centroids and PQ distance tables.

Both IVF kinds are approximate twice over (only ``nprobe`` of ``nlist`` lists are scanned,
and their codes are lossy), so they search ``rerank_factor * k`` candidates on the codes and
re-rank those by exact L2 against the (n, d) float16 embeddings kept beside the index
(``embeddings.f16.npy``, 1,024 B per vector on disk, memory-mapped when loaded): returned
distances are exact distances to the float16 vectors, and item vectors
(:meth:`VectorIndex.reconstruct`) are those stored ones, not code reconstructions.
``kind="auto"`` (:func:`choose_kind`) takes flat below :data:`APPROXIMATE_FROM` vectors,
else the first of HNSW, IVF-SQ8, IVF-PQ whose estimated resident size fits a memory budget.

IVF indexes are trained once on a seeded sample and filled in chunks; :func:`add_shard` adds
one range of vectors to a copy of the trained index and :func:`merge_shards` joins the
shards into the index a single add makes (:func:`build_sharded`): the pieces a distributed
build (e.g. one Ray task per shard) needs.

Filtered search (``search(..., allowed=mask)``) returns only allowed items. It is exact on a
flat index, and on the other kinds whenever at most :data:`EXACT_SCAN_UP_TO` items are
allowed (a scan of exactly those vectors); above that it searches the graph or the lists
with an ID selector and is approximate like an unfiltered search. It always runs on the CPU
copy of the index (see :meth:`VectorIndex.search`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from recommender.errors import BundleError, IndexBuildError, QueryError
from recommender.files import NO_SPACE_ERRNOS, storage_error, storage_errors
from recommender.manifest import IndexParameters

log = logging.getLogger(__name__)

#: Catalog size from which ``kind="auto"`` builds an approximate index. Below it exact search
#: of 512-d vectors costs a few ms per query on one core (see README "Performance").
APPROXIMATE_FROM = 100_000

#: HNSW parameters: 32 links per node; efSearch 128 keeps recall@6 high at 100k vectors.
HNSW_LINKS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf-sq8", "ivf-pq")
#: The kinds an index can be (``auto`` resolves to one of them).
BUILT_KINDS = INDEX_KINDS[1:]
#: Kinds with inverted lists of lossy codes, re-ranked against the float16 embeddings.
IVF_KINDS = ("ivf-sq8", "ivf-pq")
#: The float16 (n, d) standardized embeddings an IVF index re-ranks against, beside the index.
EMBEDDINGS_FILE = "embeddings.f16.npy"

#: Quantizers are trained on at most this many vectors, drawn with :data:`TRAINING_SEED`;
#: FAISS wants ~39 per inverted list, so the sample grows to that up to
#: :data:`MAX_TRAINING_POINTS` (k-means cost grows with sample x lists).
TRAINING_POINTS = 100_000
MAX_TRAINING_POINTS = 256_000
TRAINING_SEED = 0
#: FAISS's own minimum of training points per k-means centroid before it warns.
POINTS_PER_LIST = 39
#: k-means iterations of the coarse quantizer (FAISS's default 25 costs 2.5x the time for a
#: hardly better partition; the re-ranking absorbs the difference).
COARSE_ITERATIONS = 10
#: Vectors added per FAISS call (bounds the temporary copies of a large add).
ADD_CHUNK = 65_536
#: PQ sub-quantizers (one byte each) of ``ivf-pq``, and its OPQ rotation's training budget:
#: OPQ alternates PQ training (k-means per sub-space) and a rotation fit; FAISS's defaults (50
#: rounds on up to 65,536 points) took minutes even at 10,000 points on this 2-core machine, so
#: 4 rounds of 2 k-means iterations on 16,384 points: the rotation mostly balances variance
#: across sub-spaces, and the exact re-ranking absorbs what a longer fit would add.
PQ_SUBQUANTIZERS = 64
OPQ_TRAINING_POINTS = 16_384
OPQ_ITERATIONS = 4
OPQ_KMEANS_ITERATIONS = 2
#: Candidates per wanted neighbour that an IVF kind re-ranks exactly (``k' = factor * k``).
RERANK_FACTOR = {"ivf-sq8": 4, "ivf-pq": 16}
#: Share of the inverted lists scanned per query (``nprobe = nlist * share``, at least
#: :data:`MIN_NPROBE`); see README "Compressed indexes" for the recall and latency it buys.
NPROBE_SHARE = 1 / 60
MIN_NPROBE = 16

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


# -- sizes and the automatic choice -------------------------------------------------------


def ivf_lists(count: int) -> int:
    """Inverted lists for ``count`` vectors: ~4 sqrt(n), at most one per 39 training points."""
    training = training_points(count)
    return max(1, min(round(4 * math.sqrt(count)), training // POINTS_PER_LIST))


def training_points(count: int) -> int:
    """Size of the seeded training sample for ``count`` vectors (:data:`TRAINING_POINTS`)."""
    wanted = max(TRAINING_POINTS, POINTS_PER_LIST * round(4 * math.sqrt(count)))
    return min(count, wanted, MAX_TRAINING_POINTS)


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: :data:`NPROBE_SHARE` of them, at least :data:`MIN_NPROBE`."""
    return max(1, min(nlist, max(MIN_NPROBE, round(nlist * NPROBE_SHARE))))


def pq_shape(dimension: int, training: int) -> tuple[int, int]:
    """``(sub-quantizers, bits)`` of ``ivf-pq``: 64 one-byte codes where the data allows.

    The sub-quantizer count must divide the dimension. A code of ``b`` bits is a k-means of
    ``2**b`` centroids, which wants :data:`POINTS_PER_LIST` training points each, so smaller
    catalogs get fewer bits (8 from 9,984 training points; 5 at 2,000).
    """
    subquantizers = max(m for m in range(1, min(PQ_SUBQUANTIZERS, dimension) + 1) if dimension % m == 0)
    bits = max(1, min(8, int(math.log2(max(training / POINTS_PER_LIST, 2)))))
    return subquantizers, bits


def resident_bytes(kind: str, count: int, dimension: int = 512) -> int:
    """Estimated resident bytes of a loaded index of ``count`` vectors (the auto rule's figure).

    Per vector: flat 4d (2,048 B at 512-d); HNSW 4d + 8M (level-0 links) + ~16 (upper links,
    level, offset): 2,320 B, as measured on serialized HNSW32 indexes; IVF-SQ8 d + 8 (codes and
    the int64 id); IVF-PQ m + 8. Fixed: the coarse centroids (4 nlist d), SQ8's ranges, and for
    PQ the OPQ rotation (4 d^2), the codebooks and FAISS's precomputed distance tables
    (4 nlist m 2^bits, built when loaded). The float16 re-rank array is not counted: it is
    memory-mapped (see :func:`rerank_bytes_per_vector`). The inverted lists are counted, read
    into memory (the default) or memory-mapped: every query scans some of them, so a server
    needs them in RAM to be fast.
    """
    if kind == "flat":
        return 4 * dimension * count
    if kind == "hnsw":
        return (4 * dimension + 8 * HNSW_LINKS + 16) * count
    nlist = ivf_lists(count)
    coarse = 4 * nlist * dimension
    if kind == "ivf-sq8":
        return (dimension + 8) * count + coarse + 8 * dimension
    if kind == "ivf-pq":
        subquantizers, bits = pq_shape(dimension, training_points(count))
        codebooks = 4 * dimension * 2**bits
        tables = 4 * nlist * subquantizers * 2**bits
        return (subquantizers * bits // 8 + 8) * count + coarse + 4 * dimension**2 + codebooks + tables
    raise ValueError(f"index kind must be one of {BUILT_KINDS}, got {kind!r}")


def rerank_bytes_per_vector(kind: str, dimension: int = 512) -> int:
    """Bytes per vector of the memory-mapped float16 embeddings a kind keeps (0: none)."""
    return 2 * dimension if kind in IVF_KINDS else 0


def choose_kind(count: int, memory_bytes: int | None = None, dimension: int = 512) -> str:
    """The index kind ``auto`` builds for ``count`` vectors within a memory budget.

    Flat below :data:`APPROXIMATE_FROM` vectors; above, the first of ``hnsw``, ``ivf-sq8``,
    ``ivf-pq`` whose :func:`resident_bytes` fits ``memory_bytes`` (HNSW when no budget is
    given). When nothing fits, ``ivf-pq``, the smallest, with a warning.

    Args:
        count: vectors to index.
        memory_bytes: resident bytes the index may take, or None for no limit.
        dimension: their dimension.
    """
    if count < APPROXIMATE_FROM and (memory_bytes is None or resident_bytes("flat", count, dimension) <= memory_bytes):
        return "flat"
    if memory_bytes is None:
        return "hnsw"
    for kind in ("hnsw", "ivf-sq8", "ivf-pq"):
        if resident_bytes(kind, count, dimension) <= memory_bytes:
            return kind
    log.warning(
        "no index kind fits %d bytes for %d vectors; ivf-pq needs about %d",
        memory_bytes,
        count,
        resident_bytes("ivf-pq", count, dimension),
    )
    return "ivf-pq"


# -- training, shards, merging ------------------------------------------------------------


def ivf_parameters(kind: str, count: int, dimension: int) -> IndexParameters:
    """The build settings of an IVF kind for ``count`` vectors (what the manifest records)."""
    nlist, training = ivf_lists(count), training_points(count)
    if kind == "ivf-sq8":
        factory, subquantizers, bits = f"IVF{nlist},SQ8", None, None
    else:
        subquantizers, bits = pq_shape(dimension, training)
        # OPQ fits a d x d rotation and needs at least d training points (faiss 1.15 aborts
        # or segfaults below): smaller catalogs get plain PQ codes.
        rotation = f"OPQ{subquantizers}," if training >= dimension else ""
        factory = f"{rotation}IVF{nlist},PQ{subquantizers}x{bits}"
    return IndexParameters(
        factory=factory,
        nlist=nlist,
        nprobe=default_nprobe(nlist),
        pq_subquantizers=subquantizers,
        pq_bits=bits,
        rerank_factor=RERANK_FACTOR[kind],
        training_points=training,
    )


def train_ivf(vectors: np.ndarray, kind: str, *, seed: int = TRAINING_SEED):
    """Trains an empty IVF index of ``kind`` on a seeded sample of ``vectors``.

    Args:
        vectors: (n, d) float32 (a memory map is fine: only the sample is read).
        kind: ``ivf-sq8`` or ``ivf-pq``.
        seed: the sample's seed.

    Returns:
        ``(trained empty FAISS index, IndexParameters)``; the same inputs give the same index.

    Raises:
        IndexBuildError: ``ivf-pq`` with fewer vectors than its codes have centroids.
    """
    import faiss

    if kind not in IVF_KINDS:
        raise ValueError(f"not an IVF kind: {kind!r} (one of {IVF_KINDS})")
    count, dimension = vectors.shape
    parameters = ivf_parameters(kind, count, dimension)
    if kind == "ivf-pq" and count < 2**parameters.pq_bits:
        raise IndexBuildError(
            f"an ivf-pq index needs at least {2**parameters.pq_bits} vectors to train its codes, got {count}; "
            "use --index flat (exact, and small at this size)"
        )
    index = faiss.index_factory(dimension, parameters.factory)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = COARSE_ITERATIONS
    ivf.cp.min_points_per_centroid = 1  # tiny forced catalogs: no FAISS warning per build
    ivf.cp.seed = seed
    rotation = None
    if parameters.factory.startswith("OPQ"):
        rotation = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
        rotation.niter = OPQ_ITERATIONS
        rotation.niter_pq_0 = OPQ_ITERATIONS
        rotation.niter_pq = OPQ_KMEANS_ITERATIONS
        rotation.max_train_points = OPQ_TRAINING_POINTS
        # OPQ fits its rotation with 8-bit codes unless given a quantizer: the index's own shape.
        rotation_quantizer = faiss.ProductQuantizer(dimension, parameters.pq_subquantizers, parameters.pq_bits)
        rotation_quantizer.cp.min_points_per_centroid = 1
        rotation.pq = rotation_quantizer
    if kind == "ivf-pq":
        faiss.downcast_index(ivf).do_polysemous_training = False  # the factory's default: minutes, unused here
        product = faiss.downcast_index(ivf).pq
        product.cp.niter = COARSE_ITERATIONS
        product.cp.min_points_per_centroid = 1
        product.cp.seed = seed
    if parameters.training_points < count:
        chosen = np.sort(np.random.default_rng(seed).choice(count, parameters.training_points, replace=False))
        sample = np.ascontiguousarray(vectors[chosen], dtype=np.float32)
    else:
        sample = np.ascontiguousarray(vectors, dtype=np.float32)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index.train(sample)
    if rotation is not None:
        rotation.pq = None  # the quantizer above is freed with this frame: no dangling pointer
    ivf.nprobe = parameters.nprobe
    return index, parameters


def add_shard(trained: np.ndarray, vectors: np.ndarray, start: int) -> np.ndarray:
    """Adds one shard of vectors to a copy of a trained empty index.

    A pure function of bytes and arrays, so it can run anywhere (a Ray task, a process pool).

    Args:
        trained: ``faiss.serialize_index`` of the trained empty index (uint8 array).
        vectors: (s, d) float32, the catalog's rows ``start .. start + s - 1``.
        start: FAISS id of the shard's first vector.

    Returns:
        ``faiss.serialize_index`` of the shard's index (uint8 array), ids ``start ..``.
    """
    import faiss

    index = faiss.deserialize_index(np.asarray(trained, dtype=np.uint8))
    _add_in_chunks(index, vectors, start)
    return faiss.serialize_index(index)


def merge_shards(shards: Iterable[np.ndarray]):
    """Joins serialized shard indexes (from :func:`add_shard`, in id order) into one index.

    Each inverted list gets the shards' entries one shard after the other, so shards of
    consecutive id ranges merged in order give the lists a single add makes: the same
    search results, ids and distances.

    Returns:
        The merged FAISS index.
    """
    import faiss

    merged = None
    for shard in shards:
        index = faiss.deserialize_index(np.asarray(shard, dtype=np.uint8))
        if merged is None:
            merged = index
        else:
            merged.merge_from(index, 0)  # ids are already global: no offset
    if merged is None:
        raise ValueError("no shards to merge")
    return merged


def build_sharded(
    vectors: np.ndarray,
    kind: str,
    shards: int,
    *,
    map_shards: Callable[..., Iterable[np.ndarray]] = map,
) -> VectorIndex:
    """Builds an IVF index as a distributed build would: train once, add shards, merge.

    Args:
        vectors: (n, d) float32.
        kind: ``ivf-sq8`` or ``ivf-pq``.
        shards: how many contiguous id ranges to add separately.
        map_shards: ``map``-like runner of :func:`add_shard` over (trained, vectors, start)
            triples (default the built-in ``map``; e.g. Ray's remote calls for a cluster).

    Returns:
        The index, equal in search results to ``VectorIndex.build(vectors, kind)``.
    """
    vectors = _checked_vectors(vectors)
    import faiss

    index, parameters = train_ivf(vectors, kind)
    trained = faiss.serialize_index(index)
    ranges = contiguous_ranges(len(vectors), shards)
    starts = [start for start, _ in ranges]
    pieces = map_shards(add_shard, [trained] * len(ranges), [vectors[start:end] for start, end in ranges], starts)
    merged = merge_shards(pieces)
    faiss.extract_index_ivf(merged).nprobe = parameters.nprobe
    return VectorIndex(merged, kind, parameters=parameters, embeddings=vectors.astype(np.float16), use_gpu=False)


def contiguous_ranges(count: int, parts: int) -> list[tuple[int, int]]:
    """``(start, end)`` of up to ``parts`` non-empty, near-equal, consecutive ranges covering ``0 .. count``."""
    bounds = np.linspace(0, count, max(1, parts) + 1).astype(np.int64)
    return [(int(start), int(end)) for start, end in zip(bounds[:-1], bounds[1:]) if end > start]


def _add_in_chunks(index, vectors: np.ndarray, start: int) -> None:
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    for offset in range(0, len(vectors), ADD_CHUNK):
        chunk = np.ascontiguousarray(vectors[offset : offset + ADD_CHUNK], dtype=np.float32)
        index.add_with_ids(chunk, np.arange(start + offset, start + offset + len(chunk), dtype=np.int64))


def _checked_vectors(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"need (n, d) vectors with n > 0, got {vectors.shape}")
    return vectors


# -- the index ----------------------------------------------------------------------------


class VectorIndex:
    """A FAISS index over (n, d) float32 vectors, searched by L2 distance.

    Args:
        index: a CPU FAISS index (moved to the GPU here when one is available and ``use_gpu``).
        kind: one of :data:`BUILT_KINDS`.
        parameters: how it was built (IVF kinds: nprobe, the re-rank factor ...).
        embeddings: IVF kinds: the (n, d) float16 vectors to re-rank against (an array or a
            read-only memory map).
        use_gpu: move a flat index to the GPU if FAISS sees one.
    """

    def __init__(
        self,
        index,
        kind: str,
        *,
        parameters: IndexParameters | None = None,
        embeddings: np.ndarray | None = None,
        use_gpu: bool = True,
    ):
        import faiss

        if kind in IVF_KINDS and (embeddings is None or embeddings.shape != (index.ntotal, index.d)):
            shape = None if embeddings is None else embeddings.shape
            raise ValueError(f"an {kind} index needs ({index.ntotal}, {index.d}) float16 embeddings, got {shape}")
        self.kind = kind
        self.cpu_index = index
        self.dimension = index.d
        self.size = index.ntotal
        self.device = "cpu"
        self.embeddings = embeddings if kind in IVF_KINDS else None
        self._index = index
        if kind == "hnsw":
            parameters = IndexParameters(
                factory=f"HNSW{index.hnsw.nb_neighbors(1)}",
                hnsw_links=index.hnsw.nb_neighbors(1),
                ef_search=index.hnsw.efSearch,
            )
        self.parameters = parameters or IndexParameters(factory="Flat" if kind == "flat" else None)
        if kind in IVF_KINDS:
            self._ivf = faiss.extract_index_ivf(index)
            self.nprobe = self._ivf.nprobe
            self.rerank_factor = self.parameters.rerank_factor or RERANK_FACTOR[kind]
            self.parameters = replace(self.parameters, nprobe=self.nprobe, rerank_factor=self.rerank_factor)
            self._flat_vectors = None
        else:
            # Filtered exact scans search the flat vectors with an ID selector: the index itself
            # when flat, else the HNSW graph's flat storage (same vectors, same FAISS ids).
            self._flat_vectors = index if kind == "flat" else faiss.downcast_index(index.storage)
        #: Filtered searches (other than on a flat index) allowing at most this many items scan them exactly.
        self.exact_scan_up_to = EXACT_SCAN_UP_TO
        # omp_set_num_threads is process-wide; the lock keeps a batch search from running with
        # the single-query setting of a concurrent request (and vice versa).
        self._lock = threading.Lock()
        if use_gpu and kind == "flat" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self._gpu_resources = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
            self.device = "gpu"

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        kind: str = "auto",
        *,
        use_gpu: bool = True,
    ) -> VectorIndex:
        """Builds an index over (n, d) float32 vectors.

        Args:
            vectors: (n, d) float32, row i becomes FAISS id i.
            kind: ``auto`` (:func:`choose_kind` without a memory budget) or one of :data:`BUILT_KINDS`.
            use_gpu: move a flat index to the GPU when FAISS sees one.
        """
        import faiss

        vectors = _checked_vectors(vectors)
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        dimension = vectors.shape[1]
        if kind == "auto":
            kind = choose_kind(len(vectors), None, dimension)
        if kind in IVF_KINDS:
            index, parameters = train_ivf(vectors, kind)
            _add_in_chunks(index, vectors, 0)
            return cls(index, kind, parameters=parameters, embeddings=vectors.astype(np.float16), use_gpu=False)
        if kind == "flat":
            index = faiss.IndexFlatL2(dimension)
        else:
            index = faiss.IndexHNSWFlat(dimension, HNSW_LINKS)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = HNSW_EF_SEARCH
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        index.add(vectors)
        return cls(index, kind, use_gpu=use_gpu)

    @property
    def resident_bytes(self) -> int:
        """Estimated resident bytes of this index (:func:`resident_bytes`)."""
        return resident_bytes(self.kind, self.size, self.dimension)

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None) -> SearchResult:
        """Finds the ``k`` nearest vectors of each query, optionally among allowed items only.

        IVF kinds search ``rerank_factor * k`` candidates in ``nprobe`` lists and return the
        ``k`` nearest of them by exact L2 to the float16 embeddings.

        With ``allowed``, only allowed positions are returned, nearest first, and rows are padded
        with position -1 and distance +inf when fewer than ``k`` items are allowed. How:

        - flat index: an exact scan of the allowed vectors (``IDSelectorArray``, which FAISS
          runs as a distance loop over just those ids): the same neighbours as brute force over
          the allowed subset, in ``O(allowed)`` time;
        - HNSW index: the same exact scan of its flat storage when at most
          :attr:`exact_scan_up_to` items are allowed (:data:`EXACT_SCAN_UP_TO`, chosen by
          measurement, see there), else an HNSW walk with an ``IDSelectorBitmap`` and the
          index's ``efSearch``: approximate, at about the cost of an unfiltered search;
        - IVF kinds: up to :attr:`exact_scan_up_to` allowed items, a numpy scan of their
          float16 embeddings (exact); above, an IVF search with an ``IDSelectorBitmap``, then
          the exact re-ranking: approximate like an unfiltered IVF search.

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
        if self.kind in IVF_KINDS:
            return self._search_ivf(queries, k)
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
        """How a search allowing ``allowed_count`` items runs: ``"exact scan"``, ``"hnsw + selector"``
        or ``"ivf + selector"``."""
        if self.kind == "flat" or allowed_count <= self.exact_scan_up_to:
            return "exact scan"
        return "hnsw + selector" if self.kind == "hnsw" else "ivf + selector"

    def _search_ivf(self, queries: np.ndarray, k: int, parameters=None) -> SearchResult:
        """Candidates on the codes, then the exact re-ranking (queries and ``k`` checked)."""
        import faiss

        candidates = min(self.size, self.rerank_factor * k)
        with self._lock:
            faiss.omp_set_num_threads(1 if len(queries) == 1 else (os.cpu_count() or 1))
            _, found = self.cpu_index.search(queries, candidates, params=parameters)
        return self._rerank(queries, found, k)

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> SearchResult:
        """The ``k`` nearest of each row's candidate positions by exact L2 to the float16 vectors."""
        positions = np.full((len(queries), k), -1, dtype=np.int64)
        distances = np.full((len(queries), k), np.inf, dtype=np.float32)
        for row, (query, found) in enumerate(zip(queries, candidates)):
            # Sorted positions: memory-map reads in file order, and ties go to the lower position.
            found = np.unique(found[found >= 0])
            if len(found) == 0:
                continue
            squared = _squared_distances(query, self.embeddings, found)
            top = np.argsort(squared, kind="stable")[:k]
            positions[row, : len(top)] = found[top]
            distances[row, : len(top)] = np.sqrt(squared[top])
        return SearchResult(positions=positions, distances=distances)

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
        method = self.filter_method(allowed_count)
        if self.kind in IVF_KINDS:
            if method == "exact scan":
                subset = np.flatnonzero(allowed)
                return self._rerank(queries, np.broadcast_to(subset, (len(queries), len(subset))), k)
            bitmap = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bitmap))
            parameters = faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe)
            return self._search_ivf(queries, k, parameters)
        # The selector points into these numpy arrays: they must outlive the search call.
        if method == "exact scan":
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
        """The stored vector of one catalog position, (d,) float32: exact, never a decoded code.

        Flat and HNSW indexes hold the float32 vectors; IVF kinds read the float16 embeddings
        (their codes would only give an approximation).
        """
        if self.embeddings is not None:
            if not 0 <= int(position) < self.size:
                raise IndexError(f"position {position} outside 0..{self.size - 1}")
            return np.asarray(self.embeddings[int(position)], dtype=np.float32)
        return np.asarray(self.cpu_index.reconstruct(int(position)), dtype=np.float32)

    def reconstruct_batch(self, positions: np.ndarray) -> np.ndarray:
        """The stored vectors of many catalog positions, (m, d) float32, as :meth:`reconstruct`."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.embeddings is not None:
            if len(positions) and (positions.min() < 0 or positions.max() >= self.size):
                raise IndexError(f"positions outside 0..{self.size - 1}")
            return np.asarray(self.embeddings[positions], dtype=np.float32)
        return np.asarray(self.cpu_index.reconstruct_batch(positions), dtype=np.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the CPU version of the index to ``path``; an IVF kind also writes its float16
        embeddings beside it (:data:`EMBEDDINGS_FILE` in the same folder).

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
        if self.embeddings is not None:
            target = Path(path).with_name(EMBEDDINGS_FILE)
            with storage_errors(target):
                np.save(target, np.asarray(self.embeddings), allow_pickle=False)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        use_gpu: bool = True,
        parameters: IndexParameters | None = None,
        memory_map: bool = False,
    ) -> VectorIndex:
        """Reads an index written by :meth:`save`.

        An IVF index's inverted lists are read into memory, or with ``memory_map`` mapped
        from the file (``IO_FLAG_MMAP``: file pages, shared by every process that maps the
        file, dropped by the kernel under pressure, but scanned at half the speed: p50 3.2 ms
        against 1.6 ms per query at 1M items, IVF-SQ8, nprobe 64, measured here). Its float16
        embeddings are always memory-mapped (``np.load(mmap_mode="r")``): the re-ranking reads
        a few rows per query.

        Args:
            path: the index file.
            use_gpu: move a flat index to the GPU when FAISS sees one.
            parameters: the manifest's record of how it was built (the re-rank factor, which
                FAISS does not store; nprobe is in the file).
            memory_map: map an IVF index's lists from the file instead of reading them.

        Raises:
            BundleError: the file is not a FAISS index of a known kind, or an IVF index's
                embeddings are missing or of the wrong shape or dtype.
        """
        import faiss

        path = Path(path)
        try:
            with open(path, "rb") as handle:
                fourcc = handle.read(4)
            mapped = memory_map and fourcc in _IVF_FOURCCS
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mapped else 0
            index = faiss.read_index(str(path), flags)
        except (OSError, RuntimeError) as error:
            raise BundleError(f"cannot read FAISS index {path}: {str(error).splitlines()[0]}") from None
        kind = _kind_of(index)
        if kind is None:
            raise BundleError(f"{path}: unsupported FAISS index type {type(index).__name__}")
        if kind == "hnsw":
            index.hnsw.efSearch = HNSW_EF_SEARCH
            return cls(index, kind, use_gpu=use_gpu)
        if kind == "flat":
            return cls(index, kind, use_gpu=use_gpu)
        embeddings_path = path.with_name(EMBEDDINGS_FILE)
        try:
            embeddings = np.load(embeddings_path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise BundleError(f"{path}: the {kind} index needs {embeddings_path.name}: {error}") from None
        if embeddings.dtype != np.float16 or embeddings.shape != (index.ntotal, index.d):
            raise BundleError(
                f"{embeddings_path}: expected ({index.ntotal}, {index.d}) float16 embeddings for the {kind} index, "
                f"got {embeddings.dtype} {embeddings.shape}"
            )
        # What the file says, overridden by what the manifest recorded.
        recorded = (parameters or IndexParameters()).to_json()
        parameters = replace(_ivf_parameters_of(index, kind), **recorded)
        faiss.extract_index_ivf(index).nprobe = parameters.nprobe
        return cls(index, kind, parameters=parameters, embeddings=embeddings, use_gpu=False)


#: File headers (FAISS fourcc) of the IVF indexes this module writes: SQ8, and OPQ's pre-transform.
_IVF_FOURCCS = (b"IwSq", b"IwSQ", b"IxPT", b"IwPQ", b"IwQR")


def _kind_of(index) -> str | None:
    import faiss

    if isinstance(index, faiss.IndexFlatL2):
        return "flat"
    if isinstance(index, faiss.IndexHNSWFlat):
        return "hnsw"
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        return "ivf-sq8"
    if isinstance(ivf, faiss.IndexIVFPQ):
        return "ivf-pq"
    return None


def _ivf_parameters_of(index, kind: str) -> IndexParameters:
    """What a loaded IVF index says about itself (lists, nprobe, PQ shape)."""
    import faiss

    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    subquantizers = bits = None
    if kind == "ivf-pq":
        subquantizers, bits = int(ivf.pq.M), int(ivf.pq.nbits)
    return IndexParameters(
        nlist=int(ivf.nlist),
        nprobe=int(ivf.nprobe),
        pq_subquantizers=subquantizers,
        pq_bits=bits,
        rerank_factor=RERANK_FACTOR[kind],
    )


def _squared_distances(query: np.ndarray, embeddings: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Exact squared L2 from one (d,) float32 query to the float16 rows at sorted ``positions``."""
    distances = np.empty(len(positions), dtype=np.float32)
    for start in range(0, len(positions), 4096):  # bounded float32 copies of a large subset
        rows = np.asarray(embeddings[positions[start : start + 4096]], dtype=np.float32)
        rows -= query
        distances[start : start + len(rows)] = np.einsum("ij,ij->i", rows, rows)
    return distances


def measure_recall(index: VectorIndex, vectors: np.ndarray, *, queries: int = 1000, k: int = 6, seed: int = 0) -> float:
    """recall@k of ``index`` against exact search, on a seeded sample of its own vectors.

    Args:
        index: the index over ``vectors``.
        vectors: (n, d) float32, the indexed vectors (row i = position i).
        queries: how many vectors to sample as queries (all when fewer).
        k: neighbours compared.
        seed: the sample's seed.

    Returns:
        The mean share of each query's exact ``k`` nearest (brute force, ``faiss.knn``) the index returns.
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count = min(queries, len(vectors))
    sample = np.sort(np.random.default_rng(seed).choice(len(vectors), size=count, replace=False))
    query_vectors = vectors[sample]
    k = min(k, len(vectors))
    if index.kind == "flat":
        exact = index.search(query_vectors, k).positions
    else:
        # Brute force over the vectors in place (faiss.knn): no flat copy of a catalog (2 GB at 1M).
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        exact = np.concatenate([faiss.knn(query_vectors[s : s + 256], vectors, k)[1] for s in range(0, count, 256)])
    found = index.search(query_vectors, k).positions
    return float(np.mean([len(set(a.tolist()) & set(e.tolist())) / k for a, e in zip(found, exact)]))


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
