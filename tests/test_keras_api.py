"""make_private + compile/fit: the same update as train.py's DP step, plain SGD without noise or clipping, the
noise's size, callbacks seeing epsilon, the ceiling, and what it refuses."""

import csv
import math
import os
import warnings

import numpy as np
import pytest
import tensorflow as tf

import eqdp_tf
import layers
from conftest import CIFAR10_DIR, needs_cifar10
from eqdp_tf import data as data_lib
from eqdp_tf.errors import ConfigError, PrivacyError
from eqdp_tf.models import build_model
from eqdp_tf.privacy import accounting
from eqdp_tf.privacy.dp_step import DPStep
from eqdp_tf.privacy.dp_step import DPKerasSGDOptimizer
from eqdp_tf.privacy.randomness import StepRandomness

KEY = 12345
N, B, P, K = 128, 32, 16, 2
LR, CLIP, SIGMA = 0.5, 1.0, 1.3

needs_data = needs_cifar10


@pytest.fixture(scope="module")
def cifar():
    images, labels = data_lib.load_cifar10("train", CIFAR10_DIR, N)
    test_images, test_labels = data_lib.load_cifar10("test", CIFAR10_DIR, 32)
    return images, labels, test_images, test_labels


def _small_equivariant_cnn(seed=0):
    """Lifting and group convolutions, equivariant GroupNorm, a Dense head: every per-example rule."""
    tf.keras.utils.set_random_seed(seed)
    inputs = tf.keras.Input([32, 32, 3])
    x = tf.keras.layers.Rescaling(1 / 255.0)(inputs)
    x = layers.LiftingConv2D(4, 3, group="C4", padding="same")(x)
    x = layers.SpatialPooling2D(4)(x)
    x = layers.GroupNormalization(groups=2, group="C4", center=True, scale=True)(x)
    x = tf.keras.layers.Activation("relu")(x)
    x = layers.GroupConv2D(4, 3, group="C4", padding="same")(x)
    x = layers.GroupPooling("C4")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf.keras.layers.Dense(10)(x)
    return tf.keras.Model(inputs, outputs)


def _plain_cnn(seed=0):
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([
        tf.keras.Input([32, 32, 3]), tf.keras.layers.Rescaling(1 / 255.0),
        tf.keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu"),
        tf.keras.layers.GroupNormalization(groups=4),
        tf.keras.layers.Conv2D(8, 3, strides=2, padding="valid"),
        tf.keras.layers.Flatten(), tf.keras.layers.Dense(10)])


def _loss():
    return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _physical_batches(steps):
    randomness = StepRandomness(KEY)
    sampler = data_lib.PoissonSampler(N, B / N, P, randomness.sampler_seed())
    return sampler, sum(len(sampler.physical_batches(t)) for t in range(steps))


@needs_data
def test_fit_equals_the_training_programs_dp_step(cifar):
    images, labels, _, _ = cifar
    steps = 3
    # train.py's pieces: keyed sampler and noise, DPStep accumulating physical batches, one update per step.
    reference = _small_equivariant_cnn()
    randomness = StepRandomness(KEY)
    sampler, num_batches = _physical_batches(steps)
    optimizer = DPKerasSGDOptimizer(l2_norm_clip=CLIP, noise_multiplier=SIGMA, expected_batch_size=B,
                                      learning_rate=LR)
    step_fn = DPStep(reference, None, optimizer)
    taken = 0
    for batch in data_lib.make_train_dataset(images, labels, sampler, K, seed=0, num_steps=steps):
        step_fn.accumulate(batch["views"], batch["labels"], batch["mask"])
        if bool(batch["last"]):
            optimizer.set_noise_seed(randomness.noise_seed(taken + 1))
            step_fn.apply()
            taken += 1

    private = eqdp_tf.make_private(_small_equivariant_cnn(), l2_norm_clip=CLIP, noise_multiplier=SIGMA,
                                   dataset_size=N, batch_size=B, noise_seed=KEY)
    private.compile(optimizer=tf.keras.optimizers.SGD(LR), loss=_loss(), metrics=["accuracy"])
    history = private.fit(private.poisson_batches(images, labels, physical_batch_size=P, num_views=K, seed=0),
                          steps_per_epoch=num_batches, epochs=1, verbose=0)
    assert int(private.dp_steps.numpy()) == steps
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(reference.get_weights(), private.inner.get_weights()))
    assert worst < 1e-5, worst
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(_small_equivariant_cnn().get_weights(), private.inner.get_weights()))
    assert moved > 1e-3  # the comparison is not between two untrained models
    assert history.history["epsilon"][-1] == pytest.approx(accounting.compute_epsilon(SIGMA, B / N, steps, 1e-5))


