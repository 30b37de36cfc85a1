"""Scaled weight standardisation (Qiao et al. 2019; Brock et al. 2021): a convolution whose filters are
renormalised before every use.

Each output filter w_o (its k*k*C_in fan-in weights) is replaced by

    w_hat_o = gain_o * (w_o - mean(w_o)) / sqrt(max(N * var(w_o), epsilon)),    N = k*k*C_in,

so every filter has zero mean and norm gain_o, whatever the optimiser did to the raw weights. De et al. (2022)
use it in their DP WRN baselines with GroupNorm: under DP-SGD the noise added to every raw weight cannot grow the
filters' scale, which keeps the effective learning rate from drifting.

Like the group convolutions, the layer is a plain ``tf.nn.conv2d`` with a kernel built from its weights
(``expanded_kernel``): the per-example engine differentiates the convolution as for any conv and then takes each
example's kernel gradient back through the standardisation (its Jacobian at the current weights), and export
freezes the layer into the ordinary ``Conv2D`` it computes.
"""

import numpy as np
import tensorflow as tf

from layers.kernel_conv import BuiltKernelConv2D, padding_mode, positive_int


@tf.keras.utils.register_keras_serializable(package="eqdp")
class StandardizedConv2D(BuiltKernelConv2D):
    """``Conv2D`` with scaled weight standardisation, a learnable gain per filter (init 1) and a bias (init 0).

    ``epsilon`` bounds N * var(w) from below (De et al.: 1e-4), so that a filter whose weights all became equal
    does not divide by zero. Initialisation: unit-variance fan-in normal, as De et al. (the standardisation makes
    the result nearly insensitive to it).
    """

    def __init__(self, filters, kernel_size, strides=1, padding="same", use_bias=True, use_gain=True,
                 epsilon=1e-4, kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.filters = positive_int("filters", filters)
        self.kernel_size = positive_int("kernel_size", kernel_size)
        self.strides = positive_int("strides", strides)
        self.padding = padding_mode(padding)
        self.use_bias = bool(use_bias)
        self.use_gain = bool(use_gain)
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
            raise ValueError(f"epsilon must be a positive number, got {epsilon!r}")
        self.epsilon = float(epsilon)
        self.kernel_initializer = tf.keras.initializers.get(
            kernel_initializer or tf.keras.initializers.VarianceScaling(1.0, "fan_in", "untruncated_normal"))
        self.input_spec = tf.keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        in_channels = tf.TensorShape(input_shape)[-1]
        if in_channels is None:
            raise ValueError(f"{self.name}: the channel dimension of the input must be known, got {input_shape}")
        k = self.kernel_size
        self.kernel = self.add_weight(name="kernel", shape=(k, k, int(in_channels), self.filters),
                                      initializer=self.kernel_initializer, trainable=True)
        self.gain = (self.add_weight(name="gain", shape=(self.filters,), initializer="ones", trainable=True)
                     if self.use_gain else None)
        self.bias = (self.add_weight(name="bias", shape=(self.filters,), initializer="zeros", trainable=True)
                     if self.use_bias else None)
        self.input_spec = tf.keras.layers.InputSpec(ndim=4, axes={-1: int(in_channels)})
        super().build(input_shape)

    def expanded_kernel(self):
        """The standardised ``[k, k, C_in, filters]`` kernel the convolution uses (computed in float32)."""
        r, _, gain, _ = self.standardization_terms()
        return tf.cast(r * gain, self.compute_dtype)

    def standardization_terms(self):
        """(r, inverse_norm, gain, projected) at the current weights, float32, per filter o: the kernel is
        gain_o * r_o with r_o = (w_o - mean(w_o)) * inverse_norm_o and inverse_norm_o = 1 / sqrt(max(N var(w_o),
        epsilon)), so r_o has zero mean and, where ``projected_o`` = 1 (N var(w_o) >= epsilon), unit norm. The
        Jacobian, for a gradient d_o of the kernel's filter o:

            dL/dgain_o = r_o . d_o,
            dL/dw_o = gain_o * inverse_norm_o * (d_o - mean(d_o) - projected_o r_o (r_o . d_o)).

        Shapes: r [k, k, C_in, filters], the others [filters] (gain 1 without ``use_gain``).
        """
        kernel = tf.cast(self.kernel, tf.float32)
        mean, variance = tf.nn.moments(kernel, axes=[0, 1, 2])
        squared_norm = variance * float(np.prod(kernel.shape[:-1]))
        inverse_norm = tf.math.rsqrt(tf.maximum(squared_norm, self.epsilon))
        gain = tf.cast(self.gain, tf.float32) if self.gain is not None else tf.ones([self.filters])
        # tf.maximum passes the gradient to its first argument on ties, so the projection is kept there too.
        projected = tf.cast(squared_norm >= self.epsilon, tf.float32)
        return (kernel - mean) * inverse_norm, inverse_norm, gain, projected

    def weight_gradients_from_kernel(self, kernel_grads):
        """Per-example gradients of the raw weights from per-example gradients of the standardised kernel.

        ``kernel_grads`` [B, k, k, C_in, filters] -> [(kernel, [B, k, k, C_in, filters]), (gain, [B, filters])] (the
        gain only with ``use_gain``): the Jacobian of ``standardization_terms`` written out. Every example shares
        it, so this is a few elementwise passes over the batch instead of differentiating the standardisation once
        per example (the per-example engine's generic route, ~2-3x slower here).
        """
        d = tf.cast(kernel_grads, tf.float32)
        r, inverse_norm, gain, projected = self.standardization_terms()
        r_dot_d = tf.reduce_sum(r * d, axis=[1, 2, 3], keepdims=True)  # [B, 1, 1, 1, filters]
        kernel_grad = gain * inverse_norm * (d - tf.reduce_mean(d, axis=[1, 2, 3], keepdims=True) -
                                             projected * r * r_dot_d)
        grads = [(self.kernel, tf.cast(kernel_grad, self.kernel.dtype))]
        if self.gain is not None:
            grads.append((self.gain, tf.cast(r_dot_d[:, 0, 0, 0, :], self.gain.dtype)))
        return grads

    def expanded_bias(self):
        """The bias as the convolution adds it (or None)."""
        return None if self.bias is None else tf.cast(self.bias, self.compute_dtype)

    @property
    def output_channels(self):
        return self.filters

    def get_config(self):
        config = super().get_config()
        config.update({
            "filters": self.filters, "kernel_size": self.kernel_size, "strides": self.strides,
            "padding": self.padding, "use_bias": self.use_bias, "use_gain": self.use_gain,
            "epsilon": self.epsilon,
            "kernel_initializer": tf.keras.initializers.serialize(self.kernel_initializer),
        })
        return config
