"""The configuration layer is plain data: parsing and validating flags never starts TensorFlow."""

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
