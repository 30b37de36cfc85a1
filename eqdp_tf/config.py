"""Training configuration: absl flags in, one validated dataclass out.

Defaults are the paper's CIFAR-10 setting (D4 -> D2 Equivariant ResNet-9, batch 8192, 2160 steps,
K = 4 views, SGD lr 2 without momentum, clip 2, delta 1e-5, target epsilon 8, EMA 0.999).
"""

import dataclasses
import json
import math
import re
import sys
from typing import List, Optional

from absl import flags

from layers import groups as groups_lib
from eqdp_tf.checks import finite_number, whole_number
from eqdp_tf.datasets.spec import parse_spec
from eqdp_tf.errors import ConfigError, one_line
from eqdp_tf.models import ARCHITECTURES, HEADS
from eqdp_tf.models.names import (CONV_BASES, NORM_RULES, SO2_NORM_CENTERINGS, SO2_RESTRICTION, VARIANTS, is_so2,
                                   restricted_group)

SAMPLINGS = ("poisson", "shuffle")
VIEW_REDUCTIONS = ("sum", "mean")
JIT_CHOICES = ("auto", "true", "false")
# none: one device; mirrored: every GPU of this host; multi_worker: every GPU of every host in TF_CONFIG.
DISTRIBUTIONS = ("none", "mirrored", "multi_worker")


