"""Throughput and peak memory of one full training step (issue 7). Plain script: no speed asserts anywhere.

    python bench/benchmark.py --quick                    # smoke test: C1 ResNet-9, batch 32, XLA off
    python bench/benchmark.py                            # the full grid below; prints the table
    python bench/benchmark.py --write                    # ... and writes it to BENCHMARKS.md
    python bench/benchmark.py --models eq_resnet9_c1,wrn16_4 --batch-sizes 64,512 --xla on --bf16
    python bench/benchmark.py --dry-run                  # list the cells that would run

One cell = (model, mode, precision, XLA, physical batch B). Modes:

- ``nonprivate``: ``DPStep(..., dp=False)``: one batched gradient of the masked summed loss (the
  ``--dp=false`` path of train.py).
- ``dp``: ``DPStep(..., dp=True)``: per-example gradients, clipping, accumulation and noise.
- ``tfp_stock``: TF-Privacy's ``VectorizedDPKerasSGDOptimizer`` with ``model.compile`` and
  ``train_on_batch`` on a per-example loss (reduction NONE), the path users reach for first. With
  K > 1 views the B*K views are fed example-major with ``num_microbatches=B``, so TF-Privacy averages
  each example's K view losses before clipping (same unit of privacy as ``dp``, 'mean' instead of
  'sum', same cost).

A full step is ``accumulate(views, labels, mask)`` then ``apply()`` (one physical batch per logical
batch). Inputs are random uint8 views [B, K, 32, 32, 3] made once, so the cell times the step only;
the input pipeline is measured on its own (``make_train_dataset`` on real CIFAR-10, K=4, no training).
Views/s = B*K / median step time over ``--steps`` timed steps after ``--warmup`` untimed ones (the
first of which traces and compiles; its time is reported as "1st step").

Every cell runs in its own child process: its peak memory is the child's ``ru_maxrss`` (so it
includes the TensorFlow runtime, the model and the inputs, roughly 0.5-1 GB), and no graph of an earlier
cell lingers. A child gets ``--budget`` seconds; a cell that would take longer (projected from its
own step time after the compile step, or killed at the deadline) is reported as ``skipped (>Ns)``, and
the larger batches of the same model/mode/precision/XLA are then skipped too. A cell is also skipped
without running when the previous batch of its series projects it clearly over the budget (time grows
linearly in the batch, quadratically for ``tfp_stock``), or for ``tfp_stock`` over the memory limit. A
child whose resident memory passes ``--memory-limit-gb`` (default 80% of the memory available at
start) is killed, so a runaway cell never wakes the kernel's OOM killer.

FLOPs: the model's MACs per view are counted from layer shapes (conv: k*k*C_in*C_out*H_out*W_out with
the expanded channel counts of group convs; dense: in*out; norms and activations ignored); one
training view costs 3 forward passes = 6*MACs FLOPs. The machine's peak is the median rate of a large
fp32 matmul. "% peak" is useful model FLOPs per second over that peak (the same useful work in every
mode, so it also ranks the modes).

``--bf16`` (= ``--precision fp32,bf16``) adds mixed_bfloat16 cells for ``nonprivate`` and ``dp``. The
global policy is set before the model is built; variables, and so gradients, clipping, noise and
accumulators, stay fp32 (each cell records the dtypes). A model whose logits would be bf16 gets a
float32 output cast, as the Keras mixed-precision guide advises.

Planning (2-core AMD EPYC, K=1, 7 steps per cell, measured on the C1 quick run and single cells of the
other models at batch 32): the default fp32 grid (90 cells) takes about 30-35 minutes; most of it is
the XLA-on half (slower than XLA off on this CPU) and WRN-16-4 DP. ``tfp_stock`` costs 20-35x our DP
step per view already at batch 32 and grows with batch^2 in time and memory (about 7 GB at batch 64
for the C1 ResNet-9), so beyond batch 64-128 its cells are skipped. ``--bf16`` adds about 25-30
minutes over the whole grid, so its cells are limited to ``--bf16-batch-sizes`` (default 64,512) and
``--bf16-xla`` (default off): 12 cells for the three models.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import harness  # bench/harness.py: the child-process protocol shared by the bench scripts

_CHILD_START = time.perf_counter()

MODELS = {
    "eq_resnet9_d4d2": {"architecture": "eq_resnet9", "group": "D4", "restrict": "D2"},
    "eq_resnet9_c1": {"architecture": "eq_resnet9", "group": "C1", "restrict": None},
    "wrn16_4": {"architecture": "wrn16_4"},
}
MODEL_LABELS = {
    "eq_resnet9_d4d2": "Eq. ResNet-9 (D4->D2)",
    "eq_resnet9_c1": "ResNet-9 (C1)",
    "wrn16_4": "WRN-16-4",
}
MODES = ("nonprivate", "dp", "tfp_stock")
PRECISIONS = ("fp32", "bf16")
BF16_MODES = ("nonprivate", "dp")
XLA_CHOICES = ("off", "on")
DEFAULT_BATCHES = (32, 64, 128, 256, 512)
# The local CIFAR-10 copy beside the checkout (as the tests use it), for the input-pipeline measurement.
CIFAR_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data",
                         "cifar10", "cifar-10-batches-bin")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Targets of issue 7: reported, never asserted.
TARGET_DP_RATIO = 1.3  # DP step cost per view <= 1.3x non-private, batch >= 64
TARGET_FLATNESS = 1.15  # per-view cost at batch 512 within 15% of batch 64
TARGET_PEAK_FRACTION = 0.60  # non-private step >= 60% of fp32 peak
TARGET_MEMORY_BYTES = 12e9  # peak memory at 512 views per physical batch below half of 24 GB
TARGET_VIEWS_PER_BATCH = 512

L2_NORM_CLIP = 2.0
NOISE_MULTIPLIER = 1.0
# Small enough that weights stay finite over a few steps on random labels (NaNs or denormals could
# change the timing); the update itself costs the same for any value.
LEARNING_RATE = 0.01


# --------------------------------------------------------------------------------------------
# Child side: one measurement per process


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    return tf


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _build_model(tf, name):
    from eqdp_tf.models import build_model, with_float32_logits

    return with_float32_logits(build_model(**MODELS[name]))


def count_macs(tf, model):
    """Multiply-accumulates of one forward pass of one image, from the layers' static shapes."""
    import layers as eq_layers

    conv_types = (tf.keras.layers.Conv2D, eq_layers.LiftingConv2D, eq_layers.GroupConv2D)
    total = 0
    for layer in model.layers:
        if isinstance(layer, conv_types):
            size = layer.kernel_size
            kh, kw = (size, size) if isinstance(size, int) else tuple(size)
            in_channels = int(layer.input.shape[-1])
            height, width, out_channels = (int(d) for d in layer.output.shape[1:])
            total += kh * kw * in_channels * out_channels * height * width
        elif isinstance(layer, tf.keras.layers.Dense):
            total += int(layer.input.shape[-1]) * layer.units
        elif isinstance(layer, tf.keras.Model):
            total += count_macs(tf, layer)
    return total


