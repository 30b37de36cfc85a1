"""The paper-regime report (TAN simulation): the tables of ``study_tan_tables.py``, a short findings paragraph whose
every number is in those tables, the per-run table and two plots; written to RESULTS.md, the results page of the
manual (tables and findings) and the README (the headline table)."""

import collections
import os

from study_plan import MODEL_LABELS, PAPER_BATCH, ROUND4_RUNS, TAN_BATCH, TAN_BATCHES
from study_records import README, RESULTS_PAGE, STUDY_DIR, TAN_DIR, summarise
from study_report import PUBLISHED, markdown, save_plot, update_block, write_results
from study_run_notes import MACHINE_FROM_SESSION_LOG, SHARED_CPU
import study_tan_tables as tables

TAN_TABLE_MARKERS = ("<!-- paper-regime-table -->", "<!-- /paper-regime-table -->")
TAN_FINDINGS_MARKERS = ("<!-- paper-regime-findings -->", "<!-- /paper-regime-findings -->")
HEADLINE_MARKERS = ("<!-- headline-results -->", "<!-- /headline-results -->")  # in README
PAPER_RECIPE_TEXT = (f"2160 steps, SGD lr 2 without momentum, C = 2, EMA 0.999, B = {TAN_BATCH} standing for "
                     f"{PAPER_BATCH}")
# What build() writes: the tables and findings (results page), the headline (README), RESULTS.md, and the
# configurations the plots are drawn from.
Report = collections.namedtuple("Report", "tables findings results configs headline")
TIMING_COMMAND = ("python bench/benchmark.py --models eq_resnet9_d4d2_official,eq_resnet9_c1_official,"
                  "eq_resnet9_d4d2,eq_resnet9_c1,wrn16_4 --modes nonprivate,dp --batch-sizes 128 --xla off "
                  f"--no-pipeline --json docs/study/paper_regime/{tables.STEP_TIMES_FILE}")


def machine_label(name, machines):
    """A short CPU name: what the run's machine.jsonl says, else the session log's, else "not recorded"."""
    if not machines:
        known = MACHINE_FROM_SESSION_LOG.get(name)
        return "not recorded" if known is None else f"{known} (from the session log)"
    labels = []
    for machine in machines:
        cpu = machine["cpu"].split(" (family")[0]
        for noise in ("(R)", "(TM)", " Processor", " CPU"):
            cpu = cpu.replace(noise, "")
        simd = machine["simd"].split()
        units = [unit for flag, unit in (("avx512f", "AVX-512"), ("amx_tile", "AMX")) if flag in simd]
        label = f"{cpu.split(' @')[0].strip()}, {machine['cores']} cores" + (f" ({', '.join(units)})" if units else "")
        labels += [label] if label not in labels else []
    return " + ".join(labels)


def summarise_tan(name, record):
    """One run's row: its summary plus what the paper-regime tables group and compare by."""
    config, privacy = record["config"], record["privacy"]
    simulated = privacy.get("simulated_run", {})
    return {**summarise(name, record), "simulated_epsilon": simulated.get("epsilon"),
            "simulated_batch": simulated.get("batch_size"), "own_epsilon": privacy.get("epsilon"),
            "step_curve": [(line["step"], line["test_accuracy"]) for line in record["metrics"]],
            "num_views": int(config["num_views"]), "recipe": tables.recipe(config),
            "seed": (config.get("seed", 0), config.get("dp_seed")), "cpu": machine_label(name, record.get("machines"))}


def _verdict(c):
    if c["beyond"] is None:
        return "one seed each, so chance cannot be told apart"
    return (f"{'beyond' if c['beyond'] else 'within'} the seed spread of {c['spread']:.1f}"
            + (", seen on one side's seeds only" if c["one_sided"] else ""))


def _lead(c, other):
    verb = "beats" if c["delta"] > 0 else "trails" if c["delta"] < 0 else "matches"
    return f"{verb} {other}" + (f" by {abs(c['delta']):.1f} points" if c["delta"] else "") + f" ({_verdict(c)})"


