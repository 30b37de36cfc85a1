"""Exponential moving average of the weights, used for evaluation and export (paper: 0.999).

The decay warms up as min(decay, (1 + t) / (10 + t)) so the first steps are not dominated by the
random initialisation (the same schedule as jax_privacy's averaging).
"""

import tensorflow as tf


def ema_decay_at(step, decay):
    step = tf.cast(step, tf.float32)
    return tf.minimum(tf.constant(decay, tf.float32), (1.0 + step) / (10.0 + step))


class WeightAverage:
    """Keeps a shadow copy of ``model``'s weights in ``shadow`` (a structurally identical model)."""

    def __init__(self, model, shadow, decay):
        if len(model.weights) != len(shadow.weights):
            raise ValueError("the shadow model must have the same weights as the model")
        self.model = model
        self.shadow = shadow
        self.decay = float(decay)
        shadow.set_weights(model.get_weights())
        self._update = tf.function(self._update_fn, autograph=False)

    def _update_fn(self, step):
        d = ema_decay_at(step, self.decay)
        for avg, w in zip(self.shadow.weights, self.model.weights):
            avg.assign(d * avg + (1.0 - d) * tf.cast(w, avg.dtype))

    def update(self, step):
        """Moves the shadow weights toward the current ones; ``step`` counts updates done before this one."""
        self._update(tf.constant(step, tf.int64))
