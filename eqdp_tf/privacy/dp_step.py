"""One DP-SGD step for any Keras model: per-example gradients, clipping, noise and aggregation.

The step is split into small named pieces, after TF-Privacy's `keras_models/dp_keras_model.py`:

1. Each example's K augmentation views have their losses combined ('sum' or 'mean') *before*
   clipping, so the unit of privacy is the example, not the view.
2. Clipping to global L2 norm <= C, by the factor C / max(||g_i||, C) of TF-Privacy's
   `clip_gradients_vmap`: for functional/Sequential models by `clipped_sum.clipped_gradient_sum`
   (norms layer by layer from one batched pass, ghost norms where they pay, then the weighted sum),
   otherwise `per_example_gradients` by `tf.vectorized_map` over examples and `clip_per_example`.
3. `DPStep.accumulate`: masked sum of the clipped gradients into accumulator variables, so a
   logical batch larger than memory is built from fixed-shape physical batches (padding rows
   have mask 0).
4. `DPStep.apply`: one Gaussian noise draw N(0, (sigma*C)^2) on the accumulated sum through the
   optimizer's `GaussianSumQuery`, division by the *expected* batch size q*N (Poisson sampling:
   the sampled count itself is private), `apply_gradients`, then the accumulators are reset.

Under a `tf.distribute` strategy (a `DPStep` made in its scope) each replica accumulates the clipped gradients of
its share of the logical batch; `apply` then draws the noise on replica 0 only, all-reduces the replicas' sums and
has every replica apply that same global update to its copy of the weights: the update is exactly the
single-device one, with one noise draw per logical step (not one per replica).

Nothing here knows about groups or equivariance. Models must not use batch statistics
(BatchNorm): `model(x, training=True)` is assumed to treat examples independently.
"""

import secrets

import numpy as np
import tensorflow as tf
# From its submodule: on TensorFlow 2.16+ TF-Privacy's package re-exports nothing (layers/_tf_setup.py).
from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras_vectorized import (
    VectorizedDPKerasSGDOptimizer, clip_gradients_vmap)

from eqdp_tf.checks import finite_number
from eqdp_tf.errors import ConfigError
from eqdp_tf.privacy import clipped_sum, per_example

VIEW_REDUCTIONS = ("sum", "mean")

_BASE_SGD = tf.keras.optimizers.legacy.SGD


def _check_number(name, value, *, minimum, strict):
    """Returns `value` as a float after checking it is a finite number above `minimum`."""
    return finite_number(name, value, **({"above": minimum} if strict else {"at_least": minimum}))


def _check_view_reduction(view_reduction):
    if view_reduction not in VIEW_REDUCTIONS:
        raise ConfigError(f"view_reduction must be one of {VIEW_REDUCTIONS}, got {view_reduction!r}")
    return view_reduction


def _check_views(views):
    """Converts `views` to a tensor and checks it is [B, K, H, W, C]."""
    views = tf.convert_to_tensor(views)
    if views.shape.rank != 5:
        raise ConfigError(
            f"views must have rank 5 [batch, views, height, width, channels], got shape {views.shape}"
        )
    return views


def _default_loss_fn():
    return tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE
    )


