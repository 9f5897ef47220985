"""Start-up noise: TensorFlow's C++ lines and TFLite's XNNPACK line stay off stderr, real errors do not."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MOBILENET, skip_without_shared

from recommender.quiet import filter_native_log, native_log_filtered

ROOT = Path(__file__).resolve().parents[1]

# What TF 2.21 and TFLite printed on fd 2 on this project's CI machine (no GPU), per command.
STARTUP = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796247587.740522   15171 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796247587.741276   15171 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1796247588.048845   15171 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
E0000 00:00:1796247606.335626   15171 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
"""
REAL_ERROR = "E0000 00:00:1796247606.335626   15171 op_kernel.cc:1830] OP_REQUIRES failed: out of memory\n"
NOISE_MARKERS = ("absl::InitializeLog", "oneDNN", "cuda", "cuInit", "cpu_feature_guard", "XNNPACK", "I0000")


def test_filter_drops_startup_chatter_keeps_errors_and_other_output():
    assert filter_native_log(STARTUP, min_level=2) == ""
    assert filter_native_log("Traceback (most recent call last):\n" + STARTUP + REAL_ERROR, 2) == (
        "Traceback (most recent call last):\n" + REAL_ERROR
    )
    assert filter_native_log("WARNING: tflite op fallback\n", 1) == "WARNING: tflite op fallback\n"
    assert filter_native_log(STARTUP, 0) == STARTUP  # TF_CPP_MIN_LOG_LEVEL=0: every line
    assert filter_native_log(REAL_ERROR, 3) == ""
    # Without the "no driver" line, a cuInit failure is news (a GPU machine whose driver broke).
    cuinit = STARTUP.splitlines(keepends=True)[5]
    assert filter_native_log(cuinit, 2) == cuinit


def test_native_log_filtered_on_fd_2_and_everything_back_when_the_block_fails(capfd, monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # the default: 2
    with native_log_filtered():
        os.write(2, (STARTUP + REAL_ERROR).encode())
    assert capfd.readouterr().err == REAL_ERROR
    with pytest.raises(RuntimeError), native_log_filtered():
        os.write(2, STARTUP.encode())
        raise RuntimeError("the import failed")
    assert capfd.readouterr().err == STARTUP  # the lines may say why
    os.write(2, b"after\n")  # fd 2 is restored
    assert capfd.readouterr().err == "after\n"


def _env_without_tf_log_level() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # conftest sets it; a user's shell does not
    return env


def test_cli_query_prints_no_tensorflow_startup_lines(tiny_bundle, engine):
    result = subprocess.run(
        [sys.executable, "-m", "recommender", "query", "--bundle", str(tiny_bundle), engine.rows[0].path],
        capture_output=True,
        text=True,
        env=_env_without_tf_log_level(),
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert not [line for line in result.stderr.splitlines() if any(mark in line for mark in NOISE_MARKERS)]


def test_tflite_backbone_hides_the_xnnpack_line_unless_asked(image_files):
    skip_without_shared()
    # TFLite logs the line once per process: one process quiet (the default), one with
    # TF_CPP_MIN_LOG_LEVEL=0, run side by side.
    code = f"""
from recommender import quiet
quiet.install()
from recommender.backbones import BackboneSpec, load_backbone
from recommender.images import load_image
image = load_image({str(image_files["rgb_jpeg"])!r}, 224)[None]
load_backbone(BackboneSpec(name={f"tflite:{MOBILENET}"!r})).extract(image)
import sys
print("tensorflow imported:", "tensorflow" in sys.modules)
"""
    runs = {
        level: subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**_env_without_tf_log_level(), **({"TF_CPP_MIN_LOG_LEVEL": level} if level else {})},
        )
        for level in ("", "0")
    }
    try:
        outputs = {level: run.communicate(timeout=300) for level, run in runs.items()}
    finally:
        for run in runs.values():
            run.kill()
    stderr = {level: err for level, (_, err) in outputs.items()}
    assert [run.returncode for run in runs.values()] == [0, 0], stderr
    assert not [line for line in stderr[""].splitlines() if any(mark in line for mark in NOISE_MARKERS)], stderr[""]
    assert "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." in stderr["0"]
    # With ai-edge-litert (installed by requirements.txt where it has wheels) a TFLite backbone
    # never imports TensorFlow; without it tf.lite runs it, and level 0 brings TF's lines back too.
    litert = importlib.util.find_spec("ai_edge_litert") is not None
    assert {out.strip() for out, _ in outputs.values()} == {f"tensorflow imported: {not litert}"}
    if not litert:
        assert "absl::InitializeLog" in stderr["0"]
