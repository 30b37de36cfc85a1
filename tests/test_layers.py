import numpy as np
import pytest
import tensorflow as tf

import layers
from layers import testing

EXACT = ["C1", "C2", "C4", "D1", "D2", "D4"]
rng = np.random.RandomState(0)


def _fn(layer):
    return lambda x: layer(tf.constant(x)).numpy()


def _fields(group, fields, size=9, batch=2, dtype="float64"):
    return rng.randn(batch, size, size, fields * layers.get_group(group).order).astype(dtype)


@pytest.mark.parametrize("group", EXACT)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_lifting_conv_is_equivariant(group, dtype, tol):
    layer = layers.LiftingConv2D(4, 3, group=group, dtype=dtype)
    x = rng.randn(2, 9, 9, 3).astype(dtype)
    errors = testing.check_equivariance(_fn(layer), x, group, None, group, tolerance=tol)
    assert len(errors) == layers.get_group(group).order


@pytest.mark.parametrize("group", EXACT)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("kernel_size,padding", [(3, "same"), (5, "same"), (3, "valid"), (1, "same")])
def test_group_conv_is_equivariant(group, dtype, tol, kernel_size, padding):
    layer = layers.GroupConv2D(3, kernel_size, group=group, padding=padding, dtype=dtype)
    testing.check_equivariance(_fn(layer), _fields(group, 2, dtype=dtype), group, group, group, tolerance=tol)


@pytest.mark.parametrize("group", EXACT)
def test_strided_conv_on_odd_size_is_equivariant(group):
    layer = layers.GroupConv2D(2, 3, group=group, strides=2, dtype="float64")
    testing.check_equivariance(_fn(layer), _fields(group, 2, size=9), group, group, group, tolerance=1e-10)


@pytest.mark.parametrize("group", EXACT)
@pytest.mark.parametrize("reduction", ["max", "mean"])
def test_pooling_layers_are_equivariant(group, reduction):
    x = _fields(group, 3, size=8)
    testing.check_equivariance(_fn(layers.GroupPooling(group, reduction, dtype="float64")), x, group, group, None, tolerance=1e-12)
    spatial = layers.SpatialPooling2D(2, reduction, dtype="float64")
    testing.check_equivariance(_fn(spatial), x, group, group, group, tolerance=1e-12)


@pytest.mark.parametrize("group", EXACT)
@pytest.mark.parametrize("affine", [False, True])
def test_group_norm_is_equivariant(group, affine):
    norm = layers.GroupNormalization(2, group=group, center=affine, scale=affine, dtype="float64")
    norm.build((None, 8, 8, 4 * layers.get_group(group).order))
    if affine:  # random per-field affine: still equivariant since it is shared by orientations
        norm.set_weights([rng.randn(4) + 2, rng.randn(4)])
    x = _fields(group, 4, size=8)
    testing.check_equivariance(_fn(norm), x, group, group, group, tolerance=1e-10)
    out = norm(x).numpy().reshape(2, 8, 8, 2, -1)
    if not affine:  # actually normalised: zero mean, unit variance per example and norm group
        np.testing.assert_allclose(out.mean(axis=(1, 2, 4)), 0, atol=1e-10)
        np.testing.assert_allclose(out.var(axis=(1, 2, 4)), 1, atol=1e-3)


@pytest.mark.parametrize("big,small", [("D4", "D2"), ("D4", "C4"), ("C4", "C2"), ("D4", "C1"), ("D2", "D1")])
def test_restriction_is_equivariant_for_the_subgroup(big, small):
    layer = layers.RestrictToSubgroup(big, small, dtype="float64")
    x = _fields(big, 3)
    members = layers.get_group(big).subgroup_embedding(small)
    testing.check_equivariance(_fn(layer), x, big, big, small, tolerance=0, elements=members)
    # nothing is lost: a pure permutation of channels
    out = layer(x).numpy()
    np.testing.assert_array_equal(np.sort(out, axis=-1), np.sort(x, axis=-1))


