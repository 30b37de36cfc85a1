"""Group convolutions: one small filter bank, stacked in every orientation of the group.

Channel layout used by every layer in this package ("field-major"): a tensor of ``F`` regular
feature fields over a group G has ``F * |G|`` channels, and channel ``c * |G| + g`` holds field c at
orientation g. A group element h acts on such a tensor by moving pixels (p -> h p) and permuting
orientations (new[g] = old[h^-1 g]).

- ``LiftingConv2D``: ordinary image (any channels) -> ``filters`` fields over G.
- ``GroupConv2D``: fields over G -> ``filters`` fields over G.

``call`` expands the small base kernel with one gather (plus one einsum for groups whose rotations
are interpolated) and runs a single ``tf.nn.conv2d``, so the conv itself is the cost, and the layer
traces cleanly inside ``tf.vectorized_map`` and XLA. The expanded kernel is a local, never cached
on the layer: a cache would go stale under the optimizer and is unsafe under tracing.

Where the base kernel comes from (``basis``):
- ``'dense'``: the trainable weights are the base kernel's k*k taps themselves.
- ``'steerable'``: the official code's escnn basis (``layers.steerable``): the trainable weights are coefficients
  of a fixed band-limited basis, 8 per input orientation for k = 3 instead of 9, and the base kernel is the basis
  matrix times them.
``weight_standardization=True`` (the official code's fork of escnn) replaces the layer's whole trainable vector by
``(w - mean(w)) / (std(w) + 1e-5)`` (one mean and one population std per layer, no gain) before the basis, in
training and evaluation alike. ``bias_scale`` multiplies the per-field bias as it is added to every orientation
(the official: 1/sqrt(|G|), escnn's change of basis of the regular representation).
"""

import numpy as np
import tensorflow as tf

from layers import groups as groups_lib
from layers import kernels
from layers import steerable
from layers.kernel_conv import BuiltKernelConv2D, positive_int

BASES = ("dense", "steerable")
# The fork's standardisation: (w - mean) / (std + 1e-5), std the population standard deviation.
STANDARDIZATION_EPSILON = 1e-5


def standardize_layer(weights):
    """``weights`` as the official code's escnn fork standardises a layer's coefficient vector (module doc)."""
    mean, variance = tf.nn.moments(tf.reshape(weights, [-1]), axes=[0])
    return (weights - mean) / (tf.sqrt(variance) + STANDARDIZATION_EPSILON)


def standardization_vjp(weights, cotangents):
    """Per-example gradients of the raw weights ``w`` from per-example gradients ``u`` [B, *w.shape] of
    ``standardize_layer(w)``: with c = w - mean(w), s its population std and n its size,

        dL/dw = (u - mean(u)) / (s + eps) - c (u . c) / (n s (s + eps)^2),

    the Jacobian every example shares, written out (a few elementwise passes instead of one autodiff per example).
    """
    w = tf.cast(weights, tf.float32)
    n = float(np.prod(w.shape))
    mean, variance = tf.nn.moments(tf.reshape(w, [-1]), axes=[0])
    std = tf.sqrt(variance)
    centred = w - mean
    axes = list(range(1, len(cotangents.shape)))
    u = tf.cast(cotangents, tf.float32)
    along = tf.reduce_sum(u * centred, axis=axes, keepdims=True)
    return ((u - tf.reduce_mean(u, axis=axes, keepdims=True)) / (std + STANDARDIZATION_EPSILON)
            - centred * along / (n * std * (std + STANDARDIZATION_EPSILON) ** 2))


def coefficient_gradients(full_basis, weights, kernel_grads, weight_standardization):
    """Per-example gradients of a layer's coefficients ``weights`` [D, C, F] from per-example gradients of its full
    kernel [B, k, k, C * d_in, F * d_out], for any kernel that is ``full_basis`` [D, k*k, d_in, d_out] times the
    (standardised) coefficients: one contraction (the expansion is linear), then the standardisation's Jacobian,
    which every example shares."""
    taps, d_in, d_out = full_basis.shape[1:]
    grads = tf.reshape(tf.cast(kernel_grads, tf.float32),
                       [-1, taps, weights.shape[1], d_in, weights.shape[2], d_out])
    grads = tf.einsum("dpio,bpcifo->bdcf", tf.cast(full_basis, tf.float32), grads)
    if weight_standardization:
        grads = standardization_vjp(weights, grads)
    return [(weights, tf.cast(grads, weights.dtype))]


