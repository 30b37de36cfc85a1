"""Keras-native DP-SGD: ``make_private(model, ...)``, then ``compile`` and ``fit`` as usual.

    private = eqdp_tf.make_private(model, l2_norm_clip=2.0, target_epsilon=8.0, delta=1e-5,
                                   dataset_size=50_000, batch_size=256, steps=2160)
    private.compile(optimizer=tf.keras.optimizers.SGD(2.0), loss=tf.keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True), metrics=["accuracy"])
    private.fit(private.poisson_batches(images, labels, physical_batch_size=128), steps_per_epoch=400,
                epochs=10, validation_data=(test_images, test_labels), callbacks=[...])

The model's ``train_step`` is the training program's DP step (``privacy.dp_step.DPStep``): per-example gradients
by the layer rules, clipping to C, the masked sum accumulated over the physical batches of one logical batch,
then at its last physical batch one draw of N(0, (sigma C)^2) with keyed noise (a function of the run key and the
step number, as in ``train.py``) and division by the expected batch size q N. ``poisson_batches`` yields the
Poisson-sampled logical batches as fixed-shape, padded and masked physical batches (the accountant's assumption),
K augmentation views per example, as one endless stream: ``steps_per_epoch`` counts physical batches, and a logical
batch may straddle two Keras epochs (its accumulated sum simply carries over). Plain ``(images, labels)`` batches
also work, each one a logical batch, with a warning that the accounting then assumes a sampling that did not
happen.

After every epoch the logs carry ``epsilon`` (RDP accountant, for the steps actually taken) and ``dp_steps``, so
TensorBoard, CSVLogger and EarlyStopping see them. ``--target_epsilon`` (or ``max_epsilon``) is a ceiling:
``fit`` stops after the last step that stays within it and refuses to start a step beyond it.

Refused with one ``ConfigError``: BatchNormalization (batch statistics mix examples), stateful layers, optimizers
other than SGD, a loss that does not give one value per example, ``steps_per_execution`` > 1 (Keras would run
several physical batches per call, past the points where the noise seed and the ceiling are checked), and use
under a ``tf.distribute`` strategy (use ``train.py --distribution``).
"""

import dataclasses
import math
import secrets
import warnings
from typing import Optional

import tensorflow as tf

import layers as eq_layers
from eqdp_tf import data as data_lib
from eqdp_tf.checks import finite_number, whole_number
from eqdp_tf.errors import ConfigError, PrivacyError
from eqdp_tf.privacy import accounting, fast_clipping
from eqdp_tf.privacy.dp_step import VIEW_REDUCTIONS, DPStep
from eqdp_tf.privacy.dp_step import DPKerasSGDOptimizer
from eqdp_tf.privacy.randomness import StepRandomness
from eqdp_tf.training.ema import WeightAverage

_POISSON_KEYS = {"views", "mask", "last"}


class _NoiseSeedRecord:
    """The logical step the optimizer's noise seed was last set for. A plain object, so that Keras does not track
    its variable: it is no weight of the model and belongs in no checkpoint."""

    def __init__(self):
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="noise_seed_step")


