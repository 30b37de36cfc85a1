"""End-to-end checks of the training program on a tiny real-CIFAR-10 subset: files, privacy, export, CLI errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from conftest import CIFAR10_DIR, REPO_ROOT, flags_for, needs_cifar10, snapshot, subprocess_env
from eqdp_tf import data as data_lib
from eqdp_tf import export as export_lib
from eqdp_tf import models
from eqdp_tf.config import TrainConfig
from eqdp_tf.datasets import DatasetDescription, spec
from eqdp_tf.privacy import accounting
from eqdp_tf.training import loop
from eqdp_tf.training.checkpoint import CheckpointStore

pytestmark = needs_cifar10

TRAIN_PY = os.path.join(REPO_ROOT, "train.py")
PRIVACY_FIELDS = {"accountant", "noise_multiplier", "sampling_rate", "sampling_method", "steps", "batch_size",
                  "dataset_size", "l2_norm_clip", "delta", "epsilon"}


def _tiny_config(output_dir, **overrides):
    settings = dict(
        architecture="eq_resnet9", group="D4", restrict="D2", head="paper",
        data_dir=CIFAR10_DIR, train_subset=256, test_subset=64,
        steps=3, batch_size=32, physical_batch_size=16, num_views=2,
        noise_multiplier=1.0, l2_norm_clip=2.0, delta=1e-5,
        eval_every=2, checkpoint_every=2, eval_batch_size=64, output_dir=str(output_dir), seed=3,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# One real training run shared by the tests below (the resume test works on a copy).


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "out"
    cfg = _tiny_config(output_dir)
    result = loop.run(cfg)
    return cfg, str(output_dir), result


def test_run_writes_the_expected_files(trained):
    cfg, out, result = trained
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "dp_secret.json", "export", "metrics.jsonl",
                                       "privacy.json", "privacy_journal.jsonl", "tensorboard"]
    ckpts = os.listdir(os.path.join(out, "checkpoints"))
    assert "checkpoint" in ckpts
    assert {"ckpt-2.index", "ckpt-3.index"} <= set(ckpts)
    assert tf.train.latest_checkpoint(os.path.join(out, "checkpoints")).endswith("ckpt-3")
    assert os.listdir(os.path.join(out, "export")) == ["1"]  # no staging folder left behind
    assert os.path.isfile(os.path.join(out, "export", "1", "saved_model.pb"))
    assert result["export_path"] == os.path.join(out, "export", "1")
    assert result["parameters"] == 255_675  # the official model, the default
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    dataset = saved.pop("dataset_description")
    assert saved == cfg.to_json()
    # The dataset as it was trained on: the first 256 CIFAR-10 images, the official normalisation.
    assert (dataset["dataset"], dataset["num_train"], dataset["num_test"], dataset["image_shape"],
            dataset["num_classes"]) == ("cifar10", 256, 64, [32, 32, 3], 10)
    assert dataset["mean"] == list(spec.CIFAR10_MEAN) and dataset["normalization_source"].startswith("official")


def test_privacy_report_matches_accounting(trained):
    cfg, out, result = trained
    with open(os.path.join(out, "privacy.json")) as f:
        privacy = json.load(f)
    assert PRIVACY_FIELDS <= set(privacy)
    q = cfg.batch_size / cfg.train_subset
    assert privacy["accountant"] == "RDP"
    assert privacy["noise_multiplier"] == 1.0
    assert privacy["sampling_rate"] == pytest.approx(q, rel=1e-12)
    assert privacy["sampling_method"] == "poisson"
    assert privacy["steps"] == 3
    assert privacy["batch_size"] == 32
    assert privacy["dataset_size"] == 256
    assert privacy["l2_norm_clip"] == 2.0
    assert privacy["delta"] == 1e-5
    expected = accounting.compute_epsilon(1.0, q, 3, 1e-5)
    assert 0 < expected < 100
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert result["epsilon"] == pytest.approx(expected, rel=1e-9)
    # an ordinary run is not a simulation, and its export carries the same report
    assert "simulated_run" not in privacy and "simulated_epsilon" not in _read_metrics(out)[-1]
    with open(os.path.join(result["export_path"], "assets.extra", "privacy.json")) as f:
        assert json.load(f)["epsilon"] == pytest.approx(expected, rel=1e-9)
    # more steps cost more privacy: the epsilon really is that of 3 steps
    assert accounting.compute_epsilon(1.0, q, 2, 1e-5) < expected < accounting.compute_epsilon(1.0, q, 4, 1e-5)


def test_metrics_lines(trained):
    cfg, out, result = trained
    lines = _read_metrics(out)
    assert [line["step"] for line in lines] == [2, 3]
    q = cfg.batch_size / cfg.train_subset
    for line in lines:
        assert {"step", "epoch", "loss", "test_accuracy", "epsilon", "examples_per_sec"} <= set(line)
        assert line["epoch"] == pytest.approx(line["step"] * q)
        assert np.isfinite(line["loss"]) and line["loss"] > 0
        assert 0.0 <= line["test_accuracy"] <= 1.0
        assert line["test_accuracy"] * 64 == pytest.approx(round(line["test_accuracy"] * 64))  # k / 64 examples
        assert line["examples_per_sec"] > 0
        assert line["epsilon"] == pytest.approx(accounting.compute_epsilon(1.0, q, line["step"], 1e-5), rel=1e-9)
    assert lines[-1]["test_accuracy"] == result["test_accuracy"]


_SERVE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    export_dir, images_path, out_path = sys.argv[1:]
    loaded = tf.saved_model.load(export_dir)
    serve = loaded.signatures["serving_default"]
    inputs = {name: (spec.dtype.name, spec.shape.as_list())
              for name, spec in serve.structured_input_signature[1].items()}
    outputs = {name: (spec.dtype.name, spec.shape.as_list()) for name, spec in serve.structured_outputs.items()}
    result = serve(images=tf.constant(np.load(images_path)))
    np.savez(out_path, probabilities=result["probabilities"].numpy(), classes=result["classes"].numpy())
    ours = sorted(m for m in sys.modules if m.split(".")[0] in ("eqdp_tf", "layers"))
    print(json.dumps({"inputs": inputs, "outputs": outputs, "our_modules": ours}))
    """
)


