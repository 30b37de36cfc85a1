"""Ghost norms of group convolutions (privacy/gather_ghost.py) against materialised per-example base-filter
gradients, in the clipped sum and in the TF-Privacy registry."""

import zlib

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping import clip_grads
from tensorflow_privacy.privacy.keras_models.dp_keras_model import DPModel

import eqdp_tf
import layers
from eqdp_tf.models import build_model
from eqdp_tf.privacy import clipped_sum, dp_step, gather_ghost, per_example

EXACT_GROUPS = ("C2", "C4", "D1", "D2", "D4")
LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def _conv(kind, group, **kwargs):
    return (layers.LiftingConv2D if kind == "lifting" else layers.GroupConv2D)(3, 3, group=group, **kwargs)


def _built(kind, group, size=5, **kwargs):
    layer = _conv(kind, group, **kwargs)
    order = layers.get_group(group).order
    layer.build([None, size, size, 2 if kind == "lifting" else 2 * order])
    return layer


@pytest.mark.parametrize("kind", ["lifting", "group"])
@pytest.mark.parametrize("group", ("C1",) + EXACT_GROUPS)
def test_gather_index_rebuilds_the_expanded_kernel(kind, group):
    layer = _built(kind, group)
    index = layer.kernel_gather_index()
    order, filters = layer.group.order, layer.filters
    expanded = layer.expanded_kernel().numpy().reshape(-1, filters, order)
    base = layer.kernel.numpy().reshape(-1, filters)
    assert index.shape == (order, base.shape[0])
    for g in range(order):
        assert sorted(index[g]) == list(range(base.shape[0]))  # a permutation of the base rows
        np.testing.assert_array_equal(expanded[:, :, g], base[index[g]])


@pytest.mark.parametrize("group", ["C8", "D8"])
def test_interpolated_groups_expose_no_gather_and_keep_materialising(group):
    for kind in ("lifting", "group"):
        layer = _built(kind, group)
        assert layer.kernel_gather_index() is None
        x = tf.zeros([2, 5, 5, layer.input_spec.axes[-1]])
        dz = tf.zeros_like(layer(x))
        assert not gather_ghost.allowed(layer, x, dz, 1)
        assert clipped_sum._route("ghost", layer, x, dz, 1) is clipped_sum.materialise_route


@pytest.mark.parametrize("group", EXACT_GROUPS)
def test_pairs_fall_into_one_class_per_group_element(group):
    """The gather is a representation: the |G|^2 pairs (g, h) give |G| relative permutations, |G| pairs each; one
    of each inverse pair is kept (counted twice)."""
    for kind in ("lifting", "group"):
        channel_perms, terms = gather_ghost.plan(_built(kind, group))
        order = layers.get_group(group).order
        assert all(len(term.lefts) == order for term in terms)
        assert sum(term.weight for term in terms) == order
        assert len(channel_perms) == (1 if kind == "lifting" else len(terms))


# (strides, padding, input size, views K, use_bias)
GEOMETRIES = [(1, "same", 5, 1, True), (2, "same", 5, 2, False), (1, "valid", 6, 3, True), (2, "valid", 7, 1, False)]


