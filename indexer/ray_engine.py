"""The Ray engine: catalog photos through the backbone in Ray Data actors, features into Parquet parts.

``recommender build --engine ray`` (and ``rebuild``) runs the expensive half of a build here:

    driver: catalog rows -> sha256 of each photo (what the store lacks is the work)
    Ray Data: rows -> ExtractionActor (loads the backbone once; recommender.images.load_image,
              the one preprocessing function; both views) -> one Parquet part per batch and
              view, written by the actor itself (recommender.feature_parts.PartWriter)
    driver: reads the training sample's features from the store (every row up to
            --train-sample) -> trains the classifier (indexer.build)
    Ray Data: chunks of stored rows -> EmbeddingActor (loads the trained model once; reads
              its chunk's features from the store) -> (chunk, 512) embeddings to the driver
              (:func:`embed_ray`; catalogs of at most ``RayConfig.driver_embed_rows`` rows
              are embedded on the driver instead)
    driver: the same index, bundle, gate and publish as the local engine

Only hashes, per-photo errors, the model and embeddings travel through the object store,
never features: the driver never holds every feature of the catalog. A photo that cannot be read is a bad row with its reason, as in the local
loop. Ray Data restarts a killed actor and retries its batch (``max_restarts=-1``,
``max_task_retries=-1`` are its defaults for actor pools); a retried batch writes its part
again, which the store reads once. A killed driver leaves the parts already written, so the
rerun extracts only what is missing.

With an IVF index kind (``--index ivf-sq8`` / ``ivf-pq``, or ``auto`` choosing one) the index is
built here too (:func:`build_index_ray`): the driver trains the quantizers once on the seeded
sample, Ray tasks add contiguous shards of the embeddings to copies of the trained index, and
the driver merges the shards in id order: the index a single add makes. Flat and HNSW indexes
are built on the driver (neither merges from shards).

Every node must read the catalog photos, the feature store folder and a file backbone at the
same paths (a shared file system or a mounted bucket).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np

from recommender.catalog import BadRow, CatalogRow
from recommender.checkpoints import checkpoint
from recommender.config import RayConfig
from recommender.errors import BackboneError, FeatureStoreError, InvalidImageError, RayEngineError, RecommenderError
from recommender.feature_parts import PartFeatureStore, PartWriter
from recommender.features import ExtractionResult, StoredFeatures, hash_rows

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(config: RayConfig) -> Iterator[object]:
    """Joins the configured cluster (or starts a private local Ray) for one job; yields ``ray``.

    A Ray already initialised in this process (a notebook, a test) is used as it is and left
    running; one started here is shut down at the end.

    Raises:
        RayEngineError: Ray is not installed or the cluster cannot be joined.
    """
    try:
        import ray
    except ImportError:
        raise RayEngineError("the Ray engine needs ray[data]: pip install 'ray[data]'") from None
    if ray.is_initialized():
        yield ray
        return
    # Workers' own log lines (TensorFlow start-up) stay in Ray's session logs
    # (/tmp/ray/session_*/logs); an actor's exception still reaches the driver as an error.
    options = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if config.address:
        check_reachable(config.address)
        options["address"] = config.address
    elif config.object_store_bytes:
        options["object_store_memory"] = int(config.object_store_bytes)
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = config.address or "a local Ray"
        raise RayEngineError(f"cannot start or join {where}: {str(error).splitlines()[0]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fails fast when a ``HOST:PORT`` (or ``ray://HOST:PORT``) cluster address does not answer.

    ``ray.init`` retries an address that does not answer for minutes; a nightly job should say
    so at once. ``auto`` (the cluster ``ray start`` runs here) is left to Ray, which fails fast.

    Raises:
        RayEngineError: the address is malformed or nothing listens there.
    """
    import socket

    if address == "auto":
        return
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        raise RayEngineError(f"--ray-address must be auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as error:
        raise RayEngineError(
            f"no Ray cluster answers at {address} ({error.strerror or error}); start one with `ray start --head` "
            "or leave out --ray-address for a private local Ray"
        ) from None


class ExtractionActor:
    """One Ray actor: loads the backbone once, then turns batches of photos into stored features.

    Args:
        spec: the backbone spec's fields (``asdict(BackboneSpec)``).
        backbone_key: the identity key the driver's backbone has; an actor whose backbone
            differs (another weights file on its node) refuses to write features under it.
        store_path: the part-file store folder.
        flips: also extract the mirrored view.
        max_pixels: decompression-bomb limit per photo.
        decode_threads: photos decoded at once (Pillow releases the GIL).
    """

    def __init__(
        self, spec: dict, backbone_key: str, store_path: str, flips: bool, max_pixels: int, decode_threads: int = 2
    ):
        from recommender.backbones import BackboneSpec, load_backbone

        self.backbone = load_backbone(BackboneSpec(**spec))
        if self.backbone.identity["key"] != backbone_key:
            raise BackboneError(
                f"the backbone on this Ray node ({self.backbone.spec.name}) is not the driver's: "
                f"identity {self.backbone.identity['key']} != {backbone_key}; every node needs the same file"
            )
        self.writer = PartWriter(store_path, backbone_key, self.backbone.feature_dim)
        self.views = ("original", "flipped") if flips else ("original",)
        self.max_pixels = max_pixels
        self.decoder = ThreadPoolExecutor(max(1, decode_threads))

    def _decode(self, path: str):
        from recommender.images import load_image

        try:
            return load_image(path, self.backbone.input_size, max_pixels=self.max_pixels)
        except InvalidImageError as error:
            return error

    def __call__(self, chunks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decodes, extracts and stores chunks of photos; returns each photo's hash and error ("" when stored).

        Each input row is one chunk (``paths``, ``sha256s``): the photos of one forward pass,
        the same consecutive groups the local loop makes, so both engines see the same batches
        (a backbone's float results depend slightly on what else is in its batch).
        """
        digests, errors = [], []
        for paths, hashes in zip(chunks["paths"], chunks["sha256s"]):
            found = self._extract([str(p) for p in paths], [str(h) for h in hashes])
            digests += [str(h) for h in hashes]
            errors += found
        return {"sha256": np.array(digests, dtype=object), "error": np.array(errors, dtype=object)}

    def _extract(self, paths: list[str], digests: list[str]) -> list[str]:
        """One forward pass per view over the photos that decode; their parts written; errors per photo."""
        decoded = list(self.decoder.map(self._decode, paths))
        errors = [str(image) if isinstance(image, InvalidImageError) else "" for image in decoded]
        good = [i for i, error in enumerate(errors) if not error]
        if good:
            stacked = np.stack([decoded[i] for i in good])
            features = {}
            for view in self.views:
                features[view] = self.backbone.extract(stacked if view == "original" else stacked[:, :, ::-1])
            checkpoint("ray-batch")  # features computed, nothing written: a kill here loses the batch
            for view in self.views:
                self.writer.write([digests[i] for i in good], features[view], view)
        return errors


def actor_plan(ray, config: RayConfig) -> tuple[int, float]:
    """``(actors, GPUs per actor)`` from the config, else from the cluster's resources."""
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    gpus_per_actor = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if config.actors:
        return int(config.actors), gpus_per_actor
    if gpus_per_actor > 0:
        return max(1, int(gpus // gpus_per_actor)), gpus_per_actor
    # TensorFlow runs its own thread pool in each actor: one actor per four CPUs (at least one).
    return max(1, int(resources.get("CPU", 1)) // 4), 0.0


def extract_features_ray(
    rows: list[CatalogRow],
    backbone,
    store: PartFeatureStore,
    *,
    config: RayConfig = RayConfig(),
    flips: bool = False,
    batch_size: int = 32,
    max_pixels: int,
    progress: bool = False,
) -> ExtractionResult:
    """:func:`recommender.features.extract_features` with the backbone work in Ray actors.

    Args:
        rows: catalog rows.
        backbone: the driver's loaded backbone (its spec and identity are sent to the actors).
        store: the part-file store; the actors write into its folder.
        config: cluster and actor settings.
        flips: also the mirrored view.
        batch_size: photos per actor call (and per part file).
        max_pixels: decompression-bomb limit per photo.
        progress: show Ray Data's progress bars.

    Returns:
        As the local loop (readable rows in catalog order, bad rows with reasons), but the
        features as :class:`~recommender.features.StoredFeatures`: left in the store.

    Raises:
        RayEngineError: Ray cannot start, or the job failed on the cluster (its first error).
        FeatureStoreError: the stored features cannot be read back.
    """
    rows, hashes, bad_rows = hash_rows(rows)
    views = ("original", "flipped") if flips else ("original",)
    missing = np.zeros(len(rows), bool)
    for view in views:
        missing |= store.missing(hashes, view)
    todo = {}
    for row, digest, lacking in zip(rows, hashes, missing):
        if lacking and digest not in todo:
            todo[digest] = str(row.path)  # one extraction per photo, however many rows show it
    errors: dict[str, str] = {}
    if todo:
        with ray_session(config) as ray:
            import ray.data

            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = progress
            context.print_on_execution_start = progress
            context.verbose_stats_logs = False
            actors, gpus_per_actor = actor_plan(ray, config)
            log.info("extracting %d photos in %d Ray actor(s), %.2g GPU each", len(todo), actors, gpus_per_actor)
            pending = list(todo.items())
            items = [
                {"paths": [path for _, path in chunk], "sha256s": [digest for digest, _ in chunk]}
                for chunk in (pending[i : i + batch_size] for i in range(0, len(pending), batch_size))
            ]
            dataset = ray.data.from_items(items, override_num_blocks=min(len(items), 200))
            results = dataset.map_batches(
                ExtractionActor,
                fn_constructor_kwargs={
                    "spec": asdict(backbone.spec),
                    "backbone_key": backbone.identity["key"],
                    "store_path": str(store.path),
                    "flips": flips,
                    "max_pixels": max_pixels,
                },
                batch_size=1,  # one chunk (a forward pass) per call
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_gpus=gpus_per_actor,
                num_cpus=1,
            )
            try:
                for batch in results.iter_batches(batch_format="numpy", batch_size=None):
                    for digest, error in zip(batch["sha256"], batch["error"]):
                        if error:
                            errors[str(digest)] = str(error)
                    checkpoint("ray-results")  # parts of finished batches stored: a driver killed here loses none
            except Exception as error:  # Ray wraps the actor's exception in its own types
                raise ray_failure(error, "the Ray extraction job failed") from None
        store.refresh()
    keep = []
    for row, digest in zip(rows, hashes):
        if digest in errors:
            bad_rows.append(BadRow(line=row.line, id=row.id, image=row.image, reason=errors[digest], sha256=digest))
        else:
            keep.append((row, digest))
    out_hashes = [digest for _, digest in keep]
    if todo:
        store.compact()
    for view in views:
        lacking = store.missing(out_hashes, view)
        if lacking.any():  # compaction drops non-finite rows; an actor refuses to write them
            first = out_hashes[int(np.flatnonzero(lacking)[0])]
            raise FeatureStoreError(f"no stored {view} features for image {first[:12]} after extraction")
    return ExtractionResult(
        rows=[row for row, _ in keep],
        hashes=out_hashes,
        features=StoredFeatures(store, out_hashes, "original"),
        flipped=StoredFeatures(store, out_hashes, "flipped") if flips else None,
        bad_rows=bad_rows,
        extracted=len(todo) - len(errors),
    )


class EmbeddingActor:
    """One Ray actor: loads the trained classifier once, then embeds chunks of stored features.

    Args:
        model_bytes: the classifier as a ``.keras`` file's bytes (no shared file system needed).
        scaler: the input scaler's arrays (``recommender.scalers.scaler_arrays(..., "input")``).
        head_names: the model's head outputs.
        store_path, backbone_key, feature_dim: the part-file store the features are read from.
        flip_average: embed as the mean of both views (reads the flipped view too).
    """

    def __init__(
        self,
        model_bytes: bytes,
        scaler: dict,
        head_names: list[str],
        store_path: str,
        backbone_key: str,
        feature_dim: int,
        flip_average: bool,
    ):
        import tempfile
        from pathlib import Path

        import keras

        from recommender.classifier import ClassifierRunner
        from recommender.scalers import scaler_from_arrays

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.keras"
            path.write_bytes(model_bytes)
            model = keras.saving.load_model(path, compile=False)
        self.runner = ClassifierRunner(model, scaler_from_arrays(scaler, "input"), head_names)
        self.store = PartFeatureStore(store_path, backbone_key, feature_dim)
        self.flip_average = flip_average

    def __call__(self, chunks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each input row is one chunk (``positions``, ``sha256s``); returns ``position`` and
        its (n, 512) float32 raw ``embedding`` (before the embedding scaler)."""
        positions, embeddings = [], []
        for chunk_positions, digests in zip(chunks["positions"], chunks["sha256s"]):
            digests = [str(d) for d in digests]
            features = self.store.get(digests, "original")
            flipped = self.store.get(digests, "flipped") if self.flip_average else None
            embedded, _ = self.runner.run(features, flipped)
            positions.append(np.asarray(chunk_positions, np.int64))
            embeddings.append(embedded)
        return {"position": np.concatenate(positions), "embedding": np.concatenate(embeddings)}


#: Photos per embedding-actor call: one compiled call of ``ClassifierRunner`` with both views.
EMBED_CHUNK = 2048


def embed_ray(trained, features: StoredFeatures, flip_average: bool, config: RayConfig = RayConfig()) -> np.ndarray:
    """The classifier's raw embedding of every stored row, computed in Ray Data actors.

    The driver sends the model and the row hashes; each actor reads its chunks' features
    from the part store (chunks grouped by the part file that holds them) and sends back
    (chunk, 512) float32 embeddings, so the driver holds 2 KB a photo, never its 8-16 KB
    of features.

    Args:
        trained: the ``TrainedClassifier``.
        features: the rows' original-view features in the part store.
        flip_average: average with the flipped view (stored for every row).
        config: the cluster and actor settings.

    Returns:
        (n, 512) float32 raw embeddings in row order, as ``ClassifierRunner.run`` gives them
        (equal within float rounding: the batches differ).

    Raises:
        RayEngineError: Ray cannot start, or an actor failed.
        FeatureStoreError: stored features are missing or not finite (an actor's error).
    """
    import tempfile
    from pathlib import Path

    from recommender.classifier import EMBEDDING_LAYER
    from recommender.scalers import scaler_arrays

    store = features.store
    width = int(trained.model.get_layer(EMBEDDING_LAYER).units)
    out = np.zeros((len(features), width), np.float32)
    if not len(features):
        return out
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        trained.model.save(path)
        model_bytes = path.read_bytes()
    order = store.part_order(features.digests, "original")
    items = [
        {"positions": order[i : i + EMBED_CHUNK], "sha256s": [features.digests[j] for j in order[i : i + EMBED_CHUNK]]}
        for i in range(0, len(order), EMBED_CHUNK)
    ]
    done = np.zeros(len(features), bool)
    with ray_session(config) as ray:
        import ray.data

        actors, gpus_per_actor = actor_plan(ray, config)
        log.info("embedding %d rows in %d Ray actor(s)", len(features), min(actors, len(items)))
        dataset = ray.data.from_items(items, override_num_blocks=min(len(items), 200))
        results = dataset.map_batches(
            EmbeddingActor,
            fn_constructor_kwargs={
                "model_bytes": model_bytes,
                "scaler": {
                    key: np.asarray(value) for key, value in scaler_arrays(trained.input_scaler, "input").items()
                },
                "head_names": [head.name for head in trained.label_space.heads],
                "store_path": str(store.path),
                "backbone_key": store.backbone_key,
                "feature_dim": int(store.feature_dim),
                "flip_average": flip_average,
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(items)))),
            num_gpus=gpus_per_actor,
            num_cpus=1,
        )
        try:
            for batch in results.iter_batches(batch_format="numpy", batch_size=None):
                rows = np.asarray(batch["position"], np.int64)
                out[rows] = np.asarray(batch["embedding"], np.float32)
                done[rows] = True
        except Exception as error:  # Ray wraps the actor's exception in its own types
            raise ray_failure(error, "the Ray embedding job failed") from None
    if not done.all():
        raise RayEngineError(f"the Ray embedding job returned {int(done.sum())} of {len(done)} rows")
    return out


#: Most vectors one index-shard task adds (float32 copies of a shard live in the object store
#: and in the task: 500,000 x 512-d is 1 GB).
INDEX_SHARD_VECTORS = 500_000


def index_shards(count: int, cpus: float) -> int:
    """Shards of an index build over ``count`` vectors: one per cluster CPU, more when a shard
    would exceed :data:`INDEX_SHARD_VECTORS`, never more than the vectors."""
    return max(1, min(count, max(int(cpus), -(-count // INDEX_SHARD_VECTORS))))


def build_index_ray(vectors: np.ndarray, kind: str, config: RayConfig = RayConfig()):
    """An IVF index over ``vectors`` with its shards added in Ray tasks.

    Args:
        vectors: (n, d) float32 standardized embeddings (row i = catalog row i).
        kind: ``ivf-sq8`` or ``ivf-pq``.
        config: the cluster to run on.

    Returns:
        ``(VectorIndex, shards)``: the index (equal to ``VectorIndex.build(vectors, kind)`` in
        ids and distances) and how many shard tasks added it.

    Raises:
        RayEngineError: Ray cannot start, or a shard task failed.
        IndexBuildError: the kind cannot be built for these vectors.
    """
    from recommender.index import add_shard, build_sharded

    with ray_session(config) as ray:
        shards = index_shards(len(vectors), ray.cluster_resources().get("CPU", 1))
        remote_add = ray.remote(num_cpus=1, max_retries=3)(add_shard)

        def run_on_ray(function, trained_column, vector_column, starts):
            trained = ray.put(trained_column[0])  # the same trained index for every shard: sent once
            pending = [remote_add.remote(trained, shard, start) for shard, start in zip(vector_column, starts)]
            for reference in pending:  # in id order, each merged as it is read
                yield ray.get(reference)

        log.info("adding %d vectors to the %s index in %d Ray task(s)", len(vectors), kind, shards)
        try:
            index = build_sharded(vectors, kind, shards, map_shards=run_on_ray)
        except ray.exceptions.RayError as error:
            raise ray_failure(error, "an index shard task failed on Ray") from None
    return index, shards


def _panels_shard(bundle: str, k: int, per_column: str | None, batch_size: int, items: np.ndarray):
    """One Ray task of :func:`compute_panels_ray`: the panels of ``items`` (the bundle read here)."""
    from indexer.panels import compute_panels

    positions, neighbors, distances = compute_panels(bundle, k, per_column, batch_size=batch_size, items=items)
    return np.asarray(positions, dtype=np.int64), neighbors, distances


def compute_panels_ray(
    source, k: int, per_column: str | None = None, *, batch_size: int = 1024, config: RayConfig = RayConfig()
):
    """``indexer.panels.compute_panels`` with the items split over Ray tasks, one per cluster CPU.

    The settings are checked here first (a bad ``per_column`` fails before any task starts).
    Each task reads the bundle from its path (without the model: catalog rows, index,
    attributes) and searches its contiguous share of the items; the shares, each in catalog
    order, are joined in range order. The answers are the local job's.

    Args:
        source: a bundle folder, or a bundle the panels job already opened.

    Returns:
        As ``compute_panels``.

    Raises:
        RayEngineError: Ray cannot start, or a task failed.
        RecommenderError: the settings or the bundle are wrong, or a task's own typed error (a
            bundle that does not verify on a node).
    """
    from indexer.panels import checked_bundle
    from recommender.index import contiguous_ranges

    bundle = checked_bundle(source, k, per_column, batch_size)
    path, size = str(bundle.path), len(bundle.rows)
    with ray_session(config) as ray:
        remote = ray.remote(num_cpus=1, max_retries=3)(_panels_shard)
        ranges = contiguous_ranges(size, int(ray.cluster_resources().get("CPU", 1)))
        pending = [
            remote.remote(path, k, per_column, batch_size, np.arange(start, end, dtype=np.int64))
            for start, end in ranges
        ]
        log.info("panels of %d items in %d Ray task(s)", size, len(pending))
        try:
            parts = ray.get(pending)
        except ray.exceptions.RayError as error:
            raise ray_failure(error, "a panels task failed on Ray") from None
    positions = np.concatenate([part[0] for part in parts])
    neighbors = np.concatenate([part[1] for part in parts])
    distances = np.concatenate([part[2] for part in parts])
    return positions.tolist(), neighbors, distances


def ray_failure(error: Exception, what: str) -> RecommenderError:
    """The error a failed Ray job raises: the task's or actor's own typed error where it is
    one of ours (Ray wraps it, ``error.cause``), else a :class:`RayEngineError` saying ``what``."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, RecommenderError):
        return cause
    return RayEngineError(f"{what}: {str(error).splitlines()[0]}")


def ray_available() -> bool:
    """Whether ``ray[data]`` can be imported here."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True
