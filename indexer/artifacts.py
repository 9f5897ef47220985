"""The artifact root: published bundles, the ``current`` pointer, the job lock, run logs, rollback, status.

Layout::

    ROOT/
      staging/<bundle id>/     a new bundle, written and waiting for its validation gate (never
                               offered by rollback or status' bundles; removed by the next run)
      bundles/<bundle id>/     bundles that passed the gate (immutable; ids sort by creation time)
      rejected/<bundle id>/    bundles that failed the validation gate, kept for inspection
      current -> bundles/<id>  the pointer the web app follows, swapped with os.replace
      published.jsonl          one line per publication (rebuild or rollback): what rollback may offer
      features.h5              the feature store shared across runs (+ features.h5.segments/)
      rebuild.lock             held (flock) by the running job; the kernel frees it if it dies
      runs/<run id>.json       one JSON log per run: phase, counts, timings, outcome

A bundle's life: built into ``staging/``, checked by the gate, then renamed into ``bundles/``
(:meth:`ArtifactRoot.promote`, one rename on the same file system) or into ``rejected/``;
:meth:`ArtifactRoot.publish` then swaps ``current`` and records the publication. Rollback
offers only bundles recorded as published (or the current one), so a bundle that never passed
its gate, whatever killed its run, is never published.

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
from recommender.files import atomic_write_bytes, atomic_write_json, storage_errors


class ArtifactRoot:
    """Paths and pointer operations of an artifact root (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.bundles = self.root / "bundles"
        self.staging = self.root / "staging"
        self.published_log = self.root / "published.jsonl"
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
        """Ids of the bundles in ``bundles/`` (those that passed a gate), oldest first."""
        return _folder_ids(self.bundles)

    def staged_ids(self) -> list[str]:
        """Ids of the bundles in ``staging/``: being validated, or left by a killed run."""
        return _folder_ids(self.staging)

    def rejected_ids(self) -> list[str]:
        """Ids of the bundles the gate refused, oldest first."""
        return _folder_ids(self.rejected)

    def staging_path(self, bundle_id: str) -> Path:
        """Where a rebuild writes its new bundle, before the gate (``staging/<bundle_id>``)."""
        return self.staging / bundle_id

    def publications(self) -> list[dict]:
        """The publication history, oldest first: ``{"bundle_id", "published_at", "run_id", "by"}``.

        A root from before ``published.jsonl`` existed gets its history from its run logs
        (each run that ended ``published`` names its bundle).

        Raises:
            PublishError: ``published.jsonl`` has a line that is not such a record.
        """
        if not self.published_log.exists():
            return [
                {"bundle_id": log["bundle_id"], "published_at": None, "run_id": log.get("run_id"), "by": "rebuild"}
                for log in self.run_logs()
                if log.get("state") == "published" and isinstance(log.get("bundle_id"), str)
            ]
        entries = []
        for number, line in enumerate(self.published_log.read_text(encoding="utf-8").splitlines(), 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get("bundle_id"), str):
                raise PublishError(f"{self.published_log} line {number}: not a publication record: {line[:80]!r}")
            entries.append(entry)
        return entries

    def published_ids(self) -> set[str]:
        """Ids of the bundles ever published here (recorded, or ``current`` itself)."""
        current = self.current_bundle()
        return {entry["bundle_id"] for entry in self.publications()} | ({current.name} if current else set())

    def run_logs(self) -> list[dict]:
        """Every readable run log, oldest first (an unreadable one is skipped)."""
        logs = []
        for path in sorted(self.runs.glob("*.json")) if self.runs.is_dir() else []:
            try:
                logs.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        return logs

    def promote(self, bundle_id: str) -> None:
        """Moves a bundle that passed its gate from ``staging/`` into ``bundles/`` (one rename)."""
        self.bundles.mkdir(parents=True, exist_ok=True)
        os.replace(self.staging_path(bundle_id), self.bundles / bundle_id)
        _fsync_directory(self.bundles)

    def publish(self, bundle_id: str, *, run_id: str | None = None, by: str = "rebuild") -> None:
        """Points ``current`` at ``bundles/<bundle_id>`` atomically (new symlink + os.replace)
        and records the publication in ``published.jsonl``.

        Args:
            bundle_id: a bundle in ``bundles/``.
            run_id: the run that publishes it (None for a rollback).
            by: ``rebuild`` or ``rollback``.
        """
        target = self.bundles / bundle_id
        if not (target / "manifest.json").is_file():
            raise PublishError(f"no complete bundle {bundle_id} in {self.bundles}")
        history = self.publications()
        temp = self.root / f".current.{uuid.uuid4().hex[:8]}.tmp"
        os.symlink(Path("bundles") / bundle_id, temp)
        checkpoint("publish")  # the new link exists but is not yet current
        os.replace(temp, self.current)
        _fsync_directory(self.root)
        # Recorded once it is true; a kill in between leaves it current, which counts as published.
        history.append(
            {
                "bundle_id": bundle_id,
                "published_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "run_id": run_id,
                "by": by,
            }
        )
        self.write_publications(history)

    def write_publications(self, history: list[dict]) -> None:
        """Rewrites ``published.jsonl`` atomically with ``history``."""
        text = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in history)
        atomic_write_bytes(self.published_log, text.encode("utf-8"))

    def record_current(self) -> str | None:
        """Records ``current`` as published if a killed run swapped it but did not record it."""
        current = self.current_bundle()
        if current is None:
            return None
        history = self.publications()
        if current.name in {entry["bundle_id"] for entry in history}:
            return None
        history.append({"bundle_id": current.name, "published_at": None, "run_id": None, "by": "rebuild"})
        self.write_publications(history)
        return current.name

    def reject(self, bundle_id: str) -> None:
        """Moves ``staging/<bundle_id>`` to ``rejected/`` (kept for inspection, never published)."""
        self.rejected.mkdir(parents=True, exist_ok=True)
        os.replace(self.staging_path(bundle_id), self.rejected / bundle_id)

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
        """Removes what a killed run left: staged bundles (whole or half-written), temp symlinks.

        Call it holding the job lock: no other run can be staging then.
        """
        found = []
        for path in sorted(self.staging.iterdir()) if self.staging.is_dir() else []:
            shutil.rmtree(path, ignore_errors=True)
            found.append(f"staging/{path.name}")
        # Temp folders of bundles built in place by earlier versions.
        for path in (
            list(self.bundles.glob(".*.tmp-*")) + list(self.bundles.glob(".*.old-*")) if self.bundles.is_dir() else []
        ):
            shutil.rmtree(path, ignore_errors=True)
            found.append(path.name)
        for path in self.root.glob(".current.*.tmp"):
            path.unlink(missing_ok=True)
            found.append(path.name)
        return found


