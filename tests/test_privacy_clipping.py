"""Clipping on every route (issue 29, property 5): each example's clipped gradient has norm <= C, equals its
``tf.vectorized_map`` gradient scaled by min(1, C / norm), and is left unchanged when its norm is below C.

Routes: every norm method of the layer-by-layer engine (``clipped_sum.NORM_METHODS``, whatever it holds when the
test runs: materialise, ghost, auto, and any added later), the ``vectorized_map`` fallback of the DP step, and
TF-Privacy's fast clipping with our ``layer_registry()``. The model has every kind of layer with weights the
routes treat apart: a lifting and a group convolution (C4, whose filters are gathered from shared base filters,
and D2; and, as the official model has them, over escnn's steerable basis with layer-wide weight
standardisation and a scaled bias, for C4 and for C1, whose dense taps would otherwise take the plain ghost route),
an affine equivariant GroupNorm, an ordinary strided Conv2D and a Dense head. Each example's clipped
gradient is observed as the engine's masked clipped sum with a mask selecting that example alone.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping import clip_grads

import eqdp_tf
import layers
from eqdp_tf.privacy import clipped_sum, dp_step

BATCH, VIEWS, CLASSES = 6, 2, 5
LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
ROUTES = [*clipped_sum.NORM_METHODS, "vmap", "tf_privacy_registry"]


# "GROUP" or "GROUP/official": the latter's group convolutions as the official model's (steerable coefficients,
# weight-standardised, bias scaled); "SO2" the official SO(2) model's layers (band-limited fields).
CASES = ["C4", "D2", "C4/official", "C1/official", "SO2"]


def _so2_model():
    """The official SO(2) model's layers (issue 42): steerable coefficients of band-limited fields, standardised."""
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input([8, 8, 3])
    h = layers.DiscMask(1.0)(inputs)
    h = layers.BandLimitedConv2D(3, 3, frequency=1, input_frequency=0, weight_standardization=True)(h)
    h = layers.FourierELU(1)(h)
    h = layers.BandLimitedGroupNormalization(3, 1)(h)
    h = layers.AntialiasedAveragePooling2D()(h)
    h = layers.BandLimitedConv2D(2, 3, frequency=1, bias_initializer="ones", weight_standardization=True)(h)
    h = layers.RestrictBandLimitedToTrivial(1)(h)
    h = tf.keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(h)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(CLASSES)(h))


def _model(case):
    if case == "SO2":
        return _so2_model()
    group, _, official = case.partition("/")
    conv_options = dict(basis="steerable", weight_standardization=True, bias_scale=0.5) if official else {}
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input([8, 8, 3])
    h = layers.LiftingConv2D(3, 3, group=group, padding="same", **conv_options)(inputs)
    h = layers.GroupNormalization(groups=3, group=group, center=True, scale=True)(h)
    h = tf.keras.layers.Activation("relu")(h)
    h = layers.SpatialPooling2D(2)(h)
    h = layers.GroupConv2D(2, 3, group=group, padding="same", bias_initializer="ones", **conv_options)(h)
    h = layers.GroupPooling(group)(h)
    h = tf.keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(h)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(CLASSES)(h))


def _data(views):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, views, 8, 8, 3)).astype(np.float32)
    x *= np.linspace(0.2, 3.0, BATCH, dtype=np.float32)[:, None, None, None, None]  # norms spread around C
    return tf.constant(x), tf.constant(rng.integers(0, CLASSES, BATCH))


def _flat(grads):
    return np.concatenate([np.reshape(g, [-1]) for g in grads])


@functools.lru_cache(maxsize=None)
def _case(group, views):
    """(model, views, labels, [B, P] per-example gradients, each example on its own by ``tf.vectorized_map``, views
    summed), made once per group and view count: every route is compared with the same reference."""
    model = _model(group)
    x, labels = _data(views)
    grads, _, _ = dp_step.vmap_per_example_gradients(model, LOSS, x, labels, "sum")
    return model, x, labels, np.stack([_flat([g[i].numpy() for g in grads]) for i in range(BATCH)])


def _clipped_by_dp_step(model, views, labels, clip, route):
    """[B, P]: example i's clipped gradient, the DP step's accumulated sum with a mask that selects i alone."""
    optimizer = dp_step.DPKerasSGDOptimizer(clip, 0.0, float(BATCH), learning_rate=0.1)
    if route == "vmap":
        step = dp_step.DPStep(model, LOSS, optimizer, per_example_method="vmap")
    else:
        step = dp_step.DPStep(model, LOSS, optimizer, per_example_method="layerwise", norm_method=route)
    accumulate = step.compiled_accumulate()
    rows = []
    for i in range(BATCH):
        accumulate(views, labels, tf.one_hot(i, BATCH))
        rows.append(_flat([a.numpy() for a in step.accumulators]))
        step.reset()
    return np.stack(rows)


def _clipped_by_tf_privacy(model, views, labels, clip):
    """[B, P]: TF-Privacy's fast clipping with our registry, one example at a time (a batch mean of one)."""
    model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    registry = eqdp_tf.layer_registry()
    assert all(registry.is_elem(layer) for layer in model.layers if layer.trainable_weights)
    rows = []
    for i in range(BATCH):
        grads, _, _ = clip_grads.compute_clipped_gradients_and_outputs(
            model, clip, registry, views[i:i + 1, 0], labels[i:i + 1])
        rows.append(_flat([g.numpy() for g in grads]))
    return np.stack(rows)


@pytest.mark.parametrize("group", CASES)
@pytest.mark.parametrize("route", ROUTES)
def test_clipped_per_example_gradients_are_within_c_and_unchanged_below_it(route, group):
    model, views, labels, reference = _case(group, 1 if route == "tf_privacy_registry" else VIEWS)
    norms = np.linalg.norm(reference, axis=1)
    clip = float(np.median(norms))
    below = norms < clip
    assert 2 <= below.sum() <= BATCH - 2, norms  # both kinds of example are there
    if route == "tf_privacy_registry":
        clipped = _clipped_by_tf_privacy(model, views, labels, clip)
    else:
        clipped = _clipped_by_dp_step(model, views, labels, clip, route)
    assert np.all(np.linalg.norm(clipped, axis=1) <= clip * (1 + 1e-5)), (np.linalg.norm(clipped, axis=1), clip)
    expected = reference * np.minimum(1.0, clip / norms)[:, None]
    scale = np.abs(reference).max()  # float32 sums in another order: relative to the largest entry
    assert np.abs(clipped - expected).max() < 1e-4 * scale
    # An example within the bound is left as it is, not scaled (up or down).
    assert np.abs(clipped[below] - reference[below]).max() < 1e-5 * scale
    np.testing.assert_allclose(np.linalg.norm(clipped[~below], axis=1), clip, rtol=1e-4)


def test_every_norm_method_is_covered():
    """This module covers whatever norm methods the engine offers, including ones added after it was written."""
    assert set(clipped_sum.NORM_METHODS) <= set(ROUTES) and {"materialise", "ghost"} <= set(ROUTES)
