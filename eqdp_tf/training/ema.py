"""Exponential moving average of the weights, used for evaluation and export (paper: 0.999).

The decay warms up as min(decay, (1 + n) / (10 + n)), n the updates done before, so the first steps are not
dominated by the random initialisation (torch_ema's and jax_privacy's schedule).

``updates_per_step``: the official code updates its average after every *physical* batch (``ema.update()`` beside
Opacus' ``optimizer.step()``, which skips all but the last of a logical step's batches), so each logical step
moves the average n times, n - 1 times toward the weights before the step and once toward those after it, with
the warm-up counting updates. With B = 8192 in physical batches of 2048 // K = 512 that is n ~ 16: the average
decays by ~0.984 per step instead of 0.999. ``before_step``/``after_step`` reproduce this exactly (the n - 1
updates toward one set of weights are applied at once, with the product of their decays).
"""

import tensorflow as tf


def ema_decay_at(step, decay):
    step = tf.cast(step, tf.float32)
    return tf.minimum(tf.constant(decay, tf.float32), (1.0 + step) / (10.0 + step))


class WeightAverage:
    """Keeps a shadow copy of ``model``'s weights in ``shadow`` (a structurally identical model)."""

    def __init__(self, model, shadow, decay, updates_per_step=1):
        if len(model.weights) != len(shadow.weights):
            raise ValueError("the shadow model must have the same weights as the model")
        if isinstance(updates_per_step, bool) or not isinstance(updates_per_step, int) or updates_per_step < 1:
            raise ValueError(f"updates_per_step must be an int >= 1, got {updates_per_step!r}")
        self.model = model
        self.shadow = shadow
        self.decay = float(decay)
        self.updates_per_step = updates_per_step
        shadow.set_weights(model.get_weights())
        self._update = tf.function(self._update_fn, autograph=False)

    def _update_fn(self, first, count):
        # `count` updates toward the same weights, the i-th with the decay of update number first + i: together
        # one update with the product of their decays.
        numbers = tf.cast(first, tf.float32) + tf.range(tf.cast(count, tf.float32))
        d = tf.reduce_prod(tf.minimum(tf.constant(self.decay, tf.float32), (1.0 + numbers) / (10.0 + numbers)))
        for avg, w in zip(self.shadow.weights, self.model.weights):
            avg.assign(d * avg + (1.0 - d) * tf.cast(w, avg.dtype))

    def before_step(self, step):
        """The updates a logical step makes before its weights change (none with one update per step); ``step``
        counts the logical steps done before this one."""
        if self.updates_per_step > 1:
            self._update(tf.constant(step * self.updates_per_step, tf.int64),
                         tf.constant(self.updates_per_step - 1, tf.int64))

    def after_step(self, step):
        """The update toward the weights a logical step produced; ``step`` as in ``before_step``."""
        self._update(tf.constant((step + 1) * self.updates_per_step - 1, tf.int64), tf.constant(1, tf.int64))

    def update(self, step):
        """One update toward the current weights; ``step`` counts updates done before this one."""
        self._update(tf.constant(step, tf.int64), tf.constant(1, tf.int64))
