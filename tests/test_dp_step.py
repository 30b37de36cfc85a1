"""Tests for eqdp_tf.privacy.dp_step: per-example gradients, clipping, accumulation and noise."""

import numpy as np
import pytest
import tensorflow as tf

from eqdp_tf.errors import ConfigError
from eqdp_tf.privacy.dp_step import (
    DPKerasSGDOptimizer,
    DPStep,
    clip_per_example,
    per_example_gradients,
)

NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def _seed():
    tf.keras.utils.set_random_seed(0)


def squared_error(labels, logits):
    """Per-example (y - t)^2 for a model with one output."""
    return tf.square(logits[:, 0] - tf.cast(labels, logits.dtype))


def linear_model(w=(1.0, 2.0)):
    """y = w1*x1 + w2*x2 on inputs [n, 1, 1, 2]."""
    model = tf.keras.Sequential([
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(1, use_bias=False, kernel_initializer=tf.keras.initializers.Constant(w)),
    ])
    model.build([None, 1, 1, 2])
    return model


def conv_net():
    model = tf.keras.Sequential([
        tf.keras.layers.Conv2D(4, 3, activation="relu"),
        tf.keras.layers.GroupNormalization(groups=2),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(NUM_CLASSES),
    ])
    model.build([None, 8, 8, 2])
    return model


def conv_data(batch, num_views, seed=1):
    rng = np.random.default_rng(seed)
    views = rng.normal(size=(batch, num_views, 8, 8, 2)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=batch).astype(np.int32)
    return tf.constant(views), tf.constant(labels)


def sparse_ce():
    return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def optimizer(l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=8.0, learning_rate=0.1, **kw):
    return DPKerasSGDOptimizer(l2_norm_clip, noise_multiplier, expected_batch_size, learning_rate, **kw)


def weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


# --- per-example gradients ---------------------------------------------------------------


@pytest.mark.parametrize("view_reduction", ["sum", "mean"])
def test_per_example_gradients_linear_by_hand(view_reduction):
    # w = (1, 2); the loss (w.x - t)^2 has gradient 2 (w.x - t) x. Two views per example.
    # Example 0, t=0, views (1,0), (0,1): residuals 1, 2 -> grad (2,0) + (0,4) = (2,4), loss 1 + 4.
    # Example 1, t=3, views (1,1), (1,1): residuals 0 -> grad (0,0), loss 0.
    # Example 2, t=2, views (1,0), (0,1): residuals -1, 0 -> grad (-2,0), loss 1.
    views = tf.constant([[[1, 0], [0, 1]], [[1, 1], [1, 1]], [[1, 0], [0, 1]]], tf.float32)
    views = tf.reshape(views, [3, 2, 1, 1, 2])
    labels = tf.constant([0.0, 3.0, 2.0])
    grads, losses, logits = per_example_gradients(linear_model(), squared_error, views, labels, view_reduction)
    by_hand_sum = np.array([[2.0, 4.0], [0.0, 0.0], [-2.0, 0.0]])
    loss_sum = np.array([1.0 + 4.0, 0.0, 1.0 + 0.0])
    scale = 1.0 if view_reduction == "sum" else 0.5
    assert grads[0].shape == (3, 2, 1)
    np.testing.assert_allclose(grads[0].numpy()[:, :, 0], scale * by_hand_sum, atol=1e-6)
    np.testing.assert_allclose(losses.numpy(), scale * loss_sum, atol=1e-6)
    np.testing.assert_allclose(logits.numpy()[:, :, 0], [[1, 2], [3, 3], [1, 2]], atol=1e-6)


