"""The results studies: equivariant vs ordinary CNN under DP-SGD on real CIFAR-10, on this machine.

    python bench/study.py list                    # the runs of every batch and their flags
    python bench/study.py run eps8                # train one batch of runs (resumable: rerun to continue)
    python bench/study.py run tan                 # the paper's regime, TAN-simulated, batch by batch
    python bench/study.py run round4              # its round 4 (the official model, issue 39) only, one
                                                  # D4->D2 run and one C1 run in turn (a session's worth)
    python bench/study.py report                  # tables, findings and plots from the committed records only

Parts: this file is the command line and the runner; ``study_plan.py`` the runs and their flags;
``study_records.py`` what a finished run leaves in ``docs/study/`` and its summary; ``study_report.py`` the first
study's report and the output helpers; ``study_tan_tables.py`` the paper regime's tables and
``study_tan_report.py`` its report; ``study_run_notes.py`` what the records cannot say, set by hand.

The first study (issue 6): every run 160 steps at logical batch 1024, K = 1, the same views per run (~3.3 epochs).
The paper's regime (issues 12, 26): 2160 steps at the paper's sigma/B, each run at a small batch standing for the
paper's (``train.py --simulated_batch_size``), seeds, K = 4 views and a fairly trained WRN-16-4; records in
``docs/study/paper_regime/``. Each finished run's ``config.json``, ``privacy.json``, ``metrics.jsonl`` and
``machine.jsonl`` (the CPU of each invocation that trained it) are copied into the records; ``report`` reads only
those (and the side-by-side step times beside them) and rewrites each study's ``RESULTS.md`` and plots, the tables in
``docs/results.md`` and README's headline table.
"""

import argparse
import os
import subprocess
import sys
import time

# bench/ is on the path when this runs as a script; the study's parts sit beside it.
from study_plan import BATCHES, ROUND4_RUNS, TAN_BATCHES, TAN_ORDER, batch_runs, run_flags
from study_records import (DEFAULT_DATA_DIR, RECORDS_DIR, REPO_ROOT, TAN_RECORDS_DIR, keep_records, load_records,
                           note_machine, read_jsonl)
from study_report import report_first_study
from study_tan_report import report_paper_regime


def _finished(output_dir, steps):
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return False
    lines = read_jsonl(path)
    return bool(lines) and lines[-1]["step"] >= steps


def _steps(flags):
    return int(next(f.split("=", 1)[1] for f in flags if f.startswith("--steps=")))


def _recorded(name, steps):
    """True when a finished run's records are committed: a fresh machine (no run folders) must not train it again."""
    return _finished(os.path.join(TAN_RECORDS_DIR if name.startswith("tan_") else RECORDS_DIR, name), steps)


def run_batch(batch, runs_dir, data_dir):
    if batch in ("tan", "round4"):
        for each in TAN_ORDER if batch == "tan" else ROUND4_RUNS:
            run_batch(each, runs_dir, data_dir)
        return
    all_runs = {name for runs in {**BATCHES, **TAN_BATCHES}.values() for name in runs}
    if batch not in BATCHES and batch not in TAN_BATCHES and batch not in all_runs:
        sys.exit(f"error: unknown batch or run {batch!r}; choose one of "
                 f"{', '.join([*BATCHES, *TAN_BATCHES, 'tan'])} or a run name from 'list'")
    if not os.path.isdir(data_dir):
        sys.exit(f"error: CIFAR-10 data folder {data_dir} not found; pass --data-dir")
    for name in ([batch] if batch in all_runs else batch_runs(batch)):
        flags = run_flags(name)
        out = os.path.join(runs_dir, name)
        if _recorded(name, _steps(flags)) and not os.path.isdir(out):
            print(f"[{name}] already recorded in docs/study/")
            continue
        if _finished(out, _steps(flags)):
            print(f"[{name}] already finished in {out}")
        else:
            command = [sys.executable, os.path.join(REPO_ROOT, "train.py"), *flags,
                       f"--data_dir={data_dir}", f"--output_dir={out}"]
            print(f"[{name}] {' '.join(command)}", flush=True)
            note_machine(out)
            started = time.time()
            code = subprocess.call(command, cwd=REPO_ROOT)
            if code:
                sys.exit(f"error: run {name} failed with exit code {code}; rerun the same command to resume it")
            print(f"[{name}] finished in {(time.time() - started) / 60:.1f} min", flush=True)
        keep_records(name, out)


def report():
    report_first_study()
    tan_records = load_records(TAN_RECORDS_DIR)
    if tan_records:
        report_paper_regime(tan_records)
    else:
        print(f"no paper-regime records in {TAN_RECORDS_DIR} yet")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show the batches, runs and flags")
    run = sub.add_parser("run", help="train one batch of runs (resumable)")
    run.add_argument("batch", help="a batch of runs (see 'list'), one run by name, 'tan': every paper-regime "
                                   "batch in order, or 'round4': round 4's runs, an official D4->D2 and an "
                                   "official C1 in turn")
    run.add_argument("--runs-dir", default=os.path.join(REPO_ROOT, "runs", "study"),
                     help="where the full run folders go (checkpoints; not committed)")
    run.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with cifar-10-batches-bin")
    sub.add_parser("report", help="table and plots from docs/study/runs")
    args = parser.parse_args(argv)
    if args.command == "list":
        for batch, runs in {**BATCHES, **TAN_BATCHES}.items():
            print(f"{batch}:")
            for name in runs:
                print(f"  {name}: {' '.join(run_flags(name))}")
    elif args.command == "run":
        run_batch(args.batch, args.runs_dir, os.path.abspath(args.data_dir))
    else:
        report()


if __name__ == "__main__":
    main()
