"""The configuration layer is plain data: parsing and validating flags never starts TensorFlow."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def test_config_and_help_do_not_import_tensorflow():
    code = ("import sys; import eqdp_tf.config as c; c.TrainConfig(group='D8', restrict='C4', model_variant='dense'); "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    helped = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train.py"), "--helpfull"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert "--simulated_batch_size" in helped.stdout and "Traceback" not in helped.stderr  # (absl exits 1)


def test_every_shipped_config_parses_into_a_valid_run():
    # Each configs/*.cfg as train.py reads it (flag parsing and validation only: no TensorFlow, no training).
    code = """
import glob, json, sys
from absl import flags
import eqdp_tf.config as c
c.define_flags()
out = {}
for path in sorted(glob.glob('configs/*.cfg')):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['train.py', '--flagfile=' + path])
    out[path] = c.config_from_flags().to_json()
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    configs = json.loads(done.stdout)
    assert len(configs) == len(os.listdir(os.path.join(REPO_ROOT, "configs")))
    wrn = configs["configs/cifar10_wrn16_4_tan.cfg"]  # TAN's reference WRN-16-4 run, as its authors trained it
    assert (wrn["batch_size"], wrn["steps"], wrn["noise_multiplier"], wrn["num_views"], wrn["learning_rate"],
            wrn["l2_norm_clip"], wrn["ema_decay"], wrn["wrn_weight_standardization"]) == \
        (4096, 2500, 3.0, 16, 4.0, 1.0, 0.9999, True)
    assert wrn["target_epsilon"] is None  # sigma given, not calibrated
    paper = configs["configs/cifar10.cfg"]  # the official code's model and EMA schedule (issue 38)
    assert (paper["model_variant"], paper["conv_basis"], paper["conv_weight_standardization"],
            paper["norm_group_rule"], paper["ema_updates_per_step"]) == ("official", "steerable", True, "official", 16)
    assert configs["configs/cifar10_tan256.cfg"]["ema_updates_per_step"] == 16  # the full-scale run's schedule
    assert configs["configs/cifar10_c1_baseline.cfg"]["model_variant"] == "official"
    so2 = configs["configs/cifar10_so2.cfg"]  # the official code's 'orthogonal' model (issue 42)
    assert (so2["group"], so2["restrict"], so2["so2_frequency"], so2["so2_norm_centering"], so2["conv_basis"],
            so2["conv_weight_standardization"]) == ("SO2", "C1", 1, "all", "steerable", True)
    assert {k: v for k, v in so2.items() if not k.startswith("so2_") and k not in ("group", "restrict", "output_dir")} \
        == {k: v for k, v in paper.items() if not k.startswith("so2_") and k not in ("group", "restrict", "output_dir")}


def test_model_variant_resolves_and_each_ingredient_overrides_it():
    from eqdp_tf.config import TrainConfig

    official = TrainConfig()
    assert (official.conv_basis, official.conv_weight_standardization, official.norm_group_rule) == (
        "steerable", True, "official")
    dense = TrainConfig(model_variant="dense")
    assert (dense.conv_basis, dense.conv_weight_standardization, dense.norm_group_rule) == ("dense", False, "closest")
    ablated = TrainConfig(conv_weight_standardization=False)
    assert (ablated.conv_basis, ablated.conv_weight_standardization) == ("steerable", False)
    # config.json holds the resolved values, so a replay of its flags builds the same model
    assert TrainConfig(**{k: v for k, v in ablated.to_json().items()}).to_json() == ablated.to_json()


def test_every_committed_study_record_resumes_under_todays_flags():
    """Run folders written before the model variants, --dataset and --wrn_weight_standardization existed (the
    study's records) resume under the flags the study gives them today: their config.json lacks those keys, which
    then mean what those runs trained (the dense model on CIFAR-10, plain WRN convolutions)."""
    code = """
import glob, json, os, sys
sys.path.insert(0, 'bench')
from absl import flags
import eqdp_tf.config as c
import study_plan
from eqdp_tf.training.plan import saved_flags
c.define_flags()
out = {}
for path in sorted(glob.glob('docs/study/**/config.json', recursive=True)):
    name = os.path.basename(os.path.dirname(path))
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['train.py', *study_plan.run_flags(name)])
    with open(path) as f:
        out[name] = c.config_from_flags().differences(saved_flags(json.load(f)))  # as a resume compares them
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    differences = json.loads(done.stdout)
    assert len(differences) > 20
    assert {name: d for name, d in differences.items() if d} == {}


def test_a_config_written_before_the_model_variant_resumes_as_the_dense_model():
    from eqdp_tf.config import TrainConfig

    legacy = TrainConfig(model_variant="dense").to_json()
    for key in ("model_variant", "conv_basis", "conv_weight_standardization", "norm_group_rule",
                "ema_updates_per_step"):
        legacy.pop(key)
    assert TrainConfig(model_variant="dense").differences(legacy) == []
    assert TrainConfig().differences(legacy) == ["conv_basis", "conv_weight_standardization", "model_variant",
                                                 "norm_group_rule"]
    assert TrainConfig(model_variant="dense", ema_updates_per_step=16).differences(legacy) == [
        "ema_updates_per_step"]


def test_a_config_written_before_so2_resumes_and_an_so2_run_keeps_its_frequency():
    from eqdp_tf.config import TrainConfig

    before = TrainConfig().to_json()
    for key in ("so2_frequency", "so2_norm_centering"):
        before.pop(key)
    assert TrainConfig().differences(before) == []
    so2 = TrainConfig(group="so2", restrict="c1", so2_frequency=2).to_json()
    assert TrainConfig(group="so2", restrict="c1", so2_frequency=3).differences(so2) == ["so2_frequency"]


@pytest.mark.parametrize("settings, message", [
    (dict(group="C8", restrict="none"), "--conv_basis=steerable needs a group that permutes the pixel grid exactly"),
    (dict(conv_basis="fourier"), "--conv_basis must be one of steerable, dense"),
    (dict(model_variant="escnn"), "--model_variant must be one of official, dense"),
    (dict(ema_updates_per_step=0), "--ema_updates_per_step"),
    (dict(group="SO2", restrict="none"), "--group=SO2 restricts its last stages to the trivial group"),
    (dict(group="SO2", restrict="D2"), "use --restrict=C1"),
    (dict(group="SO2", restrict="C1", model_variant="dense"), "--group=SO2 has only the steerable basis"),
    (dict(group="SO2", restrict="C1", so2_frequency=0), "--so2_frequency"),
    (dict(group="SO2", restrict="C1", so2_norm_centering="trivial"), "--so2_norm_centering must be one of"),
    (dict(group="SO2", restrict="C1", architecture="wrn16_4"), "--group=SO2 builds the Equivariant ResNet-9 only"),
])
def test_bad_model_settings_are_one_line_errors(settings, message):
    from eqdp_tf.config import TrainConfig
    from eqdp_tf.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        TrainConfig(**settings)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_only_dp_seed_says_it_seeds_the_batches_or_the_noise():
    # --seed is public: it seeds the initialisation and the augmentation; the batches and the noise come from the
    # run's secret key, or --dp_seed (its help once said --seed seeded them too).
    code = ("import json; from absl import flags; import eqdp_tf.config as c; c.define_flags(); "
            "print(json.dumps({n: flags.FLAGS[n].help for n in flags.FLAGS if 'seed' in n}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    helps = {name: text.lower() for name, text in json.loads(done.stdout).items()}
    assert set(helps) == {"seed", "dp_seed", "split_seed"}
    for name, text in helps.items():
        assert ("sampling" in text and "noise" in text) == (name == "dp_seed"), (name, text)
