"""Rotation-equivariant Keras layers (tf.keras): groups, group convolutions, pooling, GroupNorm; band-limited SO(2)
fields (convolution, Fourier ELU, anti-aliased pooling, disc mask); and the weight-standardised convolution of the
WRN baseline.

Usable on their own; this package imports only TensorFlow and numpy. Channel layout everywhere:
``F`` regular fields over G are ``F*|G|`` channels, channel ``c*|G| + g`` = field c, orientation g; ``F``
band-limited SO(2) fields of maximum frequency L are ``F*(2L+1)`` channels, field-major too (``layers.so2``).
"""

# First: Keras 2 as tf.keras (and TF-Privacy's import) on TensorFlow 2.16+, before anything imports TensorFlow.
from layers import _tf_setup  # noqa: F401  isort: skip
from layers.groups import Group, cyclic_group, dihedral_group, get as get_group

# The Keras layers import TensorFlow; they are loaded on first use, so that the groups (numpy only) can be used,
# e.g. to validate flags, without starting TensorFlow.
_LAZY = {
    "GroupConv2D": "layers.conv", "LiftingConv2D": "layers.conv", "freeze": "layers.freezing",
    "GroupNormalization": "layers.normalization", "closest_divisor": "layers.normalization",
    "GroupPooling": "layers.pooling", "SpatialPooling2D": "layers.pooling",
    "RestrictToSubgroup": "layers.restriction", "StandardizedConv2D": "layers.standardized_conv",
    # Band-limited SO(2) fields (layers.so2): the official code's 'orthogonal' model.
    "BandLimitedConv2D": "layers.so2_conv", "FourierELU": "layers.fourier",
    "BandLimitedGroupNormalization": "layers.normalization", "AntialiasedAveragePooling2D": "layers.pooling",
    "DiscMask": "layers.masking", "RestrictBandLimitedToTrivial": "layers.restriction",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'layers' has no attribute {name!r}")


__all__ = [
    "AntialiasedAveragePooling2D",
    "BandLimitedConv2D",
    "BandLimitedGroupNormalization",
    "DiscMask",
    "FourierELU",
    "Group",
    "GroupConv2D",
    "GroupNormalization",
    "GroupPooling",
    "LiftingConv2D",
    "RestrictBandLimitedToTrivial",
    "RestrictToSubgroup",
    "SpatialPooling2D",
    "StandardizedConv2D",
    "closest_divisor",
    "cyclic_group",
    "dihedral_group",
    "freeze",
    "get_group",
]


def __dir__():
    # Without it dir() and tab completion list none of the lazily loaded layers.
    return sorted(set(globals()) | set(__all__))
