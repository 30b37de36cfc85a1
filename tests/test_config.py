"""The configuration layer is plain data: parsing and validating flags never starts TensorFlow."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_config_and_help_do_not_import_tensorflow():
    code = ("import sys; import eqdp_tf.config as c; c.TrainConfig(group='D8', restrict='C4'); "
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
