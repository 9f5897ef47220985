"""Shared fixtures: generated catalogs, bad images, the session's small bundles, the benchmarks' --quick runs.

The tiny bundle uses the real pipeline end to end with a small real backbone: ResNet50 with
random-init weights (``--weights none``) at 64 px, on generated patterned T-shirts that such
features can tell apart.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[2] / "shared"
CLOTHING = SHARED / "datasets" / "clothing-small"
MOBILENET = SHARED / "models" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"

TINY_SIZE = 64
TINY_PATTERNS = ("plain", "stripes", "dots", "checks")
TINY_COLOURS = ("red", "blue", "black")
TINY_PER_CLASS = 8


def tiny_build_config(feature_store: Path):
    """Build settings of the session's tiny bundle (small, fast, real pipeline)."""
    from recommender.backbones import BackboneSpec
    from recommender.classifier import TrainConfig
    from recommender.config import BuildConfig

    return replace(
        BuildConfig(),
        id_column="id",
        label_columns=("label", "colour"),
        backbone=BackboneSpec(name="resnet50", weights="none", input_size=TINY_SIZE, seed=0),
        train=TrainConfig(max_epochs=12, patience=3, dropout=0.5, learning_rate=1e-3),
        feature_store=feature_store,
    )


@pytest.fixture(scope="session")
def generated_catalog(tmp_path_factory) -> Path:
    """A generated catalog: 4 patterns x 3 colours x 8 images, 64 px JPEGs; returns catalog.csv."""
    from recommender.synthetic import generate_catalog

    folder = tmp_path_factory.mktemp("catalog")
    return generate_catalog(
        folder, per_class=TINY_PER_CLASS, patterns=TINY_PATTERNS, colours=TINY_COLOURS, size=TINY_SIZE, seed=1
    )


@pytest.fixture(scope="session")
def session_store(tmp_path_factory) -> Path:
    """The feature store shared by the session's builds."""
    return tmp_path_factory.mktemp("store") / "features.h5"


@pytest.fixture(scope="session")
def tiny_config(session_store):
    """Build settings of the tiny bundle."""
    return tiny_build_config(session_store)


@pytest.fixture(scope="session")
def tiny_build(generated_catalog, tiny_config, tmp_path_factory):
    """Builds the session's tiny bundle once; returns ``(bundle path, BuildReport)``."""
    from indexer.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    report = build_bundle(generated_catalog, out, tiny_config)
    return out, report


@pytest.fixture(scope="session")
def tiny_bundle(tiny_build) -> Path:
    """Path of the session's tiny bundle (do not modify it: copy it first)."""
    return tiny_build[0]


@pytest.fixture(scope="session")
def engine(tiny_bundle):
    """The tiny bundle loaded once as a query engine."""
    from recommender.engine import load_bundle

    return load_bundle(tiny_bundle)


def attribute_build_config(feature_store: Path, hierarchy_mode: str = "hierarchical"):
    """The tiny bundle's settings plus the generated catalog's taxonomy and tags.

    Columns: ``label`` (primary: the taxonomy's leaf), ``colour``, and the hierarchy
    ``department > family > label``; tags from the ``tags`` column (one sigmoid head).
    """
    return replace(
        tiny_build_config(feature_store),
        label_columns=("label", "colour"),
        hierarchy=ATTRIBUTE_HIERARCHY,
        hierarchy_mode=hierarchy_mode,
        tags_column="tags",
    )


ATTRIBUTE_HIERARCHY = ("department", "family", "label")


@pytest.fixture(scope="session")
def attribute_build(generated_catalog, session_store, tmp_path_factory):
    """A bundle of the generated catalog with hierarchy and tags (features come from the
    session store, so this costs one training); returns ``(bundle path, BuildReport)``."""
    from indexer.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "attributes"
    report = build_bundle(generated_catalog, out, attribute_build_config(session_store))
    return out, report


