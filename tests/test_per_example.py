"""The layer-by-layer per-example gradient engine agrees with per-example autodiff on real models."""

import numpy as np
import pytest
import tensorflow as tf

from eqdp_tf.models import build_model
from eqdp_tf.privacy import dp_step, per_example

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def _inputs(batch, views, seed=0):
    rng = np.random.RandomState(seed)
    x = tf.constant(rng.uniform(0, 255, (batch, views, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.randint(0, 10, batch).astype("int64"))
    return x, y


def _max_relative_error(a_list, b_list):
    return max(
        float(tf.reduce_max(tf.abs(a - b)) / (tf.reduce_max(tf.abs(b)) + 1e-12)) for a, b in zip(a_list, b_list)
    )


@pytest.mark.parametrize(
    "kwargs,reduction",
    [
        # the paper model: gathers, restriction, no affine norms; officially through the steerable basis and the
        # layer-wide weight standardisation (a non-linear map of all of a layer's coefficients)
        (dict(group="D4", restrict="D2"), "sum"),
        (dict(group="D4", restrict="D2", variant="dense"), "sum"),
        # interpolated kernels (einsum expansion)
        (dict(group="C8", restrict="C4", head="invariant", variant="dense"), "mean"),
        # Keras Conv2D, strides, affine GroupNorm
        (dict(architecture="wrn16_4", weight_standardization=False), "sum"),
        # weight standardisation: the kernel gradient goes back through a non-linear map of kernel and gain
        (dict(architecture="wrn16_4", weight_standardization=True), "mean"),
    ],
)
def test_layerwise_matches_vectorized_map(kwargs, reduction):
    model = build_model(**kwargs)
    x, y = _inputs(3, 2)
    fast = tf.function(lambda v, t: dp_step.per_example_gradients(model, LOSS, v, t, reduction, method="layerwise"))
    slow = tf.function(lambda v, t: dp_step.per_example_gradients(model, LOSS, v, t, reduction, method="vmap"))
    g_fast, l_fast, logits_fast = fast(x, y)
    g_slow, l_slow, logits_slow = slow(x, y)
    assert len(g_fast) == len(model.trainable_variables)
    for g, v in zip(g_fast, model.trainable_variables):
        assert g.shape == [3, *v.shape]
    # Each gradient's error relative to its own largest entry, except a weight-standardised conv's gain: its
    # gradient is <dL/dkernel, kernel> / gain, a sum of kernel-sized terms that nearly cancel (here ~1e-4 of the
    # kernel's gradient), so float32 rounding alone is ~1e-3 of it; it is measured against its kernel's gradient.
    scale = {v.name: float(tf.reduce_max(tf.abs(b))) for v, b in zip(model.trainable_variables, g_slow)}
    for v, a, b in zip(model.trainable_variables, g_fast, g_slow):
        reference = scale[v.name.replace("/gain:", "/kernel:")]
        error = float(tf.reduce_max(tf.abs(a - b))) / (reference + 1e-12)
        assert error < 1e-4, (v.name, error)
    np.testing.assert_allclose(l_fast.numpy(), l_slow.numpy(), rtol=1e-5)
    np.testing.assert_allclose(logits_fast.numpy(), logits_slow.numpy(), rtol=1e-4, atol=1e-4)


def test_per_example_gradients_sum_to_the_batch_gradient():
    model = build_model(group="C4", restrict=None)
    x, y = _inputs(4, 1, seed=1)
    grads, _, _ = dp_step.per_example_gradients(model, LOSS, x, y, "sum", method="layerwise")
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(LOSS(y, model(x[:, 0], training=True)))
    batch = tape.gradient(total, model.trainable_variables)
    assert _max_relative_error([tf.reduce_sum(g, 0) for g in grads], batch) < 1e-4
    # and they really are per example: examples differ
    assert float(tf.reduce_max(tf.abs(grads[0][0] - grads[0][1]))) > 1e-6


def test_auto_falls_back_to_vmap_for_subclassed_models():
    class Tiny(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.flat = tf.keras.layers.Flatten()
            self.dense = tf.keras.layers.Dense(10)

        def call(self, x, training=None):
            return self.dense(self.flat(x / 255.0))

    model = Tiny()
    x, y = _inputs(2, 1)
    model(x[:, 0])
    assert not per_example.supports(model)
    grads, _, _ = dp_step.per_example_gradients(model, LOSS, x, y, "sum", method="auto")
    assert grads[0].shape == [2, 32 * 32 * 3, 10]
    with pytest.raises(Exception, match="functional or Sequential"):
        dp_step.per_example_gradients(model, LOSS, x, y, "sum", method="layerwise")


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, "same"), (3, 2, "same"), (3, 2, "valid"), (1, 2, "same"),
                                                    (5, 1, "valid"), (5, 3, "same")])
def test_conv_rule_by_taps_matches_patches_and_autodiff(size, kernel, stride, padding):
    layer = tf.keras.layers.Conv2D(4, kernel, strides=stride, padding=padding)
    rng = np.random.RandomState(size + kernel)
    x = tf.constant(rng.randn(6, size, size, 3).astype("float32"))  # 3 examples x 2 views
    layer.build(x.shape)
    dz = tf.constant(rng.randn(*layer.compute_output_shape(x.shape)).astype("float32"))
    k, s, pad = per_example.conv_geometry(layer)
    dz_rows = tf.reshape(dz, [3, -1, 4])
    by_taps = per_example._kernel_grad_by_taps(x, dz_rows, k, s, pad, 3)
    by_patches = per_example._kernel_grad_by_patches(x, dz_rows, k, s, pad, 3)
    np.testing.assert_allclose(by_taps.numpy(), by_patches.numpy(), rtol=1e-5, atol=1e-5)
    if per_example._grouped_filter_gradients_supported():  # oneDNN on a CPU: the grouped-convolution form
        grouped = per_example._kernel_grad_grouped(x, dz, k, s, pad, 3)
        np.testing.assert_allclose(grouped.numpy(), by_taps.numpy(), rtol=1e-5, atol=1e-5)
    # and both are the gradient of sum(layer(x_i) * dz_i) over each example's two views
    for example in range(3):
        rows = slice(2 * example, 2 * example + 2)
        with tf.GradientTape() as tape:
            inner = tf.reduce_sum(layer(x[rows]) * dz[rows])
        expected = tape.gradient(inner, layer.kernel)
        np.testing.assert_allclose(by_taps[example].numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_grouped_filter_gradients_are_not_used_under_xla():
    # XLA compiles the grouped form on a CPU into a naive loop (~100x slower than the taps rule).
    x = tf.zeros([2, 32, 32, 3])
    dz = tf.zeros([2, 32, 32, 8])
    chosen = {}
    for jit in (False, True):
        def trace(x, dz, jit=jit):
            chosen[jit] = per_example._grouped_pays(x, dz)
            return tf.constant(0.0)

        tf.function(trace, jit_compile=jit)(x, dz)
    assert chosen[True] is False
    assert chosen[False] is per_example._grouped_filter_gradients_supported()
