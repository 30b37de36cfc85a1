"""Convolution between band-limited SO(2) fields (``layers.so2``): the official code's ``R2Conv`` for
``group: orthogonal``.

``BandLimitedConv2D(filters, kernel_size, frequency, input_frequency)`` maps ``[B, H, W, C * (2 L_in + 1)]`` (C
fields of maximum frequency L_in; L_in = 0: image channels) to ``[B, H, W, filters * (2 L + 1)]``. Its trainable
weights are the coefficients ``[D, C, filters]`` of escnn's steerable basis (``layers.steerable_so2``; D = 4, 12,
24, 36 for lifting / L -> L at L = 1, 2, 3 ... see the basis), with escnn's generalised He initialisation; the
kernel of the equivalent ordinary convolution is the basis times them, built at every call. The bias: one per
output field, on its frequency-0 coefficient (escnn's bias lives on the trivial irreps only).
``weight_standardization`` is the official fork's, as in ``layers.conv``.

Rotations by multiples of 90 degrees map the 3x3 grid onto itself and the kernel is exactly equivariant for them;
for other angles the sampled harmonics are only approximately so (tests/test_so2_layers.py measures the error).
"""

import tensorflow as tf

from layers import _fields
from layers import so2
from layers import steerable
from layers import steerable_so2
from layers.conv import _SteerableInitializer, coefficient_gradients, standardize_layer
from layers.kernel_conv import BuiltKernelConv2D


@tf.keras.utils.register_keras_serializable(package="eqdp")
class BandLimitedConv2D(BuiltKernelConv2D):
    """Band-limited SO(2) fields (or image channels) -> ``filters`` band-limited fields of maximum ``frequency``.

    ``input_frequency``: the input fields' maximum frequency (0 for an image; None: the same as ``frequency``).
    Stride 1 only (the official model pools instead).
    """

    strides = 1

    def __init__(self, filters, kernel_size=3, frequency=1, input_frequency=None, padding="same", use_bias=True,
                 kernel_initializer=None, bias_initializer="zeros", weight_standardization=False, **kwargs):
        super().__init__(**kwargs)
        self._set_filter_options(filters, kernel_size, padding, use_bias, kernel_initializer, bias_initializer)
        self.frequency = so2.check_frequency(frequency)
        self.input_frequency = self.frequency if input_frequency is None else so2.check_frequency(
            input_frequency, "input_frequency")
        self.weight_standardization = bool(weight_standardization)
        self.input_spec = tf.keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        in_fields = _fields.band_limited_fields_in(self.name, input_shape, self.input_frequency)
        in_size = so2.field_size(self.input_frequency)
        basis = steerable_so2.so2_steerable_basis(self.input_frequency, self.frequency, self.kernel_size)
        self._basis = tf.constant(basis.base, tf.float32)  # [D, k*k, d_in, d_out]
        self.kernel = self.add_weight(
            name="coefficients", shape=(basis.base.shape[0], in_fields, self.filters), trainable=True,
            initializer=self.kernel_initializer or _SteerableInitializer(steerable.he_init_std(basis, in_fields)))
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer=self.bias_initializer,
                                        trainable=True)
        self.input_spec = tf.keras.layers.InputSpec(ndim=4, axes={-1: in_fields * in_size})
        super().build(input_shape)

    @property
    def output_channels(self):
        return self.filters * so2.field_size(self.frequency)

    def expanded_kernel(self):
        """``[k, k, C * (2 L_in + 1), filters * (2 L + 1)]``: the basis times the (standardised) coefficients."""
        weights = self.kernel
        if self.weight_standardization:
            weights = standardize_layer(tf.cast(weights, tf.float32))
        basis = tf.cast(self._basis, self.compute_dtype)
        kernel = tf.einsum("dpio,dcf->pcifo", basis, tf.cast(weights, self.compute_dtype))
        k = self.kernel_size
        return tf.reshape(kernel, [k, k, -1, self.output_channels])

    def expanded_bias(self):
        """``[filters * (2 L + 1)]``: each field's bias on its frequency-0 coefficient, zero elsewhere."""
        if self.bias is None:
            return None
        bias = tf.cast(self.bias, self.compute_dtype)[:, None]
        return tf.reshape(tf.pad(bias, [[0, 0], [0, 2 * self.frequency]]), [-1])

    # The DP engine's ghost routes need a kernel that is the trainable weight itself; this one is a basis expansion.
    base_is_trainable_kernel = False

    def kernel_gather_index(self):
        return None

    def weight_gradients_from_kernel(self, kernel_grads):
        """Per-example gradients of the coefficients from per-example gradients of the expanded kernel,
        ``[B, k, k, C * d_in, F * d_out]`` -> ``[(coefficients, [B, D, C, F])]``: one contraction with the basis
        (the expansion is linear), then, with ``weight_standardization``, the standardisation's vector-Jacobian
        product at this step's weights, which every example shares. (DP-SGD's per-example engine calls it instead
        of differentiating the whole expansion per example.)"""
        return coefficient_gradients(self._basis, self.kernel, kernel_grads, self.weight_standardization)

    def get_config(self):
        return {
            **super().get_config(),
            **self._filter_options_config(),
            "frequency": self.frequency,
            "input_frequency": self.input_frequency,
            "weight_standardization": self.weight_standardization,
        }
