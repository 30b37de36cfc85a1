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


def test_layer_routes_times_every_layer_with_weights_and_reports_the_decision(capsys):
    _load("layer_routes").main(["--models", "eq_resnet9_c1", "--batch", "2", "--warmup", "0", "--steps", "1"])
    rows = [[cell.strip() for cell in line.split("|")[1:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| eq_resnet9_c1")]
    model = build_model(architecture="eq_resnet9", group="C1", restrict=None, head="paper")
    assert [row[1] for row in rows] == [layer.name for layer in model.layers if layer.trainable_weights]
    for row in rows:
        layer = model.get_layer(row[1])
        assert int(row[4]) == sum(int(v.shape.num_elements()) for v in layer.trainable_weights)
        assert float(row[5]) > 0 and float(row[6]) > 0  # batched and materialise timed for every layer
        # every layer of this model has an exact ghost form (convs over C1, whose expansion is the identity; Dense)
        ghost_ms, ratio, gram_per_weight = float(row[7]), float(row[8]), float(row[9])
        assert abs(ratio - ghost_ms / float(row[6])) < 0.06 * ratio + 0.01
        assert row[10] == str(gram_per_weight < clipped_sum.GHOST_MACS_PER_WEIGHT), row
    assert {row[10] for row in rows} == {"True", "False"}  # both routes occur in this model
