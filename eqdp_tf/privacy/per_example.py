"""Per-example gradients from ONE batched forward and backward pass, layer by layer.

`tf.vectorized_map` over examples (dp_step.vmap_per_example_gradients) is simple but slow for
convolutions: TensorFlow has no vectorised Conv2DBackpropFilter, so pfor turns every conv's
filter gradient into a while-loop over examples. Here instead:

1. The model runs once on all B*K views, walked layer by layer with TF-Privacy's
   `model_forward_pass`, recording for each layer with trainable weights its input X and
   output Z.
2. One backward pass gives dL/dZ for all recorded outputs at once (activation gradients only;
   no weight gradients are formed). Since examples are independent (no batch statistics), row r
   of dL/dZ belongs to example r // K only.
3. Each layer turns (X, dL/dZ) into per-example weight gradients with a rule:
   - convolution-like layers (Keras Conv2D, or any layer offering `expanded_kernel()` /
     `expanded_bias()` such as group convolutions and weight-standardised convs): per-example filter
     gradient = patches(X)^T dL/dZ, one batched matmul; for layers whose kernel is built from their
     weights (expanded from smaller base filters, or standardised), the gradient goes back through
     that construction per example.
   - Dense: X^T dL/dZ per example.
   - anything else (e.g. affine normalisation): the layer alone is re-run per example under
     `tf.vectorized_map` (cheap: no convolution inside).

The K views of an example are summed in step 3 (their losses were combined before
differentiating, so 'sum' and 'mean' both come out right). Nothing here knows about groups:
group convolutions are just layers with an expanded kernel.
"""

import functools

import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping import gradient_clipping_utils

_LINEAR = (None, tf.keras.activations.linear)


def conv_rule_applies(layer, ignore_activation=False):
    """True when the convolution rule gives ``layer``'s per-example weight gradients from dL/d(output).

    ``ignore_activation``: the caller differentiates at the pre-activation output (fast clipping does)."""
    if hasattr(layer, "expanded_kernel") and hasattr(layer, "kernel_size"):
        return True
    return (
        isinstance(layer, tf.keras.layers.Conv2D)
        and type(layer).call is tf.keras.layers.Conv2D.call
        and (ignore_activation or layer.activation in _LINEAR)
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.kernel_size[0] == layer.kernel_size[1]  # the rule's geometry is square
        and layer.strides[0] == layer.strides[1]
        and layer.groups == 1
        and layer.data_format == "channels_last"
    )


def _is_conv_like(layer):
    return conv_rule_applies(layer)


def is_dense(layer):
    return type(layer) is tf.keras.layers.Dense and layer.activation in _LINEAR


def supports(model):
    """True when `model` is a functional/Sequential Keras model this engine can walk."""
    return getattr(model, "_is_graph_network", False)


def conv_geometry(layer):
    k = layer.kernel_size
    k = k[0] if isinstance(k, (tuple, list)) else k
    s = layer.strides
    s = s[0] if isinstance(s, (tuple, list)) else s
    return int(k), int(s), layer.padding.upper()


def _kernel_vjp(build_fn, variables, cotangents):
    """Per-example gradients of ``variables`` from per-example gradients of ``build_fn()`` (the kernel a layer
    builds from them): [B, *out] -> [[B, *variable.shape] per variable].

    The vector-Jacobian product at the current weights, which every example shares: for a group conv's
    expansion (linear) its transpose, for weight standardisation (not linear) its Jacobian at this step."""

    def one(cotangent):
        with tf.GradientTape() as tape:
            tape.watch(variables)
            out = build_fn()
        grads = tape.gradient(out, variables, output_gradients=cotangent)
        return [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]

    return tf.vectorized_map(one, cotangents)


def padding_amounts(size, k, s, padding):
    """(before, after, output size) of TensorFlow's padding rule along one spatial axis."""
    if padding == "VALID":
        return 0, 0, (size - k) // s + 1
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2, out


