"""TAN simulation (--simulated_batch_size): sigma scaling, both epsilons against dp_accounting, labels everywhere."""

import json
import os

import dp_accounting
import pytest

from conftest import CIFAR10_DIR, needs_cifar10
from eqdp_tf.config import TrainConfig
from eqdp_tf.errors import ConfigError
from eqdp_tf.privacy import accounting
from eqdp_tf.privacy.simulation import Simulation

DELTA = 1e-5


def _independent_epsilon(sampling_rate, noise_multiplier, steps, delta=DELTA):
    """Epsilon straight from dp_accounting's RDP accountant, without our accounting module."""
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def test_sigma_scales_with_the_batch_ratio():
    sim = Simulation(batch_size=256, simulated_batch_size=8192)
    assert sim.ratio == 32
    # The paper's sigma 4.93 at 8192 is 0.154 at 256 (issue 12's example).
    assert sim.real_noise_multiplier(4.93) == pytest.approx(4.93 * 256 / 8192)
    assert sim.real_noise_multiplier(4.93) == pytest.approx(0.1541, abs=1e-4)


def test_simulated_ledger_scales_rate_and_sigma_per_segment():
    ledger = accounting.PrivacyLedger()
    ledger.record(0.01, 0.2, 5)
    ledger.record(0.01, 0.3, 2)
    scaled = Simulation(100, 400).simulated_ledger(ledger)
    assert [(s.sampling_rate, s.noise_multiplier, s.steps) for s in scaled.segments] == [
        (pytest.approx(0.04), pytest.approx(0.8), 5), (pytest.approx(0.04), pytest.approx(1.2), 2)]


def test_both_epsilons_match_dp_accounting():
    ledger = accounting.PrivacyLedger()
    ledger.record(256 / 50000, 4.94 * 256 / 8192, 2160)
    sim = Simulation(256, 8192)
    simulated = sim.epsilon(ledger, DELTA)
    assert simulated == pytest.approx(_independent_epsilon(8192 / 50000, 4.94, 2160), rel=1e-9)
    assert 7.5 < simulated < 8.5  # the paper's setting: sigma 4.94 at 8192 x 2160 steps is epsilon ~8
    own = ledger.epsilon(DELTA)
    assert own == pytest.approx(_independent_epsilon(256 / 50000, 4.94 * 256 / 8192, 2160), rel=1e-9)
    assert own > 100  # the small run is far from private at the paper's epsilon


