"""Writes requirements.txt, requirements-gpu.txt and requirements-dev.txt from pyproject.toml.

pyproject.toml is the one list of dependencies; the requirements files exist for the README's
install commands (``pip install -r requirements-dev.txt -e .``) and for GPU machines, whose
TensorFlow and FAISS packages have other names. Usage, from the repository root:

    python .ci/requirements.py          # rewrite the three files
    python .ci/requirements.py --check  # exit 1, naming the stale files, when they disagree

tests/test_package.py runs the check, so a dependency changed in one place only fails the suite.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: On GPU machines these packages are replaced (same version range, other distribution).
GPU_SWAPS = {"tensorflow": "tensorflow[and-cuda]", "faiss-cpu": "faiss-gpu-cu12"}

GENERATED = "# Generated from pyproject.toml by .ci/requirements.py: edit pyproject.toml, then rerun it."
HEADERS = {
    "requirements.txt": ["# Runtime (CPU). GPU builds: requirements-gpu.txt"],
    "requirements-gpu.txt": [
        "# GPU builds, instead of the CPU packages in requirements.txt (Linux x86_64, CUDA 12):",
        "#   pip install -r requirements-gpu.txt && pip install --no-deps .",
        "# TensorFlow with its CUDA libraries, and the FAISS GPU wheel (replaces faiss-cpu; do not",
        "# install both). FAISS moves flat indexes to the GPU when faiss.get_num_gpus() > 0.",
    ],
    "requirements-dev.txt": ["# Tests, lint, browser tests, API fuzzing (pyproject's `dev` extra)"],
}


def _name(requirement: str) -> str:
    """The distribution name a requirement string starts with, e.g. ``h5py`` of ``h5py>=3.10,<3.15``."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(0)


def render(pyproject_text: str) -> dict[str, str]:
    """The three requirements files' text, from pyproject.toml's text.

    Args:
        pyproject_text: the contents of pyproject.toml.

    Returns:
        ``{file name: contents}`` for requirements.txt, requirements-gpu.txt, requirements-dev.txt.
    """
    project = tomllib.loads(pyproject_text)["project"]
    runtime = list(project["dependencies"])
    dev = list(project.get("optional-dependencies", {}).get("dev", []))
    gpu = [GPU_SWAPS.get(_name(line), _name(line)) + line[len(_name(line)) :] for line in runtime]
    missing = set(GPU_SWAPS) - {_name(line) for line in runtime}
    if missing:
        raise ValueError(f"GPU_SWAPS names packages pyproject no longer lists: {sorted(missing)}")
    bodies = {
        "requirements.txt": runtime,
        "requirements-gpu.txt": gpu,
        "requirements-dev.txt": ["-r requirements.txt", *dev],
    }
    return {name: "\n".join([GENERATED, *HEADERS[name], *lines]) + "\n" for name, lines in bodies.items()}


def stale(root: Path = ROOT) -> list[str]:
    """The requirements files under ``root`` that differ from what pyproject.toml says (or are absent)."""
    wanted = render((root / "pyproject.toml").read_text(encoding="utf-8"))
    return [
        name
        for name, text in wanted.items()
        if not (root / name).is_file() or (root / name).read_text(encoding="utf-8") != text
    ]


def main(argv: list[str] | None = None) -> int:
    """Rewrites the requirements files, or with ``--check`` reports the stale ones; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    if args.check:
        names = stale()
        if names:
            print(f"error: stale, rerun python .ci/requirements.py: {', '.join(names)}", file=sys.stderr)
            return 1
        return 0
    for name, text in render((ROOT / "pyproject.toml").read_text(encoding="utf-8")).items():
        partial = ROOT / f".{name}.partial"
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, ROOT / name)  # a reader never sees half a file
    return 0


if __name__ == "__main__":
    sys.exit(main())
