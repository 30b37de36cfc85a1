"""Bad input to train.py: one clear line on stderr, exit code 2, no traceback, nothing written outside --output_dir.

Every case runs train.py in its own empty working folder; all of them start at once (each is mostly TensorFlow's
start-up). Data cases use a small copy of CIFAR-10 (60 records per file) with one file damaged.
"""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import CIFAR10_DIR, REPO_ROOT, needs_cifar10, one_error_line, run_concurrently, snapshot, subprocess_env
from eqdp_tf.training.checkpoint_journal import JOURNAL_NAME

pytestmark = [needs_cifar10, pytest.mark.slow]

TRAIN_PY = os.path.join(REPO_ROOT, "train.py")
RECORD = 1 + 32 * 32 * 3
FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]

# A tiny real run (used by the cases that get as far as training).
TINY = ["--train_subset=64", "--test_subset=32", "--steps=2", "--batch_size=16", "--physical_batch_size=16",
        "--num_views=1", "--noise_multiplier=1.0", "--eval_batch_size=32", "--eval_every=2", "--checkpoint_every=2"]

# name: (flags, expected fragments of the error line, what --output_dir may hold afterwards)
#   DATA / OUT / FILE are replaced by the case's data folder, output folder and a plain file.
NOTHING = None
CASES = {
    "unknown flag": (["--no_such_flag=1"], ["unknown flag --no_such_flag"], NOTHING),
    "misspelled flag": (["--stepz=3"], ["unknown flag --stepz", "did you mean --steps?"], NOTHING),
    "unparsable value": (["--steps=abc"], ["--steps=abc", "invalid literal"], NOTHING),
    "missing flagfile": (["--flagfile=DATA/none.cfg"], ["Unable to open flagfile", "none.cfg"], NOTHING),
    "contradictory dp and noise": (["--dp=false", "--noise_multiplier=1"], ["--dp=false", "--noise_multiplier"],
                                   NOTHING),
    "weight standardisation for a ResNet-9": (["--wrn_weight_standardization=false"],
                                             ["--wrn_weight_standardization applies only to --architecture=wrn16_4"],
                                             NOTHING),
    "negative sigma": (["--noise_multiplier=-0.5"], ["--noise_multiplier must be >= 0", "-0.5"], NOTHING),
    "delta not below 1": (["--delta=1"], ["--delta must be in (0, 1)"], NOTHING),
    "sampling rate above 1": (TINY + ["--batch_size=128"],
                              ["--batch_size 128 is larger than the 64 training examples", "q > 1"], ["config.json"]),
    "target epsilon unreachable": (TINY[:6] + ["--target_epsilon=1e-9"],
                                   ["--target_epsilon=1e-09 cannot be met in --steps=2", "unreachable"],
                                   ["config.json"]),
    "noise contradicts target": (TINY + ["--target_epsilon=0.5"],
                                 ["--noise_multiplier=1 gives epsilon", "above --target_epsilon=0.5", "contradict"],
                                 ["config.json"]),
    "simulated batch below the batch": (TINY + ["--simulated_batch_size=8"],
                                        ["--simulated_batch_size 8 is smaller than --batch_size 16"], NOTHING),
    "simulated batch without dp": (["--dp=false", "--target_epsilon=none", "--simulated_batch_size=1024"],
                                   ["--simulated_batch_size simulates a private run", "--dp=true"], NOTHING),
    "simulated batch above the dataset": (TINY + ["--simulated_batch_size=128"],
                                          ["--simulated_batch_size 128 is larger than the 64 training examples"],
                                          ["config.json"]),
    # Non-finite, negative, zero, huge and wrong-type values (issue 16).
    "nan learning rate": (["--learning_rate=nan"], ["--learning_rate must be a finite number; got nan"], NOTHING),
    "infinite learning rate": (["--learning_rate=inf"], ["--learning_rate must be a finite number; got inf"],
                               NOTHING),
    "infinite clip norm": (["--l2_norm_clip=inf"], ["--l2_norm_clip must be a finite number"], NOTHING),
    "zero clip norm": (["--l2_norm_clip=0"], ["--l2_norm_clip must be > 0"], NOTHING),
    "nan delta": (["--delta=nan"], ["--delta must be a finite number"], NOTHING),
    "nan noise": (["--noise_multiplier=nan"], ["--noise_multiplier must be a finite number"], NOTHING),
    "infinite target epsilon": (["--target_epsilon=inf"], ["--target_epsilon must be a finite number"], NOTHING),
    "negative target epsilon": (["--target_epsilon=-1"], ["--target_epsilon must be > 0"], NOTHING),
    "negative max epsilon": (["--max_epsilon=-1"], ["--max_epsilon must be > 0"], NOTHING),
    "unparsable max epsilon": (["--max_epsilon=lots"], ["--max_epsilon must be a number or 'none'"], NOTHING),
    "nan ema decay": (["--ema_decay=nan"], ["--ema_decay must be a finite number"], NOTHING),
    "huge momentum": (["--momentum=1e300"], ["--momentum must be in [0, 1)"], NOTHING),
    "negative momentum": (["--momentum=-0.5"], ["--momentum must be in [0, 1)"], NOTHING),
    "zero steps": (["--steps=0"], ["--steps must be a positive integer; got 0"], NOTHING),
    "negative batch": (["--batch_size=-5"], ["--batch_size must be a positive integer; got -5"], NOTHING),
    "zero physical batch": (["--physical_batch_size=0"], ["--physical_batch_size must be a positive integer"],
                            NOTHING),
    "zero views": (["--num_views=0"], ["--num_views must be a positive integer"], NOTHING),
    "zero training subset": (["--train_subset=0"], ["--train_subset must be a positive integer"], NOTHING),
    "negative seed": (["--seed=-1"], ["--seed must be >= 0"], NOTHING),
    "fractional steps": (["--steps=2.5"], ["--steps=2.5", "invalid literal"], NOTHING),
    "empty data file": (TINY, ["data_batch_4.bin is truncated or corrupt"], NOTHING),
    "missing data folder": (TINY + ["--data_dir=DATA/nowhere"], ["does not exist", "--data_dir", "TFDS"],
                            NOTHING),
    "missing data file": (TINY, ["split is incomplete", "data_batch_3.bin", "--data_dir", "TFDS"], NOTHING),
    "truncated data file": (TINY, ["data_batch_2.bin is truncated or corrupt"], NOTHING),
    "label out of range": (TINY, ["test_batch.bin has label 12 at record 5", "0..9"], NOTHING),
    "corrupt pickle": (TINY, ["data_batch_1 is not a readable CIFAR-10 pickle"], NOTHING),
    "wrong image shape": (TINY, ["data_batch_1 has data of shape (60, 1000)", "expected [n, 3072]"],
                          NOTHING),
    "output folder holds another run": (TINY + ["--group=C4", "--restrict=none"],
                                        ["holds a different run (differs in: group, restrict)"], "unchanged"),
    "output folder changed privacy": (TINY + ["--noise_multiplier=2.0"],
                                      ["other privacy settings (--noise_multiplier 1.0 -> 2.0)",
                                       "--allow_privacy_change"], "unchanged"),
    "output folder with foreign files": (TINY, ["is not empty and holds no run of ours"], "unchanged"),
    "output folder under a file": (TINY + ["--output_dir=FILE/run"],
                                   ["cannot write to --output_dir", "Not a directory"], NOTHING),
    "damaged privacy journal": (TINY, ["the privacy journal", "is damaged at line 2", "new folder"], "unchanged"),
    "non-finite loss": (TINY + ["--learning_rate=1e38", "--checkpoint_every=1", "--steps=3", "--eval_every=3"],
                        ["step 2: the training loss is nan", "stopped before applying it",
                         "checkpoint of step 1 is kept"], "trained"),
    "full disk at export": (TINY + ["--export=true", "--delta=0.02"],
                            ["exporting the SavedModel to", "export/1 failed", "File too large"], "trained"),
}

