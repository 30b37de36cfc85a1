"""Ghost norms for convolutions whose kernel is gathered from shared base filters (group convolutions over exact
groups), so that their per-example gradients need not be materialised.

Such a layer runs an ordinary convolution with an *expanded* kernel: for each base filter w_f (D entries) and each
of n copies g, column (f, g) of the expanded kernel is w_f with its rows permuted, E_{f,g} = Pi_g w_f, i.e.
E_{f,g}[d] = w_f[phi_g(d)] for a permutation phi_g of the D = k*k*C_in rows (`kernel_gather_index()` on the layer
gives phi; for a group conv it turns the taps and the input orientations by g, and the bias is shared by the n
copies). The plain ghost norm (`clipped_sum`) gives the norm of the gradient of E, which counts every base weight
n times; DP-SGD needs the norm of the gradient of w.

**The identity.** Let P (T x D) be one example's patch rows (T = K views x output positions) and dz_{f,g} (T) its
output gradient at channel (f, g). The gradient of E_{f,g} is P^T dz_{f,g}, and moving it back through the gather,

    dw_f = sum_g Pi_g^T P^T dz_{f,g},     so     ||dw||^2 = sum_f sum_{g,h} dz_{f,g}^T P Pi_g Pi_h^T P^T dz_{f,h}.

Pi_g Pi_h^T is the permutation psi = phi_h^-1 o phi_g (as a matrix, [d, d''] = 1 where d'' = psi(d)). Grouping the
pairs (g, h) by psi:

    ||dw||^2 = sum_psi < A_psi, B_psi >_F,
    A_psi[t, t'] = sum_d P[t, d] P[t', psi(d)]                         (the patches against their permuted copy)
    B_psi[t, t'] = sum_f sum_{(g, h): phi_h^-1 o phi_g = psi} dz_{f,g}[t] dz_{f,h}[t'].

For a group, phi is a representation, so the n^2 pairs fall into n classes of n pairs (psi is the element
g h^-1 acting on the rows; checked for C2, C4, D1, D2, D4 by tests/test_gather_ghost.py): n Gram pairs instead of
n^2. Nothing here relies on that: the classes are found from the gather indices (`plan`), whatever they are.
Since psi_{h,g} = psi_{g,h}^-1, A and B of psi^-1 are those of psi transposed, with the same inner product: one of
each inverse pair is computed, counted twice (C4's and D4's quarter turns).

**Without patches.** When psi moves the taps and the input channels separately, psi(p, c) = (pi(p), tau(c)) (as
every group conv's does: a turn of the taps and a permutation of the input orientations), then with X the padded
input of the example (rows r = views x padded positions),

    A_psi[t, t'] = sum_p G_tau[t + o_p, t' + o_pi(p)],    G_tau[r, r'] = sum_c X[r, c] X[r', tau(c)],

the input against its channel-permuted copy, summed over k*k pairs of strided windows, as the plain ghost route
sums its input Gram over k*k windows. The Gram is taken over the unpadded positions and padded with zeros (the
padding rows are zero), which saves (padded / unpadded positions)^2 of its multiply-adds: 5x at 4x4, 2.4x at 8x8.
Layers whose psi does not factor this way are not `allowed` (they materialise).

The bias b_f is shared by the copies: db_f = sum_t sum_g dz_{f,g}[t], exactly. The clipped sum is then one
ordinary batched weight gradient of the expanded kernel from the reweighted dz (what non-private training
computes), moved back to the base filters through the gather once (`weighted_sum`).

Cost per example (multiply-adds, `gram_macs`): (distinct tau) x (V*H*W)^2 x C_in for the input Grams, + (psi
computed) x k*k x T^2 for the windows, + T^2 x F x (pairs computed) for the output Grams (n^2 pairs, or about half
that with inverse pairs folded; F*n = output channels), against T x D x F*n to form each example's expanded
gradient: it pays at low resolution, where T is small. Interpolated groups (C8, D8) expose no gather and keep
materialising: their expansion is a matrix, and the same identity through it would need the n^2 pairs (the
interpolation is not a representation) at T^2 x D each.
"""

import functools

import numpy as np
import tensorflow as tf

from eqdp_tf.privacy import per_example


def kernel_gather(layer):
    """The layer's gather index ``[n, D]`` (``layer.kernel_gather_index()``), or None if it has none."""
    accessor = getattr(layer, "kernel_gather_index", None)
    if accessor is None or not getattr(layer, "built", False):
        return None
    index = accessor()
    return None if index is None else np.asarray(index, dtype=np.int64)


