"""The training program: ``run(cfg)`` is everything ``train.py`` does after parsing flags.

It reads top-down as the run goes: load the data (``datasets``) and check the model can take its images, open the
run folder (``plan``), stop if the run is already finished, plan the run (resume point, sigma, key, within the
epsilon ceiling), then train (``trainer``) with its reports (``reporting``). The data comes first so that a dataset
that cannot be used leaves nothing behind in the run folder.

Crash safety (``checkpoint``, ``checkpoint_journal``, ``privacy.randomness``, ``secret_key``): rerunning the same
command after the process died, however it died, resumes from the last checkpoint; the model ends with the
configured number of steps and the same epsilon as an uninterrupted run. SIGINT/SIGTERM stop at the next physical
batch with a checkpoint and exit code 130/143.

Several devices and hosts (``--distribution``, see ``distribution``): every worker runs ``run``; the chief alone
reads and writes the run folder and hands the others what they need (the plan) through collectives.
"""

import os
import time

import tensorflow as tf

from eqdp_tf import export as export_lib
from eqdp_tf import models
from eqdp_tf.config import TrainConfig
from eqdp_tf.datasets import ReadOptions, load_dataset
from eqdp_tf.errors import ConfigError, one_line
from eqdp_tf.training import distribution
from eqdp_tf.training.checkpoint import Interrupted, StopSignals
from eqdp_tf.training.plan import (RunPlan, check_worker, finished_run, largest_logical_batch, make_plan, make_sampler,
                                   open_run_folder, prepare_output_dir, resolve_noise, simulation_of)
from eqdp_tf.training.reporting import Reporter, TrainingError
from eqdp_tf.training.trainer import Trainer, build_model, evaluate, resolve_jit

# What a collective raises when a peer worker has died or is unreachable.
_LOST_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                     tf.errors.DeadlineExceededError)


def load_data(cfg):
    """The ``datasets.LoadedDataset`` of ``cfg`` (train and test arrays, their description), after checking that the
    model can take its images."""
    options = ReadOptions(data_dir=cfg.data_dir, image_size=cfg.image_size, train_split=cfg.train_split,
                          test_split=cfg.test_split, test_fraction=cfg.test_fraction, split_seed=cfg.split_seed)
    loaded = load_dataset(cfg.dataset, options, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                          normalization_mean=cfg.normalization_mean, normalization_std=cfg.normalization_std,
                          crop_padding=cfg.crop_padding)
    try:
        models.check_image_shape(cfg.architecture, cfg.head, loaded.description.image_shape)
    except ValueError as err:
        raise ConfigError(f"{err}: resize with --image_size") from None
    return loaded


def run(cfg: TrainConfig):
    """Trains, evaluates, checkpoints, reports privacy and exports; returns the final metrics.

    Raises ``checkpoint.Interrupted`` after a SIGINT/SIGTERM (a checkpoint has been written), and a
    ``UserError`` for bad input or a run that cannot go on.

    With ``--distribution=multi_worker`` every worker runs this; only the chief writes files (see
    ``distribution``), and the others return ``{"worker": index, "steps": steps}`` plus the chief's final metrics.
    """
    with StopSignals() as stop:
        # First: MultiWorkerMirroredStrategy must start before TensorFlow initialises its runtime.
        dist = distribution.build(cfg.distribution)
        stop.reinstall()
        opened = {}  # the chief's run folder and reporter, closed whatever happens
        try:
            return _run(cfg, dist, stop, opened)
        except _LOST_PEER_ERRORS as err:
            if dist.num_workers == 1:
                raise
            detail = one_line(err)
            detail = detail if len(detail) <= 200 else detail[:200] + "..."
            raise distribution.WorkerError(
                f"lost contact with another worker ({type(err).__name__}: {detail}); the chief's last "
                "checkpoint is kept: restart every worker with the same command to resume") from None
        finally:
            for name in ("reporter", "folder"):
                if name in opened:
                    opened[name].close()


def _run(cfg, dist, stop, opened):
    started = time.monotonic()
    tf.keras.utils.set_random_seed(cfg.seed)
    data = dist.on_every_worker(lambda: load_data(cfg), "loading the data")
    description = data.description

    def open_folder():
        opened["folder"] = open_run_folder(cfg, description)

    dist.from_chief(open_folder, "checking --output_dir")
    folder = opened.get("folder")  # None on the other workers
    finished = dist.from_chief(
        lambda: finished_run(cfg, folder.journal, export_lib.latest_version(os.path.join(cfg.output_dir, "export"))),
        "checking whether the run has finished")
    if finished is not None:
        return finished
    num_examples = description.num_train
    simulation = simulation_of(cfg, num_examples)
    plan = RunPlan.from_json(dist.from_chief(lambda: make_plan(cfg, folder, description, data.fingerprint).to_json(),
                                             "planning the run"))
    if dist.num_workers > 1:
        dist.on_every_worker(
            lambda: dist.is_chief or check_worker(cfg, plan, data.fingerprint, dist.worker_index),
            "comparing the workers' flags and data")
    if dist.is_chief:
        opened["reporter"] = Reporter(cfg, plan, folder.journal, simulation, cfg.sampling, started)
    trainer = Trainer(cfg, plan, dist, stop, data, simulation, folder, opened.get("reporter"))
    return trainer.train()


__all__ = ["Interrupted", "TrainingError", "build_model", "evaluate", "largest_logical_batch", "load_data",
           "make_sampler", "prepare_output_dir", "resolve_jit", "resolve_noise", "run"]