class DPKerasSGDOptimizer(VectorizedDPKerasSGDOptimizer):
    """TF-Privacy's vectorized DP-SGD optimizer (legacy SGD), driven by `DPStep`.

    Noise (`GaussianSumQuery`, stddev = sigma*C) is TF-Privacy's; clipping uses its rule (the factor
    C / max(norm, C) of `clip_gradients_vmap`) inside `DPStep`. What differs from the stock optimizer:

    - Per-example gradients come from `DPStep` (a `tf.vectorized_map` over examples, cost
      linear in the batch size), never from the stock `_compute_gradients`, whose
      `tape.jacobian` over the batched loss costs batch^2. That path and `get_gradients`
      therefore raise.
    - Noise is drawn once per logical batch on the sum of clipped gradients (`noised_sum`),
      and the caller divides by `expected_batch_size` (q*N), not by the sampled count.
    - The noise N(0, (sigma*C)^2) (the stddev of TF-Privacy's `GaussianSumQuery`) is drawn by stateless
      ops from a seed: `set_noise_seed(seed)` before a step makes its noise a pure function of that seed
      (`privacy.randomness`: keyed and resumable, as train.py and `fit` use it). A step for which no seed
      was set gets a fresh one from the OS (`ensure_fresh_noise_seed`, called by `DPStep.compiled_apply`),
      so two steps never share their noise. The seed variable is deliberately not tracked: a checkpoint
      must not reveal the noise of a step.

    Args:
      l2_norm_clip: C, the maximum L2 norm of one example's gradient; > 0.
      noise_multiplier: sigma; the noise stddev is sigma*C; >= 0.
      expected_batch_size: q*N, the expected logical batch size under Poisson sampling; > 0.
      learning_rate, momentum, **kwargs: passed to `tf.keras.optimizers.legacy.SGD`.
    """

    def __init__(
        self, l2_norm_clip, noise_multiplier, expected_batch_size, learning_rate, momentum=0.0, **kwargs
    ):
        l2_norm_clip = _check_number("l2_norm_clip", l2_norm_clip, minimum=0.0, strict=True)
        noise_multiplier = _check_number("noise_multiplier", noise_multiplier, minimum=0.0, strict=False)
        expected_batch_size = _check_number(
            "expected_batch_size", expected_batch_size, minimum=0.0, strict=True
        )
        for key in ("clipnorm", "clipvalue", "global_clipnorm"):
            if kwargs.get(key) is not None:
                raise ConfigError(
                    f"{key} would clip the noised batch gradient; per-example clipping is set "
                    f"by l2_norm_clip"
                )
        super().__init__(
            l2_norm_clip,
            noise_multiplier,
            None,  # num_microbatches: DPStep always works per example.
            learning_rate=learning_rate,
            momentum=momentum,
            **kwargs,
        )
        self._expected_batch_size = expected_batch_size
        # GaussianSumQuery's global state is constant (C and sigma*C), so it is made once here.
        self._global_state = self._dp_sum_query.initial_global_state()
        self._noise_seed = tf.Variable(tf.zeros([2], tf.int64), trainable=False, name="noise_seed")
        self._seed_pending = False
        self.keyed_noise_traced = False

    @property
    def l2_norm_clip(self):
        return self._l2_norm_clip

    @property
    def noise_multiplier(self):
        return self._noise_multiplier

    @property
    def expected_batch_size(self):
        return self._expected_batch_size

    def set_noise_seed(self, seed):
        """Seeds the noise of the next step: int64 [2] (e.g. `privacy.randomness.StepRandomness.noise_seed`)."""
        self._noise_seed.assign(np.asarray(seed, np.int64))
        self._seed_pending = True

    def ensure_fresh_noise_seed(self):
        """Before a step: keeps the seed set for it, or draws a fresh one from the OS if none was set."""
        if not self._seed_pending:
            self._noise_seed.assign(np.array([secrets.randbits(62), secrets.randbits(62)], np.int64))
        self._seed_pending = False

    def noised_sum(self, summed_clipped_grads):
        """Adds one draw of N(0, (sigma*C)^2), seeded by the noise seed, to each summed, clipped gradient.

        Call once per logical batch, then `apply_noised_gradients`.
        """
        grads = list(summed_clipped_grads)
        stddev = self._global_state.stddev
        seeds = tf.random.experimental.stateless_split(self._noise_seed, num=len(grads))
        noised = [
            g + tf.random.stateless_normal(tf.shape(g), seed=seeds[i], stddev=tf.cast(stddev, g.dtype),
                                           dtype=g.dtype, alg="philox")
            for i, g in enumerate(grads)
        ]
        self._was_dp_gradients_called = True  # the stock apply_gradients asserts it
        self.keyed_noise_traced = True
        return noised

    def replica_share(self, summed_clipped_grads, replica_id):
        """Replica ``replica_id``'s share of one noised sum over several replicas.

        Replica 0's share is its clipped sum plus the noise (`noised_sum`); the others' are their clipped sums
        unchanged. Summing the shares of all replicas (an all-reduce) gives the sum of every clipped gradient plus
        exactly one draw of N(0, (sigma*C)^2), whatever the number of replicas. ``replica_id`` is a Python int, or
        a scalar tensor (then both cases are traced).
        """
        grads = list(summed_clipped_grads)
        static = tf.get_static_value(replica_id)
        if static is not None:
            if int(static) == 0:
                return self.noised_sum(grads)
            self._was_dp_gradients_called = True  # this share is part of the noised sum of the logical batch
            return grads
        self._was_dp_gradients_called = True
        return tf.cond(tf.equal(replica_id, 0), lambda: self.noised_sum(grads), lambda: grads)

    def apply_noised_gradients(self, grads_and_vars, **kwargs):
        """Applies an update made from `noised_sum` (or the replicas' `replica_share`s); the next update needs
        its own noised sum."""
        result = self.apply_gradients(grads_and_vars, **kwargs)
        self._was_dp_gradients_called = False
        return result

    def apply_gradients_without_privacy(self, grads_and_vars, name=None, **kwargs):
        """Plain SGD update that bypasses the DP check: only for `DPStep(dp=False)` baselines."""
        return _BASE_SGD.apply_gradients(self, grads_and_vars, name=name, **kwargs)

    def _compute_gradients(self, loss, var_list, grad_loss=None, tape=None):
        raise ConfigError(
            "DPKerasSGDOptimizer does not compute gradients itself (the stock path uses "
            "tape.jacobian, quadratic in batch size); use eqdp_tf.privacy.dp_step.DPStep"
        )

    def get_gradients(self, loss, params):
        raise ConfigError(
            "DPKerasSGDOptimizer does not compute gradients itself; use eqdp_tf.privacy.dp_step.DPStep"
        )

    def get_config(self):
        return {
            **super().get_config(),
            "l2_norm_clip": self._l2_norm_clip,
            "noise_multiplier": self._noise_multiplier,
            "expected_batch_size": self._expected_batch_size,
        }


