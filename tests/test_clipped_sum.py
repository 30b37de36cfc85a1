"""The clipped sum by norms-then-weighted-sum (ghost norms where they pay) equals clipping materialised gradients."""

import numpy as np
import pytest
import tensorflow as tf

from eqdp_tf.errors import ConfigError
from eqdp_tf.models import build_model
from eqdp_tf.privacy import clipped_sum, dp_step

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def _small_cnn():
    """Keras layers the ghost path must get right: no-bias conv, strided 'same' and 1x1 'valid' convs, a 'valid'
    3x3 conv, affine GroupNorm (materialised), Dense."""
    inputs = tf.keras.Input([8, 8, 3])
    h = tf.keras.layers.Conv2D(6, 3, padding="same", use_bias=False)(inputs)
    h = tf.keras.layers.GroupNormalization(2)(h)
    h = tf.keras.layers.Conv2D(8, 3, strides=2, padding="same")(h)
    h = h + tf.keras.layers.Conv2D(8, 1, strides=2, padding="valid")(inputs)
    h = tf.keras.layers.Conv2D(5, 3, padding="valid")(h)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(10)(h))


def _inputs(batch, views, size, seed=0):
    rng = np.random.RandomState(seed)
    x = tf.constant(rng.normal(size=(batch, views, size, size, 3)).astype("float32"))
    y = tf.constant(rng.randint(0, 10, batch).astype("int64"))
    return x, y


def _reference(model, views, labels, clip, mask):
    """Per-example gradients by tf.vectorized_map, clipped by TF-Privacy's rule, masked sum."""
    grads, _, _ = dp_step.vmap_per_example_gradients(model, LOSS, views, labels, "sum")
    clipped, norms = dp_step.clip_per_example(grads, clip)
    return [tf.tensordot(mask, g, axes=1) for g in clipped], norms


MODELS = {
    "keras_cnn": (_small_cnn, 8),
    # ghost-able group convs (dense C1)
    "c1_resnet9": (lambda: build_model(group="C1", restrict=None, variant="dense"), 32),
    # shared filters: materialised, or the gather route
    "d4d2_resnet9": (lambda: build_model(group="D4", restrict="D2", variant="dense"), 32),
    # steerable, standardised coefficients: materialised through the basis and the standardisation
    "d4d2_official": (lambda: build_model(group="D4", restrict="D2", variant="official"), 32),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("norm_method", clipped_sum.NORM_METHODS)
def test_clipped_sum_matches_clipping_materialised_gradients(name, norm_method):
    make, size = MODELS[name]
    model = make()
    views, labels = _inputs(5, 2, size)
    mask = tf.constant([1.0, 1.0, 0.0, 1.0, 1.0])
    expected, expected_norms = _reference(model, views, labels, 0.5, mask)
    sums, norms, losses, logits = tf.function(
        lambda v, y: clipped_sum.clipped_gradient_sum(model, LOSS, v, y, lambda l: tf.reduce_sum(l, 1), 0.5, mask,
                                                      norm_method))(views, labels)
    np.testing.assert_allclose(norms.numpy(), expected_norms.numpy(), rtol=2e-5)
    assert float(tf.reduce_min(norms)) > 0.5  # every example is clipped, so the clip factors matter
    for got, want, variable in zip(sums, expected, model.trainable_variables):
        assert got.shape == variable.shape
        # float32 sums in another order: relative to the variable's largest entry, as test_per_example does
        assert float(tf.reduce_max(tf.abs(got - want)) / tf.reduce_max(tf.abs(want))) < 1e-4, variable.name
    assert losses.shape == [5] and logits.shape == [5, 2, 10]


def test_ghost_pays_where_rows_are_few_and_weights_many():
    def decide(layer, size, c_in, views=1):
        x = tf.zeros([2 * views, size, size, c_in])
        z = layer(x)
        return clipped_sum.ghost_pays(layer, x, tf.zeros_like(z), views)

    assert decide(tf.keras.layers.Conv2D(256, 3, padding="same"), 8, 256)  # WRN's last stage: 64 rows, 590k weights
    assert not decide(tf.keras.layers.Conv2D(64, 3, padding="same"), 32, 64)  # 1024 rows, 37k weights
    # WRN's middle stage: its Grams cost ~150 multiply-adds per weight, more than moving the per-example gradient
    assert not decide(tf.keras.layers.Conv2D(128, 3, padding="same"), 16, 128)
    assert decide(tf.keras.layers.Conv2D(256, 3, strides=2, padding="same"), 16, 128)  # into the last stage: ~40
    assert not decide(tf.keras.layers.Conv2D(256, 3, padding="same"), 8, 256, views=16)  # K views multiply the rows
    from layers import GroupConv2D

    # shared filters: by the gather identity (gather_ghost) at the paper model's 4x4 and 8x8 layers, not at 16x16
    assert decide(GroupConv2D(39, 3, group="D2"), 4, 156) and decide(GroupConv2D(39, 3, group="D2"), 8, 312)
    assert not decide(GroupConv2D(13, 3, group="D4"), 16, 104)
    assert not decide(GroupConv2D(39, 3, group="C8"), 4, 312)  # interpolated: no gather, so it materialises
    dense = tf.keras.layers.Dense(10)
    x = tf.zeros([4, 256])
    assert clipped_sum.ghost_pays(dense, x, tf.zeros_like(dense(x)), 1)
    assert not clipped_sum.ghost_pays(dense, x, tf.zeros_like(dense(x)), None)  # unknown view count


def test_dp_step_norm_methods_accumulate_the_same_sum():
    model = build_model(architecture="wrn16_4", weight_standardization=False)  # plain convs: ghost where it pays
    views, labels = _inputs(3, 1, 32, seed=2)
    mask = tf.constant([1.0, 0.0, 1.0])
    results = []
    for norm_method in ("materialise", "auto"):
        optimizer = dp_step.DPKerasSGDOptimizer(1.0, 0.0, 3.0, learning_rate=0.1)
        step = dp_step.DPStep(model, None, optimizer, norm_method=norm_method)
        stats = step.compiled_accumulate()(views, labels, mask)
        results.append(([a.numpy() for a in step.accumulators], {k: float(v) for k, v in stats.items()}))
    (first, stats_a), (second, stats_b) = results
    for a, b in zip(first, second):
        assert np.abs(b - a).max() / np.abs(a).max() < 1e-4
    assert stats_a.keys() == stats_b.keys()
    for key in stats_a:
        assert stats_b[key] == pytest.approx(stats_a[key], rel=1e-5)


def test_bad_norm_method_is_refused():
    model = build_model(group="C1", restrict=None)
    optimizer = dp_step.DPKerasSGDOptimizer(1.0, 1.0, 8.0, learning_rate=0.1)
    with pytest.raises(ConfigError, match="norm_method must be one of"):
        dp_step.DPStep(model, None, optimizer, norm_method="cheap")


def test_ghost_layers_go_first_in_backward_order_then_materialised_ones_in_forward_order():
    ghost, gather, materialise = clipped_sum.ghost_route, clipped_sum.gather_ghost_route, clipped_sum.materialise_route
    routed = [(name, None, None, route) for name, route in
              [("a", materialise), ("b", gather), ("c", materialise), ("d", gather), ("e", ghost)]]
    assert [entry[0] for entry in clipped_sum._processing_order(routed)] == ["e", "d", "b", "a", "c"]