def _serve_in_subprocess(export_dir, images, tmp_path):
    """Runs the SavedModel in a fresh interpreter that imports only TensorFlow (from a folder outside the repo)."""
    np.save(tmp_path / "images.npy", images)
    script = tmp_path / "serve.py"
    script.write_text(_SERVE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), export_dir, str(tmp_path / "images.npy"), str(tmp_path / "served.npz")],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    served = np.load(tmp_path / "served.npz")
    return info, served["probabilities"], served["classes"]


def _restore(cfg, which):
    """Rebuilds the model of ``cfg`` (for the dataset its config.json records) and restores ``which`` ('ema_model'
    or 'model') from the last checkpoint."""
    with open(os.path.join(cfg.output_dir, "config.json")) as f:
        dataset = DatasetDescription.from_json(json.load(f)["dataset_description"])
    model = loop.build_model(cfg, dataset)
    checkpoint = tf.train.Checkpoint(**{which: model})
    path = tf.train.latest_checkpoint(os.path.join(cfg.output_dir, "checkpoints"))
    checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
    return model


def test_exported_saved_model_serves_ema_model(trained, tmp_path):
    cfg, out, _ = trained
    test_images, _ = data_lib.load_cifar10("test", CIFAR10_DIR, 6)
    images = np.concatenate([test_images, np.random.RandomState(1).randint(0, 256, (2, 32, 32, 3))]).astype(np.uint8)
    info, probabilities, classes = _serve_in_subprocess(os.path.join(out, "export", "1"), images, tmp_path)

    assert info["our_modules"] == []
    assert info["inputs"] == {"images": ["uint8", [None, 32, 32, 3]]}
    assert info["outputs"] == {"probabilities": ["float32", [None, 10]], "classes": ["int64", [None]]}
    assert probabilities.shape == (8, 10) and classes.shape == (8,)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(classes, probabilities.argmax(-1))

    ema = _restore(cfg, "ema_model")
    expected = tf.nn.softmax(ema(images.astype(np.float32), training=False)).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-4, rtol=0)
    # Negative control: the raw (non-averaged) weights give visibly different probabilities.
    raw = _restore(cfg, "model")
    raw_probabilities = tf.nn.softmax(raw(images.astype(np.float32), training=False)).numpy()
    assert np.max(np.abs(raw_probabilities - probabilities)) > 1e-3


