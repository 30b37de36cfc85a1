"""The results studies' runs, records and reports (bench/study*.py): the tables of the results page (docs/results.md)
and README's headline table are what the committed records say."""

import importlib
import json
import os
import re
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_module(name):
    bench = os.path.join(REPO_ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)  # as when run as a script: bench/ modules import their siblings
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def study_plan():
    return _bench_module("study_plan")


@pytest.fixture(scope="module")
def study_records():
    return _bench_module("study_records")


@pytest.fixture(scope="module")
def study_report():
    return _bench_module("study_report")


@pytest.fixture(scope="module")
def study_tan_report():
    return _bench_module("study_tan_report")


@pytest.fixture(scope="module")
def study_tan_tables():
    return _bench_module("study_tan_tables")


def _record(dp=True, steps=(40, 80), rates=(100.0, 50.0), batch=1024):
    config = {"architecture": "eq_resnet9", "group": "C1", "restrict": "none", "head": "paper", "dp": dp,
              "batch_size": batch, "num_views": 1}
    metrics = [{"step": s, "views_per_sec": r, "test_accuracy": 0.1 * i, "wall_seconds": 60.0 * i}
               for i, (s, r) in enumerate(zip(steps, rates), start=1)]
    return {"config": config, "privacy": {"epsilon": 7.5, "noise_multiplier": 0.6}, "metrics": metrics}


def test_summary_weights_each_record_rate_by_its_views(study_records):
    row = study_records.summarise("x", _record())
    # 40 steps at 100 views/s and 40 at 50: 81,920 views over 409.6 s + 819.2 s.
    assert row["views_per_sec"] == pytest.approx(2 * 40 * 1024 / (40 * 1024 / 100 + 40 * 1024 / 50))
    assert row["views"] == 80 * 1024
    assert row["epsilon"] == 7.5 and row["noise_multiplier"] == 0.6
    assert row["test_accuracy"] == pytest.approx(0.2) and row["wall_minutes"] == pytest.approx(2.0)


def test_non_private_run_reports_no_epsilon(study_records, study_report):
    row = study_records.summarise("x", _record(dp=False))
    assert row["epsilon"] is None and row["noise_multiplier"] is None
    assert "∞" in study_report._table([row])


def test_every_study_run_shares_the_view_budget(study_plan):
    budgets = set()
    for runs in study_plan.BATCHES.values():
        for name in runs:
            flags = dict(f[2:].split("=", 1) for f in study_plan.run_flags(name))
            budgets.add((flags["steps"], flags["batch_size"], flags["num_views"]))
    assert len(budgets) == 1


def test_results_page_table_matches_committed_records(study_plan, study_records, study_report):
    records = study_records.load_records()
    block = study_report.read_block(study_records.RESULTS_PAGE, study_report.TABLE_MARKERS)
    assert block is not None, f"{study_records.RESULTS_PAGE} lost its {study_report.TABLE_MARKERS} markers"
    # A table without the records behind it could not be regenerated (e.g. records left out of a commit).
    assert records or not block, f"the results page has a study table but {study_records.RECORDS_DIR} is empty"
    rows = [study_records.summarise(name, record) for name, record in records.items()]
    rows.sort(key=study_report.row_order)
    assert block == study_report._table(rows), "the first study's table is stale: run python bench/study.py report"
    for name, record in records.items():
        # Every committed run finished its budget, and its privacy.json is the run's final one.
        steps = int(dict(f[2:].split("=", 1) for f in study_plan.run_flags(name))["steps"])
        assert record["metrics"][-1]["step"] == steps
        if record["config"]["dp"]:
            assert record["privacy"]["epsilon"] <= float(record["config"]["target_epsilon"]) + 1e-9
            json.dumps(record["privacy"])


PAPER = dict(learning_rate=2.0, l2_norm_clip=2.0, ema_decay=0.999, steps=2160)
TAN_WRN = dict(learning_rate=4.0, l2_norm_clip=1.0, ema_decay=0.9999, steps=2500)


