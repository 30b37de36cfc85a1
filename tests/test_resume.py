"""Crash safety: kill and resume real (tiny) training runs; the privacy journal's accounting rule; signals.

The reference is one uninterrupted run. Interrupted runs must end with the same number of model steps and the
same epsilon (or, when a released state was lost, a larger one that counts the lost steps), and, with a small
learning rate, nearly the same weights: floating-point results differ across processes by ~1e-8 per step, but a
resume that restarts the noise stream, resets the EMA or the momentum, or resamples batches moves weights by
~1e-3.
"""

import json
import math
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import CIFAR10_DIR, REPO_ROOT, flags_for, needs_cifar10, snapshot, subprocess_env
from eqdp_tf.config import TrainConfig
from eqdp_tf.errors import ConfigError, PrivacyError
from eqdp_tf.privacy import accounting
from eqdp_tf.privacy import randomness as randomness_lib
from eqdp_tf.privacy.dp_step import DPKerasSGDOptimizer
from eqdp_tf.training import loop, secret_key
from eqdp_tf.training.checkpoint import CheckpointStore, Interrupted, StopSignals
from eqdp_tf.training.checkpoint_journal import JOURNAL_NAME, JournalError, PrivacyJournal

needs_data = needs_cifar10
pytestmark = pytest.mark.slow

TRAIN_PY = os.path.join(REPO_ROOT, "train.py")
STEPS = 10
SIGMA = 1.0
Q = 32 / 256
# Weights of two processes training identically differ by ~2e-6 after 10 steps at this learning rate.
WEIGHT_ATOL = 1e-4


