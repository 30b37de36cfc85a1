"""The masked sum of clipped per-example gradients without holding every per-example gradient at once.

DP-SGD only needs two things from the per-example gradients g_i: their norms ||g_i||, for the clip factors
c_i = C / max(||g_i||, C), and the weighted sum sum_i m_i c_i g_i (m_i the padding mask). This module gets
both from the one batched forward and backward pass of `per_example.layer_output_gradients` (input X and
output gradient dZ of every layer with weights), layer by layer, choosing per layer the cheaper of:

- **materialise** (as `per_example.py` does): form the layer's per-example gradients, take their squared
  norms, keep them until the clip factors are known, then sum them weighted. Cheap where a layer has few
  weights or many output positions; the only route for layers whose kernel is built from their weights by
  anything but a gather (interpolated group convolutions, weight standardisation).
- **ghost** (Goodfellow 2015; Li et al. 2022; Bu et al. 2023, "book-keeping"): for a layer computing
  Z = A W from patch rows A (convolution, Dense), g_i = A_i^T dZ_i, so

      ||g_i||^2 = sum over rows r, r' of example i of (a_r . a_r') (dz_r . dz_r'),

  two Gram matrices of size T x T (T = the example's rows: K views x output positions) instead of a
  (k*k*C_in) x C_out matrix per example. The patch Gram is the input's own Gram summed over the k*k kernel
  offsets, so patches are never formed. The weighted sum is then ONE ordinary batched weight gradient,
  A^T (c * dZ), exactly what non-private training computes. Cheap where T is small against the weights
  (late, low-resolution layers; Dense), and nothing of size B x weights is ever held for those layers.
- **gather ghost** (`gather_ghost.py`): the same for convolutions whose kernel is gathered from shared base
  filters (group convolutions over exact groups). The plain ghost norm would be that of the expanded kernel's
  gradient, which counts each shared weight once per copy; the base filters' norm is a sum of n inner products
  of T x T Grams (the patches against their copies permuted as the gather relates two copies, and the output
  gradients of the copies so related). The weighted sum is again one batched weight gradient, moved back
  through the gather once.

All give the same norms and the same sum to float rounding (tests/test_clipped_sum.py,
tests/test_gather_ghost.py). The choice is made per layer from static shapes by `ghost_pays`: the Gram
matrices' multiply-adds against what materialising costs beyond the same weight-gradient multiply-adds (moving
B x (entries of the per-example gradient it forms)).
"""

import tensorflow as tf

from eqdp_tf.privacy import gather_ghost, per_example, standardized_ghost

NORM_METHODS = ("auto", "materialise", "ghost")


def _identity_expansion(layer):
    """True when the layer's (expanded) kernel is its own kernel reshaped: ordinary convs, C1 group convs whose
    trainable weights are their taps (not steerable coefficients, not standardised)."""
    if not hasattr(layer, "expanded_kernel"):
        return True
    group = getattr(layer, "group", None)
    return group is not None and group.order == 1 and getattr(layer, "base_is_trainable_kernel", True)


def _static_dims(x, dz):
    dims = list(x.shape[1:]) + list(dz.shape[1:])
    return None if any(d is None for d in dims) else dims


def ghost_allowed(layer, x, dz, num_views, ignore_activation=False):
    """True when the ghost norm is exact for ``layer``: an ordinary convolution (or one whose kernel expansion is
    the identity) or a Dense layer on [rows, features], with static shapes and ``num_views`` a Python int.

    ``ignore_activation``: ``dz`` is the gradient at the pre-activation output (TF-Privacy's fast clipping)."""
    if not isinstance(num_views, int):
        return False
    if per_example.conv_rule_applies(layer, ignore_activation) and _identity_expansion(layer):
        return _static_dims(x, dz) is not None
    return per_example.is_dense(layer) and x.shape.rank == 2 and None not in (x.shape[-1], dz.shape[-1])


