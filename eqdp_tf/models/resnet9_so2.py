"""The official code's SO(2) Equivariant ResNet-9 (``group: orthogonal``, ``restrict: invariant``), built from
``layers``.

    disc mask -> lift block -> block + anti-aliased pool -> residual(2 blocks) -> GroupNorm -> block + pool
    -> restrict to C1 -> conv block + max pool -> residual(2 conv blocks) -> GroupNorm -> head

An SO(2) block is a 3x3 ``BandLimitedConv2D`` between band-limited fields of maximum frequency L (escnn's basis,
bias on the frequency-0 coefficient, coefficients standardised as the official fork does), ``FourierELU`` with 16
samples, GroupNorm over the fields (groups by the official rule, ``norm_centering`` 'all' as the official code or
'invariant') and, where the stage pools, ``AntialiasedAveragePooling2D(sigma=0.66, stride=2)``. The official code
builds the SO(2) model only with its last stages restricted to the trivial group; there the fields' coefficients
become plain channels (``RestrictBandLimitedToTrivial``) and the stages are the discrete model's over C1 (the
8-tap basis, Mish, max pooling, ``resnet9.last_stages``).

Widths (the official ``fix_params``): ``int(layout * sqrt(1.5) / L**2)`` fields in the first two stages;
``restrict: invariant`` sets the third to ``layout[2]`` fields, for the last SO(2) block and the C1 stages alike.
Parameters (weights, biases, head): L = 1: 242,378 (19 / 39 / 64 fields); L = 2: 250,881 (4 / 9 / 64);
L = 3: 308,444 (2 / 4 / 64), as the official code counts them.

Not equivariant as a whole: the C1 stages are ordinary convolutions. Before them, rotations by multiples of 90
degrees would commute with the layers but for two official choices: the norm's centring over every coefficient
(``norm_centering='all'``) and the pooling's samples on a 32-pixel map (0, 2, ..., 30, off the centre).
"""

import math

import tensorflow as tf

import layers
from eqdp_tf.models import preprocessing
from eqdp_tf.models.names import SO2_NORM_CENTERINGS, SO2_RESTRICTION, restricted_group, variant_options
from eqdp_tf.models.resnet9 import PAPER_LAYOUT, Builder, check_shape, last_stages
from layers.normalization import NORM_GROUP_RULES

_WIDTH_CONSTANT = 1.5
# The official SO(2) model's mask margin (percent of the radius), FourierELU samples and anti-aliasing.
MASK_MARGIN = 1.0
FOURIER_SAMPLES = 16
POOL_SIGMA = 0.66


def so2_stage_fields(layout, frequency):
    """Band-limited fields per stage for maximum frequency L (at least one field)."""
    return max(1, int(layout * math.sqrt(_WIDTH_CONSTANT) / frequency**2))


class _SO2Builder(Builder):
    """``Builder`` (for the C1 stages) plus the SO(2) blocks."""

    def __init__(self, norm_groups, dtype, options, frequency, norm_centering):
        super().__init__(norm_groups, dtype, options)
        self.frequency = frequency
        self.norm_centering = norm_centering

    def so2_block(self, x, fields, name, input_frequency=None, pool=False):
        x = layers.BandLimitedConv2D(fields, 3, frequency=self.frequency, input_frequency=input_frequency,
                                     weight_standardization=self.options["weight_standardization"],
                                     name=f"{name}_conv", dtype=self.dtype)(x)
        x = layers.FourierELU(self.frequency, FOURIER_SAMPLES, name=f"{name}_elu", dtype=self.dtype)(x)
        x = self.so2_norm(x, fields, f"{name}_norm")
        if pool:
            x = layers.AntialiasedAveragePooling2D(POOL_SIGMA, 2, name=f"{name}_pool", dtype=self.dtype)(x)
        return x

    def so2_norm(self, x, fields, name):
        groups = NORM_GROUP_RULES[self.options["norm_rule"]](fields, self.norm_groups)
        return layers.BandLimitedGroupNormalization(groups, self.frequency, self.norm_centering, name=name,
                                                    dtype=self.dtype)(x)

    def so2_residual(self, x, fields, name):
        shortcut = x
        x = self.so2_block(x, fields, f"{name}a")
        x = self.so2_block(x, fields, f"{name}b")
        x = tf.keras.layers.Add(name=f"{name}_add", dtype=self.dtype)([x, shortcut])
        return self.so2_norm(x, fields, f"{name}_norm")


def so2_resnet9(frequency=1, restrict=SO2_RESTRICTION, head="paper", layout=PAPER_LAYOUT, norm_groups=8,
                num_classes=10, image_shape=(32, 32, 3), dtype=None, name=None, variant="official",
                norm_centering="all", mean=preprocessing.CIFAR10_MEAN, std=preprocessing.CIFAR10_STD, **overrides):
    """Builds the Keras functional model (raw pixels in, logits out); arguments as ``resnet9.equivariant_resnet9``
    (``overrides``: its basis, weight_standardization, norm_rule, bias_scale, head_init), plus ``frequency`` (the
    fields' maximum frequency L >= 1) and ``norm_centering`` (module doc). ``restrict`` must be 'C1' and the basis
    steerable: the official code builds nothing else for SO(2)."""
    if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
        raise ValueError(f"frequency (the SO(2) fields' maximum frequency L) must be an int >= 1, got {frequency!r}")
    restricted = restricted_group(restrict)
    if restricted is None or restricted.upper() != SO2_RESTRICTION:
        raise ValueError(f"the SO(2) model restricts its last stages to the trivial group: restrict must be "
                         f"'{SO2_RESTRICTION}', got {restrict!r}")
    if norm_centering not in SO2_NORM_CENTERINGS:
        raise ValueError(f"norm_centering must be one of {SO2_NORM_CENTERINGS}, got {norm_centering!r}")
    check_shape(head, layout, image_shape)
    options = variant_options(variant, **overrides)
    if options["basis"] != "steerable":
        raise ValueError(f"SO(2) fields have only the steerable basis, got basis={options['basis']!r}")
    f1, f2 = so2_stage_fields(layout[0], frequency), so2_stage_fields(layout[1], frequency)
    f3 = int(layout[2])
    build = _SO2Builder(norm_groups, dtype, options, frequency, norm_centering)

    inputs, x = preprocessing.standardized_input(image_shape, mean, std)
    x = layers.DiscMask(MASK_MARGIN, name="mask", dtype=dtype)(x)
    x = build.so2_block(x, f1, "stage1", input_frequency=0)
    x = build.so2_block(x, f2, "stage2", pool=True)
    x = build.so2_residual(x, f2, "res1")
    x = build.so2_block(x, f3, "stage3", pool=True)
    x = layers.RestrictBandLimitedToTrivial(frequency, name="restrict", dtype=dtype)(x)
    logits = last_stages(build, x, f3, layers.get_group(SO2_RESTRICTION), head, image_shape, num_classes)
    return tf.keras.Model(inputs, logits, name=name or f"eq_resnet9_SO2L{frequency}-C1_{head}")
