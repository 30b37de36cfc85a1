"""The official SO(2) Equivariant ResNet-9 (issue 42): counts, layers, where it is equivariant, and a private run
that resumes and exports."""

import json
import math
import os
import signal

import numpy as np
import pytest
import tensorflow as tf

import layers
from conftest import CIFAR10_DIR, needs_cifar10, reference_script
from eqdp_tf import data as data_lib
from eqdp_tf import models
from eqdp_tf.config import TrainConfig
from eqdp_tf.datasets import DatasetDescription
from eqdp_tf.models import resnet9_so2
from eqdp_tf.training import loop, trainer
from eqdp_tf.training.checkpoint import Interrupted
from layers import so2, testing

# The official code's counts (weights + biases + head), issue 42.
OFFICIAL_COUNTS = {1: 242_378, 2: 250_881, 3: 308_444}


@pytest.fixture(scope="module")
def so2_models():
    return {frequency: models.build_model("eq_resnet9", group="SO2", restrict="C1", so2_frequency=frequency)
            for frequency in OFFICIAL_COUNTS}


@pytest.mark.parametrize("frequency", sorted(OFFICIAL_COUNTS))
def test_parameter_count_is_the_official_codes(so2_models, frequency):
    assert so2_models[frequency].count_params() == OFFICIAL_COUNTS[frequency]


def test_layers_widths_and_norm_groups_for_l1(so2_models):
    """L = 1: 19 / 39 / 64 fields of 3 channels; 4 coefficients per image channel and lifted field, 12 per pair of
    fields, 8 per pair of C1 channels; one bias per field; norm groups by the official rule (1 for 19, 3 for 39)."""
    model = so2_models[1]
    count = {layer.name: layer.count_params() for layer in model.layers}
    assert count["stage1_conv"] == 4 * 3 * 19 + 19
    assert count["stage2_conv"] == 12 * 19 * 39 + 39
    assert count["res1a_conv"] == count["res1b_conv"] == 12 * 39 * 39 + 39
    assert count["stage3_conv"] == 12 * 39 * 64 + 64
    assert count["stage4_conv"] == 8 * 64 * 3 * 64 + 64
    assert count["res2a_conv"] == count["res2b_conv"] == 8 * 64 * 64 + 64
    assert count["logits"] == 64 * 4 * 10 + 10
    assert [model.get_layer(n).groups for n in ("stage1_norm", "stage2_norm", "res1_norm", "stage3_norm",
                                               "stage4_norm")] == [1, 3, 3, 8, 8]
    assert model.get_layer("stage3_pool").output.shape[1:] == (8, 8, 64 * 3)
    assert model.get_layer("restrict").output.shape[1:] == (8, 8, 192)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds[kinds.index("DiscMask") + 1:kinds.index("DiscMask") + 4] == [
        "BandLimitedConv2D", "FourierELU", "BandLimitedGroupNormalization"]
    assert model.get_layer("stage2_pool").sigma == 0.66 and model.get_layer("stage1_elu").samples == 16
    assert all(model.get_layer(n).weight_standardization for n in ("stage1_conv", "res1b_conv", "stage4_conv"))
    assert [resnet9_so2.so2_stage_fields(w, 2) for w in (16, 32)] == [4, 9]


def test_conv_counts_are_escnns_where_installed(so2_models):
    """escnn's R2Conv between the same field types has as many weights and biases as each of our convolutions."""
    pytest.importorskip("torch")
    pytest.importorskip("escnn")
    import warnings

    from escnn import gspaces, nn

    reference = reference_script("make_escnn_so2_reference")
    trivial = gspaces.rot2dOnR2(1)
    for frequency in (1, 2):
        model = so2_models[frequency]
        for layer in model.layers:
            if isinstance(layer, layers.BandLimitedConv2D):
                in_fields = layer.input_spec.axes[-1] // so2.field_size(layer.input_frequency)
                theirs = reference.escnn_conv(layer.input_frequency, frequency, in_fields, layer.filters)
            elif isinstance(layer, layers.GroupConv2D):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    theirs = nn.R2Conv(nn.FieldType(trivial, [trivial.trivial_repr] * layer.input_spec.axes[-1]),
                                       nn.FieldType(trivial, [trivial.regular_repr] * layer.filters), 3,
                                       sigma=None, frequencies_cutoff=lambda r: 3 * r)
            else:
                continue
            assert layer.count_params() == sum(p.numel() for p in theirs.parameters()), (frequency, layer.name)