# Both routes do the weight gradient's multiply-adds once: the materialise route as B small products, the ghost
# route as one batched product. What differs is what each adds: the ghost route its Gram matrices; the materialise
# route B x p per-example gradient entries, written and then read twice (norms, weighted sum), at memory speed and
# from products too small to run near peak. This is the price of one entry in multiply-adds: ghost where the Gram
# matrices cost fewer multiply-adds than GHOST_MACS_PER_WEIGHT per weight. Measured per layer with
# `bench/layer_routes.py` (B = 128, quiet 2-core EPYC; docs/benchmarks/layer_routes_2026-12-01.md): ghost /
# materialise time was 0.27-0.65 at gram/p 2-21, 0.81 at 40, 1.41-1.53 at 152, 2.1 at 288 and 3.5-200 above: the
# two cross between 40 and 152.
#
# The gather ghost route (group convolutions) is priced the same way, per entry of the per-example gradient the
# materialise route forms: there the expanded kernel's, n times the base filters' (`gather_ghost.
# materialised_entries`: the expanded kernel's, n times the base filters', and then the base filters'), written,
# read back through the expansion's transpose, then written and read again. Chosen from the same table:
# materialising stage4 / res2a / res2b of the paper model (D2, n = 4, 8x8 and 4x4) cost 4.5-4.8 ns per base
# weight and example over the batched gradient, 0.9-1.0 ns per entry formed (5 per base weight), as a plain 8x8
# conv's ~1.0 ns per weight (WRN-16-4's last stage). The route itself is not yet measured: bench/layer_routes.py
# times it beside the others, for the lead to calibrate.
GHOST_MACS_PER_WEIGHT = 64


def ghost_gram_macs(layer, x, dz, num_views):
    """Multiply-adds per example of ``layer``'s two Gram matrices (`ghost_allowed` layers).

    Conv: (rows of the padded input)^2 * C_in for the input Gram + k*k * T^2 to sum its shifted blocks + T^2 * C_out
    for the output Gram (T = K views x output positions); Dense: K^2 * (C_in + C_out).
    """
    if per_example.is_dense(layer):
        return num_views * num_views * (x.shape[-1] + dz.shape[-1])
    height, width, c_in, out_h, out_w, c_out = _static_dims(x, dz)
    k, s, padding = per_example.conv_geometry(layer)
    top, bottom, _ = per_example.padding_amounts(height, k, s, padding)
    left, right, _ = per_example.padding_amounts(width, k, s, padding)
    input_rows = num_views * (height + top + bottom) * (width + left + right)
    rows = num_views * out_h * out_w
    return input_rows**2 * c_in + k * k * rows**2 + rows**2 * c_out


def gather_ghost_allowed(layer, x, dz, num_views):
    """True when the gather ghost route gives ``layer``'s exact norms and the plain one does not (a group conv over
    an exact group with more than one element; `gather_ghost.allowed`)."""
    return not ghost_allowed(layer, x, dz, num_views) and gather_ghost.allowed(layer, x, dz, num_views)


def route_cost(layer, x, dz, num_views, ignore_activation=False):
    """(route name, Gram multiply-adds per example, per-example gradient entries the materialise route forms)
    of the ghost route exact for ``layer`` ('ghost', 'gather_ghost' or 'standardized_ghost'), or None when none is."""
    if ghost_allowed(layer, x, dz, num_views, ignore_activation):
        weights = sum(int(v.shape.num_elements()) for v in layer.trainable_variables)
        return "ghost", ghost_gram_macs(layer, x, dz, num_views), weights
    if gather_ghost_allowed(layer, x, dz, num_views):
        return ("gather_ghost", gather_ghost.gram_macs(layer, x, dz, num_views),
                gather_ghost.materialised_entries(layer))
    if standardized_ghost.allowed(layer, x, dz, num_views):
        return ("standardized_ghost",
                ghost_gram_macs(layer, x, dz, num_views) + standardized_ghost.extra_macs(layer, x, dz, num_views),
                standardized_ghost.materialised_entries(layer))
    return None