def _kernel_grad_by_patches(x, dz_rows, k, s, padding, batch):
    patches = tf.image.extract_patches(x, sizes=[1, k, k, 1], strides=[1, s, s, 1], rates=[1, 1, 1, 1], padding=padding)
    patches = tf.reshape(patches, [batch, -1, tf.shape(patches)[-1]])
    grad = tf.linalg.matmul(patches, dz_rows, transpose_a=True)  # [B, k*k*C_in, C_out]
    return tf.reshape(grad, [batch, k, k, x.shape[-1], -1])


def _kernel_grad_by_taps(x, dz_rows, k, s, padding, batch):
    """One [B, K*H'*W', C_in]^T @ [B, K*H'*W', C_out] matmul per kernel tap on a shifted view of x.

    Same result as the patches matmul, without materialising the k*k-times larger patches tensor
    (ExtractImagePatches measured 1.5-2x slower than this on a CPU for the model's 3x3 convs).
    """
    height, width, in_channels = x.shape[1], x.shape[2], x.shape[-1]
    top, bottom, out_h = padding_amounts(height, k, s, padding)
    left, right, out_w = padding_amounts(width, k, s, padding)
    if top or bottom or left or right:
        x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
    taps = []
    for i in range(k):
        for j in range(k):
            shifted = x[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s, :]
            taps.append(tf.linalg.matmul(tf.reshape(shifted, [batch, -1, in_channels]), dz_rows, transpose_a=True))
    grad = tf.stack(taps, axis=1)  # [B, k*k, C_in, C_out]
    return tf.reshape(grad, [batch, k, k, in_channels, -1])


def _kernel_grad_grouped(x, dz, k, s, padding, batch):
    """All examples' filter gradients as ONE grouped Conv2DBackpropFilter (Rochette et al. 2019).

    The examples go into the channel axis, [K, H, W, B*C_in] against [K, H', W', B*C_out], with the filter
    [k, k, C_in, B*C_out]: group b only sees example b's channels, and the op's sum over its batch axis adds
    the example's K views. On high-resolution layers (many rows, few channels) oneDNN runs this faster than
    the k*k batched matmuls of the taps rule (`_grouped_pays`).
    """
    in_channels, out_channels = x.shape[-1], dz.shape[-1]
    views = tf.shape(x)[0] // batch

    def examples_into_channels(t):
        t = tf.reshape(t, tf.concat([[batch, views], tf.shape(t)[1:]], 0))
        t = tf.transpose(t, [1, 2, 3, 0, 4])  # [K, H, W, B, C]
        return tf.reshape(t, tf.concat([tf.shape(t)[:3], [-1]], 0))

    grad = tf.raw_ops.Conv2DBackpropFilter(
        input=examples_into_channels(x), filter_sizes=tf.stack([k, k, in_channels, batch * out_channels]),
        out_backprop=examples_into_channels(dz), strides=[1, s, s, 1], padding=padding)
    grad = tf.reshape(grad, [k, k, in_channels, batch, out_channels])
    return tf.transpose(grad, [3, 0, 1, 2, 4])


# Output positions per view from which the grouped filter gradient is used. Measured alone on a 2-core EPYC
# (B = 96, fp32, time of grouped / taps): at 32x32 0.68-0.95 (3->48, 48->104, 3->19, 19->39, 16->64, 64->64 channels);
# at 16x16 0.67 (39->39), 1.03 (104->104), 1.20 (128->128); at 8x8 and below 2.8-3.8 (measured with the CPU shared).
_GROUPED_MIN_POSITIONS = 32 * 32


