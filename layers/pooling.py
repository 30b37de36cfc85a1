"""Pooling that respects the group: over the orientation axis, or over space keeping it."""

import numpy as np
import tensorflow as tf

from layers import _fields
from layers import groups as groups_lib


@tf.keras.utils.register_keras_serializable(package="eqdp")
class GroupPooling(tf.keras.layers.Layer):
    """Max or mean over each field's orientations: ``[B, H, W, F*|G|]`` -> invariant ``[B, H, W, F]``.

    The result no longer changes when the orientation axis is permuted, so it transforms like an
    ordinary image (pixels move, channels stay).
    """

    def __init__(self, group="C4", reduction="max", **kwargs):
        super().__init__(**kwargs)
        self.group = groups_lib.get(group)
        reduction = str(reduction).lower()
        if reduction not in ("max", "mean"):
            raise ValueError(f"reduction must be 'max' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def build(self, input_shape):
        self.fields = _fields.fields_in(self.name, input_shape, self.group)
        self.input_spec = tf.keras.layers.InputSpec(min_ndim=2, axes={-1: self.fields * self.group.order})
        super().build(input_shape)

    def call(self, inputs):
        shape = tf.shape(inputs)
        split = tf.reshape(inputs, tf.concat([shape[:-1], [self.fields, self.group.order]], axis=0))
        reduce = tf.reduce_max if self.reduction == "max" else tf.reduce_mean
        return reduce(split, axis=-1)

    def compute_output_shape(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        return input_shape[:-1].concatenate([input_shape[-1] // self.group.order])

    def get_config(self):
        return {**super().get_config(), "group": self.group.name, "reduction": self.reduction}


@tf.keras.utils.register_keras_serializable(package="eqdp")
class SpatialPooling2D(tf.keras.layers.Layer):
    """Non-overlapping ``pool_size`` x ``pool_size`` max or average pooling that stays equivariant.

    Works channel by channel, so orientations are untouched. The blocks tile the map exactly only
    when the size is a multiple of ``pool_size``; anything else would drop a border on one side
    and break rotation equivariance, so it is refused.
    """

    def __init__(self, pool_size=2, reduction="max", **kwargs):
        super().__init__(**kwargs)
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be a positive int, got {pool_size!r}")
        self.pool_size = pool_size
        reduction = str(reduction).lower()
        if reduction not in ("max", "mean"):
            raise ValueError(f"reduction must be 'max' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self.input_spec = tf.keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        for size in tf.TensorShape(input_shape)[1:3]:
            if size is not None and int(size) % self.pool_size:
                raise ValueError(
                    f"{self.name}: spatial size {int(size)} is not a multiple of pool_size={self.pool_size}; "
                    "pooling would drop pixels on one side only and break rotation equivariance"
                )
        super().build(input_shape)

    def call(self, inputs):
        pool = tf.nn.max_pool2d if self.reduction == "max" else tf.nn.avg_pool2d
        return pool(inputs, ksize=self.pool_size, strides=self.pool_size, padding="VALID")

    def compute_output_shape(self, input_shape):
        b, h, w, c = tf.TensorShape(input_shape).as_list()
        div = lambda s: None if s is None else s // self.pool_size  # noqa: E731
        return tf.TensorShape([b, div(h), div(w), c])

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size, "reduction": self.reduction}


def gaussian_blur_filter(sigma):
    """``[n, n]`` escnn's anti-aliasing filter: exp(-d^2 / (2 sigma^2)) over the n = 2 round(3 sigma) + 1 grid about
    its centre, normalised to sum 1."""
    size = 2 * int(round(3 * sigma)) + 1
    offsets = np.arange(size) - (size - 1) / 2.0
    squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
    blur = np.exp(-squared / (2 * sigma**2))
    return blur / blur.sum()


@tf.keras.utils.register_keras_serializable(package="eqdp")
class AntialiasedAveragePooling2D(tf.keras.layers.Layer):
    """escnn's ``PointwiseAvgPoolAntialiased``: every channel blurred by a Gaussian of width ``sigma`` (a
    ``gaussian_blur_filter`` of n x n taps), zero-padded by (n - 1) / 2 on each side and sampled every ``strides``
    pixels from the first. The official SO(2) model: sigma 0.66 (5x5 taps), stride 2.

    Channel by channel, so any fields pass through. Rotations map the sampled grid onto itself only when
    (size - 1) is a multiple of the stride (odd sizes for stride 2); on a 32-pixel map the samples sit at 0, 2, ...,
    30, half a pixel off the centre, so even a 90 degree turn of the input moves them (as in escnn).
    """

    def __init__(self, sigma=0.66, strides=2, **kwargs):
        super().__init__(**kwargs)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        if isinstance(strides, bool) or not isinstance(strides, int) or strides < 1:
            raise ValueError(f"strides must be a positive int, got {strides!r}")
        self.sigma = float(sigma)
        self.strides = strides
        self.input_spec = tf.keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        channels = tf.TensorShape(input_shape)[-1]
        if channels is None:
            raise ValueError(f"{self.name}: the channel dimension of the input must be known, got {input_shape}")
        blur = gaussian_blur_filter(self.sigma).astype(np.float32)
        self._filter = tf.constant(np.repeat(blur[:, :, None, None], int(channels), axis=2))  # [n, n, C, 1]
        self._pad = (blur.shape[0] - 1) // 2
        super().build(input_shape)

    def call(self, inputs):
        pad = self._pad
        padded = tf.pad(inputs, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        return tf.nn.depthwise_conv2d(padded, tf.cast(self._filter, inputs.dtype), [1, self.strides, self.strides, 1],
                                      "VALID")

    def compute_output_shape(self, input_shape):
        b, h, w, c = tf.TensorShape(input_shape).as_list()
        out = lambda s: None if s is None else (s - 1) // self.strides + 1  # noqa: E731
        return tf.TensorShape([b, out(h), out(w), c])

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma, "strides": self.strides}
