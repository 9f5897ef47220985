"""Micro-batching of concurrent queries: uploads that arrive together share one forward pass.

A server answering uploads from several threads at once (gunicorn's gthread workers) would
run one backbone + classifier call per upload. :class:`QueryBatcher` lets each request thread
decode its own photo (``Recommender.decode``: a bad image fails there, for that caller only)
and then hand the decoded array to one batching thread per process, which runs
``Recommender.answer_decoded`` over everything that is waiting and gives each caller its own
answer (its own ``k``, filters and ``match_predicted``).

When to run a batch: as soon as a request is queued and no other request is still decoding,
so a lone upload never waits. While other requests are decoding (they announced themselves by
entering :meth:`QueryBatcher.query`), the thread waits for them up to ``max_wait_ms`` or until
``max_batch`` requests are queued. Requests that queue while a batch runs form the next one.

A batch uses one bundle: each request brings the engine it holds (the web app keeps it fixed
for the request), and the waiting requests are grouped by engine, one forward pass per group,
so a bundle swap never mixes two bundles in one answer and an old engine is dropped as soon as
its last request is answered.

The thread is started lazily by the first query in a process, and again in a child after
``fork`` (threads do not survive it), as the bundle watcher does (``webapp.bundles``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Seconds the idle batching thread sleeps between checks that its batcher still exists.
IDLE_CHECK_S = 1.0


@dataclass(frozen=True)
class BatchSettings:
    """How the batcher groups requests.

    Attributes:
        max_wait_ms: the longest a queued request waits for requests still decoding to join
            its batch; 0 means no batching at all (no thread: each request runs its own pass).
        max_batch: the most requests in one forward pass.
    """

    max_wait_ms: float = 5.0
    max_batch: int = 16

    @property
    def enabled(self) -> bool:
        """Whether requests are batched (``max_wait_ms > 0`` and ``max_batch > 1``)."""
        return self.max_wait_ms > 0 and self.max_batch > 1


class _Job:
    """One request waiting for its answer."""

    __slots__ = ("engine", "decoded", "options", "done", "answer", "error")

    def __init__(self, engine, decoded, options):
        self.engine = engine
        self.decoded = decoded
        self.options = options
        self.done = threading.Event()
        self.answer: dict | None = None
        self.error: BaseException | None = None


class QueryBatcher:
    """Answers uploads from many threads with shared forward passes (see the module docstring).

    Args:
        settings: :class:`BatchSettings` (must be enabled).

    Attributes:
        listeners: called with the size of each forward pass the batcher ran (the web app
            counts them as Prometheus metrics).
        forward_passes: forward passes run so far in this process.
        batched_queries: queries answered through them.
    """

    def __init__(self, settings: BatchSettings):
        if not settings.enabled:
            raise ValueError(f"batching is off with {settings}; answer queries directly instead")
        self.settings = settings
        self.listeners: list[Callable[[int], None]] = []
        self.forward_passes = 0
        self.batched_queries = 0
        self._reset_state()
        self._fork_hook = False

    def _reset_state(self) -> None:
        # A lock held by a thread at fork time would stay held in the child: fresh ones there.
        self._condition = threading.Condition()
        self._queue: list[_Job] = []
        self._arriving = 0
        self._thread: threading.Thread | None = None
        self._thread_pid: int | None = None

    def query(self, engine, image, options) -> dict:
        """Decodes ``image`` in this thread, then waits for its answer from a shared forward pass.

        Args:
            engine: the ``Recommender`` this request is answered with.
            image: encoded bytes, a path, a file object or ``ImageBytes``.
            options: ``QueryOptions`` from ``engine.query_options`` (already checked).

        Returns:
            The answer ``engine.query`` would give for this image and these options.

        Raises:
            InvalidImageError: the image cannot be read (this caller only; nothing is queued).
        """
        self._ensure_thread()
        condition = self._condition
        with condition:
            self._arriving += 1
        try:
            decoded = engine.decode(image)
        except BaseException:
            with condition:
                self._arriving -= 1
                condition.notify_all()
            raise
        job = _Job(engine, decoded, options)
        with condition:
            self._arriving -= 1
            self._queue.append(job)
            condition.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.answer

    def stop(self) -> None:
        """Ends the batching thread after the batch in progress (queued requests are still answered)."""
        thread = self._thread
        with self._condition:
            self._thread = None
            self._condition.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    # -- the batching thread --------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread_pid == os.getpid():
            return
        with self._condition:
            if self._thread is not None and self._thread_pid == os.getpid():
                return
            thread = threading.Thread(target=_run, args=(weakref.ref(self),), name="query-batcher", daemon=True)
            self._thread, self._thread_pid = thread, os.getpid()
            thread.start()
        if not self._fork_hook:
            self._fork_hook = True
            reference = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _after_fork(reference))

    def _next_batch(self) -> list[_Job] | None:
        """Waits for queued requests and returns the next batch (None: stop, or checking the batcher is still used)."""
        condition = self._condition
        me = threading.current_thread()
        with condition:
            if not self._queue:
                condition.wait(IDLE_CHECK_S)
            if self._thread is not me:
                return self._take_all() or None  # stopped: answer what is queued, then end
            if not self._queue:
                return None
            deadline = time.monotonic() + self.settings.max_wait_ms / 1000
            while len(self._queue) < self.settings.max_batch and self._arriving > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                condition.wait(remaining)
            batch = self._queue[: self.settings.max_batch]
            del self._queue[: self.settings.max_batch]
            return batch

    def _take_all(self) -> list[_Job]:
        batch, self._queue = self._queue, []
        return batch

    def _answer(self, batch: list[_Job]) -> None:
        """Runs one forward pass per engine among ``batch`` and hands out the answers."""
        groups: dict[int, list[_Job]] = {}
        for job in batch:
            groups.setdefault(id(job.engine), []).append(job)
        for jobs in groups.values():
            engine = jobs[0].engine
            try:
                answers = engine.answer_decoded([job.decoded for job in jobs], [job.options for job in jobs])
            except Exception as error:
                if len(jobs) == 1:
                    jobs[0].error = error
                    jobs[0].done.set()
                    self._count(1)
                    continue
                # Something failed for the batch: answer each alone, so an error reaches only
                # the request it belongs to.
                log.warning("a batch of %d queries failed; answering them one by one", len(jobs), exc_info=True)
                for job in jobs:
                    try:
                        job.answer = engine.answer_decoded([job.decoded], [job.options])[0]
                    except Exception as error:
                        job.error = error
                    self._count(1)
                    job.done.set()
                continue
            for job, answer in zip(jobs, answers):
                job.answer = answer
                job.done.set()
            self._count(len(jobs))

    def _count(self, size: int) -> None:
        self.forward_passes += 1
        self.batched_queries += size
        for listener in self.listeners:
            try:
                listener(size)
            except Exception:  # counting must never fail a request
                log.exception("a batch listener failed")


def _run(reference: weakref.ref) -> None:
    """The batching thread: takes batches and answers them until stopped or the batcher is dropped."""
    while True:
        batcher = reference()
        if batcher is None:
            return
        me = threading.current_thread()
        batch = batcher._next_batch()
        if batch:
            try:
                batcher._answer(batch)
            finally:
                for job in batch:  # never leave a caller waiting, whatever happened
                    if not job.done.is_set():
                        job.error = RuntimeError("the query batcher failed to answer this request")
                        job.done.set()
        if batcher._thread is not me:
            return
        del batcher, batch


def _after_fork(reference: weakref.ref) -> None:
    batcher = reference()
    if batcher is not None:
        batcher._reset_state()  # the child starts its own thread on its first query
