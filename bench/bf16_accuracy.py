"""Does mixed_bfloat16 change what a short DP-SGD run learns, and does it pay? (issue 7; prints a table)

    python bench/bf16_accuracy.py                         # paper model, 40 steps of 256 on 10,000 images
    python bench/bf16_accuracy.py --model cnn_c1 --steps 80

Runs the training program (``eqdp_tf.training.loop.run``) twice in child processes, fp32 and
mixed_bfloat16, with the same ``--dp_seed``: the same Poisson batches, initial weights and noise, so the
precision is the only difference. Under mixed_bfloat16 the layers compute in bf16 while variables, and so
the per-example gradients' clipping, the noise, the accumulators and the accountant, stay float32; the
logits are cast to float32 before the loss, as the Keras mixed-precision guide advises.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import harness  # bench/harness.py: the child-process protocol shared by the bench scripts

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_DIR = os.path.join(REPO_ROOT, "..", "shared", "data", "cifar10", "cifar-10-batches-bin")
MODELS = {
    "eq_d4d2": {"architecture": "eq_resnet9", "group": "D4", "restrict": "D2", "head": "paper"},
    "cnn_c1": {"architecture": "eq_resnet9", "group": "C1", "restrict": "none", "head": "paper"},
}


def _child(spec):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, REPO_ROOT)
    import tensorflow as tf

    from eqdp_tf.config import TrainConfig
    from eqdp_tf.models import with_float32_logits
    from eqdp_tf.training import loop

    if spec["precision"] == "bf16":
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
        plain_build = loop.build_model
        loop.build_model = lambda cfg: with_float32_logits(plain_build(cfg))
    cfg = TrainConfig(**MODELS[spec["model"]], steps=spec["steps"], batch_size=spec["batch"],
                      physical_batch_size=spec["physical_batch"], num_views=1, dp=True, target_epsilon=8.0,
                      dp_seed=0, train_subset=spec["train_subset"], test_subset=spec["test_subset"],
                      data_dir=spec["data_dir"], output_dir=spec["output_dir"], eval_every=spec["steps"],
                      checkpoint_every=spec["steps"], log_every=max(1, spec["steps"] // 4), export=False,
                      jit_compile="false")
    started = time.perf_counter()
    loop.run(cfg)
    seconds = time.perf_counter() - started
    with open(os.path.join(spec["output_dir"], "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    with open(os.path.join(spec["output_dir"], "privacy.json")) as f:
        privacy = json.load(f)
    return {"precision": spec["precision"], "test_accuracy": last["test_accuracy"], "loss": last.get("loss"),
            "epsilon": privacy["epsilon"], "views_per_sec": last.get("views_per_sec"), "seconds": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="eq_d4d2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256, help="expected logical batch")
    parser.add_argument("--physical-batch", type=int, default=128)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with cifar-10-batches-bin")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return harness.child_main(_child, args.child)
    if min(args.steps, args.batch, args.physical_batch, args.train_subset, args.test_subset) < 1:
        parser.error("--steps, --batch, --physical-batch, --train-subset and --test-subset must be positive")
    if not os.path.isdir(args.data_dir):
        parser.error(f"CIFAR-10 folder {args.data_dir} not found; pass --data-dir")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            spec = {"precision": precision, "model": args.model, "steps": args.steps, "batch": args.batch,
                    "physical_batch": args.physical_batch, "train_subset": args.train_subset,
                    "test_subset": args.test_subset, "data_dir": os.path.abspath(args.data_dir),
                    "output_dir": os.path.join(tmp, precision)}
            print(f"{precision}: training ...", file=sys.stderr, flush=True)
            result, _ = harness.run_child(__file__, spec)
            if result.get("status") in ("error", "skipped"):
                sys.exit(f"error: the {precision} run failed: {result.get('error', result)}")
            results.append(result)
    print(f"{args.model}, DP-SGD (target epsilon 8 over {args.steps} steps of {args.batch} from "
          f"{args.train_subset} images), same dp_seed; test accuracy on {args.test_subset} test images, EMA weights")
    print("| precision | test accuracy | epsilon | views/s (last window) | run time s |")
    print("|---|---|---|---|---|")
    for r in results:
        rate = "n/a" if r["views_per_sec"] is None else f"{r['views_per_sec']:.0f}"
        print(f"| {r['precision']} | {100 * r['test_accuracy']:.1f}% | {r['epsilon']:.2f} | {rate} | "
              f"{r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
