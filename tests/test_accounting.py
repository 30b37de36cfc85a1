"""Tests for eqdp_tf.privacy.accounting: ε against dp_accounting and TF-Privacy, calibration, ledger, report."""

import json
import math
import os
import re

import dp_accounting
import pytest
from dp_accounting import rdp

from eqdp_tf.errors import ConfigError, PrivacyError
from eqdp_tf.privacy import accounting
from eqdp_tf.privacy.accounting import (
    PrivacyLedger,
    PrivacyReport,
    calibrate_noise_multiplier,
    compute_epsilon,
    validate_privacy_params,
)

# The paper's main configuration: CIFAR-10, expected batch 8192, 2160 steps, δ = 1e-5.
N = 50000
BATCH = 8192
Q = BATCH / N
STEPS = 2160
DELTA = 1e-5


def direct_epsilon(segments, delta, orders=None):
    """ε straight from dp_accounting: each (q, σ, steps) segment composed into one RdpAccountant in turn."""
    accountant = rdp.RdpAccountant(orders)
    for q, sigma, steps in segments:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def poisson_epsilon_in_statement(text):
    """The 'assuming Poisson sampling' example-level ε printed (to 3 decimals) by TF-Privacy's statement."""
    match = re.search(r"Epsilon assuming Poisson sampling \(\*\):\s+([0-9.]+)", text)
    assert match, text
    return float(match.group(1))


# ---------------------------------------------------------------------------------------------------------------
# compute_epsilon


@pytest.mark.parametrize(
    "sigma, q, steps, delta",
    [(4.9, Q, STEPS, DELTA), (1.1, 256 / 60000, 10000, 1e-5), (0.8, 0.01, 500, 1e-6), (2.0, 1.0, 10, 1e-5)],
)
def test_compute_epsilon_matches_rdp_accountant(sigma, q, steps, delta):
    eps = compute_epsilon(sigma, q, steps, delta)
    assert math.isfinite(eps) and eps > 0
    assert eps == pytest.approx(direct_epsilon([(q, sigma, steps)], delta), rel=1e-12)


def test_compute_epsilon_uses_given_orders():
    orders = [1.5, 2, 4, 8, 16, 32, 64]
    eps = compute_epsilon(4.9, Q, STEPS, DELTA, orders=orders)
    assert eps == pytest.approx(direct_epsilon([(Q, 4.9, STEPS)], DELTA, orders), rel=1e-12)
    # A coarser set of orders can only give a looser (larger or equal) bound than the default fine grid.
    assert eps >= compute_epsilon(4.9, Q, STEPS, DELTA) - 1e-12


def test_compute_epsilon_special_cases():
    assert compute_epsilon(0.0, Q, STEPS, DELTA) == math.inf
    assert compute_epsilon(4.9, Q, 0, DELTA) == 0.0
    assert compute_epsilon(0.0, Q, 0, DELTA) == 0.0


# Steps 49 and 53 are cases where TF-Privacy's ceil(epochs / q) would round up to one extra step.
@pytest.mark.parametrize(
    "sigma, batch, steps", [(4.9, BATCH, STEPS), (1.0, 512, 1000), (2.0, BATCH, 49), (3.0, BATCH, 53)]
)
def test_compute_epsilon_matches_tf_privacy_statement(sigma, batch, steps):
    text = accounting.tf_privacy_statement(N, batch, steps, sigma, DELTA)
    assert "without microbatching" in text
    ours = compute_epsilon(sigma, batch / N, steps, DELTA)
    assert poisson_epsilon_in_statement(text) == pytest.approx(ours, abs=6e-4)


@pytest.mark.parametrize("sigma, steps", [(2.0, 49), (3.0, 53)])
def test_statement_epoch_nudge_is_needed(sigma, steps):
    # Passing epochs = steps * q naively makes TF-Privacy count ceil(epochs / q) = steps + 1 steps here...
    assert math.ceil(steps * Q / Q) == steps + 1
    # ...and one step more is visible at the 3 decimals the statement prints, so the match above is a real check.
    assert compute_epsilon(sigma, Q, steps + 1, DELTA) - compute_epsilon(sigma, Q, steps, DELTA) > 2e-3