def findings(configs, comps, published_rows, time_rows, target):
    """A few sentences worded from the tables only: whatever the numbers say, said plainly."""
    by_what = {c["what"]: c for c in comps}
    paragraphs = []
    parts = [f"at simulated ε = {eps} it {_lead(by_what[what], 'the ordinary CNN')}" for eps in (8, 2, 1)
             for what in [f"equivariant vs ordinary CNN, simulated ε = {eps}"] if what in by_what]
    if parts:
        paragraphs.append("**Equivariant (D4→D2) vs ordinary CNN, dense variants**, trained alike: " + "; ".join(parts)
                          + ".")
    fair = tables.fair_wrn_key(configs)
    if fair is None:
        paragraphs.append("**WRN-16-4 with its authors' recipe** has not finished yet, so the study does not yet say "
                          "whether the equivariant model beats a fair WRN-16-4; the WRN-16-4 run with the paper's "
                          "optimiser is untuned for it and no conclusion rests on it.")
    else:
        c = by_what.get(f"{MODEL_LABELS['eq_d4d2']} (ε 8) vs WRN-16-4 with its authors' recipe")
        eps = configs[fair]["simulated_epsilon"]
        budget = ("" if round(eps, 1) == 8 else f" Its recipe's σ and steps give simulated ε = {eps:.2f} by our "
                  f"accountant, {'a stricter' if eps < 8 else 'a looser'} budget than the 8 it is compared at.")
        paragraphs.append(f"**WRN-16-4 with its authors' recipe** ({tables.label(fair)}) reached "
                          f"{configs[fair]['mean']:.1f}%" + ("." if c is None else
                                                            f": the dense equivariant model at simulated ε = 8 "
                                                            f"{_lead(c, 'it')}.") + budget)
    k4 = [c for c in comps if c["what"].startswith("K = 4 vs K = 1")]
    if k4:
        paragraphs.append("**The paper's K = 4 views** against K = 1 at the same B = 64: " + "; ".join(
            f"{MODEL_LABELS[c['subject']]} {c['delta']:+.1f} points ({_verdict(c)})" for c in k4) + ".")
    if published_rows:
        by_eps = {}
        for who, model, eps, acc, best, d in published_rows:
            by_eps.setdefault(eps, (best, []))[1].append(
                f"{abs(d):.1f} points {'above' if d > 0 else 'below'} {who} ({model}, {acc:.1f}%)")
        paragraphs.append("**Against the published state of the art** (TAN-simulated against full-scale private "
                          "runs): " + "; ".join(
                              f"our best at simulated ε = {eps}, {best['mean']:.1f}% ({tables.label(best['key'])}), "
                              f"is " + ", ".join(texts) for eps, (best, texts) in sorted(by_eps.items(),
                                                                                       reverse=True)) + ".")
    reach = {r["key"][0]: r for r in time_rows if r["reach_hours"] is not None}
    if fair is not None and "eq_d4d2" in reach and fair[0] in reach:
        eq, wrn = reach["eq_d4d2"], reach[fair[0]]
        plain = [r["reach_hours_nonprivate_step"] for r in (eq, wrn)]
        paragraphs.append("**Compute** (DP-step time per view measured side by side on one CPU): "
                          + _reach_text(target, "the dense equivariant model", eq["reach_hours"], wrn["reach_hours"])
                          + (f"; the dense ordinary CNN, {reach['cnn_c1']['reach_hours']:.0f}" if "cnn_c1" in reach
                             else "")
                          + ". The paper claims more than 85% less."
                          + ("" if None in plain else
                             f" At each model's non-private step time (without what our DP step adds to each "
                             f"model), {plain[0]:.0f} against {plain[1]:.0f} CPU-hours ({_saving(*plain)})."))
    paragraphs += round4_findings(configs, by_what, fair, reach, target)
    return "\n\n".join(paragraphs)


