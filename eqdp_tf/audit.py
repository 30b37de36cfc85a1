"""Empirical privacy audit: a lower bound on epsilon from one training run with canary gradients.

    python -m eqdp_tf.audit --flagfile=configs/smoke.cfg [--audit_canaries=1000] [--audit_model=small]
                            [--audit_break] [--audit_json=audit.json]

One-run auditing (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training run"), white-box
with gradient canaries, on our DP-SGD step:

1. ``m`` canaries. Canary i is an example whose gradient is ``canary_scale * C`` along one coordinate
   ``k_i`` of the model (a Dirac canary; the coordinates are distinct and random).
2. Each canary is included with probability 1/2, independently (S_i = +1 in, -1 out).
3. Training runs as configured. In every step each included canary is Poisson-sampled with the step's rate
   q, like any example; a sampled canary's gradient is clipped by ``dp_step.clip_per_example`` (the clipping
   of the real step) and added to the step's sum of clipped gradients before ``DPStep`` adds the noise.
4. Score_i = w_0[k_i] - w_T[k_i]: how far the final weights moved against the canary direction.
5. The auditor guesses "in" for the k+ highest scores and "out" for the k- lowest, abstaining on the rest:
   r guesses, v of them right.
6. If training is (eps, delta)-DP, then (their Theorem, as stated in their Appendix D)
       P[v or more right] <= beta + 2 m delta alpha,
   beta = P[Binomial(r, p) >= v], p = e^eps / (1 + e^eps),
   alpha = max over 1 <= i <= v of P[v - i <= Binomial(r, p) < v] / i.
   The lower bound is the largest eps this rejects at the chosen confidence. Several (k+, k-) are tried,
   with a Bonferroni correction, so reporting the best of them keeps the confidence.

With ``--simulated_batch_size`` (a TAN simulation, see ``privacy.simulation``) the audit runs the configuration as
trained, at the real batch size and the scaled-down sigma, so it tests the run's own (large) epsilon, never the
simulated one.

``--audit_break`` trains with no noise and no clipping while the accountant still reports the configured
sigma and C: a deliberately broken implementation, which the audit must flag as leaking (lower bound above
the accountant's epsilon). Audits are loose: for a correct run the bound sits far below the accountant's
epsilon; it is a test that catches gross failures (no noise, no clipping, noise reused), not a measurement.
"""

import dataclasses
import json
import math
import sys
from typing import Callable, Optional

import numpy as np
from scipy import stats

from eqdp_tf.errors import ConfigError, one_line

GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
MAX_EPSILON = 100.0


# ---------------------------------------------------------------------------------------------------------------
# The bound


def p_value(m, r, v, epsilon, delta):
    """P[at least v of r guesses right] allowed by (epsilon, delta)-DP with m canaries (Steinke et al. 2023)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, p))
    if delta == 0 or v == 0:
        return min(1.0, beta)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[Bin = v-1], P[Bin = v-2], ..., P[Bin = 0]
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m, r, v, delta, confidence=0.95):
    """The largest epsilon that v right guesses out of r (m canaries) reject at ``confidence`` (0 if none)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < level:
        if hi >= MAX_EPSILON:
            return MAX_EPSILON
        lo, hi = hi, min(2 * hi, MAX_EPSILON)
    for _ in range(60):  # p_value grows with epsilon: keep p(lo) < level <= p(hi)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < level else (lo, mid)
    return lo


def best_guess_bound(scores, included, delta, confidence=0.95, fractions=GUESS_FRACTIONS):
    """Tries k+ = k- = k and (k+ = k, k- = 0) for k = fraction * m; returns (bound, r, v, k+, k-).

    Bonferroni: each of the 2 * len(fractions) tests runs at 1 - (1 - confidence) / count.
    """
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0)
    included = np.asarray(included, bool)
    m = len(scores)
    order = np.argsort(-scores, kind="stable")  # highest first
    choices = []
    for fraction in fractions:
        k = max(1, int(round(fraction * m)))
        choices += [(k, 0), (k, k)] if 2 * k <= m else [(k, 0)]
    per_test = 1.0 - (1.0 - confidence) / len(choices)
    best = (0.0, 0, 0, 0, 0)
    for k_in, k_out in choices:
        right = int(included[order[:k_in]].sum()) + (int((~included[order[m - k_out:]]).sum()) if k_out else 0)
        bound = epsilon_lower_bound(m, k_in + k_out, right, delta, per_test)
        if bound > best[0] or best[1] == 0:
            best = (bound, k_in + k_out, right, k_in, k_out)
    return best


# ---------------------------------------------------------------------------------------------------------------
# The audited training run


