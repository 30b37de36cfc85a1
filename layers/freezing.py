"""Freezing: replace every group convolution (and weight-standardised conv) by the plain ``Conv2D`` it computes.

The base filters are expanded (or standardised) once; the frozen model gives the same outputs, skips the expansion
at every call and needs no custom conv layers to load (faster serving, simpler export).
"""

import tensorflow as tf


def _copy_layer(layer):
    # Layers whose kernel is built from their weights (layers.conv, layers.standardized_conv) offer to_conv2d.
    if hasattr(layer, "to_conv2d"):
        return layer.to_conv2d()
    fresh = layer.__class__.from_config(layer.get_config())
    if layer.weights:
        fresh.build(layer.input_shape)
        fresh.set_weights(layer.get_weights())
    return fresh


def freeze(model):
    """A new functional/sequential model computing ``model`` with each group conv as a ``Conv2D``."""
    if not isinstance(model, (tf.keras.Sequential, tf.keras.Model)) or not getattr(model, "_is_graph_network", False):
        raise ValueError(
            "freeze needs a functional or Sequential Keras model (subclassed models have no layer graph to rewrite)"
        )
    return tf.keras.models.clone_model(model, clone_function=_copy_layer)
