"""The bundle being served, swapped for a new one without downtime when its pointer changes."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recommender.bundle import MANIFEST
from recommender.errors import RecommenderError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PointerState:
    """What the bundle pointer resolves to right now; a change means a new bundle was published.

    Attributes:
        target: the resolved bundle folder (through any ``current`` symlink).
        manifest: ``(inode, mtime_ns, size)`` of its manifest, or None when there is none.
            A folder replaced in place (same path, new files) changes this.
    """

    target: Path
    manifest: tuple[int, int, int] | None


def pointer_state(pointer: Path) -> PointerState:
    """Resolves a bundle pointer and stats its manifest: two system calls, no file reading."""
    target = Path(os.path.realpath(pointer))
    try:
        stat = os.stat(target / MANIFEST)
    except OSError:
        return PointerState(target, None)
    return PointerState(target, (stat.st_ino, stat.st_mtime_ns, stat.st_size))


def warm_up(engine) -> None:
    """Runs one forward pass and one search so the first real request does not pay for tracing.

    The image is a blank array given straight to the model: warming up must not depend on a
    catalog image file being readable.
    """
    size = engine.backbone.input_size
    engine.embed_images(np.full((1, size, size, 3), 255, dtype=np.uint8))
    engine.similar_to_item(engine.rows[0].id, k=1)


class LiveBundle:
    """Serves one loaded bundle and replaces it, eagerly, when the pointer it was given changes.

    A watcher thread (started by :meth:`load_now`, one per process) compares the pointer's
    state with the one being served every ``check_interval_s``, whether requests arrive or
    not, so every worker of a server follows a publish or a rollback within one interval
    plus the load time, and workers never disagree for longer. A change is loaded and warmed
    in a background thread and then swapped in (one assignment, atomic under the GIL):
    requests in flight finish on the engine they already hold, later ones get the new one,
    and the old engine is released (its memory returns: nothing else keeps it). A bundle that
    fails to load is logged, reported by :meth:`status`, and not tried again until the
    pointer changes again; the old bundle keeps serving. ``current()`` never loads or checks.

    Args:
        pointer: bundle folder or symlink to one.
        check_interval_s: seconds between pointer checks (at least :data:`MIN_CHECK_INTERVAL_S`
            apart on the watcher; 0 means that floor).
        loader: ``path -> engine`` (``recommender.engine.load_bundle``).
    """

    def __init__(self, pointer: str | os.PathLike, check_interval_s: float, loader: Callable):
        self.pointer = Path(pointer)
        self.check_interval_s = check_interval_s
        self.loader = loader
        self._engine = None
        self._served_state: PointerState | None = None
        self._loaded_at: float | None = None
        self._failure: dict | None = None
        self._failed_state: PointerState | None = None
        self._loading: threading.Thread | None = None
        self._next_check = 0.0
        # Held only to decide whether to start a load: never while loading or serving.
        self._check_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._watcher_pid: int | None = None
        #: Called with "swapped" or "refused" after each background reload (webapp.observability counts them).
        self.listeners: list[Callable[[str], None]] = []

    def load_now(self) -> None:
        """Loads the bundle the pointer names, in this thread (at start-up).

        Raises:
            RecommenderError: the bundle cannot be loaded (BundleError, WeightsUnavailableError...).
        """
        state = pointer_state(self.pointer)
        engine = self.loader(state.target)
        warm_up(engine)
        self._install(engine, state)
        self._next_check = time.monotonic() + self.check_interval_s
        self.start_watching()

    def current(self):
        """The engine to answer this request with (the watcher keeps it up to date)."""
        return self._engine

    def start_watching(self) -> None:
        """Starts the watcher thread in this process, if it is not running here already.

        Threads do not survive ``fork``: a process forked after this (gunicorn with
        ``--preload``) starts its own watcher through an ``os.register_at_fork`` hook.
        """
        if self._watcher is not None and self._watcher.is_alive() and self._watcher_pid == os.getpid():
            return
        self._stop.clear()
        self._watcher_pid = os.getpid()
        # The thread holds only a weak reference: an app that is dropped (tests) stops its watcher.
        self._watcher = threading.Thread(
            target=_watch, args=(weakref.ref(self), self._stop), name="bundle-watcher", daemon=True
        )
        self._watcher.start()
        if not getattr(self, "_fork_hook", False):
            self._fork_hook = True
            reference = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _restart_after_fork(reference))

    def stop(self) -> None:
        """Stops the watcher thread (the served engine stays)."""
        self._stop.set()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(5)

    def check(self) -> bool:
        """Looks at the pointer now; starts loading a changed bundle in the background.

        Returns:
            True when a background load was started.
        """
        if not self._check_lock.acquire(blocking=False):
            return False  # another thread is checking right now; one is enough
        try:
            self._next_check = time.monotonic() + self.check_interval_s
            if self._loading is not None and self._loading.is_alive():
                return False
            state = pointer_state(self.pointer)
            if state == self._served_state:
                # Published back to what is served (a rollback): an old refusal no longer applies.
                self._failure = self._failed_state = None
                return False
            if state == self._failed_state:
                return False
            self._loading = threading.Thread(target=self._load, args=(state,), name="bundle-reload", daemon=True)
            self._loading.start()
            return True
        finally:
            self._check_lock.release()

    def wait_for_reload(self, timeout: float | None = None) -> None:
        """Blocks until a background load in progress has finished (tests, CLI)."""
        loading = self._loading
        if loading is not None:
            loading.join(timeout)

    def status(self) -> dict:
        """What is served and how the last reload went, for ``/readyz``.

        Returns:
            ``{"ready", "bundle", "items", "backbone", "path", "pointer", "loaded_at",
            "reloading", "reload_error"}``; ``reload_error`` is None or
            ``{"target", "message", "at"}`` for the last bundle that was refused.
        """
        engine = self._engine
        loading = self._loading
        status = {
            "ready": engine is not None,
            "bundle": None,
            "items": None,
            "backbone": None,
            "path": None,
            "pointer": str(self.pointer),
            "loaded_at": _iso_time(self._loaded_at) if self._loaded_at else None,
            "reloading": loading is not None and loading.is_alive(),
            "reload_error": self._failure,
        }
        if engine is not None:
            identity = engine.manifest.backbone.identity
            status.update(
                bundle=engine.bundle_id,
                items=engine.manifest.counts.items,
                backbone={key: value for key, value in identity.items() if key != "key"},
                path=str(engine.path),
            )
        return status

    def _install(self, engine, state: PointerState) -> None:
        self._engine = engine
        self._served_state = state
        self._loaded_at = time.time()
        self._failure = None
        self._failed_state = None

    def _load(self, state: PointerState) -> None:
        started = time.perf_counter()
        old = self._engine
        log.info("bundle pointer %s now names %s: loading it in the background", self.pointer, state.target)
        try:
            engine = self.loader(state.target)
            warm_up(engine)
        except RecommenderError as error:
            self._refuse(state, str(error))
            return
        except Exception as error:  # a broken bundle must never take the server down
            log.exception("unexpected error while loading %s", state.target)
            self._refuse(state, f"{type(error).__name__}: {error}")
            return
        self._install(engine, state)
        log.info(
            "now serving bundle %s from %s (was %s; loaded in %.1f s)",
            engine.bundle_id,
            state.target,
            old.bundle_id if old is not None else None,
            time.perf_counter() - started,
        )
        # The old engine's model, index and catalog go once the last request holding it ends;
        # its Keras model sits in reference cycles, so collect now rather than at some later
        # allocation count (each swap otherwise left the old model's memory behind for a while).
        del old, engine
        gc.collect()
        self._notify("swapped")

    def _refuse(self, state: PointerState, message: str) -> None:
        self._failed_state = state
        self._failure = {"target": str(state.target), "message": message, "at": _iso_time(time.time())}
        serving = self._engine.bundle_id if self._engine is not None else None
        log.error("refused the new bundle at %s: %s; still serving bundle %s", state.target, message, serving)
        self._notify("refused")

    def _notify(self, outcome: str) -> None:
        for listener in self.listeners:
            listener(outcome)


#: The watcher checks the pointer at most this often, whatever the configured interval.
MIN_CHECK_INTERVAL_S = 0.05


def _watch(reference: weakref.ref, stop: threading.Event) -> None:
    """The watcher thread: every interval (the first one after the load), checks the pointer."""
    while True:
        live = reference()
        if live is None:
            return
        interval = max(live.check_interval_s, MIN_CHECK_INTERVAL_S)
        del live
        if stop.wait(interval):
            return
        live = reference()
        if live is None:
            return
        try:
            live.check()
        except Exception:  # a failing stat must not end the watcher: log it and keep watching
            log.exception("checking the bundle pointer %s failed", live.pointer)
        del live


def _restart_after_fork(reference: weakref.ref) -> None:
    live = reference()
    if live is not None and live._watcher is not None and not live._stop.is_set():
        # The check lock may have been held by a thread that does not exist in the child.
        live._check_lock = threading.Lock()
        live._loading = None
        live.start_watching()


def _iso_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
