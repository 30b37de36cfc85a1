import math

import numpy as np
import pytest
import tensorflow as tf

import layers
from eqdp_tf import models
from eqdp_tf.models import resnet9
from layers import testing

rng = np.random.RandomState(0)


def _pixels(batch=2):
    """Raw pixel values in [0, 255], as the models take them."""
    return rng.uniform(0.0, 255.0, size=(batch, 32, 32, 3)).astype("float32")


def _n_weights(model):
    return sum(int(np.prod(w.shape)) for w in model.weights)


# --------------------------------------------------------------------------------------------
# Parameter counts


def _resnet9_formula(group, restrict, head, layout=(16, 32, 64), classes=10, taps=9):
    """Parameter count of the Equivariant ResNet-9 worked out from its layout, independently of the code.

    Lifting conv from c image channels: taps * c * f + f; group conv f_in -> f_out fields over G:
    taps * |G| * f_in * f_out + f_out (one bias per field). GroupNorm is non-affine (no weights). taps: 9 for
    dense 3x3 filters, 8 for the official steerable basis (per input orientation).
    """
    g = layers.get_group(group).order
    h = g if restrict is None else layers.get_group(restrict).order
    f1 = int(layout[0] * math.sqrt(1.5 * g) / g)
    f2 = int(layout[1] * math.sqrt(1.5 * g) / g)
    f3 = int(layout[2] * math.sqrt(1.5 * h) / h)

    def conv(order, f_in, f_out):
        return taps * order * f_in * f_out + f_out

    total = taps * 3 * f1 + f1                    # stage1 (lifting)
    total += conv(g, f1, f2)                      # stage2
    total += 2 * conv(g, f2, f2)                  # res1
    total += conv(g, f2, f3)                      # stage3
    total += conv(h, f3 * g // h, f3)             # stage4: restriction turns f3 G-fields into f3*[G:H] H-fields
    total += 2 * conv(h, f3, f3)                  # res2
    features = f3 * (4 if head == "paper" else 1)  # paper head: 2x2 spatial cells after group pooling
    return total + features * classes + classes


def _wrn_formula(depth=16, width=4, classes=10, weight_standardization=False):
    """WRN-d-k with affine GroupNorm (gamma, beta per channel); convs without bias, or weight-standardised ones with
    a gain and a bias per filter."""
    per_filter = 2 if weight_standardization else 0
    blocks = (depth - 4) // 6
    total, c_in = 9 * 3 * 16 + per_filter * 16, 16
    for c in (16 * width, 32 * width, 64 * width):
        for b in range(blocks):
            total += 2 * c_in + 9 * c_in * c + 2 * c + 9 * c * c + 2 * per_filter * c
            if b == 0 and c_in != c:
                total += c_in * c + per_filter * c  # 1x1 projection shortcut
            c_in = c
    return total + 2 * c_in + c_in * classes + classes


@pytest.mark.parametrize(
    "variant, group, restrict, head, expected",
    [
        # The official code's counts (issue 38, as it builds them with fix_params): the paper's model, its ordinary
        # CNN (C1) and C4.
        ("official", "D4", "D2", "paper", 255_675),
        ("official", "C1", None, "paper", 204_650),
        ("official", "C4", None, "paper", 200_312),
        ("dense", "D4", "D2", "paper", 287_413),      # the dense variant of the paper's model
        ("dense", "D4", None, "invariant", 213_283),
        ("dense", "D4", None, "paper", 214_093),
        ("dense", "C1", None, "paper", 229_784),      # ordinary ResNet-9 baseline
        ("dense", "C4", None, "paper", 225_127),
        ("dense", "C4", "C2", "paper", 290_307),
    ],
)
def test_resnet9_parameter_count(variant, group, restrict, head, expected):
    model = models.build_model("eq_resnet9", group=group, restrict=restrict, head=head, variant=variant)
    assert model.count_params() == expected
    assert _n_weights(model) == expected
    assert _resnet9_formula(group, restrict, head, taps=8 if variant == "official" else 9) == expected
    assert not model.non_trainable_weights  # GroupNorm without batch statistics: nothing non-trainable


def test_official_model_layers_are_the_official_codes():
    """Per-layer counts, GroupNorm groups and bias scales of the official D4 -> D2 model (issue 38)."""
    model = models.build_model("eq_resnet9", group="D4", restrict="D2")  # 'official' is the default
    counts = [layer.count_params() for layer in model.layers if layer.count_params()]
    assert counts == [150, 5005, 10829, 10829, 32487, 97383, 48711, 48711, 1570]
    norm_groups = {layer.name: layer.groups for layer in model.layers if isinstance(layer, layers.GroupNormalization)}
    # 6 and 13 fields: one group (the official rule); 39 fields: 3.
    assert norm_groups == {"stage1_norm": 1, "stage2_norm": 1, "res1a_norm": 1, "res1b_norm": 1, "res1_norm": 1,
                           "stage3_norm": 3, "stage4_norm": 3, "res2a_norm": 3, "res2b_norm": 3, "res2_norm": 3}
    convs = [layer for layer in model.layers if isinstance(layer, (layers.LiftingConv2D, layers.GroupConv2D))]
    assert all(c.basis == "steerable" and c.weight_standardization for c in convs)
    assert {c.name: c.bias_scale for c in convs if c.name in ("stage3_conv", "stage4_conv")} == pytest.approx(
        {"stage3_conv": 1 / math.sqrt(8), "stage4_conv": 0.5})
    bound = 1 / math.sqrt(39 * 4)  # torch's nn.Linear initialisation of the head
    kernel, bias = model.get_layer("logits").get_weights()
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound and np.abs(kernel).max() > 0.9 * bound


def test_each_official_ingredient_switches_back_on_its_own():
    dense_basis = models.build_model("eq_resnet9", group="D4", restrict="D2", basis="dense")
    assert dense_basis.count_params() == 287_413
    assert dense_basis.get_layer("stage2_conv").weight_standardization  # the rest stays official
    plain = models.build_model("eq_resnet9", group="D4", restrict="D2", weight_standardization=False)
    assert plain.count_params() == 255_675 and not plain.get_layer("stage2_conv").weight_standardization
    per_field = models.build_model("eq_resnet9", group="D4", restrict="D2", norm_rule="closest")
    assert per_field.get_layer("stage1_norm").groups == 6 and per_field.get_layer("res1_norm").groups == 13
    assert per_field.get_layer("stage2_conv").basis == "steerable"
    with pytest.raises(ValueError, match="variant"):
        models.build_model("eq_resnet9", variant="escnn")


def test_wrn16_4_parameter_count():
    plain = models.build_model("wrn16_4", weight_standardization=False)
    assert plain.count_params() == _wrn_formula(16, 4) == 2_748_890
    standardised = models.build_model("wrn16_4")  # De et al.'s weight standardisation, the default
    assert standardised.count_params() == _wrn_formula(16, 4, weight_standardization=True) == 2_753_402


def test_group_conv_weights_match_hand_formula():
    # stage2 of the dense D4 model: 6 -> 13 fields over D4, 9 * 8 * 6 * 13 + 13 weights.
    model = models.build_model("eq_resnet9", group="D4", restrict="D2", variant="dense")
    assert model.get_layer("stage2_conv").count_params() == 9 * 8 * 6 * 13 + 13 == 5629
    assert model.get_layer("stage1_conv").count_params() == 9 * 3 * 6 + 6
    # after the restriction: 39 D4 fields = 78 D2 fields in, 39 D2 fields out
    assert model.get_layer("stage4_conv").count_params() == 9 * 4 * 78 * 39 + 39
    assert model.get_layer("logits").count_params() == 39 * 4 * 10 + 10


@pytest.mark.parametrize(
    "group, restrict, fields",
    [("D4", "D2", (6, 13, 39)), ("D4", None, (6, 13, 27)), ("C4", None, (9, 19, 39)), ("C1", None, (19, 39, 78))],
)
def test_widths_follow_sqrt_rule(group, restrict, fields):
    g = layers.get_group(group)
    h = g if restrict is None else layers.get_group(restrict)
    rule = (
        int(16 * math.sqrt(1.5 * g.order) / g.order),
        int(32 * math.sqrt(1.5 * g.order) / g.order),
        int(64 * math.sqrt(1.5 * h.order) / h.order),
    )
    assert rule == fields
    assert resnet9.stage_fields(16, g.order) == fields[0]
    model = models.build_model("eq_resnet9", group=group, restrict=restrict)
    channels = {name: model.get_layer(name).output_shape[-1] for name in ("stage1_conv", "stage2_conv", "res1b_conv",
                                                                          "stage3_conv", "stage4_conv", "res2b_conv")}
    assert channels == {
        "stage1_conv": fields[0] * g.order,
        "stage2_conv": fields[1] * g.order,
        "res1b_conv": fields[1] * g.order,
        "stage3_conv": fields[2] * g.order,
        "stage4_conv": fields[2] * h.order,
        "res2b_conv": fields[2] * h.order,
    }


# --------------------------------------------------------------------------------------------
# Equivariance of the internal feature maps and of the logits


class _Cached:
    """Multi-output model evaluated once per distinct input; ``fn(i)`` returns output ``i``."""

    def __init__(self, model):
        self.model = model
        self.cache = {}

    def __call__(self, x):
        key = x.tobytes()
        if key not in self.cache:
            outputs = self.model(tf.constant(x), training=False)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            self.cache[key] = [np.asarray(o) for o in outputs]
        return self.cache[key]

    def fn(self, i):
        return lambda x: self(x)[i]


@pytest.fixture(scope="module")
def paper_stages():
    model = models.build_model("eq_resnet9", group="D4", restrict="D2", head="paper", dtype="float32")
    names = models.stage_outputs(model)
    sub = tf.keras.Model(model.input, [model.get_layer(name).output for name in names])
    return names, _Cached(sub), _pixels()


def test_stage_outputs_names_the_paper_stages(paper_stages):
    names, _, _ = paper_stages
    assert names == ["stage1_norm", "stage2_pool", "res1_norm", "stage3_pool", "restrict", "stage4_pool", "res2_norm"]


def test_paper_model_stages_are_equivariant(paper_stages):
    names, run, x = paper_stages
    d4 = layers.get_group("D4")
    d2_elements = [int(e) for e in d4.subgroup_embedding("D2")]
    assert d2_elements == [0, 2, 4, 6]  # identity, 180 degrees, and two mirrors
    restricted = False
    measured = {}
    for i, name in enumerate(names):
        restricted = restricted or name == "restrict"
        fields, elements = ("D2", d2_elements) if restricted else ("D4", list(range(d4.order)))
        errors = testing.check_equivariance(run.fn(i), x, "D4", None, fields, tolerance=1e-4, elements=elements)
        assert sorted(errors) == elements
        measured[name] = max(errors.values())
    assert set(measured) == set(names)


def test_paper_model_stages_are_not_invariant(paper_stages):
    """Negative control: ignoring the orientation permutation (plain-image transform) must fail."""
    names, run, x = paper_stages
    d2_elements = [int(e) for e in layers.get_group("D4").subgroup_embedding("D2")]
    for i, name in enumerate(names):
        errors = testing.equivariance_errors(run.fn(i), x, "D4", None, None, elements=d2_elements)
        assert max(errors.values()) > 1e-2, name


def test_restricted_stage_is_not_d4_equivariant(paper_stages):
    """After the restriction the fields are over D2: a 90-degree rotation has no meaning there."""
    names, run, x = paper_stages
    with pytest.raises(ValueError, match="not in D2"):
        testing.equivariance_errors(run.fn(names.index("stage4_pool")), x, "D4", None, "D2", elements=[1])


def test_invariant_head_logits_are_d4_invariant():
    model = models.build_model("eq_resnet9", group="D4", restrict=None, head="invariant", dtype="float32")
    x = _pixels()
    logits = _Cached(model).fn(0)
    errors = testing.check_equivariance(logits, x, "D4", None, None, tolerance=1e-4)
    assert sorted(errors) == list(range(8))
    out = logits(x)
    assert out.shape == (2, 10)
    assert np.max(np.abs(out[0] - out[1])) > 1e-3  # distinct images give distinct logits: the check is not vacuous


def test_paper_head_logits_are_not_invariant():
    model = models.build_model("eq_resnet9", group="D4", restrict=None, head="paper", dtype="float32")
    errors = testing.equivariance_errors(_Cached(model).fn(0), _pixels(), "D4")
    assert errors[0] == 0.0
    assert max(errors[e] for e in range(1, 8)) > 1e-3


def test_c1_baseline_logits_are_not_invariant():
    model = models.build_model("eq_resnet9", group="C1", restrict=None, head="invariant")
    errors = testing.equivariance_errors(_Cached(model).fn(0), _pixels(), "D4")
    assert max(errors.values()) > 1e-3


# --------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(group="C4", restrict="D2"), "not a subgroup"),
        (dict(group="D4", restrict="C8"), "not a subgroup"),
        (dict(group="D4", restrict="D3"), "not a subgroup"),
        (dict(group="Q4", restrict=None), "Q4"),
        (dict(head="linear"), "head"),
        (dict(architecture="resnet50"), "unknown architecture"),
        (dict(layout=(16, 32)), "layout"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.build_model(**kwargs)


def test_bad_wrn_arguments_raise_value_error():
    with pytest.raises(ValueError, match="6n"):
        models.wide_resnet(depth=15)
    with pytest.raises(ValueError, match="width"):
        models.wide_resnet(depth=16, width=0)


# --------------------------------------------------------------------------------------------
# Other image sizes and channel counts (the datasets beyond CIFAR-10)


@pytest.mark.parametrize("side", [64, 160])  # Tiny-ImageNet's and ImageNette's sizes in the official code
def test_paper_model_is_equivariant_at_64_and_160_pixels(side):
    # float64: the official model's single GroupNorm group spans every field of a 160-pixel map, and float32 sums
    # over ~1.2M values in rotated order differ by ~5e-4 relative (rounding, not a broken symmetry).
    model = resnet9.equivariant_resnet9(group="D4", restrict="D2", head="paper", image_shape=(side, side, 3),
                                        dtype="float64")
    names = models.stage_outputs(model) + ["head_pool"]
    run = _Cached(tf.keras.Model(model.input, [model.get_layer(name).output for name in names]))
    x = rng.uniform(0.0, 255.0, size=(1, side, side, 3)).astype("float64")
    d4 = layers.get_group("D4")
    d2 = [int(e) for e in d4.subgroup_embedding("D2")]
    # The paper head's 2x2 average pool still ends on a 2x2 map: the pooling tiles the larger images exactly.
    assert model.get_layer("head_pool").output_shape[1:3] == (2, 2)
    for i, name in enumerate(names):
        restricted = names.index("restrict") <= i
        if name == "head_pool":  # invariant fields on a 2x2 grid: only the pixels move
            fields, elements = None, d2
        else:
            fields, elements = ("D2", d2) if restricted else ("D4", list(range(d4.order)))
        errors = testing.check_equivariance(run.fn(i), x, "D4", None, fields, tolerance=1e-4, elements=elements)
        assert sorted(errors) == elements, name


@pytest.mark.parametrize("shape, head, fragments", [
    ((40, 40, 3), "paper", ["multiple of 16", "e.g. 32 or 48", "got 40x40"]),
    ((28, 28, 1), "paper", ["multiple of 16", "e.g. 16 or 32", "got 28x28"]),
    ((64, 48, 3), "paper", ["square images", "got 64x48"]),
    ((28, 28, 1), "invariant", ["invariant head", "multiple of 8", "e.g. 24 or 32"]),
])
def test_sizes_that_would_break_equivariance_are_refused_naming_sizes_that_work(shape, head, fragments):
    with pytest.raises(ValueError) as caught:
        models.build_model("eq_resnet9", group="C4", restrict=None, head=head, image_shape=shape)
    message = str(caught.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    models.check_image_shape("wrn16_4", head, shape)  # the WRN pools globally: it takes any size


def test_models_take_any_channel_count_and_their_datasets_normalisation():
    model = models.build_model("eq_resnet9", group="C4", restrict=None, head="invariant", image_shape=(40, 40, 1),
                               num_classes=7, mean=(0.3,), std=(0.2,))
    f1 = resnet9.stage_fields(16, 4)
    assert model.get_layer("stage1_conv").count_params() == 8 * 1 * f1 + f1  # official: 8 coefficients per channel
    assert model.output_shape == (None, 7)
    standardize = tf.keras.Model(model.input, model.get_layer("standardize").output)
    np.testing.assert_allclose(standardize(np.full((1, 40, 40, 1), 255 * 0.5, np.float32)).numpy(), 1.0, rtol=1e-5)
    wrn = models.build_model("wrn16_4", image_shape=(20, 20, 5), num_classes=3, mean=(0.5,) * 5, std=(0.25,) * 5)
    assert wrn.output_shape == (None, 3) and wrn.get_layer("stem").input_shape[-1] == 5
