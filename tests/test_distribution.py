"""DP-SGD on several devices and hosts (tf.distribute): the update and the privacy are those of one device.

- Sharding: every example of a logical batch goes to exactly one replica; all replicas take the same number of
  physical batches.
- MirroredStrategy on 2 logical CPU devices (``mirrored_step_check.py``, in a process of its own): with sigma = 0
  the update equals the one-device update on the same global batch; with the keyed noise it equals it too (one
  noise draw, the same one); with sigma > 0 the noise in the update has std lr*sigma*C/B, not sqrt(2) times it;
  a tiny mirrored training run trains, exports and reports the single-device epsilon.
- MultiWorkerMirroredStrategy with 2 train.py processes on 127.0.0.1: stopped by SIGTERM to the chief (both stop),
  then resumed; the chief alone writes the run folder, exports, and reports the epsilon of the single-process run;
  the weights equal those of the single-process run (same sampling and noise seeds, so noise added once).
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import CIFAR10_DIR, HAVE_CIFAR10, REPO_ROOT, needs_cifar10, subprocess_env
from eqdp_tf import data as data_lib
from eqdp_tf.config import TrainConfig
from eqdp_tf.errors import ConfigError
from eqdp_tf.privacy import accounting
from eqdp_tf.training import distribution, loop

needs_data = needs_cifar10
pytestmark = pytest.mark.slow

TRAIN_PY = os.path.join(REPO_ROOT, "train.py")
CHECK_PY = os.path.join(REPO_ROOT, "tests", "mirrored_step_check.py")
STEPS = 6
# One process and two workers compute the same steps with the examples in other physical batches: the weights
# differ by float32 rounding, amplified through momentum and ReLU/max-pool kinks (measured: ~3e-6 after 6 steps,
# ~3e-8 without momentum). A second noise draw, a lost or doubled example, a doubled update or momentum lost on
# resume moves them by > 1e-3.
WEIGHT_ATOL = 1e-4


def _env(**extra):
    env = subprocess_env(**extra)
    if "TF_CONFIG" not in extra:
        env.pop("TF_CONFIG", None)
    return env


# --------------------------------------------------------------------------------------------
# Sharding and settings (no strategy needed)


@pytest.mark.parametrize("count,physical,replicas", [(37, 4, 3), (24, 6, 2), (0, 5, 2), (5, 8, 4), (9, 4, 1)])
def test_split_for_replicas_deals_out_each_example_once(count, physical, replicas):
    indices = np.sort(np.random.default_rng(count).choice(1000, count, replace=False))
    batches = data_lib.split_for_replicas(indices, physical, replicas)
    assert len(batches) == max(1, -(-count // (physical * replicas)))
    for batch in batches:
        assert batch.indices.shape == batch.mask.shape == (replicas, physical)
    taken = np.concatenate([b.indices[b.mask == 1] for b in batches])
    assert sorted(taken) == sorted(indices)  # every sampled example once, nothing else
    per_replica = [sum(b.mask[r].sum() for b in batches) for r in range(replicas)]
    assert max(per_replica) - min(per_replica) <= len(batches)  # real examples spread evenly
    assert all(np.all(b.indices[b.mask == 0] == 0) for b in batches)


def test_split_for_one_replica_is_the_samplers_own_split():
    sampler = data_lib.PoissonSampler(500, 0.1, 16, seed=4)
    for step in range(3):
        ours = data_lib.split_for_replicas(sampler.sample(step), 16, 1)
        theirs = sampler.physical_batches(step)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a.indices[0], b.indices)
            np.testing.assert_array_equal(a.mask[0], b.mask)


def test_sharded_datasets_together_hold_the_logical_batch():
    """Two workers, each feeding one of 2 replicas, see disjoint shares of the same Poisson batch; both take the
    same number of physical batches per step, with the same `last` marks."""
    num = 200
    images = np.arange(num, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
    labels = np.arange(num) % 10
    sampler = data_lib.PoissonSampler(num, 0.2, 8, seed=7)
    shares = []
    for replica in (0, 1):
        dataset = data_lib.make_train_dataset(images, labels, sampler, num_views=1, seed=0, num_steps=3,
                                              num_replicas=2, replica_ids=(replica,))
        shares.append(list(dataset.as_numpy_iterator()))
    assert len(shares[0]) == len(shares[1])
    for a, b in zip(*shares):
        assert a["views"].shape == (1, 8, 1, 32, 32, 3) and a["mask"].shape == (1, 8)
        assert (a["step"], a["last"]) == (b["step"], b["last"])
    for step in range(3):
        examples = []
        for share in shares:
            for element in share:
                if element["step"] == step:
                    real = element["mask"][0] == 1
                    examples += list(element["views"][0, real, 0, 0, 0, 0])  # the pixel value is the index
        assert sorted(examples) == list(sampler.sample(step))


def _tf_config(cluster=None, task=None, **extra):
    value = {"cluster": cluster or {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
             "task": task or {"type": "worker", "index": 0}, **extra}
    return {"TF_CONFIG": json.dumps(value)}


@pytest.mark.parametrize("environ,fragment", [
    ({}, "needs the TF_CONFIG environment variable"),
    ({"TF_CONFIG": "{cluster: 1"}, "TF_CONFIG is not valid JSON"),
    ({"TF_CONFIG": "[]"}, "needs a 'cluster' and a 'task'"),
    (_tf_config(task={"type": "worker", "index": 2}), "task index must be 0..1"),
    (_tf_config(task={"type": "chief", "index": 0}), "task type 'chief' is not a job"),
    (_tf_config(cluster={"ps": ["127.0.0.1:1"]}), "only 'chief' and 'worker'"),
    (_tf_config(cluster={"worker": ["nohostport"]}), "'host:port' addresses"),
])
def test_bad_tf_config_is_a_one_line_config_error(environ, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")) as info:
        distribution.check_tf_config(environ)
    assert "\n" not in str(info.value)


def test_valid_tf_config_passes():
    environ = _tf_config(cluster={"chief": ["a:1"], "worker": ["b:1", "c:1"]}, task={"type": "worker", "index": 1})
    assert distribution.check_tf_config(environ)["task"] == {"type": "worker", "index": 1}


def test_distribution_setting():
    assert TrainConfig().distribution == "none"
    with pytest.raises(ConfigError, match="--distribution must be one of none, mirrored, multi_worker"):
        TrainConfig(distribution="horovod")
    # The privacy is the same in every mode, so a run may be resumed in another one.
    saved = TrainConfig().to_json()
    assert TrainConfig(distribution="multi_worker").differences(saved) == []
    with pytest.raises(ConfigError, match="--distribution"):
        distribution.build("tpu")


def test_none_is_the_default_strategy():
    dist = distribution.build("none")
    assert dist.strategy is tf.distribute.get_strategy()
    assert (dist.num_replicas, dist.num_workers, dist.worker_index, dist.is_chief) == (1, 1, 0, True)
    batch = {"views": tf.zeros([2])}
    assert dist.distribute(batch) is batch
    assert dist.max_over_workers(15) == 15
    assert dist.broadcast_json({"a": 1}) == {"a": 1}


def test_multi_worker_without_tf_config_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, TRAIN_PY, "--distribution=multi_worker", f"--output_dir={tmp_path / 'o'}"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --distribution=multi_worker needs the TF_CONFIG"), \
        proc.stderr
    assert not os.path.exists(tmp_path / "o")


# --------------------------------------------------------------------------------------------
# MirroredStrategy on 2 logical CPU devices


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """The DPStep comparisons, and (with the data) a tiny mirrored training run, in two processes at once."""
    out = tmp_path_factory.mktemp("mirrored") / "run"
    commands = [[sys.executable, CHECK_PY]] + ([[sys.executable, CHECK_PY, str(out), CIFAR10_DIR]] if HAVE_CIFAR10 else [])
    procs = [subprocess.Popen(c, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    results = {"output_dir": str(out)}
    for code, stdout, stderr in _finish(procs):
        assert code == 0, stderr[-3000:]
        results.update(json.loads(stdout.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("case", ["sigma0", "nonprivate", "keyed_noise"])
def test_mirrored_update_equals_one_device_update(mirrored, case):
    """sigma0: DP step with sigma = 0 (clipping active, momentum); nonprivate: --dp=false; keyed_noise: sigma = 1.5
    with the same noise seed, so equality also means the noise went in exactly once."""
    result = mirrored[case]
    assert result["replicas"] == 2
    assert result["update_size"] > 1e-3  # the steps did move the weights
    assert result["max_rel_diff"] < 2e-6, result
    assert result["max_abs_diff"] < 1e-3 * result["update_size"], result
    assert result["replica_spread"] == 0.0  # both replicas hold bit-identical weights


def test_mirrored_noise_std_is_sigma_clip_over_batch_not_per_replica(mirrored):
    result = mirrored["noise"]
    assert result["replicas"] == 2 and result["coordinates"] == 50_000
    assert result["count"] == 8.0 and result["gradient_sum"] == 0.0  # 2 x 4 examples, all gradients zero
    expected = result["expected_std"]
    for std, mean in zip(result["measured_std"], result["mean"]):
        assert abs(std / expected - 1.0) < 0.03, result  # sampling error of the std here: ~0.3%
        assert abs(std / (expected * np.sqrt(2)) - 1.0) > 0.2  # noise once per replica would give sqrt(2) x
        assert abs(mean) < 0.03 * expected
    assert abs(result["correlation"]) < 0.05  # fresh noise every step
    assert result["replica_spread"] == 0.0
    assert result["same_inputs_for_every_replica_refused"]


@needs_data
def test_mirrored_training_run_trains_and_exports(mirrored):
    """train.py's loop with --distribution=mirrored on 2 devices (4 + 4 examples per physical batch, 2 views)."""
    result = mirrored["training"]
    assert result["steps_spent"] == 3
    assert result["epsilon"] == accounting.compute_epsilon(1.0, 32 / 256, 3, 1e-5)  # the global q, as on one device
    assert os.path.isfile(os.path.join(result["export_path"], "saved_model.pb"))
    with open(os.path.join(mirrored["output_dir"], "privacy_journal.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if r["event"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3] and {s["sampling_rate"] for s in steps} == {32 / 256}


# --------------------------------------------------------------------------------------------
# MultiWorkerMirroredStrategy: two train.py processes on this host


def _config(output_dir, **overrides):
    settings = dict(
        architecture="eq_resnet9", group="C1", restrict="none", head="paper",
        data_dir=CIFAR10_DIR, train_subset=256, test_subset=64,
        steps=STEPS, batch_size=32, physical_batch_size=16, num_views=1,
        noise_multiplier=1.0, l2_norm_clip=2.0, delta=1e-5, learning_rate=0.01, momentum=0.9,
        eval_every=2, checkpoint_every=2, eval_batch_size=64, output_dir=str(output_dir), seed=3, dp_seed=11,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _flags(cfg):
    flags = []
    for name, value in dataclasses.asdict(cfg).items():
        if value is not None:
            flags.append(f"--{name}={str(value).lower() if isinstance(value, bool) else value}")
    return flags


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(outputs, ports, cwd):
    """One train.py per output folder (worker 0, the chief, first), as a cluster on 127.0.0.1."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index, out in enumerate(outputs):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, TRAIN_PY, *_flags(_config(out, distribution="multi_worker"))], cwd=cwd,
            env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout=300):
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def _weights(out, step=STEPS):
    reader = tf.train.load_checkpoint(os.path.join(out, "checkpoints", f"ckpt-{step}"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model/", "ema_model/", "optimizer/")) and reader.get_tensor(name).dtype.kind == "f"}


def _sigterm_after(proc, path, timeout=300):
    """Sends SIGTERM to ``proc`` as soon as ``path`` exists."""
    t0 = time.monotonic()
    while not path.exists() and proc.poll() is None and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """A 2-worker run stopped by SIGTERM to the chief after its first checkpoint, then resumed to the end; and the
    same run in this process on one device, computed while the workers start."""
    root = tmp_path_factory.mktemp("multi_worker")
    chief_out, worker_out, reference_out = root / "chief", root / "worker", root / "reference"
    ports = _free_ports(2)
    started = time.monotonic()
    procs = _start_workers([chief_out, worker_out], ports, root)
    watcher = threading.Thread(target=_sigterm_after, args=(procs[0], chief_out / "checkpoints" / "ckpt-2.index"))
    watcher.start()
    try:
        reference = loop.run(_config(reference_out))
    finally:
        watcher.join()
    stopped = _finish(procs)
    resumed = _finish(_start_workers([chief_out, worker_out], _free_ports(2), root))
    return dict(chief=str(chief_out), worker=str(worker_out), reference=str(reference_out),
                reference_result=reference, stopped=stopped, resumed=resumed,
                seconds=time.monotonic() - started)


@needs_data
def test_sigterm_to_the_chief_stops_every_worker_with_a_checkpoint(two_workers):
    (chief_code, chief_out, chief_err), (worker_code, worker_out, worker_err) = two_workers["stopped"]
    assert (chief_code, worker_code) == (143, 143), chief_err[-3000:] + worker_err[-3000:]
    for stderr in (chief_err, worker_err):
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("interrupted: SIGTERM at step"), stderr[-3000:]
    assert "Traceback" not in chief_err + worker_err
    assert "rerun the same command to resume" in worker_err


@needs_data
def test_resumed_two_worker_run_equals_the_single_process_run(two_workers):
    (chief_code, chief_out, chief_err), (worker_code, worker_out, worker_err) = two_workers["resumed"]
    assert (chief_code, worker_code) == (0, 0), chief_err[-3000:] + worker_err[-3000:]
    assert "resuming from step" in chief_out and "2 replicas on 2 workers" in chief_out
    assert "worker 1" in worker_out and "done, 6 steps" in worker_out
    with open(os.path.join(two_workers["chief"], "privacy.json")) as f:
        privacy = json.load(f)
    with open(os.path.join(two_workers["reference"], "privacy.json")) as f:
        reference_privacy = json.load(f)
    # The accountant saw the global batch: the same q, sigma, steps, hence the same epsilon.
    assert privacy["epsilon"] == reference_privacy["epsilon"] == two_workers["reference_result"]["epsilon"]
    assert (privacy["sampling_rate"], privacy["steps"], privacy["model_steps"]) == (32 / 256, STEPS, STEPS)
    ours, reference = _weights(two_workers["chief"]), _weights(two_workers["reference"])
    assert ours.keys() == reference.keys() and any("OPTIMIZER_SLOT" in k for k in ours)  # momentum resumed too
    worst = max(float(np.max(np.abs(ours[k].astype(np.float64) - reference[k]))) for k in ours)
    earlier = _weights(two_workers["reference"], STEPS - 2)
    moved = max(float(np.max(np.abs(reference[k].astype(np.float64) - earlier[k]))) for k in ours)
    print(f"2 workers vs 1 process after {STEPS} steps: max |weight difference| {worst:.3g} "
          f"(the last 2 steps moved weights by up to {moved:.3g}); epsilon {privacy['epsilon']:.6f} in both; "
          f"{two_workers['seconds']:.0f} s")
    assert worst < WEIGHT_ATOL


@needs_data
def test_only_the_chief_writes_and_exports(two_workers):
    assert not os.path.exists(two_workers["worker"])  # the other worker never touched its --output_dir
    chief = two_workers["chief"]
    assert sorted(os.listdir(chief)) == ["checkpoints", "config.json", "export", "metrics.jsonl", "privacy.json",
                                         "privacy_journal.jsonl", "tensorboard"]
    assert os.listdir(os.path.join(chief, "export")) == ["1"]
    serve = tf.saved_model.load(os.path.join(chief, "export", "1")).signatures["serving_default"]
    out = serve(images=tf.zeros([2, 32, 32, 3], tf.uint8))
    assert out["probabilities"].shape == (2, 10)
    with open(os.path.join(chief, "config.json")) as f:
        assert json.load(f)["distribution"] == "multi_worker"
