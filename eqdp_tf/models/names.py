"""The models' names as plain data (no TensorFlow): what ``config`` validates flags against."""

ARCHITECTURES = ("eq_resnet9", "wrn16_4")
# 'paper': 2x2 average pool + linear (as the official code); 'invariant': global average pool + linear.
HEADS = ("paper", "invariant")

# How the Equivariant ResNet-9 is built. 'official': as the official code trains it (its escnn fork):
# convolutions over escnn's band-limited steerable basis (8 coefficients per 3x3 filter and input orientation),
# each layer's coefficient vector weight-standardised (the paper's text does not say so), GroupNorm groups by the
# official rule, the per-field bias spread over a field's orientations as escnn does (scaled by 1/sqrt|G|) and
# torch's default initialisation of the linear head. 'dense': this project's first model: free 9-tap filters,
# no standardisation, one norm group per field where 8 do not divide the fields, Keras' defaults.
VARIANTS = {
    "official": {"basis": "steerable", "weight_standardization": True, "norm_rule": "official",
                 "bias_scale": "escnn", "head_init": "torch"},
    "dense": {"basis": "dense", "weight_standardization": False, "norm_rule": "closest",
              "bias_scale": "none", "head_init": "keras"},
}
CONV_BASES = ("steerable", "dense")
NORM_RULES = ("official", "closest")
BIAS_SCALES = ("escnn", "none")
HEAD_INITS = ("torch", "keras")


def variant_options(variant, **overrides):
    """The build options of ``variant`` with any not-None ``overrides`` (one ingredient switched at a time)."""
    if variant not in VARIANTS:
        raise ValueError(f"model variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    unknown = set(overrides) - set(VARIANTS[variant])
    if unknown:
        raise ValueError(f"unknown model options {sorted(unknown)}")
    return {**VARIANTS[variant], **{k: v for k, v in overrides.items() if v is not None}}


def restricted_group(restrict):
    """The subgroup named by a --restrict value, or None for no restriction (None, '', 'none' in any case)."""
    return None if restrict is None or str(restrict).strip().lower() in ("", "none") else str(restrict)


# The continuous rotation group (the official code's 'group: orthogonal'): band-limited fields of maximum frequency
# --so2_frequency, the last stages restricted to the trivial group C1 (its only restriction that builds).
SO2 = "SO2"
SO2_RESTRICTION = "C1"
# GroupNorm over band-limited fields: 'all' centres every coefficient by one mean (the official code's, not
# equivariant); 'invariant' centres the frequency-0 coefficients only (equivariant). See
# layers.BandLimitedGroupNormalization.
SO2_NORM_CENTERINGS = ("all", "invariant")


def is_so2(group):
    """True for the name of the continuous rotation group ('SO2', any case)."""
    return isinstance(group, str) and group.strip().upper() == SO2