class _SteerableInitializer(tf.keras.initializers.Initializer):
    """escnn's generalised He initialisation of steerable coefficients ``[D, in, F]``: normal with a standard
    deviation per basis element (``steerable.he_init_std``). Built by the layer, never serialised (the layer's
    config says ``kernel_initializer=None``, which rebuilds it)."""

    def __init__(self, std):
        self.std = np.asarray(std, np.float32)

    def __call__(self, shape, dtype=None, **kwargs):
        std = tf.reshape(tf.constant(self.std), [-1] + [1] * (len(shape) - 1))
        return tf.random.normal(shape, dtype=dtype or tf.float32) * tf.cast(std, dtype or tf.float32)


class _GroupConvBase(BuiltKernelConv2D):
    """Argument handling, padding rules and the conv shared by lifting and group-to-group convs."""

    def __init__(
        self,
        filters,
        kernel_size,
        group="C4",
        strides=1,
        padding="same",
        use_bias=True,
        kernel_initializer=None,
        bias_initializer="zeros",
        basis="dense",
        weight_standardization=False,
        bias_scale=1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # kernel_initializer None: the basis's own initialisation (He normal for dense taps, escnn's generalised He
        # for coefficients).
        self._set_filter_options(filters, kernel_size, padding, use_bias, kernel_initializer, bias_initializer)
        self.group = groups_lib.get(group)
        self.strides = positive_int("strides", strides)
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
        if basis == "steerable" and kernels.spatial_permutation(self.group, self.kernel_size) is None:
            raise ValueError(f"basis='steerable' needs a group that permutes the {self.kernel_size}x"
                             f"{self.kernel_size} grid exactly (C1, C2, C4, D1, D2, D4), got {self.group.name}")
        self.basis = basis
        self.weight_standardization = bool(weight_standardization)
        if isinstance(bias_scale, bool) or not isinstance(bias_scale, (int, float)) or not bias_scale > 0:
            raise ValueError(f"bias_scale must be a positive number, got {bias_scale!r}")
        self.bias_scale = float(bias_scale)
        self.input_spec = tf.keras.layers.InputSpec(ndim=4)

    # Subclasses define the base kernel's shape and how it expands.
    def _base_kernel_shape(self, in_channels):
        raise NotImplementedError

    def _check_input_channels(self, in_channels):
        raise NotImplementedError

    def _build_expansion(self):
        raise NotImplementedError

    def expanded_kernel(self):
        """The ``[k, k, in_channels, filters * |G|]`` kernel of the equivalent ordinary convolution."""
        raise NotImplementedError

    def kernel_gather_index(self):
        """Where each expanded weight comes from, for exact groups: int array ``[|G|, k*k*in_channels]``, or None
        for interpolated groups (C8, D8, ...), whose expansion mixes taps.

        With the expanded kernel read as ``[k*k*in_channels, filters, |G|]`` and the base kernel as
        ``[k*k*in_channels, filters]`` (both in their own row-major order), column (f, g) of the first is column f
        of the second gathered by row ``index[g]``: each ``index[g]`` is a permutation of the rows. The bias is
        shared in the same way, ``expanded_bias()[f*|G| + g] = bias[f]``. This is all that DP-SGD's ghost norms of
        the base filters need to know of the layer: they never see the group.
        """
        raise NotImplementedError

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        in_channels = input_shape[-1]
        if in_channels is None:
            raise ValueError(f"{self.name}: the channel dimension of the input must be known, got {input_shape}")
        self._check_input_channels(int(in_channels))
        self._check_strides(input_shape)
        base_shape = self._base_kernel_shape(int(in_channels))
        if self.basis == "steerable":
            basis = steerable.steerable_basis(self.group, self.kernel_size, lifting=self._lifting)
            in_fields = base_shape[2]
            # [D, k*k, n_in]: kept as a constant; the base kernel is this matrix times the coefficients.
            self._basis = tf.constant(basis.base, tf.float32)
            self.kernel = self.add_weight(
                name="coefficients",
                shape=(basis.base.shape[0], in_fields, self.filters),
                initializer=self.kernel_initializer or _SteerableInitializer(steerable.he_init_std(basis, in_fields)),
                trainable=True,
            )
        else:
            self._basis = None
            self.kernel = self.add_weight(
                name="kernel",
                shape=base_shape,
                initializer=self.kernel_initializer or "he_normal",
                trainable=True,
            )
        self.bias = None
        if self.use_bias:
            # One bias per field, shared by its orientations: a per-channel bias would break equivariance.
            self.bias = self.add_weight(
                name="bias", shape=(self.filters,), initializer=self.bias_initializer, trainable=True
            )
        self._build_expansion()
        self._expanded_basis = None
        if not self.base_is_trainable_kernel and self.group.is_exact:
            # [D, k*k, n_in, |G|]: each trainable weight's (unit) full kernel for one input and one output field.
            # DP-SGD takes each example's kernel gradient back to the weights with it (weight_gradients_from_kernel).
            n_in = 1 if self._lifting else self.group.order
            taps = self.kernel_size * self.kernel_size
            base = (np.eye(taps * n_in).reshape(-1, taps, n_in) if self._basis is None
                    else steerable.steerable_basis(self.group, self.kernel_size, self._lifting).base)
            full = base.reshape(base.shape[0], -1) @ steerable.full_kernels_from_base(
                self.group, self.kernel_size, self._lifting)
            self._expanded_basis = tf.constant(full.reshape(-1, taps, n_in, self.group.order), tf.float32)
        self.input_spec = tf.keras.layers.InputSpec(ndim=4, axes={-1: int(in_channels)})
        super().build(input_shape)

    def _check_strides(self, input_shape):
        if self.strides == 1:
            return
        pad = self.kernel_size - 1 if self.padding == "same" else 0
        for size in input_shape[1:3]:
            if size is None:
                raise ValueError(
                    f"{self.name}: strides={self.strides} needs a known spatial size, to check that the sampled "
                    "grid is symmetric (otherwise rotations break equivariance)"
                )
            if (int(size) + pad - self.kernel_size) % self.strides:
                raise ValueError(
                    f"{self.name}: strides={self.strides} with padding='{self.padding}' on a {int(size)}-pixel "
                    "axis samples an asymmetric grid, which breaks rotation equivariance; use stride 1 followed "
                    "by pooling, or a size s with (size - 1) divisible by the stride"
                )

    def base_kernel(self):
        """The base filters (those of output orientation e) in the dense layout ``_base_kernel_shape``: the trainable
        weights themselves, or the basis times them, standardised first with ``weight_standardization``."""
        weights = self.kernel
        if self.weight_standardization:
            weights = standardize_layer(tf.cast(weights, tf.float32))
        weights = tf.cast(weights, self.compute_dtype)
        if self._basis is None:
            return weights
        base = tf.einsum("dph,dcf->pchf", tf.cast(self._basis, self.compute_dtype), weights)  # [k*k, C, n_in, F]
        in_fields = base.shape[1]
        return tf.reshape(base, self._base_kernel_shape(in_fields * (1 if self._lifting else self.group.order)))

    def weight_gradients_from_kernel(self, kernel_grads):
        """Per-example gradients of the trainable weights from per-example gradients of the expanded kernel,
        ``[B, k, k, C * n_in, F * |G|]`` -> ``[(kernel, [B, *kernel.shape])]``, for layers whose weights are not the
        base kernel itself (steerable coefficients, or standardised weights) over an exact group; None otherwise
        (the per-example engine then differentiates the expansion per example). One contraction with the expanded
        basis, then the standardisation's written-out Jacobian: the expansion's transpose and the basis are
        linear, and every example shares the Jacobian."""
        if self._expanded_basis is None:
            return None
        return coefficient_gradients(self._expanded_basis, self.kernel, kernel_grads, self.weight_standardization)

    @property
    def base_is_trainable_kernel(self):
        """True when the base kernel is the trainable weight itself (dense taps, not standardised): then the gather
        index says all DP-SGD's ghost norms need to know (``kernel_gather_index``)."""
        return self._basis is None and not self.weight_standardization

    def expanded_bias(self):
        """The ``[filters * |G|]`` bias of the equivalent ordinary convolution (or None)."""
        if self.bias is None:
            return None
        bias = tf.cast(self.bias, self.compute_dtype)
        if self.bias_scale != 1.0:
            bias = bias * tf.cast(self.bias_scale, self.compute_dtype)
        return tf.repeat(bias, self.group.order)

    @property
    def output_channels(self):
        return self.filters * self.group.order

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                **self._filter_options_config(),
                "group": self.group.name,
                "strides": self.strides,
                "basis": self.basis,
                "weight_standardization": self.weight_standardization,
                "bias_scale": self.bias_scale,
            }
        )
        return config