def _tan_record(model="cnn_c1", epsilon=8.0, batch=256, accuracy=0.6, views=1, seed=None, recipe=PAPER,
                simulated_batch=8192):
    """A finished run's record; its accuracy rises linearly over ten evaluations to ``accuracy``."""
    steps = recipe["steps"]
    config = {"architecture": "wrn16_4" if model.startswith("wrn16_4") else "eq_resnet9",
              "group": {"eq_d4d2": "D4", "eq_c4": "C4"}.get(model, "C1"),
              "restrict": "D2" if model == "eq_d4d2" else "none", "head": "paper", "dp": True, "batch_size": batch,
              "num_views": views, "simulated_batch_size": simulated_batch, "seed": seed or 0, "dp_seed": seed,
              **recipe}
    if model.startswith("wrn16_4"):
        config["wrn_weight_standardization"] = model == "wrn16_4_ws"
    metrics = [{"step": steps * i // 10, "views_per_sec": 300.0, "test_accuracy": accuracy * i / 10,
                "wall_seconds": i} for i in range(1, 11)]
    privacy = {"epsilon": None if epsilon is None else 600.0, "noise_multiplier": 0.0 if epsilon is None else 0.15,
               "simulated_run": {"epsilon": epsilon, "noise_multiplier": 0.0 if epsilon is None else 4.9,
                                 "batch_size": simulated_batch}}
    return {"config": config, "privacy": privacy, "metrics": metrics}


OFFICIAL = {"model_variant": "official", "conv_basis": "steerable", "conv_weight_standardization": True,
            "norm_group_rule": "official", "ema_updates_per_step": 16}


def _official_record(model, **kwargs):
    record = _tan_record(model, **kwargs)
    record["config"].update(OFFICIAL)
    return record


def _build(study_tan_report, records, step_times=None):
    return study_tan_report.build(records, step_times or {})


def _configs(study_tan_report, study_tan_tables, records):
    rows = [study_tan_report.summarise_tan(n, r) for n, r in records.items()]
    return study_tan_tables.configurations(rows)


def test_repeats_with_other_seeds_merge_into_one_configuration(study_tan_report, study_tan_tables):
    records = {"tan_cnn_c1_eps8": _tan_record(accuracy=0.760),
               "tan_cnn_c1_eps8_s1": _tan_record(accuracy=0.762, seed=1),
               "tan_cnn_c1_eps8_s2": _tan_record(accuracy=0.771, seed=2),
               "tan_cnn_c1_eps8_b64": _tan_record(batch=64, accuracy=0.70),
               "tan_cnn_c1_k4_eps8_b64": _tan_record(batch=64, views=4, accuracy=0.75)}
    configs = _configs(study_tan_report, study_tan_tables, records)
    assert len(configs) == 3  # the seeds merge; another batch or K is another configuration
    three = configs[("cnn_c1", "paper", 8, 256, 1)]
    assert three["n"] == 3 and three["runs"] == ["tan_cnn_c1_eps8", "tan_cnn_c1_eps8_s1", "tan_cnn_c1_eps8_s2"]
    assert three["mean"] == pytest.approx((76.0 + 76.2 + 77.1) / 3) and (three["min"], three["max"]) == pytest.approx((76.0, 77.1))
    assert three["curve"][-1] == (2160, pytest.approx(three["mean"]))
    table = study_tan_tables.configurations_table(configs)
    assert "| 3 | 76.4% | 76.0–77.1 | tan_cnn_c1_eps8, tan_cnn_c1_eps8_s1, tan_cnn_c1_eps8_s2 |" in table
    assert "| 2160 × 64 × 4 | 1 | 75.0% | – |" in table


