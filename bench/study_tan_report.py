"""The paper-regime report (TAN simulation): the table and plots from the committed records, the findings from
study_tan_findings.py, written to RESULTS.md and README."""

import os

from study_plan import MODEL_LABELS, PAPER_BATCH, TAN_BATCH
from study_records import STUDY_DIR, TAN_DIR, summarise
from study_report import save_plot, update_readme, write_results
from study_run_notes import MACHINE_FROM_SESSION_LOG, SHARED_CPU
from study_tan_findings import preferred_batch, tan_findings

TAN_TABLE_MARKERS = ("<!-- paper-regime-table -->", "<!-- /paper-regime-table -->")
TAN_FINDINGS_MARKERS = ("<!-- paper-regime-findings -->", "<!-- /paper-regime-findings -->")

PAPER_STEPS = 2160


def machine_label(name, machines):
    """A short CPU name: what the run's machine.jsonl says, else the session log's, else "not recorded"."""
    if not machines:
        return MACHINE_FROM_SESSION_LOG.get(name, "not recorded")
    labels = []
    for machine in machines:
        cpu = machine["cpu"].split(" (family")[0]
        for noise in ("(R)", "(TM)", " Processor", " CPU"):
            cpu = cpu.replace(noise, "")
        cpu = cpu.split(" @")[0].strip()
        simd = machine["simd"].split()
        units = [unit for flag, unit in (("avx512f", "AVX-512"), ("amx_tile", "AMX")) if flag in simd]
        label = f"{cpu}, {machine['cores']} cores" + (f" ({', '.join(units)})" if units else "")
        if label not in labels:
            labels.append(label)
    return " + ".join(labels)


