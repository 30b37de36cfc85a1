"""A study run's committed record: what is kept of a finished run, how it is read back and summarised."""

import json
import os
import shutil
import sys
import time

from machine import machine_info  # bench/machine.py (bench/ is on the path when run as a script)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_DIR = os.path.join(REPO_ROOT, "docs", "study")
# Where the reports' generated blocks go: the manual's results page holds the studies' tables and findings, the
# README the headline table, built from the same records.
RESULTS_PAGE = os.path.join(REPO_ROOT, "docs", "results.md")
README = os.path.join(REPO_ROOT, "README.md")
RECORDS_DIR = os.path.join(STUDY_DIR, "runs")
# The paper-regime (TAN-simulated) batch keeps its records and report apart from the first study's.
TAN_DIR = os.path.join(STUDY_DIR, "paper_regime")
TAN_RECORDS_DIR = os.path.join(TAN_DIR, "runs")
DEFAULT_DATA_DIR = os.path.join(REPO_ROOT, "..", "shared", "data", "cifar10", "cifar-10-batches-bin")
RECORD_FILES = ("config.json", "privacy.json", "metrics.jsonl")
# One line per `run` invocation that trained (a resumed run may span machines). Optional: records made
# before 2026-12-01 do not have it, and the report says so rather than guessing.
MACHINE_FILE = "machine.jsonl"


def machine_note_path(output_dir):
    # Beside the run folder, not in it: train.py starts only in an empty folder or one holding its own run.
    return os.path.normpath(output_dir) + "." + MACHINE_FILE


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def note_machine(output_dir):
    """Appends this machine (and the project commit) to the run's machine note before it trains or resumes."""
    os.makedirs(os.path.dirname(machine_note_path(output_dir)), exist_ok=True)
    line = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **machine_info()}
    with open(machine_note_path(output_dir), "a") as f:
        f.write(json.dumps(line) + "\n")


def keep_records(name, output_dir):
    """Copies the small, committed record of a finished run into docs/study/runs/ or .../paper_regime/runs/."""
    target = os.path.join(TAN_RECORDS_DIR if name.startswith("tan_") else RECORDS_DIR, name)
    os.makedirs(target, exist_ok=True)
    for filename in RECORD_FILES:
        shutil.copyfile(os.path.join(output_dir, filename), os.path.join(target, filename))
    if os.path.isfile(machine_note_path(output_dir)):
        shutil.copyfile(machine_note_path(output_dir), os.path.join(target, MACHINE_FILE))


def load_records(records_dir=RECORDS_DIR):
    records = {}
    if not os.path.isdir(records_dir):
        return records
    for name in sorted(os.listdir(records_dir)):
        folder = os.path.join(records_dir, name)
        if not all(os.path.isfile(os.path.join(folder, f)) for f in RECORD_FILES):
            continue
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(folder, "privacy.json")) as f:
            privacy = json.load(f)
        metrics = read_jsonl(os.path.join(folder, "metrics.jsonl"))
        machine_path = os.path.join(folder, MACHINE_FILE)
        machines = read_jsonl(machine_path) if os.path.isfile(machine_path) else []
        records[name] = {"config": config, "privacy": privacy, "metrics": metrics, "machines": machines}
    return records


# What a run recorded before issue 38 trained: the dense variant (its config.json has none of these keys).
LEGACY_MODEL = {"model_variant": "dense", "conv_basis": "dense", "conv_weight_standardization": False,
                "norm_group_rule": "closest", "ema_updates_per_step": 1}
# The official model's ingredients, and the suffix of a run that reverts one of them (study_plan.ABLATIONS).
OFFICIAL_INGREDIENTS = {"conv_weight_standardization": (True, "no_ws"), "norm_group_rule": ("official", "gn_per_field"),
                        "conv_basis": ("steerable", "dense_basis"), "ema_updates_per_step": (16, "ema1")}


def _model_key(config):
    if config["architecture"] == "wrn16_4":
        # Runs recorded before the flag existed trained plain convs.
        return "wrn16_4_ws" if config.get("wrn_weight_standardization", False) else "wrn16_4"
    config = {**LEGACY_MODEL, **config}
    group, restrict = config["group"].lower(), config["restrict"].lower()
    key = "cnn_c1" if group == "c1" else f"eq_{group}" + ("" if restrict == "none" else restrict)
    if config["model_variant"] != "official":
        return key
    reverted = [suffix for name, (value, suffix) in OFFICIAL_INGREDIENTS.items() if config[name] != value]
    return "_".join([key, "official"] + reverted)


def _parameter_count(config, cache={}):
    # Runs recorded before the flag existed trained WRN-16-4 without weight standardisation.
    standardised = config["architecture"] == "wrn16_4" and config.get("wrn_weight_standardization", False)
    model = {**LEGACY_MODEL, **config}
    variant = (model["model_variant"], model["conv_basis"], model["conv_weight_standardization"],
               model["norm_group_rule"])
    key = (config["architecture"], config["group"], config["restrict"], config["head"], standardised, variant)
    if key not in cache:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        sys.path.insert(0, REPO_ROOT)
        from eqdp_tf import models

        from eqdp_tf.models.names import restricted_group

        restrict = restricted_group(config["restrict"])
        extra = {"weight_standardization": standardised} if config["architecture"] == "wrn16_4" else dict(
            variant=variant[0], basis=variant[1], weight_standardization=variant[2], norm_rule=variant[3])
        cache[key] = models.build_model(config["architecture"], group=config["group"], restrict=restrict,
                                        head=config["head"], **extra).count_params()
    return cache[key]


def _run_seconds(metrics_line):
    """Wall time of the whole run at this evaluation (records before run_wall_seconds existed: of the process)."""
    return metrics_line.get("run_wall_seconds", metrics_line.get("wall_seconds", 0.0))


def summarise(name, record):
    config, privacy, metrics = record["config"], record["privacy"], record["metrics"]
    last = metrics[-1]
    # views/s over the whole run: each record's rate covers the steps since the previous record.
    seconds, views, previous = 0.0, 0.0, 0
    for line in metrics:
        steps = line["step"] - previous
        previous = line["step"]
        rate = line.get("views_per_sec") or 0.0
        if rate > 0 and steps > 0:
            batch_views = steps * config["batch_size"] * config["num_views"]
            views += batch_views
            seconds += batch_views / rate
    private = bool(config["dp"])
    return {
        "name": name,
        "model": _model_key(config),
        "parameters": _parameter_count(config),
        "epsilon": privacy.get("epsilon") if private else None,
        "noise_multiplier": privacy.get("noise_multiplier") if private else None,
        "steps": last["step"],
        "batch": config["batch_size"],
        "views": last["step"] * config["batch_size"] * config["num_views"],
        "views_per_sec": views / seconds if seconds else None,
        "test_accuracy": last["test_accuracy"],
        "wall_minutes": _run_seconds(last) / 60,
        "curve": [(_run_seconds(line) / 60, line["test_accuracy"]) for line in metrics],
    }