class _Term:
    """One class psi of pairs (g, h): its tap permutation pi, which distinct channel permutation tau it uses, the
    pairs' g's and h's, and how many times its inner product counts (2 when psi^-1 is folded into it)."""

    def __init__(self, taps, channel_perm, lefts, rights, weight):
        self.taps, self.channel_perm, self.lefts, self.rights, self.weight = taps, channel_perm, lefts, rights, weight


@functools.lru_cache(maxsize=256)
def _plan(index_bytes, copies, rows, taps):
    index = np.frombuffer(index_bytes, dtype=np.int64).reshape(copies, rows)
    if rows % taps or any(not np.array_equal(np.sort(row), np.arange(rows)) for row in index):
        return None
    channels = rows // taps
    inverse = np.argsort(index, axis=1)
    classes = {}  # psi bytes -> (psi, [(g, h)])
    for g in range(copies):
        for h in range(copies):
            psi = inverse[h][index[g]]  # phi_h^-1(phi_g(d))
            classes.setdefault(psi.tobytes(), (psi, []))[1].append((g, h))
    channel_perms, terms, folded = [], [], set()
    for key, (psi, pairs) in classes.items():
        if key in folded:
            continue
        inverse_key = np.argsort(psi).tobytes()
        weight = 1
        if inverse_key != key:
            folded.add(inverse_key)
            weight = 2
        grid = psi.reshape(taps, channels)
        tap_perm, channel_perm = grid[:, 0] // channels, grid[0] % channels
        if not np.array_equal(grid, tap_perm[:, None] * channels + channel_perm[None, :]):
            return None  # psi mixes taps and channels: no input-Gram form
        for i, known in enumerate(channel_perms):
            if np.array_equal(known, channel_perm):
                break
        else:
            channel_perms.append(channel_perm)
            i = len(channel_perms) - 1
        terms.append(_Term(tuple(int(p) for p in tap_perm), i, [g for g, _ in pairs], [h for _, h in pairs], weight))
    return channel_perms, terms


def plan(layer):
    """(distinct channel permutations, [_Term]) of the layer's identity (module doc), or None when there is none."""
    index = kernel_gather(layer)
    if index is None:
        return None
    k, _, _ = per_example.conv_geometry(layer)
    return _plan(np.ascontiguousarray(index).tobytes(), index.shape[0], index.shape[1], k * k)


def _static_dims(x, dz):
    dims = list(x.shape[1:]) + list(dz.shape[1:])
    return None if any(d is None for d in dims) else [int(d) for d in dims]


def allowed(layer, x, dz, num_views):
    """True when this module gives ``layer``'s exact per-example norms: a conv-like layer (`per_example`) with a
    gather index whose row permutations factor into taps and channels, static shapes, ``num_views`` a Python int."""
    if not isinstance(num_views, int) or not hasattr(layer, "kernel_size") or not hasattr(layer, "expanded_kernel"):
        return False
    dims = _static_dims(x, dz)
    index = kernel_gather(layer)
    if dims is None or index is None or x.shape.rank != 4:
        return False
    k, _, _ = per_example.conv_geometry(layer)
    copies, rows = index.shape
    filters = int(layer.kernel.shape[-1])
    if rows != k * k * dims[2] or dims[5] != filters * copies or int(np.prod(layer.kernel.shape[:-1])) != rows:
        return False
    return plan(layer) is not None


def gram_macs(layer, x, dz, num_views):
    """Multiply-adds per example of the identity's Gram matrices (`allowed` layers; module doc)."""
    height, width, c_in, out_h, out_w, c_out = _static_dims(x, dz)
    channel_perms, terms = plan(layer)
    k, _, _ = per_example.conv_geometry(layer)
    copies = len(kernel_gather(layer))
    filters = c_out // copies
    positions = num_views * height * width
    rows = num_views * out_h * out_w
    pairs = sum(len(term.lefts) for term in terms)
    return (len(channel_perms) * positions**2 * c_in + len(terms) * k * k * rows**2
            + rows**2 * filters * pairs)


def materialised_entries(layer):
    """Entries of one example's gradient the materialise route forms for ``layer``: its expanded kernel's (n times
    the base filters'), then the base filters' and the bias's."""
    copies = len(kernel_gather(layer))
    weights = sum(int(v.shape.num_elements()) for v in layer.trainable_variables)
    return copies * int(layer.kernel.shape.num_elements()) + weights


