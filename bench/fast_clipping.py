"""TF-Privacy's own DPModel with and without our layer registry, next to our DP step and non-private Keras.

    python bench/fast_clipping.py [--batch 32] [--steps 5] [--models keras_cnn,cnn_c1,eq_d4d2] [--json out.json]

One training step (``train_on_batch``) of B examples, median of ``--steps`` after two warm-up steps, in one
process per cell (so memory and compiled functions do not carry over). Paths:

- ``nonprivate``: plain Keras (``model.compile`` with SGD), the reference.
- ``tfp_stock``: ``tensorflow_privacy.DPModel`` without a registry: per-example gradients by its vectorized path.
- ``tfp_registry``: the same ``DPModel`` with ``eqdp_tf.layer_registry()``: fast clipping from one batched pass.
- ``eqdp``: ``eqdp_tf.make_private`` (our DP step: per-example gradients by the layer rules, then clipping),
  stepped with ``train_on_batch`` like the others.

Prints a markdown table of views/s (higher is better) and the DP/non-private cost ratios.
"""

import argparse
import json
import os
import statistics
import sys
import time

import harness  # bench/harness.py: the child-process protocol shared by the bench scripts

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("nonprivate", "tfp_stock", "tfp_registry", "eqdp")
MODELS = ("keras_cnn", "cnn_c1", "eq_d4d2", "wrn16_4")


def _model(tf, name):
    if name == "keras_cnn":
        return tf.keras.Sequential([
            tf.keras.Input([32, 32, 3]), tf.keras.layers.Rescaling(1 / 255.0),
            tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            tf.keras.layers.GroupNormalization(groups=8),
            tf.keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
            tf.keras.layers.GroupNormalization(groups=8),
            tf.keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
            tf.keras.layers.Flatten(), tf.keras.layers.Dense(10)], name="keras_cnn")
    from eqdp_tf.models import build_model

    if name == "wrn16_4":
        return build_model("wrn16_4")
    group, restrict = ("C1", None) if name == "cnn_c1" else ("D4", "D2")
    return build_model("eq_resnet9", group=group, restrict=restrict, head="paper")


def _cell(spec):
    """Runs in a child process: the median seconds of one train_on_batch."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, REPO_ROOT)
    import numpy as np
    import tensorflow as tf
    from tensorflow_privacy.privacy.keras_models.dp_keras_model import DPModel

    import eqdp_tf

    tf.get_logger().setLevel("ERROR")
    tf.keras.utils.set_random_seed(0)
    batch, path = spec["batch"], spec["path"]
    base = _model(tf, spec["model"])
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if path == "nonprivate":
        model = base
    elif path in ("tfp_stock", "tfp_registry"):
        model = DPModel(
            l2_norm_clip=1.0, noise_multiplier=1.0, use_xla=False, inputs=base.inputs, outputs=base.outputs,
            layer_registry=eqdp_tf.layer_registry() if path == "tfp_registry" else None)
        if path == "tfp_registry" and not model._enable_fast_peg_computation:  # pylint: disable=protected-access
            return {"error": "not every trainable layer is in the registry"}
    else:
        model = eqdp_tf.make_private(base, l2_norm_clip=1.0, noise_multiplier=1.0, dataset_size=50_000,
                                     batch_size=batch)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=loss)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=[batch, 32, 32, 3]).astype(np.uint8)
    labels = rng.integers(0, 10, size=[batch]).astype(np.int64)
    x = images.astype(np.float32)
    times = []
    for i in range(spec["steps"] + 2):  # the first two: tracing and warm-up
        started = time.perf_counter()
        model.train_on_batch(x, labels)
        if i >= 2:
            times.append(time.perf_counter() - started)
    return {"seconds": statistics.median(times), "parameters": base.count_params()}


def run_cell(spec, timeout):
    result, _ = harness.run_child(__file__, spec, timeout=timeout)
    return result


def render(results, batch):
    lines = [f"| model (B = {batch}) | parameters | " + " | ".join(f"{p} views/s" for p in PATHS)
             + " | registry cost ÷ non-private | ours cost ÷ non-private | registry speed-up over stock"
             " | ours speed-up over stock |",
             "|" + "---|" * (len(PATHS) + 6)]
    for model, cells in results.items():
        rate = {p: batch / c["seconds"] if "seconds" in c else None for p, c in cells.items()}
        params = next((c["parameters"] for c in cells.values() if "parameters" in c), None)

        def ratio(a, b):
            return f"{rate[a] / rate[b]:.2f}" if rate[a] and rate[b] else "–"

        shown = [f"{rate[p]:.1f}" if rate[p] else f"({cells[p].get('error', 'failed')})" for p in PATHS]
        lines.append(f"| {model} | {params:,} | " + " | ".join(shown)
                     + f" | {ratio('nonprivate', 'tfp_registry')} | {ratio('nonprivate', 'eqdp')} | "
                       f"{ratio('tfp_registry', 'tfp_stock')} | {ratio('eqdp', 'tfp_stock')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.child:
        return harness.child_main(_cell, args.child)
    results = {}
    for model in args.models.split(","):
        results[model] = {}
        for path in PATHS:
            spec = {"model": model, "path": path, "batch": args.batch, "steps": args.steps}
            results[model][path] = run_cell(spec, args.timeout)
            print(model, path, results[model][path], flush=True)
    print(render(results, args.batch))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
