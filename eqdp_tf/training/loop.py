"""The training program: data, model, DP-SGD steps, EMA, evaluation, checkpoints, privacy report, export.

``run(cfg)`` is everything ``train.py`` does after parsing flags. Privacy bookkeeping: every logical
step taken is recorded in a ``PrivacyLedger`` that is checkpointed together with the weights, so a
resumed run reports the epsilon of all steps, including those of earlier processes.
"""

import json
import math
import os
import time

import numpy as np
import tensorflow as tf

from eqdp_tf import data as data_lib
from eqdp_tf import export as export_lib
from eqdp_tf import models
from eqdp_tf.config import TrainConfig, load_saved
from eqdp_tf.errors import ConfigError, UserError
from eqdp_tf.privacy import accounting
from eqdp_tf.privacy.dp_step import DPKerasSGDOptimizer, DPStep
from eqdp_tf.training.ema import WeightAverage
from eqdp_tf.training.progress import Progress


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss diverged); nothing further is written."""


def resolve_jit(choice):
    if choice == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return choice == "true"


def _write_json_atomic(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def prepare_output_dir(cfg):
    """Creates the run folder, or checks that an existing one holds this same run (then it resumes)."""
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
        probe = os.path.join(cfg.output_dir, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"cannot write to --output_dir {cfg.output_dir}: {err.strerror or err}") from None
    config_path = os.path.join(cfg.output_dir, "config.json")
    if os.path.exists(config_path):
        try:
            saved = load_saved(config_path)
        except (OSError, ValueError):
            raise ConfigError(f"--output_dir {cfg.output_dir} holds an unreadable config.json; use another folder") from None
        diffs = cfg.differences(saved)
        if diffs:
            raise ConfigError(
                f"--output_dir {cfg.output_dir} holds a different run (differs in: {', '.join(diffs)}); "
                "use another folder, or the same flags to resume it"
            )
    elif os.listdir(cfg.output_dir):
        raise ConfigError(f"--output_dir {cfg.output_dir} is not empty and holds no run of ours; use another folder")
    _write_json_atomic(config_path, cfg.to_json())


def resolve_noise(cfg, sampling_rate):
    """The noise multiplier to train with: as given, or calibrated to the target epsilon."""
    if not cfg.dp:
        return 0.0
    if cfg.noise_multiplier is not None:
        return float(cfg.noise_multiplier)
    return accounting.calibrate_noise_multiplier(cfg.target_epsilon, sampling_rate, cfg.steps, cfg.delta)


def _make_sampler(cfg, num_examples):
    if cfg.batch_size > num_examples:
        raise ConfigError(f"--batch_size {cfg.batch_size} is larger than the {num_examples} training examples")
    if cfg.sampling == "poisson":
        return data_lib.PoissonSampler(num_examples, cfg.batch_size / num_examples, cfg.physical_batch_size, cfg.seed)
    return data_lib.ShuffleSampler(num_examples, cfg.batch_size, cfg.physical_batch_size, cfg.seed)


def build_model(cfg):
    return models.build_model(cfg.architecture, group=cfg.group, restrict=cfg.restricted_group, head=cfg.head)


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


def run(cfg: TrainConfig):
    """Trains, evaluates, checkpoints, reports privacy and exports; returns the final metrics."""
    prepare_output_dir(cfg)
    tf.keras.utils.set_random_seed(cfg.seed)
    train_images, train_labels = data_lib.load_cifar10("train", cfg.data_dir, cfg.train_subset)
    test_images, test_labels = data_lib.load_cifar10("test", cfg.data_dir, cfg.test_subset)
    num_examples = len(train_labels)
    sampler = _make_sampler(cfg, num_examples)
    q = cfg.batch_size / num_examples
    sigma = resolve_noise(cfg, q)
    if cfg.dp:
        for warning in accounting.validate_privacy_params(
            noise_multiplier=sigma, sampling_rate=q, steps=cfg.steps, delta=cfg.delta,
            l2_norm_clip=cfg.l2_norm_clip, dataset_size=num_examples,
        ):
            print(f"warning: {warning}")

    jit = resolve_jit(cfg.jit_compile)
    model = build_model(cfg)
    ema_model = build_model(cfg)
    optimizer = DPKerasSGDOptimizer(
        l2_norm_clip=cfg.l2_norm_clip, noise_multiplier=sigma, expected_batch_size=sampler.expected_batch_size,
        learning_rate=cfg.learning_rate, momentum=cfg.momentum,
    )
    step_fn = DPStep(model, None, optimizer, view_reduction=cfg.view_reduction, dp=cfg.dp)
    accumulate = step_fn.compiled_accumulate(jit)
    apply_update = step_fn.compiled_apply(jit)
    ema = WeightAverage(model, ema_model, cfg.ema_decay)
    predict = tf.function(lambda images: ema_model(tf.cast(images, tf.float32), training=False), jit_compile=jit)

    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    ledger_var = tf.Variable(json.dumps(accounting.PrivacyLedger().to_json()), dtype=tf.string, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, ema_model=ema_model, optimizer=optimizer, step=step_var, ledger=ledger_var)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(cfg.output_dir, "checkpoints"), max_to_keep=2)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint)
    start = int(step_var.numpy())
    ledger = accounting.PrivacyLedger.from_json(json.loads(ledger_var.numpy().decode()))

    print(f"model {model.name}: {model.count_params():,} parameters; train {num_examples}, test {len(test_labels)} "
          f"examples; XLA {'on' if jit else 'off'}")
    if cfg.dp:
        print(f"DP-SGD: q={q:.5g} ({sampler.method}), sigma={sigma:.4g}, C={cfg.l2_norm_clip}, delta={cfg.delta}, "
              f"{cfg.steps} steps -> epsilon {accounting.compute_epsilon(sigma, q, cfg.steps, cfg.delta):.3f}"
              + (" (assumes Poisson sampling)" if sampler.method != "poisson" else ""))
    else:
        print("non-private training (--dp=false): no clipping, no noise, no privacy guarantee")
    if start:
        print(f"resuming from step {start} ({manager.latest_checkpoint})")

    writer = tf.summary.create_file_writer(os.path.join(cfg.output_dir, "tensorboard"))
    eval_data = data_lib.make_eval_dataset(test_images, test_labels, cfg.eval_batch_size)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    progress = Progress(cfg.steps, start)
    window, since_eval = _Window(), _Window()
    result = {}

    def epsilon_now():
        return ledger.epsilon(cfg.delta) if cfg.dp else math.inf

    def save_checkpoint(step):
        step_var.assign(step)
        ledger_var.assign(json.dumps(ledger.to_json()))
        manager.save(checkpoint_number=step)

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
            "examples_per_sec": rate,
            "views_per_sec": rate * cfg.num_views,
        }
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        with writer.as_default(step=step):
            tf.summary.scalar("test/accuracy", test_acc)
            tf.summary.scalar("test/loss", test_loss)
        progress.message(f"step {step}: test accuracy {test_acc:.4f}, test loss {test_loss:.4f}, epsilon {eps:.3f}")
        since_eval.reset()
        return record

    step = start
    if start < cfg.steps:
        dataset = data_lib.make_train_dataset(
            train_images, train_labels, sampler, cfg.num_views, cfg.seed, start_step=start, num_steps=cfg.steps - start
        )
        t0 = time.monotonic()
        for batch in dataset:
            stats = accumulate(batch["views"], batch["labels"], batch["mask"])
            window.add(stats)
            since_eval.add(stats)
            if not bool(batch["last"]):
                continue
            apply_update()
            ema.update(step)
            step += 1
            if cfg.dp:
                ledger.record(sampling_rate=q, noise_multiplier=sigma)
            elapsed = time.monotonic() - t0
            window.seconds += elapsed
            since_eval.seconds += elapsed
            mean_loss = window.loss / max(window.count, 1)
            if not math.isfinite(mean_loss):
                raise TrainingError(f"the training loss became {mean_loss} at step {step}; lower --learning_rate "
                                    "or check the data (last checkpoint kept)")
            if step % cfg.log_every == 0 or step == cfg.steps:
                rate = window.count / window.seconds if window.seconds else 0.0
                values = {"loss": mean_loss, "acc": window.correct / max(window.count, 1)}
                if cfg.dp:
                    values["eps"] = epsilon_now()
                values["ex/s"] = round(rate, 1)
                progress.update(step, **values)
                with writer.as_default(step=step):
                    for name, value in values.items():
                        tf.summary.scalar(f"train/{name.replace('/', '_per_')}", value)
                window.reset()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                result = report(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(step)
            t0 = time.monotonic()
        progress.close()
    if not result:  # resumed a finished run: report its final state again
        result = report(step)

    if cfg.dp:
        privacy = accounting.PrivacyReport.from_ledger(
            ledger, delta=cfg.delta, batch_size=cfg.batch_size, dataset_size=num_examples,
            l2_norm_clip=cfg.l2_norm_clip, sampling_method=sampler.method,
        ).to_json()
    else:
        privacy = {"dp": False, "epsilon": None, "steps": step, "batch_size": cfg.batch_size,
                   "dataset_size": num_examples, "note": "non-private run: no privacy guarantee"}
    _write_json_atomic(os.path.join(cfg.output_dir, "privacy.json"), privacy)
    result = {**result, "parameters": model.count_params(), "noise_multiplier": sigma}
    if cfg.export:
        path = export_lib.export_saved_model(ema_model, os.path.join(cfg.output_dir, "export"))
        result["export_path"] = path
        print(f"exported SavedModel to {path}")
    eps = result.get("epsilon")
    print(f"done: test accuracy {result['test_accuracy']:.4f}, "
          + (f"epsilon {eps:.3f} (delta {cfg.delta})" if eps is not None else "no privacy guarantee"))
    return result
