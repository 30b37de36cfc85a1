"""Tests for eqdp_tf.data: samplers, augmentation multiplicity and the tf.data pipelines (loading: test_datasets*)."""

import numpy as np
import pytest
import tensorflow as tf

from eqdp_tf import data
from eqdp_tf.errors import ConfigError, DataError


def _random_images(n, seed=0, shape=(32, 32, 3)):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)

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
    height, width = original.shape[:2]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy:dy + height, dx:dx + width]
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


@pytest.mark.parametrize("shape, pad", [((20, 20, 1), 2), ((40, 40, 3), 9)])
def test_crop_padding_sets_the_reach_of_the_crops_at_any_image_shape(shape, pad):
    images = _random_images(12, seed=5, shape=shape)
    views = data.augment_views(tf.constant(images), 4, tf.constant([7, 2]), crop_padding=pad).numpy()
    assert views.shape == (12, 4, *shape)
    offsets = set()
    for i in range(12):
        for k in (1, 2, 3):
            match = _find_crop(images[i], views[i, k], pad)
            assert match is not None, f"view {k} of image {i} is not a crop of the image padded by {pad}"
            offsets.add(match[:2])
    # Offsets run over 0..2*pad: past the middle (pad), and past the default padding's 0..8 when pad is larger.
    assert max(max(o) for o in offsets) > min(pad, 8)


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


def test_train_dataset_of_grayscale_images_keeps_their_shape_and_rows():
    images = _random_images(30, seed=2, shape=(28, 28, 1))
    labels = np.arange(30) % 3
    sampler = data.PoissonSampler(30, 0.5, 8, seed=1)
    elements = _collect(data.make_train_dataset(images, labels, sampler, 3, seed=0, num_steps=2, crop_padding=2))
    assert elements[0]["views"].shape == (8, 3, 28, 28, 1)
    for step in range(2):
        for element, batch in zip([e for e in elements if e["step"] == step], sampler.physical_batches(step)):
            np.testing.assert_array_equal(element["views"][:, 0], images[batch.indices])
            np.testing.assert_array_equal(element["labels"], labels[batch.indices])


def test_pipelines_refuse_images_that_are_not_uint8():
    images, labels = _small_training_data(4)
    with pytest.raises(DataError, match=r"uint8 \[N,H,W,C\], got float32"):
        data.make_eval_dataset(images.astype(np.float32), labels, batch_size=2)


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