@pytest.mark.parametrize("simulated, dataset, fragment", [
    (8, None, "smaller than --batch_size"),
    (2000, 1000, "larger than the 1000 training examples"),
])
def test_bad_simulation_sizes_are_refused(simulated, dataset, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Simulation(16, simulated, dataset)


def test_config_refuses_simulation_without_dp_or_below_the_batch():
    with pytest.raises(ConfigError, match="needs --dp=true"):
        TrainConfig(dp=False, target_epsilon=None, simulated_batch_size=8192)
    with pytest.raises(ConfigError, match="smaller than --batch_size"):
        TrainConfig(batch_size=256, simulated_batch_size=128)
    with pytest.raises(ConfigError, match="positive integer"):
        TrainConfig(batch_size=256, simulated_batch_size=0)


def test_resolve_noise_calibrates_the_simulated_run_then_scales_down():
    from eqdp_tf.training import loop

    cfg = TrainConfig(batch_size=256, simulated_batch_size=8192, steps=2160, target_epsilon=8.0, delta=DELTA)
    q = 256 / 50000
    sigma = loop.resolve_noise(cfg, q)
    simulated_sigma = accounting.calibrate_noise_multiplier(8.0, 8192 / 50000, 2160, DELTA)
    assert sigma == pytest.approx(simulated_sigma * 256 / 8192, rel=1e-12)
    assert _independent_epsilon(8192 / 50000, sigma * 32, 2160) <= 8.0
    # A given noise multiplier is the simulated run's.
    given = TrainConfig(batch_size=256, simulated_batch_size=8192, noise_multiplier=4.93, target_epsilon=None)
    assert loop.resolve_noise(given, q) == pytest.approx(4.93 / 32)
    # Without the flag nothing changes.
    plain = TrainConfig(batch_size=256, steps=2160, target_epsilon=8.0, delta=DELTA)
    assert loop.resolve_noise(plain, q) == pytest.approx(
        accounting.calibrate_noise_multiplier(8.0, q, 2160, DELTA), rel=1e-12)


# --------------------------------------------------------------------------------------------
# A tiny simulated run: what each output file says.

needs_data = needs_cifar10


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    from eqdp_tf.training import loop

    out = tmp_path_factory.mktemp("sim") / "out"
    cfg = TrainConfig(architecture="eq_resnet9", group="C1", restrict="none", data_dir=CIFAR10_DIR,
                      train_subset=256, test_subset=32, steps=3, batch_size=32, simulated_batch_size=128,
                      physical_batch_size=32, num_views=1, target_epsilon=8.0, delta=DELTA, eval_every=3,
                      checkpoint_every=3, eval_batch_size=32, output_dir=str(out), seed=1)
    result = loop.run(cfg)
    return cfg, str(out), result


def _json(path):
    with open(path) as f:
        return json.load(f)


@needs_data
def test_simulated_run_reports_both_epsilons_under_separate_keys(simulated_run, capsys):
    cfg, out, result = simulated_run
    privacy = _json(os.path.join(out, "privacy.json"))
    sigma = privacy["noise_multiplier"]
    # The run's own guarantee, under the usual keys.
    assert privacy["batch_size"] == 32 and privacy["sampling_rate"] == pytest.approx(32 / 256)
    assert privacy["epsilon"] == pytest.approx(_independent_epsilon(32 / 256, sigma, 3), rel=1e-9)
    # The simulated run, apart.
    simulated = privacy["simulated_run"]
    assert simulated["batch_size"] == 128 and simulated["scale_factor"] == 4
    assert simulated["sampling_rate"] == pytest.approx(128 / 256)
    assert simulated["noise_multiplier"] == pytest.approx(4 * sigma)
    assert simulated["epsilon"] == pytest.approx(_independent_epsilon(0.5, 4 * sigma, 3), rel=1e-9)
    assert simulated["epsilon"] <= 8.0 < privacy["epsilon"]
    assert "NOT a guarantee of this run" in simulated["note"]
    assert result["simulated_run"] == simulated


@needs_data
def test_simulated_epsilon_in_metrics_and_export(simulated_run):
    cfg, out, result = simulated_run
    privacy = _json(os.path.join(out, "privacy.json"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    assert last["epsilon"] == pytest.approx(privacy["epsilon"])
    assert last["simulated_epsilon"] == pytest.approx(privacy["simulated_run"]["epsilon"])
    exported = _json(os.path.join(result["export_path"], "assets.extra", "privacy.json"))
    assert exported["epsilon"] == pytest.approx(privacy["epsilon"])
    assert exported["simulated_run"]["epsilon"] == pytest.approx(privacy["simulated_run"]["epsilon"])


@needs_data
def test_simulated_run_says_so_on_the_console(tmp_path, capsys):
    from eqdp_tf.training import loop

    cfg = TrainConfig(architecture="eq_resnet9", group="C1", restrict="none", data_dir=CIFAR10_DIR,
                      train_subset=256, test_subset=32, steps=1, batch_size=32, simulated_batch_size=64,
                      physical_batch_size=32, num_views=1, noise_multiplier=2.0, target_epsilon=None,
                      eval_batch_size=32, output_dir=str(tmp_path / "out"), export=False)
    loop.run(cfg)
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "TAN simulation: stands for batch 64" in printed
    assert "NOT a guarantee of this run" in printed
    assert "sim_eps" in printed