def _reduce_views(losses, view_reduction):
    """[..., K] per-view losses -> [...] per-example loss."""
    if view_reduction == "sum":
        return tf.reduce_sum(losses, axis=-1)
    return tf.reduce_mean(losses, axis=-1)


def _check_per_view_losses(shape):
    if shape.rank != 1:
        raise ConfigError(
            f"loss_fn must return one loss per input (reduction='none'), got shape {shape}"
        )


PER_EXAMPLE_METHODS = ("auto", "layerwise", "vmap")


def per_example_gradients(model, loss_fn, views, labels, view_reduction="sum", method="auto"):
    """Gradient of each example's loss, at a cost independent of the batch size.

    `method`: 'layerwise' (one batched forward/backward, then per-layer rules; see
    `per_example.py`; functional/Sequential models only), 'vmap' (`tf.vectorized_map` over
    examples, any model; conv filter gradients become while-loops there), or 'auto' (layerwise
    when the model allows it). Both return the same values; see `vmap_per_example_gradients`
    for the contract.
    """
    if method not in PER_EXAMPLE_METHODS:
        raise ConfigError(f"per-example method must be one of {PER_EXAMPLE_METHODS}, got {method!r}")
    if _resolve_method(model, method) == "vmap":
        return vmap_per_example_gradients(model, loss_fn, views, labels, view_reduction)
    _check_view_reduction(view_reduction)
    views = _check_views(views)
    labels = tf.convert_to_tensor(labels)
    grads, losses, logits = per_example.per_example_gradients(
        model, _checked_loss_fn(loss_fn), views, labels, lambda l: _reduce_views(l, view_reduction)
    )
    return grads, losses, logits


def _resolve_method(model, method):
    """'layerwise' or 'vmap' for ``method`` ('auto' picks layerwise when the model allows it)."""
    if method == "auto":
        return "layerwise" if per_example.supports(model) else "vmap"
    if method == "layerwise" and not per_example.supports(model):
        raise ConfigError("per-example method 'layerwise' needs a functional or Sequential Keras model")
    return method


def _checked_loss_fn(loss_fn):
    def checked(labels, logits):
        losses = loss_fn(labels, logits)
        _check_per_view_losses(losses.shape)
        return losses

    return checked