def test_a_margin_is_beyond_chance_only_past_the_larger_seed_spread(study_tan_report, study_tan_tables):
    records = {"tan_cnn_c1_eps8": _tan_record(accuracy=0.760),
               "tan_cnn_c1_eps8_s1": _tan_record(accuracy=0.770, seed=1),
               "tan_eq_d4d2_eps8": _tan_record("eq_d4d2", accuracy=0.790),
               "tan_eq_d4d2_eps8_s1": _tan_record("eq_d4d2", accuracy=0.790, seed=1),
               "tan_cnn_c1_eps1": _tan_record(epsilon=1, accuracy=0.55),
               "tan_cnn_c1_eps1_s1": _tan_record(epsilon=1, accuracy=0.57, seed=1),
               "tan_eq_d4d2_eps1": _tan_record("eq_d4d2", epsilon=1, accuracy=0.575),
               "tan_cnn_c1_eps2": _tan_record(epsilon=2, accuracy=0.66),
               "tan_eq_d4d2_eps2": _tan_record("eq_d4d2", epsilon=2, accuracy=0.68)}
    comps = {c["what"]: c for c in study_tan_tables.comparisons(_configs(study_tan_report, study_tan_tables,
                                                                           records))}
    eps8, eps1, eps2 = (comps[f"equivariant vs ordinary CNN, simulated ε = {e}"] for e in (8, 1, 2))
    assert (eps8["delta"], eps8["spread"], eps8["beyond"]) == (2.5, pytest.approx(1.0), True)
    assert (eps1["delta"], eps1["spread"], eps1["beyond"]) == (1.5, pytest.approx(2.0), False)
    assert (eps2["delta"], eps2["spread"], eps2["beyond"]) == (2.0, None, None)
    table = study_tan_tables.comparisons_table(list(comps.values()))
    assert "| equivariant vs ordinary CNN, simulated ε = 8 | 79.0% (2) | 76.5% (2) | +2.5 | 1.0 | yes |" in table
    assert "| 57.5% (1) | 56.0% (2) | +1.5 | 2.0 (one side's seeds) | no |" in table
    assert "| +2.0 | one seed each | – |" in table
    text, findings = _build(study_tan_report, records)[:2]
    assert ("at simulated ε = 8 it beats the ordinary CNN by 2.5 points (beyond the seed spread of 1.0); at "
            "simulated ε = 2 it beats the ordinary CNN by 2.0 points (one seed each, so chance cannot be told apart); "
            "at simulated ε = 1 it beats the ordinary CNN by 1.5 points (within the seed spread of 2.0, seen on one "
            "side's seeds only)") in findings


def test_every_number_in_the_findings_is_in_the_tables(study_tan_report):
    records = {"tan_cnn_c1_eps8": _tan_record(accuracy=0.760), "tan_cnn_c1_eps8_s1": _tan_record(accuracy=0.77, seed=1),
               "tan_eq_d4d2_eps8": _tan_record("eq_d4d2", accuracy=0.793),
               "tan_eq_d4d2_k4_eps8_b64": _tan_record("eq_d4d2", batch=64, views=4, accuracy=0.776),
               "tan_eq_d4d2_eps8_b64": _tan_record("eq_d4d2", batch=64, accuracy=0.779),
               "tan_wrn16_4_ws_tan_b128": _tan_record("wrn16_4_ws", epsilon=7.1, batch=128, accuracy=0.70,
                                                      recipe=TAN_WRN, simulated_batch=4096)}
    times = {m: {"seconds_per_view": s, "macs_per_view": 1e8, "batch": 128, "cpu": "X", "started": "today"}
             for m, s in (("eq_d4d2", 0.012), ("cnn_c1", 0.003), ("wrn16_4_ws", 0.02))}
    tables_text, findings = _build(study_tan_report, records, times)[:2]
    numbers = set(re.findall(r"\d+\.\d", tables_text))
    for number in re.findall(r"\d+\.\d", findings):
        assert number in numbers, f"{number} in the findings is in no table"