@dataclasses.dataclass(frozen=True)
class PrivacySettings:
    """What ``make_private`` needs to know: C, the noise (sigma, or a target epsilon to calibrate it to), the
    dataset size N and expected logical batch B (q = B / N), and the number of steps (or epochs)."""

    l2_norm_clip: float
    dataset_size: int
    batch_size: int
    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    delta: float = 1e-5
    steps: Optional[int] = None
    epochs: Optional[float] = None
    max_epsilon: Optional[float] = None
    view_reduction: str = "sum"
    noise_seed: Optional[int] = None

    def __post_init__(self):
        for name in ("l2_norm_clip", "delta", "noise_multiplier", "target_epsilon", "epochs", "max_epsilon"):
            if getattr(self, name) is not None:
                finite_number(name, getattr(self, name))
        for name in ("dataset_size", "batch_size", "steps"):
            if getattr(self, name) is not None:
                whole_number(name, getattr(self, name), at_least=1)
        if self.l2_norm_clip <= 0:
            raise ConfigError(f"l2_norm_clip must be > 0; got {self.l2_norm_clip}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1); got {self.delta}")
        if self.batch_size > self.dataset_size:
            raise ConfigError(f"batch_size {self.batch_size} is larger than dataset_size {self.dataset_size}")
        if (self.noise_multiplier is None) == (self.target_epsilon is None) and self.noise_multiplier is None:
            raise ConfigError("give noise_multiplier, or target_epsilon (with steps or epochs) to calibrate it")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ConfigError(f"noise_multiplier must be >= 0; got {self.noise_multiplier}")
        for name in ("target_epsilon", "max_epsilon", "epochs"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give steps or epochs, not both")
        if self.noise_multiplier is None and self.planned_steps is None:
            raise ConfigError("calibrating sigma to target_epsilon needs the length of training: steps or epochs")
        if self.view_reduction not in VIEW_REDUCTIONS:
            raise ConfigError(f"view_reduction must be one of {VIEW_REDUCTIONS}; got {self.view_reduction!r}")

    @property
    def sampling_rate(self):
        return self.batch_size / self.dataset_size

    @property
    def planned_steps(self):
        if self.steps is not None:
            return int(self.steps)
        if self.epochs is not None:
            return math.ceil(self.epochs * self.dataset_size / self.batch_size)
        return None

    @property
    def ceiling(self):
        return self.max_epsilon if self.max_epsilon is not None else self.target_epsilon

    def resolve_noise(self):
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        return accounting.calibrate_noise_multiplier(self.target_epsilon, self.sampling_rate, self.planned_steps,
                                                     self.delta)

    def epsilon(self, noise_multiplier, steps):
        if steps == 0:
            return 0.0
        return accounting.compute_epsilon(noise_multiplier, self.sampling_rate, steps, self.delta)

    def max_steps(self, noise_multiplier):
        """The most steps whose epsilon stays within the ceiling (None: no ceiling)."""
        ceiling = self.ceiling
        if ceiling is None:
            return None
        if self.epsilon(noise_multiplier, 1) > ceiling:
            return 0
        lo, hi = 1, max(1, self.planned_steps or 1)
        while self.epsilon(noise_multiplier, hi) <= ceiling:
            lo, hi = hi, 2 * hi
            if hi > 10**9:
                return None  # (sigma this large never reaches it in any practical run)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.epsilon(noise_multiplier, mid) <= ceiling else (lo, mid)
        return lo


def make_private(model, *, l2_norm_clip, dataset_size, batch_size, noise_multiplier=None, target_epsilon=None,
                 delta=1e-5, steps=None, epochs=None, max_epsilon=None, view_reduction="sum", noise_seed=None):
    """Wraps a functional or Sequential ``tf.keras`` model (or any model, then on the slower per-example
    ``vectorized_map`` path) into a ``PrivateModel`` trained by DP-SGD through ``compile``/``fit``.

    ``noise_seed`` makes the sampling and noise reproducible (experiments only: whoever knows it can undo the
    noise); unset, a secret key is drawn from the OS and kept only in memory."""
    settings = PrivacySettings(l2_norm_clip=l2_norm_clip, dataset_size=dataset_size, batch_size=batch_size,
                               noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=delta,
                               steps=steps, epochs=epochs, max_epsilon=max_epsilon, view_reduction=view_reduction,
                               noise_seed=noise_seed)
    return PrivateModel(model, settings)


def _refuse_unsupported(model):
    if tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1:
        raise ConfigError("make_private does not run under a tf.distribute strategy; use train.py --distribution")
    for layer in [model, *model.submodules]:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            raise ConfigError(f"layer {layer.name!r} is BatchNormalization: its batch statistics mix the examples "
                              "of a batch, which breaks per-example clipping; use GroupNormalization")
        if getattr(layer, "stateful", False):
            raise ConfigError(f"layer {layer.name!r} is stateful (state carried between batches mixes examples)")
    if not model.built or not model.trainable_variables:
        raise ConfigError("the model must be built and have trainable weights before make_private")


def _sgd_hyperparameters(optimizer):
    """(learning rate or schedule, momentum, nesterov) of a Keras SGD optimizer (new or legacy) or 'sgd'."""
    if isinstance(optimizer, str):
        if optimizer.lower() != "sgd":
            raise ConfigError(f"make_private trains with SGD (the DP-SGD update); got optimizer {optimizer!r}")
        return 0.01, 0.0, False
    sgd_types = (tf.keras.optimizers.SGD, tf.keras.optimizers.legacy.SGD)
    if not isinstance(optimizer, sgd_types):
        raise ConfigError(f"make_private trains with SGD (the DP-SGD update); got {type(optimizer).__name__}")
    config = optimizer.get_config()
    learning_rate = config["learning_rate"]
    if isinstance(learning_rate, dict):
        learning_rate = tf.keras.optimizers.schedules.deserialize(learning_rate)
    for key in ("clipnorm", "clipvalue", "global_clipnorm"):
        if config.get(key) is not None:
            raise ConfigError(f"{key} would clip the noised update; per-example clipping is l2_norm_clip")
    return learning_rate, float(config.get("momentum", 0.0)), bool(config.get("nesterov", False))


def _per_example_loss(loss):
    """The loss with one value per input (reduction 'none')."""
    if loss is None:
        raise ConfigError("compile needs a loss")
    if isinstance(loss, str):
        loss = tf.keras.losses.get(loss)
    if isinstance(loss, tf.keras.losses.Loss):
        return type(loss).from_config({**loss.get_config(), "reduction": tf.keras.losses.Reduction.NONE})
    if callable(loss):
        return loss  # checked when traced: it must return one loss per input
    raise ConfigError(f"loss must be a Keras loss, its name or a function; got {loss!r}")


class PrivateModel(tf.keras.Model):
    """A model whose ``fit`` trains by DP-SGD; see the module doc. Made by ``make_private``."""

    def __init__(self, model, settings: PrivacySettings, **kwargs):
        super().__init__(name=kwargs.pop("name", f"private_{model.name}"), **kwargs)
        _refuse_unsupported(model)
        self.inner = model
        self.settings = settings
        self.noise_multiplier = settings.resolve_noise()
        self.max_steps = settings.max_steps(self.noise_multiplier)
        key = settings.noise_seed if settings.noise_seed is not None else secrets.randbits(256)
        self.randomness = StepRandomness(key)
        self.dp_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="dp_steps")
        self._noise_seed_for = _NoiseSeedRecord()
        self._loss_tracker = tf.keras.metrics.Mean(name="loss")
        self._warned_plain = False
        self._dp_step = None

    # ------------------------------------------------------------------------------------------ Keras API

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def compile(self, optimizer="sgd", loss=None, metrics=None, steps_per_execution=None, **kwargs):
        if steps_per_execution not in (None, 1):
            raise ConfigError("steps_per_execution must be 1 with make_private: each call must see one physical "
                              "batch, so that the noise seed and the epsilon ceiling are checked at every step")
        learning_rate, momentum, nesterov = _sgd_hyperparameters(optimizer)
        self.dp_optimizer = DPKerasSGDOptimizer(
            l2_norm_clip=self.settings.l2_norm_clip, noise_multiplier=self.noise_multiplier,
            expected_batch_size=self.settings.batch_size, learning_rate=learning_rate, momentum=momentum,
            nesterov=nesterov)
        # Made now: Keras traces train_step once, and the update runs inside a tf.cond.
        self.dp_optimizer._create_all_weights(self.inner.trainable_variables)  # pylint: disable=protected-access
        self._example_loss = _per_example_loss(loss)
        self._dp_step = DPStep(self.inner, self._example_loss, self.dp_optimizer,
                               view_reduction=self.settings.view_reduction)
        super().compile(optimizer=self.dp_optimizer, loss=loss, metrics=metrics, **kwargs)

    @property
    def metrics(self):
        compiled = self.compiled_metrics.metrics if getattr(self, "compiled_metrics", None) is not None else []
        return [self._loss_tracker, *compiled]

    def train_step(self, data):
        x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ConfigError("sample weights are not supported: they would change each example's sensitivity")
        views, mask, last = self._physical_batch(x)
        stats, losses, logits = self._dp_step.accumulate(views, y, mask, return_outputs=True)

        def apply():
            # A seed left from an earlier step would add that step's noise again (its update minus this one would
            # then be noise-free): refused. `make_train_function` sets it before every physical batch.
            seeded = tf.debugging.assert_equal(
                self._noise_seed_for.step, self.dp_steps + 1,
                message="no noise seed was set for this DP step; train through fit or train_on_batch")
            with tf.control_dependencies([seeded]):
                self._dp_step.apply()
                self.dp_steps.assign_add(1)
            return tf.constant(True)

        tf.cond(last, apply, lambda: tf.constant(False))
        self._loss_tracker.update_state(tf.cast(losses, tf.float32), sample_weight=mask)
        mean_logits = tf.reduce_mean(logits, axis=1)  # the K views' prediction
        self.compiled_metrics.update_state(y, mean_logits, sample_weight=mask)
        return {m.name: m.result() for m in self.metrics}

    def make_train_function(self, force=False):
        """Keras' train function, through which every physical batch of ``fit`` and ``train_on_batch`` goes, preceded
        by ``_before_physical_batch`` (``train_on_batch`` runs no callbacks, so this is not left to one)."""
        if self.train_function is not None and not force:
            return self.train_function
        traced = super().make_train_function(force=force)

        def train_function(iterator):
            self._before_physical_batch()
            return traced(iterator)

        self.train_function = train_function
        return train_function

    def _before_physical_batch(self):
        """Holds the epsilon ceiling and sets the keyed noise seed of the step this physical batch may complete."""
        taken, limit = int(self.dp_steps.numpy()), self.max_steps
        if limit is not None and taken >= limit:
            raise PrivacyError(
                f"{taken} DP steps taken: one more would take epsilon to "
                f"{self.settings.epsilon(self.noise_multiplier, taken + 1):.4g}, above the ceiling "
                f"{self.settings.ceiling:g}; nothing more was trained")
        self.dp_optimizer.set_noise_seed(self.randomness.noise_seed(taken + 1))
        self._noise_seed_for.step.assign(taken + 1)

    def test_step(self, data):
        x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        logits = self(x, training=False)
        self._loss_tracker.update_state(tf.cast(self._example_loss(y, logits), tf.float32),
                                        sample_weight=sample_weight)
        self.compiled_metrics.update_state(y, logits, sample_weight=sample_weight)
        return {m.name: m.result() for m in self.metrics}

    def fit(self, x=None, y=None, callbacks=None, steps_per_epoch=None, **kwargs):
        if self._dp_step is None:
            raise ConfigError("compile the model before fit")
        if self._is_poisson(x) and steps_per_epoch is None:
            raise ConfigError("poisson_batches is an endless stream: pass steps_per_epoch (physical batches per "
                              "epoch; e.g. dataset_size // physical_batch_size for about one pass over the data)")
        self._check_loss_is_per_example(x, y)
        # A logical batch left half-accumulated by an interrupted fit is dropped (nothing of it was noised or
        # shown); the Poisson stream restarts at the first step not yet taken.
        self._dp_step.reset()
        if not self._is_poisson(x) and not self._warned_plain:
            self._warned_plain = True
            warnings.warn("fit got plain batches, not Poisson-sampled ones (PrivateModel.poisson_batches): each "
                          "batch is taken as one logical batch, but the epsilon reported assumes Poisson sampling "
                          f"at rate {self.settings.sampling_rate:.4g}, which these batches did not have", stacklevel=2)
        callbacks = [_PrivacyCallback(self), *(callbacks or [])]
        return super().fit(x, y, callbacks=callbacks, steps_per_epoch=steps_per_epoch, **kwargs)

    def _check_loss_is_per_example(self, x, y):
        """On two examples of the data, eagerly: inside Keras' traced train step the error would be garbled."""
        if isinstance(x, tf.data.Dataset):
            x, y, _ = tf.keras.utils.unpack_x_y_sample_weight(next(iter(x.take(1))))
        views, _, _ = self._physical_batch(x[:2] if not isinstance(x, dict) else x)
        labels = y[:2]
        logits = self.inner(views[:2, 0], training=False)
        losses = self._example_loss(labels, logits)
        if losses.shape.rank != 1 or losses.shape[0] != logits.shape[0]:
            raise ConfigError(f"the loss must give one loss per input (reduction 'none'); on a batch of "
                              f"{logits.shape[0]} it gave shape {losses.shape}")

    # ------------------------------------------------------------------------------------------ privacy

    def epsilon(self):
        """Epsilon (delta = settings.delta) of the steps taken so far."""
        return self.settings.epsilon(self.noise_multiplier, int(self.dp_steps.numpy()))

    def poisson_batches(self, images, labels, *, physical_batch_size, num_views=1, seed=0):
        """Poisson-sampled logical batches (rate q = batch_size / dataset_size) of uint8 [N, H, W, C] images as
        padded, masked physical batches: ``({"views": [P, K, H, W, C], "mask": [P], "last": bool}, labels)``.

        An endless stream that starts, each time it is iterated, at the first logical step this model has not
        taken yet, so no sampling is ever repeated. The sampling comes from the model's key (secret unless
        ``noise_seed`` was given); ``seed`` only seeds the augmentation of views 2..K."""
        if len(labels) != self.settings.dataset_size:
            raise ConfigError(f"the data has {len(labels)} examples, but dataset_size is "
                              f"{self.settings.dataset_size}: q would be wrong")
        sampler = data_lib.PoissonSampler(len(labels), self.settings.sampling_rate, physical_batch_size,
                                          self.randomness.sampler_seed())
        dataset = data_lib.make_train_dataset(
            images, labels, sampler, num_views, seed, start_step=lambda: int(self.dp_steps.numpy()))
        return dataset.map(lambda b: ({"views": b["views"], "mask": b["mask"], "last": b["last"]}, b["labels"]))

    @staticmethod
    def _is_poisson(x):
        if isinstance(x, tf.data.Dataset):
            spec = x.element_spec
            return isinstance(spec, tuple) and isinstance(spec[0], dict) and _POISSON_KEYS <= set(spec[0])
        return False

    @staticmethod
    def _physical_batch(x):
        """(views [B, K, ...], mask [B], last) from a Poisson physical batch or a plain batch of inputs."""
        if isinstance(x, dict) and _POISSON_KEYS <= set(x):
            return x["views"], tf.cast(x["mask"], tf.float32), tf.cast(x["last"], tf.bool)
        x = tf.convert_to_tensor(x)
        return x[:, tf.newaxis], tf.ones([tf.shape(x)[0]], tf.float32), tf.constant(True)


