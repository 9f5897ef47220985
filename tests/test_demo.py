"""The README's main command: `python -m recommender demo` works offline and says which weights it used."""

from __future__ import annotations

import json

from recommender.cli import main


def test_demo_builds_queries_and_explains_weights(tmp_path, capsys):
    assert main(["demo", "--folder", str(tmp_path), "--no-serve"]) == 0
    captured = capsys.readouterr()
    answers = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert len(answers) == 4
    for answer in answers:
        expected = answer["image"].rsplit("/", 1)[-1].split("-")[0]  # queries are named <pattern>-<colour>.jpg
        assert answer["predicted"]["label"]["label"] == expected
        assert len(answer["neighbors"]) == 6
        assert sum(n["labels"]["label"] == expected for n in answer["neighbors"]) >= 4
        assert answer["hierarchy"]["path"][-1] == expected and "tags" in answer
    assert "with filter colour=red:" in captured.err
    manifest = json.loads(next(tmp_path.glob("bundle-*/manifest.json")).read_text())
    weights = manifest["backbone"]["identity"]["weights"]
    assert f"weights: {weights}" in captured.err
    if weights == "none (random init)":  # offline: said plainly, with what it means for quality
        assert "ImageNet weights are not available here" in captured.err
        assert "RANDOM-INIT" in captured.err and "0.20 accuracy" in captured.err
    # A second run reuses the bundle.
    assert main(["demo", "--folder", str(tmp_path), "--no-serve"]) == 0
    assert "reusing the demo bundle" in capsys.readouterr().err