def round4_findings(configs, by_what, fair=None, reach=None, target=None):
    """Round 4 (issue 39), from the tables: the official model against the state of the art, the fair WRN-16-4 and
    the ordinary CNN trained alike, what each of its ingredients brings, and its compute (``fair``: the fair
    WRN-16-4's key; ``reach``: the compute table's rows by model that reach its final accuracy ``target``)."""
    eq = "eq_d4d2_official"
    paragraphs = []
    headline = configs.get((eq, tables.PAPER_RECIPE, 8, TAN_BATCH, 1))
    if headline is not None:
        sota = [(who, model, acc) for who, model, eps, acc in PUBLISHED if eps == 8 and model != "WRN-16-4"]
        paragraphs.append(
            f"**Round 4, the official model** (the official code's D4→D2 Equivariant ResNet-9, TAN-simulated): "
            f"{headline['mean']:.1f}% at simulated ε = 8 ({headline['n']} seed{'s' if headline['n'] > 1 else ''}"
            + (f", {headline['min']:.1f}–{headline['max']:.1f}" if headline["n"] > 1 else "") + "), "
            + ", ".join(f"{'reaching' if headline['mean'] >= acc else 'short of'} {who}'s {acc:.1f}% ({model})"
                        for who, model, acc in sota) + ".")
    reproduction = [(eps, acc) for who, model, eps, acc in PUBLISHED if model == "WRN-16-4"]
    against = [f"ε = {eps}: {c['mean']:.1f}% against {acc:.2f}% ({tables._points(c['mean'], acc):+.1f})"
               for eps, acc in reproduction for c in [configs.get((eq, tables.PAPER_RECIPE, eps, TAN_BATCH, 1))] if c]
    if against:
        paragraphs.append("Against De et al.'s WRN-16-4 recipe as re-run by Bao & Bindschaedler (full scale, "
                          "3 seeds): " + "; ".join(against) + ".")
    wrn = by_what.get(f"{MODEL_LABELS[eq]} (ε 8) vs WRN-16-4 with its authors' recipe")
    if wrn is not None:
        paragraphs.append(f"Against WRN-16-4 with its authors' recipe (trained here, {wrn['b']['mean']:.1f}%), the "
                          f"official model at simulated ε = 8 {_lead(wrn, 'it')}.")
    versus = [f"at simulated ε = {eps} it {_lead(c, 'the official ordinary CNN')}" for eps in (8, 2, 1)
              for c in [by_what.get(f"official: equivariant vs ordinary CNN, simulated ε = {eps}")] if c]
    if versus:
        paragraphs.append("Trained alike (the same basis, standardisation, norm rule and EMA over the trivial "
                          "group), the official equivariant model: " + "; ".join(versus) + ".")
    ablations = sorted((c for what, c in by_what.items() if what.startswith("ablation: ")),
                       key=lambda c: -abs(c["delta"]))
    if ablations:
        paragraphs.append("**Which ingredient matters** (the official D4→D2 at simulated ε = 8 minus the same model "
                          "with one ingredient reverted; one seed each unless said): " + "; ".join(
                              f"{MODEL_LABELS[c['b']['key'][0]]}: {c['delta']:+.1f} points ({_verdict(c)})"
                              for c in ablations) + f". The largest: {MODEL_LABELS[ablations[0]['b']['key'][0]]}.")
    reach = reach or {}
    if eq in reach and fair is not None and fair[0] in reach:
        paragraphs.append("**Its compute**: " + _reach_text(target, "the official model", reach[eq]["reach_hours"],
                                                            reach[fair[0]]["reach_hours"],
                                                            aside="; the paper claims more than 85% less") + ".")
    return paragraphs


def _reach_text(target, model, ours, theirs, aside=""):
    """The compute sentence both rounds word alike (``aside`` goes inside its parenthesis, after the saving)."""
    return (f"reaching the fair WRN-16-4's final {target:.1f}% takes {model} {ours:.0f} CPU-hours at full scale "
            f"against WRN-16-4's {theirs:.0f} ({_saving(ours, theirs)}{aside})")


def _saving(ours, theirs):
    return f"{abs(100 * (1 - ours / theirs)):.0f}% {'less' if ours < theirs else 'more'}"


