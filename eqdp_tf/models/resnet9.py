"""The paper's Equivariant ResNet-9 (Hoelzl, Rueckert & Kaissis 2023), built from ``layers``.

    lift conv block -> conv block + 2x2 max pool -> residual(2 conv blocks) -> GroupNorm
    -> conv block + pool -> [restrict G -> H] -> conv block + pool -> residual(2 conv blocks)
    -> GroupNorm -> group max pooling (invariant fields) -> head

A conv block is 3x3 group conv -> Mish -> non-affine equivariant GroupNorm (``norm_groups``
requested; how many are used when they do not divide the field count: ``norm_rule``) -> optional 2x2 max pool.
With the trivial group C1 the same code is the ordinary (non-equivariant) ResNet-9 baseline of the same layout.
The continuous rotation group SO(2) has its own builder (``resnet9_so2``), which shares the last stages.

``variant`` ('official' or 'dense', ``names.VARIANTS``) sets the convolutions' basis and standardisation, the norm
rule, the bias scale and the head's initialisation; each can be switched on its own by its keyword. The official
D4 -> D2 model has 255,675 parameters (150 / 5,005 / 10,829 x 2 / 32,487 / 97,383 / 48,711 x 2 / head 1,570), its
C1 baseline 204,650, C4 200,312; the dense D4 -> D2 287,413.

Width: ``fields = int(layout * sqrt(1.5 * |G|) / |G|)`` per stage, which keeps the parameter
count roughly constant across groups; the last stage uses the restricted group's order (and so
does the conv just before the restriction, as in the official code).
"""

import math

import tensorflow as tf

import layers
from layers.normalization import NORM_GROUP_RULES
from eqdp_tf.models import preprocessing
from eqdp_tf.models.names import HEADS, restricted_group, variant_options

PAPER_LAYOUT = (16, 32, 64)
_WIDTH_CONSTANT = 1.5


def stage_fields(layout, order):
    """Fields per stage for a group of ``order`` elements (at least one field)."""
    return max(1, int(layout * math.sqrt(order * _WIDTH_CONSTANT) / order))


class Builder:
    """Keeps the naming, the convolutions' options and the norm-group rule in one place while the graph is wired."""

    def __init__(self, norm_groups, dtype, options):
        self.norm_groups = norm_groups
        self.dtype = dtype
        self.options = options

    def conv_block(self, x, fields, group, name, lifting=False, pool=False):
        conv_cls = layers.LiftingConv2D if lifting else layers.GroupConv2D
        # escnn adds a field's one bias to its orientations through the regular representation's change of basis,
        # whose trivial column is 1/sqrt|G| everywhere.
        bias_scale = 1.0 / math.sqrt(group.order) if self.options["bias_scale"] == "escnn" else 1.0
        x = conv_cls(fields, 3, group=group, name=f"{name}_conv", dtype=self.dtype, basis=self.options["basis"],
                     weight_standardization=self.options["weight_standardization"], bias_scale=bias_scale)(x)
        x = tf.keras.layers.Activation(tf.keras.activations.mish, name=f"{name}_mish", dtype=self.dtype)(x)
        x = self.norm(x, fields, group, f"{name}_norm")
        if pool:
            x = layers.SpatialPooling2D(2, "max", name=f"{name}_pool", dtype=self.dtype)(x)
        return x

    def norm(self, x, fields, group, name):
        groups = NORM_GROUP_RULES[self.options["norm_rule"]](fields, self.norm_groups)
        return layers.GroupNormalization(groups, group=group, name=name, dtype=self.dtype)(x)

    def residual(self, x, fields, group, name):
        shortcut = x
        x = self.conv_block(x, fields, group, f"{name}a")
        x = self.conv_block(x, fields, group, f"{name}b")
        x = tf.keras.layers.Add(name=f"{name}_add", dtype=self.dtype)([x, shortcut])
        return self.norm(x, fields, group, f"{name}_norm")