def vmap_per_example_gradients(model, loss_fn, views, labels, view_reduction="sum"):
    """Gradient of each example's loss by `tf.vectorized_map` over examples (any Keras model).

    `tf.vectorized_map` runs, for each example, the model on its K views as a batch of K,
    computes K losses `loss_fn(labels, logits)` and combines them with `view_reduction`.

    Args:
      model: a built Keras model; `model(x, training=True)` must treat examples independently.
      loss_fn: `loss_fn(labels, logits)` -> per-example losses [n].
      views: [B, K, H, W, C] inputs, K augmentation views per example.
      labels: [B, ...] one label per example (shared by its K views).
      view_reduction: 'sum' or 'mean' over the K view losses.

    Returns:
      (grads, losses, logits): grads is a list aligned with `model.trainable_variables`,
      each [B, *var.shape]; losses [B] (view-reduced); logits [B, K, ...].
    """
    _check_view_reduction(view_reduction)
    views = _check_views(views)
    labels = tf.convert_to_tensor(labels)
    vars_ = model.trainable_variables
    # vectorized_map traces `one_example` with autograph, which would turn a ConfigError raised
    # inside it into a StagingError; so the loss shape is only recorded there and checked after.
    loss_shapes = []

    def one_example(example):
        example_views, label = example  # [K, H, W, C], [...]
        num_views = tf.shape(example_views)[0]
        view_labels = tf.repeat(label[tf.newaxis], num_views, axis=0)
        with tf.GradientTape() as tape:
            logits = model(example_views, training=True)
            view_losses = loss_fn(view_labels, logits)
            loss_shapes.append(view_losses.shape)
            loss = _reduce_views(tf.reshape(view_losses, [-1]), view_reduction)
        grads = tape.gradient(loss, vars_)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, vars_)]
        return grads, loss, logits

    result = tf.vectorized_map(one_example, (views, labels))
    for shape in loss_shapes:
        _check_per_view_losses(shape)
    return result


def clip_per_example(grads, l2_norm_clip):
    """Clips each example's gradient (across all variables) to global L2 norm <= l2_norm_clip.

    Args:
      grads: list of [B, ...] per-example gradients.
      l2_norm_clip: C.

    Returns:
      (clipped, norms): clipped like `grads`; norms [B], the global norms before clipping.
    """
    grads = list(grads)
    squared = [tf.reduce_sum(tf.square(tf.reshape(g, [tf.shape(g)[0], -1])), axis=1) for g in grads]
    norms = tf.sqrt(tf.add_n(squared))
    clipped = tf.vectorized_map(lambda g: clip_gradients_vmap(g, l2_norm_clip), grads)
    return clipped, norms


def _num_correct(logits, labels):
    """[B] 1.0 where the view-mean logits predict the label (sparse or one-hot)."""
    mean_logits = tf.reduce_mean(logits, axis=1)  # [B, K, classes] -> [B, classes]
    predicted = tf.argmax(mean_logits, axis=-1)
    if labels.shape.rank == mean_logits.shape.rank:  # one-hot labels
        target = tf.argmax(labels, axis=-1)
    else:
        target = tf.cast(tf.reshape(labels, [-1]), predicted.dtype)
    return tf.cast(tf.equal(predicted, target), tf.float32)