def _make_step(tf, spec, model, views, labels, mask):
    """Returns a function running one full training step and returning the loss as a Python float."""
    batch, num_views = spec["batch"], spec["views"]
    xla = spec["xla"] == "on"
    if spec["mode"] in ("nonprivate", "dp"):
        from eqdp_tf.privacy.dp_step import DPKerasSGDOptimizer, DPStep

        optimizer = DPKerasSGDOptimizer(
            l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER, expected_batch_size=batch,
            learning_rate=LEARNING_RATE,
        )
        step = DPStep(model, None, optimizer, view_reduction="sum", dp=spec["mode"] == "dp")
        accumulate = step.compiled_accumulate(jit_compile=xla)
        apply_update = step.compiled_apply(jit_compile=xla)

        def run():
            stats = accumulate(views, labels, mask)
            apply_update()
            return float(stats["loss_sum"])

        return run, [acc.dtype.name for acc in step.accumulators]

    from tensorflow_privacy import VectorizedDPKerasSGDOptimizer

    optimizer = VectorizedDPKerasSGDOptimizer(
        l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER,
        num_microbatches=None if num_views == 1 else batch, learning_rate=LEARNING_RATE,
    )
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=xla)
    flat_views = tf.reshape(views, [batch * num_views, 32, 32, 3])  # example-major
    flat_labels = tf.repeat(labels, num_views)

    def run():
        return float(model.train_on_batch(flat_views, flat_labels))

    return run, [v.dtype.name for v in model.trainable_variables]