@pytest.fixture(scope="session")
def combined_cli_build(generated_catalog, session_store, tmp_path_factory) -> tuple[Path, int, str]:
    """The attribute catalog built through the CLI with one combined head over full paths
    (shared by the CLI and evaluate tests: one training); returns ``(bundle, exit code, stderr)``."""
    import contextlib
    import io

    from recommender.cli import main

    out = tmp_path_factory.mktemp("bundles") / "combined"
    common = ["--id-column", "id", "--weights", "none", "--image-size", "64", "--feature-store", str(session_store)]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(
            ["build", "--catalog", str(generated_catalog), "--out", str(out), *common, "--label-column", "label",
             "--label-column", "colour", "--hierarchy", "department>family>label", "--hierarchy-mode", "combined",
             "--tags-column", "tags", "--epochs", "12"]
        )  # fmt: skip
    return out, code, stderr.getvalue()


@pytest.fixture(scope="session")
def attribute_bundle(attribute_build) -> Path:
    """Path of the session's hierarchy + tags bundle (do not modify it)."""
    return attribute_build[0]


@pytest.fixture(scope="session")
def attribute_engine(attribute_bundle):
    """The hierarchy + tags bundle loaded once as a query engine."""
    from recommender.engine import load_bundle

    return load_bundle(attribute_bundle)


@pytest.fixture(scope="session")
def tiny_backbone(engine):
    """The session bundle's backbone (random-init ResNet50 at 64 px)."""
    return engine.backbone


# -- images, good and bad ------------------------------------------------------------------


def _png_with_huge_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def _jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> dict[str, Path]:
    """Good images of every awkward kind plus bad files; name -> path.

    Good: ``rgb_jpeg``, ``cmyk_jpeg``, ``rgba_png`` (left half transparent), ``la_png``,
    ``palette_png`` (left half the transparent index, right half green), ``grey16_png`` (16-bit), ``exif_rotated``
    (stored 40x20 with orientation 6: upright it is 20x40, red on top), ``webp``, ``tiny``.
    Bad: ``zero_bytes``, ``truncated_jpeg``, ``text_file``, ``huge_png`` (header claims
    100,000 x 100,000 pixels), ``garbage``.
    """
    folder = tmp_path_factory.mktemp("images")
    files: dict[str, bytes] = {}
    rgb = Image.new("RGB", (80, 60), (30, 120, 200))
    files["rgb_jpeg"] = _jpeg_bytes(rgb)
    files["cmyk_jpeg"] = _jpeg_bytes(Image.new("CMYK", (50, 50), (0, 255, 255, 0)))  # pure red in CMYK
    rgba = Image.new("RGBA", (40, 40), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 40))
    files["rgba_png"] = _png_bytes(rgba)
    files["la_png"] = _png_bytes(Image.new("LA", (30, 30), (0, 0)))  # fully transparent black
    palette = Image.new("P", (30, 30), 1)
    palette.paste(0, (0, 0, 15, 30))  # left half: the transparent index
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.info["transparency"] = 0
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    files["palette_png"] = buffer.getvalue()
    grey16 = Image.fromarray(np.full((20, 20), 65535 // 2, dtype=np.uint16))
    files["grey16_png"] = _png_bytes(grey16)
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red: after rotating 90 deg clockwise it is the top
    exif = Image.Exif()
    exif[0x0112] = 6
    files["exif_rotated"] = _jpeg_bytes(stored, exif=exif.tobytes())
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 200, 0)).save(buffer, format="WEBP")
    files["webp"] = buffer.getvalue()
    files["tiny"] = _png_bytes(Image.new("RGB", (1, 1), (10, 20, 30)))
    files["zero_bytes"] = b""
    files["truncated_jpeg"] = _jpeg_bytes(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    )[:400]
    files["text_file"] = b"id,file,label\n1,a.jpg,shirt\n"
    files["huge_png"] = _png_with_huge_header(100_000, 100_000)
    files["garbage"] = bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8))
    suffix = {"webp": ".webp", "text_file": ".txt", "garbage": ".bin"}
    paths = {}
    for name, data in files.items():
        path = folder / f"{name}{suffix.get(name, '.png' if 'png' in name else '.jpg')}"
        path.write_bytes(data)
        paths[name] = path
    return paths


GOOD_IMAGES = (
    "rgb_jpeg",
    "cmyk_jpeg",
    "rgba_png",
    "la_png",
    "palette_png",
    "grey16_png",
    "exif_rotated",
    "webp",
    "tiny",
)
BAD_IMAGES = ("zero_bytes", "truncated_jpeg", "text_file", "huge_png", "garbage")


