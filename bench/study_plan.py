"""The study's runs: each run's training flags, grouped in batches (the first study and the paper's regime).

Nothing here trains or reads results; ``study.py`` runs these, ``study_records.py`` keeps what they leave.
"""

import itertools

# The shared budget: 1024 x 160 x 1 = 163,840 views per run (~3.3 epochs).
COMMON_FLAGS = [
    "--batch_size=1024",
    "--physical_batch_size=128",
    "--steps=160",
    "--num_views=1",
    "--l2_norm_clip=2.0",
    "--delta=1e-5",
    "--ema_decay=0.999",
    "--sampling=poisson",
    "--eval_every=40",
    "--checkpoint_every=40",
    "--log_every=5",
    "--export=false",
]

# Rounds 1-3 trained the dense variant of the ResNet-9 (free 9-tap filters; --model_variant=dense), before the
# official one existed; round 4 (issue 39) the official code's model with the EMA schedule of its full-scale run.
DENSE = ["--model_variant=dense"]
OFFICIAL = ["--model_variant=official", "--ema_updates_per_step=16"]
MODELS = {
    "eq_d4d2": ["--architecture=eq_resnet9", "--group=D4", "--restrict=D2", "--head=paper"] + DENSE,
    "cnn_c1": ["--architecture=eq_resnet9", "--group=C1", "--restrict=none", "--head=paper"] + DENSE,
    # The runs recorded before weight standardisation existed trained plain convs: kept so, to stay reproducible.
    "wrn16_4": ["--architecture=wrn16_4", "--group=C1", "--restrict=none", "--wrn_weight_standardization=false"],
    "eq_c4": ["--architecture=eq_resnet9", "--group=C4", "--restrict=none", "--head=paper"] + DENSE,
    "eq_d4d2_official": ["--architecture=eq_resnet9", "--group=D4", "--restrict=D2", "--head=paper"] + OFFICIAL,
    "cnn_c1_official": ["--architecture=eq_resnet9", "--group=C1", "--restrict=none", "--head=paper"] + OFFICIAL,
}
# Round 4's ablation: the official D4->D2 model with one ingredient reverted to the dense variant's.
ABLATIONS = {
    "no_ws": ["--conv_weight_standardization=false"],
    "gn_per_field": ["--norm_group_rule=closest"],
    "dense_basis": ["--conv_basis=dense"],
    "ema1": ["--ema_updates_per_step=1"],
}
def _replacing(flags, changes):
    """``flags`` with ``changes`` in place of the flags of the same name, the others appended (each flag once)."""
    names = {change.split("=", 1)[0] for change in changes}
    return [flag for flag in flags if flag.split("=", 1)[0] not in names] + list(changes)


MODEL_LABELS = {
    "eq_d4d2": "Equivariant ResNet-9 (D4→D2), dense variant",
    "cnn_c1": "ResNet-9, trivial group (ordinary CNN), dense variant",
    "wrn16_4": "WRN-16-4",
    "wrn16_4_ws": "WRN-16-4 (weight-standardised)",
    "eq_c4": "Equivariant ResNet-9 (C4), dense variant",
    "eq_d4d2_official": "Official Equivariant ResNet-9 (D4→D2)",
    "cnn_c1_official": "Official ResNet-9, trivial group (ordinary CNN)",
    "eq_d4d2_official_no_ws": "Official D4→D2 without weight standardisation",
    "eq_d4d2_official_gn_per_field": "Official D4→D2 with one norm group per field",
    "eq_d4d2_official_dense_basis": "Official D4→D2 with the dense 9-tap basis",
    "eq_d4d2_official_ema1": "Official D4→D2 with one EMA update per step",
}


def _private(epsilon):
    # The paper's optimiser: SGD, lr 2, no momentum (clipped gradients keep such steps bounded).
    return ["--dp=true", f"--target_epsilon={epsilon}", "--learning_rate=2.0", "--momentum=0.0"]


# Without clipping, lr 2 diverges (a 30-step probe of the C1 model: loss 109, 11% accuracy; lr 0.3: 13%);
# SGD lr 0.02 with momentum 0.9 reached 44% in the same probe.
NONPRIVATE = ["--dp=false", "--target_epsilon=none", "--learning_rate=0.02", "--momentum=0.9"]