def test_microbatching_default_in_tf_privacy_halves_noise():
    from tensorflow_privacy.privacy.analysis.compute_dp_sgd_privacy_lib import compute_dp_sgd_privacy_statement

    text = compute_dp_sgd_privacy_statement(
        number_of_examples=N, batch_size=BATCH, num_epochs=STEPS * Q, noise_multiplier=4.9, delta=DELTA
    )  # used_microbatching=True by default: the pitfall.
    pitfall = poisson_epsilon_in_statement(text)
    ours = compute_epsilon(4.9, Q, STEPS, DELTA)
    assert pitfall > 2 * ours
    assert pitfall == pytest.approx(compute_epsilon(4.9 / 2, Q, STEPS, DELTA), abs=6e-4)


# ---------------------------------------------------------------------------------------------------------------
# Monotonicity


def test_epsilon_grows_with_steps():
    eps = [compute_epsilon(2.0, 0.01, steps, DELTA) for steps in (1, 10, 100, 1000, 5000)]
    assert all(a < b for a, b in zip(eps, eps[1:])), eps


def test_epsilon_grows_with_sampling_rate():
    eps = [compute_epsilon(2.0, q, 500, DELTA) for q in (0.001, 0.01, 0.05, 0.2, 1.0)]
    assert all(a < b for a, b in zip(eps, eps[1:])), eps


def test_epsilon_falls_with_noise():
    eps = [compute_epsilon(sigma, Q, STEPS, DELTA) for sigma in (0.7, 1.0, 2.0, 4.9, 10.0, 50.0)]
    assert all(a > b for a, b in zip(eps, eps[1:])), eps