def _child_cell(spec):
    tf = _quiet_tensorflow()
    if spec["precision"] == "bf16":
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    tf.keras.utils.set_random_seed(0)
    batch, num_views = spec["batch"], spec["views"]
    model = _build_model(tf, spec["model"])
    views = tf.cast(tf.random.uniform([batch, num_views, 32, 32, 3], 0, 256, dtype=tf.int32), tf.uint8)
    labels = tf.random.uniform([batch], 0, 10, dtype=tf.int64)
    mask = tf.ones([batch], tf.float32)
    run, grad_dtypes = _make_step(tf, spec, model, views, labels, mask)
    rss_before = _peak_rss_bytes()

    budget = spec["budget"]
    total = spec["warmup"] + spec["steps"]
    times = []
    loss = float("nan")
    for i in range(total):
        start = time.perf_counter()
        loss = run()
        times.append(time.perf_counter() - start)
        elapsed = time.perf_counter() - _CHILD_START
        # The first step also traces and compiles, so only later steps predict the rest.
        projected = elapsed + (total - i - 1) * (times[-1] if i >= 1 else 0.0)
        if projected > budget:
            return {
                "status": "skipped", "elapsed_s": elapsed, "first_step_s": times[0],
                "step_s_estimate": times[-1] if i >= 1 else None, "projected_s": projected,
            }
    timed = times[spec["warmup"]:]
    step_s = statistics.median(timed)
    return {
        "status": "ok",
        "step_s": step_s,
        "step_s_all": timed,
        "views_per_s": batch * num_views / step_s,
        "first_step_s": times[0],
        "peak_rss_bytes": _peak_rss_bytes(),
        "rss_before_steps_bytes": rss_before,
        "compute_dtype": tf.keras.mixed_precision.global_policy().compute_dtype,
        "variable_dtypes": sorted(set(grad_dtypes)),
        "final_loss": loss,
        "loadavg": os.getloadavg()[0],
    }


def _matmul_rate(tf, n, dtype, repeats):
    a = tf.random.normal([n, n], dtype=tf.float32)
    b = tf.random.normal([n, n], dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(b, dtype)
    # Summing the product keeps the result small to fetch and costs n^2 next to the n^3 product.
    product = tf.function(lambda: tf.reduce_sum(tf.cast(tf.linalg.matmul(a, b), tf.float32)))
    for _ in range(2):
        product().numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product().numpy()
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times)


_TF_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _child_calibrate(spec):
    """Peak matmul rate(s), the models' MACs per view, and the software versions."""
    tf = _quiet_tensorflow()
    import tensorflow_privacy

    versions = {
        "tf_version": tf.__version__,
        "tfp_version": getattr(tensorflow_privacy, "__version__", "unknown"),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
    }
    peak = {}
    for dtype in ("fp32", "bf16") if spec["bf16"] else ("fp32",):
        try:
            peak[dtype] = _matmul_rate(tf, spec["matmul_n"], getattr(tf, _TF_DTYPES[dtype]), spec["repeats"])
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            peak[f"{dtype}_error"] = harness.one_line(err)
    macs = {}
    for name in spec["models"]:
        try:
            model = _build_model(tf, name)
            macs[name] = {"macs_per_view": count_macs(tf, model), "params": int(model.count_params())}
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            macs[name] = {"error": harness.one_line(err)}
        tf.keras.backend.clear_session()
    return {
        "status": "ok" if "fp32" in peak else "error",
        "error": peak.get("fp32_error", ""),
        "matmul_n": spec["matmul_n"],
        "peak_flops": peak,
        "models": macs,
        **versions,
    }


def _child_pipeline(spec):
    """Views/s of make_train_dataset alone: Poisson sampling, gather and augmult, no model."""
    tf = _quiet_tensorflow()
    from eqdp_tf import data

    start = time.perf_counter()
    images, labels = data.load_cifar10("train", spec["data_dir"])
    load_s = time.perf_counter() - start
    sampler = data.PoissonSampler(
        len(labels), sampling_rate=spec["logical_batch"] / len(labels),
        physical_batch_size=spec["batch"], seed=0,
    )
    dataset = data.make_train_dataset(images, labels, sampler, num_views=spec["views"], seed=0)
    batches = iter(dataset)
    for _ in range(spec["warmup"]):
        next(batches)
    padded = real = 0
    start = time.perf_counter()
    for _ in range(spec["num_batches"]):
        batch = next(batches)
        padded += int(batch["views"].shape[0]) * spec["views"]
        real += int(tf.reduce_sum(batch["mask"]).numpy()) * spec["views"]
    seconds = time.perf_counter() - start
    return {
        "status": "ok", "views_per_s": padded / seconds, "real_views_per_s": real / seconds,
        "load_s": load_s, "peak_rss_bytes": _peak_rss_bytes(),
    }


_CHILDREN = {"cell": _child_cell, "calibrate": _child_calibrate, "pipeline": _child_pipeline}


def _child_main(spec_json):
    return harness.child_main(lambda spec: _CHILDREN[spec["kind"]](spec), spec_json)


# --------------------------------------------------------------------------------------------
# Parent side: the grid, the children, the report


