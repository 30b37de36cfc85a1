"""The plan of a run: everything the flags, the run folder and the data decide before the first step.

``make_plan`` (the chief) checks or creates the run folder's state, works out where to resume, calibrates sigma,
holds the epsilon ceiling and loads the run's key; the result, a frozen ``RunPlan``, is plain JSON so the chief can
hand it to every worker. Nothing here builds a model or touches TensorFlow.
"""

import dataclasses
import fcntl
import hashlib
import hmac
import json
import math
import os
from typing import Dict, Optional, Tuple

from eqdp_tf import data as data_lib
from eqdp_tf.config import TrainConfig, load_saved
from eqdp_tf.errors import ConfigError, DataError, PrivacyError, one_line
from eqdp_tf.io import write_json_atomic
from eqdp_tf.privacy import accounting
from eqdp_tf.privacy.simulation import Simulation
from eqdp_tf.training import secret_key
from eqdp_tf.training.checkpoint import CHECKPOINT_DIR, CheckpointStore
from eqdp_tf.training.checkpoint_journal import (JOURNAL_NAME, LEGACY_JOURNAL_NAME, JournalError, PrivacyJournal,
                                                 adopt_legacy_journal, describe_steps)

# Settings in which the workers of one run may differ from the chief: paths on their own host, and XLA.
WORKER_LOCAL_SETTINGS = ("output_dir", "data_dir", "jit_compile")


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What every worker needs to train, decided once by the chief (and what the chief announces)."""

    start: int  # the step to resume from (0: a new run)
    checkpoint: Optional[str]  # the checkpoint to restore (None: start from the initialisation)
    noise_multiplier: float  # this run's sigma (with a TAN simulation: already scaled down)
    sampling_rate: float  # q = batch_size / dataset size
    num_examples: int
    key: str  # the run's secret key, hex (sampling and noise)
    salts: Tuple[Tuple[int, int], ...]  # steps to re-take with fresh randomness
    planned_epsilon: Optional[float]  # epsilon at the end of the run (None: non-private)
    planned_simulated_epsilon: Optional[float]  # the simulated run's, with --simulated_batch_size
    steps_spent_before: int  # steps this run had spent before this process (composed into the epsilon)
    changes: Dict[str, Tuple] = dataclasses.field(default_factory=dict)  # privacy settings changed on resume
    discarded: Tuple[int, ...] = ()  # steps of an earlier process never written out: not counted
    retaken: Tuple[int, ...] = ()  # steps written out in a lost checkpoint: taken again, counted twice
    warnings: Tuple[str, ...] = ()
    skipped: Tuple[Tuple[str, str], ...] = ()  # unreadable checkpoints set aside: (path, why)
    config: Dict = dataclasses.field(default_factory=dict)  # the chief's flags (workers compare theirs)
    fingerprint: Optional[str] = None  # SHA-256 of the chief's training data (workers compare theirs); never written
    dataset: Dict = dataclasses.field(default_factory=dict)  # the chief's datasets.DatasetDescription, as JSON

    def to_json(self):
        return json.loads(json.dumps(dataclasses.asdict(self), allow_nan=True))

    @classmethod
    def from_json(cls, data):
        tuples = {"salts", "discarded", "retaken", "warnings", "skipped"}
        return cls(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if k in tuples else v
                      for k, v in data.items()})


# --------------------------------------------------------------------------------------------
# The run folder


@dataclasses.dataclass
class RunFolder:
    """The chief's open run folder: its privacy journal, its checkpoints, the privacy settings changed, and the lock
    that keeps other processes out of it until ``close``."""

    journal: PrivacyJournal
    store: CheckpointStore
    changes: Dict[str, Tuple]
    lock: Optional[int] = None  # a descriptor of the folder, flocked

    def close(self):
        self.journal.close()
        if self.lock is not None:
            os.close(self.lock)  # releases the flock
            self.lock = None


def _has_training_state(output_dir):
    if adopt_legacy_journal(output_dir):
        print(f"note: renamed {LEGACY_JOURNAL_NAME} to {JOURNAL_NAME} in {output_dir} (its name since this version)")
    journal = os.path.join(output_dir, JOURNAL_NAME)
    has_steps = os.path.exists(journal) and PrivacyJournal(journal).has_steps
    return has_steps or bool(CheckpointStore(None, os.path.join(output_dir, CHECKPOINT_DIR)).steps())


# config.json's record of the dataset (normalisation and where it came from, N, ...): not a flag, so a resume does not
# compare it (the journal's dataset size and keyed fingerprint stand for it).
DATASET_KEY = "dataset_description"


def run_config(cfg, dataset=None):
    """What config.json holds: the flags, and (once loaded) the dataset's description under ``DATASET_KEY``."""
    return {**cfg.to_json(), **({DATASET_KEY: dataset.to_json()} if dataset is not None else {})}


