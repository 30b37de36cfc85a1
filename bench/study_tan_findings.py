"""The paper-regime findings (TAN simulation): the paragraphs under README's table, each worded from the committed
records alone. A paragraph appears once the runs it needs have records, so a half-finished study reads as such."""

from study_plan import MODEL_LABELS, PAPER_BATCH, TAN_BATCH, TAN_BATCHES
from study_run_notes import SHARED_CPU

# The paper's K = 4 views, run at B = 64 x 4 views: its key among the runs (model, simulated epsilon, batch, K).
K4_RUN = ("eq_d4d2", 8, 64, 4)


def _by_key(rows):
    """{(model, simulated epsilon rounded or None, batch): row}; K joins the key as a fourth item when K > 1."""
    keys = {}
    for r in rows:
        if r.get("dp_seed") is not None:
            continue  # a repeat with another seed must not stand in for the first run (spread: issue 26)
        key = (r["model"], None if r["simulated_epsilon"] is None else round(r["simulated_epsilon"]), r["batch"])
        keys[key if r["num_views"] == 1 else key + (r["num_views"],)] = r
    return keys


def preferred_batch(batches):
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
    batch = preferred_batch(batches)
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
    bias = None if small is None or usual is None else _points(small, usual)
    if small is not None:
        text += f". The ordinary CNN at B = {batch} reached {small:.1f}%"
        if bias is not None:
            text += (f", {bias:+.1f} points from its B = {TAN_BATCH} run: a rough size of what the smaller "
                     f"batch costs {MODEL_LABELS[model]} in this comparison")
    return [text + "." + _against_equivariant(model, accuracy, parameters, runs, acc, bias) +
            _against_cnn(accuracy, batch, runs, acc)]


def _points(accuracy, other_accuracy):
    """The difference of two accuracies as printed (one decimal), so that the words agree with the numbers."""
    return round(round(accuracy, 1) - round(other_accuracy, 1), 1)


def _verb(lead):
    return "beat" if lead > 0 else "lost to" if lead < 0 else "matched"


def _outcome(accuracy, other_accuracy, other):
    """(lead in points, "beat X by n points" / "lost to X by n points" / "matched X")."""
    lead = _points(accuracy, other_accuracy)
    return lead, f"{_verb(lead)} {other}" + (f" by {abs(lead):.1f} points" if lead else "")


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
    if key not in acc:
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


def _scaling_check(acc):
    """The TAN check on the ordinary CNN at B = 128, 256, 512: (paragraphs, the spread of their accuracies or None)."""
    scaling = [(b, acc[("cnn_c1", 8, b)]) for b in (128, 256, 512) if ("cnn_c1", 8, b) in acc]
    spread = max(a for _, a in scaling) - min(a for _, a in scaling) if len(scaling) >= 2 else None
    if len(scaling) == 3:
        listed = ", ".join(f"{a:.1f}% at B = {b}" for b, a in scaling)
        verdict = ("agree within 1.5 points, so the simulation holds here and the study uses B = 256"
                   if spread <= 1.5 else
                   f"differ by {spread:.1f} points, more than the 1.5 allowed: the simulation is not exact at "
                   "these batch sizes, and B = 256 results carry that uncertainty")
        return [f"**Does the TAN simulation hold here?** The ordinary CNN at simulated ε = 8 reached {listed}: "
                f"the three {verdict}."], spread
    if scaling:
        return ["**TAN scaling check incomplete:** only " +
                ", ".join(f"B = {b} ({a:.1f}%)" for b, a in scaling) + " finished so far."], spread
    return [], spread


def _equivariant_vs_ordinary(acc, spread):
    """The study's question at each simulated epsilon, with the scaling check's spread as the one guide to chance."""
    comparisons = []
    for eps in (8, 2, 1):
        eq, cnn = acc.get(("eq_d4d2", eps, TAN_BATCH)), acc.get(("cnn_c1", eps, TAN_BATCH))
        if eq is not None and cnn is not None:
            lead = _points(eq, cnn)
            comparisons.append(f"at simulated ε = {eps} the equivariant model {_verb(lead)} the ordinary CNN, "
                               f"{eq:.1f}% against {cnn:.1f}% ({lead:+.1f} points)")
        elif eq is not None or cnn is not None:
            only, value = ("equivariant model", eq) if eq is not None else ("ordinary CNN", cnn)
            comparisons.append(f"at simulated ε = {eps} only the {only} has run so far ({value:.1f}%)")
    if not comparisons:
        return []
    # One seed per run: the scaling check's runs should agree, so their spread is the one measure of chance here.
    chance = ("" if spread is None else
              f" Each accuracy is one run with one seed; the scaling check's runs, which TAN says should agree, "
              f"spread over {spread:.1f} points, a rough guide to what chance alone moves.")
    return ["**Equivariant vs ordinary, in the paper's regime** (2160 steps at the paper's σ/B): "
            + "; ".join(comparisons) + "." + chance]


def _noise_cost(acc):
    """Each main model without noise (sigma = 0, same clipping and steps) against simulated epsilon 8."""
    noise = []
    for model in ("eq_d4d2", "cnn_c1"):
        clean, private = acc.get((model, None, TAN_BATCH)), acc.get((model, 8, TAN_BATCH))
        if clean is not None and private is not None:
            noise.append(f"{MODEL_LABELS[model]} {clean:.1f}% without noise against {private:.1f}% at ε = 8 "
                         f"({_points(clean, private):.1f} points)")
    paragraphs = ["**What the noise costs** (same clipping and steps, σ = 0): " + "; ".join(noise) + "."] if noise \
        else []
    clean_cnn = acc.get(("cnn_c1", None, TAN_BATCH))
    against_clean = [f"at simulated ε = {eps} ({acc[('eq_d4d2', eps, TAN_BATCH)]:.1f}%) it is "
                     f"{'above' if acc[('eq_d4d2', eps, TAN_BATCH)] > clean_cnn else 'below'} it"
                     for eps in (8, 2, 1) if clean_cnn is not None and ("eq_d4d2", eps, TAN_BATCH) in acc]
    if against_clean:
        paragraphs.append("The private equivariant model against the ordinary CNN trained without noise "
                          f"({clean_cnn:.1f}%): " + "; ".join(against_clean) + ".")
    return paragraphs


