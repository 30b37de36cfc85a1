"""The paper-regime study's numbers as tables, computed from the committed records (and, for time, one benchmark run
of the models side by side on one CPU). ``study_tan_report.py`` writes them out and words the findings from them.

- ``configurations``: runs grouped by what was trained (model, recipe, simulated epsilon, batch, K views), seeds
  merged: mean, min-max, number of seeds, the mean accuracy curve.
- ``comparisons``: the differences the study is about, each against the seed spread it has to exceed.
- ``time_to_accuracy``: accuracy after 25/50/100% of the steps, multiply-adds and DP-step time per view, and the
  CPU time each model needs at full scale to reach the fair WRN-16-4's final accuracy; the same at its non-private
  step time, which takes out how much more our DP step costs one model than another.
"""

import json
import os

from study_plan import ABLATIONS, MODEL_LABELS, TAN_BATCH
from study_report import PUBLISHED, markdown

PAPER_RECIPE = "paper"  # SGD lr 2, C = 2, EMA 0.999, 2160 steps: every run but WRN-16-4's with its authors' recipe
STEP_TIMES_FILE = "step_times.json"  # python bench/benchmark.py ... --json <TAN_DIR>/step_times.json
BENCHMARK_MODELS = {"eq_d4d2": "eq_resnet9_d4d2", "cnn_c1": "eq_resnet9_c1", "wrn16_4_ws": "wrn16_4",
                    "eq_d4d2_official": "eq_resnet9_d4d2_official", "cnn_c1_official": "eq_resnet9_c1_official"}
FRACTIONS = (0.25, 0.5, 1.0)
HEADLINE_EPSILONS = (8, 2, 1, None)  # the headline table's columns: simulated epsilon, None for sigma = 0


def recipe(config):
    values = (float(config["learning_rate"]), float(config["l2_norm_clip"]), float(config["ema_decay"]),
              int(config["steps"]))
    if values == (2.0, 2.0, 0.999, 2160):
        return PAPER_RECIPE
    return "lr {:g}, C = {:g}, EMA {:g}, {} steps".format(*values)


def config_key(row):
    """(model, recipe, simulated epsilon rounded or None for sigma = 0, B, K): what a run trained, seeds apart."""
    eps = row["simulated_epsilon"]
    return row["model"], row["recipe"], None if eps is None else round(eps), row["batch"], row["num_views"]


def label(key):
    model, recipe_label, eps, batch, views = key
    return (f"{MODEL_LABELS[model]}, {'σ = 0' if eps is None else f'ε {eps}'}, B = {batch}" +
            (f" × K = {views}" if views > 1 else "") + ("" if recipe_label == PAPER_RECIPE else f" ({recipe_label})"))


def configurations(rows):
    groups = {}
    for row in rows:
        groups.setdefault(config_key(row), []).append(row)
    configs = {}
    for key, runs in groups.items():
        accs = [100 * r["test_accuracy"] for r in runs]
        curves = [dict(r["step_curve"]) for r in runs]
        shared = sorted(set.intersection(*(set(c) for c in curves)))  # evaluation steps every seed has
        first = runs[0]
        configs[key] = {
            "key": key, "runs": [r["name"] for r in runs], "n": len(runs), "parameters": first["parameters"],
            "mean": sum(accs) / len(accs), "min": min(accs), "max": max(accs), "steps": first["steps"],
            "simulated_epsilon": first["simulated_epsilon"], "simulated_batch": first["simulated_batch"],
            "curve": [(s, 100 * sum(c[s] for c in curves) / len(curves)) for s in shared],
            # WRN-16-4 with the paper's optimiser: listed, never compared (issue 26)
            "untuned": key[0].startswith("wrn16_4") and key[1] == PAPER_RECIPE,
        }
    return configs


def _points(a, b):
    """A difference of accuracies as printed (one decimal), so that a table's columns agree with each other."""
    return round(round(a, 1) - round(b, 1), 1)


def fair_wrn_key(configs):
    """WRN-16-4 with its authors' recipe at the largest batch it ran at (K = 1); None until it has run."""
    keys = [k for k in configs if k[0].startswith("wrn16_4") and k[1] != PAPER_RECIPE and k[4] == 1]
    return max(keys, key=lambda k: k[3]) if keys else None