def test_the_fair_wrn_is_compared_the_untuned_one_only_listed(study_tan_report, study_tan_tables):
    records = {"tan_eq_d4d2_eps8": _tan_record("eq_d4d2", accuracy=0.79),
               "tan_cnn_c1_eps8": _tan_record(accuracy=0.76),
               "tan_wrn16_4_eps8_b64": _tan_record("wrn16_4", batch=64, accuracy=0.558)}
    configs = _configs(study_tan_report, study_tan_tables, records)
    assert configs[("wrn16_4", "paper", 8, 64, 1)]["untuned"]
    assert not any("WRN" in c["what"] for c in study_tan_tables.comparisons(configs))
    tables_text, findings = _build(study_tan_report, records)[:2]
    assert "untuned for WRN: no sentence rests on it" in tables_text
    assert "55.8" not in findings and "has not finished yet" in findings

    records["tan_wrn16_4_ws_tan_b128"] = _tan_record("wrn16_4_ws", epsilon=7.1, batch=128, accuracy=0.70,
                                                     recipe=TAN_WRN, simulated_batch=4096)
    configs = _configs(study_tan_report, study_tan_tables, records)
    fair = study_tan_tables.fair_wrn_key(configs)
    assert fair == ("wrn16_4_ws", "lr 4, C = 1, EMA 0.9999, 2500 steps", 7, 128, 1)
    comps = {c["what"]: c for c in study_tan_tables.comparisons(configs)}
    assert comps["Equivariant ResNet-9 (D4→D2), dense variant (ε 8) vs WRN-16-4 with its authors' recipe"]["delta"] == 9.0
    findings = _build(study_tan_report, records)[1]
    assert "reached 70.0%: the dense equivariant model at simulated ε = 8 beats it by 9.0 points" in findings
    assert "55.8" not in findings


def test_time_to_accuracy_reads_the_curves_and_the_side_by_side_step_times(study_tan_report, study_tan_tables):
    records = {"tan_eq_d4d2_eps8": _tan_record("eq_d4d2", accuracy=0.80),
               "tan_wrn16_4_ws_tan_b128": _tan_record("wrn16_4_ws", epsilon=7.1, batch=128, accuracy=0.60,
                                                      recipe=TAN_WRN, simulated_batch=4096)}
    configs = _configs(study_tan_report, study_tan_tables, records)
    times = {"eq_d4d2": {"seconds_per_view": 0.01, "nonprivate_seconds_per_view": 0.008, "macs_per_view": 3e8,
                         "batch": 128, "cpu": "X", "started": "t"},
             "wrn16_4_ws": {"seconds_per_view": 0.02, "nonprivate_seconds_per_view": 0.01, "macs_per_view": 4e8,
                            "batch": 128, "cpu": "X", "started": "t"}}
    rows, target = study_tan_tables.time_to_accuracy(configs, times)
    assert target == pytest.approx(60.0)
    eq, wrn = rows
    # linear curves: 25% of the steps -> 25% of the final accuracy (interpolated between evaluations)
    assert eq["accuracy"] == [pytest.approx(20.0), pytest.approx(40.0), pytest.approx(80.0)]
    assert eq["reach_step"] == pytest.approx(0.75 * 2160) and wrn["reach_step"] == 2500
    assert eq["reach_hours"] == pytest.approx(0.75 * 2160 * 8192 * 0.01 / 3600)
    assert wrn["reach_hours"] == pytest.approx(2500 * 4096 * 0.02 / 3600)
    assert eq["reach_hours_nonprivate_step"] == pytest.approx(0.75 * 2160 * 8192 * 0.008 / 3600)
    assert wrn["reach_hours_nonprivate_step"] == pytest.approx(2500 * 4096 * 0.01 / 3600)
    findings = study_tan_report.findings(configs, study_tan_tables.comparisons(configs), [], rows, target)
    saving = 100 * (1 - eq["reach_hours"] / wrn["reach_hours"])
    assert f"({saving:.0f}% less)" in findings
    # 29 h against 28 h: at non-private step costs the equivariant model needs more here, and the findings say so
    plain = (eq["reach_hours_nonprivate_step"], wrn["reach_hours_nonprivate_step"])
    assert f"{plain[0]:.0f} against {plain[1]:.0f} CPU-hours ({100 * (plain[0] / plain[1] - 1):.0f}% more)" in findings
    table = study_tan_tables.time_table(rows, target)
    assert "| 8.0 ms |" in table and f"| {plain[0]:.0f} h |" in table

    # Step times measured without the non-private step: that column stays empty and no sentence rests on it.
    for model in times:
        times[model]["nonprivate_seconds_per_view"] = None
    rows, target = study_tan_tables.time_to_accuracy(configs, times)
    findings = study_tan_report.findings(configs, study_tan_tables.comparisons(configs), [], rows, target)
    assert "non-private step time" not in findings


