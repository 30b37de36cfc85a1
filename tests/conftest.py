import dataclasses
import os

import pytest

# Keras 2 as tf.keras on TensorFlow 2.16+ (layers/_tf_setup.py): before any test module imports TensorFlow.
import layers  # noqa: F401

# Keep TensorFlow's C++ start-up chatter out of test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The local CIFAR-10 copy lives beside the project (never inside it); override with EQDP_CIFAR10_DIR.
CIFAR10_DIR = os.environ.get(
    "EQDP_CIFAR10_DIR",
    os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "cifar10", "cifar-10-batches-bin"),
)
HAVE_CIFAR10 = os.path.isfile(os.path.join(CIFAR10_DIR, "data_batch_1.bin"))
# Tests that read CIFAR-10 skip without the copy on a developer's machine; in CI (CI=true) its absence is an error,
# so that CI never passes by testing less.
needs_cifar10 = pytest.mark.skipif(not HAVE_CIFAR10, reason=f"no CIFAR-10 copy at {CIFAR10_DIR}")


def reference_script(name):
    """The module ``tests/reference/<name>.py`` (the scripts that write the escnn reference files), loaded by path:
    the folder is not a package."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_sessionstart(session):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and not HAVE_CIFAR10:
        raise pytest.UsageError(f"CI=true but the CIFAR-10 copy the data tests need is missing at {CIFAR10_DIR} "
                                "(set EQDP_CIFAR10_DIR): refusing to skip them")


def subprocess_env(**extra):
    """The environment for running train.py and friends in a subprocess: quiet TensorFlow, this checkout's code."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONDONTWRITEBYTECODE="1", **extra)
    env.pop("PYTHONPATH", None)
    return env


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``: to assert that a command wrote nothing there."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def run_concurrently(cases, start, concurrent):
    """Runs the processes ``start(case)`` starts, ``concurrent`` at a time (each is mostly TensorFlow's start-up);
    ``start`` returns (a dict about the case, its Popen). Returns {case: that dict with code, stdout and stderr}."""
    pending, running, results = list(cases), {}, {}
    while pending or running:
        while pending and len(running) < concurrent:
            case = pending.pop(0)
            running[case] = start(case)
        case = next(iter(running))
        info, proc = running.pop(case)
        stdout, stderr = proc.communicate(timeout=300)
        results[case] = dict(info, code=proc.returncode, stdout=stdout, stderr=stderr)
    return results


def one_error_line(code, stderr):
    """The line ``error: ...`` a user's mistake ends with: exit code 2, no traceback, nothing else on stderr."""
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def flags_for(cfg):
    """train.py flags reproducing the TrainConfig ``cfg`` (None-valued settings left at their flag default)."""
    flags = []
    for name, value in dataclasses.asdict(cfg).items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        flags.append(f"--{name}={value}")
    return flags