def check_image_shape(image_shape, head="paper"):
    """Raises ``ValueError`` (one line naming sizes that work) unless the model is equivariant on images of
    ``image_shape``: they must be square (a 90-degree rotation maps only a square onto itself), and the three 2x2
    max pools, and for the paper head its 2x2 average pool, must tile them exactly (a pool that drops a border row
    pools a rotated image differently). So the side must be a multiple of 16 (paper head) or 8 (invariant head)."""
    height, width = image_shape[:2]
    step = 16 if head == "paper" else 8
    if height == width and height >= step and height % step == 0:
        return
    side = max(height, width)
    below, above = max(step, side // step * step), (side // step + 1) * step
    sizes = f"{below} or {above}" if below != above else str(below)
    raise ValueError(f"the Equivariant ResNet-9 with the {head} head needs square images whose side is a multiple of "
                     f"{step} (e.g. {sizes}; 32, 64 and 160 work), so that its pooling tiles them and it stays "
                     f"equivariant; got {height}x{width}")


def equivariant_resnet9(
    group="D4",
    restrict="D2",
    head="paper",
    layout=PAPER_LAYOUT,
    norm_groups=8,
    num_classes=10,
    image_shape=(32, 32, 3),
    dtype=None,
    name=None,
    mean=preprocessing.CIFAR10_MEAN,
    std=preprocessing.CIFAR10_STD,
    variant="official",
    basis=None,
    weight_standardization=None,
    norm_rule=None,
    bias_scale=None,
    head_init=None,
):
    """Builds the Keras functional model (raw pixels in, logits out).

    ``image_shape``: (side, side, channels), any channel count, the side as ``check_image_shape`` allows;
    ``mean``/``std``: the per-channel normalisation of pixels scaled to [0, 1] (default: CIFAR-10's).
    ``variant``: 'official' (the official code's model) or 'dense' (module doc); ``basis`` ('steerable' or
    'dense'), ``weight_standardization``, ``norm_rule`` ('official' or 'closest'), ``bias_scale`` ('escnn' or
    'none') and ``head_init`` ('torch' or 'keras'), when given, override the variant's choice.

    ``restrict``: None/'none' or the subgroup used from the third stage on (the paper: D4 -> D2).
    ``head``: 'paper' (group pooling, 2x2 average pool, linear: as the official code, equivariant
    up to the head but not invariant) or 'invariant' (group pooling, global average pool, linear:
    exactly invariant for an exact group without restriction).
    """
    g = layers.get_group(group)
    h = g if restricted_group(restrict) is None else layers.get_group(restrict)
    g.subgroup_embedding(h)  # raises ValueError when h is not a subgroup of g
    check_shape(head, layout, image_shape)
    f1, f2 = stage_fields(layout[0], g.order), stage_fields(layout[1], g.order)
    f3 = stage_fields(layout[2], h.order)
    options = variant_options(variant, basis=basis, weight_standardization=weight_standardization,
                              norm_rule=norm_rule, bias_scale=bias_scale, head_init=head_init)
    build = Builder(norm_groups, dtype, options)

    inputs, x = preprocessing.standardized_input(image_shape, mean, std)
    x = build.conv_block(x, f1, g, "stage1", lifting=True)
    x = build.conv_block(x, f2, g, "stage2", pool=True)
    x = build.residual(x, f2, g, "res1")
    x = build.conv_block(x, f3, g, "stage3", pool=True)
    if h != g:
        x = layers.RestrictToSubgroup(g, h, name="restrict", dtype=dtype)(x)
    logits = last_stages(build, x, f3, h, head, image_shape, num_classes)
    restricted = f"-{h.name}" if h != g else ""
    return tf.keras.Model(inputs, logits, name=name or f"eq_resnet9_{g.name}{restricted}_{head}")


def check_shape(head, layout, image_shape):
    """One-line errors for a head, layout or image shape the ResNet-9 cannot be built with."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if len(layout) != 3 or any(int(w) < 1 for w in layout):
        raise ValueError(f"layout must be three positive widths, got {layout!r}")
    check_image_shape(image_shape, head)


def last_stages(build, x, fields, group, head, image_shape, num_classes):
    """The stages after the restriction, over ``group``: conv block + pool, residual, group pooling, head; the
    logits. (Shared by the SO(2) model, whose last stages are over C1.)"""
    dtype = build.dtype
    x = build.conv_block(x, fields, group, "stage4", pool=True)
    x = build.residual(x, fields, group, "res2")
    x = layers.GroupPooling(group, "max", name="group_pool", dtype=dtype)(x)
    if head == "paper":
        x = layers.SpatialPooling2D(image_shape[0] // 16, "mean", name="head_pool", dtype=dtype)(x)
        x = tf.keras.layers.Flatten(name="flatten", dtype=dtype)(x)
    else:
        x = tf.keras.layers.GlobalAveragePooling2D(name="head_pool", dtype=dtype)(x)
    return tf.keras.layers.Dense(num_classes, name="logits", dtype="float32",
                                 **_head_initializers(build.options["head_init"], int(x.shape[-1])))(x)


def _head_initializers(head_init, fan_in):
    """Keras' defaults, or torch's ``nn.Linear`` (weights and bias uniform in +-1/sqrt(fan_in)), as the official."""
    if head_init == "keras":
        return {}
    bound = 1.0 / math.sqrt(fan_in)
    return {"kernel_initializer": tf.keras.initializers.RandomUniform(-bound, bound),
            "bias_initializer": tf.keras.initializers.RandomUniform(-bound, bound)}


# Tensors whose transformation behaviour tests check stage by stage: (layer name, group it lives on).
def stage_outputs(model):
    """Names of the layers ending each stage of an Equivariant ResNet-9, in order."""
    names = ["stage1_norm", "stage2_pool", "res1_norm", "stage3_pool", "restrict", "stage4_pool", "res2_norm"]
    present = {layer.name for layer in model.layers}
    return [n for n in names if n in present]
