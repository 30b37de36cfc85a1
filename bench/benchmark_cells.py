"""The measurements of ``benchmark.py``, each run in a child process of its own: one training-step cell, the
machine's peak matmul rate and the models' MACs, and the input pipeline. See ``benchmark.py`` for what they mean."""

import os
import resource
import statistics
import time

import harness  # bench/harness.py: the child-process protocol shared by the bench scripts

_CHILD_START = time.perf_counter()

MODELS = {
    # The dense variant (free 9-tap filters): the paper model of every grid before issue 38.
    "eq_resnet9_d4d2": {"architecture": "eq_resnet9", "group": "D4", "restrict": "D2", "variant": "dense"},
    "eq_resnet9_c1": {"architecture": "eq_resnet9", "group": "C1", "restrict": None, "variant": "dense"},
    # The official code's model (steerable basis, weight-standardised coefficients; issue 38).
    "eq_resnet9_d4d2_official": {"architecture": "eq_resnet9", "group": "D4", "restrict": "D2", "variant": "official"},
    "eq_resnet9_c1_official": {"architecture": "eq_resnet9", "group": "C1", "restrict": None, "variant": "official"},
    # The official code's SO(2) model with L = 1 (configs/cifar10_so2.cfg; issue 42), on request.
    "eq_resnet9_so2_official": {"architecture": "eq_resnet9", "group": "SO2", "restrict": "C1", "variant": "official",
                                "so2_frequency": 1},
    "wrn16_4": {"architecture": "wrn16_4"},  # weight-standardised, its default since issue 26
    # Without weight standardisation: the WRN-16-4 of grids before 2026-12-05, for comparing engines on one model.
    "wrn16_4_plain": {"architecture": "wrn16_4", "weight_standardization": False},
}
# the grid's; wrn16_4_plain and eq_resnet9_so2_official on request
DEFAULT_MODELS = ("eq_resnet9_d4d2_official", "eq_resnet9_c1_official", "eq_resnet9_d4d2", "eq_resnet9_c1", "wrn16_4")
MODEL_LABELS = {
    "eq_resnet9_d4d2": "Eq. ResNet-9 (D4->D2), dense",
    "eq_resnet9_c1": "ResNet-9 (C1), dense",
    "eq_resnet9_d4d2_official": "Eq. ResNet-9 (D4->D2), official",
    "eq_resnet9_c1_official": "ResNet-9 (C1), official",
    "eq_resnet9_so2_official": "Eq. ResNet-9 (SO(2) L=1->C1), official",
    "wrn16_4": "WRN-16-4",
    "wrn16_4_plain": "WRN-16-4 (no WS)",
}
# dp_materialise: our DP step with every layer's per-example gradients materialised (the engine before ghost
# norms), so a grid can compare both in one run.
MODES = ("nonprivate", "dp", "dp_materialise", "tfp_stock")
DEFAULT_MODES = ("nonprivate", "dp", "tfp_stock")
PRECISIONS = ("fp32", "bf16")
BF16_MODES = ("nonprivate", "dp", "dp_materialise")
XLA_CHOICES = ("off", "on")
DEFAULT_BATCHES = (32, 64, 128, 256, 512)
# The local CIFAR-10 copy beside the checkout (as the tests use it), for the input-pipeline measurement.
CIFAR_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data",
                         "cifar10", "cifar-10-batches-bin")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

L2_NORM_CLIP = 2.0
NOISE_MULTIPLIER = 1.0
# Small enough that weights stay finite over a few steps on random labels (NaNs or denormals could
# change the timing); the update itself costs the same for any value.
LEARNING_RATE = 0.01


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import layers  # noqa: F401  first: Keras 2 as tf.keras on TensorFlow 2.16+ (layers/_tf_setup.py)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    return tf


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _build_model(tf, name):
    from eqdp_tf.models import build_model, with_float32_logits

    return with_float32_logits(build_model(**MODELS[name]))


def count_macs(tf, model):
    """Multiply-accumulates of one forward pass of one image, from the layers' static shapes."""
    import layers as eq_layers

    # (The SO(2) model's Fourier ELU and blur pooling are not convolutions of weights: not counted.)
    conv_types = (tf.keras.layers.Conv2D, eq_layers.LiftingConv2D, eq_layers.GroupConv2D, eq_layers.StandardizedConv2D,
                  eq_layers.BandLimitedConv2D)
    total = 0
    for layer in model.layers:
        if isinstance(layer, conv_types):
            size = layer.kernel_size
            kh, kw = (size, size) if isinstance(size, int) else tuple(size)
            in_channels = int(layer.input.shape[-1])
            height, width, out_channels = (int(d) for d in layer.output.shape[1:])
            total += kh * kw * in_channels * out_channels * height * width
        elif isinstance(layer, tf.keras.layers.Dense):
            total += int(layer.input.shape[-1]) * layer.units
        elif isinstance(layer, tf.keras.Model):
            total += count_macs(tf, layer)
    return total


def _make_step(tf, spec, model, views, labels, mask):
    """Returns a function running one full training step and returning the loss as a Python float."""
    batch, num_views = spec["batch"], spec["views"]
    xla = spec["xla"] == "on"
    if spec["mode"] in ("nonprivate", "dp", "dp_materialise"):
        from eqdp_tf.privacy.dp_step import DPKerasSGDOptimizer, DPStep

        optimizer = DPKerasSGDOptimizer(
            l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER, expected_batch_size=batch,
            learning_rate=LEARNING_RATE,
        )
        step = DPStep(model, None, optimizer, view_reduction="sum", dp=spec["mode"] != "nonprivate",
                      norm_method="materialise" if spec["mode"] == "dp_materialise" else "auto")
        accumulate = step.compiled_accumulate(jit_compile=xla)
        apply_update = step.compiled_apply(jit_compile=xla)

        def run():
            stats = accumulate(views, labels, mask)
            apply_update()
            return float(stats["loss_sum"])

        return run, [acc.dtype.name for acc in step.accumulators]

    from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras_vectorized import VectorizedDPKerasSGDOptimizer

    optimizer = VectorizedDPKerasSGDOptimizer(
        l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER,
        num_microbatches=None if num_views == 1 else batch, learning_rate=LEARNING_RATE,
    )
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=xla)
    flat_views = tf.reshape(views, [batch * num_views, 32, 32, 3])  # example-major
    flat_labels = tf.repeat(labels, num_views)

    def run():
        return float(model.train_on_batch(flat_views, flat_labels))

    return run, [v.dtype.name for v in model.trainable_variables]


