"""CIFAR-10 and CIFAR-100 from their official binary and python-pickle files (small copies the tests write, and the
real CIFAR-10 copy when present), and the TFDS failure path."""

import os
import pickle

import numpy as np
import pytest

from conftest import CIFAR10_DIR, HAVE_CIFAR10
from eqdp_tf.datasets import cifar, spec, tfds_reader
from eqdp_tf.errors import ConfigError, DataError

RECORD = 3073


def _needs_real_data():
    if not HAVE_CIFAR10:
        pytest.skip(f"CIFAR-10 binary copy not found at {CIFAR10_DIR}")


@pytest.fixture(scope="module")
def train_set():
    _needs_real_data()
    return cifar.load_cifar10("train", CIFAR10_DIR)


def _write_bin(path, labels, images):
    """Writes records in the official layout: label byte, then R, G, B planes."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    records = np.concatenate([np.asarray(labels, np.uint8)[:, None], planes], axis=1)
    path.write_bytes(records.astype(np.uint8).tobytes())


def _random_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# Loading the real binary copy


def test_real_train_split_matches_documented_values(train_set):
    images, labels = train_set
    assert images.shape == (50000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (50000,) and labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 5000))
    red_row0 = [59, 43, 50, 68, 98, 119, 139, 145, 149, 149, 131, 125, 142, 144, 137, 129]
    np.testing.assert_array_equal(images[0, 0, :16, 0], red_row0)
    mean = images.reshape(-1, 3).mean(axis=0, dtype=np.float64) / 255.0
    np.testing.assert_allclose(mean, [0.491400, 0.482158, 0.446531], atol=1e-5)
    np.testing.assert_allclose(mean, spec.CIFAR10_MEAN, atol=1e-3)


def test_real_train_std_matches_constant(train_set):
    images, _ = train_set
    std = (images[:10000].reshape(-1, 3) / 255.0).std(axis=0)
    np.testing.assert_allclose(std, spec.CIFAR10_STD, atol=5e-3)


def test_real_test_split_from_parent_folder():
    _needs_real_data()
    images, labels = cifar.load_cifar10("test", os.path.dirname(CIFAR10_DIR))
    assert images.shape == (10000, 32, 32, 3) and labels.shape == (10000,)
    np.testing.assert_array_equal(images[0, 0, 0], [158, 112, 49])


def test_subset_takes_first_examples(train_set):
    images, labels = cifar.load_cifar10("train", CIFAR10_DIR, subset=7)
    np.testing.assert_array_equal(images, train_set[0][:7])
    np.testing.assert_array_equal(labels, train_set[1][:7])


# ----------------------------------------------------------------------------------------------
# Python-pickle format and small synthetic folders


def _write_pickle_folder(folder, counts, seed=0):
    folder.mkdir(parents=True)
    expected_images, expected_labels = [], []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images = _random_images(counts, seed + i)
        labels = list(np.random.default_rng(seed + 100 + i).integers(0, 10, counts))
        flat = images.transpose(0, 3, 1, 2).reshape(counts, -1)  # CHW rows, as in the official pickles
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": flat, b"labels": [int(v) for v in labels], b"batch_label": b"fake"}, f)
        expected_images.append(images)
        expected_labels.append(labels)
    return expected_images, expected_labels


def test_pickle_format_loads_from_parent_and_direct_folder(tmp_path):
    images, labels = _write_pickle_folder(tmp_path / "cifar-10-batches-py", counts=3)
    for data_dir in [tmp_path, tmp_path / "cifar-10-batches-py"]:
        train_x, train_y = cifar.load_cifar10("train", str(data_dir))
        assert train_x.shape == (15, 32, 32, 3) and train_x.dtype == np.uint8 and train_y.dtype == np.int64
        np.testing.assert_array_equal(train_x, np.concatenate(images[:5]))
        np.testing.assert_array_equal(train_y, np.concatenate(labels[:5]))
    test_x, test_y = cifar.load_cifar10("test", str(tmp_path))
    np.testing.assert_array_equal(test_x, images[5])
    np.testing.assert_array_equal(test_y, labels[5])


def test_small_bin_file_round_trips(tmp_path):
    images = _random_images(4)
    _write_bin(tmp_path / "test_batch.bin", [0, 9, 3, 5], images)
    loaded_x, loaded_y = cifar.load_cifar10("test", str(tmp_path))
    np.testing.assert_array_equal(loaded_x, images)
    np.testing.assert_array_equal(loaded_y, [0, 9, 3, 5])


# ----------------------------------------------------------------------------------------------
# User-facing errors


def test_missing_folder_is_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        cifar.load_cifar10("train", str(tmp_path / "nowhere"))


def test_folder_without_data_names_what_was_looked_for(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError) as info:
        cifar.load_cifar10("train", str(tmp_path))
    message = str(info.value)
    assert "data_batch_1.bin" in message and "cifar-10-batches-bin" in message and "cifar-10-batches-py" in message


def test_incomplete_train_split_names_missing_file(tmp_path):
    for k in range(1, 5):
        _write_bin(tmp_path / f"data_batch_{k}.bin", [1], _random_images(1))
    with pytest.raises(DataError, match="data_batch_5.bin"):
        cifar.load_cifar10("train", str(tmp_path))


def test_truncated_bin_reports_file_and_sizes(tmp_path):
    _needs_real_data()
    with open(os.path.join(CIFAR10_DIR, "test_batch.bin"), "rb") as f:
        chunk = f.read(3 * RECORD - 100)
    (tmp_path / "test_batch.bin").write_bytes(chunk)
    with pytest.raises(DataError) as info:
        cifar.load_cifar10("test", str(tmp_path))
    message = str(info.value)
    assert "test_batch.bin" in message and str(3 * RECORD - 100) in message and str(RECORD) in message


def test_bad_label_byte_is_data_error(tmp_path):
    _write_bin(tmp_path / "test_batch.bin", [1, 2, 10], _random_images(3))
    with pytest.raises(DataError, match=r"label 10 at record 2"):
        cifar.load_cifar10("test", str(tmp_path))


def test_corrupt_pickle_is_data_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"\x80\x04this is not a pickle")
    with pytest.raises(DataError, match="not a readable CIFAR-10 pickle"):
        cifar.load_cifar10("test", str(tmp_path))


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": os.getcwd}))
    with pytest.raises(DataError, match="not allowed"):
        cifar.load_cifar10("test", str(tmp_path))


@pytest.mark.parametrize("subset", [0, -3, 6, 2.5])
def test_subset_out_of_range_is_config_error(tmp_path, subset):
    _write_bin(tmp_path / "test_batch.bin", [0] * 5, _random_images(5))
    with pytest.raises(ConfigError, match="subset"):
        cifar.load_cifar10("test", str(tmp_path), subset=subset)


def test_unknown_split_is_config_error():
    with pytest.raises(ConfigError, match="'train' or 'test'"):
        cifar.load_cifar10("validation", "/nonexistent")


def test_tfds_failure_names_both_options(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    # The real TFDS would try the network, which tests must not depend on: the connection probe passes (the network
    # seems up), and then the download itself fails.
    import tensorflow_datasets as tfds

    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: False)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    monkeypatch.setattr(tfds_reader, "check_download_possible", lambda *args: None)
    with pytest.raises(DataError) as info:
        cifar.load_cifar10("train")
    message = str(info.value)
    assert "--data_dir" in message and "cifar-10-batches-bin" in message and "cifar-10-batches-py" in message
    assert "internet" in message and "no route to host" in message


# ----------------------------------------------------------------------------------------------
# CIFAR-100: two label bytes (coarse, fine), the fine one is the class


@pytest.mark.parametrize("layout", ["binary", "pickle"])
def test_cifar100_files_give_fine_labels(tmp_path, layout):
    import dataset_files as files
    from eqdp_tf.datasets import ReadOptions, load_dataset

    splits = files.cifar100_splits()
    for split, (images, coarse, fine) in splits.items():
        if layout == "binary":
            files.write_cifar100_binary(str(tmp_path / "cifar-100-binary"), images, coarse, fine, f"{split}.bin")
        else:
            files.write_cifar100_pickle(str(tmp_path / "cifar-100-python"), images, coarse, fine, split)
    loaded = load_dataset("cifar100", ReadOptions(data_dir=str(tmp_path)))
    np.testing.assert_array_equal(loaded.train_images, splits["train"][0])
    np.testing.assert_array_equal(loaded.train_labels, splits["train"][2])
    np.testing.assert_array_equal(loaded.test_images, splits["test"][0])
    np.testing.assert_array_equal(loaded.test_labels, splits["test"][2])
    d = loaded.description
    assert (d.num_classes, d.num_train, d.num_test, d.image_shape) == (100, 12, 5, (32, 32, 3))
    assert (d.mean, d.std) == (spec.OFFICIAL["cifar100"].mean, spec.OFFICIAL["cifar100"].std)
    assert "CIFAR-10 constants" in d.normalization_source
    assert d.source == f"the CIFAR-100 files in {tmp_path}"


def test_cifar100_fine_label_out_of_range_and_truncated_record(tmp_path):
    import dataset_files as files

    images, coarse, fine = files.cifar100_splits()["test"]
    folder = tmp_path / "cifar-100-binary"
    files.write_cifar100_binary(str(folder), images, coarse, [3, 100, 4, 5, 6], "test.bin")
    with pytest.raises(DataError, match=r"has label 100 at record 1; CIFAR-100 labels must be 0..99"):
        cifar.load_cifar(cifar.CIFAR100, "test", str(tmp_path))
    with open(folder / "test.bin", "r+b") as f:
        f.truncate(3074 * 2 + 5)
    with pytest.raises(DataError) as info:
        cifar.load_cifar(cifar.CIFAR100, "test", str(tmp_path))
    assert "positive multiple of 3074 (30740000 for an official file)" in str(info.value)