@pytest.mark.parametrize("group", EXACT)
def test_full_stack_is_invariant(group):
    g = layers.get_group(group)
    inputs = tf.keras.Input((12, 12, 3), dtype="float64")
    h = layers.LiftingConv2D(4, 3, group=group, dtype="float64")(inputs)
    h = layers.GroupConv2D(4, 3, group=group, dtype="float64")(h)
    h = layers.GroupNormalization(2, group=group, dtype="float64")(h)
    h = tf.keras.layers.Activation("relu", dtype="float64")(h)
    h = layers.SpatialPooling2D(2, dtype="float64")(h)
    h = layers.GroupConv2D(4, 3, group=group, dtype="float64")(h)
    h = layers.GroupPooling(group, dtype="float64")(h)
    h = tf.keras.layers.GlobalAveragePooling2D(dtype="float64")(h)
    outputs = tf.keras.layers.Dense(5, dtype="float64")(h)
    model = tf.keras.Model(inputs, outputs)
    x = rng.randn(2, 12, 12, 3)
    errors = testing.check_equivariance(lambda v: model(v).numpy(), x, g, None, None, tolerance=1e-10)
    assert len(errors) == g.order


def test_c8_is_approximately_equivariant_and_its_c4_is_exact():
    layer = layers.LiftingConv2D(4, 5, group="C8", dtype="float64")
    conv = layers.GroupConv2D(2, 5, group="C8", dtype="float64")
    fn = lambda x: conv(layer(x)).numpy()  # noqa: E731
    yy, xx = np.mgrid[-16:17, -16:17]
    # smooth inputs: sums of broad Gaussian bumps
    x = np.zeros((1, 33, 33, 3))
    for c in range(3):
        for _ in range(4):
            cy, cx = rng.uniform(-8, 8, 2)
            x[0, :, :, c] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0**2))
    disk = (yy**2 + xx**2) <= 10**2
    errors = testing.equivariance_errors(fn, x, "C8", None, "C8", region=disk)
    for e in (0, 2, 4, 6):  # the exact C4 inside C8
        assert errors[e] < 1e-10
    for e in (1, 3, 5, 7):  # 45 degree rotations: interpolation error only (measured ~0.025)
        assert 1e-6 < errors[e] < 0.05
    # controls: a plain CNN (measured ~0.11), and the C8 stack read without permuting orientations
    plain = tf.keras.layers.Conv2D(8, 5, padding="same", dtype="float64")
    plain_err = testing.equivariance_errors(lambda v: plain(v).numpy(), x, "C8", None, None, region=disk)
    assert plain_err[1] > 3 * errors[1]
    unpermuted = testing.equivariance_errors(fn, x, "C8", None, None, region=disk)
    assert unpermuted[1] > 3 * errors[1] and unpermuted[2] > 0.1


def test_stride_two_same_on_even_size_breaks_equivariance_and_is_refused():
    group = "C4"
    layer = layers.GroupConv2D(2, 3, group=group, strides=2, dtype="float64")
    with pytest.raises(ValueError, match="asymmetric grid"):
        layer.build((None, 8, 8, 8))
    # negative control: the same expanded kernel through TF's asymmetric SAME padding is not equivariant
    ok = layers.GroupConv2D(2, 3, group=group, dtype="float64")
    ok.build((None, 8, 8, 8))
    kernel = ok.expanded_kernel()
    trap = lambda v: tf.nn.conv2d(v, kernel, strides=2, padding="SAME").numpy()  # noqa: E731
    errors = testing.equivariance_errors(trap, _fields(group, 2, size=8), group, group, group)
    assert max(errors.values()) > 0.1


def test_per_channel_affine_norm_breaks_equivariance():
    group = "C4"
    x = _fields(group, 4, size=8)
    keras_norm = tf.keras.layers.GroupNormalization(groups=2, dtype="float64")
    keras_norm.build(x.shape)
    keras_norm.set_weights([rng.randn(16) + 2, rng.randn(16)])  # per channel, not per field
    errors = testing.equivariance_errors(_fn(keras_norm), x, group, group, group)
    assert max(errors.values()) > 0.1
    # and norm groups that split a field break it even without affine
    split = tf.keras.layers.GroupNormalization(groups=8, center=False, scale=False, dtype="float64")
    errors = testing.equivariance_errors(_fn(split), x, group, group, group)
    assert max(errors.values()) > 0.01