@dataclasses.dataclass
class TrainConfig:
    # model
    architecture: str = "eq_resnet9"
    group: str = "D4"
    restrict: str = "D2"
    head: str = "paper"
    # Equivariant ResNet-9 only: 'official' (the official code's model: steerable basis, weight-standardised
    # coefficients, its GroupNorm rule) or 'dense' (this project's first model). The three ingredients below, when
    # None, are the variant's; set, each overrides it on its own (config.json holds the resolved values).
    model_variant: str = "official"
    conv_basis: Optional[str] = None
    conv_weight_standardization: Optional[bool] = None
    norm_group_rule: Optional[str] = None
    # --group=SO2 only (the official code's 'orthogonal' model, models.resnet9_so2): the fields' maximum frequency L
    # and the GroupNorm centring over them ('all': the official code's; 'invariant': equivariant).
    so2_frequency: int = 1
    so2_norm_centering: str = "all"
    # WRN only: De et al.'s scaled weight standardisation in every convolution (layers.StandardizedConv2D).
    wrn_weight_standardization: bool = True
    # optimisation
    steps: int = 2160
    batch_size: int = 8192
    physical_batch_size: int = 128
    num_views: int = 4
    view_reduction: str = "sum"
    learning_rate: float = 2.0
    momentum: float = 0.0
    ema_decay: float = 0.999
    # EMA updates per logical step (training.ema): the official run makes ~16 (one per physical batch of 512).
    ema_updates_per_step: int = 1
    # privacy
    dp: bool = True
    l2_norm_clip: float = 2.0
    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = 8.0
    # The epsilon no step may push the run past; None: --target_epsilon is the ceiling (with a TAN simulation both
    # speak of the simulated run's epsilon).
    max_epsilon: Optional[float] = None
    delta: float = 1e-5
    sampling: str = "poisson"
    # TAN simulation (eqdp_tf.privacy.simulation): sigma is that of a run at this batch size, scaled by
    # batch_size / simulated_batch_size. Predicts that run's accuracy; the privacy is this run's own.
    simulated_batch_size: Optional[int] = None
    # Seed of the Poisson sampling and the DP noise. None: a secret key drawn from the OS on the first start and
    # kept in the run folder (the guarantee assumes nobody can predict the batches or the noise).
    dp_seed: Optional[int] = None
    allow_privacy_change: bool = False
    # data
    data_dir: Optional[str] = None
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    # dataset (eqdp_tf.datasets): which images, and how they are prepared
    dataset: str = "cifar10"  # cifar10, cifar100, tiny_imagenet, imagenette, tfds:NAME[/CONFIG], folder:PATH, npz:PATH
    train_split: Optional[str] = None  # tfds: only (None: 'train')
    test_split: Optional[str] = None  # tfds: only (None: 'test', else 'validation')
    test_fraction: float = 0.1  # folder: without train/ and test/: the share of the images held out for testing
    split_seed: int = 0  # ... drawn with this seed
    image_size: Optional[int] = None  # resize every image to this square size (None: as they are; the official size)
    normalization_mean: Optional[List[float]] = None  # per channel (None: official, or computed from the data)
    normalization_std: Optional[List[float]] = None
    crop_padding: int = 4  # the augmentation's reflect padding; the official code's 4 at every size
    # program
    output_dir: str = "runs/cifar10"
    eval_every: int = 100
    eval_batch_size: int = 500
    checkpoint_every: int = 50
    log_every: int = 1
    seed: int = 0
    jit_compile: str = "auto"
    export: bool = True
    # none: one device; mirrored: every GPU of this host; multi_worker: every GPU of every host in TF_CONFIG.
    # physical_batch_size is per replica. The privacy (and the update of each step) is that of one device.
    distribution: str = "none"

    def __post_init__(self):
        self.validate()

    def validate(self):
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}; got {value!r}")

        def positive(name, integer=True):
            if integer:
                whole_number(f"--{name}", getattr(self, name), at_least=1)
            else:
                finite_number(f"--{name}", getattr(self, name), above=0)

        for field in dataclasses.fields(self):  # NaN passes every comparison below, and inf most of them
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{field.name} must be a finite number; got {value}")
        choice("architecture", ARCHITECTURES)
        choice("head", HEADS)
        choice("model_variant", tuple(VARIANTS))
        self._resolve_variant()
        choice("conv_basis", CONV_BASES)
        choice("norm_group_rule", NORM_RULES)
        choice("so2_norm_centering", SO2_NORM_CENTERINGS)
        positive("so2_frequency")
        if not isinstance(self.conv_weight_standardization, bool):
            raise ConfigError(f"--conv_weight_standardization must be true or false; got "
                              f"{self.conv_weight_standardization!r}")
        choice("sampling", SAMPLINGS)
        choice("view_reduction", VIEW_REDUCTIONS)
        choice("jit_compile", JIT_CHOICES)
        choice("distribution", DISTRIBUTIONS)
        for name in ("steps", "batch_size", "physical_batch_size", "num_views", "eval_every", "eval_batch_size",
                     "checkpoint_every", "log_every", "ema_updates_per_step"):
            positive(name)
        positive("learning_rate", integer=False)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum must be in [0, 1); got {self.momentum}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay must be in [0, 1); got {self.ema_decay}")
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                positive(name)
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0; got {self.seed}")
        if self.dp_seed is not None and (isinstance(self.dp_seed, bool) or not isinstance(self.dp_seed, int)
                                         or self.dp_seed < 0):
            raise ConfigError(f"--dp_seed must be a whole number >= 0 or unset; got {self.dp_seed!r}")
        self._validate_groups()
        self._validate_dataset()
        if self.architecture == "wrn16_4" and (self.group.upper() != "C1" or self.restricted_group is not None):
            raise ConfigError("--architecture=wrn16_4 is not equivariant: use it with --group=C1 --restrict=none")
        self._validate_privacy()

    def _resolve_variant(self):
        options = VARIANTS[self.model_variant]
        for name, option in (("conv_basis", "basis"), ("conv_weight_standardization", "weight_standardization"),
                             ("norm_group_rule", "norm_rule")):
            if getattr(self, name) is None:
                setattr(self, name, options[option])
        if is_so2(self.group):
            if self.conv_basis != "steerable":
                raise ConfigError("--group=SO2 has only the steerable basis: drop --conv_basis=dense (and use "
                                  "--model_variant=official)")
            return
        if self.conv_basis == "steerable":
            try:
                group = groups_lib.get(self.group)
            except ValueError:
                return  # _validate_groups says what is wrong with the name
            if not group.is_exact:
                raise ConfigError(f"--conv_basis=steerable needs a group that permutes the pixel grid exactly (C1, "
                                  f"C2, C4, D1, D2, D4), got --group={self.group}; use --conv_basis=dense")

    def _validate_privacy(self):
        if self.simulated_batch_size is not None:
            whole_number("--simulated_batch_size", self.simulated_batch_size, at_least=1)
            if not self.dp:
                raise ConfigError("--simulated_batch_size simulates a private run: it needs --dp=true")
            if self.simulated_batch_size < self.batch_size:
                raise ConfigError(f"--simulated_batch_size {self.simulated_batch_size} is smaller than --batch_size "
                                  f"{self.batch_size}: a TAN simulation runs a smaller batch than the run it stands "
                                  "for")
        if not self.dp:
            return
        if self.l2_norm_clip <= 0:
            raise ConfigError(f"--l2_norm_clip must be > 0; got {self.l2_norm_clip}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"--delta must be in (0, 1); got {self.delta}")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError("with --dp, set --noise_multiplier or --target_epsilon")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ConfigError(f"--noise_multiplier must be >= 0; got {self.noise_multiplier}")
        for name in ("target_epsilon", "max_epsilon"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be > 0; got {getattr(self, name)}")

    def _validate_dataset(self):
        kind = parse_spec(self.dataset).kind
        if kind != "tfds" and (self.train_split is not None or self.test_split is not None):
            raise ConfigError("--train_split/--test_split name TFDS splits: they apply only to --dataset=tfds:NAME")
        if kind in ("folder", "npz") and self.data_dir is not None:
            raise ConfigError(f"--data_dir does not apply to --dataset={kind}:PATH (the path is part of --dataset)")
        finite_number("--test_fraction", self.test_fraction, above=0)
        if not self.test_fraction < 1:
            raise ConfigError(f"--test_fraction must be in (0, 1); got {self.test_fraction}")
        whole_number("--split_seed", self.split_seed)
        whole_number("--crop_padding", self.crop_padding)
        if self.image_size is not None:
            whole_number("--image_size", self.image_size, at_least=1)
        given = [name for name in ("normalization_mean", "normalization_std") if getattr(self, name) is not None]
        if len(given) == 1:
            raise ConfigError("give both --normalization_mean and --normalization_std, or neither")
        for name in given:
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"--{name} needs one value per channel (or one for all)")
            for value in values:
                finite_number(f"--{name}", value, above=0 if name == "normalization_std" else None)

    def _validate_groups(self):
        if is_so2(self.group):
            if self.architecture != "eq_resnet9":
                raise ConfigError("--group=SO2 builds the Equivariant ResNet-9 only (--architecture=eq_resnet9)")
            if (self.restricted_group or "").upper() != SO2_RESTRICTION:
                raise ConfigError(f"--group=SO2 restricts its last stages to the trivial group, as the official code: "
                                  f"use --restrict={SO2_RESTRICTION} (got {self.restrict!r})")
            return
        try:
            group = groups_lib.get(self.group)
        except ValueError as err:
            raise ConfigError(f"--group: {err}") from None
        if self.restricted_group is None:
            return
        try:
            group.subgroup_embedding(groups_lib.get(self.restrict))
        except ValueError as err:
            raise ConfigError(f"--restrict: {err} (or use --restrict=none)") from None

    @property
    def epsilon_ceiling(self):
        """The epsilon no step may take the run past (None: no ceiling)."""
        if not self.dp:
            return None
        return self.max_epsilon if self.max_epsilon is not None else self.target_epsilon

    @property
    def restricted_group(self):
        return restricted_group(self.restrict)

    def to_json(self):
        return dataclasses.asdict(self)

    # Settings that may differ when a run is resumed: they change neither the model nor the privacy. (The
    # distribution changes only which device clips which example, and the augmentation crops.)
    RESUMABLE_CHANGES = ("output_dir", "eval_every", "eval_batch_size", "checkpoint_every", "log_every",
                         "jit_compile", "export", "data_dir", "physical_batch_size", "test_subset",
                         "allow_privacy_change", "distribution", "max_epsilon")
    # Settings that change the privacy of the remaining steps (sigma, q = batch/N, C, delta, N). A resume may change
    # them only with --allow_privacy_change; epsilon then composes the steps taken under each setting.
    PRIVACY_SETTINGS = ("noise_multiplier", "target_epsilon", "l2_norm_clip", "delta", "batch_size", "train_subset",
                        "simulated_batch_size")
    # The dataset's: the test split changes only what is evaluated; the others choose the training examples (N and
    # which ones, as --train_subset does).
    RESUMABLE_CHANGES += ("test_split",)
    PRIVACY_SETTINGS += ("train_split", "test_fraction", "split_seed")

    # What a config.json written before a setting existed meant by leaving it out.
    RESNET9_ONLY = ("model_variant", "conv_basis", "conv_weight_standardization", "norm_group_rule", "so2_frequency",
                    "so2_norm_centering")
    # Before the model variants: the dense ResNet-9; before --dataset: CIFAR-10 as the defaults prepare it; before
    # --wrn_weight_standardization: plain convolutions.
    LEGACY_VALUES = {"wrn_weight_standardization": False, "model_variant": "dense", "conv_basis": "dense", "conv_weight_standardization": False,
                     "norm_group_rule": "closest", "ema_updates_per_step": 1, "so2_frequency": 1,
                     "so2_norm_centering": "all", "dataset": "cifar10", "train_split": None, "test_split": None,
                     "test_fraction": 0.1, "split_seed": 0, "image_size": None, "normalization_mean": None,
                     "normalization_std": None, "crop_padding": 4}

    def differences(self, other: dict):
        """Names of settings where ``other`` (a saved config) differs in a way a resume cannot accept.

        Privacy settings are included; ``privacy_differences`` tells them apart.
        """
        other = {**self.LEGACY_VALUES, **other}
        mine = self.to_json()
        # Each architecture's own settings change nothing in the other.
        architecture = mine["architecture"] if mine["architecture"] == other.get("architecture") else None
        ignored = {"wrn16_4": self.RESNET9_ONLY, "eq_resnet9": ("wrn_weight_standardization",)}.get(architecture, ())
        return sorted(k for k in set(mine) | set(other)
                      if k not in self.RESUMABLE_CHANGES and k not in ignored and mine.get(k) != other.get(k))

    def privacy_differences(self, other: dict):
        """``{name: (saved, now)}`` for the privacy settings in which ``other`` (a saved config) differs."""
        mine = self.to_json()
        return {k: (other.get(k), mine.get(k)) for k in self.PRIVACY_SETTINGS if mine.get(k) != other.get(k)}


def _optional_number(value, cast, name):
    if value in (None, "", "none", "None"):
        return None
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} must be a number or 'none'; got {value!r}") from None


