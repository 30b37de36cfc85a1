"""Throughput and peak memory of one full training step (issue 7). Plain script: no speed asserts anywhere.

    python bench/benchmark.py --quick                    # smoke test: C1 ResNet-9, batch 32, XLA off
    python bench/benchmark.py                            # the full grid below; prints the table
    python bench/benchmark.py --write                    # ... and writes it to BENCHMARKS.md
    python bench/benchmark.py --models eq_resnet9_c1,wrn16_4 --batch-sizes 64,512 --xla on --bf16
    python bench/benchmark.py --dry-run                  # list the cells that would run
    python bench/benchmark.py --json grid.json ...       # also keep the raw results, then later:
    python bench/benchmark.py --report-from grid.json    # rebuild the report without measuring

Parts: this file is the command line and the grid; ``benchmark_cells.py`` the measurements (each in a child
process, through ``harness.py``); ``benchmark_report.py`` the report; ``machine.py`` what it ran on.

One cell = (model, mode, precision, XLA, physical batch B). Modes:

- ``nonprivate``: ``DPStep(..., dp=False)``: one batched gradient of the masked summed loss (the
  ``--dp=false`` path of train.py).
- ``dp``: ``DPStep(..., dp=True)``: per-example gradient norms (ghost norms where they pay, see
  ``eqdp_tf/privacy/clipped_sum.py``), the clipped sum, accumulation and noise.
- ``dp_materialise`` (only when asked for in ``--modes``): the same step with every layer's per-example
  gradients materialised, as the engine did before ghost norms; for before/after in one run.
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
import sys
import time

import harness  # bench/harness.py: the child-process protocol shared by the bench scripts
from benchmark_cells import (BF16_MODES, CHILDREN, CIFAR_DIR, DEFAULT_BATCHES, DEFAULT_MODELS, DEFAULT_MODES, MODELS,
                             MODES, PRECISIONS, REPO_ROOT, XLA_CHOICES, series_key)
from benchmark_report import cell_text, render
from machine import machine_info


# --------------------------------------------------------------------------------------------
# The child processes


def _child_main(spec_json):
    return harness.child_main(lambda spec: CHILDREN[spec["kind"]](spec), spec_json)


# --------------------------------------------------------------------------------------------
# The grid


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
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)}",
                        type=lambda s: _csv(s, tuple(MODELS), name="--models"))
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma-separated subset of {','.join(MODES)}",
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
    parser.add_argument("--registry-from", dest="registry_from", default=None,
                        help="a `bench/fast_clipping.py --json` file: its table becomes the report's section on "
                             "TF-Privacy's DPModel with our layer registry (measured apart: a process per path)")
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
        series = series_key(cell)
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
            f"B={cell['batch']}: {cell_text(results[-1], args.budget)} ({wall:.0f}s)")
    return results


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
        log(f"  calibration failed: {cell_text(calib, 600)}")
    pipeline = None
    if args.pipeline:
        log("input pipeline ...")
        pipeline, _ = _run_child({"kind": "pipeline", "data_dir": args.data_dir, "batch": args.pipeline_batch,
                                  "views": args.pipeline_views, "logical_batch": 4096, "warmup": 10,
                                  "num_batches": 40 if args.quick else 200},
                                 timeout=args.budget + 30, memory_limit=args.memory_limit)
        log(f"  {cell_text(pipeline, args.budget)}")
    results = run_grid(args, cells, log)
    machine["load_end"] = os.getloadavg()[0]
    wall_s = time.perf_counter() - run_start
    command = _command_line(argv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "calibration": calib, "pipeline": pipeline, "cells": results,
                       "started": started, "wall_s": wall_s, "command": command,
                       "args": {k: v for k, v in vars(args).items() if k not in ("child", "report_from")}}, f,
                      indent=1)
    _emit(args, render(args, machine, calib, pipeline, results, started, wall_s, command))
    return 0


def _command_line(argv):
    return " ".join(["python", "bench/benchmark.py", *(sys.argv[1:] if argv is None else argv)])


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
    measured = argparse.Namespace(**{**saved["args"], "write": args.write, "out": args.out,
                                     "registry_from": args.registry_from or saved["args"].get("registry_from")})
    _emit(args, render(measured, saved["machine"], saved["calibration"], saved["pipeline"], saved["cells"],
                       saved["started"], saved["wall_s"], saved.get("command"),
                       rebuilt_by=f"python bench/benchmark.py --report-from {args.report_from}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
