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


def _tan_record(name, model="cnn_c1", epsilon=8.0, batch=256, accuracy=0.6, steps=2160):
    config = {"architecture": "eq_resnet9" if model != "wrn16_4" else "wrn16_4",
              "group": "C1" if model != "eq_d4d2" else "D4", "restrict": "none" if model != "eq_d4d2" else "D2",
              "head": "paper", "dp": True, "batch_size": batch, "num_views": 1, "steps": steps,
              "simulated_batch_size": 8192}
    metrics = [{"step": s, "views_per_sec": 300.0, "test_accuracy": accuracy * s / steps, "wall_seconds": s}
               for s in (steps // 2, steps)]
    simulated = None if epsilon is None else epsilon
    privacy = {"epsilon": None if epsilon is None else 600.0, "noise_multiplier": 0.0 if epsilon is None else 0.15,
               "simulated_run": {"epsilon": simulated, "noise_multiplier": 0.0 if epsilon is None else 4.9,
                                 "batch_size": 8192}}
    return {"config": config, "privacy": privacy, "metrics": metrics}


def test_paper_regime_findings_follow_the_records(study):
    records = {
        "tan_cnn_c1_eps8": _tan_record("a", accuracy=0.60),
        "tan_cnn_c1_eps8_b128": _tan_record("b", batch=128, accuracy=0.595),
        "tan_cnn_c1_eps8_b512": _tan_record("c", batch=512, accuracy=0.605),
        "tan_eq_d4d2_eps8": _tan_record("d", model="eq_d4d2", accuracy=0.64),
        "tan_eq_d4d2_sigma0": _tan_record("e", model="eq_d4d2", epsilon=None, accuracy=0.70),
        "tan_eq_d4d2_eps2": _tan_record("f", model="eq_d4d2", epsilon=2, accuracy=0.58),
    }
    rows = sorted((study.summarise_tan(n, r) for n, r in records.items()), key=study.tan_row_order)
    text = study.tan_findings(rows)
    assert "at simulated ε = 2 only the equivariant model has run so far (58.0%)" in text  # no pair, no verdict
    assert "the three agree within 1.5 points" in text
    assert "one run with one seed; the scaling check's runs, which TAN says should agree, spread over 1.0 points" \
        in text  # 59.5 / 60.0 / 60.5
    assert "at simulated ε = 8 the equivariant model beat the ordinary CNN, 64.0% against 60.0% (+4.0 points)" \
        in text
    assert "70.0% without noise against 64.0% at ε = 8 (6.0 points)" in text
    assert "`tan_cnn_c1_eps2`" in text and "Not run yet" in text  # missing runs are named, not hidden
    table = study._tan_table(rows)
    assert "| tan_eq_d4d2_sigma0 |" in table and "∞ (σ = 0)" in table
    # the flipped outcome is worded from the records too
    records["tan_eq_d4d2_eps8"] = _tan_record("d", model="eq_d4d2", accuracy=0.55)
    records["tan_cnn_c1_eps8_b512"] = _tan_record("c", batch=512, accuracy=0.63)
    rows = [study.summarise_tan(n, r) for n, r in records.items()]
    text = study.tan_findings(rows)
    assert "lost to the ordinary CNN, 55.0% against 60.0% (-5.0 points)" in text
    assert "differ by 3.5 points" in text


def test_readme_paper_regime_table_matches_committed_records(study):
    records = study.load_records(study.TAN_RECORDS_DIR)
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = f.read()
    blocks = []
    for start, end in (study.TAN_TABLE_MARKERS, study.TAN_FINDINGS_MARKERS):
        blocks.append(readme.split(start, 1)[1].split(end, 1)[0].strip())
    assert records or not any(blocks), f"README has paper-regime results but {study.TAN_RECORDS_DIR} has no records"
    if not records:
        return
    rows = sorted((study.summarise_tan(n, r) for n, r in records.items()), key=study.tan_row_order)
    assert blocks[0] == study._tan_table(rows), "README paper-regime table is stale: run python bench/study.py report"
    assert blocks[1] == study.tan_findings(rows), "README findings are stale: run python bench/study.py report"
    for name, record in records.items():
        assert record["metrics"][-1]["step"] == 2160
        simulated = record["privacy"]["simulated_run"]
        assert simulated["batch_size"] == 8192
        if record["config"].get("target_epsilon") is not None:
            assert simulated["epsilon"] <= float(record["config"]["target_epsilon"]) + 1e-9


def test_paper_regime_runs_share_steps_and_simulated_batch(study):
    budgets = set()
    for runs in study.TAN_BATCHES.values():
        for name in runs:
            flags = dict(f[2:].split("=", 1) for f in study.run_flags(name))
            assert flags["simulated_batch_size"] == "8192" and flags["steps"] == "2160"
            if "_b" not in name:  # the scaling check varies the batch on purpose
                budgets.add((flags["batch_size"], flags["num_views"]))
    assert budgets == {("256", "1")}
