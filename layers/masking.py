"""The input disc mask of the official SO(2) model (escnn's ``MaskModule(S=32, margin=1)``).

Rotating an image by an angle that is not a multiple of 90 degrees moves its corners off the grid, so a model that
looked at them could not be equivariant; the mask keeps the inscribed disc and fades the rest out.
"""

import numpy as np
import tensorflow as tf


def disc_mask(size, margin=1.0):
    """``[size, size]`` escnn's mask: 1 within radius c (1 - margin / 100) of the centre c = (size - 1) / 2, and
    exp((t - d^2) / 4) beyond it, d the distance to the centre and t that radius squared."""
    centre = (size - 1) / 2.0
    threshold = (centre - margin / 100.0 * centre) ** 2
    offsets = np.arange(size) - centre
    squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
    return np.where(squared > threshold, np.exp((threshold - squared) / 2.0**2), 1.0)


@tf.keras.utils.register_keras_serializable(package="eqdp")
class DiscMask(tf.keras.layers.Layer):
    """Multiplies every channel of a square ``[B, S, S, C]`` input by ``disc_mask(S, margin)``."""

    def __init__(self, margin=1.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 100:
            raise ValueError(f"margin must be a percentage of the radius in [0, 100), got {margin!r}")
        self.margin = float(margin)
        self.input_spec = tf.keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        height, width = tf.TensorShape(input_shape)[1:3]
        if height is None or height != width:
            raise ValueError(f"{self.name}: the mask needs a known square input, got {input_shape}")
        self._mask = tf.constant(disc_mask(int(height), self.margin)[None, :, :, None].astype(np.float32))
        super().build(input_shape)

    def call(self, inputs):
        return inputs * tf.cast(self._mask, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}