@pytest.mark.parametrize("group", ["C1", "C4", "D4", "C8"])
def test_parameter_counts(group):
    order = layers.get_group(group).order
    taps = 9 if layers.get_group(group).is_exact else 5  # interpolated groups: the radius-1 disk
    conv = layers.GroupConv2D(5, 3, group=group)
    conv.build((None, 8, 8, 7 * order))
    assert conv.count_params() == taps * order * 7 * 5 + 5
    lift = layers.LiftingConv2D(5, 3, group=group, use_bias=False)
    lift.build((None, 8, 8, 3))
    assert lift.count_params() == taps * 3 * 5
    assert lift.compute_output_shape((None, 8, 8, 3)).as_list() == [None, 8, 8, 5 * order]
    norm = layers.GroupNormalization(1, group=group, center=True, scale=True)
    norm.build((None, 8, 8, 6 * order))
    assert norm.count_params() == 12


def test_expanded_kernel_has_the_stacked_rotations():
    conv = layers.LiftingConv2D(1, 3, group="C4", use_bias=False)
    conv.build((None, 5, 5, 1))
    base = conv.kernel.numpy()[:, :, 0, 0]
    expanded = conv.expanded_kernel().numpy()[:, :, 0, :]
    for r in range(4):
        np.testing.assert_array_equal(expanded[:, :, r], np.rot90(base, r))


LAYER_FACTORIES = [
    (lambda: layers.LiftingConv2D(3, 3, group="D4", use_bias=False), (None, 8, 8, 3)),
    (lambda: layers.GroupConv2D(3, 5, group="C8", padding="valid"), (None, 8, 8, 16)),
    (lambda: layers.GroupPooling("C4", "mean"), (None, 8, 8, 8)),
    (lambda: layers.SpatialPooling2D(2, "mean"), (None, 8, 8, 8)),
    (lambda: layers.GroupNormalization(2, group="D2", center=True), (None, 8, 8, 16)),
    (lambda: layers.RestrictToSubgroup("D4", "D2"), (None, 8, 8, 16)),
    (lambda: layers.BandLimitedConv2D(2, 3, frequency=2, input_frequency=1, weight_standardization=True),
     (None, 8, 8, 6)),
    (lambda: layers.FourierELU(2, samples=12), (None, 8, 8, 10)),
    (lambda: layers.BandLimitedGroupNormalization(2, 1, "invariant"), (None, 8, 8, 12)),
    (lambda: layers.AntialiasedAveragePooling2D(0.5, 2), (None, 8, 8, 3)),
    (lambda: layers.DiscMask(5.0), (None, 8, 8, 3)),
    (lambda: layers.RestrictBandLimitedToTrivial(1), (None, 8, 8, 6)),
]


@pytest.mark.parametrize("factory,shape", LAYER_FACTORIES)
def test_get_config_round_trip(factory, shape):
    layer = factory()
    layer.build(shape)
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config
    clone.build(shape)
    clone.set_weights(layer.get_weights())
    x = rng.randn(2, *shape[1:]).astype("float32")
    np.testing.assert_allclose(clone(x).numpy(), layer(x).numpy(), rtol=1e-6)
    # serialisable through Keras' registry by name
    revived = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert type(revived) is type(layer)


def _small_model(group="D4", subgroup="D2"):
    inputs = tf.keras.Input((8, 8, 3))
    h = layers.LiftingConv2D(2, 3, group=group)(inputs)
    h = layers.GroupNormalization(2, group=group)(h)
    h = layers.GroupConv2D(2, 3, group=group)(h)
    h = layers.SpatialPooling2D(2)(h)
    h = layers.RestrictToSubgroup(group, subgroup)(h)
    h = layers.GroupConv2D(2, 3, group=subgroup)(h)
    h = layers.GroupPooling(subgroup)(h)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(4)(h))