# Batches of runs, each planned to finish within about two hours of wall time on 2 cores.
BATCHES = {
    "eps8": {
        "eq_d4d2_eps8": MODELS["eq_d4d2"] + _private(8),
        "cnn_c1_eps8": MODELS["cnn_c1"] + _private(8),
        "eq_d4d2_nonprivate": MODELS["eq_d4d2"] + NONPRIVATE,
    },
    "eps2": {
        "eq_d4d2_eps2": MODELS["eq_d4d2"] + _private(2),
        "cnn_c1_eps2": MODELS["cnn_c1"] + _private(2),
        "cnn_c1_nonprivate": MODELS["cnn_c1"] + NONPRIVATE,
    },
    "wrn": {
        "wrn16_4_eps8": MODELS["wrn16_4"] + _private(8),
    },
}

# --------------------------------------------------------------------------------------------
# The paper's regime by TAN simulation (issue 12): 2160 steps at the paper's sigma/B, simulated at a small batch.
# Each run trains at batch B with sigma = sigma_8192 * B / 8192 (train.py --simulated_batch_size=8192), so its
# update has the paper run's noise-to-signal ratio; its own epsilon is in the hundreds (see privacy.json).

PAPER_BATCH = 8192
TAN_BATCH = 256
# Physical batches sized so that a Poisson batch (mean B, sd ~sqrt(B)) almost always fills a whole number of
# them with little padding (3 x 96 = 288 covers 256 + 2 sd).
TAN_PHYSICAL = {64: 40, 128: 72, 256: 96, 512: 144}
TAN_COMMON_FLAGS = [
    "--steps=2160",
    "--l2_norm_clip=2.0",
    "--delta=1e-5",
    "--ema_decay=0.999",
    "--sampling=poisson",
    "--eval_every=216",
    "--checkpoint_every=108",
    "--log_every=20",
    "--export=false",
    "--learning_rate=2.0",
    "--momentum=0.0",
    "--dp=true",
    f"--simulated_batch_size={PAPER_BATCH}",
]


def _tan(batch, epsilon=None, views=1, physical=None, seed=None):
    """A TAN-simulated run of the paper's batch 8192 at ``batch``; epsilon None: sigma = 0 (clipping only).

    ``seed`` (a repeat of a run): initialisation and augmentation (``--seed``) and batches and noise
    (``--dp_seed``, public on purpose) all differ from the first run's, which used seed 0 and a secret key.
    """
    privacy = [f"--target_epsilon={epsilon}"] if epsilon is not None else ["--noise_multiplier=0",
                                                                          "--target_epsilon=none"]
    repeat = [] if seed is None else [f"--seed={seed}", f"--dp_seed={seed}"]
    return [f"--batch_size={batch}", f"--physical_batch_size={physical or TAN_PHYSICAL[batch]}",
            f"--num_views={views}"] + privacy + repeat


