"""The trainer: takes the steps of a planned run, with checkpoints, evaluation and the final export.

Crash safety: every step's privacy is appended to the privacy journal before anything derived from it is written,
and the state is only ever written out at checkpointed steps (evaluation follows a checkpoint), so the steps lost in
a crash were never observable and are simply taken again. SIGINT/SIGTERM stop at the next physical batch with a
checkpoint. Under ``--distribution`` every worker runs the trainer; the chief alone writes (its ``reporter`` and
run folder are None elsewhere), and decisions that end the loop are taken by all workers at the same point.
"""

import dataclasses
import math
import os
import signal
import time

import tensorflow as tf

from eqdp_tf import data as data_lib
from eqdp_tf import export as export_lib
from eqdp_tf import models
from eqdp_tf.datasets import DatasetDescription
from eqdp_tf.errors import one_line
from eqdp_tf.io import write_json_atomic
from eqdp_tf.privacy import randomness as randomness_lib
from eqdp_tf.privacy.dp_step import DPKerasSGDOptimizer, DPStep
from eqdp_tf.training.checkpoint import Interrupted
from eqdp_tf.training.checkpoint_journal import JournalError
from eqdp_tf.training.ema import WeightAverage
from eqdp_tf.training.plan import keyed_fingerprint, make_sampler, run_config
from eqdp_tf.training.reporting import TrainingError, Window


def resolve_jit(choice):
    if choice == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return choice == "true"


def build_model(cfg, dataset):
    """The model of ``cfg`` for the images and classes of ``dataset`` (a ``datasets.DatasetDescription``)."""
    shape = dict(image_shape=tuple(dataset.image_shape), num_classes=dataset.num_classes, mean=dataset.mean,
                 std=dataset.std)
    if cfg.architecture == "wrn16_4":
        return models.build_model(cfg.architecture, weight_standardization=cfg.wrn_weight_standardization, **shape)
    return models.build_model(cfg.architecture, group=cfg.group, restrict=cfg.restricted_group, head=cfg.head,
                              variant=cfg.model_variant, basis=cfg.conv_basis,
                              weight_standardization=cfg.conv_weight_standardization, norm_rule=cfg.norm_group_rule,
                              so2_frequency=cfg.so2_frequency, so2_norm_centering=cfg.so2_norm_centering, **shape)


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


def _all_finite(tensors):
    """A tf.function telling whether every element of the (fixed) list of variables is finite."""
    return tf.function(lambda: tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])),
                       autograph=False)


@dataclasses.dataclass
class RunState:
    """Where the trainer is: ``step`` steps applied, the last checkpoint at ``saved``, the last metrics."""

    step: int
    saved: int
    result: dict = dataclasses.field(default_factory=dict)
    step_loss: float = 0.0  # training loss of the logical step being accumulated
    window: Window = dataclasses.field(default_factory=Window)  # since the last progress line
    since_eval: Window = dataclasses.field(default_factory=Window)  # since the last evaluation


