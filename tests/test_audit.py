"""The empirical privacy audit: the one-run bound itself, and audits of a correct and a broken DP-SGD run."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import CIFAR10_DIR, needs_cifar10, subprocess_env
from eqdp_tf import audit
from eqdp_tf.config import TrainConfig
from eqdp_tf.privacy import accounting

needs_data = needs_cifar10

# 20 steps at q = 1/8 with sigma = 1.5: accountant epsilon 2.43 at delta 1e-5.
AUDITED = dict(data_dir=CIFAR10_DIR, train_subset=512, test_subset=64, steps=20, batch_size=64,
               physical_batch_size=64, num_views=1, noise_multiplier=1.5, l2_norm_clip=1.0, learning_rate=0.1)
FLAGS = [f"--{k}={v}" for k, v in AUDITED.items()]


# --------------------------------------------------------------------------------------------
# The bound


def test_pure_dp_bound_has_closed_form():
    # all r guesses right and delta = 0: p-value p^r, so the bound solves p^r = 1 - confidence
    p = 0.05 ** (1 / 100)
    assert audit.p_value(1000, 100, 100, math.log(p / (1 - p)), 0.0) == pytest.approx(0.05)
    assert audit.epsilon_lower_bound(1000, 100, 100, 0.0, 0.95) == pytest.approx(math.log(p / (1 - p)), abs=1e-9)


def test_bound_properties():
    assert audit.epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0  # chance-level guessing proves nothing
    assert audit.epsilon_lower_bound(1000, 200, 120, 1e-5) < audit.epsilon_lower_bound(1000, 200, 160, 1e-5)
    assert audit.epsilon_lower_bound(1000, 200, 180, 1e-5) <= audit.epsilon_lower_bound(1000, 200, 180, 0.0)
    # a large delta swamps the evidence
    assert audit.epsilon_lower_bound(1000, 200, 180, 1e-2) < audit.epsilon_lower_bound(1000, 200, 180, 1e-6)
    eps = [0.0, 0.5, 1.0, 2.0, 4.0]
    assert np.all(np.diff([audit.p_value(500, 100, 80, e, 1e-5) for e in eps]) >= 0)
    with pytest.raises(ValueError):
        audit.p_value(10, 20, 5, 1.0, 0.0)


def test_bound_is_sound_for_the_worst_eps_dp_mechanism():
    """Randomized response is exactly eps-DP per canary: the bound may exceed eps in at most 5% of audits."""
    rng = np.random.default_rng(7)
    eps, m = 1.0, 1000
    p = math.exp(eps) / (1 + math.exp(eps))
    bounds = [audit.epsilon_lower_bound(m, m, int((rng.random(m) < p).sum()), 0.0) for _ in range(200)]
    assert np.mean(np.array(bounds) > eps) <= 0.08
    assert 0.7 < np.median(bounds) < eps  # and it is not vacuous


def test_best_guess_bound_uses_the_best_split_with_bonferroni():
    rng = np.random.default_rng(1)
    included = rng.random(2000) < 0.5
    perfect = audit.best_guess_bound(np.where(included, 1.0, 0.0) + 0.01 * rng.random(2000), included, 1e-5)
    bound, guesses, correct, k_in, k_out = perfect
    assert correct >= 0.99 * guesses and k_in + k_out == guesses and bound > 4.5
    # one test at the Bonferroni-corrected level reproduces it
    assert bound == pytest.approx(audit.epsilon_lower_bound(2000, guesses, correct, 1e-5, 1 - 0.05 / 14))
    assert audit.best_guess_bound(rng.random(2000), included, 1e-5)[0] < 0.3


# --------------------------------------------------------------------------------------------
# Audits of real training runs (a small CNN on a CIFAR-10 subset, through our DPStep)


@needs_data
def test_correctly_noised_run_stays_below_the_accountant():
    result = audit.run_audit(TrainConfig(**AUDITED), num_canaries=2000, model_fn=audit.small_model)
    expected = accounting.compute_epsilon(1.5, 64 / 512, 20, 1e-5)
    assert result.accountant_epsilon == pytest.approx(expected)
    assert 0.0 <= result.epsilon_lower_bound <= result.accountant_epsilon
    assert not result.leaking
    assert result.canaries == 2000 and 900 < result.included < 1100
    print(result.summary())


@needs_data
def test_run_without_noise_and_clipping_is_flagged_as_leaking():
    result = audit.run_audit(TrainConfig(**AUDITED), num_canaries=2000, model_fn=audit.small_model, broken=True)
    assert result.broken and result.leaking
    assert result.epsilon_lower_bound > result.accountant_epsilon + 1.0
    assert "LEAKING" in result.summary()
    print(result.summary())


@needs_data
def test_audit_command(tmp_path):
    report = tmp_path / "audit.json"
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, "-m", "eqdp_tf.audit", *FLAGS, "--audit_model=small", "--audit_canaries=2000",
         "--audit_break", f"--audit_json={report}", f"--output_dir={tmp_path / 'unused'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # 1: leaking
    assert "Traceback" not in proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("empirical epsilon lower bound ") and "LEAKING" in last
    data = json.loads(report.read_text())
    assert data["leaking"] is True and data["broken"] is True and data["model"] == "audit_small_cnn"
    assert sorted(os.listdir(tmp_path)) == ["audit.json"]  # the audit writes nothing else
    bad = subprocess.run([sys.executable, "-m", "eqdp_tf.audit", *FLAGS, "--audit_canaries=3"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --audit_canaries must be a whole number >= 10, got 3"


@needs_data
def test_audit_of_a_simulated_run_tests_its_own_epsilon():
    """A TAN-simulated configuration trains at the real batch with sigma scaled down: the audit's accountant
    epsilon is that run's own, not the simulated run's."""
    settings = {**AUDITED, "steps": 3, "simulated_batch_size": 256, "target_epsilon": None}
    cfg = TrainConfig(**settings)
    result = audit.run_audit(cfg, 100, 0.95, False, audit.small_model)
    q = 64 / 512
    assert result.noise_multiplier == pytest.approx(1.5 * 64 / 256)
    assert result.accountant_epsilon == pytest.approx(accounting.compute_epsilon(1.5 * 64 / 256, q, 3, 1e-5))
    assert result.accountant_epsilon > accounting.compute_epsilon(1.5, 256 / 512, 3, 1e-5)
