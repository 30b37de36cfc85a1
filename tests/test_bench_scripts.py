"""The in-process bench scripts run and print what they claim (their timings are not checked: no speed asserts)."""

import importlib.util
import os
import sys

from eqdp_tf.models import build_model
from eqdp_tf.privacy import clipped_sum

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _load(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)  # as when run as a script: bench/ modules import their siblings
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ghost_crossover_times_every_ghost_layer_and_reports_the_decision(capsys):
    _load("ghost_crossover").main(["--models", "eq_resnet9_c1", "--batch", "2", "--warmup", "0", "--steps", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| eq_resnet9_c1")]
    model = build_model(architecture="eq_resnet9", group="C1", restrict=None, head="paper")
    convs = [layer.name for layer in model.layers if layer.trainable_weights and "conv" in layer.name]
    assert [row[1].strip() for row in rows] == convs + ["logits"]  # every conv and the Dense head, in order
    for row in rows:
        materialise_ms, ghost_ms, ratio = float(row[6]), float(row[7]), float(row[8])
        assert materialise_ms > 0 and ghost_ms > 0 and abs(ratio - ghost_ms / materialise_ms) < 0.06 * ratio + 0.01
        gram_per_weight = float(row[5])
        pays = gram_per_weight < clipped_sum.GHOST_MACS_PER_WEIGHT
        assert row[9].strip() == str(pays), row
