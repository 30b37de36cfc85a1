"""Per layer, what the DP step pays against what non-private training pays (issue 14). Prints a table; asserts nothing.

    python bench/layer_routes.py                                  # all three models, batch 128
    python bench/layer_routes.py --models wrn16_4 --batch 256

For every layer with weights, on the recorded input X and output gradient dL/dZ of one batched pass, each as its
own tf.function (median of --steps after --warmup):

- *batched*: the layer's weight gradient as non-private training computes it (one Conv2DBackpropFilter or matmul;
  for a group conv, of the expanded kernel, then back through the expansion once);
- *materialise*: `clipped_sum.materialise_route`, the per-example gradients, their squared norms and the
  weighted sum;
- *ghost*: `clipped_sum.ghost_route`, Gram-matrix norms and one batched gradient of the reweighted dL/dZ, where
  the ghost norm is exact (ordinary convs, C1 group convs, Dense); for group convs over exact groups
  `clipped_sum.gather_ghost_route` instead (`gather_ghost.py`), for weight-standardised convs
  `clipped_sum.standardized_ghost_route`; the route is named in the last column.

Beside them the cost model's input, the Gram matrices' multiply-adds per example over the entries of the
per-example gradient the materialise route forms (`gram/entries`: the layer's weights p; for a group conv, its
expanded kernel's entries too), and what `ghost_pays` decides. Where the ghost and materialise times cross in
gram/entries is what `clipped_sum.GHOST_MACS_PER_WEIGHT` stands for; materialise minus batched is the DP step's
extra time on that layer. Needs a quiet CPU.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import tensorflow as tf  # noqa: E402

import harness  # noqa: E402  bench/harness.py: median_seconds
from eqdp_tf.models import build_model  # noqa: E402
from eqdp_tf.privacy import clipped_sum, per_example  # noqa: E402

# The dense variant of the ResNet-9 (free taps: every ghost route applies), as the tables of 2026-12-01/05 measured;
# the official model's group convolutions (steerable, standardised) are always materialised.
MODELS = {"eq_resnet9_d4d2": dict(architecture="eq_resnet9", group="D4", restrict="D2", head="paper", variant="dense"),
          "wrn16_4": dict(architecture="wrn16_4"),
          "eq_resnet9_c1": dict(architecture="eq_resnet9", group="C1", restrict=None, head="paper", variant="dense"),
          "eq_resnet9_d4d2_official": dict(architecture="eq_resnet9", group="D4", restrict="D2", head="paper")}


def _recorded_layers(model, batch):
    images = tf.random.stateless_normal([batch, 32, 32, 3], seed=[0, 1])
    labels = tf.random.stateless_uniform([batch], seed=[0, 2], maxval=10, dtype=tf.int32)

    def loss_of(logits):
        losses = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        return tf.reduce_sum(losses), losses

    recorded, _, _ = per_example.layer_output_gradients(model, images, loss_of)
    return [(layer, tf.cast(x, dz.dtype), dz) for layer, x, dz in recorded if dz is not None]


def _batched_weight_gradient(layer, x, dz):
    """The layer's weight gradient summed over the batch, as the non-private step forms it."""
    if per_example.is_dense(layer):
        return [tf.linalg.matmul(tf.reshape(x, [-1, x.shape[-1]]), tf.reshape(dz, [-1, dz.shape[-1]]),
                                 transpose_a=True)]
    if not per_example.conv_rule_applies(layer):
        with tf.GradientTape() as tape:
            out = tf.cast(layer(x, training=True), dz.dtype)
        return tape.gradient(out, layer.trainable_weights, output_gradients=dz)
    k, s, padding = per_example.conv_geometry(layer)
    kernel = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=[k, k, x.shape[-1], dz.shape[-1]],
                                             out_backprop=dz, strides=[1, s, s, 1], padding=padding)
    if not hasattr(layer, "expanded_kernel"):
        return [kernel]
    with tf.GradientTape() as tape:
        expanded = layer.expanded_kernel()
    return [tape.gradient(expanded, layer.kernel, output_gradients=tf.reshape(kernel, tf.shape(expanded)))]


def _gram_gigabytes(layer, x, batch):
    """About what the ghost route's Gram matrices hold at once: per example one over the padded input's positions
    (squared), |G| of them for a group conv's gather route. At 32x32 with |G| = 8 that is tens of GB, where the
    route could never pay anyway (``ghost_pays`` is far from choosing it); timing it there only ends in the OOM killer.
    """
    k = per_example.conv_geometry(layer)[0] if per_example.conv_rule_applies(layer) else 1
    positions = (x.shape[1] + k - 1) * (x.shape[2] + k - 1) if len(x.shape) == 4 else 1
    copies = layer.group.order if hasattr(layer, "group") else 1
    return 2 * batch * copies * positions ** 2 * 4 / 1e9


def _timed(fn, args):
    return 1e3 * harness.median_seconds(tf.function(fn), args.warmup, args.steps)


def _route_fn(route, layer, x, dz, batch):
    weights = tf.random.stateless_uniform([batch], seed=[1, 3], minval=0.1, maxval=1.0)

    def run():
        squared, weighted_sum = route(layer, x, dz, batch, 1)
        return squared, [value for _, value in weighted_sum(weights)]

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--ghost-memory-gb", type=float, default=4.0,
                        help="leave the ghost route untimed where its Gram matrices would hold more than this")
    args = parser.parse_args(argv)
    tf.keras.utils.set_random_seed(0)
    tf.get_logger().setLevel("ERROR")  # one tf.function per layer and route is the point here, not a retracing bug
    print(f"batch {args.batch}, K = 1, median of {args.steps} runs, ms per layer; TensorFlow {tf.__version__}")
    print("| model | layer | X | dL/dZ | weights p | batched ms | materialise ms | ghost ms | ghost/materialise | "
          "gram/entries | ghost_pays | ghost route |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = build_model(**MODELS[name])
        for layer, x, dz in _recorded_layers(model, args.batch):
            weights = sum(int(tf.size(v)) for v in layer.trainable_variables)
            batched = _timed(lambda: _batched_weight_gradient(layer, x, dz), args)
            materialise = _timed(_route_fn(clipped_sum.materialise_route, layer, x, dz, args.batch), args)
            ghost_cells = ["–"] * 5
            cost = clipped_sum.route_cost(layer, x, dz, 1)
            gram_gb = _gram_gigabytes(layer, x, args.batch)
            if cost is not None and gram_gb > args.ghost_memory_gb:
                ghost_cells = [f"not timed (Gram matrices ~{gram_gb:.0f} GB)", "–", f"{cost[1] / cost[2]:.1f}",
                               str(clipped_sum.ghost_pays(layer, x, dz, 1)), cost[0]]
            elif cost is not None:
                route = clipped_sum._route("ghost", layer, x, dz, 1)  # pylint: disable=protected-access
                ghost = _timed(_route_fn(route, layer, x, dz, args.batch), args)
                ghost_cells = [f"{ghost:.1f}", f"{ghost / materialise:.2f}", f"{cost[1] / cost[2]:.1f}",
                               str(clipped_sum.ghost_pays(layer, x, dz, 1)), cost[0]]
            print(f"| {name} | {layer.name} | {list(x.shape[1:])} | {list(dz.shape[1:])} | {weights} | {batched:.1f} | "
                  f"{materialise:.1f} | " + " | ".join(ghost_cells) + " |", flush=True)


if __name__ == "__main__":
    main()
