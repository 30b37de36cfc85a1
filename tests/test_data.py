"""Tests for eqdp_tf.data: loading, samplers, augmentation multiplicity and the tf.data pipelines."""

import os
import pickle
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from conftest import CIFAR10_DIR, HAVE_CIFAR10
from eqdp_tf import data
from eqdp_tf.errors import ConfigError, DataError

RECORD = 3073


def _needs_real_data():
    if not HAVE_CIFAR10:
        pytest.skip(f"CIFAR-10 binary copy not found at {CIFAR10_DIR}")


@pytest.fixture(scope="module")
def train_set():
    _needs_real_data()
    return data.load_cifar10("train", CIFAR10_DIR)


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
    np.testing.assert_allclose(mean, data.CIFAR10_MEAN, atol=1e-3)


def test_real_train_std_matches_constant(train_set):
    images, _ = train_set
    std = (images[:10000].reshape(-1, 3) / 255.0).std(axis=0)
    np.testing.assert_allclose(std, data.CIFAR10_STD, atol=5e-3)


def test_real_test_split_from_parent_folder():
    _needs_real_data()
    images, labels = data.load_cifar10("test", os.path.dirname(CIFAR10_DIR))
    assert images.shape == (10000, 32, 32, 3) and labels.shape == (10000,)
    np.testing.assert_array_equal(images[0, 0, 0], [158, 112, 49])


def test_subset_takes_first_examples(train_set):
    images, labels = data.load_cifar10("train", CIFAR10_DIR, subset=7)
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
        train_x, train_y = data.load_cifar10("train", str(data_dir))
        assert train_x.shape == (15, 32, 32, 3) and train_x.dtype == np.uint8 and train_y.dtype == np.int64
        np.testing.assert_array_equal(train_x, np.concatenate(images[:5]))
        np.testing.assert_array_equal(train_y, np.concatenate(labels[:5]))
    test_x, test_y = data.load_cifar10("test", str(tmp_path))
    np.testing.assert_array_equal(test_x, images[5])
    np.testing.assert_array_equal(test_y, labels[5])


def test_small_bin_file_round_trips(tmp_path):
    images = _random_images(4)
    _write_bin(tmp_path / "test_batch.bin", [0, 9, 3, 5], images)
    loaded_x, loaded_y = data.load_cifar10("test", str(tmp_path))
    np.testing.assert_array_equal(loaded_x, images)
    np.testing.assert_array_equal(loaded_y, [0, 9, 3, 5])


# ----------------------------------------------------------------------------------------------
# User-facing errors


def test_missing_folder_is_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_cifar10("train", str(tmp_path / "nowhere"))


def test_folder_without_data_names_what_was_looked_for(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError) as info:
        data.load_cifar10("train", str(tmp_path))
    message = str(info.value)
    assert "data_batch_1.bin" in message and "cifar-10-batches-bin" in message and "cifar-10-batches-py" in message


def test_incomplete_train_split_names_missing_file(tmp_path):
    for k in range(1, 5):
        _write_bin(tmp_path / f"data_batch_{k}.bin", [1], _random_images(1))
    with pytest.raises(DataError, match="data_batch_5.bin"):
        data.load_cifar10("train", str(tmp_path))


def test_truncated_bin_reports_file_and_sizes(tmp_path):
    _needs_real_data()
    with open(os.path.join(CIFAR10_DIR, "test_batch.bin"), "rb") as f:
        chunk = f.read(3 * RECORD - 100)
    (tmp_path / "test_batch.bin").write_bytes(chunk)
    with pytest.raises(DataError) as info:
        data.load_cifar10("test", str(tmp_path))
    message = str(info.value)
    assert "test_batch.bin" in message and str(3 * RECORD - 100) in message and str(RECORD) in message


def test_bad_label_byte_is_data_error(tmp_path):
    _write_bin(tmp_path / "test_batch.bin", [1, 2, 10], _random_images(3))
    with pytest.raises(DataError, match=r"label 10 at record 2"):
        data.load_cifar10("test", str(tmp_path))


def test_corrupt_pickle_is_data_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"\x80\x04this is not a pickle")
    with pytest.raises(DataError, match="not a readable CIFAR-10 pickle"):
        data.load_cifar10("test", str(tmp_path))


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": os.getcwd}))
    with pytest.raises(DataError, match="not allowed"):
        data.load_cifar10("test", str(tmp_path))