def _config(output_dir, **overrides):
    settings = dict(
        architecture="eq_resnet9", group="D4", restrict="D2", head="paper",
        data_dir=CIFAR10_DIR, train_subset=256, test_subset=64,
        steps=STEPS, batch_size=32, physical_batch_size=16, num_views=1,
        noise_multiplier=SIGMA, l2_norm_clip=2.0, delta=1e-5, learning_rate=0.01, momentum=0.9,
        eval_every=5, checkpoint_every=2, eval_batch_size=64, output_dir=str(output_dir), seed=3, dp_seed=11,
        export=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _start(cfg, cwd):
    return subprocess.Popen([sys.executable, TRAIN_PY, *flags_for(cfg)], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _wait_for(path, proc, timeout=180):
    t0 = time.monotonic()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared: {proc.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


def _privacy(out):
    with open(os.path.join(out, "privacy.json")) as f:
        return json.load(f)


def _journal_steps(out):
    with open(os.path.join(out, JOURNAL_NAME)) as f:
        return [json.loads(line) for line in f if line.strip()]


def _weights(out, step=STEPS):
    reader = tf.train.load_checkpoint(os.path.join(out, "checkpoints", f"ckpt-{step}"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model/", "ema_model/")) and "OPTIMIZER_SLOT" not in name}


def _assert_weights_close(a, b):
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a if a[k].dtype.kind == "f")
    assert worst < WEIGHT_ATOL, worst


def _checkpoint_step(out):
    return int(tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(out, "checkpoints")))
               .get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (in this process)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = loop.run(_config(out))
    return str(out), result


# --------------------------------------------------------------------------------------------
# Killing real runs


@needs_data
def test_sigkill_at_random_moments_then_resume(reference, tmp_path):
    ref_out, ref_result = reference
    out = tmp_path / "run"
    cfg = _config(out)
    rng = random.Random(20240611)
    kills = []
    for trigger in ("ckpt-2.index", "ckpt-6.index"):
        proc = _start(cfg, tmp_path)
        try:
            _wait_for(out / "checkpoints" / trigger, proc)
            time.sleep(rng.uniform(0.0, 1.2))
        finally:
            proc.kill()  # SIGKILL
            proc.communicate()
        kills.append(_checkpoint_step(out))
    code, stdout, stderr = _finish(_start(cfg, tmp_path))
    assert code == 0, stderr[-3000:]
    assert "resuming from step" in stdout

    privacy, ref_privacy = _privacy(out), _privacy(ref_out)
    assert privacy["model_steps"] == STEPS == _checkpoint_step(out)
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")][-1] == STEPS
    # The epsilon of exactly the steps the journal counts, never less than that of the model's own steps.
    assert privacy["epsilon"] == pytest.approx(accounting.compute_epsilon(SIGMA, Q, privacy["steps_spent"], 1e-5),
                                               rel=1e-12)
    assert privacy["steps_spent"] >= STEPS
    if privacy["steps_counted_twice"] == 0:  # the usual case: the kill did not hit a checkpoint being written
        assert privacy["epsilon"] == ref_privacy["epsilon"] == ref_result["epsilon"]
        _assert_weights_close(_weights(out), _weights(ref_out))
    else:
        assert privacy["epsilon"] > ref_privacy["epsilon"]
    print(f"killed at checkpoint steps {kills}; steps spent {privacy['steps_spent']}, discarded "
          f"{privacy['steps_discarded']}; epsilon {privacy['epsilon']:.4f} vs uninterrupted "
          f"{ref_privacy['epsilon']:.4f}")


@needs_data
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_exits_nonzero_then_resume_completes(reference, tmp_path, signum):
    ref_out, ref_result = reference
    out = tmp_path / "run"
    cfg = _config(out)
    proc = _start(cfg, tmp_path)
    _wait_for(out / "checkpoints" / "ckpt-2.index", proc)
    time.sleep(0.3)
    proc.send_signal(signum)
    code, stdout, stderr = _finish(proc)
    assert code == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"interrupted: {signal.Signals(signum).name} at step "), stderr
    assert "rerun the same command to resume" in lines[0]
    stopped = _checkpoint_step(out)
    records = _journal_steps(out)
    taken = [r["step"] for r in records if r["event"] == "step"]
    assert stopped == max(taken)  # the last finished step was checkpointed: nothing to re-take
    assert records[-1] == {"event": "release", "attempt": 1, "step": stopped, "what": "checkpoint"}
    assert _privacy(out)["model_steps"] == stopped == _privacy(out)["steps_spent"]
    if signum == signal.SIGINT:
        return
    code, stdout, stderr = _finish(_start(cfg, tmp_path))
    assert code == 0, stderr[-3000:]
    assert f"resuming from step {stopped}" in stdout
    privacy = _privacy(out)
    assert (privacy["model_steps"], privacy["steps_spent"], privacy["steps_discarded"]) == (STEPS, STEPS, 0)
    assert privacy["epsilon"] == ref_result["epsilon"]
    _assert_weights_close(_weights(out), _weights(ref_out))
    # The run's wall time counts the first process up to its checkpoint; this process's alone does not.
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert last["run_wall_seconds"] > last["wall_seconds"] + 0.5
    reference_last = [json.loads(line) for line in open(os.path.join(ref_out, "metrics.jsonl"))][-1]
    assert reference_last["run_wall_seconds"] == pytest.approx(reference_last["wall_seconds"], abs=1e-6)


def _stop_self_after(path):
    """Sends SIGTERM to this process once ``path`` exists (the in-process loop then stops cleanly)."""

    def watch():
        while not os.path.exists(path):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _interrupted_run(out, **overrides):
    """A run stopped by SIGTERM soon after its first checkpoint; returns the step it stopped at."""
    _stop_self_after(os.path.join(out, "checkpoints", "ckpt-2.index"))
    with pytest.raises(Interrupted) as info:
        loop.run(_config(out, **overrides))
    assert info.value.exit_code == 143
    return _checkpoint_step(out)


@needs_data
def test_resume_with_changed_noise_is_refused_unless_allowed_then_composes(tmp_path):
    out = tmp_path / "run"
    stopped = _interrupted_run(out)
    assert 2 <= stopped < STEPS
    with pytest.raises(ConfigError, match=r"other privacy settings \(--noise_multiplier 1\.0 -> 2\.0\).*"
                                          r"--allow_privacy_change"):
        loop.run(_config(out, noise_multiplier=2.0))
    result = loop.run(_config(out, noise_multiplier=2.0, allow_privacy_change=True))
    privacy = _privacy(out)
    segments = [(s["sampling_rate"], s["noise_multiplier"], s["steps"]) for s in privacy["ledger"]["segments"]]
    assert segments == [(Q, 1.0, stopped), (Q, 2.0, STEPS - stopped)]
    expected = accounting.PrivacyLedger(segments).epsilon(1e-5)
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-12) and result["epsilon"] == privacy["epsilon"]
    assert accounting.compute_epsilon(2.0, Q, STEPS, 1e-5) < expected < accounting.compute_epsilon(1.0, Q, STEPS, 1e-5)
    with open(out / "config.json") as f:
        assert json.load(f)["noise_multiplier"] == 2.0


@needs_data
def test_changed_target_epsilon_calibrates_the_remaining_steps(tmp_path):
    out = tmp_path / "run"
    stopped = _interrupted_run(out, noise_multiplier=None, target_epsilon=6.0)
    sigma0 = accounting.calibrate_noise_multiplier(6.0, Q, STEPS, 1e-5)
    with pytest.raises(ConfigError, match="--target_epsilon 6.0 -> 8.0"):
        loop.run(_config(out, noise_multiplier=None, target_epsilon=8.0))
    result = loop.run(_config(out, noise_multiplier=None, target_epsilon=8.0, allow_privacy_change=True))
    privacy = _privacy(out)
    (q0, s0, n0), (q1, s1, n1) = [(s["sampling_rate"], s["noise_multiplier"], s["steps"])
                                  for s in privacy["ledger"]["segments"]]
    assert (s0, n0, n1) == (sigma0, stopped, STEPS - stopped) and s1 < s0
    assert 8.0 - 0.1 < privacy["epsilon"] <= 8.0  # the composed epsilon meets the new target
    assert result["noise_multiplier"] == s1


# --------------------------------------------------------------------------------------------
# Lost and damaged checkpoints (deterministic versions of kills at awkward moments)


def _copy(reference_out, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(reference_out, copy)
    return copy


def _stopped_after_lost_checkpoint(reference_out, tmp_path, damage="corrupt"):
    """A copy of the reference run as a process leaves it that was killed right after releasing the checkpoint of
    step STEPS - 2, which is then lost (``damage``). The store keeps the last two checkpoints, so there is no
    older one: steps 1..STEPS-2 are spent and must all be taken again."""
    out = _copy(reference_out, tmp_path)
    lost = STEPS - 2
    records = _journal_steps(out)
    end = max(i for i, r in enumerate(records) if r["event"] == "release" and r["step"] == lost)
    (out / JOURNAL_NAME).write_text("".join(json.dumps(r) + "\n" for r in records[:end + 1]))
    for path in (out / "checkpoints").glob(f"ckpt-{STEPS}.*"):
        path.unlink()
    data = out / "checkpoints" / f"ckpt-{lost}.data-00000-of-00001"
    if damage == "truncated":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    elif damage == "corrupt":
        with open(data, "r+b") as f:
            f.seek(os.path.getsize(data) // 2)
            f.write(bytes(64))
    else:  # killed after the journal announced the checkpoint, before the write completed
        for path in (out / "checkpoints").glob(f"ckpt-{lost}.*"):
            path.unlink()
    (out / "checkpoints" / "checkpoint").write_text(f'model_checkpoint_path: "ckpt-{lost}"\n')
    return out


@needs_data
@pytest.mark.parametrize("damage", ["truncated", "corrupt", "write interrupted"])
def test_lost_released_checkpoint_is_retaken_and_counted_twice(reference, tmp_path, damage, capsys):
    ref_out, ref_result = reference
    out = _stopped_after_lost_checkpoint(ref_out, tmp_path, damage)
    lost = STEPS - 2
    capsys.readouterr()
    result = loop.run(_config(out))  # --noise_multiplier without --target_epsilon/--max_epsilon: no ceiling
    printed = capsys.readouterr().out
    assert "resuming from step" not in printed  # from the start: no older checkpoint is kept
    assert f"steps 1-{lost} were written out in a checkpoint that is lost" in printed
    if damage != "write interrupted":
        assert f"checkpoint {out}/checkpoints/ckpt-{lost} is unreadable" in printed
        assert (out / "checkpoints" / f"ckpt-{lost}.index.unreadable").exists()
    privacy = _privacy(out)
    assert (privacy["model_steps"], privacy["steps_spent"], privacy["steps_counted_twice"]) == \
        (STEPS, STEPS + lost, lost)
    assert privacy["epsilon"] == pytest.approx(accounting.compute_epsilon(SIGMA, Q, STEPS + lost, 1e-5), rel=1e-12)
    assert privacy["epsilon"] > ref_result["epsilon"]
    assert result["epsilon"] == pytest.approx(privacy["epsilon"])
    assert f"{lost} steps count twice" in privacy["note"]
    # the re-taken steps drew fresh batches and noise (salted): the result is a different model
    assert _checkpoint_step(out) == STEPS
    journal = PrivacyJournal(str(out / JOURNAL_NAME))
    assert journal.plan_resume(STEPS).retaken == []


@needs_data
@pytest.mark.parametrize("ceiling", ["max_epsilon", "target_epsilon"])
def test_a_resume_that_would_pass_the_ceiling_stops_before_any_step(reference, tmp_path, ceiling):
    ref_out, ref_result = reference
    out = _stopped_after_lost_checkpoint(ref_out, tmp_path)
    kept = (JOURNAL_NAME, "privacy.json", "metrics.jsonl")
    before = {name: (out / name).read_bytes() for name in kept}
    limit = round(ref_result["epsilon"], 2) + 0.01  # the uninterrupted run's epsilon fits, two more steps do not
    would_reach = accounting.compute_epsilon(SIGMA, Q, STEPS + STEPS - 2, 1e-5)
    assert would_reach > limit
    # The reference run was started with --target_epsilon=8 (with its --noise_multiplier, a ceiling it keeps far
    # below); lowering it is a privacy change, hence allow_privacy_change in that variant.
    settings = {ceiling: limit, "allow_privacy_change": ceiling == "target_epsilon"}
    with pytest.raises(PrivacyError) as caught:
        loop.run(_config(out, **settings))
    message = str(caught.value)
    assert f"steps 1-{STEPS - 2} again" in message
    assert f"would bring epsilon to {would_reach:.4g}, above the ceiling --{ceiling}={limit:g}" in message
    assert f"--max_epsilon={math.ceil(would_reach * 100) / 100:g}" in message
    # No step taken: the journal, the reports and the checkpoints are as they were (the unreadable checkpoint is
    # only set aside).
    assert {name: (out / name).read_bytes() for name in kept} == before
    assert not list((out / "checkpoints").glob("ckpt-*.index"))
    # Raising the ceiling lets it go on, and the run stays below the new one.
    result = loop.run(_config(out, **{**settings, "max_epsilon": math.ceil(would_reach * 100) / 100}))
    assert result["epsilon"] == pytest.approx(would_reach, rel=1e-12)


@needs_data
def test_finished_run_is_never_trained_again(reference, tmp_path, capsys):
    """A finished run whose final checkpoint was damaged afterwards: rerunning reports it and trains nothing."""
    ref_out, ref_result = reference
    out = _copy(ref_out, tmp_path)
    data = out / "checkpoints" / f"ckpt-{STEPS}.data-00000-of-00001"
    data.write_bytes(np.random.default_rng(0).bytes(os.path.getsize(data)))
    before = snapshot(out)
    capsys.readouterr()
    result = loop.run(_config(out))
    printed = capsys.readouterr().out
    assert f"already finished: {out} holds this run, finished at step {STEPS}" in printed
    assert "resuming" not in printed and f"step 1/{STEPS}" not in printed
    assert snapshot(out) == before
    assert result["epsilon"] == ref_result["epsilon"]
    assert result["test_accuracy"] == ref_result["test_accuracy"]


@needs_data
def test_steps_after_the_last_release_are_discarded_not_counted(reference, tmp_path, capsys):
    """The common SIGKILL: steps 9 and 10 were taken in memory, nothing about them written out."""
    ref_out, ref_result = reference
    out = _copy(ref_out, tmp_path)
    records = _journal_steps(out)
    last_release = max(i for i, r in enumerate(records) if r["event"] == "release" and r["step"] == STEPS - 2)
    kept = records[:last_release + 1] + [r for r in records[last_release + 1:] if r["event"] == "step"]
    (out / JOURNAL_NAME).write_text("".join(json.dumps(r) + "\n" for r in kept))
    for path in (out / "checkpoints").glob(f"ckpt-{STEPS}.*"):
        path.unlink()
    (out / "checkpoints" / "checkpoint").write_text(f'model_checkpoint_path: "ckpt-{STEPS - 2}"\n')
    capsys.readouterr()
    loop.run(_config(out))
    assert f"steps {STEPS - 1}-{STEPS} of an interrupted process were never written out" in capsys.readouterr().out
    privacy = _privacy(out)
    assert (privacy["model_steps"], privacy["steps_spent"], privacy["steps_discarded"]) == (STEPS, STEPS, 2)
    assert privacy["epsilon"] == ref_result["epsilon"]
    _assert_weights_close(_weights(out), _weights(ref_out))  # same batches and noise as the uninterrupted run


@needs_data
def test_torn_last_journal_line_is_dropped(reference, tmp_path):
    # A process killed while appending, right after releasing the checkpoint of step STEPS - 2.
    out = _copy(reference[0], tmp_path)
    journal = out / JOURNAL_NAME
    records = _journal_steps(out)
    end = max(i for i, r in enumerate(records) if r["event"] == "release" and r["step"] == STEPS - 2)
    intact = "".join(json.dumps(r) + "\n" for r in records[:end + 1]).encode()
    journal.write_bytes(intact + b'{"event": "release", "attem')
    for path in (out / "checkpoints").glob(f"ckpt-{STEPS}.*"):
        path.unlink()
    (out / "checkpoints" / "checkpoint").write_text(f'model_checkpoint_path: "ckpt-{STEPS - 2}"\n')
    loop.run(_config(out))  # resumes at STEPS - 2 and finishes
    text = journal.read_bytes()
    assert text.startswith(intact) and text.endswith(b"\n") and b'"attem\n' not in text
    assert _privacy(out)["epsilon"] == reference[1]["epsilon"]


@needs_data
def test_damaged_journal_or_missing_journal_is_refused(reference, tmp_path):
    out = _copy(reference[0], tmp_path)
    journal = out / JOURNAL_NAME
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:3] + ["not json\n"] + lines[3:]))
    with pytest.raises(JournalError, match="damaged at line 4"):
        loop.run(_config(out))
    journal.unlink()
    with pytest.raises(JournalError, match="holds checkpoints but no record of their privacy"):
        loop.run(_config(out))