@functools.lru_cache(maxsize=None)
def _grouped_filter_gradients_supported():
    """Grouped Conv2DBackpropFilter runs on CPU with oneDNN only (TensorFlow's own CPU kernel rejects it); GPUs
    keep the taps rule."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # pylint: disable=import-outside-toplevel

        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        onednn = False
    return onednn and not tf.config.list_logical_devices("GPU")


def _tracing_for_xla():
    """True while tracing a function that XLA will compile (`tf.function(jit_compile=True)`).

    XLA compiles a grouped filter gradient on a CPU into a naive loop: 3.7 s against 0.04 s for the taps rule at
    B = 32 on a 32x32x48 conv (2-core EPYC), so under XLA the taps rule is kept.
    """
    try:
        from tensorflow.python.ops import control_flow_util  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _grouped_pays(x, dz):
    static = all(d is not None for d in list(x.shape[1:]) + list(dz.shape[1:]))
    return (static and dz.shape[1] * dz.shape[2] >= _GROUPED_MIN_POSITIONS and _grouped_filter_gradients_supported()
            and not _tracing_for_xla())


def conv_weight_gradients(layer, x, dz, batch):
    """[(variable, [B, *variable.shape])] of a convolution-like layer (``conv_rule_applies``) from its input
    ``x`` and dL/d(pre-activation output) ``dz``, whose rows are grouped by example (B examples)."""
    return _conv_rule(layer, x, dz, batch, None)


def rerun_weight_gradients(layer, x, dz, batch, num_views):
    """[(variable, [B, *variable.shape])] of any layer whose examples are independent, by re-running it per
    example (its K views together) on ``x`` against the output gradient ``dz``."""
    return _generic_rule(layer, x, dz, batch, num_views)


def _conv_rule(layer, x, dz, batch, num_views):
    k, s, padding = conv_geometry(layer)
    x = tf.cast(x, dz.dtype)
    out_channels = tf.shape(dz)[-1]
    # Per-example gradient of the (expanded) kernel: patches(x)^T @ dz per example, its K views' rows together.
    dz_rows = tf.reshape(dz, [batch, -1, out_channels])
    static = x.shape[1] is not None and x.shape[2] is not None and x.shape[-1] is not None
    if _grouped_pays(x, dz):
        kernel_grad = _kernel_grad_grouped(x, dz, k, s, padding, batch)
    else:
        by_taps = _kernel_grad_by_taps if static else _kernel_grad_by_patches
        kernel_grad = by_taps(x, dz_rows, k, s, padding, batch)
    bias_grad = tf.reduce_sum(dz_rows, axis=1)  # [B, C_out]
    grads = []
    if hasattr(layer, "expanded_kernel"):
        bias = getattr(layer, "bias", None)
        written_out = (layer.weight_gradients_from_kernel(kernel_grad)
                       if hasattr(layer, "weight_gradients_from_kernel") else None)
        if written_out is not None:
            # The layer writes out its kernel construction's Jacobian (weight standardisation, steerable bases):
            # cheaper than the generic per-example differentiation below.
            grads.extend(written_out)
        else:
            # Everything but the bias may enter the kernel (a group conv's base filters).
            sources = [v for v in layer.trainable_weights if bias is None or v is not bias]
            grads.extend(zip(sources, _kernel_vjp(layer.expanded_kernel, sources, kernel_grad)))
        if bias is not None:
            grads.append((bias, _kernel_vjp(layer.expanded_bias, [bias], bias_grad)[0]))
    else:
        grads.append((layer.kernel, kernel_grad))
        if layer.use_bias:
            grads.append((layer.bias, bias_grad))
    return grads


def _dense_rule(layer, x, dz, batch, num_views):
    x = tf.cast(x, dz.dtype)
    x_rows = tf.reshape(x, [batch, -1, tf.shape(x)[-1]])
    dz_rows = tf.reshape(dz, [batch, -1, tf.shape(dz)[-1]])
    grads = [(layer.kernel, tf.linalg.matmul(x_rows, dz_rows, transpose_a=True))]
    if layer.use_bias:
        grads.append((layer.bias, tf.reduce_sum(dz_rows, axis=1)))
    return grads


def _generic_rule(layer, x, dz, batch, num_views):
    """Re-runs just this layer per example: d<layer(x_i), dz_i>/dw, summed over the example's views."""
    weights = layer.trainable_weights
    x_ex = tf.reshape(x, tf.concat([[batch, num_views], tf.shape(x)[1:]], 0))
    dz_ex = tf.reshape(dz, tf.concat([[batch, num_views], tf.shape(dz)[1:]], 0))

    def one(args):
        xi, dzi = args
        with tf.GradientTape() as tape:
            out = layer(xi, training=True)
            inner = tf.reduce_sum(tf.cast(out, dzi.dtype) * dzi)
        grads = tape.gradient(inner, weights)
        return [tf.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]

    return list(zip(weights, tf.vectorized_map(one, (x_ex, dz_ex))))


