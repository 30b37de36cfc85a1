"""Ghost norms for weight-standardised convolutions (WRN-16-4's, `layers.StandardizedConv2D`): the norm of each
example's gradient of the raw weights, gain and bias without forming it.

The layer convolves with the kernel gain_o * r_o, r_o = (w_o - mean(w_o)) / ||w_o - mean(w_o)|| per filter o (the
layer's `standardization_terms()`; the norm is bounded below by sqrt(epsilon)). With d_o = P^T dz_o one example's
gradient of filter o of that kernel (P its patch rows, T x N, N = k*k*C_in), the standardisation's Jacobian gives

    dw_o = a_o (d_o - mean(d_o) - pi_o r_o (r_o . d_o)),   dgain_o = r_o . d_o,   dbias_o = sum_t dz_o[t],

a_o = gain_o / ||w_o - mean(w_o)||, pi_o = 1 unless that norm was bounded by epsilon. r_o has zero mean and unit
norm where pi_o = 1, so 1/sqrt(N) and r_o are orthonormal and dw_o is a_o times d_o with its components along both
removed:

    ||dw_o||^2 = a_o^2 (||d_o||^2 - (1 . d_o)^2 / N - pi_o (r_o . d_o)^2).

The first term, summed over o, is the plain ghost norm of a convolution whose output gradient is dz scaled by a
(`clipped_sum`'s Gram matrices); the others need two numbers per example and filter, each a dot product over the
output positions: 1 . d_o = sum_t s[t] dz_o[t] with s the patch sums (a convolution of the input with ones), and
r_o . d_o = sum_t (P r_o)[t] dz_o[t] with P r the convolution of the input with r (the layer's output without gain
and bias: one forward convolution). `corrections` gives everything but the first term.

The clipped sum is one ordinary batched gradient of the kernel (dz reweighted by the clip factors), taken to the raw
weights through the same Jacobian once: it is linear and every example shares it.
"""

import numpy as np
import tensorflow as tf

from eqdp_tf.privacy import per_example


def allowed(layer, x, dz, num_views):
    """True for a weight-standardised convolution with static shapes and a static view count."""
    dims = list(x.shape[1:]) + list(dz.shape[1:])
    return (hasattr(layer, "standardization_terms") and per_example.conv_rule_applies(layer)
            and isinstance(num_views, int) and None not in dims)


def kernel_scale(layer):
    """a [filters]: what each filter's output gradient is scaled by in the ghost term."""
    _, inverse_norm, gain, _ = layer.standardization_terms()
    return gain * inverse_norm


def extra_macs(layer, x, dz, num_views):
    """Multiply-adds per example beyond the plain ghost norm's Grams: the input convolved with r and with ones."""
    k = per_example.conv_geometry(layer)[0]
    rows = num_views * int(np.prod(dz.shape[1:3]))
    return rows * k * k * int(x.shape[-1]) * (int(dz.shape[-1]) + 1)


def materialised_entries(layer):
    """Entries per example the materialise route forms: the kernel's gradient, then the raw weights' and gain's."""
    return 2 * int(layer.kernel.shape.num_elements()) + sum(
        int(v.shape.num_elements()) for v in layer.trainable_variables if v is not layer.kernel)


def corrections(layer, x, dz, batch):
    """[B]: each example's squared gradient norm minus the ghost term sum_o a_o^2 ||d_o||^2 (see the module doc)."""
    r, inverse_norm, gain, projected = layer.standardization_terms()
    a_squared = tf.square(gain * inverse_norm)
    k, s, padding = per_example.conv_geometry(layer)
    x = tf.cast(x, tf.float32)
    dz_rows = tf.reshape(tf.cast(dz, tf.float32), [batch, -1, dz.shape[-1]])  # [B, T, filters]

    def along(kernel):
        """[B, filters]: sum over the example's output positions of (the input convolved with kernel) * dz."""
        out = tf.reshape(tf.nn.conv2d(x, kernel, s, padding), [batch, -1, kernel.shape[-1]])
        return tf.reduce_sum(out * dz_rows, axis=1)

    fan_in = float(np.prod(r.shape[:-1]))
    ones_dot = along(tf.ones(list(r.shape[:-1]) + [1]))  # the patch sums against every filter's dz: (1 . d_o)
    r_dot = along(r)  # (r_o . d_o)
    squared = -tf.reduce_sum(a_squared * (tf.square(ones_dot) / fan_in + projected * tf.square(r_dot)), axis=1)
    if layer.gain is not None:
        squared += tf.reduce_sum(tf.square(r_dot), axis=1)
    if layer.bias is not None:
        squared += tf.reduce_sum(tf.square(tf.reduce_sum(dz_rows, axis=1)), axis=1)
    return squared


def raw_weight_sum(layer, kernel_sum):
    """[(variable, sum)] of the raw weights (and gain) from a sum of the standardised kernel's gradients."""
    return [(variable, grad[0]) for variable, grad in layer.weight_gradients_from_kernel(kernel_sum[None])]
