"""The training program: data, model, DP-SGD steps, EMA, evaluation, checkpoints, privacy report, export.

``run(cfg)`` is everything ``train.py`` does after parsing flags.

Crash safety (``checkpoint``, ``checkpoint_journal``, ``privacy.randomness``, ``secret_key``): rerunning the same command after
the process died, however it died, resumes from the last checkpoint; the model ends with the configured
number of steps and the same epsilon as an uninterrupted run. Every step's privacy is appended to
``privacy_ledger.jsonl`` before anything derived from it is written, and the state is only ever written out
at checkpointed steps (evaluation, export), so the steps lost in a crash were never observable and are simply
taken again. SIGINT/SIGTERM stop at the next physical batch with a checkpoint and exit code 130/143.

Several devices and hosts (``--distribution``, see ``distribution``): every worker runs ``run``; the chief alone
reads and writes the run folder and hands the others what they need through collectives; decisions that end the
loop (a stop signal, non-finite values, an error on the chief) are taken by all workers at the same point, so no
worker is left waiting in a collective.
"""

import hashlib
import json
import math
import os
import signal
import time

import numpy as np
import tensorflow as tf

from eqdp_tf import data as data_lib
from eqdp_tf import export as export_lib
from eqdp_tf import models
from eqdp_tf.config import TrainConfig, load_saved
from eqdp_tf.errors import ConfigError, DataError, PrivacyError, UserError, one_line
from eqdp_tf.privacy import accounting
from eqdp_tf.privacy.simulation import Simulation
from eqdp_tf.privacy.dp_step import DPKerasSGDOptimizer, DPStep
from eqdp_tf.privacy import randomness as randomness_lib
from eqdp_tf.training import distribution, secret_key
from eqdp_tf.io import write_json_atomic
from eqdp_tf.training.checkpoint import CHECKPOINT_DIR, CheckpointStore, Interrupted, StopSignals
from eqdp_tf.training.checkpoint_journal import JOURNAL_NAME, JournalError, PrivacyJournal, describe_steps
from eqdp_tf.training.ema import WeightAverage
from eqdp_tf.training.progress import Progress


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss diverged); nothing further is written."""


def resolve_jit(choice):
    if choice == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return choice == "true"


def _has_training_state(output_dir):
    journal = os.path.join(output_dir, JOURNAL_NAME)
    has_steps = os.path.exists(journal) and PrivacyJournal(journal).has_steps
    return has_steps or bool(CheckpointStore(None, os.path.join(output_dir, CHECKPOINT_DIR)).steps())


def prepare_output_dir(cfg):
    """Creates the run folder, or checks that an existing one holds this same run (then it resumes).

    Returns the privacy settings that differ from the saved run's, as ``{name: (saved, now)}`` (only possible
    with ``--allow_privacy_change``; config.json is then rewritten once training starts).
    """
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
        probe = os.path.join(cfg.output_dir, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"cannot write to --output_dir {cfg.output_dir}: {one_line(err)}") from None
    config_path = os.path.join(cfg.output_dir, "config.json")
    changes = {}
    if os.path.exists(config_path):
        try:
            saved = load_saved(config_path)
        except (OSError, ValueError):
            raise ConfigError(f"--output_dir {cfg.output_dir} holds an unreadable config.json; use another folder") from None
        if _has_training_state(cfg.output_dir):  # otherwise a start that failed before its first step: start over
            diffs = cfg.differences(saved)
            changes = cfg.privacy_differences(saved)
            if set(diffs) - set(changes):
                raise ConfigError(
                    f"--output_dir {cfg.output_dir} holds a different run (differs in: {', '.join(diffs)}); "
                    "use another folder, or the same flags to resume it"
                )
            if changes and not cfg.allow_privacy_change:
                listed = "; ".join(f"--{k} {old} -> {new}" for k, (old, new) in changes.items())
                raise ConfigError(
                    f"--output_dir {cfg.output_dir} holds a run with other privacy settings ({listed}); resume it "
                    "with the same values, or pass --allow_privacy_change to continue with the new ones (epsilon "
                    "then composes the steps taken under each)"
                )
    elif os.listdir(cfg.output_dir):
        raise ConfigError(f"--output_dir {cfg.output_dir} is not empty and holds no run of ours; use another folder")
    if not changes:
        write_json_atomic(config_path, cfg.to_json())
    return changes


def simulation_of(cfg, num_examples=None):
    """The TAN simulation of ``--simulated_batch_size`` (None for an ordinary run)."""
    if not cfg.dp or cfg.simulated_batch_size is None:
        return None
    return Simulation(cfg.batch_size, cfg.simulated_batch_size, num_examples)


def resolve_noise(cfg, sampling_rate):
    """The noise multiplier to train with: as given, or calibrated to the target epsilon.

    With ``--simulated_batch_size`` both describe the simulated run (sampling rate scaled up), and the sigma
    returned is that run's, scaled down to this run's batch."""
    if not cfg.dp:
        return 0.0
    simulation = simulation_of(cfg)
    if cfg.noise_multiplier is not None:
        sigma = float(cfg.noise_multiplier)
    else:
        rate = sampling_rate * simulation.ratio if simulation else sampling_rate
        sigma = _calibrate(cfg, lambda: accounting.calibrate_noise_multiplier(
            cfg.target_epsilon, rate, cfg.steps, cfg.delta))
    return simulation.real_noise_multiplier(sigma) if simulation else sigma


def _calibrate(cfg, compute):
    try:
        return compute()
    except PrivacyError as err:
        raise PrivacyError(
            f"--target_epsilon={cfg.target_epsilon} cannot be met in --steps={cfg.steps}: {err}") from None


def largest_logical_batch(cfg, num_examples):
    """A size no logical batch of this run exceeds: the batch itself when shuffling; for Poisson sampling eight
    standard deviations above the mean (probability < 1e-15 per step), at most the whole training set."""
    if cfg.sampling != "poisson":
        return cfg.batch_size
    q = cfg.batch_size / num_examples
    return min(num_examples, math.ceil(cfg.batch_size + 8 * math.sqrt(cfg.batch_size * (1 - q))))


def physical_batch_size(cfg, num_examples):
    """--physical_batch_size, lowered to the largest logical batch: rows beyond it would only ever be padding
    (and could exhaust the memory for nothing). A larger logical batch is still split into several."""
    return min(cfg.physical_batch_size, largest_logical_batch(cfg, num_examples))


def _make_sampler(cfg, num_examples, seed=None):
    seed = cfg.seed if seed is None else seed
    if cfg.batch_size > num_examples:
        raise ConfigError(f"--batch_size {cfg.batch_size} is larger than the {num_examples} training examples "
                          "(sampling rate q > 1)")
    physical = physical_batch_size(cfg, num_examples)
    if cfg.sampling == "poisson":
        return data_lib.PoissonSampler(num_examples, cfg.batch_size / num_examples, physical, seed)
    return data_lib.ShuffleSampler(num_examples, cfg.batch_size, physical, seed)


def build_model(cfg):
    return models.build_model(cfg.architecture, group=cfg.group, restrict=cfg.restricted_group, head=cfg.head)


def load_data(cfg):
    """(train images, train labels, test images, test labels), with errors naming the flags involved."""
    try:
        train = data_lib.load_cifar10("train", cfg.data_dir, cfg.train_subset)
        test = data_lib.load_cifar10("test", cfg.data_dir, cfg.test_subset)
    except data_lib.MissingDataError as err:
        if cfg.data_dir is None:  # TFDS's own message says what to do
            raise
        raise DataError(f"{err} Point --data_dir at the folder with the CIFAR-10 files, or leave it unset to "
                        "download CIFAR-10 through TFDS.") from None
    except ConfigError as err:
        raise ConfigError(f"--train_subset/--test_subset: {err}") from None
    return (*train, *test)


def evaluate(predict, dataset):
    """(mean loss, accuracy) of ``predict`` (images -> logits) over ``dataset``."""
    loss_sum = correct = count = 0.0
    for images, labels in dataset:
        logits = predict(images)
        losses = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        loss_sum += float(tf.reduce_sum(losses))
        correct += float(tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.float32)))
        count += int(labels.shape[0])
    return loss_sum / max(count, 1), correct / max(count, 1)


class _Window:
    """Sums of training statistics since the last report."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss = self.correct = self.count = 0.0
        self.seconds = 0.0

    def add(self, stats):
        self.loss += float(stats["loss_sum"])
        self.correct += float(stats["num_correct"])
        self.count += float(stats["count"])


