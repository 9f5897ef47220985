"""The artifact root: published bundles, the ``current`` pointer, the job lock, run logs, rollback, status.

Layout::

    ROOT/
      bundles/<bundle id>/     immutable bundles (ids sort by creation time)
      bundles/.<id>.tmp-*      a bundle being written (never published; removed by the next run)
      rejected/<bundle id>/    bundles that failed the validation gate, kept for inspection
      current -> bundles/<id>  the pointer the web app follows, swapped with os.replace
      features.h5              the feature store shared across runs (+ features.h5.segments/)
      rebuild.lock             held (flock) by the running job; the kernel frees it if it dies
      runs/<run id>.json       one JSON log per run: phase, counts, timings, outcome

Whatever happens to a job (an error, SIGKILL at any moment), ``current`` points to a
complete, verified bundle: :meth:`ArtifactRoot.publish` only ever replaces it, in one
``os.replace``, with a new symlink to a bundle whose manifest is on disk. What to publish
(the nightly policy) is :mod:`indexer.rebuild`'s business.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recommender.bundle import read_manifest, verify_bundle
from recommender.checkpoints import checkpoint
from recommender.errors import BundleError, JobLockedError, PublishError
from recommender.files import atomic_write_json


class ArtifactRoot:
    """Paths and pointer operations of an artifact root (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.bundles = self.root / "bundles"
        self.rejected = self.root / "rejected"
        self.current = self.root / "current"
        self.feature_store = self.root / "features.h5"
        self.lock_path = self.root / "rebuild.lock"
        self.runs = self.root / "runs"

    def current_bundle(self) -> Path | None:
        """The bundle ``current`` points to, or None before the first publish.

        Raises:
            PublishError: ``current`` exists but is not a symlink into ``bundles/``.
        """
        if not os.path.lexists(self.current):
            return None
        if not self.current.is_symlink():
            raise PublishError(f"{self.current} is not a symlink; the rebuild job manages it as one")
        target = (self.current.parent / os.readlink(self.current)).resolve()
        if target.parent != self.bundles.resolve():
            raise PublishError(f"{self.current} points outside {self.bundles}: {target}")
        return target

    def bundle_ids(self) -> list[str]:
        """Ids of the complete bundles, oldest first."""
        if not self.bundles.is_dir():
            return []
        return sorted(p.name for p in self.bundles.iterdir() if p.is_dir() and not p.name.startswith("."))

    def publish(self, bundle_id: str) -> None:
        """Points ``current`` at ``bundles/<bundle_id>`` atomically (new symlink + os.replace)."""
        target = self.bundles / bundle_id
        if not (target / "manifest.json").is_file():
            raise PublishError(f"no complete bundle {bundle_id} in {self.bundles}")
        temp = self.root / f".current.{uuid.uuid4().hex[:8]}.tmp"
        os.symlink(Path("bundles") / bundle_id, temp)
        checkpoint("publish")  # the new link exists but is not yet current
        os.replace(temp, self.current)
        _fsync_directory(self.root)

    def reject(self, bundle_id: str) -> None:
        """Moves ``bundles/<bundle_id>`` to ``rejected/`` (kept for inspection, never published)."""
        self.rejected.mkdir(parents=True, exist_ok=True)
        os.replace(self.bundles / bundle_id, self.rejected / bundle_id)

    def prune(self, keep: int) -> list[str]:
        """Removes the oldest bundles beyond ``keep`` (never the current one); returns their ids."""
        current = self.current_bundle()
        current_id = current.name if current else None
        ids = self.bundle_ids()
        removable = [i for i in ids if i != current_id]
        excess = len(ids) - max(keep, 1)
        removed = []
        for bundle_id in removable[: max(excess, 0)]:
            shutil.rmtree(self.bundles / bundle_id, ignore_errors=True)
            removed.append(bundle_id)
        return removed

    def remove_leftovers(self) -> list[str]:
        """Removes what a killed run left: half-written bundles and temp symlinks."""
        found = []
        for path in (
            list(self.bundles.glob(".*.tmp-*")) + list(self.bundles.glob(".*.old-*")) if self.bundles.is_dir() else []
        ):
            shutil.rmtree(path, ignore_errors=True)
            found.append(path.name)
        for path in self.root.glob(".current.*.tmp"):
            path.unlink(missing_ok=True)
            found.append(path.name)
        return found


def _fsync_directory(path: Path) -> None:
    """Makes a rename in ``path`` durable (best effort where directories cannot be opened)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


@contextmanager
def job_lock(root: ArtifactRoot) -> Iterator[None]:
    """Holds the root's lock for one job; a second job gets :class:`JobLockedError`.

    ``flock`` locks belong to the open file: when the holder dies, even by SIGKILL, the kernel
    releases it, so a crashed run never leaves the lock stuck.
    """
    root.root.mkdir(parents=True, exist_ok=True)
    handle = open(root.lock_path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise JobLockedError(f"another rebuild is running on {root.root} ({holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
        handle.flush()
        yield
    finally:
        handle.close()


def lock_holder(root: ArtifactRoot) -> str | None:
    """Who holds the lock now (None when free)."""
    if not root.lock_path.exists():
        return None
    with open(root.lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            return handle.read().strip() or "unknown"
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


class RunLog:
    """The JSON log of one run, rewritten atomically at every phase."""

    def __init__(self, root: ArtifactRoot):
        self.run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
        self.path = root.runs / f"{self.run_id}.json"
        self.started = time.perf_counter()
        self.phase_started = self.started
        self.data: dict = {
            "run_id": self.run_id,
            "state": "running",
            "phase": "start",
            "pid": os.getpid(),
            "seconds": {},
        }
        root.runs.mkdir(parents=True, exist_ok=True)
        self.write()

    def phase(self, name: str) -> None:
        """Records the end of the previous phase and the start of ``name``."""
        now = time.perf_counter()
        self.data["seconds"][self.data["phase"]] = round(now - self.phase_started, 3)
        self.phase_started = now
        self.data["phase"] = name
        self.write()

    def finish(self, state: str, **fields) -> dict:
        """Ends the run with ``state`` (published, unchanged, refused, failed)."""
        self.phase("end")
        self.data.update(fields, state=state, total_seconds=round(time.perf_counter() - self.started, 3))
        self.write()
        return self.data

    def write(self) -> None:
        atomic_write_json(self.path, self.data, default=str)


def rollback(root: str | os.PathLike, to: str | None = None) -> dict:
    """Points ``current`` back at an earlier bundle (default: the newest one older than current).

    Raises:
        JobLockedError: a rebuild is running.
        PublishError: no such bundle, or nothing older to roll back to.
        BundleError: the target bundle does not verify.
    """
    artifacts = ArtifactRoot(root)
    with job_lock(artifacts):
        current = artifacts.current_bundle()
        ids = artifacts.bundle_ids()
        if to is None:
            older = [i for i in ids if current is None or i < current.name]
            if not older:
                raise PublishError(
                    f"no bundle older than {current.name if current else 'none'} to roll back to; bundles: {', '.join(ids) or 'none'}"
                )
            to = older[-1]
        if to not in ids:
            raise PublishError(f"no bundle {to!r} in {artifacts.bundles}; bundles: {', '.join(ids) or 'none'}")
        verify_bundle(artifacts.bundles / to)
        artifacts.publish(to)
        return {"current": to, "previous": current.name if current else None}


def status(root: str | os.PathLike, runs: int = 5) -> dict:
    """What is published, what is on disk, the lock, and the last runs (JSON-ready)."""
    artifacts = ArtifactRoot(root)
    if not artifacts.root.is_dir():
        raise PublishError(f"artifact root not found: {artifacts.root}")
    current = artifacts.current_bundle()
    bundles = []
    for bundle_id in artifacts.bundle_ids():
        try:
            manifest = read_manifest(artifacts.bundles / bundle_id)
            bundles.append(
                {
                    "id": bundle_id,
                    "items": manifest.counts.items,
                    "created_at": manifest.created_at,
                    "current": current is not None and current.name == bundle_id,
                }
            )
        except BundleError as error:
            bundles.append({"id": bundle_id, "error": str(error), "current": False})
    logs = []
    for path in sorted(artifacts.runs.glob("*.json"))[-runs:] if artifacts.runs.is_dir() else []:
        try:
            logs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    holder = lock_holder(artifacts)
    for entry in logs:
        if entry.get("state") == "running" and holder is None:
            entry["state"] = "interrupted"  # its process is gone: the lock is free
    return {
        "root": str(artifacts.root),
        "current": current.name if current else None,
        "bundles": bundles,
        "lock": holder,
        "runs": logs,
    }
