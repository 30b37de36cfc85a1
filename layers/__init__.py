"""Rotation-equivariant Keras layers (tf.keras): groups, group convolutions, pooling, GroupNorm.

Usable on their own; this package imports only TensorFlow and numpy. Channel layout everywhere:
``F`` regular fields over G are ``F*|G|`` channels, channel ``c*|G| + g`` = field c, orientation g.
"""

from layers.conv import GroupConv2D, LiftingConv2D
from layers.freeze import freeze
from layers.groups import Group, cyclic_group, dihedral_group, get as get_group
from layers.normalization import GroupNormalization, closest_divisor
from layers.pooling import GroupPooling, SpatialPooling2D
from layers.restriction import RestrictToSubgroup

__all__ = [
    "Group",
    "GroupConv2D",
    "GroupNormalization",
    "GroupPooling",
    "LiftingConv2D",
    "RestrictToSubgroup",
    "SpatialPooling2D",
    "closest_divisor",
    "cyclic_group",
    "dihedral_group",
    "freeze",
    "get_group",
]