def test_exported_invariant_model_is_d4_invariant(tmp_path):
    model = models.build_model("eq_resnet9", group="D4", restrict=None, head="invariant")
    path = export_lib.export_saved_model(model, str(tmp_path / "export"))
    assert path == str(tmp_path / "export" / "1")
    serve = tf.saved_model.load(path).signatures["serving_default"]
    images, _ = data_lib.load_cifar10("test", CIFAR10_DIR, 4)

    def probabilities(batch):
        return serve(images=tf.constant(np.ascontiguousarray(batch)))["probabilities"].numpy()

    reference = probabilities(images)
    # distinct images get distinct predictions, so agreement within 1e-4 below is not vacuous
    assert np.max(np.abs(reference[0] - reference[1:])) > 1e-3
    variants = {
        f"rot90 k={k}": np.rot90(images, k=k, axes=(1, 2)) for k in (1, 2, 3)
    } | {
        "flip left-right": images[:, :, ::-1],
        "flip up-down": images[:, ::-1],
        "transpose": images.transpose(0, 2, 1, 3),
        "anti-transpose": np.rot90(images, k=1, axes=(1, 2))[:, ::-1],
    }
    for name, batch in variants.items():
        assert batch.dtype == np.uint8
        np.testing.assert_allclose(probabilities(batch), reference, atol=1e-4, rtol=0, err_msg=name)
    # a 1-pixel shift is not a symmetry of the padded network: predictions do move
    assert np.max(np.abs(probabilities(np.roll(images, 1, axis=2)) - reference)) > 1e-5


def test_resuming_finished_run_does_not_retrain(trained, tmp_path, capsys):
    cfg, out, first = trained
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    before = snapshot(copy / "checkpoints")
    privacy_before = (copy / "privacy.json").read_text()
    capsys.readouterr()

    result = loop.run(dataclasses.replace(cfg, output_dir=str(copy)))
    printed = capsys.readouterr().out

    assert f"already finished: {copy} holds this run, finished at step 3 and exported to {copy / 'export' / '1'}" \
        in printed
    assert "step 1/3" not in printed and "step 3/3" not in printed  # no training step was taken
    assert snapshot(copy / "checkpoints") == before                  # no checkpoint written or changed
    assert result["epsilon"] == first["epsilon"]
    assert result["test_accuracy"] == first["test_accuracy"]
    assert json.loads((copy / "privacy.json").read_text()) == json.loads(privacy_before)
    assert [line["step"] for line in _read_metrics(copy)] == [2, 3]  # nothing evaluated or written again
    assert os.listdir(copy / "export") == ["1"]  # the final weights are not exported a second time
    assert result["export_path"] == str(copy / "export" / "1")


# --------------------------------------------------------------------------------------------
# The command line


def test_smoke_config_runs(tmp_path):
    runs_existed = os.path.exists(os.path.join(REPO_ROOT, "runs"))
    out = tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, "train.py", "--flagfile=configs/smoke.cfg", f"--output_dir={out}"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: test accuracy" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert os.path.isfile(out / "export" / "1" / "saved_model.pb")
    assert [line["step"] for line in _read_metrics(out)] == [3, 6]
    assert os.path.exists(os.path.join(REPO_ROOT, "runs")) == runs_existed  # the cfg's default dir is untouched


_BAD_FLAGS = {
    "unknown group": (["--group=Q4"], 2, ["--group", "Q4"]),
    "non-subgroup": (["--group=C4", "--restrict=D2"], 2, ["--restrict", "not a subgroup of C4"]),
    "zero batch": (["--batch_size=0"], 2, ["--batch_size", "positive"]),
    "negative steps": (["--steps=-1"], 2, ["--steps", "positive", "-1"]),
    "negative sigma": (["--noise_multiplier=-1"], 2, ["--noise_multiplier", ">= 0"]),
    "no sigma, no target": (["--target_epsilon=none"], 2, ["--noise_multiplier", "--target_epsilon"]),
    "sigma not a number": (["--noise_multiplier=abc"], 2, ["--noise_multiplier", "abc"]),
    "unparseable int": (["--steps=abc"], 2, ["--steps=abc"]),
    "unknown enum": (["--head=linear"], 2, ["--head", "paper|invariant"]),
    "positional argument": (["stray"], 2, ["unexpected arguments stray"]),
    "missing dataset": (["--data_dir=EMPTY", "--train_subset=64", "--batch_size=16"], 2, ["CIFAR-10", "EMPTY"]),
}


