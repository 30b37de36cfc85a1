"""The paper-regime report (TAN simulation): table, findings and plots, worded from the committed records alone."""

import os

from study_plan import MODEL_LABELS, PAPER_BATCH, TAN_BATCH, TAN_BATCHES
from study_records import STUDY_DIR, TAN_DIR, summarise
from study_report import save_plot, update_readme, write_results

TAN_TABLE_MARKERS = ("<!-- paper-regime-table -->", "<!-- /paper-regime-table -->")
TAN_FINDINGS_MARKERS = ("<!-- paper-regime-findings -->", "<!-- /paper-regime-findings -->")

# Runs whose timings are not those of the two cores alone (accuracy, which depends only on the updates, is not
# affected). Set by hand when a run had to share the machine; the report prints the reason next to the run.
SHARED_CPU = {
    "tan_cnn_c1_eps8": "shared the two cores with test runs for part of its time (views/s and wall time understate "
                       "its speed alone)",
    "tan_cnn_c1_eps8_b128": "shared the two cores with test runs for most of its time (views/s and wall time "
                            "understate its speed alone)",
    "tan_eq_d4d2_eps8": "shared the two cores with about 4 minutes of micro-benchmarks near its start and with "
                        "low-priority (nice 19) test runs later (views/s and wall time understate its speed alone)",
    "tan_eq_d4d2_eps2": "shared the two cores with about 12 minutes of memory measurements and tests in its first "
                        "40 minutes (views/s and wall time understate its speed alone)",
    "tan_cnn_c1_eps2": "shared the two cores with about 20 seconds of tests and a benchmark report rebuild in its "
                       "first 2 minutes (views/s and wall time understate its speed alone, slightly)",
    "tan_cnn_c1_sigma0": "shared the two cores with about 5 seconds of tests in its first 3 minutes (views/s and "
                         "wall time understate its speed alone, slightly)",
    "tan_eq_d4d2_eps1": "shared the two cores with about 20 CPU-seconds of a report check and low-priority (nice 19) "
                        "study tests in its first 12 minutes (views/s and wall time understate its speed alone, "
                        "slightly)",
    "tan_eq_d4d2_sigma0": "shared the two cores with a full fresh-clone CI run (27 minutes, from its 9th to its 36th "
                          "minute; about 37 views/s then against 59 alone) and about a minute of low-priority "
                          "(nice 19) study tests and report rebuilds before that (views/s and wall time understate "
                          "its speed alone)",
    "tan_wrn16_4_eps8_b64": "shared the two cores with about a minute of low-priority (nice 19) study tests and a "
                            "duplicate-code check, spread over its first 40 minutes (views/s and wall time understate "
                            "its speed alone, slightly)",
    "tan_eq_c4_eps8": "shared the two cores with about two minutes of low-priority (nice 19) study tests and report "
                      "rebuilds in its first 10 minutes (views/s and wall time understate its speed alone, slightly)",
}
# Records made before runs noted their machine (machine.jsonl); set by hand from the session's log, for the runs
# whose machine is known. Runs in neither place show "not recorded".
MACHINE_FROM_SESSION_LOG = {name: "AMD EPYC, 2 cores" for name in ("tan_cnn_c1_eps2", "tan_cnn_c1_sigma0",
                                                                   "tan_cnn_c1_eps1")}
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


def _by_key(rows):
    """{(model, simulated epsilon rounded or None, batch): row}; K joins the key as a fourth item when K > 1."""
    keys = {}
    for r in rows:
        key = (r["model"], None if r["simulated_epsilon"] is None else round(r["simulated_epsilon"]), r["batch"])
        keys[key if r["num_views"] == 1 else key + (r["num_views"],)] = r
    return keys


def _preferred_batch(batches):
    """The batch that stands for a model's run where it ran at several: B = 256, else the largest it ran at."""
    return TAN_BATCH if TAN_BATCH in batches else max(batches)