def test_round4_findings_set_the_official_model_against_the_fair_wrn_and_give_its_compute(study_tan_report,
                                                                                          study_tan_tables):
    records = {"tan_off_eq_d4d2_eps8": _official_record("eq_d4d2", accuracy=0.80),
               "tan_wrn16_4_ws_tan_b128": _tan_record("wrn16_4_ws", epsilon=7.1, batch=128, accuracy=0.60,
                                                      recipe=TAN_WRN, simulated_batch=4096)}
    times = {"eq_d4d2_official": {"seconds_per_view": 0.01, "macs_per_view": 2e8, "batch": 128, "cpu": "X",
                                  "started": "t"},
             "wrn16_4_ws": {"seconds_per_view": 0.02, "macs_per_view": 4e8, "batch": 128, "cpu": "X",
                            "started": "t"}}
    findings = _build(study_tan_report, records, times)[1]
    assert ("Against WRN-16-4 with its authors' recipe (trained here, 60.0%), the official model at simulated "
            "ε = 8 beats it by 20.0 points") in findings
    hours = (0.75 * 2160 * 8192 * 0.01 / 3600, 2500 * 4096 * 0.02 / 3600)  # 60% reached at 75% of its steps
    assert (f"takes the official model {hours[0]:.0f} CPU-hours at full scale against WRN-16-4's {hours[1]:.0f} "
            f"({100 * (1 - hours[0] / hours[1]):.0f}% less; the paper claims more than 85% less)") in findings
    # without the official model's step time, no compute sentence about it
    del times["eq_d4d2_official"]
    assert "**Its compute**" not in _build(study_tan_report, records, times)[1]


def test_headline_table_shows_each_model_per_simulated_epsilon_with_its_seed_spread(study_tan_report,
                                                                                    study_tan_tables):
    records = {"tan_eq_d4d2_eps8": _tan_record("eq_d4d2", accuracy=0.790),
               "tan_eq_d4d2_eps8_s1": _tan_record("eq_d4d2", accuracy=0.794, seed=1),
               "tan_eq_d4d2_eps1": _tan_record("eq_d4d2", epsilon=1, accuracy=0.56),
               "tan_cnn_c1_eps8": _tan_record(accuracy=0.76),
               "tan_cnn_c1_sigma0": _tan_record(epsilon=None, accuracy=0.78),
               "tan_off_eq_d4d2_eps8": _official_record("eq_d4d2", accuracy=0.81),
               "tan_off_eq_d4d2_eps2": _official_record("eq_d4d2", epsilon=2, accuracy=0.70),
               # another batch: in the full tables only
               "tan_eq_d4d2_eps8_b64": _tan_record("eq_d4d2", batch=64, accuracy=0.70),
               "tan_wrn16_4_ws_tan_b128": _tan_record("wrn16_4_ws", epsilon=7.1, batch=128, accuracy=0.73,
                                                      recipe=TAN_WRN, simulated_batch=4096)}
    headline = _build(study_tan_report, records).headline
    rows = [line for line in headline.splitlines() if line.startswith("| ")][1:]
    assert rows == [
        "| Official Equivariant ResNet-9 (D4→D2) | 255,675 | 81.0% (1 seed) | 70.0% (1 seed) | – | – |",
        "| Equivariant ResNet-9 (D4→D2), dense variant | 287,413 | 79.2% (79.0–79.4, 2 seeds) | – | 56.0% (1 seed) | – |",
        "| ResNet-9, trivial group (ordinary CNN), dense variant | 229,784 | 76.0% (1 seed) | – | – | 78.0% (1 seed) |",
        "| WRN-16-4 (weight-standardised), its authors' recipe | 2,753,402 | 73.0% (1 seed) at ε = 7.10 "
        "| – | – | – |"]
    assert "TAN-simulated" in headline and "B = 128 standing for 4096" in headline