def _available_memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _run_child(spec, timeout, memory_limit=None):
    return harness.run_child(__file__, spec, timeout, memory_limit)


def _csv(text, allowed=None, cast=str, name="value"):
    values = [cast(v.strip()) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{name}: empty list")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")
    return values


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Training-step throughput and peak memory: non-private vs our DP-SGD vs stock TF-Privacy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset",
                        type=lambda s: _csv(s, tuple(MODELS), name="--models"))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset",
                        type=lambda s: _csv(s, MODES, name="--modes"))
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCHES)), help="physical batches B",
                        type=lambda s: _csv(s, cast=_positive_int, name="--batch-sizes"))
    parser.add_argument("--xla", default=",".join(XLA_CHOICES), help="off and/or on (jit_compile)",
                        type=lambda s: _csv(s, XLA_CHOICES, name="--xla"))
    parser.add_argument("--views", type=_positive_int, default=1,
                        help="augmentation views K per example (the paper trains with K=4)")
    parser.add_argument("--steps", type=_positive_int, default=5, help="timed steps per cell (median reported)")
    parser.add_argument("--warmup", type=_positive_int, default=2, help="untimed steps first (the first compiles)")
    parser.add_argument("--budget", type=_positive_int, default=120, help="seconds per cell before it is skipped")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="kill a cell whose resident memory passes this; default 80%% of the memory "
                             "available at start")
    parser.add_argument("--precision", default="fp32", type=lambda s: _csv(s, PRECISIONS, name="--precision"),
                        help="fp32 and/or bf16 (mixed_bfloat16; nonprivate and dp cells only)")
    parser.add_argument("--bf16", action="store_true", help="shorthand for --precision fp32,bf16")
    parser.add_argument("--bf16-batch-sizes", default="64,512", help="physical batches of the bf16 cells",
                        type=lambda s: _csv(s, cast=_positive_int, name="--bf16-batch-sizes"))
    parser.add_argument("--bf16-xla", default="off", help="XLA settings of the bf16 cells",
                        type=lambda s: _csv(s, XLA_CHOICES, name="--bf16-xla"))
    parser.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                        help="skip the input-pipeline measurement (run by default)")
    parser.add_argument("--data-dir", default=CIFAR_DIR, help="CIFAR-10 for the input-pipeline measurement")
    parser.add_argument("--pipeline-batch", type=_positive_int, default=256, help="physical batch of the pipeline run")
    parser.add_argument("--pipeline-views", type=_positive_int, default=4, help="K of the pipeline run")
    parser.add_argument("--matmul-n", type=_positive_int, default=4096, help="size of the peak-FLOPs matmul")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: eq_resnet9_c1, batch 32, all modes, XLA off, 1+3 steps, small calibration")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    parser.add_argument("--write", action="store_true", help="write the report to --out (else only print it)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "BENCHMARKS.md"), help="where --write writes")
    parser.add_argument("--report-from", dest="report_from", default=None,
                        help="rebuild the report from a --json file of an earlier run (measures nothing)")
    parser.add_argument("--json", default=None, help="also save the raw results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_limit_gb is not None and args.memory_limit_gb <= 0:
        parser.error(f"--memory-limit-gb must be > 0, got {args.memory_limit_gb}")
    available = _available_memory_bytes()
    args.memory_limit = args.memory_limit_gb * 1e9 if args.memory_limit_gb else (0.8 * available if available else None)
    if args.bf16:
        args.precision = list(PRECISIONS)
    args.bf16 = "bf16" in args.precision
    if args.quick:
        args.models, args.batch_sizes, args.xla = ["eq_resnet9_c1"], [32], ["off"]
        args.warmup, args.steps, args.matmul_n = 1, 3, 2048
    return args


def make_cells(args):
    """Cells in run order: per model, precision, XLA and mode, batch sizes ascending."""
    cells = []
    for model in args.models:
        for precision in [p for p in PRECISIONS if p in args.precision]:
            # bf16 only asks "does it pay?": a few cells answer it, the full grid would double the run.
            bf16 = precision == "bf16"
            for xla in (args.bf16_xla if bf16 else args.xla):
                for mode in args.modes:
                    if bf16 and mode not in BF16_MODES:
                        continue
                    for batch in sorted(set(args.bf16_batch_sizes if bf16 else args.batch_sizes)):
                        cells.append({"kind": "cell", "model": model, "mode": mode, "precision": precision,
                                      "xla": xla, "batch": batch, "views": args.views})
    return cells


def _series(cell):
    return (cell["model"], cell["mode"], cell["precision"], cell["xla"])


# How a cell's step time and memory grow with the batch: linear, except for the stock TF-Privacy path,
# whose tape.jacobian runs the batched backward pass once per example (batch^2).
_GROWTH_POWER = {"tfp_stock": 2}
# A projected cell is skipped only when clearly over the budget; a near miss still runs (and aborts
# itself if it really is too slow).
_PROJECTION_MARGIN = 1.25
_CHILD_STARTUP_S = 5.0  # importing TensorFlow and building the model


def _projected_skip(args, last_ok, batch, mode):
    """Why the next cell of a series can be skipped from its last finished cell, or None."""
    growth = (batch / last_ok["batch"]) ** _GROWTH_POWER.get(mode, 1)
    seconds = _CHILD_STARTUP_S + (args.warmup + args.steps) * last_ok["step_s"] * growth
    if seconds > _PROJECTION_MARGIN * args.budget:
        return f"over {args.budget}s: ~{seconds:.0f}s projected from batch {last_ok['batch']}"
    if mode in _GROWTH_POWER and args.memory_limit:
        base = last_ok["rss_before_steps_bytes"]
        memory = base + (last_ok["peak_rss_bytes"] - base) * growth
        if memory > args.memory_limit:
            return f"over the memory limit: ~{memory / 1e9:.0f} GB projected from batch {last_ok['batch']}"
    return None


def run_grid(args, cells, log):
    results = []
    too_slow = {}  # series -> (batch, why) where it went over the time budget or the memory limit
    last_ok = {}  # series -> its last finished cell
    for index, cell in enumerate(cells, start=1):
        spec = {**cell, "warmup": args.warmup, "steps": args.steps, "budget": args.budget}
        series = _series(cell)
        first_bad = too_slow.get(series)
        projected = _projected_skip(args, last_ok[series], cell["batch"], cell["mode"]) if series in last_ok else None
        if first_bad is not None:
            result, wall = {"status": "skipped", "after_batch": first_bad[0], "why": first_bad[1]}, 0.0
        elif projected is not None:
            result, wall = {"status": "skipped", "projected": projected}, 0.0
            too_slow[series] = (cell["batch"], "projected " + projected.split(":")[0])
        else:
            result, wall = _run_child(spec, timeout=args.budget + 30, memory_limit=args.memory_limit)
            if result["status"] == "ok":
                last_ok[series] = {**cell, **result}
            elif result["status"] == "skipped":
                too_slow[series] = (cell["batch"], f"over {args.budget}s")
            elif result.get("fatal"):
                too_slow[series] = (cell["batch"], "out of memory")
        result["wall_s"] = wall
        results.append({**cell, **result})
        log(f"[{index}/{len(cells)}] {cell['model']} {cell['mode']} {cell['precision']} xla={cell['xla']} "
            f"B={cell['batch']}: {_cell_text(results[-1], args.budget)} ({wall:.0f}s)")
    return results


def _cell_text(result, budget):
    if result["status"] == "ok":
        return f"{result['views_per_s']:.1f} views/s"
    if result["status"] == "skipped":
        if "projected" in result:
            return f"skipped ({result['projected']})"
        if "after_batch" in result:
            return f"skipped (batch {result['after_batch']} was {result['why']})"
        estimate = result.get("step_s_estimate")
        return f"skipped (>{budget}s" + (f"; ~{estimate:.3g}s/step)" if estimate else ")")
    return f"error: {result['error']}"


# --------------------------------------------------------------------------------------------
# Report


def machine_info():
    info = {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "python": platform.python_version()}
    cpu = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                cpu.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    info["cpu"] = cpu.get("model name", platform.processor() or "unknown")
    if "cpu family" in cpu:
        info["cpu"] += f" (family {cpu['cpu family']}, model {cpu.get('model', '?')})"
    flags = set(cpu.get("flags", "").split())
    info["simd"] = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags)
    try:
        with open("/proc/meminfo") as f:
            total_kib = int(f.readline().split()[1])
        info["memory_gb"] = total_kib * 1024 / 1e9
    except (OSError, ValueError, IndexError):
        info["memory_gb"] = None
    try:
        info["git"] = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        info["git"] += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        info["git"] = "unknown"
    return info


