"""A full disk: every write path (files, feature store, index, run logs) is one StorageError naming the path."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import numpy as np
import pytest

from recommender.errors import StorageError


@pytest.fixture
def full_disk(tmp_path):
    """A real full file system: a 256 kB tmpfs filled to the last byte (writes fail with ENOSPC).

    Skips where mounting is not allowed (not root, or a container without the capability).
    """
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        with open(mount / "filler", "wb", buffering=0) as handle:
            with pytest.raises(OSError) as full:
                while True:
                    handle.write(b"\0" * 65536)
        assert full.value.errno == errno.ENOSPC
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_atomic_write_on_a_full_disk_names_the_path_and_leaves_nothing(full_disk):
    from recommender.files import atomic_write_json

    target = full_disk / "runs.json"
    with pytest.raises(StorageError, match=rf"no space left on device writing {target}; free some space") as raised:
        atomic_write_json(target, {"state": "running", "padding": "x" * 100_000})
    assert raised.value.path == str(target)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # no temp file left behind


def test_feature_store_and_index_writes_on_a_full_disk(full_disk):
    from recommender.features import FeatureStore
    from recommender.index import VectorIndex

    store = FeatureStore(full_disk / "features.h5", "key", 512)
    with pytest.raises(StorageError, match=r"no space left on device writing .*features.h5.segments"):
        store.add(["a" * 64], np.ones((1, 512), np.float32))
    assert not store.contains("a" * 64)
    index = VectorIndex.build(np.random.default_rng(0).normal(size=(500, 64)).astype(np.float32), use_gpu=False)
    with pytest.raises(StorageError, match=rf"no space left on device writing {full_disk / 'index.faiss'}"):
        index.save(full_disk / "index.faiss")


def test_cli_on_a_full_disk_is_one_error_line(full_disk, capsys):
    """`recommender rebuild` onto a full artifact root: exit 1, one `error:` line, no traceback."""
    from recommender.cli import main

    root = full_disk / "root"
    code = main(["rebuild", "--catalog", str(full_disk / "catalog.csv"), "--root", str(root), "--id-column", "id"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [
        f"error: no space left on device writing {root / 'rebuild.lock'}; free some space and run again"
    ]


def test_a_bundle_written_onto_a_full_disk_is_a_storage_error_and_leaves_nothing(full_disk):
    from recommender.bundle import write_bundle

    def fill(folder):
        (folder / "embeddings.npy").write_bytes(b"\0" * 100_000)  # more than the disk has left
        return {}

    out = full_disk / "bundle"
    with pytest.raises(StorageError, match=rf"no space left on device writing {out}; free some space") as raised:
        write_bundle(out, fill)
    assert raised.value.path == str(out)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # the temporary folder is gone too