def test_results_page_and_readme_match_committed_paper_regime_records(study_records, study_report, study_tan_report,
                                                                      study_tan_tables):
    records = study_records.load_records(study_records.TAN_RECORDS_DIR)
    assert records, f"{study_records.TAN_RECORDS_DIR} has no records"
    report = study_tan_report.build(records, study_tan_tables.load_step_times(study_records.TAN_DIR))
    stale = "is stale: run python bench/study.py report"
    for path, markers, generated, what in (
            (study_records.RESULTS_PAGE, study_tan_report.TAN_TABLE_MARKERS, report.tables, "paper-regime tables"),
            (study_records.RESULTS_PAGE, study_tan_report.TAN_FINDINGS_MARKERS, report.findings, "findings"),
            (study_records.README, study_tan_report.HEADLINE_MARKERS, report.headline, "headline table")):
        block = study_report.read_block(path, markers)
        assert block is not None, f"{path} lost its {markers} markers"
        assert block == generated, f"{os.path.basename(path)}'s {what} {stale}"
    for name, record in records.items():
        config, simulated = record["config"], record["privacy"]["simulated_run"]
        assert record["metrics"][-1]["step"] == config["steps"]
        assert simulated["batch_size"] == config["simulated_batch_size"]
        if config.get("target_epsilon") is not None:
            assert simulated["epsilon"] <= float(config["target_epsilon"]) + 1e-9


def test_round4_takes_every_run_once_a_d4d2_and_a_c1_run_in_turn(study_plan):
    # A session fits one official D4->D2 run and one official C1 run: `run round4` alternates them.
    batches = [name for batch in study_plan.ROUND4_ORDER for name in study_plan.TAN_BATCHES[batch]]
    order = study_plan.ROUND4_RUNS
    assert sorted(order) == sorted(batches) and len(order) == 20
    assert order[:4] == ("tan_off_eq_d4d2_eps8", "tan_off_cnn_c1_eps8", "tan_off_eq_d4d2_eps8_s1",
                         "tan_off_cnn_c1_eps8_s1")
    cnn = [i for i, name in enumerate(order) if "_cnn_" in name]
    assert cnn == list(range(1, 2 * len(cnn), 2))  # every other run while C1 runs remain
    eq = [name for name in order if "_eq_" in name]
    assert eq == [name for name in batches if "_eq_" in name]  # the order among the D4->D2 runs


def test_paper_regime_runs_share_steps_and_simulated_batch(study_plan):
    views_per_step = set()
    for batch, runs in study_plan.TAN_BATCHES.items():
        for name in runs:
            flags = study_plan.run_flags(name)
            names = [f.split("=", 1)[0] for f in flags]
            assert len(names) == len(set(names)), f"{name} sets a flag twice"
            flags = dict(f[2:].split("=", 1) for f in flags)
            if batch in study_plan.TAN_RECIPE_BATCHES:  # WRN-16-4 with its authors' (TAN's) recipe
                assert (flags["simulated_batch_size"], flags["steps"], flags["noise_multiplier"]) == ("4096", "2500",
                                                                                                      "3")
                continue
            assert flags["simulated_batch_size"] == "8192" and flags["steps"] == "2160"
            # the scaling checks (and WRN-16-4, too slow here for B = 256) are at other batches on purpose
            if flags["num_views"] != "1" or "_b" not in name:
                views_per_step.add(int(flags["batch_size"]) * int(flags["num_views"]))
    assert views_per_step == {256}  # equal views per run, the K = 4 runs included