def ghost_pays(layer, x, dz, num_views, ignore_activation=False):
    """True when one of ``layer``'s ghost routes should be faster than materialising its per-example gradients:
    its Gram matrices cost fewer than GHOST_MACS_PER_WEIGHT multiply-adds per entry of the per-example gradient
    materialising forms (the layer's weights; for a gathered kernel, its expanded kernel's entries too)."""
    cost = route_cost(layer, x, dz, num_views, ignore_activation)
    return cost is not None and cost[1] < GHOST_MACS_PER_WEIGHT * cost[2]


def _conv_patch_gram(x, k, s, padding, batch, num_views):
    """[B, T, T] Gram matrices of each example's patch rows (T = views x output positions), without patches.

    (a_r . a_r') = sum over kernel offsets (i, j) of x[r + (i, j)] . x[r' + (i, j)]: the padded input's own
    Gram, [B, V, Hp, Wp, V, Hp, Wp], summed over k*k strided windows.
    """
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    top, bottom, out_h = per_example.padding_amounts(height, k, s, padding)
    left, right, out_w = per_example.padding_amounts(width, k, s, padding)
    if top or bottom or left or right:
        x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
    padded_h, padded_w = height + top + bottom, width + left + right
    rows = tf.reshape(x, [batch, -1, channels])  # [B, V*Hp*Wp, C]
    gram = tf.linalg.matmul(rows, rows, transpose_b=True)
    gram = tf.reshape(gram, [batch, num_views, padded_h, padded_w, num_views, padded_h, padded_w])
    total = None
    for i in range(k):
        for j in range(k):
            window = gram[:, :, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s,
                          :, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s]
            total = window if total is None else total + window
    return tf.reshape(total, [batch, num_views * out_h * out_w, num_views * out_h * out_w])


def _ghost_squared_norm(layer, x, dz, batch, num_views, with_bias=True):
    """[B] squared norm of each example's gradient of the layer's kernel (and bias), by Gram matrices."""
    dz_rows = tf.reshape(dz, [batch, -1, tf.shape(dz)[-1]])
    if per_example.is_dense(layer):
        x_rows = tf.reshape(x, [batch, -1, tf.shape(x)[-1]])
        input_gram = tf.linalg.matmul(x_rows, x_rows, transpose_b=True)
    else:
        k, s, padding = per_example.conv_geometry(layer)
        input_gram = _conv_patch_gram(x, k, s, padding, batch, num_views)
    output_gram = tf.linalg.matmul(dz_rows, dz_rows, transpose_b=True)
    squared = tf.reduce_sum(input_gram * output_gram, axis=[1, 2])
    if with_bias and getattr(layer, "bias", None) is not None:
        squared += tf.reduce_sum(tf.square(tf.reduce_sum(dz_rows, axis=1)), axis=1)
    return squared


def _ghost_weighted_sum(layer, x, dz, row_weights):
    """[(variable, sum over rows of weight * its gradient)]: one batched weight gradient of the layer."""
    weighted = dz * tf.reshape(row_weights, [-1] + [1] * (dz.shape.rank - 1))
    if per_example.is_dense(layer):
        kernel = tf.linalg.matmul(tf.reshape(x, [-1, x.shape[-1]]), tf.reshape(weighted, [-1, dz.shape[-1]]),
                                  transpose_a=True)
    else:
        k, s, padding = per_example.conv_geometry(layer)
        kernel = tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=[k, k, x.shape[-1], dz.shape[-1]], out_backprop=weighted,
            strides=[1, s, s, 1], padding=padding)
    bias_grad = tf.reduce_sum(tf.reshape(weighted, [-1, dz.shape[-1]]), axis=0)
    bias = getattr(layer, "bias", None)
    return [(layer.kernel, tf.reshape(kernel, tf.shape(layer.kernel)))] + (
        [] if bias is None else [(bias, tf.reshape(bias_grad, tf.shape(bias)))])