@dataclasses.dataclass
class AuditResult:
    epsilon_lower_bound: float
    accountant_epsilon: float
    confidence: float
    delta: float
    canaries: int
    included: int
    guesses: int
    correct: int
    guesses_in: int
    guesses_out: int
    steps: int
    sampling_rate: float
    noise_multiplier: float
    l2_norm_clip: float
    broken: bool
    model: str

    @property
    def leaking(self):
        """The empirical lower bound exceeds what the accountant claims: the run does not deliver its epsilon."""
        return self.epsilon_lower_bound > self.accountant_epsilon

    def to_json(self):
        data = dataclasses.asdict(self)
        data["accountant_epsilon"] = None if math.isinf(self.accountant_epsilon) else self.accountant_epsilon
        data["leaking"] = self.leaking
        return data

    def summary(self):
        verdict = ("LEAKING: the empirical lower bound exceeds the accountant's epsilon" if self.leaking
                   else "consistent: the lower bound does not exceed the accountant's epsilon")
        return (f"empirical epsilon lower bound {self.epsilon_lower_bound:.3f} ({self.confidence:.0%} confidence; "
                f"{self.canaries} canaries, {self.included} in; {self.guesses} guesses, {self.correct} right) vs "
                f"accountant epsilon {self.accountant_epsilon:.3f} (delta {self.delta}) -> {verdict}")


def small_model(dataset=None):
    """A small CNN (about 36k weights on CIFAR-10) for quick audits of the DP machinery, for the images and classes
    of ``dataset`` (a ``datasets.DatasetDescription``; None: CIFAR-10's)."""
    import tensorflow as tf

    from eqdp_tf.models import preprocessing

    if dataset is None:
        inputs, x = preprocessing.standardized_input()
        num_classes = 10
    else:
        inputs, x = preprocessing.standardized_input(tuple(dataset.image_shape), dataset.mean, dataset.std)
        num_classes = dataset.num_classes
    x = tf.keras.layers.Conv2D(16, 3, strides=2, name="conv")(x)
    x = tf.keras.layers.Activation("relu")(x)
    x = tf.keras.layers.Flatten()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(num_classes, name="logits")(x), name="audit_small_cnn")


class _Canaries:
    """``m`` Dirac canaries over a model's weights: canary i pushes weight ``coords[i]`` with gradient norm
    ``norm``, and takes part in training only where ``included[i]``."""

    def __init__(self, variables, num_canaries, rng, norm):
        self.variables = list(variables)
        sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.total = sum(sizes)
        if num_canaries > self.total:
            raise ConfigError(f"--audit_canaries={num_canaries} exceeds the model's {self.total} weights")
        self.coords = rng.choice(self.total, size=num_canaries, replace=False)
        self.included = rng.random(num_canaries) < 0.5
        self.offsets = np.cumsum([0] + sizes)
        self.norm = norm

    def gradients(self, sampled):
        """Per-variable [n, *shape] gradients of the sampled canaries (one Dirac vector each)."""
        import tensorflow as tf

        rows = np.zeros((len(sampled), self.total), np.float32)
        rows[np.arange(len(sampled)), self.coords[sampled]] = self.norm
        return [tf.constant(rows[:, self.offsets[i]:self.offsets[i + 1]].reshape((len(sampled), *v.shape)))
                for i, v in enumerate(self.variables)]

    def weights(self):
        return np.concatenate([v.numpy().ravel() for v in self.variables])


def _train_with_canaries(cfg, step_fn, optimizer, dataset, canaries, q, rng, broken, verbose):
    """The configured training, each step's included canaries Poisson-sampled like examples and added to the
    step's sum of clipped gradients before the noise."""
    import tensorflow as tf

    from eqdp_tf.privacy.dp_step import clip_per_example

    accumulate, apply_update = step_fn.compiled_accumulate(False), step_fn.compiled_apply(False)
    step = 0
    for batch in dataset:
        accumulate(batch["views"], batch["labels"], batch["mask"])
        if not bool(batch["last"]):
            continue
        sampled = np.flatnonzero(canaries.included & (rng.random(len(canaries.included)) < q))
        if len(sampled):
            grads = canaries.gradients(sampled)
            if not broken:
                grads, _ = clip_per_example(grads, cfg.l2_norm_clip)
            for acc, g in zip(step_fn.accumulators, grads):
                acc.assign_add(tf.reduce_sum(g, axis=0))
        step += 1
        optimizer.set_noise_seed(rng.integers(0, 2**62, size=2))
        apply_update()
        if verbose:
            print(f"audit step {step}/{cfg.steps}: {len(sampled)} canaries sampled", flush=True)


