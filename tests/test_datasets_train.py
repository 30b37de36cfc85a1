"""Every dataset kind through the training program, on tiny data written in its real format: the official configs
(cifar100, tiny_imagenet, imagenette) and the own-images config start from their flagfiles, train, are interrupted
after step 1 and resume, and export a SavedModel that takes uint8 images of the dataset's shape and returns its
classes; epsilon is dp_accounting's for the dataset's own N. A resumed run on changed data is refused as a changed
privacy setting. In-process runs of two steps (train.py's one-line errors: test_dataset_errors.py)."""

import contextlib
import dataclasses
import io
import json
import os
import signal

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from dp_accounting import rdp

import dataset_files as files
from conftest import REPO_ROOT, snapshot
from eqdp_tf import config
from eqdp_tf.datasets.load import fingerprint
from eqdp_tf.errors import ConfigError
from eqdp_tf.training import loop
from eqdp_tf.training.checkpoint import CheckpointStore, Interrupted
from eqdp_tf.training.checkpoint_journal import JOURNAL_NAME
from eqdp_tf.training.plan import keyed_fingerprint

# Two steps of tiny batches, a checkpoint after each: enough to interrupt after step 1 and resume.
TINY = dict(steps=2, batch_size=8, physical_batch_size=8, num_views=2, checkpoint_every=1, eval_every=2,
            eval_batch_size=16)


def config_from_flagfile(name, **flag_values):
    """The ``TrainConfig`` train.py builds from ``--flagfile=configs/<name>`` and ``--<flag>=<value>`` overrides."""
    config.define_flags()
    argv = ["train.py", f"--flagfile={os.path.join(REPO_ROOT, 'configs', name)}"]
    argv += [f"--{key}={value}" for key, value in flag_values.items()]
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(argv)
        return config.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


def train(cfg, stop_after=None):
    """``loop.run(cfg)``; with ``stop_after``, a SIGTERM right after that step's checkpoint (returns None then)."""
    save = CheckpointStore.save

    def save_then_stop(store, step):
        prefix = save(store, step)
        if step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop stops after this step, as on a real SIGTERM
        return prefix

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CheckpointStore, "save", save_then_stop)
        try:
            return loop.run(cfg)
        except Interrupted:
            return None


def dp_accounting_epsilon(sigma, q, steps, delta):
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(delta)


# --------------------------------------------------------------------------------------------------------------------
# One run per kind


def _cifar100(root):
    for split, (images, coarse, fine) in files.cifar100_splits(train=40, test=8).items():
        files.write_cifar100_binary(str(root / "cifar-100-binary"), images, coarse, fine, f"{split}.bin")
    return "cifar100.cfg", dict(data_dir=root)


def _tiny_imagenet(root):
    files.write_tiny_imagenet(str(root / "tiny-imagenet-200"), ["n01", "n02", "n03"], train_per_class=6)
    return "tiny_imagenet.cfg", dict(data_dir=root / "tiny-imagenet-200")


def _imagenette(root):
    files.write_imagenette(str(root / "imagenette-160"), ["n01440764", "n02102040"])
    return "imagenette.cfg", dict(data_dir=root, batch_size=4, physical_batch_size=4)


# The kinds that reuse own_images.cfg (started as configured by the folder kind) train the ordinary CNN, which traces
# much faster than the D4 model: what they test is the data path.
_CNN = dict(group="C1", restrict="none")


def _tfds(root):
    del root  # served by tfds.testing.mock_data
    return "own_images.cfg", dict(dataset="tfds:mnist", image_size=32, **_CNN)


def _folder(root):
    files.write_class_tree(str(root / "mine"), {"benign": 12, "malignant": 10}, size=(20, 24), gray={"benign"})
    return "own_images.cfg", dict(dataset=f"folder:{root / 'mine'}", image_size=16)


def _npz(root):
    np.savez_compressed(root / "bloodmnist.npz", **files.medmnist_arrays(train=30, test=6, channels=3, classes=8))
    return "own_images.cfg", dict(dataset=f"npz:{root / 'bloodmnist.npz'}", image_size=32, **_CNN)


# kind: (writer, expected image shape, classes, N)
KINDS = {
    "cifar100": (_cifar100, (32, 32, 3), 100, 40),
    "tiny_imagenet": (_tiny_imagenet, (64, 64, 3), 3, 18),
    "imagenette": (_imagenette, (160, 160, 3), 2, 6),
    "tfds": (_tfds, (32, 32, 1), 10, 24),
    "folder": (_folder, (16, 16, 3), 2, 20),
    "npz": (_npz, (32, 32, 3), 8, 30),
}


@dataclasses.dataclass
class Run:
    kind: str
    cfg: config.TrainConfig
    result: dict
    printed: str


