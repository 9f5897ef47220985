"""Keeps TensorFlow's and TFLite's native start-up chatter off stderr, and their real errors on it.

TensorFlow 2.20+ prints C++ log lines straight to file descriptor 2 while it is imported (the
absl pre-init warning, oneDNN, CUDA probing, CPU instruction set) and TFLite prints ``INFO:
Created TensorFlow Lite XNNPACK delegate for CPU.`` when an interpreter first allocates. Lines
printed before absl is initialised ignore ``TF_CPP_MIN_LOG_LEVEL``, so setting it is not enough:
around those calls fd 2 is pointed at a temporary file, and afterwards the lines at or above
``TF_CPP_MIN_LOG_LEVEL`` (default 2 here: errors) are written back, everything when the call
failed. ``TF_CPP_MIN_LOG_LEVEL=0`` turns the filtering off.

:func:`install` (called by the CLI and by ``webapp``'s import) sets the environment defaults and
makes the first ``import tensorflow``, wherever it happens, run under :func:`native_log_filtered`;
it imports nothing itself, so commands that need no TensorFlow stay fast.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Environment defaults, set only where the user has not set them.
DEFAULT_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR"}

# absl/glog records: "I0000 00:00:1796247587.740522   15171 port.cc:153] oneDNN custom ..."
_GLOG_RECORD = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:[\d.]+\s+\d+ [^\s:]+:\d+\] ")
_GLOG_LEVEL = {"I": 0, "W": 1, "E": 2, "F": 3}
# TFLite's minimal logger, and absl's "WARNING: All log messages before absl::InitializeLog() ..."
_PREFIXED_RECORD = re.compile(r"^(INFO|WARNING|ERROR): ")
_PREFIXED_LEVEL = {"INFO": 0, "WARNING": 1, "ERROR": 2}
# On a machine without an NVIDIA driver TensorFlow says so (an INFO line), then logs cuInit's
# failure as an ERROR: that error is the expected consequence, not news.
_NO_DRIVER = "Could not find cuda drivers on your machine"
_CUINIT_FAILED = "failed call to cuInit"

_fd2_lock = threading.RLock()  # one redirection of fd 2 at a time: nested ones restore in order


def min_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as TensorFlow reads it (0 all, 1 no INFO, 2 no WARNING, 3 no ERROR)."""
    value = os.environ.get("TF_CPP_MIN_LOG_LEVEL", DEFAULT_ENVIRONMENT["TF_CPP_MIN_LOG_LEVEL"])
    return int(value) if value.strip().isdigit() else 0


def filter_native_log(text: str, min_level: int) -> str:
    """The lines of captured native output worth showing.

    A record (glog ``I0000 ...]`` or TFLite/absl ``INFO:``/``WARNING:``/``ERROR:``) is kept when its
    level is at least ``min_level``; a glog record's following lines that are not records
    themselves (its multi-line message) go with it; lines before any record, and any other
    output, are kept. cuInit's failure is dropped when the same output says there is no driver.

    Args:
        text: what was written to fd 2.
        min_level: 0 keeps everything, 1 drops INFO, 2 drops WARNING too, 3 drops ERROR too.

    Returns:
        The kept lines, each with its newline.
    """
    if min_level <= 0:
        return text
    no_driver = _NO_DRIVER in text
    kept: list[str] = []
    continuing = True  # whether a non-record line goes with the record above it
    for line in text.splitlines(keepends=True):
        glog, prefixed = _GLOG_RECORD.match(line), _PREFIXED_RECORD.match(line)
        if glog:
            level = _GLOG_LEVEL[glog.group(1)]
            continuing = level >= min_level and not (no_driver and _CUINIT_FAILED in line)
            if continuing:
                kept.append(line)
        elif prefixed:
            if _PREFIXED_LEVEL[prefixed.group(1)] >= min_level:
                kept.append(line)
            continuing = True  # TFLite and absl records are one line long
        elif continuing:
            kept.append(line)
    return "".join(kept)


@contextmanager
def native_log_filtered() -> Iterator[None]:
    """Captures what native code writes to fd 2 inside the block and writes back what is worth it.

    Everything captured is written back when the block raises (the lines may explain why). Other
    threads' stderr output during the block is delayed to its end, not lost.
    """
    min_level = min_log_level()
    if min_level <= 0:  # the user asked for every line
        yield
        return
    with _fd2_lock:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            failed = True
            try:
                yield
                failed = False
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                text = sink.read().decode(errors="replace")
                shown = text if failed else filter_native_log(text, min_level)
                if shown:
                    os.write(2, shown.encode())


class _QuietLoader(importlib.abc.Loader):
    """Runs the ``tensorflow`` package's import, and its first device query, under the filter."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with native_log_filtered():
            self._loader.exec_module(module)
            # CUDA is probed on the first device query, not at import: probe now, inside the filter.
            module.config.list_physical_devices("GPU")

    def __getattr__(self, name):  # get_resource_reader, get_source, is_package ...: the real loader's
        return getattr(self._loader, name)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as the path finder does, and hands its import to :class:`_QuietLoader`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _QuietLoader(spec.loader)
        return spec


_finder = _QuietTensorFlowFinder()


def install() -> None:
    """Sets the environment defaults and quiets TensorFlow's first import (idempotent, imports nothing).

    Call it at an entry point, before TensorFlow is imported: when it already is, only the
    environment defaults are set (they still quiet TensorFlow's later C++ logging).
    """
    for name, value in DEFAULT_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if "tensorflow" not in sys.modules and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
