"""The built wheel carries every module, template and static file the three packages need."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("recommender", "indexer", "webapp")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built once from a clean copy of the source (returns the .whl path)."""
    # A clean copy: an in-tree build/ folder could hide a file the wheel would miss.
    tmp_path = tmp_path_factory.mktemp("wheel")
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
    (built_wheel,) = tmp_path.glob("recommender-*.whl")
    return built_wheel


def test_wheel_ships_every_module_template_and_static_file(wheel):
    source = wheel.parent / "source"  # the clean copy it was built from
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


def _serve(command: list[str], cwd: Path, env: dict, timeout_s: float = 300) -> tuple[subprocess.Popen, list[str]]:
    """Starts a server; returns it and its stdout lines up to the one with its URL (or fails).

    A reader thread hands over whole lines: polling the pipe with select and then calling
    readline() would leave a second line that arrived in the same chunk in the file's buffer,
    unseen, until the deadline.
    """
    import queue
    import threading
    import time

    server = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    received: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [received.put(line) for line in server.stdout], daemon=True).start()
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not any(line.startswith("open http://") for line in lines):
        try:
            lines.append(received.get(timeout=1))
        except queue.Empty:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the server did not start: {lines} {server.communicate()[1][-3000:]}")
    return server, lines


def test_installed_wheel_not_the_checkout_serves_page_static_file_and_upload(wheel, tiny_bundle, image_files, tmp_path):
    import json
    import os
    import urllib.request
    import uuid

    # The wheel's files alone, not editable (dependencies come from the dev venv's site-packages,
    # which the fresh directory shadows: PYTHONPATH comes before the editable install's finder).
    target = tmp_path / "installed"
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import sys, recommender, webapp; print('served from', webapp.__file__, recommender.__file__, flush=True); "
        "from recommender.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    server, lines = _serve(
        [sys.executable, "-c", code, "serve", "--bundle", str(tiny_bundle), "--host", "127.0.0.1", "--port", "0"],
        cwd=elsewhere,
        env=env,
    )
    try:
        served_from = next(line for line in lines if line.startswith("served from")).split()[2:]
        assert all(Path(path).is_relative_to(target) for path in served_from), served_from
        url = next(line for line in lines if line.startswith("open http://")).split()[1].rstrip("/")

        with urllib.request.urlopen(f"{url}/", timeout=60) as response:
            assert response.status == 200 and "<form" in response.read().decode()
        with urllib.request.urlopen(f"{url}/static/style.css", timeout=60) as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/css")
            assert response.read() == (target / "webapp" / "static" / "style.css").read_bytes()

        boundary = uuid.uuid4().hex
        photo = image_files["rgb_jpeg"].read_bytes()
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="shirt.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + photo
            + f"\r\n--{boundary}--\r\n".encode()
        )
        request = urllib.request.Request(
            f"{url}/api/v1/similar?k=3",
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
            assert len(json.loads(response.read())["neighbors"]) == 3
    finally:
        server.kill()
        server.communicate(timeout=30)