# -- the benchmarks' --quick runs ------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]

#: Every benchmark with a --quick run, in the order test_bench and test_bench_attributes ask for them.
QUICK_SCRIPTS = (
    "extraction",
    "search",
    "query",
    "multihead",
    "filtered",
    "quality",
    "hierarchy",
    "tags",
    "index_kinds",
    "panels",
    "ray_extraction",
)
#: The --quick runs that read ../shared (real photos, the shared backbone): not started without it.
QUICK_NEEDS_SHARED = {"quality", "ray_extraction"}
#: Seconds a --quick run may take (TensorFlow's import included); those that train models get longer.
QUICK_TIMEOUTS = {"quality": 300, "hierarchy": 180, "tags": 180, "multihead": 240}
#: --quick runs at a time. Each spends seconds importing TensorFlow and tracing models on one
#: thread, so two at a time keep both cores of a small machine busy.
QUICK_PARALLEL = 2


@dataclass(frozen=True)
class QuickRun:
    """One finished ``bench/<script>.py --quick``: exit code, output, and its JSON as read right after."""

    script: str
    started: float
    returncode: int
    stdout: str
    stderr: str
    mtime: float | None
    json_text: str | None


def start_quick_run(script: str) -> QuickRun:
    """Runs ``bench/<script>.py --quick`` to the end (in a worker thread of :func:`quick_runs`)."""
    started = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{script}.py"), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=QUICK_TIMEOUTS.get(script, 120),
        cwd=ROOT,
    )
    path = ROOT / "bench" / "results" / f"{script}-quick.json"
    present = path.is_file()
    return QuickRun(
        script,
        started,
        done.returncode,
        done.stdout,
        done.stderr,
        path.stat().st_mtime if present else None,
        path.read_text() if present else None,
    )


@pytest.fixture(scope="session")
def quick_runs(request):
    """The --quick runs of the benchmarks this session selected, started at once, QUICK_PARALLEL at a time.

    Returns script -> a future of its :class:`QuickRun`. Those in QUICK_NEEDS_SHARED are not
    started when ../shared is absent: their tests skip.
    """
    selected = {item.name for item in request.session.items}
    shared = shared_present()
    scripts = [s for s in QUICK_SCRIPTS if f"test_{s}_quick" in selected and (shared or s not in QUICK_NEEDS_SHARED)]
    pool = ThreadPoolExecutor(max_workers=QUICK_PARALLEL, thread_name_prefix="bench-quick")
    request.addfinalizer(lambda: pool.shutdown(wait=True, cancel_futures=True))
    return {script: pool.submit(start_quick_run, script) for script in scripts}


#: The longest modules (minutes each on two cores), collected first: pytest-xdist hands out whole
#: modules (``--dist loadfile``) in collection order, so these start at once instead of ending the
#: run one after another on a single worker while the others sit idle.
LONGEST_FIRST = (
    "test_real_data",
    "test_ray_engine",
    "test_ray_memory",
    "test_rebuild",
    "test_rebuild_gate",
    "test_rebuild_kill",
    "test_demo",
)


def pytest_collection_modifyitems(config, items):
    """Moves the LONGEST_FIRST modules to the front (a stable sort: each module keeps its order)."""
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}

    def module_rank(item) -> int:
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        return rank.get(module, len(rank))

    items.sort(key=module_rank)


def prometheus_sample(exposition: str, name: str, **labels) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    import re

    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    selector = rf"\{{{re.escape(wanted)}\}}" if labels else ""  # a metric without labels has no braces
    match = re.search(rf"^{re.escape(name)}{selector} ([0-9.e+]+)$", exposition, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def shared_present() -> bool:
    """Whether ../shared (the clothing-small photos and the MobileNet model) is here."""
    return CLOTHING.is_dir() and MOBILENET.is_file()


def skip_without_shared():
    """Skips a real-data test when ../shared (datasets and models) is absent."""
    if not shared_present():
        pytest.skip(f"real-data test needs {CLOTHING} and {MOBILENET} (the ../shared folder)")
