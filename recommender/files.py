"""Writing files so that a reader (or a killed job) sees the old file or the new one, never half of one.

:func:`atomic_write` is the one routine: the content goes to a temporary sibling (same folder,
so the rename cannot cross file systems), is flushed to disk, and replaces the target with
``os.replace``; on any error the temporary file is removed and the target is untouched.
Bundles, whole directories, are written the same way by ``recommender.bundle.write_bundle``.

A full disk (``ENOSPC``) or an exceeded quota (``EDQUOT``) while writing is a
:class:`~recommender.errors.StorageError` naming the path (:func:`storage_errors`), not a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from recommender.errors import StorageError

#: errno values that mean "no room to write": disk full, quota exceeded.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def storage_error(error: BaseException, path: str | os.PathLike | None = None) -> StorageError | None:
    """The :class:`StorageError` an ``OSError`` of a full disk or quota stands for, else None.

    Args:
        error: any exception.
        path: what was being written (default: the error's own file name).
    """
    if not isinstance(error, OSError) or error.errno not in NO_SPACE_ERRNOS:
        return None
    where = path if path is not None else error.filename
    reason = "no space left on device" if error.errno == errno.ENOSPC else "disk quota exceeded"
    if where is None:
        return StorageError(f"{reason}; free some space and run again")
    return StorageError(f"{reason} writing {where}; free some space and run again", str(where))


@contextmanager
def storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turns a full disk or quota while writing ``path`` into a :class:`StorageError`; other errors pass."""
    try:
        yield
    except OSError as error:
        typed = storage_error(error, path)
        if typed is None:
            raise
        raise typed from None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, durable: bool = True) -> Path:
    """Writes a file through ``write(temp_path)``, then renames it onto ``path``.

    Args:
        path: the file to create or replace.
        write: writes the complete content to the temporary path it is given (e.g. an
            ``h5py.File`` opened there, or ``Path.write_bytes``).
        durable: fsync the file before the rename (what survives a power cut, not only a kill).

    Returns:
        ``path``.

    Raises:
        StorageError: the disk is full or the quota exceeded (the target is untouched).
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with storage_errors(path):
            write(temp)
            if durable:
                with open(temp, "rb") as handle:
                    os.fsync(handle.fileno())
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda temp: temp.write_bytes(data), durable=durable)


def atomic_write_json(path: str | os.PathLike, payload, *, durable: bool = True, default=None) -> Path:
    """Writes ``payload`` as indented UTF-8 JSON with a trailing newline, atomically.

    Args:
        path: the file.
        payload: JSON-ready data.
        durable: as for :func:`atomic_write`.
        default: ``json.dumps``'s ``default`` for values JSON cannot hold (e.g. ``str``).
    """
    text = json.dumps(payload, indent=2, ensure_ascii=False, default=default) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)