def test_model_save_and_reload(tmp_path):
    model = _small_model()
    x = rng.randn(3, 8, 8, 3).astype("float32")
    expected = model(x).numpy()
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = tf.keras.models.load_model(path)
    np.testing.assert_allclose(reloaded(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    saved = str(tmp_path / "saved")
    tf.saved_model.save(model, saved)
    plain = tf.saved_model.load(saved)
    np.testing.assert_allclose(plain(tf.constant(x)).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group,subgroup", [("C4", "C2"), ("D4", "D2")])
def test_freeze_gives_identical_outputs_with_plain_convs(group, subgroup):
    model = _small_model(group, subgroup)
    frozen = layers.freeze(model)
    kinds = {type(layer).__name__ for layer in frozen.layers}
    assert "Conv2D" in kinds and not kinds & {"LiftingConv2D", "GroupConv2D"}
    x = rng.randn(3, 8, 8, 3).astype("float32")
    np.testing.assert_allclose(frozen(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_freeze_so2_model_gives_identical_outputs_with_plain_convs():
    inputs = tf.keras.Input((9, 9, 3))
    h = layers.DiscMask(1.0)(inputs)
    h = layers.BandLimitedConv2D(2, 3, frequency=2, input_frequency=0, weight_standardization=True)(h)
    h = layers.FourierELU(2)(h)
    h = layers.BandLimitedGroupNormalization(1, 2)(h)
    h = layers.AntialiasedAveragePooling2D()(h)
    h = layers.RestrictBandLimitedToTrivial(2)(h)
    model = tf.keras.Model(inputs, layers.GroupConv2D(1, 3, group="C1", basis="steerable")(h))
    frozen = layers.freeze(model)
    kinds = {type(layer).__name__ for layer in frozen.layers}
    assert "Conv2D" in kinds and not kinds & {"BandLimitedConv2D", "GroupConv2D"}
    x = rng.randn(2, 9, 9, 3).astype("float32")
    np.testing.assert_allclose(frozen(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_freeze_c8_and_strided():
    inputs = tf.keras.Input((9, 9, 2))
    h = layers.LiftingConv2D(2, 3, group="C8", strides=2)(inputs)
    model = tf.keras.Model(inputs, layers.GroupConv2D(1, 3, group="C8")(h))
    x = rng.randn(2, 9, 9, 2).astype("float32")
    np.testing.assert_allclose(layers.freeze(model)(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: layers.GroupConv2D(0, 3), "filters"),
        (lambda: layers.GroupConv2D(2.5, 3), "filters"),
        (lambda: layers.GroupConv2D(2, 4), "odd"),
        (lambda: layers.GroupConv2D(2, (3, 5)), "square"),
        (lambda: layers.GroupConv2D(2, 3, group="Q4"), "unknown group"),
        (lambda: layers.GroupConv2D(2, 3, group="C0"), "N must be >= 1"),
        (lambda: layers.GroupConv2D(2, 3, padding="causal"), "padding"),
        (lambda: layers.GroupConv2D(2, 3, strides=0), "strides"),
        (lambda: layers.GroupPooling("C4", "median"), "reduction"),
        (lambda: layers.SpatialPooling2D(0), "pool_size"),
        (lambda: layers.GroupNormalization(0), "groups"),
        (lambda: layers.RestrictToSubgroup("C4", "D2"), "not a subgroup"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "layer,shape,match",
    [
        (layers.GroupConv2D(2, 3, group="C4"), (None, 8, 8, 6), "not a multiple"),
        (layers.GroupPooling("D4"), (None, 8, 8, 12), "not a multiple"),
        (layers.GroupNormalization(3, group="C4"), (None, 8, 8, 16), "does not divide"),
        (layers.SpatialPooling2D(2), (None, 7, 7, 4), "not a multiple of pool_size"),
        (layers.GroupConv2D(2, 3, group="C4", strides=2), (None, None, None, 8), "known spatial size"),
    ],
)
def test_bad_input_shapes_raise(layer, shape, match):
    with pytest.raises(ValueError, match=match):
        layer.build(shape)


def test_closest_divisor():
    assert layers.closest_divisor(12, 8) == 6
    assert layers.closest_divisor(16, 8) == 8
    assert layers.closest_divisor(10, 8) == 10
    assert layers.closest_divisor(9, 8) == 9
    assert layers.closest_divisor(7, 8) == 7
    assert layers.closest_divisor(15, 4) == 3  # tie between 3 and 5 goes to the smaller


def test_group_conv_works_inside_vectorized_map():
    conv = layers.GroupConv2D(2, 3, group="D4")
    x = tf.constant(rng.randn(4, 6, 6, 16).astype("float32"))
    conv.build(x.shape)

    def per_example(xi):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(conv(xi[None]) ** 2)
        return tape.gradient(loss, conv.kernel)

    grads = tf.function(lambda v: tf.vectorized_map(per_example, v))(x)
    looped = tf.stack([per_example(x[i]) for i in range(4)])
    np.testing.assert_allclose(grads.numpy(), looped.numpy(), rtol=1e-4, atol=1e-4)
