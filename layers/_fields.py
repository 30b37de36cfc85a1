"""Shared checks for layers that take feature fields (field-major channels, see conv.py): regular fields over a
finite group (|G| channels each) or band-limited SO(2) fields (2L + 1 channels each, ``layers.so2``)."""

import tensorflow as tf

from layers import groups as groups_lib
from layers import so2


def fields_of_size(layer_name, input_shape, size, what=None):
    """Number of fields of ``size`` channels in ``input_shape``, with clear errors for a bad channel count.
    ``what`` names the size in the error (default: the number itself)."""
    input_shape = tf.TensorShape(input_shape)
    channels = input_shape[-1]
    if channels is None:
        raise ValueError(f"{layer_name}: the channel dimension of the input must be known, got {input_shape}")
    if int(channels) % size:
        raise ValueError(f"{layer_name}: input has {int(channels)} channels, not a multiple of {what or size}")
    return int(channels) // size


def band_limited_fields_in(layer_name, input_shape, frequency):
    """Number of band-limited SO(2) fields of maximum ``frequency`` (2L + 1 channels each) in ``input_shape``."""
    size = so2.field_size(frequency)
    return fields_of_size(layer_name, input_shape, size, f"2L + 1 = {size}")


def fields_in(layer_name, input_shape, group):
    """Number of regular fields over ``group`` in ``input_shape``."""
    group = groups_lib.get(group)
    return fields_of_size(layer_name, input_shape, group.order, f"|{group.name}| = {group.order}")