# --------------------------------------------------------------------------------------------
# Pieces


def _records(*items):
    """Builds journal records: ('start', a, c), ('step', a, t), ('release', a, r)."""
    out = []
    for event, attempt, step in items:
        record = {"event": event, "attempt": attempt, "step": step}
        if event == "step":
            record.update(sampling_rate=Q, noise_multiplier=1.0, l2_norm_clip=1.0, dataset_size=256)
        out.append(record)
    return out


def _journal(tmp_path, records):
    path = tmp_path / JOURNAL_NAME
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return PrivacyJournal(str(path))


def test_journal_accounting_rule(tmp_path):
    journal = _journal(tmp_path, _records(
        ("start", 1, 0), ("step", 1, 1), ("step", 1, 2), ("release", 1, 2), ("step", 1, 3),  # 3 never released
        ("start", 2, 2), ("step", 2, 3), ("step", 2, 4), ("release", 2, 4), ("step", 2, 5), ("step", 2, 6),
        ("release", 2, 6),  # then the write of ckpt-6 was lost: resume from 4
    ))
    assert [s.step for s in journal.steps()] == [1, 2, 3, 4, 5, 6]
    assert journal.discarded_steps() == [3]
    plan = journal.plan_resume(4)
    assert plan.retaken == [5, 6] and plan.salts == {5: 3, 6: 3} and plan.discarded == []
    journal.begin(4, {})
    journal.record_step(5, Q, 1.0, 1.0, 256)
    assert [s.step for s in journal.steps(pending=True)][-1] == 5 and len(journal.steps()) == 6
    journal.record_release(5, "checkpoint")
    journal.close()
    reread = PrivacyJournal(journal.path)
    assert [s.step for s in reread.steps()] == [1, 2, 3, 4, 5, 6, 5]
    assert reread.summary(5) == {"model_steps": 5, "steps_spent": 7, "steps_counted_twice": 1,
                                 "steps_discarded": 1, "journal": JOURNAL_NAME}
    assert reread.ledger().epsilon(1e-5) == accounting.compute_epsilon(1.0, Q, 7, 1e-5)