def _number_list(values, name):
    """Floats of a comma-separated flag (None: unset)."""
    if values is None:
        return None
    try:
        return [float(v) for v in values]
    except ValueError:
        raise ConfigError(f"--{name} must be numbers separated by commas; got {','.join(values)!r}") from None


def _check_dataset_flags(f):
    """Refuses held-out-test flags set for a dataset that has its own test set. Only a value that would change
    something is refused: the default is what every run's config.json holds, and replaying those flags must work."""
    if not hasattr(f, "__getitem__") or "dataset" not in f:
        return
    kind, defaults = parse_spec(f.dataset).kind, TrainConfig()
    for name in ("test_fraction", "split_seed"):
        if _given(f, name) and getattr(f, name) != getattr(defaults, name) and kind != "folder":
            raise ConfigError(f"--{name} draws a test set from a class folder: it applies only to "
                              "--dataset=folder:PATH")


def define_flags():
    """Registers the command-line flags (once) with defaults from ``TrainConfig``."""
    if "architecture" in flags.FLAGS:
        return
    d = TrainConfig()
    flags.DEFINE_enum("architecture", d.architecture, ARCHITECTURES, "Model family.")
    flags.DEFINE_string("group", d.group, "Symmetry group: C1 (ordinary CNN), C4, C8, D4, D8, ... (C_N or D_N), or SO2 "
                        "(continuous rotations: band-limited fields, with --restrict=C1 and --so2_frequency).")
    flags.DEFINE_string("restrict", d.restrict, "Subgroup for the last stages (e.g. D2), or 'none'.")
    flags.DEFINE_enum("head", d.head, HEADS, "'paper': 2x2 avg pool + linear; 'invariant': global pool + linear.")
    flags.DEFINE_enum("model_variant", d.model_variant, tuple(VARIANTS),
                      "Equivariant ResNet-9: 'official' = the official code's model (escnn's 8-tap steerable basis, "
                      "weight-standardised coefficients, its GroupNorm rule, escnn's bias scale, torch's head init); "
                      "'dense' = free 9-tap filters, no standardisation, one norm group per field.")
    flags.DEFINE_enum("conv_basis", None, CONV_BASES, "Override the variant's filter basis: 'steerable' (escnn's "
                      "band-limited basis, exact groups only) or 'dense' (free k*k taps).")
    flags.DEFINE_boolean("conv_weight_standardization", None, "Override the variant: standardise each group conv's "
                         "whole coefficient vector ((w - mean) / (std + 1e-5)), as the official code's escnn fork.")
    flags.DEFINE_enum("norm_group_rule", None, NORM_RULES, "Override the variant: GroupNorm groups when 8 do not "
                      "divide the fields: 'official' (the official code's closest_divisor: 1 group for 6 or 13 "
                      "fields) or 'closest' (the nearest divisor: one group per field for 6 or 13).")
    flags.DEFINE_integer("so2_frequency", d.so2_frequency, "--group=SO2 only: the maximum frequency L of the "
                         "band-limited fields (2L + 1 channels each; the official widths divide by L^2).")
    flags.DEFINE_enum("so2_norm_centering", d.so2_norm_centering, SO2_NORM_CENTERINGS, "--group=SO2 only: GroupNorm "
                      "over band-limited fields centres 'all' coefficients by one mean (the official code's; not "
                      "equivariant) or only the 'invariant' (frequency 0) ones (equivariant).")
    flags.DEFINE_boolean("wrn_weight_standardization", d.wrn_weight_standardization,
                         "WRN only: scaled weight standardisation with a gain and bias per filter in every conv, as De "
                         "et al. (2022); false: plain convs without bias.")
    flags.DEFINE_integer("steps", d.steps, "Number of DP-SGD (logical) steps.")
    flags.DEFINE_integer("batch_size", d.batch_size, "Expected logical batch size (Poisson: q = batch_size / N).")
    flags.DEFINE_integer("physical_batch_size", d.physical_batch_size,
                         "Examples per forward/backward pass (per device with --distribution).")
    flags.DEFINE_integer("num_views", d.num_views, "Augmentation multiplicity K (1 = no augmentation).")
    flags.DEFINE_enum("view_reduction", d.view_reduction, VIEW_REDUCTIONS, "How K views' gradients combine before clipping.")
    flags.DEFINE_float("learning_rate", d.learning_rate, "SGD learning rate.")
    flags.DEFINE_float("momentum", d.momentum, "SGD momentum.")
    flags.DEFINE_float("ema_decay", d.ema_decay, "EMA decay of the weights used for evaluation and export.")
    flags.DEFINE_integer("ema_updates_per_step", d.ema_updates_per_step,
                         "EMA updates per logical step, the warm-up counting updates: the official run updates after "
                         "every physical batch (16 for B = 8192 in batches of 2048 // K = 512); a TAN simulation "
                         "takes the full-scale run's count.")
    flags.DEFINE_boolean("dp", d.dp, "Train with DP-SGD (false: same model and pipeline, non-private).")
    flags.DEFINE_float("l2_norm_clip", d.l2_norm_clip, "Per-example gradient clipping norm C.")
    flags.DEFINE_string("noise_multiplier", None, "Noise multiplier sigma; unset: calibrated to --target_epsilon.")
    flags.DEFINE_string("target_epsilon", str(d.target_epsilon), "Target epsilon for calibrating sigma, or 'none'. "
                        "Given together with --noise_multiplier: a cap the run refuses to exceed.")
    flags.DEFINE_string("max_epsilon", None, "Ceiling on epsilon: no step is taken that would push the run past it "
                        "(e.g. when a resume must re-take steps whose checkpoint was lost). Unset: --target_epsilon "
                        "is the ceiling. Raise it on a resume to allow such a run to go on.")
    flags.DEFINE_float("delta", d.delta, "Target delta.")
    flags.DEFINE_enum("sampling", d.sampling, SAMPLINGS, "Batch sampling; epsilon always assumes Poisson.")
    flags.DEFINE_integer("simulated_batch_size", None,
                         "TAN simulation (Sander et al. 2023): train at --batch_size to predict the accuracy of a run "
                         "at this larger batch with the same steps and sigma/B. --noise_multiplier/--target_epsilon "
                         "then describe the simulated run; this run's own (much larger) epsilon is reported as "
                         "'epsilon', the simulated one separately. Unset: an ordinary run.")
    flags.DEFINE_integer("dp_seed", None, "Seed of the batch sampling and the DP noise, for reproducible experiments "
                         "only: config.json publishes it, and anyone who knows it can recompute batches and noise. "
                         "Unset: a secret key kept in the run folder (dp_secret.json).")
    flags.DEFINE_boolean("allow_privacy_change", d.allow_privacy_change,
                         "Resume a run with different privacy settings (sigma, batch size, clip, delta, dataset "
                         "size); epsilon then composes the steps taken under each.")
    flags.DEFINE_string("data_dir", None, "A local copy of the --dataset: the folder with cifar-10-batches-bin or -py "
                        "(cifar-100-binary or -python), tiny-imagenet-200, imagenette-160; for tfds:, TFDS's data "
                        "folder. Unset: TFDS (downloads).")
    flags.DEFINE_integer("train_subset", None, "Use only the first N training examples.")
    flags.DEFINE_integer("test_subset", None, "Evaluate on only the first N test examples.")
    # dataset (eqdp_tf.datasets)
    flags.DEFINE_string("dataset", d.dataset, "cifar10, cifar100, tiny_imagenet, imagenette (the official code's), "
                        "tfds:NAME[/CONFIG] (a TFDS dataset with 'image' and 'label'), folder:PATH (one subfolder of "
                        "images per class, or train/ and test/ with such subfolders), npz:PATH (MedMNIST's layout).")
    flags.DEFINE_string("train_split", None, "tfds: only: the training split (default 'train'; slices such as "
                        "'train[:90%]' work).")
    flags.DEFINE_string("test_split", None, "tfds: only: the test split (default 'test', else 'validation').")
    flags.DEFINE_float("test_fraction", d.test_fraction, "folder: without train/ and test/: the share of the images "
                       "held out for testing, drawn with --split_seed.")
    flags.DEFINE_integer("split_seed", d.split_seed, "Seed of the --test_fraction draw (public: it is in config.json).")
    flags.DEFINE_integer("image_size", None, "Resize every image to this square size: center-crop to a square, then "
                         "resize (bilinear, antialiased). Unset: the images as they are (the official datasets: 32, "
                         "64, 160); images of different sizes then are an error.")
    flags.DEFINE_list("normalization_mean", None, "Per-channel mean of pixels scaled to [0, 1], comma-separated (one "
                      "value: every channel). Unset: the official constants, else computed from the training images "
                      "(outside the DP guarantee: give these to avoid it).")
    flags.DEFINE_list("normalization_std", None, "Per-channel std, as --normalization_mean.")
    flags.DEFINE_integer("crop_padding", d.crop_padding, "Reflect padding of the augmentation's random crops, in "
                         "pixels (the official code's 4 at every image size).")
    flags.DEFINE_string("output_dir", d.output_dir, "Run folder: checkpoints, metrics, privacy.json, export.")
    flags.DEFINE_integer("eval_every", d.eval_every, "Evaluate test accuracy every N steps (and at the end).")
    flags.DEFINE_integer("eval_batch_size", d.eval_batch_size, "Batch size for evaluation.")
    flags.DEFINE_integer("checkpoint_every", d.checkpoint_every, "Checkpoint every N steps (and at the end).")
    flags.DEFINE_integer("log_every", d.log_every, "Update progress and TensorBoard every N steps.")
    flags.DEFINE_integer("seed", d.seed, "Seed of the weight initialisation and the augmentation crops, nothing else "
                         "(see --dp_seed).")
    flags.DEFINE_enum("jit_compile", d.jit_compile, JIT_CHOICES, "XLA: auto = on with a GPU, off on CPU.")
    flags.DEFINE_boolean("export", d.export, "Export a SavedModel at the end.")
    flags.DEFINE_enum("distribution", d.distribution, DISTRIBUTIONS,
                      "none: one device; mirrored: all GPUs of this host (tf.distribute.MirroredStrategy); "
                      "multi_worker: all GPUs of every host in the TF_CONFIG environment variable "
                      "(MultiWorkerMirroredStrategy). Same update and privacy as on one device.")