def _runs_table(rows):
    def cells(r):
        mark = " †" if r["name"] in SHARED_CPU else ""
        seed, dp_seed = r["seed"]
        return [r["name"], tables.label(tables.config_key(r)), f"{seed} / {'secret' if dp_seed is None else dp_seed}",
                "–" if r["own_epsilon"] is None else f"{r['own_epsilon']:.0f}",
                "–" if r["views_per_sec"] is None else f"{r['views_per_sec']:.0f}{mark}",
                f"{r['wall_minutes']:.0f} min{mark}", r["cpu"], f"{100 * r['test_accuracy']:.1f}%"]
    return markdown(["run", "configuration", "seed / DP key", "own ε", "views/s", "wall time", "CPU",
                     "test acc. (EMA)"], [cells(r) for r in sorted(rows, key=lambda r: (r["model"], r["name"]))])


def _plot(configs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The official models in darker shades of their dense variants' colours. Round 4's ablations are in the tables
    # only: four more curves at one ε would hide the comparisons the plots are for.
    colours = {"eq_d4d2": "tab:blue", "cnn_c1": "tab:orange", "wrn16_4": "tab:green", "wrn16_4_ws": "tab:red",
               "eq_c4": "tab:purple", "eq_d4d2_official": "navy", "cnn_c1_official": "saddlebrown"}
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in sorted(configs, key=tables.label):  # the study's runs; the scaling checks only in the tables
        c = configs[key]
        if key[0] in colours and key[2] in (8, 7) and (key[3] == TAN_BATCH or key[0] != "cnn_c1" or key[4] > 1):
            steps, accs = zip(*c["curve"])
            ax.plot([s / c["steps"] for s in steps], accs, "-" if key[4] == 1 else "--", marker="o", ms=3,
                    color=colours[key[0]], label=tables.label(key) + (f" ({c['n']} seeds)" if c["n"] > 1 else ""))
    paths = [_save(plt, fig, ax, "fraction of the run's steps", "CIFAR-10, simulated ε ≈ 8 (TAN)",
                   "accuracy_vs_step.png")]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for model in ("eq_d4d2", "cnn_c1", "eq_d4d2_official", "cnn_c1_official"):
        points = sorted((k[2], c["mean"], c["mean"] - c["min"], c["max"] - c["mean"]) for k, c in configs.items()
                        if k[0] == model and k[2] is not None and k[1:] == (tables.PAPER_RECIPE, k[2], TAN_BATCH, 1))
        if points:
            eps, mean, low, high = zip(*points)
            ax.errorbar(eps, mean, yerr=[low, high], marker="o", capsize=3, color=colours[model],
                        label=MODEL_LABELS[model] + " (mean, min–max over seeds)")
    paths.append(_save(plt, fig, ax, f"simulated ε at batch {PAPER_BATCH} (δ = 1e-5)",
                       f"CIFAR-10, 2160 steps, TAN-simulated at B = {TAN_BATCH}", "accuracy_vs_epsilon.png"))
    return paths


def _save(plt, fig, ax, xlabel, title, filename):
    return save_plot(plt, fig, ax, xlabel, title, os.path.relpath(os.path.join(TAN_DIR, filename), STUDY_DIR))


def headline(configs):
    """The README's results: the headline table, what its runs trained, and the published runs beside them."""
    fair = tables.fair_wrn_key(configs)
    recipes = f"The ResNet-9s: the paper's recipe ({PAPER_RECIPE_TEXT}, K = 1)" + (
        "" if fair is None else f"; WRN-16-4: its authors' ({fair[1]}, B = {fair[3]} standing for "
                                f"{configs[fair]['simulated_batch']})")
    published = ", ".join(f"{who} ({model}) {acc:.1f}%" for who, model, eps, acc in PUBLISHED if eps == 8)
    return "\n\n".join([
        "CIFAR-10 test accuracy of the EMA weights, mean (min–max over seeds), **TAN-simulated**: each run trains "
        "at a small batch with σ scaled so that it stands for a full-batch private run; ε is that run's, not a "
        "guarantee of these runs.",
        tables.headline_table(configs),
        f"{recipes}. Published full-scale private runs at ε = 8, on GPUs: {published}."])


def build(records, step_times):
    """The report (tables, findings, RESULTS.md, configurations, headline) from the records and the step times."""
    rows = [summarise_tan(name, record) for name, record in records.items()]
    configs = tables.configurations(rows)
    comps, published_rows = tables.comparisons(configs), tables.published(configs)
    time_rows, target = tables.time_to_accuracy(configs, step_times)
    timing = next(iter(step_times.values()), None)
    table_text = "\n\n".join([
        "**Per configuration** (seeds merged; test accuracy of the EMA weights on the full test set):",
        tables.configurations_table(configs),
        "**The comparisons** (a margin is beyond chance here only if it exceeds the larger seed spread of its two "
        "sides; a spread seen on one side only, the other having one seed, is marked and is a weaker check):",
        tables.comparisons_table(comps),
        *([tables.published_table(published_rows)] if published_rows else []),
        "**Accuracy against compute** (accuracy at 25% interpolated between evaluations; full scale = the steps at "
        "the batch each run simulates, K as trained):",
        tables.time_table(time_rows, target),
        f"Time per view: not measured yet (`{TIMING_COMMAND}` on a quiet CPU)." if timing is None else
        f"Time per view: one DP step{' and one non-private step' if timing.get('nonprivate_seconds_per_view') else ''} "
        f"(fp32, XLA off, B = {timing['batch']}) of each model, measured side by side on one CPU ({timing['cpu']}, "
        f"{timing['started']}; `{timing.get('command') or TIMING_COMMAND}`).",
    ])
    missing = [name for runs in TAN_BATCHES.values() for name in runs
               if name not in records and name not in ROUND4_RUNS]
    missing_round4 = [name for name in ROUND4_RUNS if name not in records]
    findings_text = "\n\n".join(
        [findings(configs, comps, published_rows, time_rows, target)] +
        ([f"Not run yet (`python bench/study.py run tan` continues where it stopped): "
          f"{', '.join(f'`{name}`' for name in missing)}."] if missing else []) +
        ([f"Round 4, not run yet ({len(missing_round4)} of {len(ROUND4_RUNS)}; `python bench/study.py run round4` "
          f"takes them in this order): {', '.join(f'`{name}`' for name in missing_round4)}."]
         if missing_round4 else []) +
        ["Every run here is a TAN simulation: its own ε (in RESULTS.md) is its only guarantee; the simulated ε is "
         "that of the full-batch run it stands for, which was not trained."])
    results = "\n\n".join([
        "# The paper's regime, TAN-simulated (generated by `python bench/study.py report`; do not edit)",
        "Full CIFAR-10 (50,000 train, 10,000 test), Poisson batches with σ scaled from the batch each run simulates "
        f"(TAN), on 2 CPU cores. The paper's recipe: {PAPER_RECIPE_TEXT}. Records: [`runs/`](runs/).",
        table_text, findings_text,
        "**Every run** (views/s and wall time compare only between runs on one CPU; † shared the cores):",
        _runs_table(rows),
        *[f"† `{name}` {why}." for name, why in SHARED_CPU.items() if name in records],
        "![accuracy vs step](accuracy_vs_step.png)\n![accuracy vs simulated epsilon](accuracy_vs_epsilon.png)\n",
    ])
    return Report(table_text, findings_text, results, configs, headline(configs))


def report_paper_regime(records):
    report = build(records, tables.load_step_times(TAN_DIR))
    write_results(TAN_DIR, report.results)
    update_block(RESULTS_PAGE, report.tables, TAN_TABLE_MARKERS)
    update_block(RESULTS_PAGE, report.findings, TAN_FINDINGS_MARKERS)
    update_block(README, report.headline, HEADLINE_MARKERS)
    print(report.tables, report.findings, report.headline, "wrote " + os.path.join(TAN_DIR, "RESULTS.md"),
          *_plot(report.configs), sep="\n\n")
