"""Micro-batching of concurrent queries: uploads that arrive together share one forward pass.

A server answering uploads from several threads at once (gunicorn's gthread workers) would
run one backbone + classifier call per upload. With a :class:`QueryBatcher`, each request
thread decodes its own photo (``Recommender.decode``: a bad image fails there, for that caller
only) and queues the decoded array; ``Recommender.answer_decoded`` then answers everything
queued in one forward pass, each query with its own ``k``, filters and ``match_predicted``.

Who runs a batch: the request threads themselves, one at a time (a leader). A thread that
queues its upload while no batch is running becomes the leader: it waits while other
requests are still decoding (they announced themselves on entering :meth:`QueryBatcher.query`),
at most ``max_wait_ms`` or until ``max_batch`` uploads are queued, then answers the queue's
first ``max_batch`` uploads. Uploads queued meanwhile wait; when the batch is done, one of
them leads the next. So a lone upload never waits and never changes threads (its path is the
unbatched one plus a lock), and there is no batching thread at all: nothing to start after
gunicorn's fork, nothing to stop.

A batch uses one bundle: each request brings the engine it holds (the web app keeps it fixed
for the request), and a batch is split by engine, one forward pass each, so a bundle swap
never mixes two bundles in one answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSettings:
    """How the batcher groups requests.

    Attributes:
        max_wait_ms: the longest the leader waits for requests still decoding to join its
            batch; 0 means no batching at all (each request runs its own forward pass).
        max_batch: the most uploads in one forward pass; 0 or 1 also means no batching.
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
        self.done = False
        self.answer: dict | None = None
        self.error: BaseException | None = None


class QueryBatcher:
    """Answers uploads from many threads with shared forward passes (see the module docstring).

    Args:
        settings: :class:`BatchSettings` (must be enabled).

    Attributes:
        listeners: called with the size of each forward pass the batcher ran (the web app
            counts them as Prometheus metrics).
        forward_passes: forward passes run so far.
        batched_queries: uploads answered through them.
    """

    def __init__(self, settings: BatchSettings):
        if not settings.enabled:
            raise ValueError(f"batching is off with {settings}; answer queries directly instead")
        self.settings = settings
        self.listeners: list[Callable[[int], None]] = []
        self.forward_passes = 0
        self.batched_queries = 0
        self._condition = threading.Condition()
        self._queue: list[_Job] = []
        self._arriving = 0
        self._running = False

    def query(self, engine, image, options) -> dict:
        """Decodes ``image`` in this thread, then answers it in a forward pass shared with concurrent uploads.

        Args:
            engine: the ``Recommender`` this request is answered with.
            image: encoded bytes, a path, a file object or ``ImageBytes``.
            options: ``QueryOptions`` from ``engine.query_options`` (already checked).

        Returns:
            The answer ``engine.query`` would give for this image and these options.

        Raises:
            InvalidImageError: the image cannot be read (this caller only; nothing is queued).
        """
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
            while not job.done:
                if self._running:
                    condition.wait()
                    continue
                self._running = True  # this thread leads the next batch
                try:
                    batch = self._collect()
                    condition.release()
                    try:
                        self._answer(batch)
                    finally:
                        condition.acquire()
                finally:
                    self._running = False
                    condition.notify_all()  # answered callers return; one of the others leads next
        if job.error is not None:
            raise job.error
        return job.answer

    def _collect(self) -> list[_Job]:
        """The leader's batch: waits (lock held by the caller) while requests are decoding, then takes the queue's head."""
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        while len(self._queue) < self.settings.max_batch and self._arriving > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._condition.wait(remaining)
        batch = self._queue[: self.settings.max_batch]
        del self._queue[: self.settings.max_batch]
        return batch

    def _answer(self, batch: list[_Job]) -> None:
        """Runs one forward pass per engine among ``batch`` and records each job's answer or error."""
        groups: dict[int, list[_Job]] = {}
        for job in batch:
            groups.setdefault(id(job.engine), []).append(job)
        try:
            for jobs in groups.values():
                self._answer_group(jobs)
        finally:
            for job in batch:  # never leave a caller waiting, whatever happened
                if job.answer is None and job.error is None:
                    job.error = RuntimeError("the query batcher failed to answer this request")
                job.done = True

    def _answer_group(self, jobs: list[_Job]) -> None:
        engine = jobs[0].engine
        try:
            answers = engine.answer_decoded([job.decoded for job in jobs], [job.options for job in jobs])
        except Exception as error:
            if len(jobs) == 1:
                jobs[0].error = error
                self._count(1)
                return
            # Something failed for the batch: answer each alone, so an error reaches only the
            # request it belongs to.
            log.warning("a batch of %d queries failed; answering them one by one", len(jobs), exc_info=True)
            for job in jobs:
                try:
                    job.answer = engine.answer_decoded([job.decoded], [job.options])[0]
                except Exception as alone:
                    job.error = alone
                self._count(1)
            return
        for job, answer in zip(jobs, answers):
            job.answer = answer
        self._count(len(jobs))

    def _count(self, size: int) -> None:
        self.forward_passes += 1
        self.batched_queries += size
        for listener in self.listeners:
            try:
                listener(size)
            except Exception:  # counting must never fail a request
                log.exception("a batch listener failed")