# Runs train.py with every write past 200 kB failing (EFBIG) from the moment the export starts: a disk that
# fills up at export time.
_FULL_DISK = textwrap.dedent(
    """
    import resource, runpy, signal, sys
    from eqdp_tf.native_log import native_log_level

    with native_log_level():  # as train.py imports TensorFlow: its C++ start-up notes would add lines to stderr
        from eqdp_tf import export

    original = export.export_saved_model

    def export_on_full_disk(*args, **kwargs):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
        return original(*args, **kwargs)

    export.export_saved_model = export_on_full_disk
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def _small_dataset(folder):
    """60 real records per file, in the official binary layout."""
    os.makedirs(folder)
    with open(os.path.join(CIFAR10_DIR, "data_batch_1.bin"), "rb") as f:
        records = np.frombuffer(f.read(RECORD * 360), np.uint8).reshape(360, RECORD)
    for i, name in enumerate(FILES):
        records[i * 60:(i + 1) * 60].tofile(os.path.join(folder, name))


def _pickle_dataset(folder, data):
    os.makedirs(folder)
    for name in FILES:
        with open(os.path.join(folder, name[:-4]), "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * len(data)}, f)


def _prepare(case, root):
    """Sets up the case's data and output folders; returns (data_dir, output_dir, plain file)."""
    data, out, plain = root / "data", root / "out", root / "afile"
    plain.write_text("not a folder\n")
    if case == "corrupt pickle":
        os.makedirs(data)
        for name in FILES:
            (data / name[:-4]).write_bytes(b"\x80\x04garbage, not a pickle")
    elif case == "wrong image shape":
        _pickle_dataset(data, np.zeros((60, 1000), np.uint8))
    else:
        _small_dataset(data)
    if case == "missing data file":
        (data / "data_batch_3.bin").unlink()
    elif case == "empty data file":
        (data / "data_batch_4.bin").write_bytes(b"")
    elif case == "truncated data file":
        with open(data / "data_batch_2.bin", "r+b") as f:
            f.truncate(RECORD * 60 - 100)
    elif case == "label out of range":
        with open(data / "test_batch.bin", "r+b") as f:
            f.seek(5 * RECORD)
            f.write(bytes([12]))
    if case in ("output folder holds another run", "output folder changed privacy", "damaged privacy journal"):
        # The state a run of TINY leaves after its first step.
        out.mkdir()
        from eqdp_tf.config import TrainConfig

        settings = dict(data_dir=str(data), train_subset=64, test_subset=32, steps=2, batch_size=16,
                        physical_batch_size=16, num_views=1, noise_multiplier=1.0, target_epsilon=None,
                        eval_batch_size=32, eval_every=2, checkpoint_every=2, output_dir=str(out))
        (out / "config.json").write_text(json.dumps(TrainConfig(**settings).to_json()))
        lines = [{"event": "start", "attempt": 1, "step": 0},
                 {"event": "step", "attempt": 1, "step": 1, "sampling_rate": 0.25, "noise_multiplier": 1.0,
                  "l2_norm_clip": 2.0, "dataset_size": 64}]
        text = "".join(json.dumps(line) + "\n" for line in lines)
        if case == "damaged privacy journal":
            text = text.replace('"step": 1,', '"step": 1')
        (out / JOURNAL_NAME).write_text(text)
    elif case == "output folder with foreign files":
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    return data, out, plain


# Cases run as subprocesses, this many at a time (each is mostly TensorFlow's start-up, ~0.4 GB).
CONCURRENT = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    def start(case):
        flags = CASES[case][0]
        root = tmp_path_factory.mktemp("case")
        data, out, plain = _prepare(case, root)
        cwd = root / "cwd"
        cwd.mkdir()
        flags = [f"--data_dir={data}", f"--output_dir={out}", "--export=false"] + flags
        flags = [f.replace("DATA", str(data)).replace("FILE", str(plain)) for f in flags]
        before = snapshot(out) if out.exists() else None
        command = [sys.executable, TRAIN_PY, *flags]
        if case == "full disk at export":
            script = root / "full_disk.py"
            script.write_text(_FULL_DISK)
            command = [sys.executable, str(script), TRAIN_PY, *flags]
        proc = subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        return dict(root=root, data=data, out=out, before=before), proc

    return run_concurrently(CASES, start, CONCURRENT)


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_error(runs, case):
    _, fragments, leaves = CASES[case]
    run = runs[case]
    line = one_error_line(run["code"], run["stderr"])
    for fragment in fragments:
        assert fragment.replace("DATA", str(run["data"])) in line, line
    assert "done:" not in run["stdout"]
    assert os.listdir(run["root"] / "cwd") == []  # nothing written outside the output folder
    out = run["out"]
    if leaves is NOTHING:
        assert not out.exists()
    elif leaves == "unchanged":
        assert snapshot(out) == run["before"]
    elif leaves != "trained":
        assert sorted(os.listdir(out)) == leaves


def test_data_folder_is_never_written(runs):
    for case, run in runs.items():
        for name in os.listdir(run["data"]):
            assert name in FILES or name + ".bin" in FILES, (case, name)


def test_non_finite_loss_writes_nothing_for_the_failed_step(runs):
    out = runs["non-finite loss"]["out"]
    checkpoints = sorted(os.listdir(out / "checkpoints"))
    assert checkpoints == ["checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index"]
    with open(out / JOURNAL_NAME) as f:
        records = [json.loads(line) for line in f]
    assert max(r["step"] for r in records) == 1  # the non-finite step 2 was never applied or recorded
    with open(out / "privacy.json") as f:
        assert json.load(f)["steps_spent"] == 1


def test_full_disk_at_export_leaves_no_partial_export(runs):
    run = runs["full disk at export"]
    out = run["out"]
    assert os.listdir(out / "export") == []  # neither a version nor the staging folder
    with open(out / "privacy.json") as f:
        privacy = json.load(f)
    assert privacy["steps_spent"] == 2 and privacy["epsilon"] > 0


def test_delta_not_below_one_over_n_warns(runs):
    # the full-disk run used --delta=0.02 with 64 examples: 0.02 >= 1/64
    stdout = runs["full disk at export"]["stdout"]
    assert "warning: delta=0.02 is not below 1/dataset_size=0.0156" in stdout
    assert "step 2/2" in stdout  # a warning, not an error: training went on
