"""The child-process protocol every bench script uses: each measurement runs in a fresh Python process (its own
memory, its own compiled functions), prints ``RESULT <json>`` as its last such line, and the parent collects it.

    result, wall_seconds = run_child(__file__, spec, timeout=600, memory_limit=16e9)   # parent
    child_main(measure, spec_json)                                                     # child (--child SPEC)

A failing, timed-out or memory-hungry child never raises in the parent: its result is a dict with
``status: error`` (or ``skipped``) and a one-line reason, so a grid goes on and the report shows the failure.
Also the timing loop of the in-process profilers (`median_seconds`).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # the project, also when it is not installed
RESULT_PREFIX = "RESULT "


def one_line(err):
    """A failed measurement's reason for a table cell: the error's type and its one-line message."""
    from eqdp_tf.errors import one_line as message

    return f"{type(err).__name__}: {message(err)}"[:300]


def child_main(measure, spec_json):
    """Child side: ``measure(spec)`` -> dict, printed as the RESULT line (an exception becomes an error result)."""
    spec = json.loads(spec_json)
    try:
        result = measure(spec)
    except Exception as err:  # noqa: BLE001 - the parent reports it
        result = {"status": "error", "error": one_line(err)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def rss_bytes(pid):
    """Resident memory of process ``pid`` (0 when unknown)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_child(script, spec, timeout=None, memory_limit=None):
    """Runs ``python script --child SPEC``; returns (result dict, wall seconds). Never raises for a failing child.

    The child is killed at ``timeout`` seconds, or as soon as its resident memory passes ``memory_limit`` bytes
    (polled), so that a runaway measurement cannot push the machine into the kernel's OOM killer.
    """
    command = [sys.executable, os.path.abspath(script), "--child", json.dumps(spec)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    killed = None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, cwd=REPO_ROOT)
        while proc.poll() is None:
            if timeout is not None and time.perf_counter() - start > timeout:
                killed = {"status": "skipped", "killed_at_s": timeout}
            elif memory_limit and rss_bytes(proc.pid) > memory_limit:
                killed = {"status": "error", "fatal": True,
                          "error": f"killed: resident memory over the {memory_limit / 1e9:.1f} GB limit"}
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
        wall = time.perf_counter() - start
        if killed:
            return killed, wall
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):]), wall
    if proc.returncode < 0:
        hint = ", likely out of memory" if proc.returncode == -9 else ""
        return {"status": "error", "error": f"killed by signal {-proc.returncode}{hint}", "fatal": True}, wall
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "error": f"exit {proc.returncode}: {tail[:300]}"}, wall


def median_seconds(fn, warmup, steps):
    """Median wall time of ``fn()`` (its tensors fetched) over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        _fetch(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _fetch(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fetch(outputs):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel  (the parent never imports TensorFlow)

    tf.nest.map_structure(lambda t: t.numpy(), outputs)