class _PrivacyCallback(tf.keras.callbacks.Callback):
    """Stops ``fit`` at the epsilon ceiling and puts epsilon into the epoch logs (the noise seed and the refusal
    to pass the ceiling are ``PrivateModel._before_physical_batch``'s)."""

    def __init__(self, private_model):
        super().__init__()
        self.private = private_model
        self._told = False

    def _steps(self):
        return int(self.private.dp_steps.numpy())

    def on_train_batch_end(self, batch, logs=None):
        limit = self.private.max_steps
        if limit is not None and self._steps() >= limit:
            self.model.stop_training = True
            if not self._told:
                self._told = True
                print(f"\nstopping: {limit} DP steps reach the epsilon ceiling {self.private.settings.ceiling:g}")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epsilon"] = self.private.epsilon()
            logs["dp_steps"] = self._steps()


class ExponentialMovingAverage(tf.keras.callbacks.Callback):
    """EMA of the weights (warm-up as train.py's), updated after every DP step.

    ``evaluate_with_average``: validation (in ``fit``) and ``evaluate`` with this callback use the averaged
    weights, then the training weights are put back. ``average_model`` holds the averaged copy (to save or
    export it); ``assign_to_model()`` copies it into the trained model."""

    def __init__(self, decay=0.999, evaluate_with_average=True):
        super().__init__()
        self.decay = float(decay)
        self.evaluate_with_average = evaluate_with_average
        self.average_model = None
        self._average = None
        self._last_step = None
        self._updates = 0  # for a model without DP steps: the updates so far
        self._saved = None

    def _inner(self):
        return self.model.inner if isinstance(self.model, PrivateModel) else self.model

    def on_train_begin(self, logs=None):
        if self._average is None:
            inner = self._inner()
            self.average_model = tf.keras.models.clone_model(inner)
            self._average = WeightAverage(inner, self.average_model, self.decay)
        self._last_step = self._dp_steps()

    def _dp_steps(self):
        return int(self.model.dp_steps.numpy()) if isinstance(self.model, PrivateModel) else None

    def on_train_batch_end(self, batch, logs=None):
        steps = self._dp_steps()
        if steps is None:
            self._average.update(self._updates)
            self._updates += 1
        elif steps != self._last_step:  # a DP step was applied in this batch
            self._average.update(steps - 1)
            self._last_step = steps

    def on_test_begin(self, logs=None):
        if self.evaluate_with_average and self.average_model is not None:
            self._saved = self._inner().get_weights()
            self._inner().set_weights(self.average_model.get_weights())

    def on_test_end(self, logs=None):
        if self._saved is not None:
            self._inner().set_weights(self._saved)
            self._saved = None

    def assign_to_model(self):
        self._inner().set_weights(self.average_model.get_weights())


def layer_registry():
    """A TF-Privacy ``LayerRegistry`` for fast gradient clipping of CNNs: TF-Privacy's Dense and Embedding, plus
    Keras' Conv2D, GroupNormalization and LayerNormalization, the equivariant layers and the weight-standardised
    conv (see ``privacy.fast_clipping``). For ``tensorflow_privacy.DPSequential(..., layer_registry=layer_registry())``."""
    return fast_clipping.make_layer_registry(
        conv_layers=(eq_layers.LiftingConv2D, eq_layers.GroupConv2D, eq_layers.StandardizedConv2D,
                     eq_layers.BandLimitedConv2D),
        normalization_layers=(eq_layers.GroupNormalization,))


__all__ = ["ExponentialMovingAverage", "PrivacySettings", "PrivateModel", "layer_registry", "make_private"]
