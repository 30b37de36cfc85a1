"""Convolutions for TF-Privacy's fast gradient clipping: a `LayerRegistry` with our per-example rules.

TF-Privacy 0.9's `DPModel`/`DPSequential` take a `layer_registry`; when every trainable layer of the model is in
it, they compute per-example gradient norms from one batched pass ("fast clipping") instead of a per-example
`vectorized_map`. Its default registry has Dense and Embedding (and, separately, EinsumDense, LayerNorm and
attention), but no convolution, so every CNN takes the slow path. `make_layer_registry()` adds:

- `tf.keras.layers.Conv2D` (and group convolutions, passed in by `eqdp_tf.layer_registry()`): the registry
  function runs the layer without its activation, watches that pre-activation output Z, and turns dL/dZ into
  each example's squared gradient norm by the route the DP step would choose for it (`clipped_sum.squared_norms`,
  norm_method 'auto'): ghost norms where they pay (Gram matrices; for group convolutions over exact groups, the
  identity of `gather_ghost`), else the per-example filter gradient by the DP step's rule (`per_example`: one
  matmul per kernel tap; for group convolutions back through the kernel expansion to the base filter), squared
  and summed.
- normalisation layers with an affine transform (Keras' `GroupNormalization` and `LayerNormalization`, and
  ours): the layer is re-run per example on its own input and output gradient (cheap: no
  convolution inside).

A registry function returns ``(base_vars, outputs, sqr_norm_fn)``: TF-Privacy differentiates the summed loss
with respect to ``base_vars`` once for all layers and hands each layer's gradient to its ``sqr_norm_fn``, which
returns the per-example squared L2 norms of that layer's weight gradient. Microbatches are not supported.
"""

import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry as tfp_layer_registry

from eqdp_tf.privacy import clipped_sum, per_example

_LINEAR = (None, tf.keras.activations.linear)


def _squared_norms(weight_grads, batch):
    """Per-example squared L2 norm over a layer's [(variable, [B, *shape]) ...] gradients."""
    return tf.add_n([tf.reduce_sum(tf.square(tf.reshape(g, [batch, -1])), axis=1) for _, g in weight_grads])


def _check_call(name, input_args, input_kwargs, num_microbatches):
    if num_microbatches is not None:
        raise NotImplementedError(f"{name}: the eqdp_tf registry functions do not support microbatches")
    if len(input_args) != 1:
        raise ValueError(f"{name}: only single-input calls are supported")


def conv_layer_computation(layer_instance, input_args, input_kwargs, tape, num_microbatches=None):
    """Registry function for Conv2D, LiftingConv2D and GroupConv2D (any layer the conv rule covers)."""
    _check_call(type(layer_instance).__name__, input_args, input_kwargs, num_microbatches)
    x = input_args[0]
    if not per_example.conv_rule_applies(layer_instance, ignore_activation=True):
        return generic_layer_computation(layer_instance, input_args, input_kwargs, tape, num_microbatches)
    activation = getattr(layer_instance, "activation", None)
    # The rule needs the gradient at the pre-activation output: the layer runs without its activation, and the
    # activation is applied after the tape watches that output (so that the gradient flows through it).
    linear = activation in _LINEAR
    if not linear:
        layer_instance.activation = None
    try:
        base_vars = layer_instance(x, **input_kwargs)
    finally:
        layer_instance.activation = activation
    tape.watch(base_vars)
    outputs = base_vars if linear else activation(base_vars)

    def sqr_norm_fn(base_vars_grads):
        batch = tf.shape(x)[0]
        squared = clipped_sum.squared_norms(layer_instance, tf.cast(x, base_vars_grads.dtype), base_vars_grads, batch,
                                            1, ignore_activation=True)
        if squared is not None:
            return squared
        return _squared_norms(per_example.conv_weight_gradients(layer_instance, x, base_vars_grads, batch), batch)

    return base_vars, outputs, sqr_norm_fn


def generic_layer_computation(layer_instance, input_args, input_kwargs, tape, num_microbatches=None):
    """Registry function for any layer whose examples are independent: the layer re-run per example."""
    _check_call(type(layer_instance).__name__, input_args, input_kwargs, num_microbatches)
    x = input_args[0]
    outputs = layer_instance(x, **input_kwargs)
    tape.watch(outputs)

    def sqr_norm_fn(outputs_grads):
        batch = tf.shape(x)[0]
        grads = per_example.rerun_weight_gradients(layer_instance, x, outputs_grads, batch, 1)
        return _squared_norms(grads, batch)

    return outputs, outputs, sqr_norm_fn


KERAS_CONV_LAYERS = (tf.keras.layers.Conv2D,)
KERAS_NORMALIZATION_LAYERS = (tf.keras.layers.GroupNormalization, tf.keras.layers.LayerNormalization)


def make_layer_registry(conv_layers=(), normalization_layers=()):
    """TF-Privacy's default registry (Dense, Embedding) plus Keras' Conv2D and normalisation layers, and the
    given extra classes: ``conv_layers`` (Conv2D-like, or offering ``expanded_kernel()``/``expanded_bias()``),
    ``normalization_layers`` (any layer that treats examples independently). ``eqdp_tf.layer_registry()`` passes
    the equivariant layers."""
    registry = tfp_layer_registry.make_default_layer_registry()
    for layer_class in (*KERAS_CONV_LAYERS, *conv_layers):
        registry.insert(layer_class, conv_layer_computation)
    for layer_class in (*KERAS_NORMALIZATION_LAYERS, *normalization_layers):
        registry.insert(layer_class, generic_layer_computation)
    return registry