def layer_rule(layer):
    """The rule ``(layer, x, dz, batch, num_views) -> [(variable, [B, *variable.shape])]`` for ``layer``."""
    if _is_conv_like(layer):
        return _conv_rule
    if is_dense(layer):
        return _dense_rule
    return _generic_rule


def layer_output_gradients(model, inputs, loss_of):
    """Steps 1-2 of the module doc: one forward pass of ``model`` on ``inputs`` and one backward pass to the
    outputs of the layers with trainable weights.

    ``loss_of(logits)`` returns (the scalar to differentiate, anything else to hand back). Returns
    ([(layer, its input X, dL/dZ of its output, None if the layer does not reach the loss)], logits, the
    second value of ``loss_of``).
    """
    recorded = []
    tape = tf.GradientTape()

    def record(layer, args, kwargs):
        out = layer(*args, **kwargs)
        if layer.trainable_weights and not isinstance(out, (list, tuple)):
            # d(loss)/d(probe) = d(loss)/d(out). Asking for gradients at leaf probes rather than at the
            # intermediate outputs themselves measured ~25% faster: the backward pass is built once.
            probe = tf.zeros_like(out)
            tape.watch(probe)
            recorded.append((layer, args[0], probe))
            out = out + probe
        return out, None

    with tape:
        logits, _ = gradient_clipping_utils.model_forward_pass(model, inputs, record)
        total, extra = loss_of(logits)
    output_grads = tape.gradient(total, [probe for _, _, probe in recorded])
    return [(layer, x, dz) for (layer, x, _), dz in zip(recorded, output_grads)], logits, extra


def per_example_gradients(model, loss_fn, views, labels, reduce_views):
    """Same contract as dp_step.per_example_gradients, computed layer by layer (see module doc).

    Args:
      model: functional or Sequential Keras model; examples must be independent.
      loss_fn: `loss_fn(labels, logits)` -> [n] losses.
      views: [B, K, H, W, C].
      labels: [B, ...].
      reduce_views: function [B, K] per-view losses -> [B] per-example losses.

    Returns:
      (grads aligned with model.trainable_variables, each [B, *var.shape]; losses [B]; logits [B, K, ...]).
    """
    shape = tf.shape(views)
    batch, num_views = shape[0], shape[1]
    flat_views = tf.reshape(views, tf.concat([[batch * num_views], shape[2:]], 0))
    flat_labels = tf.repeat(labels, num_views, axis=0)

    def loss_of(flat_logits):
        view_losses = loss_fn(flat_labels, flat_logits)
        losses = reduce_views(tf.reshape(view_losses, [batch, num_views]))
        return tf.reduce_sum(losses), losses

    recorded, flat_logits, losses = layer_output_gradients(model, flat_views, loss_of)

    per_variable = {}
    for layer, x, dz in recorded:
        if dz is None:  # layer does not influence the loss
            continue
        for variable, grad in layer_rule(layer)(layer, x, dz, batch, num_views):
            key = variable.ref()
            per_variable[key] = grad if key not in per_variable else per_variable[key] + grad
    grads = []
    for variable in model.trainable_variables:
        grad = per_variable.get(variable.ref())
        if grad is None:
            grad = tf.zeros(tf.concat([[batch], tf.shape(variable)], 0), variable.dtype)
        grads.append(tf.cast(grad, variable.dtype))
    logits = tf.reshape(flat_logits, tf.concat([[batch, num_views], tf.shape(flat_logits)[1:]], 0))
    return grads, losses, logits
