"""Where the DP step's extra time goes, piece by piece (issue 7). Prints a table; asserts nothing.

    python bench/profile_dp_step.py                  # paper model (D4->D2), batch 64
    python bench/profile_dp_step.py --group C1 --batch 256

Times, each as its own tf.function on the same inputs (median of --steps after --warmup):

1. the non-private step's gradient (one batched backward to the weights);
2. the shared part of the DP step: forward pass plus the backward to every layer's output (dL/dZ) only;
3. per layer type, the per-example weight-gradient rules applied to the recorded (X, dL/dZ): for group
   convolutions split into the per-tap filter gradient and the transpose of the kernel expansion;
4. the whole per-example gradient (2 + 3) and the whole DP accumulate (+ clipping and the masked sum).

The differences show what DP adds on top of the non-private step and where.
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
from eqdp_tf.models.names import restricted_group  # noqa: E402
from eqdp_tf.privacy import per_example  # noqa: E402
from eqdp_tf.privacy.dp_step import DPKerasSGDOptimizer, DPStep  # noqa: E402


def _loss(labels, logits):
    return tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", default="D4")
    parser.add_argument("--restrict", default="D2", help="'none' for no restriction")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args(argv)
    tf.keras.utils.set_random_seed(0)
    restrict = restricted_group(args.restrict)
    model = build_model("eq_resnet9", group=args.group, restrict=restrict, head="paper")
    batch = args.batch
    views = tf.cast(tf.random.uniform([batch, 1, 32, 32, 3], 0, 256, dtype=tf.int32), tf.uint8)
    images = tf.cast(views[:, 0], tf.float32)
    labels = tf.random.uniform([batch], 0, 10, dtype=tf.int64)
    mask = tf.ones([batch], tf.float32)

    @tf.function(autograph=False)
    def nonprivate_gradient():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(_loss(labels, model(images, training=True)))
        return tape.gradient(loss, model.trainable_variables)

    # The shared part: forward + backward to the layer outputs, exactly as the DP step does it.
    def forward_backward():
        recorded, _, _ = per_example.layer_output_gradients(
            model, images, lambda logits: (tf.reduce_sum(_loss(labels, logits)), None))
        return recorded

    layers_seen = forward_backward()
    shared = tf.function(lambda: [(x, dz) for _, x, dz in forward_backward()], autograph=False)
    xs_dzs = shared()

    def rules_of(kind):
        def run():
            out = []
            for (layer, _, _), (x, dz) in zip(layers_seen, xs_dzs):
                conv = per_example._is_conv_like(layer)
                expanded = hasattr(layer, "expanded_kernel")
                if kind == "conv filter (taps)" and conv:
                    k, s, padding = per_example.conv_geometry(layer)
                    rows = tf.reshape(dz, [batch, -1, dz.shape[-1]])
                    out.append(per_example._kernel_grad_by_taps(x, rows, k, s, padding, batch))
                elif kind == "kernel-expansion transpose" and conv and expanded:
                    grad = tf.zeros([batch] + list(layer.expanded_kernel().shape))
                    out.append(per_example._kernel_vjp(layer.expanded_kernel, [layer.kernel], grad)[0])
                elif kind == "all rules":
                    rule = per_example.layer_rule(layer)
                    out += [g for _, g in rule(layer, x, dz, batch, 1)]
            return out or [tf.zeros([])]
        return tf.function(run, autograph=False)

    def accumulate_fn(dp):
        optimizer = DPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=batch,
                                        learning_rate=0.1)
        return DPStep(model, None, optimizer, dp=dp).compiled_accumulate(False)

    accumulate, nonprivate_step = accumulate_fn(True), accumulate_fn(False)
    per_example_all = tf.function(
        lambda: per_example.per_example_gradients(model, _loss, views, labels, lambda v: tf.reduce_sum(v, 1))[0],
        autograph=False)

    rows = [
        ("non-private: batched gradient", nonprivate_gradient),
        ("non-private: DPStep(dp=False).accumulate", lambda: nonprivate_step(views, labels, mask)),
        ("DP shared part: forward + backward to layer outputs", shared),
        ("DP rules: conv filter gradients per example (taps)", rules_of("conv filter (taps)")),
        ("DP rules: kernel-expansion transpose per example", rules_of("kernel-expansion transpose")),
        ("DP rules: all layers", rules_of("all rules")),
        ("DP: per-example gradients (shared + rules)", per_example_all),
        ("DP: DPStep.accumulate (+ clipping, masked sum)", lambda: accumulate(views, labels, mask)),
    ]
    print(f"eq_resnet9 {args.group}->{restrict or args.group}, batch {batch}, K=1; median of {args.steps} "
          f"after {args.warmup} warm-up, TensorFlow {tf.__version__}")
    print("| piece | ms/step | us/view |")
    print("|---|---|---|")
    for name, fn in rows:
        seconds = harness.median_seconds(fn, args.warmup, args.steps)
        print(f"| {name} | {1e3 * seconds:.0f} | {1e6 * seconds / batch:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