def materialise_route(layer, x, dz, batch, num_views):
    """([B] squared norms, weights -> [(variable, sum_i weights_i g_i)]) of ``layer`` by forming its per-example
    gradients g_i (`per_example.layer_rule`), which are kept until the weights are known."""
    grads = per_example.layer_rule(layer)(layer, x, dz, batch, num_views)
    squared = tf.add_n([tf.reduce_sum(tf.square(tf.cast(tf.reshape(g, [batch, -1]), tf.float32)), axis=1)
                        for _, g in grads])

    def weighted_sum(weights):
        return [(variable, tf.tensordot(tf.cast(weights, g.dtype), g, axes=1)) for variable, g in grads]

    return squared, weighted_sum


def ghost_route(layer, x, dz, batch, num_views):
    """([B] squared norms, weights -> [(variable, sum_i weights_i g_i)]) of ``layer`` by Gram matrices and one
    batched weight gradient; ``num_views`` must be the static view count (`ghost_allowed`)."""
    squared = _ghost_squared_norm(layer, x, dz, batch, num_views)

    def weighted_sum(weights):
        return _ghost_weighted_sum(layer, x, dz, tf.cast(tf.repeat(weights, num_views), dz.dtype))

    return squared, weighted_sum


def gather_ghost_route(layer, x, dz, batch, num_views):
    """([B] squared norms, weights -> [(variable, sum_i weights_i g_i)]) of a layer with a gathered kernel
    (`gather_ghost_allowed`) by the identity of `gather_ghost` and one batched weight gradient."""
    squared = gather_ghost.squared_norms(layer, x, dz, batch, num_views)

    def weighted_sum(weights):
        return gather_ghost.weighted_sum(layer, x, dz, tf.cast(tf.repeat(weights, num_views), dz.dtype))

    return squared, weighted_sum


def _standardized_squared_norm(layer, x, dz, batch, num_views):
    """[B] by `standardized_ghost`: the Gram matrices of dz scaled per filter, and its corrections."""
    scaled = dz * tf.cast(standardized_ghost.kernel_scale(layer), dz.dtype)
    return (tf.cast(_ghost_squared_norm(layer, x, scaled, batch, num_views, with_bias=False), tf.float32) +
            standardized_ghost.corrections(layer, x, dz, batch))


def standardized_ghost_route(layer, x, dz, batch, num_views):
    """([B] squared norms, weights -> [(variable, sum_i weights_i g_i)]) of a weight-standardised convolution
    (`standardized_ghost`): Gram matrices, and one batched kernel gradient taken through the standardisation."""
    squared = _standardized_squared_norm(layer, x, dz, batch, num_views)

    def weighted_sum(weights):
        (_, kernel_sum), *bias = _ghost_weighted_sum(layer, x, dz, tf.cast(tf.repeat(weights, num_views), dz.dtype))
        return standardized_ghost.raw_weight_sum(layer, kernel_sum) + bias

    return squared, weighted_sum


def squared_norms(layer, x, dz, batch, num_views, norm_method="auto", ignore_activation=False):
    """[B] per-example squared norms of ``layer``'s weight gradient by the route `norm_method` picks (the norms
    only: TF-Privacy's fast clipping forms the clipped sum itself)."""
    route = _route(norm_method, layer, x, dz, num_views, ignore_activation)
    if route is ghost_route:
        return _ghost_squared_norm(layer, x, dz, batch, num_views)
    if route is gather_ghost_route:
        return gather_ghost.squared_norms(layer, x, dz, batch, num_views)
    if route is standardized_ghost_route:
        return _standardized_squared_norm(layer, x, dz, batch, num_views)
    return None