def _fmt_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _us_per_view(r):
    return 1e6 * r["step_s"] / (r["batch"] * r["views"])


OPTIMISATION_LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "optimisation_log.md")


def _verdict(ok):
    return "meets" if ok else "MISSES"


def render(args, machine, calib, pipeline, results, started, wall_s):
    peak_fp32 = calib.get("peak_flops", {}).get("fp32") if calib.get("status") == "ok" else None
    models_info = {k: v for k, v in calib.get("models", {}).items() if "macs_per_view" in v}
    out = ["# Training-step benchmarks", ""]
    command = " ".join(["python", "bench/benchmark.py", *sys.argv[1:]])
    out.append(f"Generated by `{command}` on {started}.")
    out.append("")
    out.append("## Machine")
    out.append("")
    out.append(f"- CPU: {machine['cpu']}; {machine['cores']} cores ({machine['usable_cores']} usable); "
               f"SIMD: {machine['simd'] or 'n/a'}")
    if machine.get("memory_gb"):
        out.append(f"- Memory: {machine['memory_gb']:.1f} GB")
    out.append(f"- TensorFlow {calib.get('tf_version', '?')}, TF-Privacy {calib.get('tfp_version', '?')}, "
               f"Python {machine['python']}, oneDNN opts: {calib.get('onednn', '?')}; project commit {machine['git']}")
    out.append(f"- Load average (1 min) at start / end: {machine['load_start']:.2f} / {machine['load_end']:.2f}"
               " (a shared machine makes every number noisier)")
    if peak_fp32:
        peak = calib["peak_flops"]
        line = f"- Measured peak: {peak_fp32 / 1e9:.0f} GFLOP/s fp32"
        if "bf16" in peak:
            line += f", {peak['bf16'] / 1e9:.0f} GFLOP/s bf16"
        elif "bf16_error" in peak:
            line += f" (bf16 matmul failed: {peak['bf16_error']})"
        out.append(line + f" (median of {calib['matmul_n']}x{calib['matmul_n']} matmuls)")
    else:
        out.append(f"- Peak FLOPs: not measured ({calib.get('error', 'calibration failed')})")
    out.append(f"- Whole run: {wall_s / 60:.1f} min")
    out.append("")

    out.append("## Models")
    out.append("")
    rows = []
    for name in args.models:
        m = models_info.get(name)
        if m:
            rows.append([f"{MODEL_LABELS[name]} (`{name}`)", f"{m['params']:,}", f"{m['macs_per_view'] / 1e6:.1f}",
                         f"{6 * m['macs_per_view'] / 1e9:.2f}"])
    out.append(_fmt_table(["model", "parameters", "forward MMACs/view", "training GFLOP/view (6x MACs)"], rows))
    out.append("")

    out.append(f"## Full training step, K={args.views} view(s) per example")
    out.append("")
    out.append(f"Median of {args.steps} steps after {args.warmup} warm-up steps; batch = physical batch B (examples), "
               f"views/step = B*K. Peak RSS is the whole child process. '% peak' = useful model FLOPs/s over "
               f"the fp32 matmul peak. Budget {args.budget}s per cell"
               + (f", memory limit {args.memory_limit / 1e9:.1f} GB." if args.memory_limit else "."))
    out.append("")
    rows = []
    for r in results:
        label = [MODEL_LABELS[r["model"]], r["mode"], r["precision"], r["xla"], r["batch"], r["batch"] * r["views"]]
        if r["status"] != "ok":
            rows.append(label + [_cell_text(r, args.budget)] + [""] * 5)
            continue
        macs = models_info.get(r["model"], {}).get("macs_per_view")
        frac = f"{100 * r['views_per_s'] * 6 * macs / peak_fp32:.0f}%" if macs and peak_fp32 else "n/a"
        rows.append(label + [f"{r['views_per_s']:.1f}", f"{1e3 * r['step_s']:.0f}", f"{_us_per_view(r):.0f}",
                             f"{r['first_step_s']:.1f}", f"{r['peak_rss_bytes'] / 1e6:.0f}", frac])
    out.append(_fmt_table(["model", "mode", "precision", "XLA", "batch", "views/step", "views/s", "ms/step",
                           "us/view", "1st step s", "peak RSS MB", "% peak"], rows))
    out.append("")

    out.append("## Targets (reported, not asserted)")
    out.append("")
    out += _targets(args, results, models_info, peak_fp32)
    out.append("")

    out.append("## Input pipeline")
    out.append("")
    if pipeline is None:
        out.append("Not measured (--no-pipeline).")
    elif pipeline.get("status") == "ok":
        out.append(f"`make_train_dataset` on CIFAR-10 ({args.data_dir}), Poisson sampling, physical batch "
                   f"{args.pipeline_batch}, K={args.pipeline_views}, no training: "
                   f"**{pipeline['views_per_s']:.0f} views/s** (real views, without padding slots: "
                   f"{pipeline['real_views_per_s']:.0f}/s); loading the arrays took {pipeline['load_s']:.1f}s.")
        ok_rates = [r["views_per_s"] for r in results if r["status"] == "ok"]
        if ok_rates:
            out.append(f"The fastest training cell above runs {max(ok_rates):.0f} views/s, so the pipeline is "
                       f"{pipeline['views_per_s'] / max(ok_rates):.1f}x that (it shares the same cores while "
                       "training).")
    else:
        out.append(f"Failed: {_cell_text(pipeline, args.budget)}")
    out.append("")

    if args.bf16:
        out.append("## mixed_bfloat16")
        out.append("")
        out += _bf16_section(args, results)
        out.append("")
    # Hand-written history of the DP step's optimisation: kept in its own file so --write never loses it.
    if os.path.exists(OPTIMISATION_LOG):
        with open(OPTIMISATION_LOG) as f:
            out.append(f.read().rstrip())
        out.append("")
    return "\n".join(out)


