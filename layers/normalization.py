"""GroupNorm for regular fields: statistics per example, never per batch (DP-safe), equivariant.

Normalising over H, W and a set of channels is equivariant only if that set is closed under the
group's orientation permutation, i.e. holds whole fields. So ``groups`` partitions the *fields*
(each norm group = ``fields/groups`` whole fields, all orientations). The optional affine is per
field (shared by its orientations); a per-channel affine would break equivariance.
``BandLimitedGroupNormalization`` does the same over band-limited SO(2) fields (``layers.so2``), with the official
code's centring or an equivariant one.
"""

import tensorflow as tf

from layers import _fields
from layers import groups as groups_lib
from layers import so2


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


class _FieldGroupNorm(tf.keras.layers.Layer):
    """What GroupNorm over fields shares: ``groups`` norm groups of whole fields of ``_field_size()`` channels, the
    checks, and per-example statistics over H, W and each group's channels."""

    def __init__(self, groups=8, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.groups = groups
        self.epsilon = float(epsilon)
        self.input_spec = tf.keras.layers.InputSpec(ndim=4)

    def _field_size(self):
        raise NotImplementedError

    def _field_name(self):
        raise NotImplementedError

    def build(self, input_shape):
        self.fields = _fields.fields_of_size(self.name, input_shape, self._field_size(), self._field_name())
        if self.fields % self.groups:
            raise ValueError(
                f"{self.name}: groups={self.groups} does not divide the {self.fields} fields; every norm group "
                f"must hold whole fields to stay equivariant (closest divisor: "
                f"{closest_divisor(self.fields, self.groups)})"
            )
        self.input_spec = tf.keras.layers.InputSpec(ndim=4, axes={-1: self.fields * self._field_size()})
        super().build(input_shape)

    def _split(self, inputs):
        """``[B, H, W, groups, fields per group, field size]``."""
        shape = tf.shape(inputs)
        return tf.reshape(inputs, tf.concat([shape[:3], [self.groups, self.fields // self.groups,
                                                         self._field_size()]], axis=0))

    def _normalize(self, split, centred):
        variance = tf.reduce_mean(tf.square(centred), axis=[1, 2, 4, 5], keepdims=True)
        return centred * tf.math.rsqrt(variance + self.epsilon)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "epsilon": self.epsilon}


@tf.keras.utils.register_keras_serializable(package="eqdp")
class GroupNormalization(_FieldGroupNorm):
    """Equivariant GroupNorm over ``[B, H, W, F*|G|]`` with ``groups`` dividing the field count F."""

    def __init__(self, groups=8, group="C4", center=False, scale=False, epsilon=1e-5, **kwargs):
        super().__init__(groups=groups, epsilon=epsilon, **kwargs)
        self.group = groups_lib.get(group)
        self.center = bool(center)
        self.scale = bool(scale)

    def _field_size(self):
        return self.group.order

    def _field_name(self):
        return f"|{self.group.name}| = {self.group.order}"

    def build(self, input_shape):
        super().build(input_shape)
        self.gamma = self.beta = None
        if self.scale:
            self.gamma = self.add_weight(name="gamma", shape=(self.fields,), initializer="ones")
        if self.center:
            self.beta = self.add_weight(name="beta", shape=(self.fields,), initializer="zeros")

    def call(self, inputs):
        split = self._split(inputs)
        mean = tf.reduce_mean(split, axis=[1, 2, 4, 5], keepdims=True)
        normed = tf.reshape(self._normalize(split, split - mean), tf.shape(inputs))
        if self.gamma is not None:
            normed = normed * tf.repeat(tf.cast(self.gamma, normed.dtype), self.group.order)
        if self.beta is not None:
            normed = normed + tf.repeat(tf.cast(self.beta, normed.dtype), self.group.order)
        return normed

    def get_config(self):
        return {**super().get_config(), "group": self.group.name, "center": self.center, "scale": self.scale}


CENTERINGS = ("all", "invariant")


@tf.keras.utils.register_keras_serializable(package="eqdp")
class BandLimitedGroupNormalization(_FieldGroupNorm):
    """GroupNorm over band-limited SO(2) fields ``[B, H, W, F*(2L+1)]`` (``layers.so2``), no affine, groups of whole
    fields.

    ``centering='all'`` is the official code's (its fork's GroupNorm is torch's ``group_norm`` on
    ``[B, fields, 2L+1, H, W]``): one mean over every coefficient of a group, subtracted from every coefficient. That
    mean mixes the rotating frequency-k pairs, so the layer is not equivariant, not even for 90 degree turns (a
    frequency-1 pair (a, b) turns into (-b, a), and a + b into a - b). ``centering='invariant'`` subtracts the mean
    of the frequency-0 coefficients from those alone; the variance (the mean square of every centred coefficient)
    is rotation-invariant, so it is exactly equivariant for rotations that map the pixel grid onto itself.
    """

    def __init__(self, groups=8, frequency=1, centering="all", epsilon=1e-5, **kwargs):
        super().__init__(groups=groups, epsilon=epsilon, **kwargs)
        self.frequency = so2.check_frequency(frequency)
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.centering = centering

    def _field_size(self):
        return so2.field_size(self.frequency)

    def _field_name(self):
        return f"2L + 1 = {self._field_size()}"  # as _fields.band_limited_fields_in says it

    def call(self, inputs):
        split = self._split(inputs)
        if self.centering == "all":
            mean = tf.reduce_mean(split, axis=[1, 2, 4, 5], keepdims=True)
        else:
            trivial = tf.reduce_mean(split[..., :1], axis=[1, 2, 4], keepdims=True)
            mean = tf.pad(trivial, [[0, 0]] * 5 + [[0, 2 * self.frequency]])
        return tf.reshape(self._normalize(split, split - mean), tf.shape(inputs))

    def get_config(self):
        return {**super().get_config(), "frequency": self.frequency, "centering": self.centering}