@pytest.mark.parametrize("subset", [0, -3, 6, 2.5])
def test_subset_out_of_range_is_config_error(tmp_path, subset):
    _write_bin(tmp_path / "test_batch.bin", [0] * 5, _random_images(5))
    with pytest.raises(ConfigError, match="subset"):
        data.load_cifar10("test", str(tmp_path), subset=subset)


def test_unknown_split_is_config_error():
    with pytest.raises(ConfigError, match="'train' or 'test'"):
        data.load_cifar10("validation", "/nonexistent")


def test_tfds_failure_names_both_options(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    # A stand-in module: the real TFDS would try the network, which tests must not depend on. The connection
    # probe passes (the network seems up), and then the download itself fails.
    builder = types.SimpleNamespace(is_prepared=lambda: False, download_and_prepare=offline)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(builder=lambda name: builder))
    monkeypatch.setattr(data, "_check_download_possible", lambda: None)
    with pytest.raises(DataError) as info:
        data.load_cifar10("train")
    message = str(info.value)
    assert "--data_dir" in message and "cifar-10-batches-bin" in message and "cifar-10-batches-py" in message
    assert "internet" in message and "no route to host" in message


# ----------------------------------------------------------------------------------------------
# Samplers


def test_poisson_sampler_is_reproducible_per_seed_and_step():
    a = data.PoissonSampler(1000, 0.1, 16, seed=3)
    b = data.PoissonSampler(1000, 0.1, 16, seed=3)
    np.testing.assert_array_equal(a.sample(7), b.sample(7))
    np.testing.assert_array_equal(a.sample(7), a.sample(7))  # no hidden state advanced
    assert not np.array_equal(a.sample(7), a.sample(8))
    assert not np.array_equal(a.sample(7), data.PoissonSampler(1000, 0.1, 16, seed=4).sample(7))
    assert a.method == "poisson" and a.expected_batch_size == pytest.approx(100.0)


def test_poisson_inclusion_rate_matches_q():
    num_examples, q, steps = 2000, 0.05, 400
    sampler = data.PoissonSampler(num_examples, q, 64, seed=0)
    counts = np.zeros(num_examples)
    sizes = []
    for step in range(steps):
        indices = sampler.sample(step)
        assert len(np.unique(indices)) == len(indices)  # without replacement within a step
        counts[indices] += 1
        sizes.append(len(indices))
    draws = num_examples * steps
    # The total is Binomial(draws, q): allow five standard deviations.
    assert abs(counts.sum() - draws * q) < 5 * np.sqrt(draws * q * (1 - q))
    # Every example is included at the same rate: per-example counts are Binomial(steps, q),
    # so a chi-square over examples should be close to its mean (num_examples - 1).
    chi2 = ((counts - steps * q) ** 2 / (steps * q * (1 - q))).sum()
    assert abs(chi2 - num_examples) < 5 * np.sqrt(2 * num_examples)
    # Batch sizes vary (not a fixed-size batch in disguise).
    assert np.std(sizes) == pytest.approx(np.sqrt(num_examples * q * (1 - q)), rel=0.2)


def test_poisson_physical_batches_cover_sample_with_masks():
    sampler = data.PoissonSampler(500, 0.3, 32, seed=1)
    for step in range(5):
        sampled = sampler.sample(step)
        batches = sampler.physical_batches(step)
        assert len(batches) == int(np.ceil(len(sampled) / 32))
        for batch in batches:
            assert batch.indices.shape == (32,) and batch.indices.dtype == np.int64
            assert batch.mask.shape == (32,) and batch.mask.dtype == np.float32
        indices = np.concatenate([b.indices for b in batches])
        mask = np.concatenate([b.mask for b in batches])
        np.testing.assert_array_equal(np.sort(indices[mask == 1]), np.sort(sampled))
        assert set(np.unique(mask)) <= {0.0, 1.0}
        np.testing.assert_array_equal(indices[mask == 0], 0)  # padding points at a valid example
        assert mask.sum() == len(sampled)


def test_empty_poisson_batch_gives_one_all_padding_batch():
    sampler = data.PoissonSampler(3, 1e-9, 8, seed=0)
    assert len(sampler.sample(0)) == 0
    batches = sampler.physical_batches(0)
    assert len(batches) == 1
    assert batches[0].indices.shape == (8,) and batches[0].mask.shape == (8,)
    np.testing.assert_array_equal(batches[0].mask, 0.0)