def _start_train(flags, cwd):
    return subprocess.Popen([sys.executable, TRAIN_PY, *flags], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory):
    """Starts every bad-flag run at once (each is mostly TensorFlow start-up) in its own empty working folder."""
    runs = {}
    for case, (flags, _, _) in _BAD_FLAGS.items():
        root = tmp_path_factory.mktemp("badflags")
        cwd, empty = root / "cwd", root / "empty"
        cwd.mkdir()
        empty.mkdir()
        flags = [f.replace("EMPTY", str(empty)) for f in flags] + [f"--output_dir={root / 'out'}"]
        runs[case] = (root, empty, _start_train(flags, cwd))
    results = {}
    for case, (root, empty, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=180)
        results[case] = dict(root=root, empty=str(empty), returncode=proc.returncode, stdout=stdout, stderr=stderr)
    return results


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("case", sorted(_BAD_FLAGS))
def test_bad_flags_give_one_line_error(bad_flag_runs, case):
    _, code, fragments = _BAD_FLAGS[case]
    run = bad_flag_runs[case]
    stderr = run["stderr"]
    assert run["returncode"] == code, stderr
    assert "Traceback" not in stderr
    lines = _error_lines(stderr)
    assert lines, "no error message"
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment.replace("EMPTY", run["empty"]) in lines[0], lines[0]
    assert "done:" not in run["stdout"]
    # nothing written anywhere: the flags are checked, and the data loaded, before the run folder is made
    root = run["root"]
    assert os.listdir(root / "cwd") == []
    assert os.listdir(root / "empty") == []
    assert not os.path.exists(root / "out")


def test_missing_dataset_message_names_data_dir_and_tfds(bad_flag_runs):
    message = _error_lines(bad_flag_runs["missing dataset"]["stderr"])[0]
    assert "--data_dir" in message
    assert "TFDS" in message


def test_output_dir_of_a_different_run_is_refused(trained, tmp_path):
    cfg, out, _ = trained
    before = snapshot(out)
    flags = [f for f in flags_for(cfg) if not f.startswith("--group=")] + ["--group=D2"]
    proc = _start_train(flags, tmp_path)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0] == (f"error: --output_dir {out} holds a different run (differs in: group); "
                        "use another folder, or the same flags to resume it")
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Memory: a physical batch larger than any logical batch, and running out of memory in a step


def test_physical_batch_beyond_any_logical_batch_is_lowered(tmp_path, capsys):
    cfg = _tiny_config(tmp_path / "out", group="C1", restrict="none", num_views=1, steps=1, export=False,
                       physical_batch_size=100_000)
    result = loop.run(cfg)
    printed = capsys.readouterr().out
    # Poisson batches of expected size 32 from 256 examples: at most 32 + 8 sd = ceil(32 + 8 * sqrt(28)) = 75.
    assert loop.largest_logical_batch(cfg, 256) == 75
    assert "note: --physical_batch_size 100000 is more than any logical batch of this run holds (at most 75); " \
           "using 75" in printed
    assert result["steps_spent"] == 1


def test_out_of_memory_in_a_step_is_one_line_after_a_checkpoint(tmp_path, monkeypatch):
    from eqdp_tf.privacy.dp_step import DPStep
    from eqdp_tf.training.loop import TrainingError

    original = DPStep.compiled_accumulate
    calls = {"n": 0}

    def failing_on_the_fourth_batch(self, jit):
        accumulate = original(self, jit)

        def wrapped(*args):
            calls["n"] += 1
            if calls["n"] == 4:  # physical batches of 16, logical ~32: inside step 2 or 3
                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
            return accumulate(*args)
        return wrapped

    monkeypatch.setattr(DPStep, "compiled_accumulate", failing_on_the_fourth_batch)
    out = tmp_path / "out"
    cfg = _tiny_config(out, group="C1", restrict="none", num_views=1, steps=6, checkpoint_every=100,
                       eval_every=100, export=False)
    with pytest.raises(TrainingError) as caught:
        loop.run(cfg)
    message = str(caught.value)
    done = int(message.split("out of memory in step ")[1].split()[0]) - 1
    assert done >= 1
    assert "with --physical_batch_size 16: lower it" in message
    assert f"the checkpoint of step {done} is kept" in message
    # The steps taken before are checkpointed (not lost), and the journal covers exactly them.
    assert CheckpointStore(None, str(out / "checkpoints")).steps() == [done]
    with open(out / "privacy.json") as f:
        assert json.load(f)["steps_spent"] == done
