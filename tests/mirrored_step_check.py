"""Run by tests/test_distribution.py in a subprocess: DPStep under MirroredStrategy on 2 logical CPU devices
against DPStep on one device, on the same global batches, and (given an output folder and the CIFAR-10 folder)
(run with an output folder and the CIFAR-10 folder) a tiny mirrored training run. Prints one JSON object of
measured figures last.

(Logical devices must be configured before TensorFlow initialises its runtime, hence a process of its own.)
"""

import json
import sys

import numpy as np
import tensorflow as tf

REPLICAS = 2
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS)

from eqdp_tf import data as data_lib  # noqa: E402
from eqdp_tf.errors import ConfigError  # noqa: E402
from eqdp_tf.privacy.dp_step import DPKerasSGDOptimizer, DPStep  # noqa: E402
import test_dp_step as dp_step_tests  # noqa: E402  (the same small network as the single-device DP tests)

NUM_CLASSES = dp_step_tests.NUM_CLASSES
PHYSICAL = 6  # per replica
EXPECTED_BATCH = 16.0


def conv_net():
    tf.keras.utils.set_random_seed(5)
    return dp_step_tests.conv_net()


def make_data(num_examples=64, num_views=2):
    rng = np.random.default_rng(1)
    views = rng.normal(size=(num_examples, num_views, 8, 8, 2)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=num_examples).astype(np.int32)
    return views, labels


# Two logical steps: 20 examples (two global physical batches of 2 x 6, 4 padding rows), then 7 (one, 5 padding).
LOGICAL_BATCHES = [np.random.default_rng(2).choice(64, 20, replace=False), np.arange(30, 37)]


def train(strategy, make_optimizer, dp=True, noise_seeds=None):
    """Two logical steps under ``strategy`` (None: one device); returns the trainable weights and the replicas'
    copies of them."""
    views, labels = make_data()
    replicas = 1 if strategy is None else strategy.num_replicas_in_sync
    scope = tf.distribute.get_strategy().scope() if strategy is None else strategy.scope()
    with scope:
        model = conv_net()
        optimizer = make_optimizer()
        step = DPStep(model, None, optimizer, dp=dp)
    accumulate, apply = step.compiled_accumulate(), step.compiled_apply()
    for number, indices in enumerate(LOGICAL_BATCHES, 1):
        # One device takes the global physical batch of 2 x 6 rows at once; the replicas 6 rows each.
        size = PHYSICAL * (REPLICAS if strategy is None else 1)
        for batch in data_lib.split_for_replicas(indices, size, replicas):
            if strategy is None:
                accumulate(views[batch.indices[0]], labels[batch.indices[0]], batch.mask[0])
            else:
                inputs = strategy.experimental_distribute_values_from_function(
                    lambda ctx, b=batch: (views[b.indices[ctx.replica_id_in_sync_group]],
                                          labels[b.indices[ctx.replica_id_in_sync_group]],
                                          b.mask[ctx.replica_id_in_sync_group]))
                accumulate(*inputs)
        if noise_seeds is not None:
            optimizer.set_noise_seed(noise_seeds[number])
        apply()
    weights = [v.numpy() for v in model.trainable_variables]
    copies = [[c.numpy() for c in strategy.experimental_local_results(v)] if strategy else [v.numpy()]
              for v in model.trainable_variables]
    return weights, copies


def max_difference(a, b):
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b))


def max_relative_difference(a, b):
    return max(float(np.max(np.abs(x.astype(np.float64) - y)) / np.max(np.abs(y))) for x, y in zip(a, b))


def replica_spread(copies):
    return max(max_difference([c[0]], [c[i]]) for c in copies for i in range(len(c)))


def mirrored_strategy():
    """One strategy for the whole process (a second one would reuse the first's collective instance keys)."""
    global _STRATEGY
    if _STRATEGY is None:
        _STRATEGY = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    return _STRATEGY


_STRATEGY = None


def compare(make_optimizer, **kwargs):
    mirrored = mirrored_strategy()
    single, _ = train(None, make_optimizer, **kwargs)
    initial = [v.numpy() for v in conv_net().trainable_variables]
    distributed, copies = train(mirrored, make_optimizer, **kwargs)
    return {
        "replicas": mirrored.num_replicas_in_sync,
        "max_abs_diff": max_difference(distributed, single),
        "max_rel_diff": max_relative_difference(distributed, single),
        "update_size": max_difference(single, initial),
        "replica_spread": replica_spread(copies),
    }