TAN_BATCHES = {
    # Does the simulation hold here? The ordinary CNN at simulated epsilon 8 and three batch sizes.
    "tan_scaling": {
        "tan_cnn_c1_eps8": MODELS["cnn_c1"] + _tan(256, 8),
        "tan_cnn_c1_eps8_b128": MODELS["cnn_c1"] + _tan(128, 8),
        "tan_cnn_c1_eps8_b512": MODELS["cnn_c1"] + _tan(512, 8),
    },
    "tan_eps8": {
        "tan_eq_d4d2_eps8": MODELS["eq_d4d2"] + _tan(TAN_BATCH, 8),
    },
    "tan_eps2": {
        "tan_cnn_c1_eps2": MODELS["cnn_c1"] + _tan(TAN_BATCH, 2),
        "tan_eq_d4d2_eps2": MODELS["eq_d4d2"] + _tan(TAN_BATCH, 2),
    },
    "tan_eps1": {
        "tan_cnn_c1_eps1": MODELS["cnn_c1"] + _tan(TAN_BATCH, 1),
        "tan_eq_d4d2_eps1": MODELS["eq_d4d2"] + _tan(TAN_BATCH, 1),
    },
    "tan_noiseless": {
        "tan_cnn_c1_sigma0": MODELS["cnn_c1"] + _tan(TAN_BATCH),
        "tan_eq_d4d2_sigma0": MODELS["eq_d4d2"] + _tan(TAN_BATCH),
    },
    # WRN-16-4 with the paper's optimiser (not tuned for it; issue 26 keeps it as a record that no conclusion rests
    # on; the fair baseline is tan_wrn_recipe below). At B = 64: its per-example step was too slow for B = 256 in one
    # sitting (~31-35 views/s on the 2-core Xeon, 2026-12-01).
    "tan_wrn": {
        "tan_wrn16_4_eps8_b64": MODELS["wrn16_4"] + _tan(64, 8),
    },
    # Issue 12's optional runs. A smaller group, C4. And the paper's K = 4 views per
    # example: at B = 256 that is 4x the views of every other run (about 7 h here in one sitting, more than a
    # session), so it runs at B = 64 x 4 views, the same views per step as the rest and the same simulated run
    # (TAN: sigma/B fixed). B = 64 is further from 8192 than the scaling check went, so the ordinary CNN at B = 64
    # checks it first. Physical batch 27 x 4 views: three passes cover 64 + 2 sd examples, ~100 views per pass.
    "tan_optional": {
        "tan_eq_c4_eps8": MODELS["eq_c4"] + _tan(TAN_BATCH, 8),
        "tan_cnn_c1_eps8_b64": MODELS["cnn_c1"] + _tan(64, 8),
        "tan_eq_d4d2_k4_eps8_b64": MODELS["eq_d4d2"] + _tan(64, 8, views=4, physical=27),
    },
    # Issue 26: the paper's K = 4 views for the ordinary CNN too (its same-batch K = 1 reference is
    # tan_cnn_c1_eps8_b64), and the equivariant model's own K = 1 reference at B = 64.
    "tan_k4": {
        "tan_cnn_c1_k4_eps8_b64": MODELS["cnn_c1"] + _tan(64, 8, views=4, physical=27),
        "tan_eq_d4d2_eps8_b64": MODELS["eq_d4d2"] + _tan(64, 8),
    },
    # Issue 26: two more seeds of the two main models at the ends of the privacy range, to tell the margins
    # from chance. The ordinary CNN's first (~0.5 h each), then the equivariant model's (~1.7 h each).
    "tan_seeds": {
        **{f"tan_cnn_c1_eps{eps}_s{seed}": MODELS["cnn_c1"] + _tan(TAN_BATCH, eps, seed=seed)
           for eps in (8, 1) for seed in (1, 2)},
        **{f"tan_eq_d4d2_eps{eps}_s{seed}": MODELS["eq_d4d2"] + _tan(TAN_BATCH, eps, seed=seed)
           for eps in (8, 1) for seed in (1, 2)},
    },
    # Round 4 (issue 39): the official code's model, in the order the issue gives: the headline at simulated
    # epsilon 8 (D4->D2 seed 0 first, then the cheap ordinary CNN's three seeds, then D4->D2's other two), the
    # ablation, then low epsilon and no noise.
    "r4_eps8_first": {
        "tan_off_eq_d4d2_eps8": MODELS["eq_d4d2_official"] + _tan(TAN_BATCH, 8),
    },
    "r4_cnn_eps8": {
        "tan_off_cnn_c1_eps8": MODELS["cnn_c1_official"] + _tan(TAN_BATCH, 8),
        **{f"tan_off_cnn_c1_eps8_s{seed}": MODELS["cnn_c1_official"] + _tan(TAN_BATCH, 8, seed=seed)
           for seed in (1, 2)},
    },
    "r4_eq_eps8_seeds": {
        f"tan_off_eq_d4d2_eps8_s{seed}": MODELS["eq_d4d2_official"] + _tan(TAN_BATCH, 8, seed=seed) for seed in (1, 2)
    },
    "r4_ablation": {
        f"tan_off_eq_d4d2_{name}_eps8": _replacing(MODELS["eq_d4d2_official"], flags) + _tan(TAN_BATCH, 8)
        for name, flags in ABLATIONS.items()
    },
    "r4_eps1": {
        **{f"tan_off_cnn_c1_eps1{suffix}": MODELS["cnn_c1_official"] + _tan(TAN_BATCH, 1, seed=seed)
           for seed, suffix in ((None, ""), (1, "_s1"), (2, "_s2"))},
        **{f"tan_off_eq_d4d2_eps1{suffix}": MODELS["eq_d4d2_official"] + _tan(TAN_BATCH, 1, seed=seed)
           for seed, suffix in ((None, ""), (1, "_s1"), (2, "_s2"))},
    },
    "r4_eps2": {
        "tan_off_cnn_c1_eps2": MODELS["cnn_c1_official"] + _tan(TAN_BATCH, 2),
        "tan_off_eq_d4d2_eps2": MODELS["eq_d4d2_official"] + _tan(TAN_BATCH, 2),
    },
    "r4_noiseless": {
        "tan_off_cnn_c1_sigma0": MODELS["cnn_c1_official"] + _tan(TAN_BATCH),
        "tan_off_eq_d4d2_sigma0": MODELS["eq_d4d2_official"] + _tan(TAN_BATCH),
    },
}
ROUND4_ORDER = ("r4_eps8_first", "r4_cnn_eps8", "r4_eq_eps8_seeds", "r4_ablation", "r4_eps1", "r4_eps2",
                "r4_noiseless")


