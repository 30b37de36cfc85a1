"""Bad datasets through train.py: each is one line on stderr, exit code 2, no traceback, and nothing written: no run
folder, nothing in the working folder, the data untouched. (The readers' own errors, in process: test_datasets.py.)

Every case runs train.py in its own empty working folder on data written in the case's format; they start several
at a time (each is mostly TensorFlow's start-up)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import dataset_files as files
from conftest import REPO_ROOT, one_error_line, run_concurrently, snapshot, subprocess_env

pytestmark = pytest.mark.slow

TRAIN_PY = os.path.join(REPO_ROOT, "train.py")
FLAGS = ["--steps=2", "--batch_size=4", "--physical_batch_size=4", "--num_views=1", "--noise_multiplier=1.0",
         "--target_epsilon=none", "--group=C1", "--restrict=none", "--export=false"]


def _folder(data, classes, **kwargs):
    files.write_class_tree(str(data / "images"), classes, **kwargs)
    return "--dataset=folder:DATA/images"


def _npz(data, **changes):
    arrays = {**files.medmnist_arrays(side=16), **changes}
    np.savez(data / "arrays.npz", **{k: v for k, v in arrays.items() if v is not None})
    return "--dataset=npz:DATA/arrays.npz"


def _damaged_image(data, name, keep):
    flag = _folder(data, {"a": 3, "b": 3})
    path = data / "images" / "b" / name
    files.write_image(str(path), files.random_images(1, (12, 12, 3))[0])
    path.write_bytes(path.read_bytes()[:keep] if keep else b"not an image at all")
    return flag


def _train_without_test(data):
    files.write_class_tree(str(data / "images" / "train"), {"a": 2, "b": 2})
    return "--dataset=folder:DATA/images"


def _mixed_sizes(data):
    flag = _folder(data, {"a": 3, "b": 3})
    files.write_image(str(data / "images" / "a" / "large.png"), files.random_images(1, (20, 16, 3))[0])
    return flag


# name: (writes the data in DATA and returns the --dataset flag, extra flags, fragments of the error line)
CASES = {
    "empty folder": (lambda data: (data / "images").mkdir() or "--dataset=folder:DATA/images", [],
                     ["DATA/images holds no class folders"]),
    "one-class folder": (lambda data: _folder(data, {"cats": 4}), [], ["has one class folder (cats)"]),
    "unreadable image": (lambda data: _damaged_image(data, "bad.png", 0), [],
                         ["DATA/images/b/bad.png is not a readable image"]),
    "truncated image": (lambda data: _damaged_image(data, "cut.jpg", 300), [],
                        ["DATA/images/b/cut.jpg is not a readable image"]),
    "mixed sizes without a size": (_mixed_sizes, [], ["images differ in size", "--image_size=S"]),
    "labels out of range": (lambda data: _npz(data, test_labels=np.full((12, 1), 9, np.uint8)), [],
                            ["test_labels", "has label 9 at position 0", "0..3"]),
    "labels not integers": (lambda data: _npz(data, train_labels=np.linspace(0, 3, 40)), [],
                            ["train_labels must be integers", "float64"]),
    "missing split": (_train_without_test, [], ["has train/ but no test/ folder"]),
    "npz without the expected keys": (lambda data: _npz(data, test_images=None, test_labels=None), [],
                                      ["lacks test_images, test_labels", "MedMNIST's layout"]),
    "TFDS name that does not exist": (lambda data: "--dataset=tfds:mnsit", [],
                                      ["TFDS has no dataset 'mnsit'", "did you mean mnist"]),
    "TFDS dataset without labels": (lambda data: "--dataset=tfds:celeb_a", [],
                                    ["TFDS celeb_a has no 'label' feature"]),
    "size the model cannot take": (lambda data: _folder(data, {"a": 3, "b": 3}, size=(20, 20)), [],
                                   ["multiple of 16", "got 20x20", "resize with --image_size"]),
}

# Cases run as subprocesses, this many at a time.
CONCURRENT = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    def start(case):
        write, extra, _ = CASES[case]
        root = tmp_path_factory.mktemp("case")
        data, cwd = root / "data", root / "cwd"
        data.mkdir()
        cwd.mkdir()
        dataset = write(data).replace("DATA", str(data))
        before = snapshot(data)
        flags = [dataset, *FLAGS, *extra, f"--output_dir={root / 'out'}"]
        proc = subprocess.Popen([sys.executable, TRAIN_PY, *flags], cwd=cwd, env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return dict(root=root, data=data, before=before), proc

    return run_concurrently(CASES, start, CONCURRENT)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_dataset_is_one_line_exit_2_and_writes_nothing(runs, case):
    run = runs[case]
    line = one_error_line(run["code"], run["stderr"])
    for fragment in CASES[case][2]:
        assert fragment.replace("DATA", str(run["data"])) in line, line
    assert not (run["root"] / "out").exists()  # no run folder
    assert os.listdir(run["root"] / "cwd") == []
    assert snapshot(run["data"]) == run["before"]
