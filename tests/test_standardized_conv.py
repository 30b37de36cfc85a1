"""Scaled weight standardisation (layers.StandardizedConv2D): the kernel it builds, its DP gradients, its export."""

import numpy as np
import pytest
import tensorflow as tf

from eqdp_tf import config as config_lib
from eqdp_tf.privacy import clipped_sum, dp_step
from layers import StandardizedConv2D, freeze

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def _built(filters=5, kernel_size=3, in_channels=4, **kwargs):
    layer = StandardizedConv2D(filters, kernel_size, **kwargs)
    layer.build([None, 8, 8, in_channels])
    rng = np.random.RandomState(0)
    # Raw weights far from standardised: offset and scaled per filter, as the optimiser could leave them.
    raw = rng.normal(size=layer.kernel.shape) * np.arange(1, filters + 1) + np.linspace(-3, 3, filters)
    layer.kernel.assign(raw.astype("float32"))
    if layer.gain is not None:
        layer.gain.assign(np.linspace(0.5, 2.0, filters).astype("float32"))
    return layer


def test_each_filter_has_zero_mean_and_the_norm_of_its_gain():
    layer = _built()
    kernel = layer.expanded_kernel().numpy().reshape(-1, 5)  # [fan-in, filters]
    np.testing.assert_allclose(kernel.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), np.linspace(0.5, 2.0, 5), rtol=1e-5)
    # the convolution uses that kernel, then the bias
    layer.bias.assign(np.arange(5, dtype="float32"))
    x = tf.random.stateless_normal([2, 8, 8, 4], seed=[1, 2])
    expected = tf.nn.conv2d(x, layer.expanded_kernel(), 1, "SAME") + tf.range(5, dtype=tf.float32)
    np.testing.assert_allclose(layer(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_a_constant_filter_does_not_divide_by_zero():
    layer = _built(use_gain=False)
    layer.kernel.assign(tf.ones_like(layer.kernel))
    kernel = layer.expanded_kernel().numpy()
    assert np.isfinite(kernel).all() and np.abs(kernel).max() == 0.0  # (w - mean) = 0, scale bounded by epsilon


def _small_model(weight_standardization_layer):
    inputs = tf.keras.Input([8, 8, 3])
    x = weight_standardization_layer(6, 3, name="a")(inputs)
    x = tf.keras.layers.GroupNormalization(groups=2)(x)
    x = tf.keras.layers.Activation("relu")(x)
    x = weight_standardization_layer(8, 3, strides=2, name="b")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(10)(x))


def _views(batch, num_views, seed):
    rng = np.random.RandomState(seed)
    return (tf.constant(rng.normal(size=(batch, num_views, 8, 8, 3)).astype("float32")),
            tf.constant(rng.randint(0, 10, batch).astype("int64")))


def test_per_example_gradients_through_the_standardisation_match_autodiff():
    model = _small_model(StandardizedConv2D)
    # Move gains and biases off their initial values, so that their gradients are not a special case.
    for layer in model.layers:
        if isinstance(layer, StandardizedConv2D):
            layer.gain.assign(tf.linspace(0.5, 1.5, layer.filters))
            layer.bias.assign(tf.linspace(-0.2, 0.2, layer.filters))
    views, labels = _views(4, 2, seed=3)
    fast, _, _ = dp_step.per_example_gradients(model, LOSS, views, labels, "sum", method="layerwise")
    slow, _, _ = dp_step.per_example_gradients(model, LOSS, views, labels, "sum", method="vmap")
    names = [v.name for v in model.trainable_variables]
    assert any("gain" in n for n in names)
    for name, a, b in zip(names, fast, slow):
        assert float(tf.reduce_max(tf.abs(b))) > 0, name  # every weight, the gains too, gets a gradient
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5 * float(tf.reduce_max(tf.abs(b))))


@pytest.mark.parametrize("use_gain", [True, False])
def test_written_out_jacobian_matches_differentiating_the_standardisation(use_gain):
    from eqdp_tf.privacy import per_example

    layer = _built(use_gain=use_gain)
    # One filter constant: there N var(w) < epsilon, and the kernel no longer depends on w through the norm.
    layer.kernel.assign(tf.concat([tf.fill(layer.kernel.shape[:-1] + [1], 0.3), layer.kernel[..., 1:]], axis=-1))
    cotangents = tf.random.stateless_normal([3, *layer.kernel.shape], seed=[5, 6])
    sources = [layer.kernel] + ([layer.gain] if use_gain else [])
    expected = per_example._kernel_vjp(layer.expanded_kernel, sources, cotangents)
    written = layer.weight_gradients_from_kernel(cotangents)
    assert [v.name for v, _ in written] == [v.name for v in sources]
    for (_, got), want in zip(written, expected):
        assert float(tf.reduce_max(tf.abs(want))) > 0
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5 * float(tf.reduce_max(tf.abs(want))))