def _index(results):
    return {(r["model"], r["mode"], r["precision"], r["xla"], r["batch"]): r for r in results if r["status"] == "ok"}


def _targets(args, results, models_info, peak_fp32):
    ok = _index(results)
    lines = []
    series = sorted({(r["model"], r["precision"], r["xla"]) for r in results},
                    key=lambda s: (list(MODELS).index(s[0]), s[1], s[2]))

    lines.append(f"**DP step cost per view vs non-private** (us/view ratio, target <= {TARGET_DP_RATIO} "
                 "at every batch >= 64):")
    lines.append("")
    rows = []
    for model, precision, xla in series:
        cells = []
        for b in sorted(set(args.batch_sizes)):
            np_r, dp_r = ok.get((model, "nonprivate", precision, xla, b)), ok.get((model, "dp", precision, xla, b))
            if np_r and dp_r:
                ratio = _us_per_view(dp_r) / _us_per_view(np_r)
                cells.append(f"B={b}: {ratio:.2f}" + (f" {_verdict(ratio <= TARGET_DP_RATIO)}" if b >= 64 else ""))
        if cells:
            rows.append([MODEL_LABELS[model], precision, xla, "; ".join(cells)])
    lines.append(_fmt_table(["model", "precision", "XLA", "dp / nonprivate"], rows) if rows
                 else "Needs both nonprivate and dp cells.")
    lines.append("")

    lines.append(f"**Flat per-view cost** (us/view at B=512 over B=64, target <= {TARGET_FLATNESS}):")
    lines.append("")
    rows = []
    for r in results:
        if r["batch"] != 512:
            continue
        small, big = ok.get(_series(r) + (64,)), ok.get(_series(r) + (512,))
        if small and big:
            ratio = _us_per_view(big) / _us_per_view(small)
            rows.append([MODEL_LABELS[r["model"]], r["mode"], r["precision"], r["xla"],
                         f"{ratio:.2f} {_verdict(ratio <= TARGET_FLATNESS)}"])
    lines.append(_fmt_table(["model", "mode", "precision", "XLA", "512 / 64"], rows) if rows
                 else "Needs cells at both B=64 and B=512.")
    lines.append("")

    lines.append(f"**Non-private step vs fp32 peak** (best batch, target >= {100 * TARGET_PEAK_FRACTION:.0f}%):")
    lines.append("")
    rows = []
    for model, precision, xla in series:
        candidates = [r for r in results if r["status"] == "ok" and r["mode"] == "nonprivate"
                      and (r["model"], r["precision"], r["xla"]) == (model, precision, xla)]
        macs = models_info.get(model, {}).get("macs_per_view")
        if candidates and macs and peak_fp32:
            best = max(candidates, key=lambda r: r["views_per_s"])
            frac = best["views_per_s"] * 6 * macs / peak_fp32
            gflops = best["views_per_s"] * 6 * macs / 1e9
            rows.append([MODEL_LABELS[model], precision, xla, best["batch"], f"{gflops:.0f}",
                         f"{100 * frac:.0f}% {_verdict(frac >= TARGET_PEAK_FRACTION)}"])
    lines.append(_fmt_table(["model", "precision", "XLA", "batch", "GFLOP/s", "of fp32 peak"], rows) if rows
                 else "Needs nonprivate cells and the peak measurement.")
    lines.append("")

    lines.append(f"**Peak memory at {TARGET_VIEWS_PER_BATCH} views per physical batch** "
                 f"(target < {TARGET_MEMORY_BYTES / 1e9:.0f} GB):")
    lines.append("")
    rows = [[MODEL_LABELS[r["model"]], r["mode"], r["precision"], r["xla"],
             f"{r['peak_rss_bytes'] / 1e9:.2f} GB {_verdict(r['peak_rss_bytes'] < TARGET_MEMORY_BYTES)}"]
            for r in results if r["status"] == "ok" and r["batch"] * r["views"] == TARGET_VIEWS_PER_BATCH]
    lines.append(_fmt_table(["model", "mode", "precision", "XLA", "peak RSS"], rows) if rows
                 else f"No cell with B*K = {TARGET_VIEWS_PER_BATCH} ran.")
    return lines