@tf.keras.utils.register_keras_serializable(package="eqdp")
class LiftingConv2D(_GroupConvBase):
    """Ordinary image ``[B, H, W, C]`` -> ``filters`` regular fields over G, ``[B, H', W', filters*|G|]``.

    Parameters: ``k*k*C*filters`` weights and ``filters`` biases; the output for orientation g uses
    the base filter transformed by g. (Interpolated groups such as C8 keep only the disk taps, see
    ``kernels.disk_taps``: 5 for k=3.)
    """

    _lifting = True

    def _base_kernel_shape(self, in_channels):
        if self.group.is_exact:
            return (self.kernel_size, self.kernel_size, in_channels, self.filters)
        return (kernels.free_taps(self.group, self.kernel_size), in_channels, self.filters)

    def _check_input_channels(self, in_channels):
        if in_channels < 1:
            raise ValueError(f"{self.name}: input must have at least one channel")

    def _build_expansion(self):
        index = kernels.lifting_indices(self.group, self.kernel_size)
        if index is not None:
            self._gather_index = tf.constant(index)
            self._operators = None
        else:
            self._gather_index = None
            self._operators = kernels.spatial_operators(self.group, self.kernel_size)

    def expanded_kernel(self):
        k, order = self.kernel_size, self.group.order
        base = self.base_kernel()
        in_ch = base.shape[-2]
        flat = tf.reshape(base, [-1, in_ch, self.filters])
        if self._gather_index is not None:
            stacked = tf.gather(flat, self._gather_index)  # [G, k*k, C, F]
            stacked = tf.transpose(stacked, [1, 2, 3, 0])  # [k*k, C, F, G]
        else:
            ops = tf.constant(self._operators, dtype=self.compute_dtype)
            stacked = tf.einsum("gpq,qcf->pcfg", ops, flat)
        return tf.reshape(stacked, [k, k, in_ch, self.filters * order])

    def kernel_gather_index(self):
        taps = kernels.lifting_indices(self.group, self.kernel_size)  # [G, k*k]: tap p of orientation g <- taps[g, p]
        if taps is None or not self.base_is_trainable_kernel:
            return None
        in_ch = self.kernel.shape[-2]
        index = taps[:, :, None] * in_ch + np.arange(in_ch)[None, None, :]  # row (p, c) <- (taps[g, p], c)
        return index.reshape(self.group.order, -1).astype(np.int64)