def _given(f, name):
    """True when flag ``name`` was set on the command line or in a flagfile (not just defaulted)."""
    return hasattr(f, "__getitem__") and name in f and f[name].present


def _check_contradictions(f):
    """Rejects explicitly set flags that cannot both hold. (--noise_multiplier with --target_epsilon is checked
    once the epsilon of that noise is known: the run refuses if it misses the target.)"""
    if _given(f, "dp") and not f.dp and _given(f, "noise_multiplier"):
        raise ConfigError("--dp=false trains without noise, which contradicts --noise_multiplier; drop one of them")
    # Only the value that would change something is refused: true (the default) is what a run's config.json holds
    # for every architecture, and replaying those flags must work.
    if _given(f, "wrn_weight_standardization") and not f.wrn_weight_standardization and f.architecture != "wrn16_4":
        raise ConfigError("--wrn_weight_standardization applies only to --architecture=wrn16_4")


def config_from_flags(values=None):
    """Builds a validated ``TrainConfig`` from parsed flags (``values`` defaults to absl's FLAGS)."""
    f = values or flags.FLAGS
    _check_contradictions(f)
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    kwargs = {name: getattr(f, name) for name in fields if name in f}
    kwargs["noise_multiplier"] = _optional_number(f.noise_multiplier, float, "noise_multiplier")
    kwargs["target_epsilon"] = _optional_number(f.target_epsilon, float, "target_epsilon")
    kwargs["max_epsilon"] = _optional_number(f.max_epsilon, float, "max_epsilon")
    for name in ("normalization_mean", "normalization_std"):
        kwargs[name] = _number_list(kwargs.get(name), name)
    _check_dataset_flags(f)
    if kwargs.get("data_dir") == "":  # --data_dir= (e.g. to override a flagfile's folder): TFDS
        kwargs["data_dir"] = None
    if kwargs["noise_multiplier"] is not None and not _given(f, "target_epsilon"):
        kwargs["target_epsilon"] = None  # the default target is only for calibrating sigma when none is given
    kwargs = {k: v for k, v in kwargs.items()
              if v is not None or k in ("noise_multiplier", "target_epsilon", "max_epsilon")}
    return TrainConfig(**kwargs)


def load_saved(path):
    with open(path) as f:
        return json.load(f)


def _flag_error_message(err):
    text = str(err)
    unknown = re.match(r"Unknown command line flag '([^']+)'(?:\. Did you mean: (.+?) \?)?$", text)
    if unknown:
        name, suggestion = unknown.groups()
        return f"unknown flag --{name}" + (f" (did you mean --{suggestion}?)" if suggestion else "")
    return text.replace("ERROR:: ", "")


def parse_flags(argv):
    """absl's flag parsing for ``app.run(..., flags_parser=parse_flags)``, but a bad flag (unknown, unparsable,
    unreadable flagfile) gives one line ``error: ...`` on stderr and exit code 2 instead of absl's two."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        print(f"error: {one_line(_flag_error_message(err))} (see --helpshort)", file=sys.stderr)
        sys.exit(2)
