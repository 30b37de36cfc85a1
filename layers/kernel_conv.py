"""Convolutions whose kernel is built from their weights at every call: group convolutions expand base filters
(``layers.conv``), weight-standardised convolutions renormalise them (``layers.standardized_conv``). What every
such layer shares: the plain convolution it runs, its output shape and its freezing into a ``Conv2D``."""

import numpy as np
import tensorflow as tf


def positive_int(name, value):
    """``value`` (an int, or an equal pair as Keras accepts for square kernels and strides) as a positive int."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be an int or an equal (n, n) pair (square kernels and strides only), "
                             f"got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def odd_kernel_size(kernel_size):
    """``kernel_size`` as a positive odd int: the filter of a rotation-equivariant conv needs a centre pixel."""
    kernel_size = positive_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be odd, got {kernel_size}: an even filter has no centre pixel, so rotating "
            "it about the grid moves it off the pixel lattice"
        )
    return kernel_size


def padding_mode(value):
    """'same' or 'valid' (any case), as the built kernel's plain convolution takes it."""
    padding = str(value).lower()
    if padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
    return padding


class BuiltKernelConv2D(tf.keras.layers.Layer):
    """Runs ``tf.nn.conv2d`` with ``expanded_kernel()`` and adds ``expanded_bias()`` (None: no bias).

    Subclasses set ``kernel_size`` (int), ``strides`` (int), ``padding`` ('same' or 'valid') and ``use_bias``, and
    define ``expanded_kernel``, ``expanded_bias`` and ``output_channels`` (the built kernel's last dimension).
    """

    @property
    def output_channels(self):
        raise NotImplementedError

    def _set_filter_options(self, filters, kernel_size, padding, use_bias, kernel_initializer, bias_initializer):
        """Checks and keeps the arguments every equivariant conv takes (``filters`` output fields, an odd square
        kernel; ``kernel_initializer`` None: the basis's own initialisation)."""
        if isinstance(filters, bool) or not isinstance(filters, (int, np.integer)) or filters < 1:
            raise ValueError(f"filters (number of output fields) must be a positive int, got {filters!r}")
        self.filters = int(filters)
        self.kernel_size = odd_kernel_size(kernel_size)
        self.padding = padding_mode(padding)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = None if kernel_initializer is None else tf.keras.initializers.get(kernel_initializer)
        self.bias_initializer = tf.keras.initializers.get(bias_initializer)

    def _filter_options_config(self):
        """The config of the arguments ``_set_filter_options`` keeps."""
        return {
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "padding": self.padding,
            "use_bias": self.use_bias,
            "kernel_initializer": (None if self.kernel_initializer is None
                                   else tf.keras.initializers.serialize(self.kernel_initializer)),
            "bias_initializer": tf.keras.initializers.serialize(self.bias_initializer),
        }

    def call(self, inputs):
        # TF's 'SAME' pads (k-1)/2 on each side for an odd kernel at stride 1, and for the strided grids the group
        # convolutions admit; explicit paddings would be equivalent but break the Conv2DBackpropFilter fallback
        # inside tf.vectorized_map.
        outputs = tf.nn.conv2d(inputs, self.expanded_kernel(), strides=self.strides, padding=self.padding.upper())
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, self.expanded_bias())
        return outputs

    def compute_output_shape(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        out = []
        for size in input_shape[1:3]:
            if size is None:
                out.append(None)
                continue
            size = int(size) if self.padding == "same" else int(size) - self.kernel_size + 1
            out.append((size - 1) // self.strides + 1)
        return tf.TensorShape([input_shape[0], out[0], out[1], self.output_channels])

    def to_conv2d(self, name=None):
        """An ordinary built ``tf.keras.layers.Conv2D`` computing exactly this layer, its kernel built once (for
        serving). Keras' 'same' padding is TF's, so the outputs match."""
        if not self.built:
            raise ValueError(f"{self.name}: build the layer (call it once) before freezing it")
        conv = tf.keras.layers.Conv2D(self.output_channels, self.kernel_size, strides=self.strides,
                                      padding=self.padding, use_bias=self.use_bias, name=name or self.name,
                                      dtype=self.dtype_policy)
        conv.build(tf.TensorShape([None, None, None, self.input_spec.axes[-1]]))
        weights = [self.expanded_kernel().numpy()]
        if self.use_bias:
            weights.append(self.expanded_bias().numpy())
        conv.set_weights(weights)
        return conv
