"""Shared checks for layers that take regular feature fields (field-major channels, see conv.py)."""

import tensorflow as tf

from layers import groups as groups_lib


def fields_in(layer_name, input_shape, group):
    """Number of fields in ``input_shape`` over ``group``, with clear errors for a bad channel count."""
    input_shape = tf.TensorShape(input_shape)
    channels = input_shape[-1]
    if channels is None:
        raise ValueError(f"{layer_name}: the channel dimension of the input must be known, got {input_shape}")
    group = groups_lib.get(group)
    if int(channels) % group.order:
        raise ValueError(
            f"{layer_name}: input has {int(channels)} channels, not a multiple of |{group.name}| = {group.order}"
        )
    return int(channels) // group.order