@needs_data
def test_no_noise_and_no_clipping_is_plain_sgd(cifar):
    images, labels, _, _ = cifar
    plain = _plain_cnn()
    plain.compile(optimizer=tf.keras.optimizers.SGD(LR), loss=_loss())
    plain.fit(images[:2 * B], labels[:2 * B], batch_size=B, shuffle=False, epochs=1, verbose=0)

    private = eqdp_tf.make_private(_plain_cnn(), l2_norm_clip=1e9, noise_multiplier=0.0, dataset_size=N,
                                   batch_size=B)
    private.compile(optimizer=tf.keras.optimizers.SGD(LR), loss=_loss())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private.fit(images[:2 * B], labels[:2 * B], batch_size=B, shuffle=False, epochs=1, verbose=0)
    assert int(private.dp_steps.numpy()) == 2
    for a, b in zip(plain.get_weights(), private.inner.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


def test_noise_std_of_the_update_is_lr_sigma_c_over_b():
    # A model whose gradient is zero (zero inputs, no bias): the update is the noise alone, lr * N(0, (sigma C)^2) / B.
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input([1, 1, 4]), tf.keras.layers.Flatten(),
                                 tf.keras.layers.Dense(1000, use_bias=False)])
    before = model.get_weights()[0].copy()
    private = eqdp_tf.make_private(model, l2_norm_clip=2.0, noise_multiplier=3.0, dataset_size=1000, batch_size=50)
    private.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=tf.keras.losses.MeanSquaredError())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private.fit(np.zeros([50, 1, 1, 4], np.float32), np.zeros([50, 1000], np.float32), batch_size=50,
                    epochs=1, verbose=0)
    update = private.inner.get_weights()[0] - before
    assert np.std(update) == pytest.approx(0.1 * 3.0 * 2.0 / 50, rel=0.05)
    assert abs(np.mean(update)) < 0.1 * 0.012 * 4 / math.sqrt(update.size) * 10


def test_train_on_batch_adds_fresh_keyed_noise_at_every_step():
    """train_on_batch runs no callbacks; its steps once all reused one noise seed (their differences noise-free)."""
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input([1, 1, 4]), tf.keras.layers.Flatten(),
                                 tf.keras.layers.Dense(1000, use_bias=False)])
    private = eqdp_tf.make_private(model, l2_norm_clip=2.0, noise_multiplier=3.0, dataset_size=1000, batch_size=50)
    private.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=tf.keras.losses.MeanSquaredError())
    updates = []
    for _ in range(2):
        before = private.inner.get_weights()[0].copy()
        private.train_on_batch(np.zeros([50, 1, 1, 4], np.float32), np.zeros([50, 1000], np.float32))
        updates.append((private.inner.get_weights()[0] - before).ravel())
    assert int(private.dp_steps.numpy()) == 2
    for update in updates:
        assert np.std(update) == pytest.approx(0.1 * 3.0 * 2.0 / 50, rel=0.05)
    assert abs(np.corrcoef(*updates)[0, 1]) < 0.05


