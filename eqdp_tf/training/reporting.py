"""What a run tells the world (the chief only): the start announcement, the progress line, TensorBoard,
metrics.jsonl, privacy.json and the closing lines.

Everything privacy-related is read from the privacy journal, so what is reported is always what was spent.
"""

import json
import math
import os
import time

import tensorflow as tf

from eqdp_tf.datasets import DatasetDescription
from eqdp_tf.errors import UserError, one_line
from eqdp_tf.io import write_json_atomic
from eqdp_tf.privacy import accounting
from eqdp_tf.training.checkpoint_journal import JOURNAL_NAME, describe_steps
from eqdp_tf.training.progress import Progress


def describe_device(dist):
    """Where the steps run, for the start line: the GPU (or GPUs, distributed) TensorFlow places them on, by name,
    else the CPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU (TensorFlow sees no GPU)"
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name")
    named = f" ({name})" if name else ""
    if dist.distributed:
        return f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''}{named} per worker"
    unused = f", one of {len(gpus)} (--distribution=mirrored uses all)" if len(gpus) > 1 else ""
    return f"GPU:0{named}{unused}"


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss diverged); nothing further is written."""


def fmt_epsilon(value):
    return "inf" if value is None or math.isinf(value) else f"{value:.3f}"


class Window:
    """Sums of training statistics (loss, correct, count, seconds) since the last report."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss = self.correct = self.count = 0.0
        self.seconds = 0.0

    def add(self, stats):
        self.loss += float(stats["loss_sum"])
        self.correct += float(stats["num_correct"])
        self.count += float(stats["count"])

    @property
    def mean_loss(self):
        return self.loss / max(self.count, 1)

    @property
    def accuracy(self):
        return self.correct / max(self.count, 1)

    @property
    def rate(self):
        return self.count / self.seconds if self.seconds else 0.0


class Reporter:
    """The chief's reports of one run; ``journal`` is the open privacy journal, ``simulation`` the TAN simulation
    (or None), ``sampling_method`` the sampler's ('poisson' or 'shuffle')."""

    def __init__(self, cfg, plan, journal, simulation, sampling_method, started):
        self.cfg, self.plan, self.journal, self.simulation = cfg, plan, journal, simulation
        self.sampling_method = sampling_method
        self.started = started
        self.earlier_seconds = 0.0  # wall time of the run's earlier processes, up to the checkpoint resumed from
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.writer = tf.summary.create_file_writer(os.path.join(cfg.output_dir, "tensorboard"))
        self.progress = Progress(cfg.steps, plan.start)

    def close(self):
        self.writer.close()

    def run_seconds(self, now=None):
        """Wall time of the whole run at ``now`` (default: now): its earlier processes up to the checkpoint resumed
        from, plus this one."""
        return self.earlier_seconds + (time.monotonic() if now is None else now) - self.started

    # ------------------------------------------------------------------------------------------ privacy

    def epsilon(self, pending=False):
        """This run's epsilon for the steps spent (``pending``: and those not yet written out)."""
        return self._epsilons(pending)[0]

    def _epsilons(self, pending):
        """(this run's epsilon, the simulated run's or None) from one reading of the journal."""
        ledger = self.journal.ledger(pending)
        own = ledger.epsilon(self.cfg.delta) if self.cfg.dp else math.inf
        return own, (self.simulation.epsilon(ledger, self.cfg.delta) if self.simulation else None)

    def privacy_report(self, step):
        cfg, journal = self.cfg, self.journal
        if not cfg.dp:
            return {"dp": False, "epsilon": None, "steps": step, "batch_size": cfg.batch_size,
                    "dataset_size": self.plan.num_examples, "note": "non-private run: no privacy guarantee",
                    **journal.summary(step)}
        spent = journal.ledger()
        summary = journal.summary(step)
        note = (f"Counts every step whose update could have been observed (see {JOURNAL_NAME}); "
                "training-batch loss and accuracy in the logs are not covered.")
        if summary["steps_counted_twice"]:
            note += (f" {summary['steps_counted_twice']} steps count twice: they were written out in a "
                     "checkpoint that was later lost, and taken again.")
        privacy = accounting.PrivacyReport.from_ledger(
            spent, delta=cfg.delta, batch_size=cfg.batch_size, dataset_size=self.plan.num_examples,
            l2_norm_clip=cfg.l2_norm_clip, sampling_method=self.sampling_method, note=note,
        ).to_json() if spent.segments else {"epsilon": 0.0, "steps": 0}
        privacy.update(summary)
        if self.simulation is not None:
            privacy["simulated_run"] = self.simulation.report(spent, cfg.delta, privacy["epsilon"])
        return privacy

    def write_privacy(self, step):
        privacy = self.privacy_report(step)
        try:
            write_json_atomic(os.path.join(self.cfg.output_dir, "privacy.json"), privacy)
        except OSError as err:
            raise TrainingError(f"cannot write privacy.json: {one_line(err)}") from None
        return privacy

    # ------------------------------------------------------------------------------------------ progress

    def log_step(self, step, window):
        """The progress line and TensorBoard's train/* scalars for the steps in ``window``."""
        values = {"loss": window.mean_loss, "acc": window.accuracy}
        own, simulated = self._epsilons(pending=True)
        if self.cfg.dp:
            values["eps"] = own
        if self.simulation:
            values["sim_eps"] = simulated
        values["ex/s"] = round(window.rate, 1)
        self.progress.update(step, **values)
        with self.writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(f"train/{name.replace('/', '_per_')}", value)

    def record_evaluation(self, step, test_loss, test_acc, window):
        """Appends the metrics of ``step`` (test results, and the training statistics in ``window``)."""
        cfg = self.cfg
        eps, simulated = self._epsilons(pending=False)
        now = time.monotonic()
        record = {
            "step": step,
            "epoch": step * cfg.batch_size / self.plan.num_examples,
            "loss": window.mean_loss,
            "train_accuracy": window.accuracy,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "epsilon": None if math.isinf(eps) else eps,
            **({"simulated_epsilon": None if math.isinf(simulated) else simulated} if self.simulation else {}),
            "examples_per_sec": window.rate,
            "views_per_sec": window.rate * cfg.num_views,
            # Wall time of this process (loading, compiling, training and evaluating), for time-to-accuracy, and of
            # the whole run (equal unless it was resumed; the work lost after the last checkpoint is not counted).
            "wall_seconds": now - self.started,
            "run_wall_seconds": self.run_seconds(now),
        }
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise TrainingError(f"cannot write {self.metrics_path}: {one_line(err)}") from None
        with self.writer.as_default(step=step):
            tf.summary.scalar("test/accuracy", test_acc)
            tf.summary.scalar("test/loss", test_loss)
        self.progress.message(
            f"step {step}: test accuracy {test_acc:.4f}, test loss {test_loss:.4f}, epsilon {eps:.3f}"
            + (f" (simulated run: {fmt_epsilon(record['simulated_epsilon'])})" if self.simulation else ""))
        return record

    # ------------------------------------------------------------------------------------------ start and end

    def announce(self, model, jit, dist, physical_batch_size, num_test):
        """Prints what the run is about to do."""
        cfg, plan = self.cfg, self.plan
        for warning in plan.warnings:
            print(f"warning: {warning}", flush=True)
        if physical_batch_size < cfg.physical_batch_size:
            print(f"note: --physical_batch_size {cfg.physical_batch_size} is more than any logical batch of this run "
                  f"holds (at most {physical_batch_size}); using {physical_batch_size}", flush=True)
        for path, err in plan.skipped:
            print(f"warning: checkpoint {path} is unreadable ({err}); set aside, using an older one")
        self._announce_dataset()
        print(f"model {model.name}: {model.count_params():,} parameters; train {plan.num_examples}, test "
              f"{num_test} examples; on {describe_device(dist)}; XLA {'on' if jit else 'off'}")
        if dist.distributed:
            print(f"distributed: {dist.describe()}; --physical_batch_size {cfg.physical_batch_size} per replica")
        if cfg.dp:
            self._announce_privacy()
        else:
            print("non-private training (--dp=false): no clipping, no noise, no privacy guarantee")
        self._announce_resume()

    def _announce_dataset(self):
        dataset = DatasetDescription.from_json(self.plan.dataset)
        print(dataset.summary(), flush=True)
        if dataset.normalization_computed and self.cfg.dp:
            print("warning: the normalisation constants were computed from the training images without noise; "
                  "config.json and the exported model carry them, outside the DP guarantee: give "
                  "--normalization_mean and --normalization_std (public values, e.g. 0.5 and 0.25) to avoid it",
                  flush=True)

    def _announce_privacy(self):
        cfg, plan = self.cfg, self.plan
        q, sigma = plan.sampling_rate, plan.noise_multiplier
        print(f"DP-SGD: q={q:.5g} ({self.sampling_method}), sigma={sigma:.4g}, C={cfg.l2_norm_clip}, "
              f"delta={cfg.delta}, {cfg.steps} steps -> epsilon {plan.planned_epsilon:.3f}"
              + (" (assumes Poisson sampling)" if self.sampling_method != "poisson" else "")
              + (f" (composed with the {plan.steps_spent_before} steps spent before)"
                 if plan.changes or plan.retaken else ""))
        if self.simulation is not None:
            sim = self.simulation
            print(f"TAN simulation: stands for batch {sim.simulated_batch_size} (q={q * sim.ratio:.5g}) with "
                  f"sigma={sigma * sim.ratio:.4g} -> simulated epsilon {plan.planned_simulated_epsilon:.3f}; this "
                  f"run's own epsilon is the {plan.planned_epsilon:.3f} above: the simulated one is NOT a guarantee "
                  "of this run")
        if cfg.dp_seed is not None:
            print("warning: --dp_seed is set and published in config.json: whoever knows it can recompute the "
                  "batches and the noise, which voids the guarantee; use it for experiments only")

    def _announce_resume(self):
        plan = self.plan
        if plan.changes:
            listed = "; ".join(f"{k} {old} -> {new}" for k, (old, new) in plan.changes.items())
            print(f"privacy settings changed ({listed}): epsilon composes the steps taken under each")
        if plan.start:
            print(f"resuming from step {plan.start} ({plan.checkpoint})")
        if plan.discarded:
            print(f"steps {describe_steps(plan.discarded)} of an interrupted process were never written out: "
                  "not counted, taken again")
        if plan.retaken:
            print(f"warning: steps {describe_steps(plan.retaken)} were written out in a checkpoint that is lost; "
                  "they are taken again with fresh sampling and noise, and both takes count toward epsilon")

    def done(self, final, privacy):
        """The closing lines."""
        eps = final.get("epsilon")
        print(f"done: test accuracy {final['test_accuracy']:.4f}, "
              + (f"epsilon {eps:.3f} (delta {self.cfg.delta})" if eps is not None else "no privacy guarantee"))
        if self.simulation is not None:
            simulated = privacy["simulated_run"]
            print(f"TAN simulation of batch {simulated['batch_size']} (sigma {simulated['noise_multiplier']:.4g}):"
                  f" simulated epsilon {fmt_epsilon(simulated['epsilon'])}, not a guarantee of this run (its own "
                  f"epsilon is {fmt_epsilon(eps)})")