def clipped_gradient_sum(model, loss_fn, views, labels, reduce_views, l2_norm_clip, mask, norm_method="auto"):
    """Masked sum of the clipped per-example gradients of ``model`` (see module doc).

    Args:
      model: functional or Sequential Keras model (`per_example.supports`); examples independent.
      loss_fn: `loss_fn(labels, logits)` -> [n] losses.
      views: [B, K, H, W, C]; labels [B, ...]; mask [B] (0 for padding rows).
      reduce_views: [B, K] per-view losses -> [B] per-example losses.
      l2_norm_clip: C.
      norm_method: 'auto' (per layer, `ghost_pays`), 'materialise' or 'ghost' (a ghost route, plain or
        gather, wherever the layer allows one; for tests and measurements).

    Returns:
      (sums aligned with model.trainable_variables, norms [B] before clipping, losses [B], logits [B, K, ...]).
    """
    shape = tf.shape(views)
    batch, num_views = shape[0], shape[1]
    static_views = views.shape[1]
    flat_views = tf.reshape(views, tf.concat([[batch * num_views], shape[2:]], 0))
    flat_labels = tf.repeat(labels, num_views, axis=0)

    def loss_of(flat_logits):
        losses = reduce_views(tf.reshape(loss_fn(flat_labels, flat_logits), [batch, num_views]))
        return tf.reduce_sum(losses), losses

    recorded, flat_logits, losses = per_example.layer_output_gradients(model, flat_views, loss_of)

    squared = []
    weighted_sums = []  # per layer: clip factors [B] -> [(variable, masked clipped sum)]
    previous_layer = []
    routed = [(layer, tf.cast(x, dz.dtype), dz) for layer, x, dz in recorded if dz is not None]
    routed = [(layer, x, dz, _route(norm_method, layer, x, dz, static_views)) for layer, x, dz in routed]
    for layer, x, dz, route in _processing_order(routed):
        with tf.control_dependencies(previous_layer):
            views = num_views if route is materialise_route else static_views
            layer_squared, weighted_sum = route(layer, x, dz, batch, views)
        squared.append(tf.cast(layer_squared, tf.float32))
        weighted_sums.append(weighted_sum)
        previous_layer = [squared[-1]]

    norms = tf.sqrt(tf.add_n(squared)) if squared else tf.zeros([batch])
    clip = tf.cast(l2_norm_clip, tf.float32)
    weights = tf.cast(mask, tf.float32) * clip / tf.maximum(norms, clip)  # c_i m_i

    sums = {}
    for weighted_sum in weighted_sums:
        for variable, value in weighted_sum(weights):
            key = variable.ref()
            sums[key] = value if key not in sums else sums[key] + value
    grads = []
    for variable in model.trainable_variables:
        value = sums.get(variable.ref())
        grads.append(tf.zeros_like(variable) if value is None else tf.cast(value, variable.dtype))
    logits = tf.reshape(flat_logits, tf.concat([[batch, num_views], tf.shape(flat_logits)[1:]], 0))
    return grads, norms, losses, logits


def _processing_order(routed):
    """[(layer, x, dz, route)] in forward order -> the order of the one-layer-at-a-time chain.

    One layer at a time: a group conv's per-example gradient of its *expanded* kernel is |G| times the size of the
    base-filter gradient kept afterwards; left to the scheduler, several layers' were alive at once. Ghost-route
    layers come first, in backward order (the order in which the backward pass produces their dL/dZ), so that
    their Gram matrices are formed while the backward pass is still going down to the first layers: they are small
    (B x T^2). The materialised layers follow in forward order, after the backward pass: in backward order they too
    overlapped it, but then their per-example gradients were alive at the backward pass's own peak. Peak RSS of
    the paper model's DP accumulate (D4->D2, K = 1, measured on a shared CPU, where memory is unaffected): all
    layers in forward order 1.93 / 3.14 GB at B = 128 / 256, all in backward order 2.03-2.12 / 3.60 GB, this order
    1.94 / 3.17 GB.
    """
    ghosts = [entry for entry in routed if entry[3] is not materialise_route]
    return list(reversed(ghosts)) + [entry for entry in routed if entry[3] is materialise_route]


def _route(norm_method, layer, x, dz, num_views, ignore_activation=False):
    """The route function for ``layer`` under ``norm_method`` (see `clipped_gradient_sum`)."""
    if norm_method == "materialise":
        return materialise_route
    cost = route_cost(layer, x, dz, num_views, ignore_activation)
    if cost is None or (norm_method == "auto" and cost[1] >= GHOST_MACS_PER_WEIGHT * cost[2]):
        return materialise_route
    return {"ghost": ghost_route, "gather_ghost": gather_ghost_route,
            "standardized_ghost": standardized_ghost_route}[cost[0]]