@pytest.mark.parametrize("num_views", [1, 3])
@pytest.mark.parametrize("view_reduction", ["sum", "mean"])
def test_per_example_gradients_match_python_loop(num_views, view_reduction):
    model, loss_fn = conv_net(), sparse_ce()
    views, labels = conv_data(5, num_views)
    grads, losses, logits = per_example_gradients(model, loss_fn, views, labels, view_reduction)
    reduce = tf.reduce_sum if view_reduction == "sum" else tf.reduce_mean
    for i in range(5):
        with tf.GradientTape() as tape:
            logits_i = model(views[i], training=True)
            loss_i = reduce(loss_fn(tf.repeat(labels[i:i + 1], num_views), logits_i))
        grads_i = tape.gradient(loss_i, model.trainable_variables)
        for g, g_i in zip(grads, grads_i):
            np.testing.assert_allclose(g[i].numpy(), g_i.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(losses[i].numpy(), loss_i.numpy(), rtol=1e-5)
        np.testing.assert_allclose(logits[i].numpy(), logits_i.numpy(), rtol=1e-5, atol=1e-6)


# --- clipping ----------------------------------------------------------------------------


def test_clip_per_example_by_hand():
    # Global norm over both variables: example 0 is (3, 4) -> 5, example 1 is (0.3, 0.4) -> 0.5.
    grads = [tf.constant([[3.0], [0.3]]), tf.constant([[[4.0]], [[0.4]]])]
    clipped, norms = clip_per_example(grads, 1.0)
    np.testing.assert_allclose(norms.numpy(), [5.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(clipped[0].numpy(), [[0.6], [0.3]], rtol=1e-6)
    np.testing.assert_allclose(clipped[1].numpy(), [[[0.8]], [[0.4]]], rtol=1e-6)


def test_clip_per_example_matches_numpy():
    model = conv_net()
    views, labels = conv_data(8, 2)
    grads, _, _ = per_example_gradients(model, sparse_ce(), views, labels)
    flat = np.concatenate([g.numpy().reshape(8, -1) for g in grads], axis=1)
    norms_np = np.linalg.norm(flat, axis=1)
    clip = float(np.median(norms_np))  # about half the examples are clipped
    clipped, norms = clip_per_example(grads, clip)
    clipped_flat = np.concatenate([g.numpy().reshape(8, -1) for g in clipped], axis=1)
    np.testing.assert_allclose(norms.numpy(), norms_np, rtol=1e-5)
    assert np.all(np.linalg.norm(clipped_flat, axis=1) <= clip + 1e-6)
    expected = flat * np.minimum(1.0, clip / norms_np)[:, None]
    np.testing.assert_allclose(clipped_flat, expected, rtol=1e-5, atol=1e-7)
    small = norms_np <= clip
    assert 0 < small.sum() < 8
    np.testing.assert_array_equal(clipped_flat[small], flat[small])


# --- one step equals plain SGD when privacy is switched off --------------------------------


@pytest.mark.parametrize("dp", [True, False])
@pytest.mark.parametrize("view_reduction", ["sum", "mean"])
def test_step_without_noise_or_clipping_is_plain_sgd(dp, view_reduction):
    model, loss_fn = conv_net(), sparse_ce()
    views, labels = conv_data(6, 2)
    lr, expected_batch_size = 0.1, 10.0
    before = weights(model)
    reduce = tf.reduce_sum if view_reduction == "sum" else tf.reduce_mean
    with tf.GradientTape() as tape:
        logits = model(tf.reshape(views, [12, 8, 8, 2]), training=True)
        per_view = tf.reshape(loss_fn(tf.repeat(labels, 2), logits), [6, 2])
        total = tf.reduce_sum(reduce(per_view, axis=1))
    sgd_grads = tape.gradient(total, model.trainable_variables)
    expected = [w - lr * g.numpy() / expected_batch_size for w, g in zip(before, sgd_grads)]

    opt = optimizer(1e6, 0.0, expected_batch_size, lr)
    step = DPStep(model, loss_fn, opt, view_reduction=view_reduction, dp=dp)
    stats = step.accumulate(views, labels, tf.ones([6]))
    step.apply()
    for w, e in zip(weights(model), expected):
        np.testing.assert_allclose(w, e, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["loss_sum"].numpy(), total.numpy(), rtol=1e-5)
    assert stats["count"].numpy() == 6.0
    if dp:
        assert stats["clipped_fraction"].numpy() == 0.0
        assert stats["grad_norm_mean"].numpy() > 0.0


def test_linear_step_by_hand():
    # Per-example gradients (2,4), (0,0), (-2,0) [see the by-hand test]; C = 1e6, sigma = 0.
    # Sum (0, 4), / expected batch size 4 -> (0, 1); lr 0.5 -> w = (1, 2) - (0, 0.5).
    views = tf.reshape(tf.constant([[[1, 0], [0, 1]], [[1, 1], [1, 1]], [[1, 0], [0, 1]]], tf.float32),
                       [3, 2, 1, 1, 2])
    model = linear_model()
    step = DPStep(model, squared_error, optimizer(1e6, 0.0, 4.0, 0.5))
    step.accumulate(views, tf.constant([0.0, 3.0, 2.0]), tf.ones([3]))
    step.apply()
    np.testing.assert_allclose(model.trainable_variables[0].numpy()[:, 0], [1.0, 1.5], atol=1e-6)


def test_linear_step_clips_each_example_not_the_batch():
    # C = 1: example 0's gradient (2,4) becomes (2,4)/sqrt(20); example 2's (-2,0) becomes (-1,0).
    views = tf.reshape(tf.constant([[[1, 0], [0, 1]], [[1, 1], [1, 1]], [[1, 0], [0, 1]]], tf.float32),
                       [3, 2, 1, 1, 2])
    model = linear_model()
    step = DPStep(model, squared_error, optimizer(1.0, 0.0, 2.0, 1.0))
    stats = step.accumulate(views, tf.constant([0.0, 3.0, 2.0]), tf.ones([3]))
    expected_sum = np.array([2.0, 4.0]) / np.sqrt(20.0) + np.array([-1.0, 0.0])
    np.testing.assert_allclose(step.accumulators[0].numpy()[:, 0], expected_sum, rtol=1e-6)
    np.testing.assert_allclose(stats["grad_norm_mean"].numpy(), (np.sqrt(20.0) + 0.0 + 2.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(stats["clipped_fraction"].numpy(), 2 / 3, rtol=1e-6)
    step.apply()
    np.testing.assert_allclose(model.trainable_variables[0].numpy()[:, 0],
                               np.array([1.0, 2.0]) - expected_sum / 2.0, rtol=1e-6)


# --- accumulation over physical batches ----------------------------------------------------


@pytest.mark.parametrize("dp", [True, False])
def test_accumulating_padded_physical_batches_equals_one_big_batch(dp):
    model, loss_fn = conv_net(), sparse_ce()
    views, labels = conv_data(10, 2)
    clip = 0.5  # small enough that clipping is active with dp=True

    big = DPStep(model, loss_fn, optimizer(clip), dp=dp)
    big_stats = big.accumulate(views, labels, tf.ones([10]))
    big_sums = [a.numpy() for a in big.accumulators]

    # Three physical batches of 4; the last one has 2 real rows and 2 rows of garbage padding.
    garbage_views = tf.constant(np.full((2, 2, 8, 8, 2), 1e3, np.float32))
    padded_views = tf.concat([views, garbage_views], axis=0)
    padded_labels = tf.concat([labels, tf.constant([1, 2], tf.int32)], axis=0)
    mask = tf.constant([1.0] * 10 + [0.0] * 2)
    small = DPStep(model, loss_fn, optimizer(clip), dp=dp)
    accumulate = small.compiled_accumulate()
    totals = {}
    for start in range(0, 12, 4):
        stats = accumulate(padded_views[start:start + 4], padded_labels[start:start + 4], mask[start:start + 4])
        for key in ("loss_sum", "num_correct", "count"):
            totals[key] = totals.get(key, 0.0) + stats[key].numpy()
    assert accumulate.experimental_get_tracing_count() == 1
    for s, b in zip(small.accumulators, big_sums):
        np.testing.assert_allclose(s.numpy(), b, rtol=1e-4, atol=1e-6)
    for key in ("loss_sum", "num_correct", "count"):
        np.testing.assert_allclose(totals[key], big_stats[key].numpy(), rtol=1e-5)
    if dp:
        assert 0.0 < big_stats["clipped_fraction"].numpy() <= 1.0


@pytest.mark.parametrize("dp", [True, False])
def test_padding_rows_contribute_nothing(dp):
    model = conv_net()
    views, labels = conv_data(4, 1)
    step = DPStep(model, None, optimizer(), dp=dp)
    stats = step.accumulate(views, labels, tf.zeros([4]))
    for acc in step.accumulators:
        assert not np.any(acc.numpy())
    assert stats["count"].numpy() == 0.0
    assert stats["loss_sum"].numpy() == 0.0 and stats["num_correct"].numpy() == 0.0
    assert all(np.isfinite(v.numpy()) for v in stats.values())


def test_num_correct_uses_view_mean_logits():
    model = linear_model()
    # One output "class" always predicted; with sparse label 0 every real example is correct.
    views = tf.zeros([3, 2, 1, 1, 2])
    stats = DPStep(model, squared_error, optimizer()).accumulate(views, tf.constant([0, 0, 0]),
                                                                 tf.constant([1.0, 1.0, 0.0]))
    assert stats["num_correct"].numpy() == 2.0


def test_compiled_functions_trace_once_and_reset_accumulators():
    model = conv_net()
    step = DPStep(model, None, optimizer(noise_multiplier=1.0))
    accumulate, apply = step.compiled_accumulate(), step.compiled_apply()
    assert step.compiled_accumulate() is accumulate
    apply_traces = []
    for seed in range(4):
        views, labels = conv_data(4, 2, seed=seed)
        accumulate(views, labels, tf.ones([4]))
        apply()
        apply_traces.append(apply.experimental_get_tracing_count())
        assert all(not np.any(a.numpy()) for a in step.accumulators)
    assert accumulate.experimental_get_tracing_count() == 1
    # The first apply() may trace twice because the optimizer creates its variables; never again.
    assert apply_traces[0] <= 2 and len(set(apply_traces)) == 1


def test_xla_accumulate_matches_graph_mode():
    model = conv_net()
    views, labels = conv_data(6, 2)
    mask = tf.constant([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    graph, xla = DPStep(model, None, optimizer(0.5)), DPStep(model, None, optimizer(0.5))
    graph_stats = graph.compiled_accumulate()(views, labels, mask)
    xla_stats = xla.compiled_accumulate(jit_compile=True)(views, labels, mask)
    for a, b in zip(graph.accumulators, xla.accumulators):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
    for key in graph_stats:
        np.testing.assert_allclose(graph_stats[key].numpy(), xla_stats[key].numpy(), rtol=1e-4)


# --- noise -------------------------------------------------------------------------------


def zero_gradient_setup(num_accumulates, compiled):
    """Dense(1000) without bias on all-zero inputs: every gradient is exactly 0, the update is pure noise."""
    model = tf.keras.Sequential([tf.keras.layers.Flatten(),
                                 tf.keras.layers.Dense(1000, use_bias=False)])
    model.build([None, 1, 1, 10])
    lr, sigma, clip, expected_batch_size = 0.5, 2.0, 3.0, 8.0
    step = DPStep(model, None, optimizer(clip, sigma, expected_batch_size, lr))
    accumulate = step.compiled_accumulate() if compiled else step.accumulate
    apply = step.compiled_apply() if compiled else step.apply

    def one_update():
        before = model.trainable_variables[0].numpy().copy()
        for _ in range(num_accumulates):
            accumulate(tf.zeros([4, 2, 1, 1, 10]), tf.constant([0, 1, 2, 3]), tf.ones([4]))
        assert not np.any(step.accumulators[0].numpy())  # gradients really are zero
        apply()
        return (model.trainable_variables[0].numpy() - before).ravel()

    return one_update, lr * sigma * clip / expected_batch_size


@pytest.mark.parametrize("num_accumulates", [1, 2])
@pytest.mark.parametrize("compiled", [False, True])
def test_noise_std_is_lr_sigma_clip_over_expected_batch_size(num_accumulates, compiled):
    one_update, expected_std = zero_gradient_setup(num_accumulates, compiled)
    first, second = one_update(), one_update()  # 10,000 parameters each
    for delta in (first, second):
        assert abs(delta.std() / expected_std - 1.0) < 0.05  # noise added once, not per accumulate
        assert abs(delta.mean()) < 0.05 * expected_std
    # Each apply() draws fresh noise (also inside a tf.function).
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.05


# --- misuse ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(l2_norm_clip=0.0), dict(l2_norm_clip=-1.0), dict(l2_norm_clip=float("nan")),
    dict(noise_multiplier=-0.1), dict(noise_multiplier=True),
    dict(expected_batch_size=0), dict(expected_batch_size=-8.0),
    dict(clipnorm=1.0),
])
def test_bad_optimizer_arguments_raise(kwargs):
    with pytest.raises(ConfigError):
        optimizer(**kwargs)


def test_bad_step_arguments_raise():
    model = conv_net()
    with pytest.raises(ConfigError, match="view_reduction"):
        DPStep(model, None, optimizer(), view_reduction="max")
    with pytest.raises(ConfigError, match="DPKerasSGDOptimizer"):
        DPStep(model, None, tf.keras.optimizers.legacy.SGD(0.1))
    step = DPStep(model, None, optimizer())
    views, labels = conv_data(4, 1)
    with pytest.raises(ConfigError, match="rank 5"):
        step.accumulate(views[:, 0], labels, tf.ones([4]))
    with pytest.raises(ConfigError, match="rank 5"):
        per_example_gradients(model, sparse_ce(), views[:, 0], labels)
    with pytest.raises(ConfigError, match="view_reduction"):
        per_example_gradients(model, sparse_ce(), views, labels, view_reduction="median")
    reduced_loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for dp in (True, False):
        reduced_step = DPStep(model, reduced_loss, optimizer(), dp=dp)
        for accumulate in (reduced_step.accumulate, reduced_step.compiled_accumulate()):
            with pytest.raises(ConfigError, match="reduction"):
                accumulate(views, labels, tf.ones([4]))
    with pytest.raises(ConfigError, match="rank 5"):
        step.compiled_accumulate()(views[:, 0], labels, tf.ones([4]))
    with pytest.raises(ConfigError, match="mask"):
        step.accumulate(views, labels, tf.ones([4, 1]))


def test_stock_jacobian_path_and_unnoised_apply_are_refused():
    model = conv_net()
    opt = optimizer()
    views, labels = conv_data(2, 1)
    with pytest.raises(ConfigError, match="DPStep"):
        opt.minimize(lambda: tf.reduce_sum(model(views[:, 0])), model.trainable_variables)
    step = DPStep(model, None, opt)
    step.accumulate(views, labels, tf.ones([2]))
    step.apply()
    # TF-Privacy's own check: a further apply_gradients without noised_sum() is refused.
    with pytest.raises(AssertionError):
        opt.apply_gradients(zip([tf.zeros_like(v) for v in model.trainable_variables],
                                model.trainable_variables))