def _baseline_finding(model, runs, acc):
    """WRN-16-4 or C4 at simulated epsilon 8, against the two main models; [] until it has run.

    Prefers the B = 256 run. A model whose per-example step is too slow for B = 256 in one sitting runs at a smaller
    batch (WRN-16-4 at B = 64): it is then set against the ordinary CNN at that same batch too, and the CNN's own
    loss from B = 256 to that batch is stated as the bias the smaller batch puts on the comparison."""
    batches = [key[2] for key in runs if key[:2] == (model, 8) and len(key) == 3]
    if not batches:
        return []
    batch = _preferred_batch(batches)
    accuracy, parameters = acc[(model, 8, batch)], runs[(model, 8, batch)]["parameters"]
    others = [f"{MODEL_LABELS[m]} {acc[(m, 8, TAN_BATCH)]:.1f}%" for m in ("eq_d4d2", "cnn_c1")
              if (m, 8, TAN_BATCH) in acc]
    text = f"{MODEL_LABELS[model]} ({parameters:,} parameters) reached {accuracy:.1f}% at simulated ε = 8"
    if model == "wrn16_4":
        # Every run shares one optimiser (the paper's, chosen for its ResNet-9); say so where it may matter most.
        text += " with the optimiser every run here uses (the paper's, chosen for ResNet-9, not tuned for WRN)"
    if batch == TAN_BATCH:
        return [text + (f" (against {', '.join(others)})." if others else ".") +
                _against_equivariant(model, accuracy, parameters, runs, acc) + _against_cnn(accuracy, batch, runs, acc)]
    text += (f", trained at B = {batch} (1/{PAPER_BATCH // batch} of the paper's batch, the same σ/B): its "
             f"per-example step is too slow here for B = {TAN_BATCH} in one sitting")
    if others:
        text += f". At B = {TAN_BATCH}: {', '.join(others)}"
    small, usual = acc.get(("cnn_c1", 8, batch)), acc.get(("cnn_c1", 8, TAN_BATCH))
    bias = None if small is None or usual is None else small - usual
    if small is not None:
        text += f". The ordinary CNN at B = {batch} reached {small:.1f}%"
        if bias is not None:
            text += (f", {bias:+.1f} points from its B = {TAN_BATCH} run: a rough size of what the smaller "
                     f"batch costs {MODEL_LABELS[model]} in this comparison")
    return [text + "." + _against_equivariant(model, accuracy, parameters, runs, acc, bias) +
            _against_cnn(accuracy, batch, runs, acc)]


def _outcome(accuracy, other_accuracy, other):
    """(lead in points, "beat X by n points" / "lost to X ..." / "matched X"), from the accuracies as printed (one
    decimal), so that the words agree with the numbers beside them."""
    lead = round(round(accuracy, 1) - round(other_accuracy, 1), 1)
    if lead == 0:
        return lead, f"matched {other}"
    return lead, f"{'beat' if lead > 0 else 'lost to'} {other} by {abs(lead):.1f} points"


def _against_cnn(accuracy, batch, runs, acc):
    """The ordinary CNN against a baseline at the same batch: is a small model without equivariance enough?"""
    key = ("cnn_c1", 8, batch)
    if key not in acc:
        return ""
    return (f" At the same batch the ordinary CNN ({runs[key]['parameters']:,} parameters) "
            f"{_outcome(acc[key], accuracy, 'it')[1]}.")


def _against_equivariant(model, accuracy, parameters, runs, acc, bias=None):
    """The sentence that answers the parameter argument: did the equivariant model (D4->D2, B = 256) beat this
    baseline at simulated epsilon 8, by how much, and does the lead outlast the bias of the baseline's smaller batch
    (None when it ran at B = 256 too)? Empty until the equivariant model has run."""
    key = ("eq_d4d2", 8, TAN_BATCH)
    if model == "eq_d4d2" or key not in acc:
        return ""
    eq, eq_parameters = acc[key], runs[key]["parameters"]
    lead, outcome = _outcome(eq, accuracy, MODEL_LABELS[model])
    fewer = f", {parameters / eq_parameters:.1f}× fewer" if parameters > eq_parameters else ""
    text = f" So {MODEL_LABELS['eq_d4d2']} ({eq_parameters:,} parameters{fewer}) {outcome}"
    if bias is None or bias >= 0:
        return text + "."
    if lead <= 0:
        return text + ", although the smaller batch handicapped the baseline."
    if lead > -bias:
        return text + f", more than the {-bias:.1f} points the smaller batch may explain."
    return text + f", no more than the {-bias:.1f} points the smaller batch may explain: this comparison does not " \
        "settle which is better."