@pytest.mark.parametrize("kind", ["lifting", "group"])
@pytest.mark.parametrize("group", EXACT_GROUPS)
def test_norms_and_weighted_sum_equal_materialised_base_filter_gradients(kind, group):
    rng = np.random.default_rng(zlib.crc32(f"{kind} {group}".encode()))
    batch = 3
    for strides, padding, size, views, use_bias in GEOMETRIES:
        layer = _conv(kind, group, strides=strides, padding=padding, use_bias=use_bias)
        channels = 2 if kind == "lifting" else 2 * layers.get_group(group).order
        x = tf.constant(rng.normal(size=[batch * views, size, size, channels]).astype(np.float32))
        dz = tf.constant(rng.normal(size=layer(x).shape).astype(np.float32))
        assert gather_ghost.allowed(layer, x, dz, views)
        materialised = per_example.layer_rule(layer)(layer, x, dz, batch, views)  # [(variable, [B, *shape])]
        expected = sum(np.sum(g.numpy().reshape(batch, -1) ** 2, axis=1) for _, g in materialised)
        squared, weighted_sum = clipped_sum.gather_ghost_route(layer, x, dz, batch, views)
        np.testing.assert_allclose(squared.numpy(), expected, rtol=1e-5)
        weights = tf.constant(rng.uniform(0.1, 1.0, size=[batch]).astype(np.float32))
        got = dict((v.ref(), value) for v, value in weighted_sum(weights))
        assert len(got) == len(materialised) == (2 if use_bias else 1)
        for variable, grads in materialised:
            want = np.tensordot(weights.numpy(), grads.numpy(), axes=1)
            np.testing.assert_allclose(got[variable.ref()].numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _count_calls(monkeypatch):
    """The names of the layers whose norms `gather_ghost.squared_norms` computes from now on."""
    calls = []
    original = gather_ghost.squared_norms
    monkeypatch.setattr(gather_ghost, "squared_norms", lambda layer, *args: calls.append(layer.name) or original(
        layer, *args))
    return calls


def _restricted_model(restrict):
    """Lifting and group convs over D4, optionally restricted to D2, then group convs at low resolution."""
    tf.keras.utils.set_random_seed(3)
    inputs = tf.keras.Input([9, 9, 3])
    x = layers.LiftingConv2D(2, 3, group="D4", padding="valid", name="lift")(inputs)  # 7x7
    x = layers.GroupConv2D(2, 3, group="D4", strides=2, padding="valid", use_bias=False, name="down")(x)  # 3x3
    group = "D4"
    if restrict:
        x = layers.RestrictToSubgroup("D4", "D2")(x)
        group = "D2"
    x = tf.keras.layers.Activation("tanh")(x)
    x = layers.GroupConv2D(3, 3, group=group, name="late")(x)
    x = layers.GroupPooling(group)(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(4)(tf.keras.layers.Flatten()(x)))


@pytest.mark.parametrize("restrict", [False, True])
def test_clipped_sum_by_the_gather_route_equals_clipping_vmap_gradients(restrict, monkeypatch):
    calls = _count_calls(monkeypatch)
    model = _restricted_model(restrict)
    rng = np.random.default_rng(1)
    views = tf.constant(rng.normal(size=[4, 2, 9, 9, 3]).astype(np.float32))
    labels = tf.constant(rng.integers(0, 4, size=[4]))
    mask = tf.constant([1.0, 0.0, 1.0, 1.0])
    grads, _, _ = dp_step.vmap_per_example_gradients(model, LOSS, views, labels, "sum")
    clipped, expected_norms = dp_step.clip_per_example(grads, 0.1)
    expected = [tf.tensordot(mask, g, axes=1) for g in clipped]
    for norm_method in ("ghost", "materialise"):
        sums, norms, _, _ = tf.function(lambda v, y, m=norm_method: clipped_sum.clipped_gradient_sum(
            model, LOSS, v, y, lambda l: tf.reduce_sum(l, 1), 0.1, mask, m))(views, labels)
        np.testing.assert_allclose(norms.numpy(), expected_norms.numpy(), rtol=1e-5)
        assert float(tf.reduce_min(norms)) > 0.1  # every example is clipped
        for got, want, variable in zip(sums, expected, model.trainable_variables):
            assert float(tf.reduce_max(tf.abs(got - want)) / tf.reduce_max(tf.abs(want))) < 1e-4, variable.name
        assert sorted(calls) == ([] if norm_method == "materialise" else ["down", "late", "lift"])
        calls.clear()


def test_auto_takes_the_gather_route_where_the_cost_model_says():
    model = build_model(architecture="eq_resnet9", group="D4", restrict="D2", head="paper", variant="dense")
    chosen = {}
    for layer in model.layers:
        if not layer.trainable_weights:
            continue
        x = tf.zeros([2] + list(layer.input.shape[1:]))
        dz = tf.zeros([2] + list(layer.output.shape[1:]))
        route = clipped_sum._route("auto", layer, x, dz, 1)
        cost = clipped_sum.route_cost(layer, x, dz, 1)
        pays = cost is not None and cost[1] < clipped_sum.GHOST_MACS_PER_WEIGHT * cost[2]
        assert clipped_sum.ghost_pays(layer, x, dz, 1) == pays == (route is not clipped_sum.materialise_route)
        chosen[layer.name] = route.__name__
    assert chosen == {"stage1_conv": "materialise_route", "stage2_conv": "materialise_route",
                      "res1a_conv": "materialise_route", "res1b_conv": "materialise_route",
                      "stage3_conv": "materialise_route", "stage4_conv": "gather_ghost_route",
                      "res2a_conv": "gather_ghost_route", "res2b_conv": "gather_ghost_route", "logits": "ghost_route"}
    # K views multiply the rows: at K = 4 the 8x8 layer's Grams cost more than materialising
    layer = model.get_layer("stage4_conv")
    x, dz = tf.zeros([8] + list(layer.input.shape[1:])), tf.zeros([8] + list(layer.output.shape[1:]))
    assert not clipped_sum.ghost_pays(layer, x, dz, 4) and clipped_sum.ghost_pays(layer, x, dz, 1)


def _low_resolution_model():
    """Lifting and group convs at 4x4, where the gather route pays, and a plain conv between them."""
    tf.keras.utils.set_random_seed(2)
    inputs = tf.keras.Input([4, 4, 3])
    x = layers.LiftingConv2D(4, 3, group="D2", name="lift")(inputs)
    x = tf.keras.layers.Activation("tanh")(x)
    x = layers.GroupConv2D(6, 3, group="D2", name="mid")(x)
    x = layers.GroupConv2D(6, 3, group="C4", name="late")(tf.keras.layers.Conv2D(24, 1)(x))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(4)(tf.keras.layers.Flatten()(x)))


