"""README's first command on a fresh machine: CIFAR-10 through TFDS, offline (fails in seconds, one line) and
from a copy TFDS prepared earlier (used without the network)."""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import CIFAR10_DIR, REPO_ROOT, needs_cifar10, subprocess_env

pytestmark = [needs_cifar10, pytest.mark.slow]

TRAIN_PY = os.path.join(REPO_ROOT, "train.py")
RECORD = 1 + 32 * 32 * 3
FLAGS = ["--architecture=eq_resnet9", "--group=C1", "--restrict=none", "--train_subset=64", "--test_subset=32",
         "--steps=1", "--batch_size=16", "--physical_batch_size=16", "--num_views=1", "--noise_multiplier=1.0",
         "--target_epsilon=none", "--eval_batch_size=32", "--export=false"]


def _offline_env(tfds_dir):
    """No network: every connection goes to a closed local port (as a proxy that refuses)."""
    env = subprocess_env(TFDS_DATA_DIR=str(tfds_dir), https_proxy="http://127.0.0.1:9",
                         http_proxy="http://127.0.0.1:9")
    env.pop("HTTPS_PROXY", None)
    return env


def test_offline_without_a_prepared_copy_fails_in_seconds_with_one_line(tmp_path):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, TRAIN_PY, *FLAGS, f"--output_dir={tmp_path / 'out'}"],
                          env=_offline_env(tmp_path / "tfds"), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    elapsed = time.monotonic() - started
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: cannot download CIFAR-10 through TFDS"), lines
    assert "no connection to 127.0.0.1:9" in lines[0] and "--data_dir" in lines[0]
    assert "No module named" not in proc.stderr and "Traceback" not in proc.stderr
    assert elapsed < 60, elapsed  # TFDS's own retries take ~3.5 minutes


# Prepares TFDS's cifar10 from a local folder instead of the download (the builder reads the same files).
_PREPARE = textwrap.dedent("""
    import sys
    import tensorflow_datasets as tfds

    source = sys.argv[1]
    tfds.download.DownloadManager.download_and_extract = lambda self, url: source
    builder = tfds.builder("cifar10")
    builder.download_and_prepare()
    print("prepared", builder.data_dir)
""")


def test_a_prepared_tfds_copy_is_used_without_the_network(tmp_path):
    source = tmp_path / "download" / "cifar-10-batches-bin"
    os.makedirs(source)
    with open(os.path.join(CIFAR10_DIR, "data_batch_1.bin"), "rb") as f:
        records = np.frombuffer(f.read(RECORD * 480), np.uint8).reshape(480, RECORD)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for i, name in enumerate(names):
        records[i * 80:(i + 1) * 80].tofile(source / name)
    with open(os.path.join(CIFAR10_DIR, "batches.meta.txt"), "rb") as f:
        (source / "batches.meta.txt").write_bytes(f.read())
    env = _offline_env(tmp_path / "tfds")
    prepared = subprocess.run([sys.executable, "-c", _PREPARE, str(source.parent)], env=env, capture_output=True,
                              text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-2000:]

    proc = subprocess.run([sys.executable, TRAIN_PY, *FLAGS, f"--output_dir={tmp_path / 'out'}"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train 64, test 32 examples" in proc.stdout
    assert "done: test accuracy" in proc.stdout