def saved_flags(saved):
    """The flags of a saved config.json (``run_config``'s), without the dataset's description: what a resume
    compares."""
    return {k: v for k, v in saved.items() if k != DATASET_KEY}


def prepare_output_dir(cfg, dataset=None):
    """Creates the run folder, or checks that an existing one holds this same run (then it resumes).

    Returns the privacy settings that differ from the saved run's, as ``{name: (saved, now)}`` (only possible
    with ``--allow_privacy_change``). config.json (``run_config``, with the description ``dataset``) is written here
    for a new run; a resumed run's is rewritten once training starts (``trainer``), so that a finished or refused
    run's folder is left as it was.
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
    if os.path.exists(config_path):
        try:
            saved = load_saved(config_path)
        except (OSError, ValueError):
            raise ConfigError(f"--output_dir {cfg.output_dir} holds an unreadable config.json; use another folder") from None
        if _has_training_state(cfg.output_dir):  # otherwise a start that failed before its first step: start over
            return _check_same_run(cfg, saved)
    elif os.listdir(cfg.output_dir):
        raise ConfigError(f"--output_dir {cfg.output_dir} is not empty and holds no run of ours; use another folder")
    write_json_atomic(config_path, run_config(cfg, dataset))
    return {}


def _check_same_run(cfg, saved):
    """The privacy settings changed since the saved config; refuses any other difference."""
    saved = saved_flags(saved)
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
    return changes


def _lock_run_folder(output_dir):
    """Creates the folder and takes an exclusive flock on it (no file is written), held until the returned
    descriptor is closed or the process ends, crash included; refuses if another process holds it. Two processes
    in one folder would interleave their privacy journals and leave them unreadable."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        lock = os.open(output_dir, os.O_RDONLY)
    except OSError as err:
        raise ConfigError(f"cannot write to --output_dir {output_dir}: {one_line(err)}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        raise ConfigError(f"another process is training in --output_dir {output_dir}; wait for it to stop, or use "
                          "another folder") from None
    return lock


def open_run_folder(cfg, dataset=None):
    """Chief: takes the run folder (one process at a time), checks or creates it and opens its journal and
    checkpoint store. ``dataset``: the description config.json records."""
    lock = _lock_run_folder(cfg.output_dir)
    try:
        changes = prepare_output_dir(cfg, dataset)
        journal = PrivacyJournal(os.path.join(cfg.output_dir, JOURNAL_NAME))
        store = CheckpointStore(None, os.path.join(cfg.output_dir, CHECKPOINT_DIR))
        if store.steps() and not journal.has_steps:
            raise JournalError(f"--output_dir {cfg.output_dir} holds checkpoints but no record of their privacy in "
                               f"{JOURNAL_NAME}, so the privacy already spent is unknown; use another folder")
    except BaseException:
        os.close(lock)
        raise
    return RunFolder(journal, store, changes, lock)


def finished_run(cfg, journal, latest_export):
    """The final metrics if an earlier process finished this run (released its final export, or with
    --export=false its final checkpoint), else None. A finished run stays finished: it is never trained again,
    whatever became of its checkpoints since. ``latest_export``: the newest export folder, or None."""
    if not journal.released_final(cfg.steps, "export" if cfg.export else "checkpoint"):
        return None
    export = latest_export if cfg.export else None
    if cfg.export and export is None:  # announced, but the export itself failed: export again
        return None
    out = cfg.output_dir
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        privacy = load_saved(os.path.join(out, "privacy.json"))
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


