"""Privacy properties of what a run releases, each checked on every path a user can take to it (issue 29).

The pieces of the DP engine have their own tests; these check the released quantities, in the spirit of Opacus'
and jax_privacy's DP-correctness tests and TF-Privacy's privacy tests:

1. Noise: the released update carries N(0, (lr sigma C / qN)^2) once per logical step, for every way of setting
   sigma (given, calibrated to a target epsilon, TAN-scaled, recalibrated on resume), every entry point (train.py,
   ``make_private(...).fit`` and ``train_on_batch``, TF-Privacy's ``DPModel`` with ``layer_registry()``) and under
   ``--distribution=mirrored``; consecutive steps' noise is independent, also across a resume.
2. Sampling is secret: batch membership and noise come from the run's key, never from ``--seed`` or a step counter;
   ``--dp_seed`` is the one public way, and says so.
3. What is written (checkpoints, export, metrics.jsonl, TensorBoard, privacy.json, the journal) holds the model,
   the EMA weights and the optimizer, and never the key, a noise seed or a gradient sum; dp_secret.json is the
   owner's alone.
4. The epsilon reported everywhere is the run's own, that of dp_accounting for the steps in the journal: re-taken
   steps count again, and an empty Poisson batch is a noise-only step that counts.

(Clipping on every norm route, property 5, is in test_privacy_clipping.py.)

How the noise is observed: the models here (``probe_model``) carry a Dense kernel of 50,000 weights whose input is
always zero, so its gradient is exactly zero and its change in a step is the released noise alone, -lr n / qN
(with momentum m, the change minus m times the previous change). Training runs go through ``loop.run``, everything
train.py does after parsing flags, with that model in place of the configured one; the kernel is read from each
checkpoint as it is written (a released file), and a step's batch from the images the training loop consumed.
The runs that go through the command line and the mirrored strategy are subprocesses, under the ``slow`` marker.
"""

import contextlib
import dataclasses
import io
import json
import os
import signal
import stat
import subprocess
import sys
import warnings

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

import eqdp_tf
from conftest import CIFAR10_DIR, REPO_ROOT, needs_cifar10, subprocess_env
from eqdp_tf import data as data_lib
from eqdp_tf.config import TrainConfig
from eqdp_tf.privacy import randomness as randomness_lib
from eqdp_tf.training import loop, secret_key, trainer
from eqdp_tf.training.checkpoint import CheckpointStore, Interrupted
from eqdp_tf.training.checkpoint_journal import JOURNAL_NAME

TRAIN_PY = os.path.join(REPO_ROOT, "train.py")
THIS_FILE = os.path.abspath(__file__)
DELTA = 1e-5
# The dead kernel: DEAD_IN x DEAD_OUT weights on an all-zero input. The std of 50,000 draws is within 0.32% of the
# true one (one standard deviation), so TOLERANCE is about ten of those, and far from a factor sqrt(2) or 1/2.
DEAD_IN, DEAD_OUT = 5000, 10
TOLERANCE = 0.03
# |correlation| of 50,000 pairs of independent draws is about 0.0045 (one sd); a reused noise gives 1.
MAX_CORRELATION = 0.05
N, B, LR, CLIP, SIGMA = 256, 32, 0.5, 2.0, 1.5  # train.py runs: q = 1/8


# --------------------------------------------------------------------------------------------
# The probe model and independent accounting


def probe_model(cfg=None, dataset=None):
    """A small CNN on raw (CIFAR-10) images plus the dead kernel (zero gradient, so its update is the noise alone).
    Stands in for ``trainer.build_model(cfg, dataset)``."""
    inputs = tf.keras.Input([32, 32, 3])
    x = tf.keras.layers.Rescaling(1 / 255.0)(inputs)
    h = tf.keras.layers.Conv2D(4, 3, strides=4, activation="relu")(x)
    h = tf.keras.layers.GroupNormalization(2)(h)
    logits = tf.keras.layers.Dense(10)(tf.keras.layers.GlobalAveragePooling2D()(h))
    zeros = tf.keras.layers.Lambda(lambda t: tf.zeros([tf.shape(t)[0], DEAD_IN]))(inputs)
    dead = tf.keras.layers.Dense(DEAD_OUT, use_bias=False, kernel_initializer="zeros", name="dead")(zeros)
    return tf.keras.Model(inputs, tf.keras.layers.Add()([logits, dead]))


def dead_kernel(model):
    return next(v for v in model.trainable_variables if v.shape == (DEAD_IN, DEAD_OUT)).numpy().copy()


def step_noises(kernels, momentum=0.0):
    """{step: the noise term of that step's update} from {step: dead kernel after it} (the kernel starts at 0):
    an SGD update with momentum m is v_t = m v_{t-1} - lr g_t, so -lr g_t = (w_t - w_{t-1}) - m (w_{t-1} - w_{t-2})."""
    previous, change, noises = np.zeros([DEAD_IN, DEAD_OUT]), np.zeros([DEAD_IN, DEAD_OUT]), {}
    for step in range(1, max(kernels) + 1):
        new_change = kernels[step] - previous
        noises[step] = (new_change - momentum * change).ravel()
        previous, change = kernels[step], new_change
    return noises


def measured_sigma(noise, learning_rate, clip, expected_batch):
    """The noise multiplier a step's noise term shows: std = lr sigma C / (q N)."""
    return float(np.std(noise)) * expected_batch / (learning_rate * clip)