def test_each_run_records_its_machines_and_the_report_names_them(study_records, study_tan_report, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    for filename in study_records.RECORD_FILES:
        (out / filename).write_text("{}\n" if filename != "metrics.jsonl" else '{"step": 1}\n')
    # A run resumed on a second machine keeps both.
    for cpu, simd in (("AMD EPYC 7B13 64-Core Processor (family 25, model 1)", "avx2 fma"),
                      ("Intel(R) Xeon(R) Processor (family 6, model 143)", "avx2 fma avx512f amx_tile")):
        monkeypatch.setattr(study_records, "machine_info",
                            lambda cpu=cpu, simd=simd: {"cpu": cpu, "cores": 2, "simd": simd})
        study_records.note_machine(str(out))
    # nothing lands in the run folder itself: train.py refuses a folder holding files that are not its run's
    assert sorted(os.listdir(out)) == sorted(study_records.RECORD_FILES)
    monkeypatch.setattr(study_records, "TAN_RECORDS_DIR", str(tmp_path / "records"))
    study_records.keep_records("tan_x", str(out))
    machines = study_records.load_records(str(tmp_path / "records"))["tan_x"]["machines"]
    assert [m["simd"] for m in machines] == ["avx2 fma", "avx2 fma avx512f amx_tile"]
    assert study_tan_report.machine_label("tan_x", machines) == \
        "AMD EPYC 7B13 64-Core, 2 cores + Intel Xeon, 2 cores (AVX-512, AMX)"
    assert study_tan_report.machine_label("tan_never_noted", []) == "not recorded"  # no guessing for old records
    recorded = _tan_record()
    recorded["machines"] = machines[1:]
    results = _build(study_tan_report, {"tan_cnn_c1_eps8": recorded})[2]
    assert "| Intel Xeon, 2 cores (AVX-512, AMX) | 60.0% |" in results


def test_not_yet_run_lists_what_the_plan_has_and_the_records_lack(study_plan, study_tan_report):
    findings = _build(study_tan_report, {"tan_cnn_c1_eps8": _tan_record()})[1]
    not_run = next(p for p in findings.split("\n\n") if p.startswith("Not run yet"))
    assert "`tan_cnn_c1_eps8`" not in not_run and "`tan_wrn16_4_ws_tan_b128`" in not_run
    assert "`tan_eq_d4d2_eps8_s1`" in not_run and "tan_off_" not in not_run  # round 4 has its own list
    records = {"tan_off_eq_d4d2_eps8": _official_record("eq_d4d2", accuracy=0.8)}
    round4 = next(p for p in _build(study_tan_report, records)[1].split("\n\n") if p.startswith("Round 4, not"))
    assert "(19 of 20;" in round4 and "`tan_off_eq_d4d2_eps8`" not in round4
    assert round4.index("`tan_off_cnn_c1_eps8`") < round4.index("`tan_off_eq_d4d2_eps8_s1`")  # the order it runs


def test_a_wrn_record_counts_the_parameters_of_the_model_it_trained(study_records):
    # Records from before --wrn_weight_standardization trained plain convs; newer ones say which they trained.
    old = {"architecture": "wrn16_4", "group": "C1", "restrict": "none", "head": "paper"}
    assert study_records._parameter_count(old) == 2_748_890
    assert study_records._parameter_count(dict(old, wrn_weight_standardization=True)) == 2_753_402
    assert study_records._parameter_count(dict(old, wrn_weight_standardization=False)) == 2_748_890


def test_round4_official_models_ablations_and_their_comparisons(study_tan_report, study_tan_tables):
    """Round 4 (issue 39): official runs are models of their own, an ablation is named by what it reverts, and the
    comparisons pair them with the official ordinary CNN, their dense variants and the ablated model."""
    no_ws = _official_record("eq_d4d2", accuracy=0.78)
    no_ws["config"]["conv_weight_standardization"] = False
    records = {"tan_eq_d4d2_eps8": _tan_record("eq_d4d2", accuracy=0.79),  # dense: its config has no variant keys
               "tan_off_eq_d4d2_eps8": _official_record("eq_d4d2", accuracy=0.81),
               "tan_off_eq_d4d2_eps8_s1": _official_record("eq_d4d2", accuracy=0.80, seed=1),
               "tan_off_cnn_c1_eps8": _official_record("cnn_c1", accuracy=0.77),
               "tan_off_eq_d4d2_no_ws_eps8": no_ws}
    configs = _configs(study_tan_report, study_tan_tables, records)
    assert {key[0] for key in configs} == {"eq_d4d2", "eq_d4d2_official", "cnn_c1_official",
                                           "eq_d4d2_official_no_ws"}
    assert configs[("eq_d4d2_official", "paper", 8, 256, 1)]["n"] == 2
    comps = {c["what"]: c for c in study_tan_tables.comparisons(configs)}
    assert comps["official: equivariant vs ordinary CNN, simulated ε = 8"]["delta"] == 3.5  # 80.5 - 77.0
    assert comps["Official Equivariant ResNet-9 (D4→D2) vs its dense variant, ε 8"]["delta"] == 1.5
    ablation = comps["ablation: official D4→D2 vs Official D4→D2 without weight standardisation, ε 8"]
    assert ablation["delta"] == 2.5 and ablation["one_sided"]
    tables_text = _build(study_tan_report, records)[0]
    assert "Official D4→D2 without weight standardisation" in tables_text
    findings = _build(study_tan_report, records)[1]
    assert "**Round 4, the official model**" in findings and "80.5% at simulated ε = 8 (2 seeds, 80.0–81.0)" in findings
    assert "short of De et al. 2022's 81.4% (WRN-40-4)" in findings
    assert "ε = 8: 80.5% against 78.74% (+1.8)" in findings
    assert "at simulated ε = 8 it beats the official ordinary CNN by 3.5 points" in findings
    assert "The largest: Official D4→D2 without weight standardisation." in findings
    numbers = set(re.findall(r"\d+\.\d", tables_text))
    for number in re.findall(r"\d+\.\d", findings):
        assert number in numbers, f"{number} in the findings is in no table"


def test_round4_plots_draw_the_official_models_and_leave_the_ablations_to_the_tables(study_tan_report,
                                                                                     study_tan_tables, monkeypatch):
    no_ws = _official_record("eq_d4d2", accuracy=0.78)
    no_ws["config"]["conv_weight_standardization"] = False
    records = {"tan_eq_d4d2_eps8": _tan_record("eq_d4d2", accuracy=0.79),
               "tan_off_eq_d4d2_eps8": _official_record("eq_d4d2", accuracy=0.81),
               "tan_off_eq_d4d2_eps1": _official_record("eq_d4d2", epsilon=1.0, accuracy=0.6),
               "tan_off_cnn_c1_eps8": _official_record("cnn_c1", accuracy=0.77),
               "tan_off_eq_d4d2_no_ws_eps8": no_ws}
    drawn = {}

    def legend_only(plt, fig, ax, xlabel, title, filename):  # the labels drawn, instead of a file in docs/
        drawn[filename] = ax.get_legend_handles_labels()[1]
        plt.close(fig)
        return filename

    monkeypatch.setattr(study_tan_report, "_save", legend_only)
    study_tan_report._plot(_configs(study_tan_report, study_tan_tables, records))
    curves = " | ".join(drawn["accuracy_vs_step.png"])
    assert "Official Equivariant ResNet-9 (D4→D2)" in curves and "without weight standardisation" not in curves
    assert len(drawn["accuracy_vs_step.png"]) == 3  # dense D4->D2, official D4->D2, official C1
    by_epsilon = drawn["accuracy_vs_epsilon.png"]
    assert len(by_epsilon) == 3 and any(label.startswith("Official Equivariant") for label in by_epsilon)
