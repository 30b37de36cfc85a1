"""GroupNorm for regular fields: statistics per example, never per batch (DP-safe), equivariant.

Normalising over H, W and a set of channels is equivariant only if that set is closed under the
group's orientation permutation, i.e. holds whole fields. So ``groups`` partitions the *fields*
(each norm group = ``fields/groups`` whole fields, all orientations). The optional affine is per
field (shared by its orientations); a per-channel affine would break equivariance.
"""

import tensorflow as tf

from layers import _fields
from layers import groups as groups_lib


def closest_divisor(n, requested):
    """The divisor of ``n`` nearest to ``requested`` (ties go to the smaller one), as the paper does."""
    if n < 1 or requested < 1:
        raise ValueError(f"closest_divisor needs positive ints, got n={n}, requested={requested}")
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - requested), d))


def official_norm_groups(n, requested=8):
    """The number of norm groups the official code uses for ``n`` fields when ``requested`` are asked for.

    Its escnn fork keeps ``requested`` when it divides ``n``; otherwise (``utils.closest_divisor``) it takes the
    divisor nearest to ``requested``, the second nearest if the first leaves at most 3 fields per group, and 1
    group if that too leaves at most 3. For 6, 9 and 13 fields: 1 group; for 27 and 39: 3; for 16: 8. (Ties in
    distance go to the smaller divisor, as numpy's argsort keeps them for the few divisors such counts have.)
    """
    if n < 1 or requested < 1:
        raise ValueError(f"official_norm_groups needs positive ints, got n={n}, requested={requested}")
    if n % requested == 0:
        return requested
    divisors = sorted((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - requested), d))
    if len(divisors) < 2:
        chosen = divisors[0]
    elif n // divisors[0] > 3:
        return divisors[0]
    else:
        chosen = divisors[1]
    return 1 if n // chosen <= 3 else chosen


NORM_GROUP_RULES = {"closest": closest_divisor, "official": official_norm_groups}


@tf.keras.utils.register_keras_serializable(package="eqdp")
class GroupNormalization(tf.keras.layers.Layer):
    """Equivariant GroupNorm over ``[B, H, W, F*|G|]`` with ``groups`` dividing the field count F."""

    def __init__(self, groups=8, group="C4", center=False, scale=False, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.groups = groups
        self.group = groups_lib.get(group)
        self.center = bool(center)
        self.scale = bool(scale)
        self.epsilon = float(epsilon)
        self.input_spec = tf.keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        self.fields = _fields.fields_in(self.name, input_shape, self.group)
        if self.fields % self.groups:
            raise ValueError(
                f"{self.name}: groups={self.groups} does not divide the {self.fields} fields; every norm group "
                f"must hold whole fields to stay equivariant (closest divisor: "
                f"{closest_divisor(self.fields, self.groups)})"
            )
        self.gamma = self.beta = None
        if self.scale:
            self.gamma = self.add_weight(name="gamma", shape=(self.fields,), initializer="ones")
        if self.center:
            self.beta = self.add_weight(name="beta", shape=(self.fields,), initializer="zeros")
        self.input_spec = tf.keras.layers.InputSpec(ndim=4, axes={-1: self.fields * self.group.order})
        super().build(input_shape)

    def call(self, inputs):
        shape = tf.shape(inputs)
        per_group = self.fields // self.groups * self.group.order
        split = tf.reshape(inputs, tf.concat([shape[:3], [self.groups, per_group]], axis=0))
        mean, variance = tf.nn.moments(split, axes=[1, 2, 4], keepdims=True)
        normed = tf.reshape((split - mean) * tf.math.rsqrt(variance + self.epsilon), shape)
        if self.gamma is not None:
            normed = normed * tf.repeat(tf.cast(self.gamma, normed.dtype), self.group.order)
        if self.beta is not None:
            normed = normed + tf.repeat(tf.cast(self.beta, normed.dtype), self.group.order)
        return normed

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "groups": self.groups,
            "group": self.group.name,
            "center": self.center,
            "scale": self.scale,
            "epsilon": self.epsilon,
        }