def test_clipped_sum_never_takes_the_plain_ghost_route_for_a_standardised_conv():
    # The plain ghost norm is that of the kernel the conv uses, not of the raw weights and gains DP-SGD updates.
    layer = _built()
    x = tf.zeros([2, 8, 8, 4])
    assert not clipped_sum.ghost_allowed(layer, x, layer(x), 1)
    assert clipped_sum.route_cost(layer, x, layer(x), 1)[0] == "standardized_ghost"
    plain = tf.keras.layers.Conv2D(5, 3, padding="same", use_bias=False)
    assert clipped_sum.ghost_allowed(plain, x, plain(x), 1)


def _standardised_cnn():
    """Weight-standardised convs in the shapes the route must get right: strided, 'valid', 1x1, without gain, without
    bias, and one filter whose weights are all equal (its norm bounded by epsilon: no projection)."""
    inputs = tf.keras.Input([8, 8, 3])
    h = StandardizedConv2D(6, 3, name="a")(inputs)
    h = tf.keras.layers.GroupNormalization(2)(h)
    h = StandardizedConv2D(8, 3, strides=2, use_gain=False, name="b")(h)
    h = h + StandardizedConv2D(8, 1, strides=2, padding="valid", use_bias=False, name="c")(inputs)
    h = StandardizedConv2D(5, 3, padding="valid", name="d")(tf.nn.relu(h))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(10)(tf.keras.layers.GlobalAveragePooling2D()(h)))
    a = model.get_layer("a")
    a.kernel.assign(tf.concat([tf.fill(a.kernel.shape[:-1] + [1], 0.3), a.kernel[..., 1:]], axis=-1))
    for layer in model.layers:
        if isinstance(layer, StandardizedConv2D) and layer.gain is not None:
            layer.gain.assign(tf.linspace(0.5, 1.5, layer.filters))
    return model


@pytest.mark.parametrize("norm_method", ["ghost", "auto"])
def test_standardised_ghost_route_gives_the_clipped_sum_of_the_materialised_gradients(norm_method):
    model = _standardised_cnn()
    views, labels = _views(5, 2, seed=4)
    mask = tf.constant([1.0, 1.0, 0.0, 1.0, 1.0])
    grads, _, _ = dp_step.vmap_per_example_gradients(model, LOSS, views, labels, "sum")
    clipped, want_norms = dp_step.clip_per_example(grads, 0.5)
    sums, norms, _, _ = clipped_sum.clipped_gradient_sum(model, LOSS, views, labels, lambda l: tf.reduce_sum(l, 1),
                                                         0.5, mask, norm_method)
    np.testing.assert_allclose(norms.numpy(), want_norms.numpy(), rtol=2e-5)
    assert float(tf.reduce_min(norms)) > 0.5  # every example clipped: the clip factors matter
    for got, g, variable in zip(sums, clipped, model.trainable_variables):
        want = tf.tensordot(mask, g, axes=1)
        assert float(tf.reduce_max(tf.abs(got - want)) / tf.reduce_max(tf.abs(want))) < 1e-4, variable.name


def test_the_standardised_ghost_route_pays_at_wrn_s_last_stage_only():
    def decide(size, channels):
        layer = StandardizedConv2D(channels, 3)
        x = tf.zeros([2, size, size, channels])
        return clipped_sum.ghost_pays(layer, x, tf.zeros_like(layer(x)), 1)

    assert decide(8, 256)  # 64 rows, 590k weights: ~70 multiply-adds per materialised entry against 64 * 2
    assert not decide(16, 128) and not decide(32, 64)


def test_serialises_and_freezes_to_a_plain_conv_with_the_same_outputs():
    model = _small_model(StandardizedConv2D)
    x = tf.random.stateless_normal([2, 8, 8, 3], seed=[3, 4])
    clone = tf.keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(x).numpy(), model(x).numpy(), rtol=1e-6)
    frozen = freeze(model)
    assert not any(isinstance(layer, StandardizedConv2D) for layer in frozen.layers)
    assert sum(isinstance(layer, tf.keras.layers.Conv2D) for layer in frozen.layers) == 2
    np.testing.assert_allclose(frozen(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(filters=0, kernel_size=3), "filters must be a positive int"),
    (dict(filters=4, kernel_size=(3, 1)), "kernel_size must be an int or an equal"),
    (dict(filters=4, kernel_size=3, padding="causal"), "padding must be 'same' or 'valid'"),
    (dict(filters=4, kernel_size=3, epsilon=0.0), "epsilon must be a positive number"),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StandardizedConv2D(**kwargs)


def test_weight_standardisation_is_the_default_as_de_et_al():
    assert config_lib.TrainConfig().wrn_weight_standardization is True