def _fmt_epsilon(value):
    return "inf" if value is None or math.isinf(value) else f"{value:.3f}"


def _all_finite(tensors):
    """A tf.function telling whether every element of the (fixed) list of variables is finite."""
    return tf.function(lambda: tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])),
                       autograph=False)


def run(cfg: TrainConfig):
    """Trains, evaluates, checkpoints, reports privacy and exports; returns the final metrics.

    Raises ``checkpoint.Interrupted`` after a SIGINT/SIGTERM (a checkpoint has been written), and a
    ``UserError`` for bad input or a run that cannot go on.

    With ``--distribution=multi_worker`` every worker runs this; only the chief writes files (see
    ``distribution``), and the others return ``{"worker": index, "steps": steps}`` plus the chief's final metrics.
    """
    with StopSignals() as stop:
        training = _Training(cfg, stop)
        try:
            return training.run()
        except _LOST_PEER_ERRORS as err:
            if training.dist is None or training.dist.num_workers == 1:
                raise
            detail = one_line(err)
            detail = detail if len(detail) <= 200 else detail[:200] + "..."
            raise distribution.WorkerError(
                f"lost contact with another worker ({type(err).__name__}: {detail}); the chief's last "
                "checkpoint is kept: restart every worker with the same command to resume") from None
        finally:
            training.close()