def test_registry_takes_the_gather_route_and_gives_the_same_norms(monkeypatch):
    calls = _count_calls(monkeypatch)
    model = _low_resolution_model()
    x = tf.zeros([2, 4, 4, 24])
    assert clipped_sum._route("auto", model.get_layer("late"), x, model.get_layer("late")(x), 1) \
        is clipped_sum.gather_ghost_route
    rng = np.random.default_rng(0)
    images = rng.normal(size=[5, 4, 4, 3]).astype(np.float32)
    labels = rng.integers(0, 4, size=[5])

    def loss(y, logits, weights=None):
        return tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)

    norms = clip_grads.compute_gradient_norms(model, eqdp_tf.layer_registry(), images, labels,
                                              per_example_loss_fn=loss)
    grads, _, _ = dp_step.vmap_per_example_gradients(model, lambda y, z: loss(y, z), images[:, None], labels)
    expected = np.sqrt(sum(np.sum(np.reshape(g.numpy() ** 2, [len(labels), -1]), axis=1) for g in grads))
    np.testing.assert_allclose(norms.numpy(), expected, rtol=1e-5)
    assert sorted(calls) == ["late", "lift", "mid"]  # at 4x4 every group conv takes it, the lifting one too


def test_dp_model_with_the_registry_equals_its_stock_path_where_the_gather_route_is_taken():
    """TF-Privacy's DPModel, fast clipping with our registry (the gather route on every group conv here) against
    its own vectorized_map path: the same update (no noise, a clip norm that binds)."""
    rng = np.random.default_rng(4)
    images = rng.normal(size=[6, 4, 4, 3]).astype(np.float32)
    labels = rng.integers(0, 4, size=[6])
    updates = {}
    for fast in (True, False):
        base = _low_resolution_model()
        model = DPModel(l2_norm_clip=0.05, noise_multiplier=0.0, use_xla=False,
                        layer_registry=eqdp_tf.layer_registry() if fast else None,
                        inputs=base.inputs, outputs=base.outputs)
        model.compile(optimizer=tf.keras.optimizers.SGD(1.0),
                      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        before = [w.copy() for w in model.get_weights()]
        model.fit(images, labels, batch_size=len(labels), epochs=1, verbose=0)
        updates[fast] = [w - b for w, b in zip(model.get_weights(), before)]
    for fast_update, stock_update in zip(updates[True], updates[False]):
        np.testing.assert_allclose(fast_update, stock_update, atol=1e-6, rtol=1e-4)
    assert max(np.max(np.abs(u)) for u in updates[True]) > 1e-4
