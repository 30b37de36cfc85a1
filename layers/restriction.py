"""Restricting fields over G to fields over a subgroup H, without parameters.

A regular field over G, seen by H only, splits into [G:H] regular fields over H: with right cosets
G = union_j H t_j, new field j at orientation h reads the old field at orientation h t_j. Pure
channel permutation, so nothing is lost; deeper layers then pay |H| instead of |G| per field (the
paper restricts D4 -> D2 after the third stage).
"""

import numpy as np
import tensorflow as tf

from layers import _fields
from layers import groups as groups_lib
from layers import so2


def restriction_permutation(group, subgroup, fields):
    """Channel gather indices mapping ``fields`` fields over G to ``fields*[G:H]`` fields over H."""
    group, subgroup = groups_lib.get(group), groups_lib.get(subgroup)
    members = group.subgroup_embedding(subgroup)
    reps = group.right_coset_representatives(subgroup)
    index = [
        field * group.order + group.compose(int(h), int(t))
        for field in range(fields)
        for t in reps
        for h in members
    ]
    return np.array(index, dtype=np.int32)


@tf.keras.utils.register_keras_serializable(package="eqdp")
class RestrictToSubgroup(tf.keras.layers.Layer):
    """``[B, H, W, F*|G|]`` fields over ``group`` -> ``[B, H, W, F*|G|]`` = ``F*[G:H]`` fields over ``subgroup``."""

    def __init__(self, group="D4", subgroup="D2", **kwargs):
        super().__init__(**kwargs)
        self.group = groups_lib.get(group)
        self.subgroup = groups_lib.get(subgroup)
        self.group.subgroup_embedding(self.subgroup)  # raises ValueError when H is not a subgroup

    @property
    def index(self):
        return self.group.order // self.subgroup.order

    def build(self, input_shape):
        fields = _fields.fields_in(self.name, input_shape, self.group)
        self._permutation = tf.constant(restriction_permutation(self.group, self.subgroup, fields))
        self.input_spec = tf.keras.layers.InputSpec(min_ndim=2, axes={-1: fields * self.group.order})
        super().build(input_shape)

    def call(self, inputs):
        return tf.gather(inputs, self._permutation, axis=-1)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def get_config(self):
        return {**super().get_config(), "group": self.group.name, "subgroup": self.subgroup.name}


@tf.keras.utils.register_keras_serializable(package="eqdp")
class RestrictBandLimitedToTrivial(tf.keras.layers.Layer):
    """``[B, H, W, F*(2L+1)]`` band-limited SO(2) fields (``layers.so2``) -> ``F*(2L+1)`` fields over the trivial
    group C1, i.e. plain channels: the identity on the tensor.

    Seen by the trivial subgroup alone, every coefficient is an invariant scalar. escnn's ``RestrictionModule(type,
    1)`` followed by ``DisentangleModule`` (the official code's ``restrict: invariant`` for SO(2)) leaves the channels
    where they are, because the band-limited field's change of basis is the identity (tests/test_so2_layers.py
    checks it against escnn). The layer marks where equivariance ends and checks the channel count.
    """

    def __init__(self, frequency=1, **kwargs):
        super().__init__(**kwargs)
        self.frequency = so2.check_frequency(frequency)

    def build(self, input_shape):
        _fields.band_limited_fields_in(self.name, input_shape, self.frequency)  # checks the channel count
        super().build(input_shape)

    def call(self, inputs):
        return tf.identity(inputs)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def get_config(self):
        return {**super().get_config(), "frequency": self.frequency}