@needs_data
def test_callbacks_see_epsilon_and_the_ceiling_stops_training(cifar, tmp_path):
    images, labels, test_images, test_labels = cifar
    private = eqdp_tf.make_private(_plain_cnn(), l2_norm_clip=CLIP, target_epsilon=3.0, dataset_size=N,
                                   batch_size=B, steps=4, noise_seed=KEY)
    assert private.max_steps == 4
    private.compile(optimizer=tf.keras.optimizers.SGD(LR), loss=_loss(), metrics=["accuracy"])
    log = tmp_path / "log.csv"
    ema = eqdp_tf.ExponentialMovingAverage(0.9)
    callbacks = [tf.keras.callbacks.CSVLogger(str(log)), tf.keras.callbacks.TensorBoard(str(tmp_path / "tb")),
                 tf.keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt"), save_weights_only=True), ema]
    _, per_step = _physical_batches(1)
    private.fit(private.poisson_batches(images, labels, physical_batch_size=P), steps_per_epoch=3, epochs=20,
                validation_data=(test_images, test_labels), callbacks=callbacks, verbose=0)
    assert int(private.dp_steps.numpy()) == 4  # stopped at the ceiling, well before 20 epochs
    with open(log) as f:
        rows = list(csv.DictReader(f))
    assert 1 < len(rows) < 20
    for row in rows:
        expected = accounting.compute_epsilon(private.noise_multiplier, B / N, int(row["dp_steps"]), 1e-5)
        assert float(row["epsilon"]) == pytest.approx(expected, rel=1e-6)
    assert float(rows[-1]["epsilon"]) <= 3.0
    assert os.listdir(tmp_path / "tb")
    # Once at the ceiling, no further step starts.
    with pytest.raises(PrivacyError, match="above the ceiling 3"):
        private.fit(private.poisson_batches(images, labels, physical_batch_size=P), steps_per_epoch=1, verbose=0)
    assert int(private.dp_steps.numpy()) == 4
    # EMA: a separate averaged copy, used for evaluation with the callback.
    averaged = ema.average_model.get_weights()
    assert any(np.max(np.abs(a - b)) > 0 for a, b in zip(averaged, private.inner.get_weights()))
    trained = private.inner.get_weights()
    private.evaluate(test_images, test_labels, callbacks=[ema], verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(trained, private.inner.get_weights()))  # put back


@needs_data
def test_equivariant_resnet9_trains_and_saves(cifar, tmp_path):
    images, labels, test_images, _ = cifar
    private = eqdp_tf.make_private(build_model("eq_resnet9", group="C4", restrict=None, head="paper"),
                                   l2_norm_clip=2.0, noise_multiplier=1.0, dataset_size=N, batch_size=B)
    private.compile(optimizer=tf.keras.optimizers.SGD(1.0), loss=_loss(), metrics=["accuracy"])
    history = private.fit(private.poisson_batches(images, labels, physical_batch_size=32), steps_per_epoch=2,
                          verbose=0)
    assert np.isfinite(history.history["loss"][0]) and history.history["dp_steps"][0] >= 1
    probabilities = private.predict(test_images[:4], verbose=0)
    assert probabilities.shape == (4, 10)
    private.save(str(tmp_path / "saved"))
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(loaded(tf.constant(test_images[:4]), training=False), probabilities,
                               atol=1e-4)


def test_plain_batches_warn_once():
    private = eqdp_tf.make_private(_plain_cnn(), l2_norm_clip=1.0, noise_multiplier=1.0, dataset_size=64,
                                   batch_size=16)
    private.compile(optimizer="sgd", loss=_loss())
    images, labels = np.zeros([16, 32, 32, 3], np.uint8), np.zeros([16], np.int64)
    with pytest.warns(UserWarning, match="not Poisson-sampled"):
        private.fit(images, labels, batch_size=16, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        private.fit(images, labels, batch_size=16, verbose=0)


@pytest.mark.parametrize("case, fragment", [
    ("batchnorm", "BatchNormalization"),
    ("adam", "trains with SGD"),
    ("steps_per_execution", "steps_per_execution must be 1"),
    ("scalar loss", "one loss per input"),
    ("no noise given", "give noise_multiplier, or target_epsilon"),
    ("nan clip", "l2_norm_clip must be a finite number"),
    ("poisson without steps_per_epoch", "pass steps_per_epoch"),
])
def test_refusals(case, fragment):
    def private(model=None, **overrides):
        settings = dict(l2_norm_clip=1.0, noise_multiplier=1.0, dataset_size=64, batch_size=16)
        settings.update(overrides)
        return eqdp_tf.make_private(model or _plain_cnn(), **settings)

    images, labels = np.zeros([16, 32, 32, 3], np.uint8), np.zeros([16], np.int64)
    with pytest.raises(ConfigError, match=fragment), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case == "batchnorm":
            private(tf.keras.Sequential([tf.keras.Input([32, 32, 3]), tf.keras.layers.Conv2D(4, 3),
                                         tf.keras.layers.BatchNormalization()]))
        elif case == "adam":
            private().compile(optimizer=tf.keras.optimizers.Adam(), loss=_loss())
        elif case == "steps_per_execution":
            private().compile(optimizer="sgd", loss=_loss(), steps_per_execution=4)
        elif case == "scalar loss":
            model = private()
            model.compile(optimizer="sgd", loss=lambda y, logits: tf.reduce_mean(logits))
            model.fit(images, labels, batch_size=16, verbose=0)
        elif case == "no noise given":
            private(noise_multiplier=None)
        elif case == "nan clip":
            private(l2_norm_clip=float("nan"))
        else:
            model = private()
            model.compile(optimizer="sgd", loss=_loss())
            model.fit(model.poisson_batches(np.zeros([64, 32, 32, 3], np.uint8), np.zeros([64], np.int64),
                                            physical_batch_size=16), verbose=0)


def _documented_example(page, name):
    """The python block between ``<!-- name -->`` and ``<!-- /name -->`` in ``page`` (relative to the repository)."""
    from conftest import REPO_ROOT

    with open(os.path.join(REPO_ROOT, page)) as f:
        text = f.read()
    return text.split(f"<!-- {name} -->\n```python\n", 1)[1].split(f"```\n<!-- /{name} -->", 1)[0]


def _run_example(code, folder, printed=r"epsilon (?P<epsilon>\S+) after (?P<steps>\d+) steps"):
    """Runs ``code`` as a script in ``folder`` with this checkout's packages; returns (steps, epsilon) from the line
    it printed, which matches ``printed``."""
    import re
    import subprocess
    import sys

    from conftest import REPO_ROOT

    script = folder / "example.py"
    script.write_text(code)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT)
    proc = subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(printed, proc.stdout)
    assert match, proc.stdout[-2000:]
    return int(match.group("steps")), float(match.group("epsilon"))


@needs_data
def test_keras_page_fit_example_runs(tmp_path):
    """docs/keras.md's make_private example, shrunk to 256 examples and 2 steps."""
    import re

    code = _documented_example("docs/keras.md", "fit-example")
    assert len(code.strip().splitlines()) <= 30
    code = re.sub(r"^DATA = .*$", f"DATA = {CIFAR10_DIR!r}", code, flags=re.M)
    code = re.sub(r"^TRAIN, STEPS = .*$", "TRAIN, STEPS = 256, 2", code, flags=re.M)
    code = code.replace("steps_per_epoch=100", "steps_per_epoch=2")
    printed = r"test accuracy \S+, epsilon (?P<epsilon>\S+) after (?P<steps>\d+) steps"
    steps, epsilon = _run_example(code, tmp_path, printed)
    assert epsilon <= 8.0 and steps >= 2
    assert "epsilon" in (tmp_path / "fit_log.csv").read_text().splitlines()[0].split(",")


@needs_data
def test_readme_quick_start_example_runs(tmp_path):
    """README's ten-line make_private example, on 256 local examples for 2 steps: it stops at its epsilon."""
    import re

    code = _documented_example("README.md", "quickstart-example")
    assert len([line for line in code.splitlines() if line.strip() and not line.startswith("#")]) <= 15
    code, loads = re.subn(r"^x, y = load_cifar10\(.*$", f"x, y = load_cifar10('train', {CIFAR10_DIR!r}, 256)", code,
                          flags=re.M)
    assert loads == 1 and "steps=300" in code
    steps, epsilon = _run_example(code.replace("steps=300", "steps=2"), tmp_path)
    assert steps == 2 and 7.0 < epsilon <= 8.0  # calibrated to epsilon 8 over the 2 planned steps, and stopped there