class Trainer:
    """Trains ``cfg`` from ``plan`` (a ``plan.RunPlan``) on ``data`` (a ``datasets.LoadedDataset``).

    ``folder`` (a ``plan.RunFolder``) and ``reporter`` are the chief's; None on the other workers."""

    def __init__(self, cfg, plan, dist, stop, data, simulation, folder=None, reporter=None):
        self.cfg, self.plan, self.dist, self.stop = cfg, plan, dist, stop
        self.train_images, self.train_labels = data.train_images, data.train_labels
        test_images, test_labels = data.test_images, data.test_labels
        self.dataset = DatasetDescription.from_json(plan.dataset)
        self.num_test = len(test_labels)
        self.simulation, self.folder, self.reporter = simulation, folder, reporter
        self.state = RunState(step=plan.start, saved=plan.start)
        self.randomness = randomness_lib.StepRandomness(int(plan.key, 16), {int(t): a for t, a in plan.salts})
        self.sampler = randomness_lib.SaltedSampler(
            lambda seed: make_sampler(cfg, plan.num_examples, seed), self.randomness)
        self.jit = resolve_jit(cfg.jit_compile)
        self.eval_data = data_lib.make_eval_dataset(test_images, test_labels, cfg.eval_batch_size) \
            if dist.is_chief else None
        self._build()

    def _build(self):
        cfg, dist = self.cfg, self.dist
        with dist.scope():  # the weights, the optimizer's variables and the gradient sums live on every replica
            self.model = build_model(cfg, self.dataset)
            self.ema_model = build_model(cfg, self.dataset)
            self.optimizer = DPKerasSGDOptimizer(
                l2_norm_clip=cfg.l2_norm_clip, noise_multiplier=self.plan.noise_multiplier,
                expected_batch_size=self.sampler.expected_batch_size, learning_rate=cfg.learning_rate,
                momentum=cfg.momentum)
            # Made now rather than at the first update, so that a checkpoint restores them at once (and the chief
            # can hand them on to the other workers).
            self.optimizer._create_all_weights(self.model.trainable_variables)  # pylint: disable=protected-access
            self.step_fn = DPStep(self.model, None, self.optimizer, view_reduction=cfg.view_reduction, dp=cfg.dp)
            self.ema = WeightAverage(self.model, self.ema_model, cfg.ema_decay, cfg.ema_updates_per_step)
        self.accumulate = self.step_fn.compiled_accumulate(self.jit)
        self.apply_update = self.step_fn.compiled_apply(self.jit)
        self.predict = tf.function(lambda images: self.ema_model(tf.cast(images, tf.float32), training=False),
                                   jit_compile=self.jit)
        self.grads_finite = self.step_fn.compiled_accumulated_finite()
        self.weights_finite = _all_finite(self.model.weights + self.ema_model.weights)
        self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        # Wall time the run had spent when the checkpoint was written, so that a resumed run reports the time of
        # the whole run (checkpoints of earlier versions lack it: their runs count from the resume).
        self.run_seconds_var = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="run_seconds")
        self.checkpoint = tf.train.Checkpoint(model=self.model, ema_model=self.ema_model, optimizer=self.optimizer,
                                              step=self.step_var, run_seconds=self.run_seconds_var)

    # ------------------------------------------------------------------------------------------ the run

    def train(self):
        """Takes the remaining steps; returns the final metrics (raises ``Interrupted`` on a stop signal)."""
        self._restore()
        if self.dist.is_chief:
            self._begin()
        else:
            print(f"{self.dist.describe()}: training with the chief, which writes the run's files", flush=True)
        stopping = self._stop_signal()
        if self.state.step < self.cfg.steps and not stopping:
            stopping = self._train_steps()
        if stopping:
            self._interrupt(stopping)
        return self._finish()

    def _restore(self):
        plan = self.plan

        def restore_on_chief():
            self.folder.store.checkpoint = self.checkpoint
            if plan.checkpoint:
                self.folder.store.restore(plan.checkpoint)
                if int(self.step_var.numpy()) != plan.start:
                    raise JournalError(f"checkpoint {plan.checkpoint} holds step {int(self.step_var.numpy())}, "
                                       f"not {plan.start}")
                self.reporter.earlier_seconds = float(self.run_seconds_var.numpy())

        self.dist.from_chief(restore_on_chief, "restoring the checkpoint")
        if plan.checkpoint:
            self.dist.sync_from_chief(self.model.weights + self.ema_model.weights + self.optimizer.variables())

    def _begin(self):
        """Chief: opens the journal for this process and announces the run."""
        cfg, plan = self.cfg, self.plan
        self.folder.journal.begin(plan.start, {
            "sampling_rate": plan.sampling_rate, "noise_multiplier": plan.noise_multiplier,
            "l2_norm_clip": cfg.l2_norm_clip, "dataset_size": plan.num_examples, "batch_size": cfg.batch_size,
            "delta": cfg.delta, "steps": cfg.steps, "dp": cfg.dp, "sampling": cfg.sampling,
            "simulated_batch_size": cfg.simulated_batch_size,
            "dataset_fingerprint": keyed_fingerprint(plan.key, plan.fingerprint),
        })
        # A resumed run may go on with other resumable settings (or, allowed, privacy settings): they are its config.
        write_json_atomic(os.path.join(cfg.output_dir, "config.json"), run_config(cfg, self.dataset))
        self.reporter.announce(self.model, self.jit, self.dist, self.sampler.physical_batch_size, self.num_test)

    def _stop_signal(self):
        """The signal to stop on (0: none), the same on every worker; every worker asks at the same points."""
        return self.dist.max_over_workers(self.stop.requested or 0)

    def _train_steps(self):
        """The loop over physical batches; returns the stop signal that ended it early, or 0."""
        cfg, state = self.cfg, self.state
        dataset = data_lib.make_train_dataset(
            self.train_images, self.train_labels, self.sampler, cfg.num_views, cfg.seed, start_step=state.step,
            num_steps=cfg.steps - state.step, num_replicas=self.dist.num_replicas, replica_ids=self.dist.replica_ids,
            crop_padding=self.dataset.crop_padding)
        stopping = 0
        t0 = time.monotonic()
        for batch in dataset:
            self._accumulate(batch)
            if not bool(batch["last"]):
                stopping = self._stop_signal()
                if stopping:  # abandon the half-accumulated step: nothing of it was noised
                    self.step_fn.reset()
                    break
                continue
            self._apply_step(time.monotonic() - t0)
            stopping = self._stop_signal()
            if stopping:
                break
            t0 = time.monotonic()
        if self.reporter is not None:
            self.reporter.progress.close()
        return stopping

    def _accumulate(self, batch):
        """Adds one physical batch's clipped gradients; running out of memory ends the run after a checkpoint."""
        state = self.state
        inputs = self.dist.distribute(batch)
        try:
            stats = self.accumulate(inputs["views"], inputs["labels"], inputs["mask"])
        except tf.errors.ResourceExhaustedError:
            self.step_fn.reset()  # the half-accumulated step is abandoned: nothing of it was noised
            if state.step > state.saved:
                self._save_checkpoint(state.step)
            raise TrainingError(
                f"out of memory in step {state.step + 1} with --physical_batch_size "
                f"{self.sampler.physical_batch_size}: lower it (the logical batch is accumulated over more physical "
                f"batches, same result); the checkpoint of step {state.saved} is kept, rerun to resume") from None
        state.window.add(stats)
        state.since_eval.add(stats)
        state.step_loss += float(stats["loss_sum"])

    def _apply_step(self, elapsed):
        """The noised update of a complete logical step, then its journal entry, logs, checkpoint, evaluation."""
        cfg, state = self.cfg, self.state
        number = state.step + 1
        if not math.isfinite(state.step_loss) or not bool(self.grads_finite()):
            what = f"the training loss is {state.step_loss}" if not math.isfinite(state.step_loss) else \
                "the summed clipped gradients are not finite (nan or inf)"
            raise TrainingError(
                f"step {number}: {what}; stopped before applying it, nothing of this step was written "
                f"(the checkpoint of step {state.saved} is kept); lower --learning_rate or check the data")
        self.optimizer.set_noise_seed(self.randomness.noise_seed(number))
        self.ema.before_step(state.step)
        self.apply_update()
        if cfg.dp and 0 in self.dist.replica_ids and not self.optimizer.keyed_noise_traced:  # replica 0 adds it
            raise RuntimeError("DPStep.apply no longer draws its noise through optimizer.noised_sum; "
                               "the keyed (resumable) noise of privacy.randomness is bypassed")
        self.ema.after_step(state.step)
        state.step, state.step_loss = number, 0.0
        state.window.seconds += elapsed
        state.since_eval.seconds += elapsed
        evaluating = number % cfg.eval_every == 0 or number == cfg.steps
        saving = evaluating or number % cfg.checkpoint_every == 0
        metrics = self.dist.from_chief(lambda: self._after_step(number, saving, evaluating), f"step {number}")
        if saving:
            state.saved = number
        if metrics is not None:
            state.result = metrics

    def _after_step(self, step, saving, evaluating):
        """Chief: journal, logs, checkpoint and evaluation of the step just taken; the new metrics or None."""
        cfg, state = self.cfg, self.state
        # Recorded before anything derived from this update can leave the process.
        self.folder.journal.record_step(step, self.plan.sampling_rate, self.plan.noise_multiplier,
                                        cfg.l2_norm_clip, self.plan.num_examples)
        if step % cfg.log_every == 0 or step == cfg.steps:
            self.reporter.log_step(step, state.window)
            state.window.reset()
        # The state is written out only at checkpointed steps: the test metrics follow a checkpoint.
        if saving:
            self._write_checkpoint(step)
        return self._evaluate(step) if evaluating else None

    def _evaluate(self, step):
        """Chief: test loss and accuracy of the EMA weights, recorded with the training statistics since the last."""
        test_loss, test_acc = evaluate(self.predict, self.eval_data)
        record = self.reporter.record_evaluation(step, test_loss, test_acc, self.state.since_eval)
        self.state.since_eval.reset()
        return record

    # ------------------------------------------------------------------------------------------ writing out

    def _write_checkpoint(self, step):
        """Chief: announces the release in the journal (durably), then writes the checkpoint and privacy.json."""
        saved = self.state.saved
        if not bool(self.weights_finite()):
            raise TrainingError(f"the weights became non-finite (nan or inf) at step {step}; stopped without "
                                f"writing them (the checkpoint of step {saved} is kept); lower --learning_rate")
        self.folder.journal.record_release(step, "checkpoint")
        self.step_var.assign(step)
        self.run_seconds_var.assign(self.reporter.run_seconds())
        try:
            path = self.folder.store.save(step)
        except (OSError, tf.errors.OpError) as err:
            raise TrainingError(f"writing the checkpoint of step {step} failed ({one_line(err)}); the checkpoint "
                                f"of step {saved} is kept") from None
        self.reporter.write_privacy(step)
        return path

    def _save_checkpoint(self, step):
        self.dist.from_chief(lambda: self._write_checkpoint(step) and None, f"writing the checkpoint of step {step}")
        self.state.saved = step

    def _interrupt(self, stopping):
        """After a stop signal: a checkpoint of the last step taken, then ``Interrupted``."""
        cfg, step, chief = self.cfg, self.state.step, self.dist.is_chief
        if step > self.state.saved:
            self._save_checkpoint(step)
        if chief:
            self.reporter.writer.flush()
            where = (f"checkpoint of step {step} in {self.folder.store.directory}" if step
                     else "no step taken, nothing to save")
            eps = self.reporter.epsilon()
        else:
            where = f"the chief wrote the checkpoint of step {step}" if step else "no step taken"
            eps = math.nan
        raise Interrupted(
            f"{signal.Signals(stopping).name} at step {step}/{cfg.steps}: {where}"
            + (f"; epsilon spent so far {eps:.3f}" if cfg.dp and step and chief else "")
            + "; rerun the same command to resume", stopping)

    def _finish(self):
        # The other workers wait for the chief here, so that no worker leaves the cluster while it still works.
        final = self.dist.from_chief(self._final_report, "the final evaluation and export")
        if not self.dist.is_chief:
            final = {**final, "worker": self.dist.worker_index, "steps": self.state.step}
            print(f"{self.dist.describe()}: done, {self.state.step} steps; the chief wrote the run's files", flush=True)
        return final

    def _final_report(self):
        """Chief: final metrics, privacy.json and the export."""
        cfg, step = self.cfg, self.state.step
        # Resumed at the final checkpoint of a run that had not exported yet: report its state again.
        no_step_taken = not self.state.result
        final = self._evaluate(step) if no_step_taken else self.state.result
        privacy = self.reporter.write_privacy(step)
        final = {**final, "parameters": self.model.count_params(), "noise_multiplier": self.plan.noise_multiplier,
                 "steps_spent": privacy["steps_spent"]}
        export_dir = os.path.join(cfg.output_dir, "export")
        previous_export = export_lib.latest_version(export_dir)
        if cfg.export and no_step_taken and previous_export:
            # The final weights are already exported; a rerun of a finished command must not pile up copies.
            final["export_path"] = previous_export
            print(f"already exported: {previous_export}")
        elif cfg.export:
            self.folder.journal.record_release(step, "export")
            final["export_path"] = export_lib.export_saved_model(
                self.ema_model, export_dir, extra_files={"privacy.json": privacy, "dataset.json": self.plan.dataset})
            print(f"exported SavedModel to {final['export_path']}")
        if self.simulation is not None:
            final["simulated_run"] = privacy["simulated_run"]
        self.reporter.done(final, privacy)
        return final