def summarise_tan(name, record):
    """One row of the paper-regime table from a run's records."""
    config, privacy, metrics = record["config"], record["privacy"], record["metrics"]
    simulated = privacy.get("simulated_run", {})
    row = summarise(name, {**record, "privacy": privacy})
    row.update({
        "simulated_epsilon": simulated.get("epsilon"),
        "simulated_noise_multiplier": simulated.get("noise_multiplier"),
        "simulated_batch": simulated.get("batch_size"),
        "own_epsilon": privacy.get("epsilon"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "step_curve": [(line["step"], line["test_accuracy"]) for line in metrics],
        "num_views": int(config["num_views"]),
        "dp_seed": config.get("dp_seed"),  # set only on the repeats of a run (issue 26's seeds)
        "finished": metrics[-1]["step"] >= int(config["steps"]),
        "cpu": machine_label(name, record.get("machines", [])),
        "cpu_from_log": not record.get("machines") and name in MACHINE_FROM_SESSION_LOG,
    })
    return row


def tan_row_order(row):
    """The scaling check (the ordinary CNN at other batches) last; then by model and decreasing simulated epsilon
    (sigma = 0 first)."""
    scaling = row["model"] == "cnn_c1" and row["batch"] != TAN_BATCH
    eps = row["simulated_epsilon"]
    return scaling, row["model"], -(eps if eps is not None else 1e9), row["batch"]


def _fmt_eps(value, digits=2):
    return "∞ (σ = 0)" if value is None else f"{value:.{digits}f}"


def _tan_table(rows):
    header = ["run", "model", "parameters", "simulated ε (B=8192)", "this run's own ε", "σ (σ at 8192)",
              "steps × B (× K views)", "views/s", "wall time", "CPU", "test acc. (EMA)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        sigma = "0" if not r["noise_multiplier"] else \
            f"{r['noise_multiplier']:.4f} ({r['simulated_noise_multiplier']:.2f})"
        rate = "–" if r["views_per_sec"] is None else f"{r['views_per_sec']:.0f}"
        mark = " †" if r["name"] in SHARED_CPU else ""
        budget = f"{r['steps']} × {r['batch']}" + (f" × {r['num_views']}" if r["num_views"] > 1 else "")
        cpu = r["cpu"] + (" (from the session log)" if r["cpu_from_log"] else "")
        lines.append(f"| {r['name']} | {MODEL_LABELS[r['model']]} | {r['parameters']:,} | "
                     f"{_fmt_eps(r['simulated_epsilon'])} | {_fmt_eps(r['own_epsilon'], 0)} | {sigma} | "
                     f"{budget} | {rate}{mark} | {r['wall_minutes']:.0f} min{mark} | {cpu} | "
                     f"{100 * r['test_accuracy']:.1f}% |")
    return "\n".join(lines)


def _plotted_rows(rows):
    """One row per model, simulated epsilon and K: the B = 256 run where there is one (the scaling checks at other
    batches stay in the table), else the largest batch the model ran at (WRN-16-4 at B = 64)."""
    batches = {}
    for r in rows:
        batches.setdefault((r["model"], r["simulated_epsilon"], r["num_views"]), []).append(r["batch"])
    return [r for r in rows if r["batch"] == preferred_batch(batches[(r["model"], r["simulated_epsilon"],
                                                                       r["num_views"])])]


def _plot_tan(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"eq_d4d2": "tab:blue", "cnn_c1": "tab:orange", "wrn16_4": "tab:green", "eq_c4": "tab:purple"}
    styles = {8: "-", 2: "--", 1: "-.", None: ":"}
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = _plotted_rows(rows)
    for r in plotted:
        steps, accs = zip(*r["step_curve"])
        eps = None if r["simulated_epsilon"] is None else round(r["simulated_epsilon"])
        views = (f", K = {r['num_views']}" if r["num_views"] > 1 else "") + \
            (f" at B = {r['batch']}" if r["batch"] != TAN_BATCH else "")
        ax.plot(steps, [100 * a for a in accs], styles.get(eps, "-"), marker="o" if not views else "s", ms=3,
                color=colours[r["model"]],
                label=f"{MODEL_LABELS[r['model']]}, " + ("σ = 0" if eps is None else f"sim. ε = {eps}") + views)
    paths.append(_save_in(TAN_DIR, plt, fig, ax, "step (B = 256 simulating 8192)",
                          "CIFAR-10, the paper's regime (TAN-simulated)", "accuracy_vs_step.png"))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for model, colour in colours.items():
        ones = [r for r in plotted if r["model"] == model and r["num_views"] == 1]
        points = sorted((r["simulated_epsilon"], 100 * r["test_accuracy"]) for r in ones
                        if r["simulated_epsilon"] is not None)
        batches = {r["batch"] for r in ones} - {TAN_BATCH}
        if points:
            ax.plot(*zip(*points), marker="o", color=colour,
                    label=MODEL_LABELS[model] + "".join(f" (B = {b})" for b in sorted(batches)))
        for r in ones:
            if r["simulated_epsilon"] is None:
                ax.axhline(100 * r["test_accuracy"], ls=":", color=colour, label=f"{MODEL_LABELS[model]}, σ = 0")
    paths.append(_save_in(TAN_DIR, plt, fig, ax, "simulated ε at batch 8192 (δ = 1e-5)",
                          "CIFAR-10, 2160 steps, TAN-simulated", "accuracy_vs_epsilon.png"))
    return paths


def _save_in(folder, plt, fig, ax, xlabel, title, filename):
    os.makedirs(folder, exist_ok=True)
    return save_plot(plt, fig, ax, xlabel, title, os.path.relpath(os.path.join(folder, filename), STUDY_DIR))


def report_paper_regime(records):
    rows = sorted((summarise_tan(name, record) for name, record in records.items()), key=tan_row_order)
    table = _tan_table(rows)
    findings = tan_findings(rows)
    text = "\n".join([
        "# The paper's regime, TAN-simulated (generated by `python bench/study.py report`; do not edit)",
        "",
        f"Full CIFAR-10 (50,000 train, 10,000 test), {PAPER_STEPS} Poisson steps at expected batch {TAN_BATCH} "
        f"(other batches in the scaling checks) with σ scaled from batch {PAPER_BATCH} (TAN simulation), K = 1 view "
        "(the K = 4 run: B = 64 × 4 views, the same views per step), C = 2, SGD lr 2 without momentum, EMA 0.999, "
        "2 CPU cores.",
        "",
        table,
        "",
        findings,
        "",
        "![accuracy vs step](accuracy_vs_step.png)",
        "![accuracy vs simulated epsilon](accuracy_vs_epsilon.png)",
        "",
    ])
    write_results(TAN_DIR, text)
    update_readme(table, TAN_TABLE_MARKERS)
    update_readme(findings, TAN_FINDINGS_MARKERS)
    paths = _plot_tan(rows)
    print(table)
    print(findings)
    print("wrote", os.path.join(TAN_DIR, "RESULTS.md"), *paths)