def correlation(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def assert_independent(noises):
    """Every pair of steps' noise is uncorrelated (a reused or restarted noise stream gives 1)."""
    steps = sorted(noises)
    for i, s in enumerate(steps):
        for t in steps[i + 1:]:
            assert abs(correlation(noises[s], noises[t])) < MAX_CORRELATION, (s, t)


def assert_same_noise(a, b):
    """The same draw, to float32 rounding of the updates it is read from (an independent one differs by ~its std)."""
    assert np.max(np.abs(a - b)) < 1e-4 * np.std(a)


def dp_epsilon(segments, delta=DELTA):
    """Epsilon straight from dp_accounting's RDP accountant for (q, sigma, steps) segments, without our code."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for q, sigma, steps in segments:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def smallest_sigma(target, q, steps, spent=(), delta=DELTA):
    """The smallest sigma (to 0.01%) whose steps, after those ``spent``, stay within ``target`` (bisection on
    ``dp_epsilon``)."""
    lo, hi = 0.05, 100.0
    assert dp_epsilon([*spent, (q, lo, steps)], delta) > target >= dp_epsilon([*spent, (q, hi, steps)], delta)
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dp_epsilon([*spent, (q, mid, steps)], delta) > target else (lo, mid)
    return hi


def assert_sigma(measured, expected):
    """The measured sigma is the expected one; calibration may round sigma up by its tolerance of 0.01."""
    assert expected * (1 - TOLERANCE) <= measured <= (expected + 0.01) * (1 + TOLERANCE), (measured, expected)


def journal_records(out):
    with open(os.path.join(out, JOURNAL_NAME)) as f:
        return [json.loads(line) for line in f if line.strip()]


def counted_steps(records):
    """The step records the journal's rule counts: those of each process up to its last release."""
    released = {}
    for r in records:
        if r["event"] == "release":
            released[r["attempt"]] = max(released.get(r["attempt"], 0), r["step"])
    return [r for r in records if r["event"] == "step" and r["step"] <= released.get(r["attempt"], -1)]


def journal_epsilon(out):
    steps = counted_steps(journal_records(out))
    return dp_epsilon([(r["sampling_rate"], r["noise_multiplier"], 1) for r in steps]), len(steps)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# Training runs (loop.run with the probe model), observed through what they release


@dataclasses.dataclass
class Run:
    cfg: TrainConfig
    result: dict  # loop.run's return value (None when it was interrupted)
    kernels: dict  # step -> the dead kernel in the checkpoint written after that step
    members: dict  # step -> sorted tuple of the training examples its logical batch held
    printed: str

    @property
    def out(self):
        return self.cfg.output_dir

    def noises(self, before=None):
        """Noise terms of this run's steps; ``before``: the kernels an earlier process of the run released."""
        return step_noises({**(before.kernels if before else {}), **self.kernels}, self.cfg.momentum)


def run_config(out, **overrides):
    settings = dict(data_dir=CIFAR10_DIR, train_subset=N, test_subset=32, steps=3, batch_size=B,
                    physical_batch_size=16, num_views=1, noise_multiplier=SIGMA, target_epsilon=None,
                    l2_norm_clip=CLIP, learning_rate=LR, momentum=0.0, delta=DELTA, eval_every=100,
                    checkpoint_every=1, eval_batch_size=32, output_dir=str(out), export=False, seed=3)
    settings.update(overrides)
    return TrainConfig(**settings)


def _recording_dataset(make, members):
    """``data.make_train_dataset`` whose batches are recorded (by the image bytes of view 0, the image itself)."""

    def dataset(images, labels, sampler, num_views, seed, **kwargs):
        stream = make(images, labels, sampler, num_views, seed, **kwargs)
        index = {image.tobytes(): i for i, image in enumerate(images)}

        def batches():
            for batch in stream:
                views, mask = batch["views"].numpy(), batch["mask"].numpy().reshape(-1)
                views = views.reshape(-1, *views.shape[-4:])  # replicas' shares side by side
                step = int(batch["step"]) + 1
                members.setdefault(step, []).extend(index[v[0].tobytes()] for v in views[mask == 1])
                yield batch

        return batches()

    return dataset


def train(cfg, stop_after=None):
    """``loop.run(cfg)`` with the probe model; a SIGTERM right after the checkpoint of step ``stop_after``."""
    kernels, members = {}, {}
    save = CheckpointStore.save

    def recording_save(store, step):
        prefix = save(store, step)
        reader = tf.train.load_checkpoint(prefix)
        name = next(n for n, shape in reader.get_variable_to_shape_map().items()
                    if n.startswith("model/") and shape == [DEAD_IN, DEAD_OUT] and "OPTIMIZER_SLOT" not in n)
        kernels[step] = reader.get_tensor(name)
        if step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop stops after this step, as on a real SIGTERM
        return prefix

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(trainer, "build_model", probe_model)
        patch.setattr(CheckpointStore, "save", recording_save)
        patch.setattr(data_lib, "make_train_dataset", _recording_dataset(data_lib.make_train_dataset, members))
        try:
            result = loop.run(cfg)
        except Interrupted:
            result = None
    return Run(cfg, result, kernels, {t: tuple(sorted(m)) for t, m in members.items()}, printed.getvalue())


def _truncate_journal_after_release(out, step):
    records = journal_records(out)
    end = max(i for i, r in enumerate(records) if r["event"] == "release" and r["step"] == step)
    with open(os.path.join(out, JOURNAL_NAME), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records[:end + 1]))