def test_journal_must_cover_the_checkpoint(tmp_path):
    journal = _journal(tmp_path, _records(("start", 1, 0), ("step", 1, 1), ("step", 1, 2), ("release", 1, 1)))
    with pytest.raises(JournalError, match="holds steps 2 that the privacy journal"):
        journal.plan_resume(2)


def test_journal_records_are_durable_before_release(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    journal = PrivacyJournal(str(tmp_path / JOURNAL_NAME))
    journal.begin(0, {"noise_multiplier": 1.0})
    after_begin = len(synced)
    journal.record_step(1, Q, 1.0, 1.0, 256)
    assert len(synced) == after_begin  # a step is flushed, not yet fsynced
    journal.record_release(1, "checkpoint")
    assert len(synced) == after_begin + 1  # the release makes everything before it durable first
    journal.close()


def test_keyed_noise_is_a_function_of_the_seed_only():
    grads = [tf.zeros([1000]), tf.zeros([10, 10])]

    def noise(seed):
        optimizer = DPKerasSGDOptimizer(2.0, 1.5, 32.0, learning_rate=0.1)
        optimizer.set_noise_seed(seed)
        return np.concatenate([n.numpy().ravel() for n in tf.function(optimizer.noised_sum)(grads)])

    a, b, c = noise([1, 2]), noise([1, 2]), noise([1, 3])
    np.testing.assert_array_equal(a, b)  # two fresh optimizers (as in two processes) agree
    assert np.max(np.abs(a - c)) > 1.0
    assert np.std(a) == pytest.approx(1.5 * 2.0, rel=0.1)  # stddev sigma * C


def test_step_randomness_and_salted_sampler():
    from eqdp_tf import data as data_lib

    rand = randomness_lib.StepRandomness(key=12345, salts={5: 2})
    assert rand.sampler_seed(0) != rand.sampler_seed(2)
    assert not np.array_equal(rand.noise_seed(4), rand.noise_seed(6))
    other = randomness_lib.StepRandomness(key=12346)
    assert not np.array_equal(rand.noise_seed(4), other.noise_seed(4))
    assert np.array_equal(rand.noise_seed(4), randomness_lib.StepRandomness(12345).noise_seed(4))
    assert not np.array_equal(rand.noise_seed(5), randomness_lib.StepRandomness(12345).noise_seed(5))
    sampler = randomness_lib.SaltedSampler(lambda seed: data_lib.PoissonSampler(1000, 0.1, 64, seed), rand)
    plain = data_lib.PoissonSampler(1000, 0.1, 64, rand.sampler_seed(0))
    # Samplers number steps from 0: logical step 5 (salted, as the journal numbers it) is sample(4).
    for step in (3, 5, 6):
        np.testing.assert_array_equal(sampler.sample(step), plain.sample(step))
    assert not np.array_equal(sampler.sample(4), plain.sample(4))
    assert sampler.num_examples == 1000 and sampler.method == "poisson"


def test_secret_key_file(tmp_path):
    key = secret_key.load_or_create_key(str(tmp_path))
    path = tmp_path / secret_key.SECRET_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert secret_key.load_or_create_key(str(tmp_path)) == key
    assert key != secret_key.load_or_create_key(str(tmp_path / "other_does_not_matter"), dp_seed=1)
    assert secret_key.load_or_create_key("/nonexistent", dp_seed=1) == secret_key.load_or_create_key(
        "/elsewhere", dp_seed=1)
    path.write_text("{")
    with pytest.raises(ConfigError, match="unreadable"):
        secret_key.load_or_create_key(str(tmp_path))


def test_checkpoint_store_is_atomic_and_falls_back(tmp_path):
    var = tf.Variable([1.0, 2.0, 3.0])
    store = CheckpointStore(tf.train.Checkpoint(v=var), str(tmp_path / "ckpts"), keep=2)
    for step in (1, 2, 3):
        var.assign([float(step)] * 3)
        store.save(step)
    assert store.steps() == [2, 3]
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpts")) == store.prefix(3)
    # debris of a write cut short is ignored and cleaned up at the next save
    (tmp_path / "ckpts" / "ckpt-4_temp").mkdir()
    (tmp_path / "ckpts" / "ckpt-4.data-00000-of-00001.tempstate123").write_bytes(b"half")
    assert store.latest_valid() == (3, store.prefix(3))
    data = tmp_path / "ckpts" / "ckpt-3.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-4])
    skipped = []
    assert store.latest_valid(lambda p, e: skipped.append(p)) == (2, store.prefix(2))
    assert skipped == [store.prefix(3)]
    store.restore(store.prefix(2))
    np.testing.assert_array_equal(var.numpy(), [2.0, 2.0, 2.0])
    store.save(5)
    assert not (tmp_path / "ckpts" / "ckpt-4_temp").exists()
    assert not list((tmp_path / "ckpts").glob("*.tempstate*"))


def test_stop_signals_set_a_flag_and_restore_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is before


@needs_data
def test_run_folder_of_an_earlier_version_still_resumes(reference, tmp_path, capsys):
    """Run folders written before the journal was renamed (privacy_ledger.jsonl) are adopted, not refused."""
    from eqdp_tf.training.checkpoint_journal import LEGACY_JOURNAL_NAME

    ref_out, ref_result = reference
    out = _copy(ref_out, tmp_path)
    (out / JOURNAL_NAME).rename(out / LEGACY_JOURNAL_NAME)
    capsys.readouterr()
    result = loop.run(_config(out))
    printed = capsys.readouterr().out
    assert f"renamed {LEGACY_JOURNAL_NAME} to {JOURNAL_NAME}" in printed
    assert "already finished" in printed and result["epsilon"] == ref_result["epsilon"]
    assert (out / JOURNAL_NAME).exists() and not (out / LEGACY_JOURNAL_NAME).exists()