def squared_norms(layer, x, dz, batch, num_views):
    """[B] squared norm of each example's gradient of the base filters (and bias), by the identity (module doc).

    ``x``: [B*K, H, W, C_in] (rows grouped by example), ``dz``: [B*K, H', W', F*n], same dtype."""
    height, width, c_in, out_h, out_w, c_out = _static_dims(x, dz)
    channel_perms, terms = plan(layer)
    k, s, padding = per_example.conv_geometry(layer)
    copies = len(kernel_gather(layer))
    filters = c_out // copies
    top, bottom, _ = per_example.padding_amounts(height, k, s, padding)
    left, right, _ = per_example.padding_amounts(width, k, s, padding)

    rows = tf.reshape(x, [batch, num_views * height * width, c_in])

    def input_gram(channel_perm):  # [B, V, Hp, Wp, V, Hp, Wp]: X against its channel-permuted copy, zero-padded
        moved = rows if np.array_equal(channel_perm, np.arange(c_in)) else tf.gather(rows, channel_perm, axis=-1)
        gram = tf.linalg.matmul(rows, moved, transpose_b=True)
        gram = tf.reshape(gram, [batch, num_views, height, width, num_views, height, width])
        if top or bottom or left or right:
            pad = [[top, bottom], [left, right]]
            gram = tf.pad(gram, [[0, 0], [0, 0], *pad, [0, 0], *pad])
        return gram

    def window(gram, tap_left, tap_right):
        (i, j), (a, b) = divmod(tap_left, k), divmod(tap_right, k)
        return gram[:, :, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s,
                    :, a:a + (out_h - 1) * s + 1:s, b:b + (out_w - 1) * s + 1:s]

    t = num_views * out_h * out_w
    dz_fields = tf.reshape(dz, [batch, t, filters, copies])
    squared = None
    gram, gram_of = None, None
    for term in sorted(terms, key=lambda term: term.channel_perm):  # each input Gram made once, used, dropped
        if gram_of != term.channel_perm:
            gram, gram_of = input_gram(channel_perms[term.channel_perm]), term.channel_perm
        patch_gram = tf.add_n([window(gram, p, term.taps[p]) for p in range(k * k)])
        patch_gram = tf.reshape(patch_gram, [batch, t, t])
        lefts = tf.reshape(tf.gather(dz_fields, term.lefts, axis=3), [batch, t, -1])
        rights = tf.reshape(tf.gather(dz_fields, term.rights, axis=3), [batch, t, -1])
        output_gram = tf.linalg.matmul(lefts, rights, transpose_b=True)
        value = tf.reduce_sum(patch_gram * output_gram, axis=[1, 2])
        if term.weight != 1:
            value = value * term.weight
        squared = value if squared is None else squared + value
    if getattr(layer, "bias", None) is not None:
        squared += tf.reduce_sum(tf.square(tf.reduce_sum(dz_fields, axis=[1, 3])), axis=1)
    return squared


def weighted_sum(layer, x, dz, row_weights):
    """[(variable, sum over rows of weight * its gradient)]: one batched gradient of the expanded kernel from the
    reweighted ``dz``, moved back to the base filters through the gather (a sum of n permuted copies)."""
    weighted = dz * tf.reshape(row_weights, [-1, 1, 1, 1])
    k, s, padding = per_example.conv_geometry(layer)
    index = kernel_gather(layer)
    copies, rows = index.shape
    filters = int(layer.kernel.shape[-1])
    expanded = tf.raw_ops.Conv2DBackpropFilter(
        input=x, filter_sizes=[k, k, x.shape[-1], dz.shape[-1]], out_backprop=weighted,
        strides=[1, s, s, 1], padding=padding)
    expanded = tf.transpose(tf.reshape(expanded, [rows, filters, copies]), [2, 0, 1])  # [n, D, F]
    # base row phi_g(d) gets expanded row d of copy g: gather copy g by phi_g's inverse, then sum over g.
    kernel = tf.reduce_sum(tf.gather(expanded, np.argsort(index, axis=1), axis=1, batch_dims=1), axis=0)
    grads = [(layer.kernel, tf.reshape(kernel, tf.shape(layer.kernel)))]
    bias = getattr(layer, "bias", None)
    if bias is not None:
        bias_grad = tf.reduce_sum(tf.reshape(weighted, [-1, filters, copies]), axis=[0, 2])
        grads.append((bias, tf.reshape(bias_grad, tf.shape(bias))))
    return grads