def test_epsilon_falls_with_delta():
    assert compute_epsilon(4.9, Q, STEPS, 1e-6) > compute_epsilon(4.9, Q, STEPS, 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Calibration


@pytest.mark.parametrize("target", [1.0, 2.0, 3.0, 5.0, 8.0])
def test_calibration_is_tight_and_meets_target(target):
    sigma = calibrate_noise_multiplier(target, Q, STEPS, DELTA)
    assert compute_epsilon(sigma, Q, STEPS, DELTA) <= target
    assert compute_epsilon(sigma - 0.01, Q, STEPS, DELTA) > target


def test_calibration_paper_config():
    sigma = calibrate_noise_multiplier(8.0, Q, STEPS, DELTA)
    assert 4.5 <= sigma <= 5.5
    assert sigma == pytest.approx(4.94, abs=0.02)  # Measured: 4.9375 (ε = 7.988); the paper quotes σ ≈ 4.9.


def test_calibration_finer_tolerance_and_small_sigma():
    sigma = calibrate_noise_multiplier(8.0, Q, STEPS, DELTA, tolerance=1e-4)
    assert compute_epsilon(sigma, Q, STEPS, DELTA) <= 8.0 < compute_epsilon(sigma - 1e-4, Q, STEPS, DELTA)
    # A generous budget over few steps needs σ < 1: the search must also work below its first guess.
    sigma = calibrate_noise_multiplier(20.0, 0.01, 100, DELTA)
    assert 0 < sigma < 1
    assert compute_epsilon(sigma, 0.01, 100, DELTA) <= 20.0 < compute_epsilon(max(sigma - 0.01, 1e-3), 0.01, 100, DELTA)


def test_calibration_zero_steps_needs_no_noise():
    assert calibrate_noise_multiplier(1.0, Q, 0, DELTA) == 0.0


@pytest.mark.parametrize("target", [0.0, -1.0])
def test_calibration_rejects_non_positive_target(target):
    with pytest.raises(PrivacyError, match=r"target_epsilon must be > 0"):
        calibrate_noise_multiplier(target, Q, STEPS, DELTA)


def test_calibration_rejects_unreachable_target():
    with pytest.raises(PrivacyError, match=r"target_epsilon=0.001 is unreachable"):
        calibrate_noise_multiplier(1e-3, Q, STEPS, DELTA)


def test_calibration_rejects_bad_tolerance():
    with pytest.raises(PrivacyError, match=r"tolerance must be > 0"):
        calibrate_noise_multiplier(8.0, Q, STEPS, DELTA, tolerance=0)


# ---------------------------------------------------------------------------------------------------------------
# Ledger


def test_ledger_merges_equal_segments():
    ledger = PrivacyLedger()
    for _ in range(100):
        ledger.record(Q, 4.9)
    ledger.record(Q, 4.9, steps=0)  # No-op.
    assert ledger.segments == [(Q, 4.9, 100)]
    ledger.record(Q, 4.9, steps=50)
    ledger.record(0.1, 4.9, steps=5)
    ledger.record(0.1, 3.0, steps=5)
    ledger.record(Q, 4.9, steps=7)  # Equal to an earlier segment but not the last: a new segment.
    assert ledger.segments == [(Q, 4.9, 150), (0.1, 4.9, 5), (0.1, 3.0, 5), (Q, 4.9, 7)]
    assert ledger.total_steps == 167


def test_homogeneous_ledger_equals_compute_epsilon():
    ledger = PrivacyLedger()
    for _ in range(STEPS // 360):
        ledger.record(Q, 4.9, steps=360)
    assert len(ledger.segments) == 1 and ledger.total_steps == STEPS
    assert ledger.epsilon(DELTA) == pytest.approx(compute_epsilon(4.9, Q, STEPS, DELTA), rel=1e-12)


def test_heterogeneous_ledger_equals_direct_composition():
    segments = [(Q, 4.9, 1000), (4096 / N, 3.0, 300), (Q, 6.0, 860)]
    ledger = PrivacyLedger(segments)
    eps = ledger.epsilon(DELTA)
    assert eps == pytest.approx(direct_epsilon(segments, DELTA), rel=1e-12)
    # Composition costs more than any part and less than the parts' ε added up (RDP composes before converting).
    parts = [compute_epsilon(sigma, q, steps, DELTA) for q, sigma, steps in segments]
    assert max(parts) < eps < sum(parts)
    orders = [2, 4, 8, 16, 32]
    assert ledger.epsilon(DELTA, orders=orders) == pytest.approx(direct_epsilon(segments, DELTA, orders), rel=1e-12)


def test_ledger_special_cases():
    assert PrivacyLedger().epsilon(DELTA) == 0.0
    assert PrivacyLedger().total_steps == 0
    assert PrivacyLedger([(Q, 4.9, 10), (Q, 0.0, 1)]).epsilon(DELTA) == math.inf


def test_ledger_json_round_trip():
    ledger = PrivacyLedger([(Q, 4.9, 1000), (4096 / N, 3.0, 300)])
    data = json.loads(json.dumps(ledger.to_json()))
    assert data == {
        "accountant": "RDP",
        "segments": [
            {"sampling_rate": Q, "noise_multiplier": 4.9, "steps": 1000},
            {"sampling_rate": 4096 / N, "noise_multiplier": 3.0, "steps": 300},
        ],
    }
    restored = PrivacyLedger.from_json(data)
    assert restored == ledger
    assert restored.epsilon(DELTA) == ledger.epsilon(DELTA)
    restored.record(4096 / N, 3.0, steps=10)  # Floats survive JSON exactly, so resuming still merges.
    assert restored.segments[-1] == (4096 / N, 3.0, 310)


@pytest.mark.parametrize(
    "data, match",
    [
        ([], r"must be a dict with a 'segments' list"),
        ({"accountant": "PLD", "segments": []}, r"accountant must be 'RDP'"),
        ({"segments": [{"sampling_rate": Q, "steps": 3}]}, r"must have exactly the keys"),
        ({"segments": [{"sampling_rate": 2.0, "noise_multiplier": 1.0, "steps": 3}]}, r"sampling_rate must be in"),
    ],
)
def test_ledger_from_json_rejects_bad_data(data, match):
    with pytest.raises(PrivacyError, match=match):
        PrivacyLedger.from_json(data)


def test_ledger_record_validates():
    ledger = PrivacyLedger()
    with pytest.raises(PrivacyError, match=r"noise_multiplier must be >= 0, got -1"):
        ledger.record(Q, -1.0)
    with pytest.raises(PrivacyError, match=r"steps must be a whole number >= 0; got 1.5"):
        ledger.record(Q, 1.0, steps=1.5)
    assert ledger.segments == []


# ---------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise_multiplier": -0.1}, r"noise_multiplier must be >= 0, got -0.1\."),
        ({"noise_multiplier": float("nan")}, r"noise_multiplier must be a finite number; got nan"),
        ({"sampling_rate": 0.0}, r"sampling_rate must be in \(0, 1\], got 0.0\."),
        ({"sampling_rate": 1.5}, r"sampling_rate must be in \(0, 1\], got 1.5\."),
        ({"steps": -1}, r"steps must be a whole number >= 0; got -1$"),
        ({"steps": 2.5}, r"steps must be a whole number"),
        ({"delta": 0.0}, r"delta must be in \(0, 1\), got 0.0\."),
        ({"delta": 1.0}, r"delta must be in \(0, 1\), got 1.0\."),
        ({"l2_norm_clip": 0.0}, r"l2_norm_clip must be > 0, got 0.0\."),
        ({"l2_norm_clip": -1.0}, r"l2_norm_clip must be > 0, got -1.0\."),
        ({"dataset_size": 0}, r"dataset_size must be >= 1, got 0\."),
        ({"noise_multiplier": "1.0"}, r"noise_multiplier must be a finite number; got '1.0'"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(PrivacyError, match=match) as info:
        validate_privacy_params(**kwargs)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_compute_epsilon_validates():
    with pytest.raises(PrivacyError, match=r"sampling_rate must be in"):
        compute_epsilon(1.0, 0.0, 10, DELTA)
    with pytest.raises(PrivacyError, match=r"delta must be in"):
        compute_epsilon(1.0, Q, 10, 0.0)
    with pytest.raises(PrivacyError, match=r"orders must be a non-empty list of RDP orders > 1"):
        compute_epsilon(1.0, Q, 10, DELTA, orders=[1.0, 2.0])


def test_validation_accepts_good_params_without_warnings():
    assert validate_privacy_params(4.9, Q, STEPS, DELTA, 1.0, N) == []
    assert validate_privacy_params() == []
    assert validate_privacy_params(noise_multiplier=0.0, sampling_rate=1.0, steps=0) == []


def test_validation_warns_on_large_delta():
    warnings = validate_privacy_params(delta=1e-4, dataset_size=N)
    assert len(warnings) == 1
    assert "delta=0.0001 is not below 1/dataset_size=2e-05" in warnings[0]
    assert len(validate_privacy_params(delta=1 / N, dataset_size=N)) == 1  # δ = 1/N is already weak.


# ---------------------------------------------------------------------------------------------------------------
# PrivacyReport and the TF-Privacy statement

REPORT_FIELDS = {
    "accountant", "noise_multiplier", "sampling_rate", "sampling_method", "steps", "batch_size", "dataset_size",
    "l2_norm_clip", "delta", "epsilon", "note", "ledger",
}


def make_report(**overrides):
    kwargs = dict(
        noise_multiplier=4.9, sampling_rate=Q, sampling_method="poisson", steps=STEPS, batch_size=BATCH,
        dataset_size=N, l2_norm_clip=1.0, delta=DELTA, epsilon=compute_epsilon(4.9, Q, STEPS, DELTA),
    )
    kwargs.update(overrides)
    return PrivacyReport(**kwargs)


def strict_json_load(path):
    def reject(constant):
        raise AssertionError(f"not valid JSON: {constant}")

    with open(path) as f:
        return json.load(f, parse_constant=reject)


def test_report_writes_all_fields(tmp_path):
    report = make_report()
    path = report.write(str(tmp_path / "privacy.json"))
    assert path == str(tmp_path / "privacy.json")
    data = strict_json_load(path)
    assert set(data) == REPORT_FIELDS
    assert data["accountant"] == "RDP"
    assert data["sampling_method"] == "poisson"
    assert data["epsilon"] == pytest.approx(8.062, abs=1e-3)
    assert (data["noise_multiplier"], data["sampling_rate"], data["steps"]) == (4.9, Q, STEPS)
    assert (data["batch_size"], data["dataset_size"], data["l2_norm_clip"], data["delta"]) == (BATCH, N, 1.0, DELTA)
    assert "add-or-remove-one" in data["note"] and "assumes Poisson" not in data["note"]
    assert PrivacyReport.from_json(data) == report
    assert os.listdir(tmp_path) == ["privacy.json"]  # No temporary file left behind.


def test_report_shuffle_note_and_round_trip(tmp_path):
    report = make_report(sampling_method="shuffle", note="Run 3.")
    assert "Epsilon assumes Poisson sampling" in report.note
    assert report.note.endswith("Run 3.")
    path = report.write(str(tmp_path))  # A folder gets privacy.json.
    assert os.path.basename(path) == "privacy.json"
    data = strict_json_load(path)
    assert "Epsilon assumes Poisson sampling" in data["note"]
    again = PrivacyReport.from_json(data)
    assert again.note == report.note  # The standard text is not repeated on re-reading.


def test_report_infinite_epsilon_is_null(tmp_path):
    report = make_report(noise_multiplier=0.0, epsilon=math.inf)
    data = strict_json_load(report.write(str(tmp_path / "privacy.json")))
    assert data["epsilon"] is None
    assert PrivacyReport.from_json(data).epsilon == math.inf


def test_report_write_replaces_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "privacy.json")
    make_report(steps=100).write(path)
    make_report(steps=200).write(path)
    assert strict_json_load(path)["steps"] == 200

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        make_report(steps=300).write(path)
    assert strict_json_load(path)["steps"] == 200  # The old file is intact...
    assert os.listdir(tmp_path) == ["privacy.json"]  # ...and the temporary file is gone.


def test_report_from_ledger():
    ledger = PrivacyLedger([(Q, 4.9, 1000), (4096 / N, 3.0, 300)])
    report = PrivacyReport.from_ledger(ledger, delta=DELTA, batch_size=4096, dataset_size=N, l2_norm_clip=1.0)
    assert report.steps == 1300 and report.epsilon == ledger.epsilon(DELTA)
    assert (report.sampling_rate, report.noise_multiplier) == (4096 / N, 3.0)
    assert "composes 2 segments" in report.note
    assert PrivacyLedger.from_json(report.to_json()["ledger"]) == ledger
    with pytest.raises(PrivacyError, match=r"empty privacy ledger"):
        PrivacyReport.from_ledger(PrivacyLedger(), delta=DELTA, batch_size=1, dataset_size=N, l2_norm_clip=1.0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"sampling_method": "fixed"}, r"sampling_method must be one of \('poisson', 'shuffle'\), got 'fixed'\."),
        ({"accountant": "PLD"}, r"accountant must be 'RDP', got 'PLD'\."),
        ({"l2_norm_clip": 0.0}, r"l2_norm_clip must be > 0"),
        ({"batch_size": 0}, r"batch_size must be >= 1, got 0\."),
        ({"epsilon": -1.0}, r"epsilon must be a number >= 0"),
    ],
)
def test_report_validates(overrides, match):
    with pytest.raises(PrivacyError, match=match):
        make_report(**overrides)