def test_poisson_rate_one_takes_everything():
    sampler = data.PoissonSampler(10, 1.0, 4, seed=0)
    np.testing.assert_array_equal(sampler.sample(5), np.arange(10))
    assert len(sampler.physical_batches(5)) == 3


@pytest.mark.parametrize("args, name", [
    ((100, 0.0, 8, 0), "sampling_rate"), ((100, 1.5, 8, 0), "sampling_rate"),
    ((100, 0.1, 0, 0), "physical_batch_size"), ((0, 0.1, 8, 0), "num_examples"),
    ((100, 0.1, 8, -1), "seed"),
])
def test_poisson_sampler_rejects_bad_arguments(args, name):
    with pytest.raises(ConfigError, match=name):
        data.PoissonSampler(*args)


def test_shuffle_sampler_visits_every_example_once_per_epoch():
    sampler = data.ShuffleSampler(60, 12, 5, seed=2)
    assert sampler.method == "shuffle" and sampler.expected_batch_size == 12
    epochs = [np.concatenate([sampler.sample(s) for s in range(e * 5, e * 5 + 5)]) for e in range(3)]
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(60))
    assert not np.array_equal(epochs[0], epochs[1])
    batches = sampler.physical_batches(0)
    assert len(batches) == 3 and all(b.indices.shape == (5,) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.mask for b in batches]), [1] * 12 + [0] * 3)


def test_shuffle_sampler_batches_crossing_epochs_keep_fixed_size():
    sampler = data.ShuffleSampler(10, 4, 4, seed=0)
    stream = np.concatenate([sampler.sample(s) for s in range(5)])  # 20 indices = two epochs
    assert all(len(sampler.sample(s)) == 4 for s in range(5))
    np.testing.assert_array_equal(np.sort(stream[:10]), np.arange(10))
    np.testing.assert_array_equal(np.sort(stream[10:]), np.arange(10))


def test_shuffle_sampler_rejects_batch_larger_than_dataset():
    with pytest.raises(ConfigError, match="batch_size"):
        data.ShuffleSampler(10, 11, 4, seed=0)


# ----------------------------------------------------------------------------------------------
# Augmentation multiplicity


def _find_crop(original, view, pad=4):
    """Returns (dy, dx, flipped) such that `view` is that crop of the reflect-padded image, else None."""
    padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy:dy + 32, dx:dx + 32]
            for flipped, candidate in [(False, crop), (True, crop[:, ::-1])]:
                if np.array_equal(candidate, view):
                    return dy, dx, flipped
    return None


def test_augment_views_shapes_and_identity_view():
    images = _random_images(6)
    views = data.augment_views(tf.constant(images), 4, tf.constant([1, 2])).numpy()
    assert views.shape == (6, 4, 32, 32, 3) and views.dtype == np.uint8
    np.testing.assert_array_equal(views[:, 0], images)
    differing = sum(not np.array_equal(views[i, k], images[i]) for i in range(6) for k in range(1, 4))
    assert differing >= 15  # only the (4, 4), unflipped crop equals the original: chance 1/162 per view


def test_augment_views_single_view_is_the_image():
    images = _random_images(2)
    views = data.augment_views(tf.constant(images), 1, tf.constant([0, 0])).numpy()
    assert views.shape == (2, 1, 32, 32, 3)
    np.testing.assert_array_equal(views[:, 0], images)


def test_augment_views_is_deterministic_per_seed():
    images = tf.constant(_random_images(4))
    first = data.augment_views(images, 3, tf.constant([5, 9])).numpy()
    again = data.augment_views(images, 3, tf.constant([5, 9])).numpy()
    other = data.augment_views(images, 3, tf.constant([5, 10])).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_augmented_views_are_reflect_padded_crops_with_flips():
    images = _random_images(8, seed=4)
    views = data.augment_views(tf.constant(images), 3, tf.constant([3, 1])).numpy()
    found = []
    for i in range(8):
        for k in (1, 2):
            match = _find_crop(images[i], views[i, k])
            assert match is not None, f"view {k} of image {i} is not a reflect-padded crop"
            found.append(match)
    # Crops are drawn per image and view, and both flip states occur.
    assert len({(dy, dx) for dy, dx, _ in found}) > 4
    assert {flipped for _, _, flipped in found} == {False, True}


# ----------------------------------------------------------------------------------------------
# tf.data pipelines


def _small_training_data(n=40):
    rng = np.random.default_rng(0)
    return _random_images(n), rng.integers(0, 10, n).astype(np.int64)


