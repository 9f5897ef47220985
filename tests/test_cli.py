"""The command line: JSON lines, exit codes 0/1/2, one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from recommender.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "recommender", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def test_query_prints_one_json_object_per_image(tiny_bundle, engine, capsys):
    paths = [engine.rows[0].path, engine.rows[40].path]
    assert main(["query", "--bundle", str(tiny_bundle), "--k", "4", *paths]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, paths):
        answer = json.loads(line)
        assert answer["image"] == path
        assert set(answer["predicted"]) == {"label", "colour"}
        assert set(answer["predicted"]["label"]) == {"label", "probability"}
        assert len(answer["neighbors"]) == 4
        assert all(set(n) == {"id", "distance", "labels", "image", "title"} for n in answer["neighbors"])
        assert engine.item(answer["neighbors"][0]["id"])  # neighbours are catalog ids


def test_query_with_a_bad_image_reports_it_and_exits_1(tiny_bundle, engine, image_files, capsys):
    code = main(["query", "--bundle", str(tiny_bundle), str(image_files["truncated_jpeg"]), engine.rows[0].path])
    captured = capsys.readouterr()
    assert code == 1
    assert len(captured.out.strip().splitlines()) == 1  # the good image is still answered
    assert "truncated_jpeg.jpg: corrupt or truncated image" in captured.err


def test_usage_errors_exit_2(tiny_bundle, capsys):
    for argv in (
        ["query"],
        ["nonsense"],
        ["query", "--bundle", str(tiny_bundle), "--k", "0", "x.jpg"],
        ["build", "--catalog", "x.csv"],
    ):
        with pytest.raises(SystemExit) as caught:
            code = main(argv)
            raise SystemExit(code)
        assert caught.value.code == 2, argv


def test_data_errors_exit_1_with_one_line(tmp_path, capsys):
    assert main(["build", "--catalog", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "b")]) == 1
    assert capsys.readouterr().err.strip() == f"error: catalog not found: {tmp_path / 'missing.csv'}"
    assert main(["query", "--bundle", str(tmp_path), "x.jpg"]) == 1
    assert "no manifest.json" in capsys.readouterr().err


def test_subprocess_errors_have_no_traceback(tmp_path, generated_catalog):
    result = run_cli("build", "--catalog", generated_catalog, "--out", tmp_path / "b", "--label-column", "nope")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "missing column(s) nope" in result.stderr


def test_subprocess_build_then_query(tmp_path, generated_catalog, session_store):
    out = tmp_path / "bundle"
    build = run_cli(
        "build", "--catalog", generated_catalog, "--out", out, "--id-column", "id", "--label-column", "label",
        "--weights", "none", "--image-size", "64", "--feature-store", session_store, "--epochs", "5", "--no-flips",
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    summary = json.loads(build.stdout.strip().splitlines()[-1])
    assert summary["items"] == 96 and summary["bundle"] == str(out)
    # The build-time baseline: each head beside its probe, and retrieval in both spaces.
    assert re.search(
        r"(?m)^label: validation accuracy [\d.]+ \(probe [\d.]+\), macro-F1 [\d.]+ \(probe [\d.]+\)$", build.stderr
    )
    assert re.search(r"(?m)^P@6 on validation: embedding [\d.]+, raw features [\d.]+$", build.stderr)
    image = generated_catalog.parent / "images" / "dots-red-000.jpg"
    query = run_cli("query", "--bundle", out, image)
    assert query.returncode == 0, query.stderr
    answer = json.loads(query.stdout)
    assert "dots-red-000" not in [n["id"] for n in answer["neighbors"]] and len(answer["neighbors"]) == 6


def test_build_from_fashion_mnist_idx_files(tmp_path, session_store, capsys):
    import numpy as np
    from test_fashion_mnist import write_idx_dir

    rng = np.random.default_rng(0)
    arrays = {
        "train": (rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), (np.arange(40) % 10).astype(np.uint8)),
        "test": (rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), (np.arange(10) % 10).astype(np.uint8)),
    }
    idx = write_idx_dir(tmp_path / "idx", arrays, gzipped=True)
    argv = [
        "build",
        "--catalog",
        f"fashion-mnist:{idx}",
        "--out",
        str(tmp_path / "b"),
        "--split",
        "train",
        "--weights",
        "none",
    ]
    argv += ["--image-size", "32", "--feature-store", str(session_store), "--epochs", "2", "--no-flips"]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["items"] == 40
    labels = json.loads((tmp_path / "b" / "labels.json").read_text())
    assert labels["classes"][0] == sorted(
        ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    )
    assert (idx / "catalog" / "catalog.csv").is_file()


def test_build_trains_and_indexes_a_class_of_one_photo(tmp_path, generated_catalog, session_store, capsys):
    """A long-tail class (one photo) trains on its one row, is predicted and indexed, and is listed."""
    from test_build import SINGLETON_ID, make_catalog_with_a_singleton

    from recommender.engine import load_bundle

    catalog = make_catalog_with_a_singleton(generated_catalog)
    out = tmp_path / "long-tail"
    argv = ["build", "--catalog", str(catalog), "--out", str(out), "--id-column", "id", "--label-column", "label",
            "--label-column", "colour", "--weights", "none", "--image-size", "64", "--feature-store",
            str(session_store), "--epochs", "5", "--no-flips"]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "1 class(es) too small to hold out trained on all their rows (validation covers 4 of 5 classes)" in err
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "build_report.json").read_text())
    for metrics in (manifest["metrics"], report["metrics"]):
        assert metrics["train_only_classes"] == {"grid": 1}
        assert (metrics["validation_classes"], metrics["total_classes"]) == (4, 5)
    assert manifest["counts"]["items"] == 97 and manifest["counts"]["classes"] == {"label": 5, "colour": 4}
    engine = load_bundle(out)
    assert "grid" in engine.label_space.classes_of("label") and "green" in engine.label_space.classes_of("colour")
    answer = engine.query(engine.item(SINGLETON_ID).path, k=1, exclude_self=False)
    assert answer["neighbors"][0]["id"] == SINGLETON_ID  # indexed, and finds itself first


def test_min_class_examples_is_a_build_and_rebuild_flag(tmp_path):
    from indexer.commands.flags import build_config_from_args
    from recommender.cli import make_parser

    parser = make_parser()
    for command in (["build", "--out", str(tmp_path / "b")], ["rebuild", "--root", str(tmp_path)]):
        args = parser.parse_args([*command, "--catalog", "c.csv"])
        assert build_config_from_args(args).min_class_examples == 0  # off by default
        args = parser.parse_args([*command, "--catalog", "c.csv", "--min-class-examples", "3"])
        assert build_config_from_args(args).min_class_examples == 3


def test_every_command_in_the_table_has_a_parser_and_a_run():
    import argparse

    from recommender.cli import COMMANDS

    assert len({command.name for command in COMMANDS}) == len(COMMANDS)
    for command in COMMANDS:
        module = command.load()
        assert callable(module.add_arguments) and callable(module.run), command.name
        parser = argparse.ArgumentParser(prog=f"recommender {command.name}")
        module.add_arguments(parser)
        assert parser.format_help()


def test_help_lists_exactly_the_table_and_building_the_parser_loads_no_tensorflow():
    code = (
        "import sys; from recommender.cli import COMMANDS, make_parser; make_parser(); "
        "print(' '.join(c.name for c in COMMANDS)); print('tensorflow' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    names, tensorflow_loaded = probe.stdout.split("\n")[:2]
    assert tensorflow_loaded == "False", probe.stderr
    result = run_cli("--help", timeout=60)
    assert result.returncode == 0, result.stderr
    # Under COMMAND, argparse gives each subcommand a line indented by four spaces.
    assert re.findall(r"(?m)^    ([a-z]+) ", result.stdout) == names.split()


def test_version_is_the_installed_package_version():
    from importlib.metadata import version

    result = run_cli("--version", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"recommender {version('recommender')}"


def test_parser_defaults_are_the_config_defaults(tmp_path):
    from indexer.commands.flags import build_config_from_args
    from indexer.rebuild import RebuildConfig
    from recommender.backbones import KERAS_APPLICATIONS
    from recommender.cli import make_parser
    from recommender.config import BuildConfig
    from recommender.engine import DEFAULT_K
    from webapp import DEFAULT_HOST, DEFAULT_PORT

    parser = make_parser()
    defaults = BuildConfig()
    for command in (["build", "--out", str(tmp_path / "b")], ["rebuild", "--root", str(tmp_path)]):
        args = parser.parse_args([*command, "--catalog", "c.csv"])
        # Flags left out resolve to BuildConfig() itself (the feature store is the only path read
        # from the environment, the same way on both sides).
        assert build_config_from_args(args) == defaults
        assert args.seed == defaults.train.seed == defaults.backbone.seed
        assert args.max_bad_fraction == defaults.max_bad_fraction
    for application in KERAS_APPLICATIONS:
        args = parser.parse_args(["build", "--out", "b", "--catalog", "c.csv", "--backbone", application.name])
        assert build_config_from_args(args).backbone.input_size == application.input_size
    rebuild = parser.parse_args(["rebuild", "--root", str(tmp_path), "--catalog", "c.csv"])
    job = RebuildConfig()
    assert (rebuild.retrain, rebuild.retrain_threshold, rebuild.keep, rebuild.max_accuracy_drop) == (
        job.retrain,
        job.retrain_threshold,
        job.keep,
        job.max_accuracy_drop,
    )
    query = parser.parse_args(["query", "--bundle", "b", "x.jpg"])
    evaluate = parser.parse_args(["evaluate", "--bundle", "b", "--catalog", "c.csv", "--out", "r"])
    assert query.k == evaluate.k == DEFAULT_K
    assert (evaluate.image_column, evaluate.id_column, evaluate.split_column) == (
        defaults.image_column,
        defaults.id_column,
        defaults.split_column,
    )
    demo, serve = parser.parse_args(["demo"]), parser.parse_args(["serve"])
    assert (demo.host, demo.port, demo.weights) == (DEFAULT_HOST, DEFAULT_PORT, defaults.backbone.weights)
    assert (serve.host, serve.port) == (DEFAULT_HOST, DEFAULT_PORT)


def test_query_and_evaluate_check_k_the_engine_way(tiny_bundle, tmp_path, capsys):
    """The same range check and message; query's is a usage error (2), evaluate's a data error (1)."""
    from recommender.engine import MAX_K

    assert main(["query", "--bundle", str(tiny_bundle), "--k", str(MAX_K + 1), "x.jpg"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --k must be a whole number from 1 to {MAX_K}, got {MAX_K + 1}"
    argv = ["evaluate", "--bundle", str(tiny_bundle), "--catalog", "c.csv", "--out", str(tmp_path / "r"), "--k", "0"]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip() == f"error: --k must be a whole number from 1 to {MAX_K}, got 0"
