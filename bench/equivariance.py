"""Measured equivariance error of every layer, per group: prints a Markdown table.

    python bench/equivariance.py            # float32 and float64, random inputs, small shapes (~1 min)

Error = max over group elements of max|f(g.x) - g.f(x)| / max|g.f(x)| (``layers.testing``). Exact groups
(N in 1, 2, 4) use random inputs over the whole grid; C8/D8, whose 45-degree filter rotations are
interpolated, use smooth inputs (broad Gaussian bumps) measured on the central disk, next to an
ordinary (non-equivariant) conv of the same shape as a reference, and their exact C4/D4 part
separately. GroupNormalization acts pointwise, so its C8/D8 row is the error of rotating the test
input itself by interpolation: the floor under which no layer can be measured.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import layers  # noqa: E402
from layers import testing  # noqa: E402

EXACT = ["C1", "C2", "C4", "D1", "D2", "D4"]
APPROXIMATE = ["C8", "D8"]
SIZE = 9
SMOOTH_SIZE, DISK_RADIUS = 29, 10  # the 45-degree rotation of the test input itself is interpolated too


def _fn(layer):
    return lambda x: layer(tf.constant(x)).numpy()


def _smooth(rng, batch, size, channels):
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    out = np.zeros((batch, size, size, channels))
    for b in range(batch):
        for c in range(channels):
            for _ in range(4):
                cy, cx = rng.uniform(-size / 4, size / 4, 2)
                out[b, :, :, c] += rng.randn() * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 5) ** 2))
    return out


def _inputs(rng, group, dtype, smooth):
    order = layers.get_group(group).order
    make = (lambda c: _smooth(rng, 2, SMOOTH_SIZE, c)) if smooth else (lambda c: rng.randn(2, SIZE, SIZE, c))
    return make(3).astype(dtype), make(2 * order).astype(dtype)


def _errors(group, dtype, smooth, elements=None, region=None):
    rng = np.random.RandomState(0)
    image, fields = _inputs(rng, group, dtype, smooth)
    kwargs = dict(elements=elements, region=region)
    lift = layers.LiftingConv2D(2, 3, group=group, dtype=dtype)
    conv = layers.GroupConv2D(3, 3, group=group, dtype=dtype)
    norm = layers.GroupNormalization(2, group=group, dtype=dtype)
    gpool = layers.GroupPooling(group, "max", dtype=dtype)

    def stack(x):
        return gpool(conv(norm(lift(tf.constant(x))))).numpy()

    rows = {
        "LiftingConv2D": testing.equivariance_errors(_fn(lift), image, group, None, group, **kwargs),
        "GroupConv2D": testing.equivariance_errors(_fn(conv), fields, group, group, group, **kwargs),
        "GroupNormalization": testing.equivariance_errors(_fn(norm), fields, group, group, group, **kwargs),
        "lift→norm→conv→GroupPooling": testing.equivariance_errors(stack, image, group, None, None, **kwargs),
    }
    return {name: max(errs.values()) for name, errs in rows.items()}


def main():
    centred = (np.arange(SMOOTH_SIZE) - (SMOOTH_SIZE - 1) / 2) ** 2
    disk = np.add.outer(centred, centred) <= DISK_RADIUS ** 2
    print("| group | layer | float32 | float64 |")
    print("|---|---|---|---|")
    for group in EXACT:
        e32, e64 = _errors(group, "float32", False), _errors(group, "float64", False)
        for name in e32:
            print(f"| {group} | {name} | {e32[name]:.1e} | {e64[name]:.1e} |")
    for group in APPROXIMATE:
        g = layers.get_group(group)
        exact_part = [e for e in range(g.order) if e % 2 == 0]  # rotations by multiples of 90 degrees (and flips)
        all32 = _errors(group, "float32", True, region=disk)
        exact32 = _errors(group, "float32", True, elements=exact_part, region=disk)
        for name in all32:
            print(f"| {group} (smooth input, disk) | {name} | {all32[name]:.1e} (90° part: {exact32[name]:.1e}) | |")
    rng = np.random.RandomState(0)
    plain = tf.keras.layers.Conv2D(3, 3, padding="same", dtype="float32")
    image = _smooth(rng, 2, SMOOTH_SIZE, 3).astype("float32")
    ref = testing.equivariance_errors(lambda x: plain(tf.constant(x)).numpy(), image, "C8", None, None, region=disk)
    print(f"| reference: plain Conv2D under C8 (smooth input, disk) | Conv2D | {max(ref.values()):.1e} | |")


if __name__ == "__main__":
    main()