class DPStep:
    """Accumulates per-example clipped gradients over physical batches; one noised update per logical batch.

    Usage, per logical batch:

        step = DPStep(model, loss_fn, optimizer)
        accumulate = step.compiled_accumulate()          # tf.function, traced once per shape
        for views, labels, mask in physical_batches:     # fixed shapes; mask 0 marks padding
            stats = accumulate(views, labels, mask)
        step.compiled_apply()()                          # noise once, / expected_batch_size

    Under a `tf.distribute` strategy, make the model, the optimizer and the `DPStep` in its scope, call
    `compiled_accumulate` with per-replica inputs (each replica's share of the physical batch; the returned
    statistics are summed over all replicas) and `compiled_apply` as above; see `apply`.

    Args:
      model: a built Keras model (no BatchNorm).
      loss_fn: `loss_fn(labels, logits)` -> per-example losses; None means sparse categorical
        cross-entropy from logits.
      optimizer: a `DPKerasSGDOptimizer`; its C, sigma and expected batch size are used.
      view_reduction: 'sum' (default, as the paper's code) or 'mean' over the K views of an example.
      per_example_method: 'auto', 'layerwise' or 'vmap' (see `per_example_gradients`).
      dp: False gives the non-private baseline: one batched gradient of the masked summed loss,
        no per-example work, no clipping, no noise; still divided by expected_batch_size.
      norm_method: with the layer-by-layer engine, how each layer's per-example norms are found
        (`clipped_sum.py`): 'auto' (per layer, the cheaper of ghost norms and materialised gradients),
        'materialise' or 'ghost'. The result is the same; only speed and memory differ.
    """

    def __init__(self, model, loss_fn, optimizer, view_reduction="sum", dp=True, per_example_method="auto",
                 norm_method="auto"):
        if not isinstance(optimizer, DPKerasSGDOptimizer):
            raise ConfigError(
                f"optimizer must be a DPKerasSGDOptimizer, got {type(optimizer).__name__}"
            )
        if not model.trainable_variables:
            raise ConfigError("model has no trainable variables; build it before making a DPStep")
        self._model = model
        self._loss_fn = _default_loss_fn() if loss_fn is None else loss_fn
        self._optimizer = optimizer
        self._view_reduction = _check_view_reduction(view_reduction)
        self._dp = bool(dp)
        if per_example_method not in PER_EXAMPLE_METHODS:
            raise ConfigError(f"per_example_method must be one of {PER_EXAMPLE_METHODS}, got {per_example_method!r}")
        self._per_example_method = per_example_method
        if norm_method not in clipped_sum.NORM_METHODS:
            raise ConfigError(f"norm_method must be one of {clipped_sum.NORM_METHODS}, got {norm_method!r}")
        self._norm_method = norm_method
        # The strategy whose scope the step is made in (the default one outside any). Each replica keeps its own
        # running sum (ON_READ: read in cross-replica context, the sums of all replicas are added).
        self._strategy = tf.distribute.get_strategy()
        self._distributed = tf.distribute.has_strategy()
        self._accumulators = [
            tf.Variable(tf.zeros_like(v), trainable=False, name=f"grad_sum_{i}",
                        synchronization=tf.VariableSynchronization.ON_READ, aggregation=tf.VariableAggregation.SUM)
            for i, v in enumerate(model.trainable_variables)
        ]
        self._compiled_accumulate = {}
        self._compiled_apply = {}
        self._compiled_finite = None
        self._compiled_reset = None

    @property
    def accumulators(self):
        """Running sums of (clipped, unnoised) per-example gradients, aligned with the trainable variables.

        Under a strategy each replica has its own; reading one outside `strategy.run` gives the sum over replicas.
        """
        return self._accumulators

    @property
    def dp(self):
        return self._dp

    def accumulate(self, views, labels, mask, return_outputs=False):
        """Adds the masked sum of this physical batch's (clipped) gradients to the accumulators.

        Args:
          views: [B, K, H, W, C].
          labels: [B, ...].
          mask: [B] float, 1 for a real example, 0 for padding.
          return_outputs: also return the per-example losses [B] and the logits [B, K, ...] (for metrics).

        Returns:
          dict of scalars over real examples: 'loss_sum', 'num_correct', 'count', and with
          dp=True also 'grad_norm_mean' (before clipping) and 'clipped_fraction'; with return_outputs,
          (that dict, losses, logits).
        """
        views = _check_views(views)
        labels = tf.convert_to_tensor(labels)
        mask = tf.convert_to_tensor(mask, dtype=tf.float32)
        if mask.shape.rank != 1:
            raise ConfigError(f"mask must have shape [batch], got {mask.shape}")
        if self._dp:
            grad_sums, losses, logits, extra = self._private_batch(views, labels, mask)
        else:
            grad_sums, losses, logits = self._nonprivate_batch(views, labels, mask)
            extra = {}
        for acc, g in zip(self._accumulators, grad_sums):
            acc.assign_add(g)
        count = tf.reduce_sum(mask)
        stats = {
            "loss_sum": tf.reduce_sum(mask * tf.cast(losses, tf.float32)),
            "num_correct": tf.reduce_sum(mask * _num_correct(logits, labels)),
            "count": count,
            **extra,
        }
        return (stats, losses, logits) if return_outputs else stats

    def _private_batch(self, views, labels, mask):
        clip = self._optimizer.l2_norm_clip
        method = _resolve_method(self._model, self._per_example_method)
        if method == "layerwise":
            # Norms layer by layer, then one weighted sum: per-example gradients are held only where
            # that is the cheaper way to their norms.
            grad_sums, norms, losses, logits = clipped_sum.clipped_gradient_sum(
                self._model, _checked_loss_fn(self._loss_fn), views, labels,
                lambda l: _reduce_views(l, self._view_reduction), clip, mask, self._norm_method)
        else:
            grads, losses, logits = per_example_gradients(
                self._model, self._loss_fn, views, labels, self._view_reduction, method)
            clipped, norms = clip_per_example(grads, clip)
            grad_sums = [tf.tensordot(tf.cast(mask, g.dtype), g, axes=1) for g in clipped]
        count = tf.reduce_sum(mask)
        extra = {
            "grad_norm_mean": tf.math.divide_no_nan(tf.reduce_sum(mask * norms), count),
            "clipped_fraction": tf.math.divide_no_nan(
                tf.reduce_sum(mask * tf.cast(norms > clip, tf.float32)), count
            ),
        }
        return grad_sums, losses, logits, extra

    def _nonprivate_batch(self, views, labels, mask):
        shape = tf.shape(views)
        batch, num_views = shape[0], shape[1]
        flat_views = tf.reshape(views, tf.concat([[batch * num_views], shape[2:]], axis=0))
        flat_labels = tf.repeat(labels, num_views, axis=0)  # example-major, like flat_views
        vars_ = self._model.trainable_variables
        with tf.GradientTape() as tape:
            flat_logits = self._model(flat_views, training=True)
            view_losses = self._loss_fn(flat_labels, flat_logits)
            _check_per_view_losses(view_losses.shape)
            losses = _reduce_views(tf.reshape(view_losses, [batch, num_views]), self._view_reduction)
            total = tf.reduce_sum(tf.cast(mask, losses.dtype) * losses)
        grads = tape.gradient(total, vars_)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, vars_)]
        logits = tf.reshape(
            flat_logits, tf.concat([[batch, num_views], tf.shape(flat_logits)[1:]], axis=0)
        )
        return grads, losses, logits

    def apply(self):
        """One optimizer step from the accumulated sum: noise once, / expected_batch_size, reset.

        With several replicas (run in each by `compiled_apply`): replica 0 adds the noise to its sum
        (`replica_share`), the replicas' sums are all-reduced, and each replica applies the resulting global update
        to its own copy of the weights, without the optimizer's cross-replica aggregation (which would add the
        replicas' updates up). So every copy gets the same update, with one noise draw, as on one device.
        """
        if self._dp and tf.executing_eagerly():  # (traced: compiled_apply, or fit's callback, sees to the seed)
            self._optimizer.ensure_fresh_noise_seed()
        context = tf.distribute.get_replica_context()
        if context is None:
            raise ConfigError("DPStep.apply runs in replica context: call compiled_apply() under a strategy")
        replicas = context.num_replicas_in_sync
        summed = [acc.read_value() for acc in self._accumulators]
        if self._dp:
            if replicas == 1:
                summed = self._optimizer.noised_sum(summed)
            else:
                summed = self._optimizer.replica_share(summed, context.replica_id_in_sync_group)
        if replicas > 1:
            summed = context.all_reduce(tf.distribute.ReduceOp.SUM, summed)
        scale = 1.0 / self._optimizer.expected_batch_size
        grads_and_vars = [(g * scale, v) for g, v in zip(summed, self._model.trainable_variables)]
        options = {} if replicas == 1 else {"experimental_aggregate_gradients": False}
        if self._dp:
            self._optimizer.apply_noised_gradients(grads_and_vars, **options)
        else:
            self._optimizer.apply_gradients_without_privacy(grads_and_vars, **options)
        for acc in self._accumulators:
            acc.assign(tf.zeros_like(acc))

    def reset(self):
        """Drops the accumulated sums (of every replica) without applying them."""
        if not self._distributed:
            for acc in self._accumulators:
                acc.assign(tf.zeros_like(acc))
            return

        if self._compiled_reset is None:
            def zero():
                for acc in self._accumulators:
                    acc.assign(tf.zeros(acc.shape, acc.dtype))

            self._compiled_reset = tf.function(lambda: self._strategy.run(zero), autograph=False)
        self._compiled_reset()

    def compiled_accumulated_finite(self):
        """A tf.function telling whether the accumulated sums of every replica are finite (no nan or inf)."""
        if self._compiled_finite is None:
            def local():
                return tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(a.read_value()))
                                               for a in self._accumulators]))

            if not self._distributed:
                self._compiled_finite = tf.function(local, autograph=False)
            else:
                strategy = self._strategy

                def all_replicas():
                    bad = strategy.run(lambda: 1.0 - tf.cast(local(), tf.float32))
                    return tf.equal(strategy.reduce(tf.distribute.ReduceOp.SUM, bad, axis=None), 0.0)

                self._compiled_finite = tf.function(all_replicas, autograph=False)
        return self._compiled_finite

    # Both methods are straight-line TensorFlow code, so they are traced without autograph: autograph
    # would re-raise a ConfigError found while tracing as a StagingError.

    def _stat_names(self):
        return ("loss_sum", "num_correct", "count") + (("grad_norm_mean", "clipped_fraction") if self._dp else ())

    def compiled_accumulate(self, jit_compile=False):
        """`accumulate` as a tf.function, cached per `jit_compile`; traced once per input shape.

        Under a strategy it runs `accumulate` on every replica (inputs per replica, e.g. from
        `strategy.experimental_distribute_values_from_function`) and returns the statistics of all of them
        (sums, and means over all real examples), the same on every worker.
        """
        key = bool(jit_compile)
        if key not in self._compiled_accumulate:
            local = tf.function(self.accumulate, jit_compile=key, autograph=False)
            if not self._distributed:
                self._compiled_accumulate[key] = local
            else:
                names, strategy = self._stat_names(), self._strategy
                means = ("grad_norm_mean", "clipped_fraction")

                def replica(views, labels, mask):
                    stats = local(views, labels, mask)
                    # Means become sums over real examples, so that one all-reduce combines everything.
                    return tf.stack([stats[k] * stats["count"] if k in means else stats[k] for k in names])

                def run(views, labels, mask):
                    if strategy.num_replicas_in_sync > 1 and not all(
                            isinstance(x, tf.distribute.DistributedValues) for x in (views, labels, mask)):
                        # Every replica would clip and add the same examples: counted once per replica.
                        raise ConfigError("under a strategy with several replicas, accumulate takes per-replica "
                                          "inputs (each replica's own share of the physical batch)")
                    total = strategy.reduce(tf.distribute.ReduceOp.SUM,
                                            strategy.run(replica, args=(views, labels, mask)), axis=None)
                    stats = dict(zip(names, tf.unstack(total)))
                    for k in means:
                        if k in stats:
                            stats[k] = tf.math.divide_no_nan(stats[k], stats["count"])
                    return stats

                self._compiled_accumulate[key] = tf.function(run, autograph=False)
        return self._compiled_accumulate[key]

    def compiled_apply(self, jit_compile=False):
        """`apply` as a tf.function, cached per `jit_compile`; under a strategy, run on every replica.

        The first call traces twice if the optimizer creates its variables then; later calls reuse it. Under a
        strategy `jit_compile` is not used for `apply` (it holds the all-reduce; it is cheap next to `accumulate`).
        """
        key = bool(jit_compile)
        if key not in self._compiled_apply:
            if not self._distributed:
                compiled = tf.function(self.apply, jit_compile=key, autograph=False)
            else:
                strategy = self._strategy
                compiled = tf.function(lambda: strategy.run(self.apply), autograph=False)

            def apply_with_fresh_noise():
                if self._dp:
                    self._optimizer.ensure_fresh_noise_seed()
                return compiled()

            apply_with_fresh_noise.experimental_get_tracing_count = compiled.experimental_get_tracing_count
            self._compiled_apply[key] = apply_with_fresh_noise
        return self._compiled_apply[key]