# --------------------------------------------------------------------------------------------
# Sampling and noise


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


def _sigma_for_resume(cfg, journal, q, start, changes, simulation):
    """Sigma of the remaining steps: as given, as calibrated when the run started, or calibrated anew so that
    everything spent plus the remaining steps meets the target (after a change of privacy settings)."""
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
    remaining = max(cfg.steps - start, 1)
    if simulation is None:
        return _calibrate(cfg, lambda: accounting.calibrate_noise_multiplier(
            cfg.target_epsilon, q, remaining, cfg.delta, spent=spent))
    # The target is the simulated run's: calibrate in its terms, then scale down to this batch.
    return simulation.real_noise_multiplier(_calibrate(cfg, lambda: accounting.calibrate_noise_multiplier(
        cfg.target_epsilon, q * simulation.ratio, remaining, cfg.delta, spent=simulation.simulated_ledger(spent))))


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


def make_sampler(cfg, num_examples, seed=None):
    seed = cfg.seed if seed is None else seed
    if cfg.batch_size > num_examples:
        raise ConfigError(f"--batch_size {cfg.batch_size} is larger than the {num_examples} training examples "
                          "(sampling rate q > 1)")
    physical = physical_batch_size(cfg, num_examples)
    if cfg.sampling == "poisson":
        return data_lib.PoissonSampler(num_examples, cfg.batch_size / num_examples, physical, seed)
    return data_lib.ShuffleSampler(num_examples, cfg.batch_size, physical, seed)


# --------------------------------------------------------------------------------------------
# The plan


def keyed_fingerprint(key, fingerprint):
    """What the privacy journal records of the training set: HMAC-SHA256 of its fingerprint under the run's secret
    key (hex). Equal for the same data, and, without the key, no test of which data it was."""
    return hmac.new(bytes.fromhex(key), fingerprint.encode(), hashlib.sha256).hexdigest()


def _check_same_data(cfg, journal, num_examples, fingerprint):
    """Refuses, as a changed privacy setting, to resume on other training data than the run started with: another
    number of examples, or other examples (their keyed fingerprint, in start records since datasets had one)."""
    last = journal.last_start()
    if last is None or not journal.has_steps or cfg.allow_privacy_change:
        return
    if last.get("dataset_size") != num_examples:
        raise ConfigError(
            f"the training set now has {num_examples} examples, but this run was started with "
            f"{last.get('dataset_size')} (another --data_dir?); resume with the same data, or pass "
            "--allow_privacy_change to continue with these (epsilon then composes both parts)"
        )
    recorded = last.get("dataset_fingerprint")
    secret = os.path.join(cfg.output_dir, secret_key.SECRET_NAME)
    if recorded is None or (cfg.dp_seed is None and not os.path.exists(secret)):  # nothing to compare with
        return
    key = f"{secret_key.load_or_create_key(cfg.output_dir, cfg.dp_seed):064x}"
    if keyed_fingerprint(key, fingerprint) != recorded:
        raise ConfigError(
            f"the training set has other images or labels than this run was started with (same number, "
            f"{num_examples}, but another fingerprint: files changed?); resume with the same data, or pass "
            "--allow_privacy_change to continue with these (epsilon then composes both parts)"
        )


