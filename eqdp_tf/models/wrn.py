"""WRN-16-4 with GroupNorm: the classic non-equivariant DP baseline of De et al. (2022).

Pre-activation wide ResNet (Zagoruyko & Komodakis) with BatchNorm replaced by GroupNorm (16
groups), which has no cross-example statistics and so suits per-example DP-SGD. With
``weight_standardization`` (De et al.'s setting, the default) every convolution is a scaled
weight-standardised one with a gain and a bias per filter (``layers.StandardizedConv2D``); without, plain
convolutions without bias.
"""

import functools

import tensorflow as tf

from eqdp_tf.models import preprocessing
from layers.standardized_conv import StandardizedConv2D


def _conv_factory(weight_standardization):
    if weight_standardization:
        return StandardizedConv2D
    return functools.partial(tf.keras.layers.Conv2D, use_bias=False)


def _norm_act(x, name, groups):
    x = tf.keras.layers.GroupNormalization(groups=groups, name=f"{name}_gn")(x)
    return tf.keras.layers.Activation("relu", name=f"{name}_relu")(x)


def _block(x, width, stride, name, groups, conv):
    shortcut = x
    out = _norm_act(x, f"{name}_pre", groups)
    if stride != 1 or x.shape[-1] != width:
        shortcut = conv(width, 1, strides=stride, name=f"{name}_proj")(out)
    out = conv(width, 3, strides=stride, padding="same", name=f"{name}_conv1")(out)
    out = _norm_act(out, f"{name}_mid", groups)
    out = conv(width, 3, padding="same", name=f"{name}_conv2")(out)
    return tf.keras.layers.Add(name=f"{name}_add")([out, shortcut])


def wide_resnet(depth=16, width=4, num_classes=10, norm_groups=16, image_shape=(32, 32, 3), name=None,
                weight_standardization=True, mean=preprocessing.CIFAR10_MEAN, std=preprocessing.CIFAR10_STD):
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4 (10, 16, 22, 28, 40, ...), got {depth}")
    if width < 1:
        raise ValueError(f"WRN width must be >= 1, got {width}")
    blocks = (depth - 4) // 6
    conv = _conv_factory(weight_standardization)
    inputs, x = preprocessing.standardized_input(image_shape, mean, std)
    x = conv(16, 3, padding="same", name="stem")(x)
    for stage, (channels, stride) in enumerate(((16 * width, 1), (32 * width, 2), (64 * width, 2)), start=1):
        for b in range(blocks):
            x = _block(x, channels, stride if b == 0 else 1, f"s{stage}b{b}", norm_groups, conv)
    x = _norm_act(x, "final", norm_groups)
    x = tf.keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    logits = tf.keras.layers.Dense(num_classes, name="logits")(x)
    return tf.keras.Model(inputs, logits, name=name or f"wrn{depth}_{width}")