def _collect(dataset):
    return [{key: value.numpy() for key, value in element.items()} for element in dataset]


def test_train_dataset_structure_and_last_flags():
    images, labels = _small_training_data()
    sampler = data.PoissonSampler(len(labels), 0.4, 6, seed=0)
    elements = _collect(data.make_train_dataset(images, labels, sampler, num_views=2, seed=0, num_steps=3))
    expected_counts = [len(sampler.physical_batches(step)) for step in range(3)]
    assert len(elements) == sum(expected_counts)
    first = elements[0]
    assert first["views"].shape == (6, 2, 32, 32, 3) and first["views"].dtype == np.uint8
    assert first["labels"].shape == (6,) and first["labels"].dtype == np.int64
    assert first["mask"].shape == (6,) and first["mask"].dtype == np.float32
    assert first["step"].dtype == np.int64 and first["step"].shape == ()
    assert first["last"].dtype == np.bool_ and first["last"].shape == ()
    steps = [int(e["step"]) for e in elements]
    assert steps == sorted(steps) and [steps.count(s) for s in range(3)] == expected_counts
    for step in range(3):
        flags = [bool(e["last"]) for e in elements if e["step"] == step]
        assert flags == [False] * (len(flags) - 1) + [True]
        batches = sampler.physical_batches(step)
        step_elements = [e for e in elements if e["step"] == step]
        for element, batch in zip(step_elements, batches):
            np.testing.assert_array_equal(element["mask"], batch.mask)
            np.testing.assert_array_equal(element["labels"], labels[batch.indices])
            np.testing.assert_array_equal(element["views"][:, 0], images[batch.indices])


def test_train_dataset_resume_sees_identical_data():
    images, labels = _small_training_data()
    sampler = data.PoissonSampler(len(labels), 0.3, 8, seed=5)
    full = _collect(data.make_train_dataset(images, labels, sampler, 3, seed=11, start_step=0, num_steps=4))
    resumed = _collect(data.make_train_dataset(images, labels, sampler, 3, seed=11, start_step=2, num_steps=2))
    tail = [e for e in full if e["step"] >= 2]
    assert len(tail) == len(resumed) > 0
    for a, b in zip(tail, resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # A different seed changes the augmentation, so the match above is not trivial.
    other = _collect(data.make_train_dataset(images, labels, sampler, 3, seed=12, start_step=2, num_steps=2))
    assert not np.array_equal(other[0]["views"], resumed[0]["views"])


def test_train_dataset_empty_step_still_yields_a_batch():
    images, labels = _small_training_data(5)
    sampler = data.PoissonSampler(5, 1e-9, 4, seed=0)
    elements = _collect(data.make_train_dataset(images, labels, sampler, 2, seed=0, num_steps=2))
    assert [int(e["step"]) for e in elements] == [0, 1]
    assert all(e["last"] and e["mask"].sum() == 0 for e in elements)


def test_train_dataset_rejects_mismatched_sampler():
    images, labels = _small_training_data()
    with pytest.raises(ConfigError, match="sampler"):
        data.make_train_dataset(images, labels, data.PoissonSampler(10, 0.5, 4, 0), 2, seed=0, num_steps=1)


def test_eval_dataset_keeps_last_partial_batch():
    images, labels = _small_training_data(10)
    batches = list(data.make_eval_dataset(images, labels, batch_size=4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert batches[0][0].dtype == tf.uint8 and batches[0][0].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in batches]), images)
    np.testing.assert_array_equal(np.concatenate([y.numpy() for _, y in batches]), labels)


def test_train_dataset_augmentation_changes_between_steps_and_batches():
    images, labels = _small_training_data(8)
    sampler = data.PoissonSampler(8, 1.0, 4, seed=0)  # q=1: every step holds the same examples
    elements = _collect(data.make_train_dataset(images, labels, sampler, 2, seed=0, num_steps=2))
    assert [int(e["step"]) for e in elements] == [0, 0, 1, 1]
    np.testing.assert_array_equal(elements[0]["views"][:, 0], elements[2]["views"][:, 0])
    assert not np.array_equal(elements[0]["views"][:, 1], elements[2]["views"][:, 1])
    # The two physical batches of one step draw independent crops (not the same pattern twice).
    crops = [[_find_crop(images[j], e["views"][i, 1]) for i, j in enumerate(range(b * 4, b * 4 + 4))]
             for b, e in enumerate(elements[:2])]
    assert crops[0] != crops[1]