def check_ceiling(cfg, reached, retaken, simulated):
    """Refuses a run whose planned steps would take epsilon (``reached``; the simulated run's with a TAN
    simulation) past the ceiling (--max_epsilon, else --target_epsilon), before any step is taken."""
    ceiling = cfg.epsilon_ceiling
    if ceiling is None or reached <= ceiling:
        return
    which = "simulated " if simulated else ""
    limit = f"--max_epsilon={cfg.max_epsilon:g}" if cfg.max_epsilon is not None else \
        f"--target_epsilon={cfg.target_epsilon:g}"
    if retaken:
        raise PrivacyError(
            f"resuming must take steps {describe_steps(retaken)} again (their checkpoint is lost; both takes "
            f"count), which would bring {which}epsilon to {reached:.4g}, above the ceiling {limit}; nothing "
            f"was trained: pass --max_epsilon={math.ceil(reached * 100) / 100:g} to allow it, or start a new "
            "folder")
    if cfg.noise_multiplier is not None and cfg.max_epsilon is None:
        raise PrivacyError(
            f"--noise_multiplier={cfg.noise_multiplier:g} gives {which}epsilon {reached:.4g} after "
            f"--steps={cfg.steps}, above --target_epsilon={cfg.target_epsilon:g}: the two contradict each other; "
            "drop one (or raise the noise)")
    raise PrivacyError(
        f"this run would reach {which}epsilon {reached:.4g} after --steps={cfg.steps}, above the ceiling "
        f"{limit}; nothing was trained: raise the noise or the ceiling")


def make_plan(cfg: TrainConfig, folder: RunFolder, dataset, fingerprint) -> RunPlan:
    """Chief: where to start, with which sigma and key, within the epsilon ceiling, on ``dataset`` (a
    ``datasets.DatasetDescription``) whose training set has the SHA-256 ``fingerprint``."""
    journal, store, changes = folder.journal, folder.store, folder.changes
    num_examples = dataset.num_train
    make_sampler(cfg, num_examples)  # rejects q > 1 before anything else is decided
    simulation = simulation_of(cfg, num_examples)
    q = cfg.batch_size / num_examples
    _check_same_data(cfg, journal, num_examples, fingerprint)
    skipped = []
    start, prefix = store.latest_valid(on_skip=lambda path, err: skipped.append((path, str(err))))
    resume = journal.plan_resume(start)
    sigma = _sigma_for_resume(cfg, journal, q, start, changes, simulation)
    # Everything this run will have spent at its end: what is spent already, then the remaining steps.
    planned = journal.ledger()
    spent_before = planned.total_steps
    planned.record(q, sigma, cfg.steps - start)
    planned_epsilon = planned.epsilon(cfg.delta) if cfg.dp else None
    simulated_epsilon = simulation.epsilon(planned, cfg.delta) if simulation else None
    if cfg.dp:
        check_ceiling(cfg, simulated_epsilon if simulation else planned_epsilon, resume.retaken, bool(simulation))
    warnings = accounting.validate_privacy_params(
        noise_multiplier=sigma, sampling_rate=q, steps=cfg.steps, delta=cfg.delta,
        l2_norm_clip=cfg.l2_norm_clip, dataset_size=num_examples) if cfg.dp else []
    key = secret_key.load_or_create_key(cfg.output_dir, cfg.dp_seed)
    return RunPlan(
        start=start, checkpoint=prefix, noise_multiplier=sigma, sampling_rate=q, num_examples=num_examples,
        key=f"{key:064x}", salts=tuple(sorted(resume.salts.items())), planned_epsilon=planned_epsilon,
        planned_simulated_epsilon=simulated_epsilon, steps_spent_before=spent_before, changes=changes,
        discarded=tuple(resume.discarded), retaken=tuple(resume.retaken), warnings=tuple(warnings),
        skipped=tuple(skipped), config=cfg.to_json(), fingerprint=fingerprint, dataset=dataset.to_json())


def check_worker(cfg, plan: RunPlan, fingerprint, worker_index):
    """Worker: its flags and data must be the chief's (same batches, same split over replicas)."""
    mine = cfg.to_json()
    differ = sorted(k for k in set(mine) | set(plan.config)
                    if k not in WORKER_LOCAL_SETTINGS and mine.get(k) != plan.config.get(k))
    if differ:
        raise ConfigError(f"worker {worker_index} was started with other flags than the chief (differ "
                          f"in: {', '.join(differ)}); start every worker with the same flags")
    if fingerprint != plan.fingerprint:
        raise DataError(f"worker {worker_index} has other training data than the chief (check "
                        "--data_dir or the --dataset path on every host): the examples of a sampled batch would not "
                        "be the same")