# What a collective raises when a peer worker has died or is unreachable.
_LOST_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                     tf.errors.DeadlineExceededError)
# Settings in which the workers of one run may differ from the chief: paths on their own host, and XLA.
_WORKER_LOCAL_SETTINGS = ("output_dir", "data_dir", "jit_compile")


def _fingerprint(images, labels):
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).data)
    digest.update(np.ascontiguousarray(labels).data)
    return digest.hexdigest()


class _Training:
    def __init__(self, cfg, stop):
        self.cfg = cfg
        self.stop = stop
        self.dist = None
        self.journal = None
        self.writer = None

    def close(self):
        if self.journal is not None:
            self.journal.close()
        if self.writer is not None:
            self.writer.close()

    # ---------------------------------------------------------------------------------------------- set-up

    def _resolve_sigma(self, q, plan, changes):
        cfg, journal = self.cfg, self.journal
        if not cfg.dp:
            return 0.0
        if cfg.noise_multiplier is not None:
            return resolve_noise(cfg, q)
        last = journal.last_start()
        if last is not None and journal.has_steps and not changes and last.get("noise_multiplier") is not None:
            return float(last["noise_multiplier"])  # as calibrated when the run started
        spent = journal.ledger()
        if spent.total_steps == 0:
            return resolve_noise(cfg, q)
        simulation = self.simulation
        if simulation is None:
            return _calibrate(cfg, lambda: accounting.calibrate_noise_multiplier(
                cfg.target_epsilon, q, max(cfg.steps - plan.start, 1), cfg.delta, spent=spent))
        # The target is the simulated run's: calibrate in its terms, then scale down to this batch.
        return simulation.real_noise_multiplier(_calibrate(cfg, lambda: accounting.calibrate_noise_multiplier(
            cfg.target_epsilon, q * simulation.ratio, max(cfg.steps - plan.start, 1), cfg.delta,
            spent=simulation.simulated_ledger(spent))))

    def _check_dataset_size(self, num_examples):
        last = self.journal.last_start()
        if (last is not None and self.journal.has_steps and last.get("dataset_size") != num_examples
                and not self.cfg.allow_privacy_change):
            raise ConfigError(
                f"the training set now has {num_examples} examples, but this run was started with "
                f"{last.get('dataset_size')} (another --data_dir?); resume with the same data, or pass "
                "--allow_privacy_change to continue with these (epsilon then composes both parts)"
            )

    def _open_run_folder(self):
        """Chief: checks or creates the run folder and opens its journal; returns the changed privacy settings."""
        cfg, out = self.cfg, self.cfg.output_dir
        changes = prepare_output_dir(cfg)
        self.journal = journal = PrivacyJournal(os.path.join(out, JOURNAL_NAME))
        self.store = store = CheckpointStore(None, os.path.join(out, CHECKPOINT_DIR))
        if store.steps() and not journal.has_steps:
            raise JournalError(f"--output_dir {out} holds checkpoints but no record of their privacy in "
                               f"{JOURNAL_NAME}, so the privacy already spent is unknown; use another folder")
        return changes

    def _plan(self, num_examples, changes, fingerprint):
        """Chief: where to start, with which sigma and key; returns what every worker needs (JSON)."""
        cfg, journal = self.cfg, self.journal
        _make_sampler(cfg, num_examples)  # rejects q > 1 before anything else is decided
        q = cfg.batch_size / num_examples
        self._check_dataset_size(num_examples)
        self.skipped = []
        start, self.prefix = self.store.latest_valid(on_skip=lambda p, err: self.skipped.append((p, err)))
        self.plan = plan = journal.plan_resume(start)
        sigma = self._resolve_sigma(q, plan, changes)
        # Everything this run will have spent at its end: what is spent already, then the remaining steps.
        self.planned = planned = journal.ledger()
        planned.record(q, sigma, cfg.steps - start)
        self.planned_epsilon = planned.epsilon(cfg.delta) if cfg.dp else math.inf
        self._check_ceiling(planned, plan)
        self.warnings = []
        if cfg.dp:
            self.warnings = accounting.validate_privacy_params(
                noise_multiplier=sigma, sampling_rate=q, steps=cfg.steps, delta=cfg.delta,
                l2_norm_clip=cfg.l2_norm_clip, dataset_size=num_examples,
            )
        key = secret_key.load_or_create_key(cfg.output_dir, cfg.dp_seed)
        return {"start": start, "restore": self.prefix is not None, "sigma": sigma, "key": f"{key:064x}",
                "salts": sorted(plan.salts.items()), "config": cfg.to_json(), "fingerprint": fingerprint}

    def _check_ceiling(self, planned, plan):
        """Refuses a run whose planned steps would take epsilon past the ceiling (--max_epsilon, else
        --target_epsilon; with a TAN simulation, the simulated run's epsilon) before any step is taken."""
        cfg, ceiling = self.cfg, self.cfg.epsilon_ceiling
        if ceiling is None:
            return
        simulated = "simulated " if self.simulation else ""
        reached = self.simulation.epsilon(planned, cfg.delta) if self.simulation else self.planned_epsilon
        if reached <= ceiling:
            return
        limit = f"--max_epsilon={cfg.max_epsilon:g}" if cfg.max_epsilon is not None else \
            f"--target_epsilon={cfg.target_epsilon:g}"
        if plan.retaken:
            raise PrivacyError(
                f"resuming must take steps {describe_steps(plan.retaken)} again (their checkpoint is lost; both takes "
                f"count), which would bring {simulated}epsilon to {reached:.4g}, above the ceiling {limit}; nothing "
                f"was trained: pass --max_epsilon={math.ceil(reached * 100) / 100:g} to allow it, or start a new "
                "folder")
        if cfg.noise_multiplier is not None and cfg.max_epsilon is None:
            raise PrivacyError(
                f"--noise_multiplier={cfg.noise_multiplier:g} gives {simulated}epsilon {reached:.4g} after "
                f"--steps={cfg.steps}, above --target_epsilon={cfg.target_epsilon:g}: the two contradict each other; "
                "drop one (or raise the noise)")
        raise PrivacyError(
            f"this run would reach {simulated}epsilon {reached:.4g} after --steps={cfg.steps}, above the ceiling "
            f"{limit}; nothing was trained: raise the noise or the ceiling")

    def _finished_run(self):
        """Chief: the final metrics if an earlier process finished this run (released its final export, or
        with --export=false its final checkpoint), else None. A finished run stays finished: it is never trained
        again, whatever became of its checkpoints since."""
        cfg, out = self.cfg, self.cfg.output_dir
        if not self.journal.released_final(cfg.steps, "export" if cfg.export else "checkpoint"):
            return None
        export = export_lib.latest_version(os.path.join(out, "export")) if cfg.export else None
        if cfg.export and export is None:  # announced, but the export itself failed: export again
            return None
        metrics_path, privacy_path = os.path.join(out, "metrics.jsonl"), os.path.join(out, "privacy.json")
        try:
            with open(metrics_path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
            privacy = load_saved(privacy_path)
        except (OSError, ValueError):
            lines, privacy = [], {}
        final = {**(lines[-1] if lines else {}), "noise_multiplier": privacy.get("noise_multiplier"),
                 "steps_spent": privacy.get("steps_spent"), "export_path": export}
        if "simulated_run" in privacy:
            final["simulated_run"] = privacy["simulated_run"]
        eps = privacy.get("epsilon", final.get("epsilon"))
        final["epsilon"] = eps
        print(f"already finished: {out} holds this run, finished at step {cfg.steps}"
              + (f" and exported to {export}" if export else "")
              + (f" (epsilon {eps:.3f}, delta {cfg.delta})" if eps is not None else "")
              + "; nothing trained, nothing written")
        return final

    def _check_worker(self, shared, fingerprint):
        """Worker: its flags and data must be the chief's (same batches, same split over replicas)."""
        mine = self.cfg.to_json()
        differ = sorted(k for k in set(mine) | set(shared["config"])
                        if k not in _WORKER_LOCAL_SETTINGS and mine.get(k) != shared["config"].get(k))
        if differ:
            raise ConfigError(f"worker {self.dist.worker_index} was started with other flags than the chief (differ "
                              f"in: {', '.join(differ)}); start every worker with the same flags")
        if fingerprint != shared["fingerprint"]:
            raise DataError(f"worker {self.dist.worker_index} has other training data than the chief (check "
                            "--data_dir on every host): the examples of a sampled batch would not be the same")

    def run(self):
        started = time.monotonic()
        cfg = self.cfg
        out = cfg.output_dir
        # First: MultiWorkerMirroredStrategy must start before TensorFlow initialises its runtime.
        self.dist = dist = distribution.build(cfg.distribution)
        self.stop.reinstall()
        chief = dist.is_chief
        changes = dist.from_chief(self._open_run_folder, "checking --output_dir") or {}
        finished = dist.from_chief(self._finished_run, "checking whether the run has finished")
        if finished is not None:
            return finished
        tf.keras.utils.set_random_seed(cfg.seed)
        train_images, train_labels, test_images, test_labels = dist.on_every_worker(
            lambda: load_data(cfg), "loading the data")
        num_examples, self._num_test = len(train_labels), len(test_labels)
        self.simulation = simulation = simulation_of(cfg, num_examples)
        fingerprint = _fingerprint(train_images, train_labels) if dist.num_workers > 1 else None
        shared = dist.from_chief(lambda: self._plan(num_examples, changes, fingerprint), "planning the run")
        if dist.num_workers > 1:
            dist.on_every_worker(lambda: chief or self._check_worker(shared, fingerprint),
                                 "comparing the workers' flags and data")
        start, sigma = shared["start"], shared["sigma"]
        q = cfg.batch_size / num_examples
        randomness = randomness_lib.StepRandomness(int(shared["key"], 16), {int(t): a for t, a in shared["salts"]})
        sampler = randomness_lib.SaltedSampler(lambda seed: _make_sampler(cfg, num_examples, seed), randomness)

        jit = resolve_jit(cfg.jit_compile)
        with dist.scope():  # the weights, the optimizer's variables and the gradient sums live on every replica
            model = build_model(cfg)
            ema_model = build_model(cfg)
            optimizer = DPKerasSGDOptimizer(
                l2_norm_clip=cfg.l2_norm_clip, noise_multiplier=sigma,
                expected_batch_size=sampler.expected_batch_size, learning_rate=cfg.learning_rate,
                momentum=cfg.momentum,
            )
            # Made now rather than at the first update, so that a checkpoint restores them at once (and the chief
            # can hand them on to the other workers).
            optimizer._create_all_weights(model.trainable_variables)  # pylint: disable=protected-access
            step_fn = DPStep(model, None, optimizer, view_reduction=cfg.view_reduction, dp=cfg.dp)
            ema = WeightAverage(model, ema_model, cfg.ema_decay)
        accumulate = step_fn.compiled_accumulate(jit)
        apply_update = step_fn.compiled_apply(jit)
        predict = tf.function(lambda images: ema_model(tf.cast(images, tf.float32), training=False), jit_compile=jit)
        grads_finite = step_fn.compiled_accumulated_finite()
        weights_finite = _all_finite(model.weights + ema_model.weights)

        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        ledger_var = tf.Variable(json.dumps(accounting.PrivacyLedger().to_json()), dtype=tf.string, trainable=False)
        checkpoint = tf.train.Checkpoint(model=model, ema_model=ema_model, optimizer=optimizer, step=step_var,
                                         ledger=ledger_var)

        def restore():
            self.store.checkpoint = checkpoint
            if self.prefix:
                self.store.restore(self.prefix)
                if int(step_var.numpy()) != start:
                    raise JournalError(f"checkpoint {self.prefix} holds step {int(step_var.numpy())}, not {start}")

        dist.from_chief(restore, "restoring the checkpoint")
        if shared["restore"]:
            dist.sync_from_chief(model.weights + ema_model.weights + optimizer.variables())
        if chief:
            model_ledger = accounting.PrivacyLedger.from_json(json.loads(ledger_var.numpy().decode()))
            self._begin(changes, num_examples, q, sigma, sampler, model, jit, start)
        else:
            print(f"{dist.describe()}: training with the chief, which writes the run's files", flush=True)
        journal, store = self.journal, getattr(self, "store", None)

        if chief:
            self.writer = tf.summary.create_file_writer(os.path.join(out, "tensorboard"))
            eval_data = data_lib.make_eval_dataset(test_images, test_labels, cfg.eval_batch_size)
            progress = Progress(cfg.steps, start)
        writer = self.writer
        metrics_path = os.path.join(out, "metrics.jsonl")
        window, since_eval = _Window(), _Window()
        state = {"saved": start}

        def epsilon_now(pending=False):
            return journal.ledger(pending).epsilon(cfg.delta) if cfg.dp else math.inf

        def simulated_epsilon_now(pending=False):
            eps = simulation.epsilon(journal.ledger(pending), cfg.delta)
            return None if math.isinf(eps) else eps

        def write_privacy(step):
            if cfg.dp:
                spent = journal.ledger()
                summary = journal.summary(step)
                note = ("Counts every step whose update could have been observed (see privacy_ledger.jsonl); "
                        "training-batch loss and accuracy in the logs are not covered.")
                if summary["steps_counted_twice"]:
                    note += (f" {summary['steps_counted_twice']} steps count twice: they were written out in a "
                             "checkpoint that was later lost, and taken again.")
                privacy = accounting.PrivacyReport.from_ledger(
                    spent, delta=cfg.delta, batch_size=cfg.batch_size, dataset_size=num_examples,
                    l2_norm_clip=cfg.l2_norm_clip, sampling_method=sampler.method, note=note,
                ).to_json() if spent.segments else {"epsilon": 0.0, "steps": 0}
                privacy.update(summary)
                if simulation is not None:
                    privacy["simulated_run"] = simulation.report(spent, cfg.delta, privacy["epsilon"])
            else:
                privacy = {"dp": False, "epsilon": None, "steps": step, "batch_size": cfg.batch_size,
                           "dataset_size": num_examples, "note": "non-private run: no privacy guarantee",
                           **journal.summary(step)}
            try:
                write_json_atomic(os.path.join(out, "privacy.json"), privacy)
            except OSError as err:
                raise TrainingError(f"cannot write privacy.json: {one_line(err)}") from None
            return privacy

        def write_checkpoint(step):
            """Chief: announces the release in the journal (durably), then writes the checkpoint and privacy.json."""
            if not bool(weights_finite()):
                raise TrainingError(f"the weights became non-finite (nan or inf) at step {step}; stopped without "
                                    f"writing them (the checkpoint of step {state['saved']} is kept); lower "
                                    "--learning_rate")
            journal.record_release(step, "checkpoint")
            step_var.assign(step)
            ledger_var.assign(json.dumps(model_ledger.to_json()))
            try:
                path = store.save(step)
            except (OSError, tf.errors.OpError) as err:
                message = one_line(err)
                raise TrainingError(f"writing the checkpoint of step {step} failed ({message}); the checkpoint of "
                                    f"step {state['saved']} is kept") from None
            write_privacy(step)
            return path

        def save_checkpoint(step):
            dist.from_chief(lambda: write_checkpoint(step) and None, f"writing the checkpoint of step {step}")
            state["saved"] = step

        def report(step):
            test_loss, test_acc = evaluate(predict, eval_data)
            rate = since_eval.count / since_eval.seconds if since_eval.seconds else 0.0
            eps = epsilon_now()
            record = {
                "step": step,
                "epoch": step * cfg.batch_size / num_examples,
                "loss": since_eval.loss / max(since_eval.count, 1),
                "train_accuracy": since_eval.correct / max(since_eval.count, 1),
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "epsilon": None if math.isinf(eps) else eps,
                **({"simulated_epsilon": simulated_epsilon_now()} if simulation else {}),
                "examples_per_sec": rate,
                "views_per_sec": rate * cfg.num_views,
                # Wall time of this process (loading, compiling, training and evaluating), for time-to-accuracy.
                "wall_seconds": time.monotonic() - started,
            }
            try:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise TrainingError(f"cannot write {metrics_path}: {one_line(err)}") from None
            with writer.as_default(step=step):
                tf.summary.scalar("test/accuracy", test_acc)
                tf.summary.scalar("test/loss", test_loss)
            progress.message(f"step {step}: test accuracy {test_acc:.4f}, test loss {test_loss:.4f}, epsilon {eps:.3f}"
                             + (f" (simulated run: {_fmt_epsilon(record['simulated_epsilon'])})" if simulation else ""))
            since_eval.reset()
            return record

        def after_step(step, saving, evaluating):
            """Chief: journal, logs, checkpoint and evaluation of the step just taken; the new metrics or None."""
            # Recorded before anything derived from this update can leave the process.
            journal.record_step(step, q, sigma, cfg.l2_norm_clip, num_examples)
            model_ledger.record(sampling_rate=q, noise_multiplier=sigma)
            if step % cfg.log_every == 0 or step == cfg.steps:
                rate = window.count / window.seconds if window.seconds else 0.0
                values = {"loss": window.loss / max(window.count, 1), "acc": window.correct / max(window.count, 1)}
                if cfg.dp:
                    values["eps"] = epsilon_now(pending=True)
                if simulation:
                    values["sim_eps"] = simulation.epsilon(journal.ledger(pending=True), cfg.delta)
                values["ex/s"] = round(rate, 1)
                progress.update(step, **values)
                with writer.as_default(step=step):
                    for name, value in values.items():
                        tf.summary.scalar(f"train/{name.replace('/', '_per_')}", value)
                window.reset()
            # The state is written out only at checkpointed steps: the test metrics follow a checkpoint.
            if saving:
                write_checkpoint(step)
            return report(step) if evaluating else None

        def stop_signal():
            """The signal to stop on (0: none), the same on every worker; every worker asks at the same points."""
            return dist.max_over_workers(self.stop.requested or 0)

        result = {}
        step = start
        stopping = stop_signal()
        if start < cfg.steps and not stopping:
            dataset = data_lib.make_train_dataset(
                train_images, train_labels, sampler, cfg.num_views, cfg.seed, start_step=start,
                num_steps=cfg.steps - start, num_replicas=dist.num_replicas, replica_ids=dist.replica_ids,
            )
            t0 = time.monotonic()
            step_loss = 0.0
            for batch in dataset:
                inputs = dist.distribute(batch)
                try:
                    stats = accumulate(inputs["views"], inputs["labels"], inputs["mask"])
                except tf.errors.ResourceExhaustedError:
                    step_fn.reset()  # the half-accumulated step is abandoned: nothing of it was noised
                    if step > state["saved"]:
                        save_checkpoint(step)
                    raise TrainingError(
                        f"out of memory in step {step + 1} with --physical_batch_size {sampler.physical_batch_size}: "
                        f"lower it (the logical batch is accumulated over more physical batches, same result); "
                        f"the checkpoint of step {state['saved']} is kept, rerun to resume") from None
                window.add(stats)
                since_eval.add(stats)
                step_loss += float(stats["loss_sum"])
                if not bool(batch["last"]):
                    stopping = stop_signal()
                    if stopping:  # abandon the half-accumulated step: nothing of it was noised
                        step_fn.reset()
                        break
                    continue
                number = step + 1
                if not math.isfinite(step_loss) or not bool(grads_finite()):
                    what = f"the training loss is {step_loss}" if not math.isfinite(step_loss) else \
                        "the summed clipped gradients are not finite (nan or inf)"
                    raise TrainingError(
                        f"step {number}: {what}; stopped before applying it, nothing of this step was written "
                        f"(the checkpoint of step {state['saved']} is kept); lower --learning_rate or check the data"
                    )
                optimizer.set_noise_seed(randomness.noise_seed(number))
                apply_update()
                if cfg.dp and 0 in dist.replica_ids and not optimizer.keyed_noise_traced:  # replica 0 adds the noise
                    raise RuntimeError("DPStep.apply no longer draws its noise through optimizer.noised_sum; "
                                       "the keyed (resumable) noise of privacy.randomness is bypassed")
                ema.update(step)
                step = number
                step_loss = 0.0
                elapsed = time.monotonic() - t0
                window.seconds += elapsed
                since_eval.seconds += elapsed
                evaluating = step % cfg.eval_every == 0 or step == cfg.steps
                saving = evaluating or step % cfg.checkpoint_every == 0
                metrics = dist.from_chief(lambda: after_step(step, saving, evaluating), f"step {step}")
                if saving:
                    state["saved"] = step
                if metrics is not None:
                    result = metrics
                stopping = stop_signal()
                if stopping:
                    break
                t0 = time.monotonic()
            if chief:
                progress.close()

        if stopping:
            if step > state["saved"]:
                save_checkpoint(step)
            if chief:
                writer.flush()
                where = f"checkpoint of step {step} in {store.directory}" if step else "no step taken, nothing to save"
                eps = epsilon_now()
            else:
                where = f"the chief wrote the checkpoint of step {step}" if step else "no step taken"
                eps = math.nan
            raise Interrupted(
                f"{signal.Signals(stopping).name} at step {step}/{cfg.steps}: {where}"
                + (f"; epsilon spent so far {eps:.3f}" if cfg.dp and step and chief else "")
                + "; rerun the same command to resume", stopping)
        no_step_taken = not result

        def finish():
            """Chief: final report, privacy.json and export."""
            # Resumed at the final checkpoint of a run that had not exported yet: report its state again.
            final = report(step) if no_step_taken else result
            privacy = write_privacy(step)
            final = {**final, "parameters": model.count_params(), "noise_multiplier": sigma,
                     "steps_spent": privacy["steps_spent"]}
            previous_export = export_lib.latest_version(os.path.join(out, "export"))
            if cfg.export and no_step_taken and previous_export:
                # The final weights are already exported; a rerun of a finished command must not pile up copies.
                final["export_path"] = previous_export
                print(f"already exported: {previous_export}")
            elif cfg.export:
                journal.record_release(step, "export")
                path = export_lib.export_saved_model(ema_model, os.path.join(out, "export"),
                                                     extra_files={"privacy.json": privacy})
                final["export_path"] = path
                print(f"exported SavedModel to {path}")
            eps = final.get("epsilon")
            print(f"done: test accuracy {final['test_accuracy']:.4f}, "
                  + (f"epsilon {eps:.3f} (delta {cfg.delta})" if eps is not None else "no privacy guarantee"))
            if simulation is not None:
                simulated = privacy["simulated_run"]
                final["simulated_run"] = simulated
                print(f"TAN simulation of batch {simulated['batch_size']} (sigma {simulated['noise_multiplier']:.4g}):"
                      f" simulated epsilon {_fmt_epsilon(simulated['epsilon'])}, not a guarantee of this run (its own "
                      f"epsilon is {_fmt_epsilon(eps)})")
            return final

        # The other workers wait for the chief here, so that no worker leaves the cluster while it still works.
        final = dist.from_chief(finish, "the final evaluation and export")
        if not chief:
            final = {**final, "worker": dist.worker_index, "steps": step}
            print(f"{dist.describe()}: done, {step} steps; the chief wrote the run's files", flush=True)
        return final

    def _begin(self, changes, num_examples, q, sigma, sampler, model, jit, start):
        """Chief: opens the journal for this process, and prints what the run is about to do."""
        cfg, journal, plan, planned = self.cfg, self.journal, self.plan, self.planned
        journal.begin(start, {
            "sampling_rate": q, "noise_multiplier": sigma, "l2_norm_clip": cfg.l2_norm_clip,
            "dataset_size": num_examples, "batch_size": cfg.batch_size, "delta": cfg.delta, "steps": cfg.steps,
            "dp": cfg.dp, "sampling": cfg.sampling, "simulated_batch_size": cfg.simulated_batch_size,
        })
        if changes:
            write_json_atomic(os.path.join(cfg.output_dir, "config.json"), cfg.to_json())

        for warning in self.warnings:
            print(f"warning: {warning}", flush=True)
        if sampler.physical_batch_size < cfg.physical_batch_size:
            print(f"note: --physical_batch_size {cfg.physical_batch_size} is more than any logical batch of this run "
                  f"holds (at most {sampler.physical_batch_size}); using {sampler.physical_batch_size}", flush=True)
        for path, err in self.skipped:
            print(f"warning: checkpoint {path} is unreadable ({err}); set aside, using an older one")
        print(f"model {model.name}: {model.count_params():,} parameters; train {num_examples}, test "
              f"{self._num_test} examples; XLA {'on' if jit else 'off'}")
        if self.dist.distributed:
            print(f"distributed: {self.dist.describe()}; --physical_batch_size {cfg.physical_batch_size} per replica")
        if cfg.dp:
            print(f"DP-SGD: q={q:.5g} ({sampler.method}), sigma={sigma:.4g}, C={cfg.l2_norm_clip}, delta={cfg.delta}, "
                  f"{cfg.steps} steps -> epsilon {self.planned_epsilon:.3f}"
                  + (" (assumes Poisson sampling)" if sampler.method != "poisson" else "")
                  + (f" (composed with the {planned.total_steps - (cfg.steps - start)} steps spent before)"
                     if changes or plan.retaken else ""))
            if self.simulation is not None:
                sim = self.simulation
                print(f"TAN simulation: stands for batch {sim.simulated_batch_size} (q={q * sim.ratio:.5g}) with "
                      f"sigma={sigma * sim.ratio:.4g} -> simulated epsilon "
                      f"{sim.epsilon(planned, cfg.delta):.3f}; this run's own epsilon is the "
                      f"{self.planned_epsilon:.3f} above: the simulated one is NOT a guarantee of this run")
            if cfg.dp_seed is not None:
                print("warning: --dp_seed is set and published in config.json: whoever knows it can recompute the "
                      "batches and the noise, which voids the guarantee; use it for experiments only")
        else:
            print("non-private training (--dp=false): no clipping, no noise, no privacy guarantee")
        if changes:
            listed = "; ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
            print(f"privacy settings changed ({listed}): epsilon composes the steps taken under each")
        if start:
            print(f"resuming from step {start} ({self.prefix})")
        if plan.discarded:
            print(f"steps {describe_steps(plan.discarded)} of an interrupted process were never written out: "
                  "not counted, taken again")
        if plan.retaken:
            print(f"warning: steps {describe_steps(plan.retaken)} were written out in a checkpoint that is lost; "
                  "they are taken again with fresh sampling and noise, and both takes count toward epsilon")


__all__ = ["Interrupted", "TrainingError", "build_model", "evaluate", "load_data",
           "prepare_output_dir", "resolve_jit", "resolve_noise", "run"]