def tan_findings(rows):
    """The findings paragraph, worded from the records alone (nothing here is typed in by hand)."""
    runs = _by_key(rows)
    acc = {key: 100 * r["test_accuracy"] for key, r in runs.items()}
    parts = []
    scaling = [(b, acc[("cnn_c1", 8, b)]) for b in (128, 256, 512) if ("cnn_c1", 8, b) in acc]
    spread = max(a for _, a in scaling) - min(a for _, a in scaling) if len(scaling) >= 2 else None
    if len(scaling) == 3:
        listed = ", ".join(f"{a:.1f}% at B = {b}" for b, a in scaling)
        verdict = ("agree within 1.5 points, so the simulation holds here and the study uses B = 256"
                   if spread <= 1.5 else
                   f"differ by {spread:.1f} points, more than the 1.5 allowed: the simulation is not exact at "
                   "these batch sizes, and B = 256 results carry that uncertainty")
        parts.append(f"**Does the TAN simulation hold here?** The ordinary CNN at simulated ε = 8 reached {listed}: "
                     f"the three {verdict}.")
    elif scaling:
        parts.append("**TAN scaling check incomplete:** only " +
                     ", ".join(f"B = {b} ({a:.1f}%)" for b, a in scaling) + " finished so far.")
    comparisons = []
    for eps in (8, 2, 1):
        eq, cnn = acc.get(("eq_d4d2", eps, TAN_BATCH)), acc.get(("cnn_c1", eps, TAN_BATCH))
        if eq is not None and cnn is not None:
            word = "beat" if eq > cnn else "lost to"
            comparisons.append(f"at simulated ε = {eps} the equivariant model {word} the ordinary CNN, "
                               f"{eq:.1f}% against {cnn:.1f}% ({eq - cnn:+.1f} points)")
        elif eq is not None or cnn is not None:
            only, value = ("equivariant model", eq) if eq is not None else ("ordinary CNN", cnn)
            comparisons.append(f"at simulated ε = {eps} only the {only} has run so far ({value:.1f}%)")
    if comparisons:
        # One seed per run: the scaling check's runs should agree, so their spread is the one measure of chance here.
        chance = ("" if spread is None else
                  f" Each accuracy is one run with one seed; the scaling check's runs, which TAN says should agree, "
                  f"spread over {spread:.1f} points, a rough guide to what chance alone moves.")
        parts.append("**Equivariant vs ordinary, in the paper's regime** (2160 steps at the paper's σ/B): "
                     + "; ".join(comparisons) + "." + chance)
    for model in ("wrn16_4", "eq_c4"):
        parts.extend(_baseline_finding(model, runs, acc))
    noise = []
    for model in ("eq_d4d2", "cnn_c1"):
        clean, private = acc.get((model, None, TAN_BATCH)), acc.get((model, 8, TAN_BATCH))
        if clean is not None and private is not None:
            noise.append(f"{MODEL_LABELS[model]} {clean:.1f}% without noise against {private:.1f}% at ε = 8 "
                         f"({clean - private:.1f} points)")
    if noise:
        parts.append("**What the noise costs** (same clipping and steps, σ = 0): " + "; ".join(noise) + ".")
    clean_cnn = acc.get(("cnn_c1", None, TAN_BATCH))
    against_clean = [f"at simulated ε = {eps} ({acc[('eq_d4d2', eps, TAN_BATCH)]:.1f}%) it is "
                     f"{'above' if acc[('eq_d4d2', eps, TAN_BATCH)] > clean_cnn else 'below'} it"
                     for eps in (8, 2, 1) if clean_cnn is not None and ("eq_d4d2", eps, TAN_BATCH) in acc]
    if against_clean:
        parts.append("The private equivariant model against the ordinary CNN trained without noise "
                     f"({clean_cnn:.1f}%): " + "; ".join(against_clean) + ".")
    k4 = acc.get(("eq_d4d2", 8, 64, 4))
    if ("cnn_c1", 8, 64) in acc and ("cnn_c1", 8, TAN_BATCH) in acc:
        small, usual = acc[("cnn_c1", 8, 64)], acc[("cnn_c1", 8, TAN_BATCH)]
        parts.append(f"**Does the simulation still hold at B = 64** (1/128 of 8192, where the K = 4 run trains)? The "
                     f"ordinary CNN at simulated ε = 8 reached {small:.1f}% there against {usual:.1f}% at B = 256 "
                     f"({small - usual:+.1f} points), " + ("within" if abs(small - usual) <= 1.5 else "more than") +
                     " the 1.5 points the scaling check allows.")
    if k4 is not None:
        k1 = acc.get(("eq_d4d2", 8, TAN_BATCH))
        parts.append("**The paper's K = 4 views**, at B = 64 so that every step costs the same 256 views as the K = 1 "
                     f"runs: the equivariant model reached {k4:.1f}% at simulated ε = 8" +
                     (f", against {k1:.1f}% with K = 1 at B = 256 ({k4 - k1:+.1f} points at equal views)."
                      if k1 is not None else "."))
    best8 = max((a for k, a in acc.items() if k[1] == 8), default=None)
    if best8 is not None:
        views = ("K = 1 view" if k4 is None else "K = 1 view (K = 4 in one run)")
        parts.append(f"For scale: the best simulated ε = 8 result here is {best8:.1f}%, against 81.4% (De et al., "
                     "WRN-40-4) and 82.5% (Klause et al., ResNet-9) published at ε = 8 with full-size private runs "
                     "on GPUs (the paper's abstract reports up to 9 points more than that state of the art on "
                     f"CIFAR-10); our runs use {views} where the paper uses 4 (and De et al. 16), and 1/32 of the "
                     "paper's batch or less, so they predict the private runs' accuracy only as far as TAN scaling "
                     "holds.")
    done = {r["name"] for r in rows}
    missing = [name for batch, runs_ in TAN_BATCHES.items() if batch != "tan_optional" for name in runs_
               if name not in done]
    optional = [name for name in TAN_BATCHES["tan_optional"] if name not in done]
    if missing:
        parts.append("Not run yet (the study continues where it stopped: `python bench/study.py run tan`): "
                     + ", ".join(f"`{m}`" for m in missing) + ".")
    if optional:
        parts.append("Optional, if the budget allows, not run yet: " + ", ".join(f"`{m}`" for m in optional) + ".")
    known = {r["cpu"] for r in rows if r["cpu"] != "not recorded"}
    unrecorded = sum(r["cpu"] == "not recorded" for r in rows)
    if len(known) + bool(unrecorded) > 1:
        not_noted = ("" if not unrecorded else ", and 1 run did not record its" if unrecorded == 1 else
                     f", and {unrecorded} runs did not record theirs")
        parts.append(f"**Speed compares only within one machine.** The CPU column names {len(known)} "
                     f"CPU{'s' if len(known) != 1 else ''}{not_noted}" +
                     " (the machines here differ about 2× in fp32 peak), so views/s and wall time compare only "
                     "between runs on one CPU. Accuracy depends on the updates, not on the machine's speed.")
    for r in rows:
        if r["name"] in SHARED_CPU:
            parts.append(f"† `{r['name']}` {SHARED_CPU[r['name']]}.")
    parts.append("Every run here is a TAN simulation: its own ε (column 5) is its only guarantee; the simulated "
                 "ε is that of the 8192-batch run it stands for, which was not trained.")
    return "\n\n".join(parts)


def _plotted_rows(rows):
    """One row per model, simulated epsilon and K: the B = 256 run where there is one (the scaling checks at other
    batches stay in the table), else the largest batch the model ran at (WRN-16-4 at B = 64)."""
    batches = {}
    for r in rows:
        batches.setdefault((r["model"], r["simulated_epsilon"], r["num_views"]), []).append(r["batch"])
    return [r for r in rows if r["batch"] == _preferred_batch(batches[(r["model"], r["simulated_epsilon"],
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
