"""One process at a time in a run folder: a second would interleave its privacy journal with the first's."""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from eqdp_tf.config import TrainConfig
from eqdp_tf.errors import ConfigError
from eqdp_tf.training import plan


def test_a_second_opening_of_a_run_folder_is_refused_until_the_first_closes(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"))
    first = plan.open_run_folder(cfg)
    # flock conflicts between two openings even within one process, as between two processes
    with pytest.raises(ConfigError, match="another process is training in --output_dir .*run; wait for it"):
        plan.open_run_folder(cfg)
    assert sorted(os.listdir(tmp_path / "run")) == ["config.json"]  # the refused opening wrote nothing
    first.close()
    plan.open_run_folder(cfg).close()


def test_train_py_refuses_a_folder_another_process_trains_in(tmp_path):
    out = tmp_path / "run"
    holder = plan.open_run_folder(TrainConfig(output_dir=str(out)))
    try:
        done = subprocess.run([sys.executable, "train.py", "--flagfile=configs/smoke.cfg", f"--output_dir={out}"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    finally:
        holder.close()
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "another process is training in --output_dir" in lines[0]
    assert sorted(os.listdir(out)) == ["config.json"]
