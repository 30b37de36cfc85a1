"""docs/datasets.md and README's "Train on your own images" as a user reads them: every `python train.py` command
shown parses and loads its data (written here under the names the commands use), the folder example trains end to
end, and the numbers of the epsilon and memory tables are recomputed."""

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags

import dataset_files as files
from conftest import REPO_ROOT, subprocess_env
from eqdp_tf import config
from eqdp_tf.datasets import parse_spec
from eqdp_tf.privacy import accounting
from eqdp_tf.training import loop

DOCS = os.path.join(REPO_ROOT, "docs", "datasets.md")
README = os.path.join(REPO_ROOT, "README.md")


def _read(path):
    with open(path) as f:
        return f.read()


def _readme_section():
    text = _read(README)
    start = text.index("## Train on your own images")
    return text[start:text.index("\n## ", start + 1)]


def commands():
    """Every `python train.py ...` of the docs page's bash blocks and of README's section, as argument lists."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", _read(DOCS), re.S):
        found += [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("python train.py")]
    found += re.findall(r"`(python train\.py [^`]+)`", _readme_section())
    return [shlex.split(command)[2:] for command in found]


def test_the_pages_show_commands_for_a_folder_an_npz_and_tfds():
    datasets = [next(a for a in args if a.startswith("--dataset=")) for args in commands()]
    assert {parse_spec(d.split("=", 1)[1]).kind for d in datasets} == {"folder", "npz", "tfds"}
    # Every --dataset value the pages name parses.
    for text in (_read(DOCS), _readme_section()):
        for value in re.findall(r"`--dataset=([^`\s]+)`", text):
            parse_spec(value)


def _write_data_for(args, cwd):
    """Writes, in ``cwd``, the data a command's --dataset names (a folder or an .npz; TFDS is mocked)."""
    spec = parse_spec(next(a for a in args if a.startswith("--dataset=")).split("=", 1)[1])
    if spec.kind == "folder":
        files.write_class_tree(str(cwd / spec.argument), {"benign": 12, "malignant": 10}, size=(80, 70),
                               gray={"benign"})
    elif spec.kind == "npz":
        np.savez(cwd / spec.argument, **files.medmnist_arrays(train=30, test=6, channels=3, classes=9))
    return spec


def _config_of(args):
    config.define_flags()
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["train.py", *args])
        return config.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("args", commands(), ids=lambda args: next(a for a in args if a.startswith("--dataset")))
def test_every_command_parses_and_loads_its_data(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(REPO_ROOT, "configs"), tmp_path / "configs")
    spec = _write_data_for(args, tmp_path)
    cfg = _config_of(args)
    if spec.kind == "tfds":
        shape = (cfg.image_size, cfg.image_size, 3)
        with tfds.testing.mock_data(as_dataset_fn=files.tfds_as_dataset(shape=shape, classes=2)):
            loaded = loop.load_data(cfg)
    else:
        loaded = loop.load_data(cfg)
    d = loaded.description
    assert d.image_shape[:2] == (cfg.image_size, cfg.image_size)
    assert d.normalization_source == "given by --normalization_mean and --normalization_std"
    assert cfg.dp and cfg.target_epsilon == 8 and cfg.group == "D4"


@pytest.mark.slow
def test_the_folder_example_trains_as_shown(tmp_path):
    args = next(a for a in commands() if any(x.startswith("--dataset=folder:") for x in a))
    os.symlink(os.path.join(REPO_ROOT, "configs"), tmp_path / "configs")
    _write_data_for(args, tmp_path)
    tiny = ["--steps=2", "--batch_size=8", "--physical_batch_size=8", "--num_views=2", "--eval_every=2",
            "--checkpoint_every=2", "--eval_batch_size=16", f"--output_dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train.py"), *args, *tiny], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dataset folder:skin_lesions: 20 train, 2 test images of 64x64x3, 2 classes" in proc.stdout
    assert "done: test accuracy" in proc.stdout and "warning: the normalisation" not in proc.stdout
    serve = tf.saved_model.load(str(tmp_path / "run" / "export" / "1")).signatures["serving_default"]
    assert serve(images=tf.zeros([1, 64, 64, 3], tf.uint8))["probabilities"].shape == (1, 2)


def _table_after(heading):
    """The rows (lists of cells) of the first markdown table after ``heading`` in the docs page."""
    text = _read(DOCS)
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _number(text):
    return float(text.replace(" ", "").replace("about", ""))


def test_epsilon_table_is_recomputed():
    rows = _table_after("### What ε means for your N")
    assert len(rows) == 3
    batch, steps, delta = 256, 500, 1e-5  # as the text above the table says
    for n, q, epochs, sigma, epsilon in rows:
        rate = batch / _number(n)
        assert (q, epochs) == (f"{rate:.3g}", f"{steps * rate:.2g}")
        assert sigma == f"{accounting.calibrate_noise_multiplier(8.0, rate, steps, delta):.2f}"
        assert epsilon == f"{accounting.compute_epsilon(1.0, rate, steps, delta):.1f}"


def test_memory_table_is_recomputed():
    for data, images, memory in _table_after("### Memory and what streams"):
        counts = [_number(c) for c in re.findall(r"(?:about )?(\d[\d ]*\d|\d)(?= \+| at| RGB)", images)]
        shape = re.search(r"at (\d+) × (\d+) × (\d+)", images)
        height, width, channels = map(int, shape.groups()) if shape else \
            (int(re.search(r"--image_size=(\d+)", data).group(1)),) * 2 + (3,)
        gigabytes = sum(counts) * height * width * channels / 1e9
        assert memory == (f"{gigabytes:.0f} GB" if gigabytes >= 10 else
                          f"{gigabytes:.1f} GB" if gigabytes >= 0.95 else f"{gigabytes:.2f} GB"), (data, gigabytes)