def run_audit(cfg, num_canaries=1000, confidence=0.95, broken=False, model_fn: Optional[Callable] = None,
              canary_scale=10.0, seed=0, verbose=False) -> AuditResult:
    """Trains ``cfg`` (a TrainConfig; its output_dir is not used) once with canaries; returns the audit.

    ``model_fn(description)`` (given the dataset's ``DatasetDescription``) replaces the configured architecture (e.g.
    ``small_model``). ``broken=True`` trains without noise and without clipping, but the accountant's epsilon is
    still that of the configured settings.
    """
    # The arguments first: a bad one is refused before TensorFlow loads (and logs).
    if not cfg.dp:
        raise ConfigError("the audit checks a DP configuration; --dp=false claims no guarantee to audit")
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 10:
        raise ConfigError(f"--audit_canaries must be a whole number >= 10, got {num_canaries!r}")
    if not canary_scale >= 1:
        raise ConfigError(f"canary_scale must be >= 1 (the canary's gradient norm in units of C), got {canary_scale}")
    import tensorflow as tf

    from eqdp_tf import data as data_lib
    from eqdp_tf.privacy import accounting
    from eqdp_tf.privacy.dp_step import DPKerasSGDOptimizer, DPStep
    from eqdp_tf.training import loop
    from eqdp_tf.training import plan as plan_lib

    tf.keras.utils.set_random_seed(cfg.seed)
    rng = np.random.default_rng([seed, 0xA0D1])
    loaded = loop.load_data(cfg)
    train_images, train_labels = loaded.train_images, loaded.train_labels
    num_examples = len(train_labels)
    sampler = plan_lib.make_sampler(cfg, num_examples, seed=int(rng.integers(2**62)))
    q = cfg.batch_size / num_examples
    sigma = plan_lib.resolve_noise(cfg, q)
    accountant_epsilon = accounting.compute_epsilon(sigma, q, cfg.steps, cfg.delta)

    model = model_fn(loaded.description) if model_fn is not None else loop.build_model(cfg, loaded.description)
    clip = 1e12 if broken else cfg.l2_norm_clip  # "no clipping": a bound no gradient reaches
    optimizer = DPKerasSGDOptimizer(l2_norm_clip=clip, noise_multiplier=0.0 if broken else sigma,
                                    expected_batch_size=sampler.expected_batch_size,
                                    learning_rate=cfg.learning_rate, momentum=cfg.momentum)
    step_fn = DPStep(model, None, optimizer, view_reduction=cfg.view_reduction, dp=True)
    canaries = _Canaries(model.trainable_variables, num_canaries, rng, canary_scale * cfg.l2_norm_clip)
    initial = canaries.weights()
    dataset = data_lib.make_train_dataset(train_images, train_labels, sampler, cfg.num_views, cfg.seed,
                                          num_steps=cfg.steps, crop_padding=loaded.description.crop_padding)
    _train_with_canaries(cfg, step_fn, optimizer, dataset, canaries, q, rng, broken, verbose)
    scores = (initial - canaries.weights())[canaries.coords]
    included = canaries.included
    bound, guesses, correct, k_in, k_out = best_guess_bound(scores, included, cfg.delta, confidence)
    return AuditResult(
        epsilon_lower_bound=bound, accountant_epsilon=accountant_epsilon, confidence=confidence, delta=cfg.delta,
        canaries=num_canaries, included=int(included.sum()), guesses=guesses, correct=correct, guesses_in=k_in,
        guesses_out=k_out, steps=cfg.steps, sampling_rate=q, noise_multiplier=sigma, l2_norm_clip=cfg.l2_norm_clip,
        broken=bool(broken), model=model.name,
    )


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _define_flags():
    from absl import flags

    from eqdp_tf import config

    config.define_flags()
    if "audit_canaries" in flags.FLAGS:
        return
    flags.DEFINE_integer("audit_canaries", 1000, "Number of canary gradients (each included with probability 1/2).")
    flags.DEFINE_float("audit_confidence", 0.95, "Confidence of the lower bound.")
    flags.DEFINE_enum("audit_model", "config", ["config", "small"],
                      "'config': the configured architecture; 'small': a small CNN, for a quick check.")
    flags.DEFINE_boolean("audit_break", False, "Train without noise and clipping (a deliberately broken run that "
                         "the audit must flag), while the accountant reports the configured settings.")
    flags.DEFINE_integer("audit_seed", 0, "Seed of the canaries, their inclusion and sampling, and the noise.")
    flags.DEFINE_string("audit_json", None, "Also write the result as JSON to this file.")


def main(argv):
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from absl import flags, logging

    from eqdp_tf import config
    from eqdp_tf.errors import UserError
    from eqdp_tf.native_log import native_log_level

    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])} (flags look like --name=value)", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.ERROR)
    f = flags.FLAGS
    try:
        cfg = config.config_from_flags()
        # TensorFlow 2.18+ logs from C++ while it loads and first finds its devices, whatever TF_CPP_MIN_LOG_LEVEL
        # says: filtered here so that an error stays one line (lines at or above the level pass).
        with native_log_level():
            result = run_audit(cfg, f.audit_canaries, f.audit_confidence, f.audit_break,
                               small_model if f.audit_model == "small" else None, seed=f.audit_seed, verbose=True)
        if f.audit_json:
            try:
                with open(f.audit_json, "w") as out:
                    json.dump(result.to_json(), out, indent=2)
                    out.write("\n")
            except OSError as err:
                raise ConfigError(f"cannot write --audit_json {f.audit_json}: {one_line(err)}") from None
    except (UserError, ValueError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(result.summary())
    if cfg.simulated_batch_size is not None:
        print(f"note: --simulated_batch_size={cfg.simulated_batch_size} makes this a TAN simulation: it trains at "
              f"--batch_size={cfg.batch_size} with sigma scaled down, and the audit tests that run's own epsilon "
              "(the accountant's above). The simulated run's epsilon is no guarantee of this run; it is not audited.")
    return 1 if result.leaking else 0


if __name__ == "__main__":
    from absl import app

    from eqdp_tf import config as _config

    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_config.parse_flags)
