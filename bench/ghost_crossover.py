"""Per layer, the two routes of `clipped_sum.py` timed against each other (issue 14). Prints a table; asserts nothing.

    python bench/ghost_crossover.py                     # WRN-16-4 and ResNet-9 over C1, batch 128
    python bench/ghost_crossover.py --models wrn16_4 --batch 256

For every layer where the ghost norm is exact (ordinary convs, C1 group convs, Dense), on the recorded input X
and output gradient dL/dZ of one batched pass: the time of the *materialise* route (per-example gradients,
their squared norms, the weighted sum) and of the *ghost* route (Gram-matrix norms, one batched weight gradient
of the reweighted dL/dZ), each as its own tf.function (median of --steps after --warmup). Beside them the cost
model's inputs: the Gram matrices' multiply-adds per example over the layer's weights (`gram/p`), and what
`ghost_pays` decides. The route that is faster on a layer should be the one `ghost_pays` picks; the gram/p
where the two times cross is what `clipped_sum.GHOST_MACS_PER_WEIGHT` stands for. Needs a quiet CPU.
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

MODELS = {"wrn16_4": dict(architecture="wrn16_4"),
          "eq_resnet9_c1": dict(architecture="eq_resnet9", group="C1", restrict=None, head="paper")}


def _recorded_layers(model, batch):
    images = tf.random.stateless_normal([batch, 32, 32, 3], seed=[0, 1])
    labels = tf.random.stateless_uniform([batch], seed=[0, 2], maxval=10, dtype=tf.int32)

    def loss_of(logits):
        losses = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        return tf.reduce_sum(losses), losses

    recorded, _, _ = per_example.layer_output_gradients(model, images, loss_of)
    return [(layer, tf.cast(x, dz.dtype), dz) for layer, x, dz in recorded if dz is not None]


def _route_fn(route, layer, x, dz, batch):
    weights = tf.random.stateless_uniform([batch], seed=[1, 3], minval=0.1, maxval=1.0)

    @tf.function
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
    args = parser.parse_args(argv)
    tf.keras.utils.set_random_seed(0)
    tf.get_logger().setLevel("ERROR")  # one tf.function per layer and route is the point here, not a retracing bug
    print(f"batch {args.batch}, K = 1, median of {args.steps} runs; ms per layer (both routes include the weighted sum)")
    print("| model | layer | X | dL/dZ | weights p | gram/p | materialise ms | ghost ms | ghost/materialise | ghost_pays |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = build_model(**MODELS[name])
        for layer, x, dz in _recorded_layers(model, args.batch):
            if not clipped_sum.ghost_allowed(layer, x, dz, 1):
                continue
            weights = sum(int(tf.size(v)) for v in layer.trainable_variables)
            gram = clipped_sum.ghost_gram_macs(layer, x, dz, 1)
            times = [harness.median_seconds(_route_fn(route, layer, x, dz, args.batch), args.warmup, args.steps)
                     for route in (clipped_sum.materialise_route, clipped_sum.ghost_route)]
            print(f"| {name} | {layer.name} | {list(x.shape[1:])} | {list(dz.shape[1:])} | {weights} | "
                  f"{gram / weights:.1f} | {1e3 * times[0]:.1f} | {1e3 * times[1]:.1f} | {times[1] / times[0]:.2f} | "
                  f"{clipped_sum.ghost_pays(layer, x, dz, 1)} |", flush=True)


if __name__ == "__main__":
    main()
