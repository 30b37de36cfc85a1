"""The results study's records and report (bench/study.py): the README table is what the committed records say."""

import importlib.util
import json
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", os.path.join(REPO_ROOT, "bench", "study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(dp=True, steps=(40, 80), rates=(100.0, 50.0), batch=1024):
    config = {"architecture": "eq_resnet9", "group": "C1", "restrict": "none", "head": "paper", "dp": dp,
              "batch_size": batch, "num_views": 1}
    metrics = [{"step": s, "views_per_sec": r, "test_accuracy": 0.1 * i, "wall_seconds": 60.0 * i}
               for i, (s, r) in enumerate(zip(steps, rates), start=1)]
    return {"config": config, "privacy": {"epsilon": 7.5, "noise_multiplier": 0.6}, "metrics": metrics}


def test_summary_weights_each_record_rate_by_its_views(study):
    row = study.summarise("x", _record())
    # 40 steps at 100 views/s and 40 at 50: 81,920 views over 409.6 s + 819.2 s.
    assert row["views_per_sec"] == pytest.approx(2 * 40 * 1024 / (40 * 1024 / 100 + 40 * 1024 / 50))
    assert row["views"] == 80 * 1024
    assert row["epsilon"] == 7.5 and row["noise_multiplier"] == 0.6
    assert row["test_accuracy"] == pytest.approx(0.2) and row["wall_minutes"] == pytest.approx(2.0)


def test_non_private_run_reports_no_epsilon(study):
    row = study.summarise("x", _record(dp=False))
    assert row["epsilon"] is None and row["noise_multiplier"] is None
    assert "∞" in study._table([row])


def test_every_study_run_shares_the_view_budget(study):
    budgets = set()
    for runs in study.BATCHES.values():
        for name in runs:
            flags = dict(f[2:].split("=", 1) for f in study.run_flags(name))
            budgets.add((flags["steps"], flags["batch_size"], flags["num_views"]))
    assert len(budgets) == 1


def test_readme_table_matches_committed_records(study):
    records = study.load_records()
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = f.read()
    start, end = study.README_MARKERS
    block = readme.split(start, 1)[1].split(end, 1)[0].strip()
    # A table without the records behind it could not be regenerated (e.g. records left out of a commit).
    assert records or not block, f"README has a study table but {study.RECORDS_DIR} holds no run records"
    rows = [study.summarise(name, record) for name, record in records.items()]
    rows.sort(key=study.row_order)
    assert block == study._table(rows), "README study table is stale: run python bench/study.py report"
    for name, record in records.items():
        # Every committed run finished its budget, and its privacy.json is the run's final one.
        steps = int(dict(f[2:].split("=", 1) for f in study.run_flags(name))["steps"])
        assert record["metrics"][-1]["step"] == steps
        if record["config"]["dp"]:
            assert record["privacy"]["epsilon"] <= float(record["config"]["target_epsilon"]) + 1e-9
            json.dumps(record["privacy"])