def _child_cell(spec):
    tf = _quiet_tensorflow()
    if spec["precision"] == "bf16":
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    tf.keras.utils.set_random_seed(0)
    batch, num_views = spec["batch"], spec["views"]
    model = _build_model(tf, spec["model"])
    views = tf.cast(tf.random.uniform([batch, num_views, 32, 32, 3], 0, 256, dtype=tf.int32), tf.uint8)
    labels = tf.random.uniform([batch], 0, 10, dtype=tf.int64)
    mask = tf.ones([batch], tf.float32)
    run, grad_dtypes = _make_step(tf, spec, model, views, labels, mask)
    rss_before = _peak_rss_bytes()

    budget = spec["budget"]
    total = spec["warmup"] + spec["steps"]
    times = []
    loss = float("nan")
    for i in range(total):
        start = time.perf_counter()
        loss = run()
        times.append(time.perf_counter() - start)
        elapsed = time.perf_counter() - _CHILD_START
        # The first step also traces and compiles, so only later steps predict the rest.
        projected = elapsed + (total - i - 1) * (times[-1] if i >= 1 else 0.0)
        if projected > budget:
            return {
                "status": "skipped", "elapsed_s": elapsed, "first_step_s": times[0],
                "step_s_estimate": times[-1] if i >= 1 else None, "projected_s": projected,
            }
    timed = times[spec["warmup"]:]
    step_s = statistics.median(timed)
    return {
        "status": "ok",
        "step_s": step_s,
        "step_s_all": timed,
        "views_per_s": batch * num_views / step_s,
        "first_step_s": times[0],
        "peak_rss_bytes": _peak_rss_bytes(),
        "rss_before_steps_bytes": rss_before,
        "compute_dtype": tf.keras.mixed_precision.global_policy().compute_dtype,
        "variable_dtypes": sorted(set(grad_dtypes)),
        "final_loss": loss,
        "loadavg": os.getloadavg()[0],
    }


def _matmul_rate(tf, n, dtype, repeats):
    a = tf.random.normal([n, n], dtype=tf.float32)
    b = tf.random.normal([n, n], dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(b, dtype)
    # Summing the product keeps the result small to fetch and costs n^2 next to the n^3 product.
    product = tf.function(lambda: tf.reduce_sum(tf.cast(tf.linalg.matmul(a, b), tf.float32)))
    for _ in range(2):
        product().numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product().numpy()
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times)


_TF_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _child_calibrate(spec):
    """Peak matmul rate(s), the models' MACs per view, and the software versions."""
    tf = _quiet_tensorflow()
    from importlib import metadata

    versions = {
        "tf_version": tf.__version__,
        "tfp_version": metadata.version("tensorflow-privacy"),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
    }
    peak = {}
    for dtype in ("fp32", "bf16") if spec["bf16"] else ("fp32",):
        try:
            peak[dtype] = _matmul_rate(tf, spec["matmul_n"], getattr(tf, _TF_DTYPES[dtype]), spec["repeats"])
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            peak[f"{dtype}_error"] = harness.one_line(err)
    macs = {}
    for name in spec["models"]:
        try:
            model = _build_model(tf, name)
            macs[name] = {"macs_per_view": count_macs(tf, model), "params": int(model.count_params())}
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            macs[name] = {"error": harness.one_line(err)}
        tf.keras.backend.clear_session()
    return {
        "status": "ok" if "fp32" in peak else "error",
        "error": peak.get("fp32_error", ""),
        "matmul_n": spec["matmul_n"],
        "peak_flops": peak,
        "models": macs,
        **versions,
    }


def _child_pipeline(spec):
    """Views/s of make_train_dataset alone: Poisson sampling, gather and augmult, no model."""
    tf = _quiet_tensorflow()
    from eqdp_tf import data

    start = time.perf_counter()
    images, labels = data.load_cifar10("train", spec["data_dir"])
    load_s = time.perf_counter() - start
    sampler = data.PoissonSampler(
        len(labels), sampling_rate=spec["logical_batch"] / len(labels),
        physical_batch_size=spec["batch"], seed=0,
    )
    dataset = data.make_train_dataset(images, labels, sampler, num_views=spec["views"], seed=0)
    batches = iter(dataset)
    for _ in range(spec["warmup"]):
        next(batches)
    padded = real = 0
    start = time.perf_counter()
    for _ in range(spec["num_batches"]):
        batch = next(batches)
        padded += int(batch["views"].shape[0]) * spec["views"]
        real += int(tf.reduce_sum(batch["mask"]).numpy()) * spec["views"]
    seconds = time.perf_counter() - start
    return {
        "status": "ok", "views_per_s": padded / seconds, "real_views_per_s": real / seconds,
        "load_s": load_s, "peak_rss_bytes": _peak_rss_bytes(),
    }


CHILDREN = {"cell": _child_cell, "calibrate": _child_calibrate, "pipeline": _child_pipeline}


def series_key(cell):
    return (cell["model"], cell["mode"], cell["precision"], cell["xla"])
