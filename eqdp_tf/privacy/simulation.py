"""TAN simulation: train at a small batch what a large-batch DP-SGD run would reach, at a fraction of the compute.

Sander, Stock & Sablayrolles, "TAN without a burn: scaling laws of DP-SGD" (ICML 2023, arXiv 2210.03403): at a
fixed number of steps and a fixed ratio sigma / B (the "total amount of noise" of the averaged update, sigma * C
/ B), DP-SGD's accuracy hardly depends on the batch size B once B is not tiny. A run at batch B0 with noise
sigma0 is therefore *simulated* by a run at batch B = B0 / r with noise sigma = sigma0 / r, the same steps and
the same learning rate: the update's expected signal and its noise std are those of the large run.

The simulation predicts accuracy, not privacy. The small run's own guarantee is far weaker (at B = 256,
sigma = 0.154 and 2160 steps its epsilon is in the hundreds), and that is the only guarantee its data has. So
both are reported, under separate names: ``epsilon`` (this run, what the data actually has) and
``simulated_run.epsilon`` (the large run it stands for, which was never trained).

In ledger terms the simulated run takes every step of the real one with the sampling rate and the noise
multiplier scaled by r: q0 = r q (= B0 / N) and sigma0 = r sigma.
"""

from typing import Any, Dict, Optional

from eqdp_tf.errors import ConfigError
from eqdp_tf.privacy import accounting

NOTE = ("TAN simulation (Sander et al. 2023): this run trained at batch {batch} with noise multiplier {sigma:.4g} "
        "to predict the accuracy of a run at batch {sim_batch} with noise multiplier {sim_sigma:.4g} (the same "
        "sigma/B and steps). That larger run was not trained: its epsilon {sim_eps} is NOT a guarantee of this run. "
        "This run's own guarantee is 'epsilon' ({eps}).")


class Simulation:
    """The scaling between a real run at ``batch_size`` and the simulated run at ``simulated_batch_size``."""

    def __init__(self, batch_size: int, simulated_batch_size: int, dataset_size: Optional[int] = None):
        if simulated_batch_size < batch_size:
            raise ConfigError(f"--simulated_batch_size {simulated_batch_size} is smaller than --batch_size "
                              f"{batch_size}: a TAN simulation runs a smaller batch than the run it stands for")
        if dataset_size is not None and simulated_batch_size > dataset_size:
            raise ConfigError(f"--simulated_batch_size {simulated_batch_size} is larger than the {dataset_size} "
                              "training examples (sampling rate q > 1)")
        self.batch_size = batch_size
        self.simulated_batch_size = simulated_batch_size
        self.ratio = simulated_batch_size / batch_size

    def real_noise_multiplier(self, simulated_noise_multiplier: float) -> float:
        """The sigma to train with: the simulated run's sigma times B / B0 (same sigma / B)."""
        return simulated_noise_multiplier / self.ratio

    def simulated_ledger(self, ledger: accounting.PrivacyLedger) -> accounting.PrivacyLedger:
        """The steps of ``ledger`` as the simulated run takes them: q and sigma both times B0 / B."""
        scaled = accounting.PrivacyLedger()
        for segment in ledger.segments:
            scaled.record(min(1.0, segment.sampling_rate * self.ratio),
                          segment.noise_multiplier * self.ratio, segment.steps)
        return scaled

    def epsilon(self, ledger: accounting.PrivacyLedger, delta: float) -> float:
        """The simulated run's epsilon after the steps in ``ledger`` (inf before any step)."""
        scaled = self.simulated_ledger(ledger)
        return scaled.epsilon(delta) if scaled.segments else 0.0

    def report(self, ledger: accounting.PrivacyLedger, delta: float, real_epsilon: float) -> Dict[str, Any]:
        """The ``simulated_run`` block of privacy.json (and of the export's privacy record)."""
        scaled = self.simulated_ledger(ledger)
        last = scaled.segments[-1] if scaled.segments else None
        sim_eps = scaled.epsilon(delta) if last else 0.0
        sigma = last.noise_multiplier / self.ratio if last else None
        return {
            "batch_size": self.simulated_batch_size,
            "sampling_rate": last.sampling_rate if last else None,
            "noise_multiplier": last.noise_multiplier if last else None,
            "steps": scaled.total_steps,
            "epsilon": _finite_or_none(sim_eps),
            "scale_factor": self.ratio,
            "note": NOTE.format(batch=self.batch_size, sigma=sigma if sigma is not None else float("nan"),
                                sim_batch=self.simulated_batch_size,
                                sim_sigma=last.noise_multiplier if last else float("nan"),
                                sim_eps=_fmt(sim_eps), eps=_fmt(real_epsilon)),
        }


def _finite_or_none(value):
    return None if value is None or value == float("inf") else float(value)


def _fmt(value):
    return "inf" if value is None or value == float("inf") else f"{value:.4g}"