def _wanted(fair_wrn):
    """[(what, subject model of A, A key, B key)] in the order the table lists them."""
    eq, cnn, p = "eq_d4d2", "cnn_c1", PAPER_RECIPE
    wanted = [(f"equivariant vs ordinary CNN, {'σ = 0' if e is None else f'simulated ε = {e}'}", eq,
               (eq, p, e, TAN_BATCH, 1), (cnn, p, e, TAN_BATCH, 1)) for e in (8, 2, 1, None)]
    wanted += [(f"K = 4 vs K = 1 views, {MODEL_LABELS[m]}, B = 64, ε 8", m, (m, p, 8, 64, 4), (m, p, 8, 64, 1))
               for m in (eq, cnn)]
    wanted.append(("equivariant vs ordinary CNN, K = 4 at B = 64, ε 8", eq, (eq, p, 8, 64, 4), (cnn, p, 8, 64, 4)))
    if fair_wrn is not None:
        wanted += [(f"{MODEL_LABELS[m]} (ε 8) vs WRN-16-4 with its authors' recipe", m, (m, p, 8, TAN_BATCH, 1),
                    fair_wrn) for m in (eq, cnn)]
    wanted.append(("equivariant D4→D2 vs C4, ε 8", eq, (eq, p, 8, TAN_BATCH, 1), ("eq_c4", p, 8, TAN_BATCH, 1)))
    wanted += [(f"TAN scaling check: ordinary CNN at B = {b} vs B = {TAN_BATCH}, ε 8", cnn, (cnn, p, 8, b, 1),
                (cnn, p, 8, TAN_BATCH, 1)) for b in (128, 512, 64)]
    return wanted + _wanted_round4(fair_wrn)


def _wanted_round4(fair_wrn):
    """Round 4 (issue 39): the official models against each other, against their dense variants and the fair
    WRN-16-4, and the official D4->D2 against itself with one ingredient reverted (what the ingredient brings)."""
    eq, cnn, p = "eq_d4d2_official", "cnn_c1_official", PAPER_RECIPE

    def at(model, eps):
        return (model, p, eps, TAN_BATCH, 1)

    wanted = [(f"official: equivariant vs ordinary CNN, {'σ = 0' if e is None else f'simulated ε = {e}'}", eq,
               at(eq, e), at(cnn, e)) for e in (8, 2, 1, None)]
    wanted += [(f"{MODEL_LABELS[official]} vs its dense variant, ε {e}", official, at(official, e), at(dense, e))
               for official, dense in ((eq, "eq_d4d2"), (cnn, "cnn_c1")) for e in (8, 1)]
    if fair_wrn is not None:
        wanted += [(f"{MODEL_LABELS[m]} (ε 8) vs WRN-16-4 with its authors' recipe", m, at(m, 8), fair_wrn)
                   for m in (eq, cnn)]
    wanted += [(f"ablation: official D4→D2 vs {MODEL_LABELS[f'{eq}_{name}']}, ε 8", eq, at(eq, 8),
                at(f"{eq}_{name}", 8)) for name in ABLATIONS]
    return wanted


def comparisons(configs):
    """A - B in points for each wanted pair whose runs exist; the spread is the larger min-max of a side with more
    than one seed, and the margin is beyond chance only if it exceeds that. A spread seen on one side only (the
    other has one seed) is flagged: it says less about chance than one seen on both."""
    rows = []
    for what, subject, a, b in _wanted(fair_wrn_key(configs)):
        if a in configs and b in configs:
            sides = (configs[a], configs[b])
            ranges = [s["max"] - s["min"] for s in sides if s["n"] > 1]
            spread = round(max(ranges), 1) if ranges else None
            delta = _points(sides[0]["mean"], sides[1]["mean"])
            rows.append({"what": what, "subject": subject, "a": sides[0], "b": sides[1], "delta": delta,
                         "spread": spread, "beyond": None if spread is None else abs(delta) > spread,
                         "one_sided": len(ranges) == 1})
    return rows


def best_private(configs, eps=8):
    candidates = [c for k, c in configs.items() if k[2] == eps and not c["untuned"]]
    return max(candidates, key=lambda c: c["mean"]) if candidates else None


def published(configs):
    """[(who, model, epsilon, their accuracy, our best configuration at that simulated epsilon, ours - theirs)] for
    each published figure at an epsilon we ran."""
    rows = []
    for who, model, eps, acc in PUBLISHED:
        best = best_private(configs, eps)
        if best is not None:
            rows.append((who, model, eps, acc, best, _points(best["mean"], acc)))
    return rows


