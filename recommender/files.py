"""Writing files so that a reader (or a killed job) sees the old file or the new one, never half of one.

:func:`atomic_write` is the one routine: the content goes to a temporary sibling (same folder,
so the rename cannot cross file systems), is flushed to disk, and replaces the target with
``os.replace``; on any error the temporary file is removed and the target is untouched.
Bundles, whole directories, are written the same way by ``recommender.bundle.write_bundle``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, durable: bool = True) -> Path:
    """Writes a file through ``write(temp_path)``, then renames it onto ``path``.

    Args:
        path: the file to create or replace.
        write: writes the complete content to the temporary path it is given (e.g. an
            ``h5py.File`` opened there, or ``Path.write_bytes``).
        durable: fsync the file before the rename (what survives a power cut, not only a kill).

    Returns:
        ``path``.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
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
