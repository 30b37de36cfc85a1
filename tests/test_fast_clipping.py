"""Our TF-Privacy layer registry (fast gradient clipping for CNNs) against TF-Privacy's own per-example paths."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_privacy.privacy.keras_models.dp_keras_model import DPModel
from tensorflow_privacy.privacy.fast_gradient_clipping import clip_grads

import eqdp_tf
import layers
from eqdp_tf.privacy.dp_step import vmap_per_example_gradients


def _loss(labels, logits, weights=None):
    return tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def _models():
    def functional(build):
        tf.keras.utils.set_random_seed(1)
        inputs = tf.keras.Input([12, 12, 3])
        return tf.keras.Model(inputs, build(inputs))

    def keras_cnn(x):
        x = tf.keras.layers.Conv2D(5, 3, strides=2, padding="same", activation="relu")(x)
        x = tf.keras.layers.GroupNormalization(groups=5)(x)
        x = tf.keras.layers.Conv2D(6, 3, padding="valid", use_bias=False)(x)
        x = tf.keras.layers.LayerNormalization()(x)
        return tf.keras.layers.Dense(4)(tf.keras.layers.Flatten()(x))

    def equivariant_cnn(x):
        x = layers.LiftingConv2D(3, 3, group="D4", padding="same")(x)
        x = layers.GroupNormalization(groups=3, group="D4", center=True, scale=True)(x)
        x = layers.GroupConv2D(2, 3, group="D4", padding="valid")(x)
        x = layers.GroupPooling("D4")(x)
        return tf.keras.layers.Dense(4)(tf.keras.layers.GlobalAveragePooling2D()(x))

    return {"keras layers": functional(keras_cnn), "equivariant layers": functional(equivariant_cnn)}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return (rng.normal(size=[6, 12, 12, 3]).astype(np.float32), rng.integers(0, 4, size=[6]).astype(np.int64))


@pytest.mark.parametrize("name", ["keras layers", "equivariant layers"])
def test_registry_norms_equal_per_example_gradient_norms(name, batch):
    model = _models()[name]
    x, y = batch
    registry = eqdp_tf.layer_registry()
    assert all(registry.is_elem(layer) for layer in model.layers if layer.trainable_weights)
    norms = clip_grads.compute_gradient_norms(model, registry, x, y, per_example_loss_fn=_loss)
    # Independent reference: each example's own forward and backward pass (vectorized_map).
    grads, _, _ = vmap_per_example_gradients(model, lambda l, z: _loss(l, z), x[:, None], y)
    expected = np.sqrt(sum(np.sum(np.reshape(g.numpy() ** 2, [len(y), -1]), axis=1) for g in grads))
    np.testing.assert_allclose(norms.numpy(), expected, rtol=2e-5)


@pytest.mark.parametrize("name", ["keras layers", "equivariant layers"])
def test_dp_model_with_our_registry_equals_its_stock_path(name, batch):
    """TF-Privacy's DPModel with the registry (fast clipping) gives the update of its own per-example
    vectorized_map path (no noise, a clip norm that binds)."""
    x, y = batch
    updated = {}
    for fast in (True, False):
        base = _models()[name]
        model = DPModel(l2_norm_clip=0.05, noise_multiplier=0.0, use_xla=False,
                        layer_registry=eqdp_tf.layer_registry() if fast else None,
                        inputs=base.inputs, outputs=base.outputs)
        model.compile(optimizer=tf.keras.optimizers.SGD(1.0),
                      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        assert model._enable_fast_peg_computation == fast  # pylint: disable=protected-access
        before = [w.copy() for w in model.get_weights()]
        model.fit(x, y, batch_size=len(y), epochs=1, verbose=0)
        updated[fast] = [w - b for w, b in zip(model.get_weights(), before)]
    for fast_update, stock_update in zip(updated[True], updated[False]):
        np.testing.assert_allclose(fast_update, stock_update, atol=1e-6, rtol=1e-4)
    assert max(np.max(np.abs(u)) for u in updated[True]) > 1e-4  # the updates are not both zero


def test_microbatches_are_refused(batch):
    model = _models()["keras layers"]
    x, y = batch
    with pytest.raises(NotImplementedError, match="microbatches"):
        clip_grads.compute_gradient_norms(model, eqdp_tf.layer_registry(), x, y, per_example_loss_fn=_loss,
                                          num_microbatches=2)
