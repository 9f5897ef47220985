"""The built wheel carries every module, template and static file the three packages need."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("recommender", "indexer", "webapp")


def test_wheel_ships_every_module_template_and_static_file(tmp_path):
    # Build from a clean copy: an in-tree build/ folder could hide a file the wheel would miss.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("recommender-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    needed = {
        path.relative_to(source).as_posix()
        for package in PACKAGES
        for path in (source / package).rglob("*")
        if path.is_file()
    }
    assert {"webapp/templates/index.html", "webapp/static/style.css", "indexer/templates/report.html"} <= needed
    assert sorted(needed - shipped) == []


def _requirements_script():
    """The .ci/requirements.py module (a script, not a package: loaded by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ci_requirements", ROOT / ".ci" / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requirements_files_are_the_ones_pyproject_generates():
    script = _requirements_script()
    assert script.stale(ROOT) == [], "edit pyproject.toml, then run: python .ci/requirements.py"


def test_requirements_check_names_a_file_that_disagrees_with_pyproject(tmp_path):
    script = _requirements_script()
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for name, text in script.render((ROOT / "pyproject.toml").read_text(encoding="utf-8")).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert script.stale(tmp_path) == []
    # A dependency added to requirements.txt by hand (the drift this guards against).
    with open(tmp_path / "requirements.txt", "a", encoding="utf-8") as file:
        file.write("requests>=2\n")
    assert script.stale(tmp_path) == ["requirements.txt"]


def test_dependencies_serve_evaluate_and_pin_keras_past_its_safe_mode_cves():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = {Requirement(line).name: Requirement(line) for line in project["dependencies"]}
    # `serve` under gunicorn, `evaluate`'s plots and /metrics need these after a plain `pip install`.
    assert {"gunicorn", "matplotlib", "prometheus-client"} <= set(runtime)
    assert set(project.get("optional-dependencies", {})) == {"dev"}
    keras = runtime["keras"].specifier
    # CVE-2025-8747/-9906: <= 3.10; CVE-2026-1462: < 3.12.1 and 3.13.0-3.13.1.
    assert not any(keras.contains(version) for version in ("3.10.0", "3.11.3", "3.12.0", "3.13.1"))
    assert keras.contains("3.15.1")
    gpu = (ROOT / "requirements-gpu.txt").read_text(encoding="utf-8").splitlines()
    assert "tensorflow[and-cuda]>=2.20,<2.22" in gpu and "faiss-gpu-cu12>=1.9" in gpu
    assert not any(line.startswith(("faiss-cpu", "tensorflow>")) for line in gpu)