def lose_checkpoints_after(out, step):
    """The run folder as a crash leaves it right after the release of ``step``'s checkpoint, whose file then turns
    out unreadable: no checkpoint is usable (the store keeps two), so every step released so far is re-taken."""
    _truncate_journal_after_release(out, step)
    folder = os.path.join(out, "checkpoints")
    for name in os.listdir(folder):
        if name.startswith("ckpt-") and int(name[5:].split(".")[0]) > step:
            os.remove(os.path.join(folder, name))
    data = os.path.join(folder, f"ckpt-{step}.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        f.write(bytes(64))
    with open(os.path.join(folder, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "ckpt-{step}"\n')


def _empty_first_step_dp_seed(num_examples, batch_size):
    """A --dp_seed whose first Poisson batch is empty and whose second is not."""
    for dp_seed in range(1000):
        key = secret_key.load_or_create_key(None, dp_seed)
        sampler = data_lib.PoissonSampler(num_examples, batch_size / num_examples, 8,
                                          randomness_lib.StepRandomness(key).sampler_seed(0))
        if len(sampler.sample(0)) == 0 and len(sampler.sample(1)) > 0:
            return dp_seed
    raise AssertionError("no such seed")


class Runs:
    """The training runs the properties are checked on, each made on first use (so -k selections stay quick)."""

    def __init__(self, folder):
        self.folder = folder
        self._made = {}

    def __getattr__(self, name):
        if name.startswith("_") or not hasattr(type(self), "_" + name):
            raise AttributeError(name)
        if name not in self._made:
            self._made[name] = getattr(self, "_" + name)()
        return self._made[name]

    def _dir(self, name):
        return os.path.join(self.folder, name)

    def _plain(self):
        """--noise_multiplier, momentum, an export: the run whose files property 3 reads."""
        return train(run_config(self._dir("plain"), momentum=0.9, export=True))

    def _twin(self):
        """The same public flags as ``plain``, in another folder: another secret key."""
        return train(run_config(self._dir("twin"), momentum=0.9, export=True))

    def _twin_lost(self):
        """``twin`` resumed after its checkpoints were lost past the release of step 2: steps 1-2 re-taken."""
        self.twin  # noqa: B018 - the first process
        lose_checkpoints_after(self._dir("twin"), 2)
        return train(run_config(self._dir("twin"), momentum=0.9, export=True))

    def _calibrated(self):
        """--target_epsilon=6 over 4 steps, stopped by SIGTERM after step 2."""
        return train(run_config(self._dir("resumed"), noise_multiplier=None, target_epsilon=6.0, steps=4),
                     stop_after=2)

    def _recalibrated(self):
        """``calibrated`` resumed with --target_epsilon=8: sigma of steps 3-4 calibrated anew after the 2 spent."""
        self.calibrated  # noqa: B018
        return train(run_config(self._dir("resumed"), noise_multiplier=None, target_epsilon=8.0, steps=4,
                                allow_privacy_change=True))

    def _simulated(self):
        """A TAN simulation of batch 128 at --target_epsilon=8 (the simulated run's), trained at batch 32."""
        return train(run_config(self._dir("simulated"), noise_multiplier=None, target_epsilon=8.0,
                                simulated_batch_size=128, steps=2, export=True))

    def _public_seed(self):
        return train(run_config(self._dir("public_seed"), dp_seed=5, steps=1))

    def _public_seed_other_init(self):
        """``public_seed`` with another --seed (initialisation and augmentation)."""
        return train(run_config(self._dir("public_seed_other_init"), dp_seed=5, seed=4, steps=1))

    def _empty_batch(self):
        """q = 1/64: a --dp_seed whose first batch is empty."""
        return train(run_config(self._dir("empty_batch"), train_subset=64, batch_size=1, physical_batch_size=8,
                                dp_seed=_empty_first_step_dp_seed(64, 1), steps=2))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(str(tmp_path_factory.mktemp("privacy_runs")))


# --------------------------------------------------------------------------------------------
# 1. The noise in the released update


def _expected_sigma(runs, path):
    """(run, earlier process or None, {step: sigma it must show}) for a train.py path."""
    q = B / N
    if path == "noise_multiplier":
        return runs.plain, None, {t: SIGMA for t in (1, 2, 3)}
    if path == "target_epsilon":
        return runs.calibrated, None, {t: smallest_sigma(6.0, q, 4) for t in (1, 2)}
    if path == "simulated_batch_size":  # the simulated run's sigma (at q x 4), scaled down by 4
        return runs.simulated, None, {t: smallest_sigma(8.0, 4 * q, 2) / 4 for t in (1, 2)}
    assert path == "resume_recalibrated"
    spent = [(r["sampling_rate"], r["noise_multiplier"], 1)
             for r in counted_steps(journal_records(runs.calibrated.out))]
    assert len(spent) == 2
    return runs.recalibrated, runs.calibrated, {t: smallest_sigma(8.0, q, 2, spent=spent) for t in (3, 4)}


@needs_cifar10
@pytest.mark.parametrize("path", ["noise_multiplier", "target_epsilon", "simulated_batch_size", "resume_recalibrated"])
def test_train_noise_is_lr_sigma_c_over_qn_once_per_step(runs, path):
    run, before, expected = _expected_sigma(runs, path)
    noises = run.noises(before)
    for step, sigma in expected.items():
        assert_sigma(measured_sigma(noises[step], LR, CLIP, B), sigma)
        assert abs(np.mean(noises[step])) < 0.02 * np.std(noises[step])
    # The run says it trained with the noise it added.
    recorded = {r["step"]: r["noise_multiplier"] for r in journal_records(run.out) if r["event"] == "step"}
    for step in expected:
        assert measured_sigma(noises[step], LR, CLIP, B) == pytest.approx(recorded[step], rel=TOLERANCE)
    assert_independent(noises)  # across the resume too: the noise stream is not restarted


# --------------------------------------------------------------------------------------------
# Keras: make_private(...).fit and train_on_batch; TF-Privacy's DPModel with our layer registry


def indexed_images(count, seed=0):
    """Distinct random uint8 images, so that a batch's members can be read off its pixels."""
    return np.random.default_rng(seed).integers(0, 256, [count, 32, 32, 3], dtype=np.uint8)


KERAS_N, KERAS_B, KERAS_LR = 256, 64, 0.5


def private_probe(seed=0, **settings):
    tf.keras.utils.set_random_seed(seed)
    settings = {"l2_norm_clip": CLIP, "dataset_size": KERAS_N, "batch_size": KERAS_B, **settings}
    private = eqdp_tf.make_private(probe_model(), **settings)
    private.compile(optimizer=tf.keras.optimizers.SGD(KERAS_LR),
                    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return private


class _DeadKernelPerStep(tf.keras.callbacks.Callback):
    """Records the dead kernel after every DP step; stops ``fit`` after ``steps`` of them."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.kernels = steps, {}

    def on_train_batch_end(self, batch, logs=None):
        taken = int(self.model.dp_steps.numpy())
        if taken and taken not in self.kernels:
            self.kernels[taken] = dead_kernel(self.model.inner)
        if taken >= self.steps:
            self.model.stop_training = True


def fit_poisson(private, steps, images=None, labels=None):
    """``fit`` on ``poisson_batches`` (physical batches of 16) until ``steps`` DP steps; {step: dead kernel}."""
    images = indexed_images(private.settings.dataset_size) if images is None else images
    labels = np.arange(len(images)) % 10 if labels is None else labels
    record = _DeadKernelPerStep(steps)
    private.fit(private.poisson_batches(images, labels, physical_batch_size=16), steps_per_epoch=1000,
                callbacks=[record], verbose=0)
    assert int(private.dp_steps.numpy()) == steps
    return record.kernels


@pytest.mark.parametrize("setting", ["noise_multiplier", "target_epsilon"])
def test_fit_noise_is_lr_sigma_c_over_qn_once_per_step(setting):
    q = KERAS_B / KERAS_N
    if setting == "noise_multiplier":
        private, expected = private_probe(noise_multiplier=SIGMA), SIGMA
    else:  # README's usage: sigma calibrated to the target epsilon over the planned steps
        private, expected = private_probe(target_epsilon=3.0, steps=3), smallest_sigma(3.0, q, 3)
    noises = step_noises(fit_poisson(private, 2))
    for noise in noises.values():
        assert_sigma(measured_sigma(noise, KERAS_LR, CLIP, KERAS_B), expected)
    assert_independent(noises)
    assert private.epsilon() == pytest.approx(dp_epsilon([(q, private.noise_multiplier, 2)]), rel=1e-9)


def test_train_on_batch_draws_fresh_noise_for_every_step():
    """Keras' train_on_batch runs no callbacks: each step must still get its own keyed noise."""
    private = private_probe(noise_multiplier=SIGMA)
    images, labels = indexed_images(KERAS_B), np.arange(KERAS_B) % 10
    kernels = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in (1, 2, 3):
            private.train_on_batch(images, labels)
            kernels[step] = dead_kernel(private.inner)
    assert int(private.dp_steps.numpy()) == 3
    noises = step_noises(kernels)
    for noise in noises.values():
        assert_sigma(measured_sigma(noise, KERAS_LR, CLIP, KERAS_B), SIGMA)
    assert_independent(noises)
    # The noise is the keyed noise of fit: a model with the same key taking the same steps by fit adds the same.
    twin = private_probe(noise_multiplier=SIGMA, noise_seed=7)
    again = private_probe(noise_multiplier=SIGMA, noise_seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin.train_on_batch(images, labels)
        again.fit(images, labels, batch_size=KERAS_B, epochs=1, verbose=0)
    assert_same_noise(dead_kernel(twin.inner).ravel(), dead_kernel(again.inner).ravel())


def test_a_step_traced_without_its_noise_seed_is_refused():
    """A custom loop calling the traced train step directly would reuse the last seed: it is refused instead."""
    private = private_probe(noise_multiplier=SIGMA)
    images, labels = tf.constant(indexed_images(8)), tf.constant(np.arange(8) % 10)
    step = tf.function(private.train_step, autograph=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="noise seed"):
        step((images, labels))
    assert int(private.dp_steps.numpy()) == 0


def test_tf_privacy_dp_model_with_our_registry_adds_lr_sigma_c_over_b():
    from tensorflow_privacy.privacy.keras_models.dp_keras_model import DPModel

    tf.keras.utils.set_random_seed(0)
    base = probe_model()
    model = DPModel(l2_norm_clip=CLIP, noise_multiplier=SIGMA, use_xla=False, layer_registry=eqdp_tf.layer_registry(),
                    inputs=base.inputs, outputs=base.outputs)
    model.compile(optimizer=tf.keras.optimizers.SGD(KERAS_LR),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert model._enable_fast_peg_computation  # pylint: disable=protected-access  (the registry's path is taken)
    images, labels = indexed_images(2 * KERAS_B), np.arange(2 * KERAS_B) % 10
    kernels = {}
    for step in (1, 2):
        batch = slice((step - 1) * KERAS_B, step * KERAS_B)
        model.fit(images[batch], labels[batch], batch_size=KERAS_B, epochs=1, verbose=0, shuffle=False)
        kernels[step] = dead_kernel(model)
    noises = step_noises(kernels)
    for noise in noises.values():  # DPModel divides by the batch it was given
        assert_sigma(measured_sigma(noise, KERAS_LR, CLIP, KERAS_B), SIGMA)
    assert_independent(noises)


# --------------------------------------------------------------------------------------------
# 2. Sampling is secret


@needs_cifar10
def test_train_batches_and_noise_come_from_the_secret_key(runs):
    a, b = runs.plain, runs.twin
    assert a.cfg.seed == b.cfg.seed  # the same public flags
    keys = [read_json(os.path.join(run.out, secret_key.SECRET_NAME))["key"] for run in (a, b)]
    assert keys[0] != keys[1]
    for step in (1, 2, 3):
        assert len(a.members[step]) > 0 and a.members[step] != b.members[step], step
        assert abs(correlation(a.noises()[step], b.noises()[step])) < MAX_CORRELATION, step


@needs_cifar10
def test_train_the_same_key_reproduces_batches_and_noise_whatever_the_seed(runs):
    """The same --dp_seed with another --seed: the same batch and noise; and with the same secret key (a resume),
    a step never written out is taken with the same batch and noise."""
    first, other = runs.public_seed, runs.public_seed_other_init
    assert first.members[1] == other.members[1] and len(first.members[1]) > 0
    assert_same_noise(first.noises()[1], other.noises()[1])
    twin, resumed = runs.twin, runs.twin_lost  # step 3 was never recorded before the loss: not re-salted
    assert resumed.members[3] == twin.members[3]
    assert_same_noise(resumed.noises()[3], twin.noises()[3])


@needs_cifar10
def test_dp_seed_is_the_only_public_way_and_says_so(runs):
    public, secret = runs.public_seed, runs.plain
    assert not os.path.exists(os.path.join(public.out, secret_key.SECRET_NAME))
    assert read_json(os.path.join(public.out, "config.json"))["dp_seed"] == 5
    assert "warning: --dp_seed is set and published in config.json" in public.printed
    assert os.path.exists(os.path.join(secret.out, secret_key.SECRET_NAME))
    assert read_json(os.path.join(secret.out, "config.json"))["dp_seed"] is None
    assert "--dp_seed" not in secret.printed


def poisson_members(private, images, steps, seed=0):
    """The examples of the first ``steps`` logical batches ``poisson_batches`` yields (read off the pixels)."""
    index = {image.tobytes(): i for i, image in enumerate(images)}
    members, step = {}, 0
    for x, _ in private.poisson_batches(images, np.arange(len(images)) % 10, physical_batch_size=16, seed=seed):
        real = x["views"].numpy()[x["mask"].numpy() == 1, 0]
        members.setdefault(step, []).extend(index[v.tobytes()] for v in real)
        step += bool(x["last"])
        if step == steps:
            return [tuple(sorted(members.get(t, []))) for t in range(steps)]
    raise AssertionError("unreachable")


def test_fit_batches_and_noise_come_from_the_models_key():
    images = indexed_images(KERAS_N)
    secret = [private_probe(seed=0, noise_multiplier=SIGMA) for _ in range(2)]  # the same global seed
    public = [private_probe(seed=s, noise_multiplier=SIGMA, noise_seed=11) for s in (0, 1)]
    batches = [poisson_members(p, images, 3, seed=0) for p in secret]
    assert all(len(m) > 0 for m in batches[0]) and all(x != y for x, y in zip(*batches))
    # The same key: the same batches, whatever the augmentation seed and the global seed.
    assert poisson_members(public[0], images, 3, seed=0) == poisson_members(public[1], images, 3, seed=5)
    secret_noise = [step_noises(fit_poisson(p, 1, images))[1] for p in secret]
    public_noise = [step_noises(fit_poisson(p, 1, images))[1] for p in public]
    assert abs(correlation(*secret_noise)) < MAX_CORRELATION
    assert_same_noise(*public_noise)


# --------------------------------------------------------------------------------------------
# 3. What is written


def _expected_checkpoint_names(momentum):
    """Every variable a checkpoint may hold: the model and the EMA model (one entry per weight, checked below),
    the optimizer's hyperparameters, iteration count and momentum slots, the step counter and the wall time."""
    names = {"_CHECKPOINTABLE_OBJECT_GRAPH", "step/.ATTRIBUTES/VARIABLE_VALUE",
             "run_seconds/.ATTRIBUTES/VARIABLE_VALUE", "save_counter/.ATTRIBUTES/VARIABLE_VALUE"}
    names |= {f"optimizer/{h}/.ATTRIBUTES/VARIABLE_VALUE" for h in ("iter", "learning_rate", "decay", "momentum")}
    model = probe_model()
    paths = [f"layer_with_weights-{i}/{w.name.split('/')[-1].split(':')[0]}"
             for i, layer in enumerate(l for l in model.layers if l.weights) for w in layer.weights]
    for path in paths:
        names |= {f"model/{path}/.ATTRIBUTES/VARIABLE_VALUE", f"ema_model/{path}/.ATTRIBUTES/VARIABLE_VALUE"}
        if momentum:
            names.add(f"model/{path}/.OPTIMIZER_SLOT/optimizer/momentum/.ATTRIBUTES/VARIABLE_VALUE")
    return names, model


@needs_cifar10
def test_checkpoints_hold_exactly_the_model_the_ema_and_the_optimizer(runs):
    run = runs.plain
    expected, model = _expected_checkpoint_names(run.cfg.momentum)
    shapes = {w.shape for w in model.weights}
    folder = os.path.join(run.out, "checkpoints")
    for step in CheckpointStore(None, folder).steps():
        reader = tf.train.load_checkpoint(os.path.join(folder, f"ckpt-{step}"))
        found = reader.get_variable_to_shape_map()
        assert set(found) == expected, set(found) ^ expected
        assert all(tuple(s) in shapes for n, s in found.items() if n.startswith(("model/", "ema_model/")))
        assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == step


def _secrets_of(run):
    """Byte strings that must not appear in any file but dp_secret.json: the key and every seed derived from it."""
    key = int(read_json(os.path.join(run.out, secret_key.SECRET_NAME))["key"], 16)
    randomness = randomness_lib.StepRandomness(key)
    words = [key.to_bytes(32, "little"), f"{key:064x}".encode(), str(key).encode()]
    sampler_seed = randomness.sampler_seed(0)
    words += [sampler_seed.to_bytes(16, "little"), str(sampler_seed).encode()]
    for step in range(1, run.cfg.steps + 1):
        seed = randomness.noise_seed(step)
        words += [seed.astype("<i8").tobytes()] + [str(int(s)).encode() for s in seed]
    return words


@needs_cifar10
def test_no_key_seed_or_gradient_sum_in_any_file_written(runs):
    run = runs.plain
    found = []
    checked = 0
    for root, _, names in os.walk(run.out):
        for name in names:
            path = os.path.join(root, name)
            if path == os.path.join(run.out, secret_key.SECRET_NAME):
                continue
            with open(path, "rb") as f:
                content = f.read()
            checked += 1
            found += [(path, w[:16]) for w in _secrets_of(run) if w in content]
            assert b"grad_sum" not in content and b"noise_seed" not in content, path
    assert checked >= 10 and not found, found


@needs_cifar10
def test_the_secret_file_is_its_owners_alone(runs):
    info = os.stat(os.path.join(runs.plain.out, secret_key.SECRET_NAME))
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()


@needs_cifar10
def test_reports_and_journal_hold_only_their_documented_fields(runs):
    run = runs.plain
    assert set(read_json(os.path.join(run.out, "privacy.json"))) == {
        "accountant", "noise_multiplier", "sampling_rate", "sampling_method", "steps", "batch_size", "dataset_size",
        "l2_norm_clip", "delta", "epsilon", "note", "ledger", "model_steps", "steps_spent", "steps_counted_twice",
        "steps_discarded", "journal"}
    for line in metrics(run.out):
        assert set(line) == {"step", "epoch", "loss", "train_accuracy", "test_loss", "test_accuracy", "epsilon",
                             "examples_per_sec", "views_per_sec", "wall_seconds", "run_wall_seconds"}
    settings = {"sampling_rate", "noise_multiplier", "l2_norm_clip", "dataset_size"}
    fields = {"start": settings | {"batch_size", "delta", "steps", "dp", "sampling", "simulated_batch_size",
                                   "dataset_fingerprint"},
              "step": settings, "release": {"what"}}
    for record in journal_records(run.out):
        assert set(record) == {"event", "attempt", "step"} | fields[record["event"]], record
    tags = set()
    for root, _, names in os.walk(os.path.join(run.out, "tensorboard")):
        for name in names:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                for value in event.summary.value:
                    tags.add(value.tag)
                    assert tf.make_ndarray(value.tensor).size == 1, value.tag  # scalars only
    assert tags == {"train/loss", "train/acc", "train/eps", "train/ex_per_s", "test/accuracy", "test/loss"}


@needs_cifar10
def test_the_export_holds_only_the_ema_weights(runs):
    run = runs.plain
    export = run.result["export_path"]
    reader = tf.train.load_checkpoint(os.path.join(run.out, "checkpoints", f"ckpt-{run.cfg.steps}"))
    ema = [reader.get_tensor(n) for n in reader.get_variable_to_shape_map() if n.startswith("ema_model/")]
    saved = tf.train.load_checkpoint(os.path.join(export, "variables", "variables"))
    exported = [saved.get_tensor(n) for n in saved.get_variable_to_shape_map() if n != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert len(exported) == len(ema)
    for value in exported:
        assert any(e.shape == value.shape and np.array_equal(e, value) for e in ema)
    assert read_json(os.path.join(export, "assets.extra", "privacy.json")) == \
        read_json(os.path.join(run.out, "privacy.json"))


def test_keras_checkpoints_hold_no_gradient_sum_or_noise_seed(tmp_path):
    private = private_probe(noise_multiplier=SIGMA)
    fit_poisson(private, 1)
    private.save_weights(str(tmp_path / "weights"))
    names = set(tf.train.load_checkpoint(str(tmp_path / "weights")).get_variable_to_shape_map())
    assert not [n for n in names if "seed" in n or "grad_sum" in n or "accumulat" in n], names
    assert {n.split("/")[0] for n in names} == {"_CHECKPOINTABLE_OBJECT_GRAPH", "inner", "dp_optimizer", "dp_steps",
                                                "_loss_tracker"}


# --------------------------------------------------------------------------------------------
# 4. The epsilon of what was released


# The console prints epsilon to 3 decimals, TensorBoard keeps float32; the files keep float64.
PRECISION = {"console": 1e-3, "tensorboard": 1e-6, "privacy.json": 1e-9, "result": 1e-9, "metrics.jsonl": 1e-9,
             "export": 1e-9}


def _reported_epsilons(run):
    """Every epsilon a run reports as its guarantee: privacy.json, its return value, the last metrics line, the
    export's privacy.json, the final progress line and TensorBoard's last train/eps."""
    privacy = read_json(os.path.join(run.out, "privacy.json"))
    reported = {"privacy.json": privacy["epsilon"], "result": run.result["epsilon"],
                "metrics.jsonl": metrics(run.out)[-1]["epsilon"]}
    if run.cfg.export:
        reported["export"] = read_json(os.path.join(run.result["export_path"], "assets.extra",
                                                    "privacy.json"))["epsilon"]
    done = [line for line in run.printed.splitlines() if line.startswith("done:")]
    reported["console"] = float(done[-1].split("epsilon ")[1].split()[0])
    written = []  # (wall time, epsilon): a resumed run's event files hold both processes' steps
    for root, _, names in os.walk(os.path.join(run.out, "tensorboard")):
        for name in names:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                written += [(event.wall_time, float(tf.make_ndarray(v.tensor)))
                            for v in event.summary.value if v.tag == "train/eps"]
    reported["tensorboard"] = max(written)[1]
    return privacy, reported


@needs_cifar10
@pytest.mark.parametrize("name", ["plain", "recalibrated", "simulated", "twin_lost", "empty_batch"])
def test_reported_epsilon_is_dp_accounting_of_the_steps_in_the_journal(runs, name):
    run = getattr(runs, name)
    expected, steps = journal_epsilon(run.out)
    privacy, reported = _reported_epsilons(run)
    assert privacy["steps_spent"] == steps
    for where, value in reported.items():
        assert value == pytest.approx(expected, rel=PRECISION[where]), where


@needs_cifar10
def test_a_simulated_run_reports_its_own_epsilon_not_the_simulated_one(runs):
    run = runs.simulated
    q = B / N
    sigma = [r["noise_multiplier"] for r in journal_records(run.out) if r["event"] == "step"][-1]
    own, simulated = dp_epsilon([(q, sigma, 2)]), dp_epsilon([(4 * q, 4 * sigma, 2)])
    assert simulated <= 8.0 < own
    privacy, reported = _reported_epsilons(run)
    for where, value in reported.items():
        assert value == pytest.approx(own, rel=PRECISION[where]), where
    assert privacy["simulated_run"]["epsilon"] == pytest.approx(simulated, rel=1e-9)
    assert metrics(run.out)[-1]["simulated_epsilon"] == pytest.approx(simulated, rel=1e-9)


@needs_cifar10
def test_steps_retaken_after_a_lost_checkpoint_are_fresh_and_counted_again(runs):
    first, resumed = runs.twin, runs.twin_lost
    assert "steps 1-2 were written out in a checkpoint that is lost" in resumed.printed
    for step in (1, 2):  # released once already: a new sample and new noise, or the two releases are not two steps
        assert resumed.members[step] != first.members[step], step
        assert abs(correlation(resumed.noises()[step], first.noises()[step])) < MAX_CORRELATION, step
    privacy = read_json(os.path.join(resumed.out, "privacy.json"))
    assert (privacy["model_steps"], privacy["steps_spent"], privacy["steps_counted_twice"]) == (3, 5, 2)
    assert privacy["epsilon"] == pytest.approx(dp_epsilon([(B / N, SIGMA, 5)]), rel=1e-9)


def test_the_batch_of_a_retaken_step_is_drawn_afresh():
    """The data pipeline numbers logical steps from 0, the journal and its salt table from 1: salting step 3 (to
    re-take it) must change the batch the pipeline gives step 3, and no other."""
    images, labels = indexed_images(200), np.arange(200) % 10

    def batches(salts):
        randomness = randomness_lib.StepRandomness(123, salts)
        sampler = randomness_lib.SaltedSampler(lambda seed: data_lib.PoissonSampler(200, 0.1, 16, seed), randomness)
        members = {}
        list(_recording_dataset(data_lib.make_train_dataset, members)(images, labels, sampler, 1, 0, num_steps=5))
        return {t: tuple(sorted(m)) for t, m in members.items()}

    plain, salted = batches({}), batches({3: 1})
    assert sorted(plain) == sorted(salted) == [1, 2, 3, 4, 5]
    assert [t for t in plain if plain[t] != salted[t]] == [3]


@needs_cifar10
def test_an_empty_poisson_batch_is_a_noise_only_step_that_counts(runs):
    run = runs.empty_batch
    assert run.members.get(1, ()) == () and len(run.members[2]) > 0
    noise = run.noises()[1]
    assert_sigma(measured_sigma(noise, LR, CLIP, 1), SIGMA)  # q N = 1
    assert [r["step"] for r in counted_steps(journal_records(run.out))] == [1, 2]
    assert read_json(os.path.join(run.out, "privacy.json"))["epsilon"] == pytest.approx(
        dp_epsilon([(1 / 64, SIGMA, 2)]), rel=1e-9)


def test_fit_an_empty_poisson_batch_is_a_noise_only_step_that_counts():
    dataset_size = 64
    for noise_seed in range(1000):
        sampler = data_lib.PoissonSampler(dataset_size, 1 / dataset_size, 16,
                                          randomness_lib.StepRandomness(noise_seed).sampler_seed())
        if len(sampler.sample(0)) == 0:
            break
    private = private_probe(noise_multiplier=SIGMA, dataset_size=dataset_size, batch_size=1, noise_seed=noise_seed)
    images = indexed_images(dataset_size)
    assert poisson_members(private, images, 1) == [()]
    history = private.fit(private.poisson_batches(images, np.arange(dataset_size) % 10, physical_batch_size=16),
                          steps_per_epoch=1, verbose=0)
    assert int(private.dp_steps.numpy()) == 1
    assert_sigma(measured_sigma(dead_kernel(private.inner).ravel(), KERAS_LR, CLIP, 1), SIGMA)
    assert history.history["epsilon"][-1] == pytest.approx(dp_epsilon([(1 / dataset_size, SIGMA, 1)]), rel=1e-9)


# --------------------------------------------------------------------------------------------
# Through the command line, and under MirroredStrategy on 2 logical CPU devices (subprocesses)


def _run_child(*args, timeout=300):
    proc = subprocess.run([sys.executable, THIS_FILE, *args], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _checkpoint_kernels(out, steps):
    kernels = {}
    for step in steps:
        reader = tf.train.load_checkpoint(os.path.join(out, "checkpoints", f"ckpt-{step}"))
        name = next(n for n, s in reader.get_variable_to_shape_map().items()
                    if n.startswith("model/") and s == [DEAD_IN, DEAD_OUT] and "OPTIMIZER_SLOT" not in n)
        kernels[step] = reader.get_tensor(name)
    return kernels


@pytest.mark.slow
@needs_cifar10
@pytest.mark.parametrize("flags, expected", [
    (["--noise_multiplier=1.5"], SIGMA),
    (["--simulated_batch_size=128", "--target_epsilon=8"], "simulated"),
], ids=["noise_multiplier", "simulated_batch_size"])
def test_train_py_command_line_noise(tmp_path, flags, expected):
    out = tmp_path / "run"
    common = [f"--data_dir={CIFAR10_DIR}", f"--train_subset={N}", "--test_subset=32", "--steps=2",
              f"--batch_size={B}", "--physical_batch_size=16", "--num_views=1", f"--learning_rate={LR}",
              f"--l2_norm_clip={CLIP}", "--checkpoint_every=1", "--eval_batch_size=32", "--export=false",
              f"--output_dir={out}"]
    _run_child("train.py", *common, *flags)
    if expected == "simulated":
        expected = smallest_sigma(8.0, 4 * B / N, 2) / 4
    noises = step_noises(_checkpoint_kernels(out, (1, 2)))
    for noise in noises.values():
        assert_sigma(measured_sigma(noise, LR, CLIP, B), expected)
    assert_independent(noises)
    assert read_json(out / "config.json")["target_epsilon"] == (None if expected == SIGMA else 8.0)


@pytest.mark.slow
@needs_cifar10
def test_mirrored_training_adds_one_noise_draw_per_logical_step(tmp_path):
    found = json.loads(_run_child("mirrored", str(tmp_path / "run")).strip().splitlines()[-1])
    assert found["replicas"] == 2 and found["steps"] == [1, 2, 3]
    for sigma in found["sigmas"]:  # not 0 (no draw), not sqrt(2) sigma (one per replica)
        assert SIGMA * (1 - TOLERANCE) <= sigma <= SIGMA * (1 + TOLERANCE)
    assert max(abs(c) for c in found["correlations"]) < MAX_CORRELATION
    privacy = read_json(tmp_path / "run" / "privacy.json")
    assert privacy["epsilon"] == pytest.approx(dp_epsilon([(B / N, SIGMA, 3)]), rel=1e-9)


def _mirrored_child(out):
    """Runs in a process of its own: 2 logical CPU devices, --distribution=mirrored, the probe model."""
    run = train(run_config(out, distribution="mirrored", physical_batch_size=8))
    noises = run.noises()
    steps = sorted(noises)
    print(json.dumps({
        "replicas": len(tf.config.list_logical_devices("CPU")), "steps": steps,
        "sigmas": [measured_sigma(noises[t], LR, CLIP, B) for t in steps],
        "correlations": [correlation(noises[s], noises[t]) for s in steps for t in steps if s < t],
    }))


if __name__ == "__main__":
    if sys.argv[1] == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        _mirrored_child(sys.argv[2])
    else:  # train.py itself, its configured model replaced by the probe model
        import runpy

        trainer.build_model = probe_model
        sys.argv = sys.argv[1:]
        runpy.run_path(TRAIN_PY, run_name="__main__")