@tf.keras.utils.register_keras_serializable(package="eqdp")
class GroupConv2D(_GroupConvBase):
    """``in_fields`` regular fields over G -> ``filters`` fields over G (field-major channels).

    Parameters: ``k*k*|G|*in_fields*filters`` weights and ``filters`` biases (disk taps instead of
    k*k for interpolated groups). The filter for output orientation g is the base filter moved by g
    in space with its orientation axis permuted by g.
    """

    _lifting = False

    def _base_kernel_shape(self, in_channels):
        in_fields = in_channels // self.group.order
        if self.group.is_exact:
            return (self.kernel_size, self.kernel_size, in_fields, self.group.order, self.filters)
        return (kernels.free_taps(self.group, self.kernel_size), in_fields, self.group.order, self.filters)

    def _check_input_channels(self, in_channels):
        if in_channels % self.group.order:
            raise ValueError(
                f"{self.name}: input has {in_channels} channels, not a multiple of |{self.group.name}| = "
                f"{self.group.order}; GroupConv2D takes regular fields over {self.group.name} "
                "(use LiftingConv2D on plain images)"
            )

    def _build_expansion(self):
        k = self.kernel_size
        exact = kernels.spatial_permutation(self.group, k) is not None
        self._gather_index = tf.constant(kernels.group_conv_indices(self.group, k, spatial=exact))
        self._operators = None if exact else kernels.spatial_operators(self.group, k)

    def expanded_kernel(self):
        k, order = self.kernel_size, self.group.order
        base = self.base_kernel()
        in_fields = base.shape[-3]
        base = tf.reshape(base, [-1, in_fields, order, self.filters])  # [T, C, G_in, F]
        flat = tf.reshape(tf.transpose(base, [0, 2, 1, 3]), [-1, in_fields, self.filters])
        stacked = tf.gather(flat, self._gather_index)  # [G_out, k*k, G_in, C, F]
        if self._operators is not None:
            ops = tf.constant(self._operators, dtype=self.compute_dtype)
            stacked = tf.einsum("gpq,gqhcf->gphcf", ops, stacked)
        stacked = tf.transpose(stacked, [1, 3, 2, 4, 0])  # [k*k, C, G_in, F, G_out]
        return tf.reshape(stacked, [k, k, in_fields * order, self.filters * order])

    def kernel_gather_index(self):
        if kernels.spatial_permutation(self.group, self.kernel_size) is None or not self.base_is_trainable_kernel:
            return None
        order = self.group.order
        in_fields = self.kernel.shape[-3]
        # [G_out, k*k, G_in] into the base flattened as [k*k, G_in], as _build_expansion gathers
        flat = kernels.group_conv_indices(self.group, self.kernel_size)
        taps, orientations = flat // order, flat % order
        fields = np.arange(in_fields)[None, None, :, None]
        # row (p, c, h) of orientation g <- base row (taps[g, p, h], c, orientations[g, p, h])
        index = (taps[:, :, None, :] * in_fields + fields) * order + orientations[:, :, None, :]
        return index.reshape(order, -1).astype(np.int64)