def _so2_stage(frequency, centering, last):
    tf.keras.utils.set_random_seed(0)
    model = models.build_model("eq_resnet9", group="SO2", restrict="C1", so2_frequency=frequency,
                               so2_norm_centering=centering)
    return tf.keras.Model(model.input, model.get_layer(last).output)


@needs_cifar10
def test_so2_stages_and_the_officials_choices_that_break_equivariance():
    """Before any pooling, the model with the equivariant norm commutes with quarter turns (up to float32) and
    stays within the conv bound at 45 degrees; the official centring breaks even the quarter turn, and so does the
    official pooling's off-centre sampling of a 32-pixel map, with either norm."""
    images, _ = data_lib.load_cifar10("test", CIFAR10_DIR, 4)
    images = images.astype(np.float32)
    invariant = _so2_stage(1, "invariant", "stage1_norm")
    run = lambda model: (lambda x: model(x).numpy())  # noqa: E731
    assert testing.so2_equivariance_error(run(invariant), images, 90, 0, 1) < 1e-5
    assert testing.so2_equivariance_error(run(invariant), images, 45, 0, 1, radius=13) < 0.12
    assert testing.so2_equivariance_error(run(_so2_stage(1, "all", "stage1_norm")), images, 90, 0, 1) > 0.05
    assert testing.so2_equivariance_error(run(_so2_stage(1, "invariant", "stage2_pool")), images, 90, 0, 1) > 0.05


def test_bad_so2_arguments_raise():
    with pytest.raises(ValueError, match="restrict must be 'C1'"):
        resnet9_so2.so2_resnet9(1, restrict="none")
    with pytest.raises(ValueError, match="frequency"):
        resnet9_so2.so2_resnet9(0)
    with pytest.raises(ValueError, match="steerable basis"):
        resnet9_so2.so2_resnet9(1, variant="dense")
    with pytest.raises(ValueError, match="norm_centering"):
        resnet9_so2.so2_resnet9(1, norm_centering="trivial")


# A private run of the configs/cifar10_so2.cfg model on a tiny subset: interrupted, resumed, exported.


@needs_cifar10
def test_private_run_resumes_and_exports_a_uint8_servable(tmp_path, monkeypatch):
    cfg = TrainConfig(group="SO2", restrict="C1", so2_frequency=1, data_dir=CIFAR10_DIR, train_subset=64,
                      test_subset=16, steps=2, batch_size=8, physical_batch_size=8, num_views=1,
                      noise_multiplier=1.0, eval_every=2, checkpoint_every=1, eval_batch_size=16,
                      output_dir=str(tmp_path / "run"), seed=3, dp_seed=5)
    after_step = trainer.Trainer._after_step

    def stop_after_the_first(self, step, saving, evaluating):
        result = after_step(self, step, saving, evaluating)
        if step == 1:
            self.stop.requested = signal.SIGINT  # as a Ctrl-C would
        return result

    monkeypatch.setattr(trainer.Trainer, "_after_step", stop_after_the_first)
    with pytest.raises(Interrupted):
        loop.run(cfg)
    assert not os.path.exists(tmp_path / "run" / "export")
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("ckpt-1")
    monkeypatch.setattr(trainer.Trainer, "_after_step", after_step)
    result = loop.run(cfg)
    assert result["parameters"] == OFFICIAL_COUNTS[1] and math.isfinite(result["test_loss"])
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("ckpt-2")
    served = tf.saved_model.load(result["export_path"]).signatures["serving_default"]
    images, _ = data_lib.load_cifar10("test", CIFAR10_DIR, 4)
    probabilities = served(images=tf.constant(images))["probabilities"].numpy()
    with open(os.path.join(cfg.output_dir, "config.json")) as f:
        dataset = DatasetDescription.from_json(json.load(f)["dataset_description"])
    ema = trainer.build_model(cfg, dataset)
    checkpoint = tf.train.Checkpoint(ema_model=ema)
    checkpoint.restore(tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints"))).expect_partial()
    expected = tf.nn.softmax(ema(images.astype(np.float32), training=False)).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)