def _folder_ids(folder: Path) -> list[str]:
    """Names of the sub-folders of ``folder`` that are not temp folders (dot names), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


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
        holder = f"pid {os.getpid()} since {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}"
        with storage_errors(root.lock_path):
            handle.seek(0)
            handle.truncate()
            # Unbuffered: a failed write must not be retried (and raised again) by close().
            os.write(handle.fileno(), holder.encode())
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
    """Points ``current`` back at an earlier published bundle (default: the newest one older than current).

    Only bundles recorded as published (``published.jsonl``) are offered: never one that is
    staged, was refused, or sits in ``bundles/`` without a record of passing its gate.

    Raises:
        JobLockedError: a rebuild is running.
        PublishError: no such published bundle, or nothing older to roll back to.
        BundleError: the target bundle does not verify.
    """
    artifacts = ArtifactRoot(root)
    with job_lock(artifacts):
        current = artifacts.current_bundle()
        published = artifacts.published_ids()
        ids = [bundle_id for bundle_id in artifacts.bundle_ids() if bundle_id in published]
        if to is None:
            older = [i for i in ids if current is None or i < current.name]
            if not older:
                raise PublishError(
                    f"no published bundle older than {current.name if current else 'none'} to roll back to; "
                    f"published: {', '.join(ids) or 'none'}"
                )
            to = older[-1]
        if to not in ids:
            raise PublishError(
                f"no published bundle {to!r} in {artifacts.bundles} (only bundles that passed the gate and were "
                f"published can be rolled back to); published: {', '.join(ids) or 'none'}"
            )
        verify_bundle(artifacts.bundles / to)
        artifacts.publish(to, by="rollback")
        return {"current": to, "previous": current.name if current else None}


def status(root: str | os.PathLike, runs: int = 5) -> dict:
    """What is published, what is on disk, the lock, and the last runs (JSON-ready).

    ``bundles`` lists ``bundles/`` with ``published`` (whether rollback may offer it);
    ``staged`` the bundles in ``staging/`` (``waiting for its gate`` while a run holds the lock,
    else ``left by an interrupted run``, removed by the next run); ``rejected`` the refused ones.
    """
    artifacts = ArtifactRoot(root)
    if not artifacts.root.is_dir():
        raise PublishError(f"artifact root not found: {artifacts.root}")
    current = artifacts.current_bundle()
    published = artifacts.published_ids()
    bundles = []
    for bundle_id in artifacts.bundle_ids():
        entry = {
            "id": bundle_id,
            "current": current is not None and current.name == bundle_id,
            "published": bundle_id in published,
        }
        try:
            manifest = read_manifest(artifacts.bundles / bundle_id)
            entry.update(items=manifest.counts.items, created_at=manifest.created_at)
        except BundleError as error:
            entry.update(error=str(error))
        bundles.append(entry)
    logs = artifacts.run_logs()[-runs:]
    holder = lock_holder(artifacts)
    for entry in logs:
        if entry.get("state") == "running" and holder is None:
            entry["state"] = "interrupted"  # its process is gone: the lock is free
    staged_state = "waiting for its gate" if holder else "left by an interrupted run"
    return {
        "root": str(artifacts.root),
        "current": current.name if current else None,
        "bundles": bundles,
        "staged": [{"id": bundle_id, "state": staged_state} for bundle_id in artifacts.staged_ids()],
        "rejected": artifacts.rejected_ids(),
        "lock": holder,
        "runs": logs,
    }