def _interpolate(points, x):
    """y at x on the polyline through (x, y) points sorted by x, or None outside it."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1] if points and x == points[-1][0] else None


def first_step_reaching(curve, target):
    """The first step at which the accuracy curve reaches ``target``, linear between evaluations; None if never."""
    for i, (step, acc) in enumerate(curve):
        if acc >= target:
            return step if i == 0 else _interpolate([(a, s) for s, a in curve[i - 1:i + 1]], target)
    return None


def load_step_times(folder):
    """{model: {seconds_per_view, nonprivate_seconds_per_view, macs_per_view, batch, cpu, started, command}} from the
    side-by-side benchmark run (the DP step at its largest batch; the non-private step at that batch, if measured)."""
    path = os.path.join(folder, STEP_TIMES_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        saved = json.load(f)

    def cells(name, mode):
        return {c["batch"]: c["step_s"] / (c["batch"] * c["views"]) for c in saved["cells"]
                if (c["model"], c["mode"], c["status"], c["precision"], c["xla"]) == (name, mode, "ok", "fp32", "off")}

    times = {}
    for model, name in BENCHMARK_MODELS.items():
        dp, nonprivate = cells(name, "dp"), cells(name, "nonprivate")
        if dp:
            batch = max(dp)
            times[model] = {"seconds_per_view": dp[batch], "nonprivate_seconds_per_view": nonprivate.get(batch),
                            "macs_per_view": saved["calibration"]["models"].get(name, {}).get("macs_per_view"),
                            "batch": batch, "cpu": saved["machine"].get("cpu", "?"), "started": saved["started"],
                            "command": saved.get("command")}
    return times


def time_to_accuracy(configs, step_times):
    """Rows for each model's simulated-epsilon-8 configuration (B = 256, K = 1) and the fair WRN-16-4, and the fair
    WRN's final accuracy (the target). Full scale: the steps at the batch the run simulates, K as trained."""
    fair = fair_wrn_key(configs)
    target = configs[fair]["mean"] if fair else None
    keys = [k for k in configs if k[0] in BENCHMARK_MODELS and k[1:] == (PAPER_RECIPE, 8, TAN_BATCH, 1)]
    rows = []
    for key in keys + ([fair] if fair else []):
        c, times = configs[key], step_times.get(key[0], {})
        seconds, plain = times.get("seconds_per_view"), times.get("nonprivate_seconds_per_view")
        views_per_step = c["simulated_batch"] * key[4]
        reach = None if target is None else first_step_reaching(c["curve"], target)
        rows.append({"key": key, "steps": c["steps"], "views_per_step": views_per_step, "reach_step": reach,
                     "accuracy": [_interpolate(c["curve"], f * c["steps"]) for f in FRACTIONS],
                     "macs_per_view": times.get("macs_per_view"), "seconds_per_view": seconds,
                     "nonprivate_seconds_per_view": plain,
                     "full_run_hours": _cpu_hours(c["steps"], views_per_step, seconds),
                     "reach_hours": _cpu_hours(reach, views_per_step, seconds),
                     "reach_hours_nonprivate_step": _cpu_hours(reach, views_per_step, plain)})
    return rows, target


def _cpu_hours(steps, views_per_step, seconds_per_view):
    return None if None in (steps, seconds_per_view) else steps * views_per_step * seconds_per_view / 3600


# --- the tables in markdown ----------------------------------------------------------------------------------------

def _fmt(value, pattern, missing="–"):
    return missing if value is None else pattern.format(value)


def configurations_table(configs):
    rows = []
    # by model and recipe, then sigma = 0 and decreasing epsilon, the study's own batch first
    for key in sorted(configs, key=lambda k: (k[0], k[1] != PAPER_RECIPE, -(k[2] or 1e9), k[3] != TAN_BATCH, k[3],
                                              k[4])):
        c, (model, recipe_label, _, batch, views) = configs[key], key
        rows.append([MODEL_LABELS[model], f"{c['parameters']:,}",
                     recipe_label + (" (untuned for WRN: no sentence rests on it)" if c["untuned"] else ""),
                     _fmt(c["simulated_epsilon"], "{:.2f}", "σ = 0"),
                     f"{c['steps']} × {batch}" + (f" × {views}" if views > 1 else ""), c["n"], f"{c['mean']:.1f}%",
                     f"{c['min']:.1f}–{c['max']:.1f}" if c["n"] > 1 else "–", ", ".join(c["runs"])])
    return markdown(["model", "parameters", "recipe", "simulated ε", "steps × B (× K)", "seeds", "test acc. (mean)",
                     "min–max", "runs"], rows)