def test_tf_privacy_statement_validates():
    with pytest.raises(PrivacyError, match=r"batch_size must be in \[1, dataset_size=100\], got 200\."):
        accounting.tf_privacy_statement(100, 200, 10, 1.0, DELTA)
    with pytest.raises(PrivacyError, match=r"needs steps >= 1, got 0\."):
        accounting.tf_privacy_statement(N, BATCH, 0, 1.0, DELTA)


def test_report_from_json_ignores_extra_keys_and_names_missing_ones(tmp_path):
    report = make_report()
    data = strict_json_load(report.write(str(tmp_path / "privacy.json")))
    # The training loop adds its own bookkeeping to privacy.json; reading it back must still work.
    assert PrivacyReport.from_json({**data, "steps_spent": 7, "model_steps": 7}) == report
    del data["delta"]
    with pytest.raises(PrivacyError, match="missing delta"):
        PrivacyReport.from_json(data)


def test_calibration_with_steps_already_spent_meets_the_target_composed():
    spent = PrivacyLedger()
    spent.record(Q, 4.0, 200)
    sigma = calibrate_noise_multiplier(8.0, Q, STEPS - 200, DELTA, spent=spent)
    total = PrivacyLedger(spent.segments)
    total.record(Q, sigma, STEPS - 200)
    assert total.epsilon(DELTA) <= 8.0
    below = PrivacyLedger(spent.segments)
    below.record(Q, sigma - 0.01, STEPS - 200)
    assert below.epsilon(DELTA) > 8.0  # the smallest such sigma, to the tolerance
    with pytest.raises(PrivacyError, match="already taken spent epsilon"):
        calibrate_noise_multiplier(spent.epsilon(DELTA) * 0.5, Q, 10, DELTA, spent=spent)