def _views_per_example(acc):
    """The check of B = 64 on the ordinary CNN, and the paper's K = 4 views at B = 64 against K = 1 at B = 256."""
    paragraphs = []
    if ("cnn_c1", 8, 64) in acc and ("cnn_c1", 8, TAN_BATCH) in acc:
        small, usual = acc[("cnn_c1", 8, 64)], acc[("cnn_c1", 8, TAN_BATCH)]
        # The 1.5-point bound applies to the measured difference, not to the rounded one printed beside it.
        paragraphs.append(f"**Does the simulation still hold at B = 64** (1/128 of 8192, where the K = 4 run trains)? "
                          f"The ordinary CNN at simulated ε = 8 reached {small:.1f}% there against {usual:.1f}% at "
                          f"B = 256 ({_points(small, usual):+.1f} points), " +
                          ("within" if abs(small - usual) <= 1.5 else "more than") +
                          " the 1.5 points the scaling check allows.")
    k4 = acc.get(K4_RUN)
    if k4 is not None:
        k1 = acc.get(("eq_d4d2", 8, TAN_BATCH))
        paragraphs.append("**The paper's K = 4 views**, at B = 64 so that every step costs the same 256 views as the "
                          f"K = 1 runs: the equivariant model reached {k4:.1f}% at simulated ε = 8" +
                          (f", against {k1:.1f}% with K = 1 at B = 256 ({_points(k4, k1):+.1f} points at equal "
                           "views)." if k1 is not None else "."))
    return paragraphs


def _published_scale(acc):
    """The best simulated epsilon 8 result against the published full-size private runs."""
    best8 = max((a for k, a in acc.items() if k[1] == 8), default=None)
    if best8 is None:
        return []
    views = "K = 1 view" if K4_RUN not in acc else "K = 1 view (K = 4 in one run)"
    return [f"For scale: the best simulated ε = 8 result here is {best8:.1f}%, against 81.4% (De et al., "
            "WRN-40-4) and 82.5% (Klause et al., ResNet-9) published at ε = 8 with full-size private runs "
            "on GPUs (the paper's abstract reports up to 9 points more than that state of the art on "
            f"CIFAR-10); our runs use {views} where the paper uses 4 (and De et al. 16), and 1/32 of the "
            "paper's batch or less, so they predict the private runs' accuracy only as far as TAN scaling holds."]


def _not_run(rows):
    """The plan's runs that have no records yet: required ones first, then the optional ones."""
    done = {r["name"] for r in rows}
    missing = [name for batch, runs in TAN_BATCHES.items() if batch != "tan_optional" for name in runs
               if name not in done]
    optional = [name for name in TAN_BATCHES["tan_optional"] if name not in done]
    paragraphs = []
    if missing:
        paragraphs.append("Not run yet (the study continues where it stopped: `python bench/study.py run tan`): "
                          + ", ".join(f"`{m}`" for m in missing) + ".")
    if optional:
        paragraphs.append("Optional, if the budget allows, not run yet: " + ", ".join(f"`{m}`" for m in optional)
                          + ".")
    return paragraphs


def _timing_caveats(rows):
    """Which machines the timings come from, and the runs that shared the cores (marked † in the table)."""
    paragraphs = []
    known = {r["cpu"] for r in rows if r["cpu"] != "not recorded"}
    unrecorded = sum(r["cpu"] == "not recorded" for r in rows)
    if len(known) + bool(unrecorded) > 1:
        not_noted = ("" if not unrecorded else ", and 1 run did not record its" if unrecorded == 1 else
                     f", and {unrecorded} runs did not record theirs")
        paragraphs.append(f"**Speed compares only within one machine.** The CPU column names {len(known)} "
                          f"CPU{'s' if len(known) != 1 else ''}{not_noted}" +
                          " (the machines here differ about 2× in fp32 peak), so views/s and wall time compare only "
                          "between runs on one CPU. Accuracy depends on the updates, not on the machine's speed.")
    paragraphs.extend(f"† `{r['name']}` {SHARED_CPU[r['name']]}." for r in rows if r["name"] in SHARED_CPU)
    return paragraphs


def tan_findings(rows):
    """The findings, paragraph by paragraph, worded from the records alone (nothing here is typed in by hand)."""
    runs = _by_key(rows)
    acc = {key: 100 * r["test_accuracy"] for key, r in runs.items()}
    scaling, spread = _scaling_check(acc)
    parts = scaling + _equivariant_vs_ordinary(acc, spread)
    for model in ("wrn16_4", "eq_c4"):
        parts += _baseline_finding(model, runs, acc)
    parts += _noise_cost(acc) + _views_per_example(acc) + _published_scale(acc) + _not_run(rows)
    parts += _timing_caveats(rows)
    parts.append("Every run here is a TAN simulation: its own ε (column 5) is its only guarantee; the simulated "
                 "ε is that of the 8192-batch run it stands for, which was not trained.")
    return "\n\n".join(parts)