def comparisons_table(rows):
    return markdown(["comparison (A vs B)", "A: mean (seeds)", "B: mean (seeds)", "A − B (points)",
                     "seed spread (largest min–max)", "beyond the spread?"],
                    [[r["what"], f"{r['a']['mean']:.1f}% ({r['a']['n']})", f"{r['b']['mean']:.1f}% ({r['b']['n']})",
                      f"{r['delta']:+.1f}",
                      _fmt(r["spread"], "{:.1f}", "one seed each") + (" (one side's seeds)" if r["one_sided"] else ""),
                      "–" if r["beyond"] is None else ("yes" if r["beyond"] else "no")] for r in rows])


def published_table(rows):
    return markdown(["published (full-scale private runs on GPUs)", "model", "ε", "accuracy",
                     "our best at that simulated ε (mean over seeds)", "ours − theirs (points)"],
                    [[who, model, eps, f"{acc:.2f}%", f"{label(best['key'])}: {best['mean']:.1f}%", f"{delta:+.1f}"]
                     for who, model, eps, acc, best, delta in rows])


def time_table(rows, target):
    not_reached = "–" if target is None else "not reached"

    def reached(hours, r):
        return _fmt(hours, "{:.0f} h", not_reached if r["reach_step"] is None else "–")

    return markdown(
        ["configuration", "steps", "acc. at 25%", "at 50%", "at 100%", "multiply-adds / view", "DP step / view",
         "non-private step / view", "full-scale views / step", "full-scale run, CPU time",
         "first step at the fair WRN's final accuracy" + _fmt(target, " ({:.1f}%)", ""),
         "CPU time to reach it (full scale)", "the same at the non-private step's cost"],
        [[label(r["key"]), r["steps"], *[_fmt(a, "{:.1f}%") for a in r["accuracy"]],
          _fmt(r["macs_per_view"] and r["macs_per_view"] / 1e6, "{:.0f}M"),
          _fmt(r["seconds_per_view"] and 1e3 * r["seconds_per_view"], "{:.1f} ms"),
          _fmt(r["nonprivate_seconds_per_view"] and 1e3 * r["nonprivate_seconds_per_view"], "{:.1f} ms"),
          f"{r['views_per_step']:,}", _fmt(r["full_run_hours"], "{:.0f} h"),
          _fmt(r["reach_step"], "{:.0f}", not_reached), reached(r["reach_hours"], r),
          reached(r["reach_hours_nonprivate_step"], r)] for r in rows])


def _headline_cell(c):
    if c is None:
        return "–"
    seeds = f"{c['min']:.1f}–{c['max']:.1f}, {c['n']} seeds" if c["n"] > 1 else "1 seed"
    return f"{c['mean']:.1f}% ({seeds})"


def headline_table(configs):
    """The README's results: one row per model of the paper's comparison, official and dense variants (the paper's
    recipe at the study's batch, K = 1) and the fair WRN-16-4, mean and min-max over seeds per simulated epsilon. The fair WRN's recipe sets its
    own epsilon: it stands in the nearest column, which says its epsilon when it rounds to another."""
    columns = ["simulated ε = 8" if eps == 8 else "no noise (σ = 0)" if eps is None else f"ε = {eps}"
               for eps in HEADLINE_EPSILONS]
    rows = []
    for model in ("eq_d4d2_official", "cnn_c1_official", "eq_d4d2", "cnn_c1"):  # the paper's own models first
        found = {eps: configs.get((model, PAPER_RECIPE, eps, TAN_BATCH, 1)) for eps in HEADLINE_EPSILONS}
        if any(found.values()):
            parameters = next(c for c in found.values() if c)["parameters"]
            rows.append([MODEL_LABELS[model], f"{parameters:,}", *map(_headline_cell, found.values())])
    fair = fair_wrn_key(configs)
    if fair is not None:
        c = configs[fair]
        column = min((i for i, eps in enumerate(HEADLINE_EPSILONS) if eps is not None),
                     key=lambda i: abs(HEADLINE_EPSILONS[i] - c["simulated_epsilon"]))
        cells = ["–"] * len(HEADLINE_EPSILONS)
        cells[column] = _headline_cell(c) + ("" if round(c["simulated_epsilon"]) == HEADLINE_EPSILONS[column] else
                                             f" at ε = {c['simulated_epsilon']:.2f}")
        rows.append([f"{MODEL_LABELS[fair[0]]}, its authors' recipe", f"{c['parameters']:,}", *cells])
    return markdown(["model", "parameters", *columns], rows)