@pytest.fixture(scope="module", params=list(KINDS))
def run(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    flagfile, overrides = KINDS[kind][0](root)
    cfg = config_from_flagfile(flagfile, **{**TINY, "output_dir": root / "run", **overrides})
    printed = io.StringIO()
    with tfds.testing.mock_data(as_dataset_fn=files.tfds_as_dataset()) if kind == "tfds" else \
            contextlib.nullcontext():
        assert train(cfg, stop_after=1) is None
        with contextlib.redirect_stdout(printed):
            result = train(cfg)
    return Run(kind, cfg, result, printed.getvalue())


def test_each_kind_trains_resumes_and_exports(run):
    _, shape, classes, num_train = KINDS[run.kind]
    assert "resuming from step 1" in run.printed and "done: test accuracy" in run.printed
    assert run.result["steps_spent"] == 2
    with open(os.path.join(run.cfg.output_dir, "config.json")) as f:
        dataset = json.load(f)["dataset_description"]
    assert (dataset["dataset"], tuple(dataset["image_shape"]), dataset["num_classes"], dataset["num_train"]) == \
        (run.cfg.dataset, shape, classes, num_train)
    assert f"dataset {run.cfg.dataset}: {num_train} train" in run.printed


def test_epsilon_is_dp_accountings_for_the_datasets_own_n(run):
    _, _, _, num_train = KINDS[run.kind]
    with open(os.path.join(run.cfg.output_dir, "privacy.json")) as f:
        privacy = json.load(f)
    q = run.cfg.batch_size / num_train
    assert privacy["dataset_size"] == num_train and privacy["sampling_rate"] == pytest.approx(q, rel=1e-12)
    expected = dp_accounting_epsilon(privacy["noise_multiplier"], q, 2, run.cfg.delta)
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-9)
    # Not the epsilon of another N: CIFAR-10's 50000 would give a far smaller one.
    assert dp_accounting_epsilon(privacy["noise_multiplier"], run.cfg.batch_size / 50000, 2, run.cfg.delta) < \
        expected / 2


def test_saved_model_takes_uint8_of_the_datasets_shape(run):
    _, shape, classes, _ = KINDS[run.kind]
    serve = tf.saved_model.load(run.result["export_path"]).signatures["serving_default"]
    spec = serve.structured_input_signature[1]["images"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, *shape]
    images = files.random_images(3, shape, seed=9)
    out = serve(images=tf.constant(images))
    assert out["probabilities"].shape == (3, classes)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out["classes"].numpy(), out["probabilities"].numpy().argmax(-1))
    with open(os.path.join(run.result["export_path"], "assets.extra", "dataset.json")) as f:
        assert json.load(f)["image_shape"] == list(shape)


# --------------------------------------------------------------------------------------------------------------------
# Resuming on changed data


def _interrupted_npz_run(root):
    """A small run on an .npz interrupted after step 1: (its config, the data's arrays)."""
    arrays = files.medmnist_arrays(train=30, test=6, side=16)
    np.savez(root / "data.npz", **arrays)
    cfg = config.TrainConfig(dataset=f"npz:{root / 'data.npz'}", group="C1", restrict="none", noise_multiplier=1.0,
                             target_epsilon=None, output_dir=str(root / "run"), export=False,
                             normalization_mean=[0.5], normalization_std=[0.25], **TINY)
    assert train(cfg, stop_after=1) is None
    return cfg, arrays


@pytest.mark.parametrize("change, message", [
    ("one image less", "the training set now has 29 examples, but this run was started with 30"),
    ("one pixel changed", "the training set has other images or labels than this run was started with (same number, "
                          "30, but another fingerprint"),
])
def test_a_resume_on_changed_data_is_refused_like_a_changed_privacy_setting(tmp_path, change, message):
    cfg, arrays = _interrupted_npz_run(tmp_path)
    if change == "one image less":
        arrays["train_images"], arrays["train_labels"] = arrays["train_images"][1:], arrays["train_labels"][1:]
    else:
        arrays["train_images"][3, 5, 5] ^= 1
    np.savez(tmp_path / "data.npz", **arrays)  # the same --dataset, its file changed: only the journal can tell
    before = snapshot(cfg.output_dir)
    with pytest.raises(ConfigError) as caught:
        loop.run(cfg)
    assert message in str(caught.value) and "--allow_privacy_change" in str(caught.value)
    assert snapshot(cfg.output_dir) == before  # refused before anything was written
    if change == "one pixel changed":
        return
    # Allowed, the run goes on with the new data; the journal records the data of both starts.
    assert loop.run(dataclasses.replace(cfg, allow_privacy_change=True))["steps_spent"] == 2
    with open(os.path.join(cfg.output_dir, JOURNAL_NAME)) as f:
        starts = [r for r in map(json.loads, f) if r["event"] == "start"]
    assert [s["dataset_size"] for s in starts] == [30, len(arrays["train_labels"])]
    assert starts[0]["dataset_fingerprint"] != starts[1]["dataset_fingerprint"]
    # The journal's fingerprint is keyed by the run's secret: the plain SHA-256 of the data appears nowhere.
    plain = fingerprint(arrays["train_images"][..., None], arrays["train_labels"][:, 0])
    for name in ("config.json", JOURNAL_NAME, "privacy.json"):
        with open(os.path.join(cfg.output_dir, name)) as f:
            assert plain not in f.read()
    with open(os.path.join(cfg.output_dir, "dp_secret.json")) as f:
        assert starts[1]["dataset_fingerprint"] == keyed_fingerprint(json.load(f)["key"], plain)


def test_a_changed_held_out_fraction_is_a_changed_privacy_setting(tmp_path):
    files.write_class_tree(str(tmp_path / "mine"), {"a": 10, "b": 10}, size=(16, 16))
    cfg = config.TrainConfig(dataset=f"folder:{tmp_path / 'mine'}", group="C1", restrict="none",
                             noise_multiplier=1.0, target_epsilon=None, output_dir=str(tmp_path / "run"),
                             export=False, normalization_mean=[0.5], normalization_std=[0.25], **TINY)
    assert train(cfg, stop_after=1) is None
    before = snapshot(cfg.output_dir)
    with pytest.raises(ConfigError) as caught:
        loop.run(dataclasses.replace(cfg, test_fraction=0.2))
    assert "other privacy settings (--test_fraction 0.1 -> 0.2)" in str(caught.value)
    assert snapshot(cfg.output_dir) == before
