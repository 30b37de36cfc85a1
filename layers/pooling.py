"""Pooling that respects the group: over the orientation axis, or over space keeping it."""

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