def _bf16_section(args, results):
    ok = _index(results)
    lines = ["Global policy mixed_bfloat16 set before building the model; the 'variables' column lists the dtypes of "
             "the variables the gradients, clipping, noise and accumulators are made for (should be float32 only).", ""]
    rows = []
    for r in results:
        if r["precision"] != "bf16":
            continue
        if r["status"] != "ok":
            rows.append([MODEL_LABELS[r["model"]], r["mode"], r["xla"], r["batch"], _cell_text(r, args.budget), "", ""])
            continue
        fp32 = ok.get((r["model"], r["mode"], "fp32", r["xla"], r["batch"]))
        speedup = f"{r['views_per_s'] / fp32['views_per_s']:.2f}x" if fp32 else "n/a"
        rows.append([MODEL_LABELS[r["model"]], r["mode"], r["xla"], r["batch"], f"runs, {r['views_per_s']:.1f} views/s",
                     speedup, ",".join(r.get("variable_dtypes", []))])
    lines.append(_fmt_table(["model", "mode", "XLA", "batch", "bf16", "vs fp32", "variables"], rows))
    return lines


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child is not None:
        return _child_main(args.child)
    if args.report_from:
        return _report_from(args)
    cells = make_cells(args)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    if args.dry_run:
        for cell in cells:
            print(f"{cell['model']} {cell['mode']} {cell['precision']} xla={cell['xla']} B={cell['batch']} "
                  f"K={cell['views']}")
        print(f"{len(cells)} cells; at most {len(cells) * (args.budget + 30) / 60:.0f} min at the per-cell limit")
        return 0

    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    run_start = time.perf_counter()
    machine = machine_info()
    machine["load_start"] = os.getloadavg()[0]
    limit = f"{args.memory_limit / 1e9:.1f} GB" if args.memory_limit else "no memory limit"
    log(f"{len(cells)} cells, {args.budget}s and {limit} each; calibrating (peak matmul, MACs per view) ...")
    calib, _ = _run_child({"kind": "calibrate", "models": args.models, "bf16": args.bf16,
                           "matmul_n": args.matmul_n, "repeats": 3 if args.quick else 7},
                          timeout=600, memory_limit=args.memory_limit)
    if calib.get("status") == "ok":
        log(f"  fp32 peak {calib['peak_flops']['fp32'] / 1e9:.0f} GFLOP/s")
    else:
        log(f"  calibration failed: {_cell_text(calib, 600)}")
    pipeline = None
    if args.pipeline:
        log("input pipeline ...")
        pipeline, _ = _run_child({"kind": "pipeline", "data_dir": args.data_dir, "batch": args.pipeline_batch,
                                  "views": args.pipeline_views, "logical_batch": 4096, "warmup": 10,
                                  "num_batches": 40 if args.quick else 200},
                                 timeout=args.budget + 30, memory_limit=args.memory_limit)
        log(f"  {_cell_text(pipeline, args.budget)}")
    results = run_grid(args, cells, log)
    machine["load_end"] = os.getloadavg()[0]
    wall_s = time.perf_counter() - run_start
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "calibration": calib, "pipeline": pipeline, "cells": results,
                       "started": started, "wall_s": wall_s,
                       "args": {k: v for k, v in vars(args).items() if k not in ("child", "report_from")}}, f,
                      indent=1)
    _emit(args, render(args, machine, calib, pipeline, results, started, wall_s))
    return 0


def _emit(args, report):
    print(report)
    if args.write:
        with open(args.out, "w") as f:
            f.write(report + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


def _report_from(args):
    """Rebuilds the report from a --json file of an earlier run, without measuring anything."""
    with open(args.report_from) as f:
        saved = json.load(f)
    if "started" not in saved:
        sys.exit(f"error: {args.report_from} has no 'started'/'wall_s' (written by an older version); rerun the grid")
    measured = argparse.Namespace(**{**saved["args"], "write": args.write, "out": args.out})
    _emit(args, render(measured, saved["machine"], saved["calibration"], saved["pipeline"], saved["cells"],
                       saved["started"], saved["wall_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