def noise_std(sigma=2.0, clip=3.0, lr=0.5):
    """Std of the update of a 2000 x 25 kernel whose gradients are zero, under MirroredStrategy (TF-Privacy's
    stateful GaussianSumQuery noise, drawn on replica 0 only)."""
    mirrored = mirrored_strategy()
    with mirrored.scope():
        model = tf.keras.Sequential([tf.keras.layers.Flatten(),
                                     tf.keras.layers.Dense(25, use_bias=False, kernel_initializer="zeros")])
        model.build([None, 1, 1, 2000])
        optimizer = DPKerasSGDOptimizer(clip, sigma, EXPECTED_BATCH, lr)
        step = DPStep(model, None, optimizer)
    accumulate, apply = step.compiled_accumulate(), step.compiled_apply()
    try:  # the same tensors for every replica would count each example once per replica
        accumulate(tf.zeros([4, 1, 1, 1, 2000]), tf.constant([0, 1, 2, 3]), tf.ones([4]))
        refused = False
    except ConfigError:
        refused = True
    deltas = []
    for _ in range(2):
        before = model.trainable_variables[0].numpy().copy()
        inputs = mirrored.experimental_distribute_values_from_function(
            lambda ctx: (tf.zeros([4, 1, 1, 1, 2000]), tf.constant([0, 1, 2, 3]), tf.ones([4])))
        stats = accumulate(*inputs)  # zero inputs: every example's gradient is zero
        gradient_sum = float(sum(np.abs(a.numpy()).sum() for a in step.accumulators))
        apply()
        kernel = model.trainable_variables[0]
        copies = [c.numpy() for c in mirrored.experimental_local_results(kernel)]
        deltas.append((copies[0] - before).ravel())
    expected = lr * sigma * clip / EXPECTED_BATCH
    return {
        "replicas": mirrored.num_replicas_in_sync,
        "coordinates": int(deltas[0].size),
        "count": float(stats["count"]),
        "gradient_sum": gradient_sum,
        "measured_std": [float(d.std()) for d in deltas],
        "expected_std": expected,
        "mean": [float(d.mean()) for d in deltas],
        "correlation": float(np.corrcoef(deltas[0], deltas[1])[0, 1]),
        "replica_spread": max_difference([copies[0]], [copies[1]]),
        "same_inputs_for_every_replica_refused": refused,
    }


def training_run(output_dir, data_dir):
    """A tiny train.py run with --distribution=mirrored over the 2 logical CPU devices (augmentation on)."""
    from eqdp_tf.config import TrainConfig
    from eqdp_tf.training import loop

    cfg = TrainConfig(
        architecture="eq_resnet9", group="C1", restrict="none", data_dir=data_dir, train_subset=256, test_subset=64,
        steps=3, batch_size=32, physical_batch_size=8, num_views=2, noise_multiplier=1.0, target_epsilon=None,
        learning_rate=0.01, eval_every=3, checkpoint_every=3, eval_batch_size=64, output_dir=output_dir, seed=3,
        distribution="mirrored")
    result = loop.run(cfg)
    return {"epsilon": result["epsilon"], "export_path": result["export_path"], "steps_spent": result["steps_spent"],
            "test_accuracy": result["test_accuracy"]}


def main():
    if len(sys.argv) == 3:  # a process of its own: a second strategy in one process would reuse collective keys
        results = {"training": training_run(*sys.argv[1:])}
    else:
        seeds = {1: np.array([3, 4]), 2: np.array([5, 6])}
        results = {
            "sigma0": compare(lambda: DPKerasSGDOptimizer(0.5, 0.0, EXPECTED_BATCH, 0.1, momentum=0.9)),
            "nonprivate": compare(lambda: DPKerasSGDOptimizer(0.5, 0.0, EXPECTED_BATCH, 0.1), dp=False),
            "keyed_noise": compare(lambda: DPKerasSGDOptimizer(0.5, 1.5, EXPECTED_BATCH, 0.1, momentum=0.9),
                                   noise_seeds=seeds),
            "noise": noise_std(),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