def _one_of_each(batches):
    """The batches' runs, the official D4->D2 runs and the official C1 runs each in the batches' order, taken in
    turn. A 3-hour session here fits one D4->D2 run (~2 h 10 min on two cores) and one C1 run (~40 min); the batches
    in order would leave a batch's C1 runs to sessions of their own, and a run unfinished at a session's end is lost
    when the next session is on a new machine."""
    names = [name for batch in batches for name in TAN_BATCHES[batch]]
    eq, cnn = [n for n in names if "_eq_" in n], [n for n in names if "_cnn_" in n]
    if len(eq) + len(cnn) != len(names):
        raise ValueError(f"a round-4 run is neither D4->D2 nor C1: {sorted(set(names) - set(eq) - set(cnn))}")
    return tuple(name for pair in itertools.zip_longest(eq, cnn) for name in pair if name is not None)


# The order in which `run round4` takes its runs (each resumable, finished runs skipped).
ROUND4_RUNS = _one_of_each(ROUND4_ORDER)


def _override(flags, **values):
    """``flags`` with the given flags' values replaced."""
    return [f"--{name}={values[name]}" if name in values else flag
            for flag in flags for name in [flag[2:].split("=", 1)[0]]]


# WRN-16-4 with its authors' own recipe (issue 26): TAN's CIFAR-10 reference run (facebookresearch/tan), SGD lr 4
# without momentum, C = 1, EMA 0.9999, sigma = 3 at B = 4096 for 2500 steps, De et al.'s weight-standardised convs;
# K = 1 here (TAN: 16). At B = 128 (sigma 3 * 128 / 4096): B = 256 needs more than a session here (~29 views/s on the
# 2-core EPYC, 2026-12-05). Simulated epsilon 7.1 by our RDP accountant (TAN reports 8).
TAN_WRN_RECIPE_FLAGS = _override(TAN_COMMON_FLAGS, steps=2500, l2_norm_clip=1.0, ema_decay=0.9999, eval_every=250,
                                 checkpoint_every=125, learning_rate=4.0, simulated_batch_size=4096) + [
    "--noise_multiplier=3", "--target_epsilon=none"]
TAN_RECIPE_BATCHES = {
    "tan_wrn_recipe": {
        "tan_wrn16_4_ws_tan_b128": ["--architecture=wrn16_4", "--group=C1", "--restrict=none",
                                    "--wrn_weight_standardization=true", "--batch_size=128",
                                    f"--physical_batch_size={TAN_PHYSICAL[128]}", "--num_views=1"],
    },
}
TAN_BATCHES.update(TAN_RECIPE_BATCHES)
# The order in which `run tan` takes the batches (each resumable, finished runs skipped).
TAN_ORDER = ("tan_scaling", "tan_eps8", "tan_eps2", "tan_noiseless", "tan_eps1", "tan_wrn", "tan_optional", "tan_k4",
             "tan_seeds", "tan_wrn_recipe") + ROUND4_ORDER


def run_flags(name):
    for runs in BATCHES.values():
        if name in runs:
            return COMMON_FLAGS + runs[name]
    for batch, runs in TAN_BATCHES.items():
        if name in runs:
            return (TAN_WRN_RECIPE_FLAGS if batch in TAN_RECIPE_BATCHES else TAN_COMMON_FLAGS) + runs[name]
    raise KeyError(name)


def batch_runs(batch):
    return {**BATCHES, **TAN_BATCHES}[batch]
