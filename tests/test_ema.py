"""The EMA of the weights: the official code's schedule of several updates per logical step, exactly."""

import numpy as np
import pytest
import tensorflow as tf

from eqdp_tf.training.ema import WeightAverage


def _model():
    inputs = tf.keras.Input([3])
    return tf.keras.Model(inputs, tf.keras.layers.Dense(2)(inputs))


def _official_average(history, decay, n):
    """torch_ema as the official code drives it: after each of a step's n physical batches one update, the warm-up
    min(decay, (1 + u) / (10 + u)) counting updates u; Opacus changes the weights only at the step's last batch."""
    average = history[0]
    updates = 0
    for t in range(len(history) - 1):
        for batch in range(n):
            weights = history[t + 1] if batch == n - 1 else history[t]
            d = min(decay, (1 + updates) / (10 + updates))
            average = d * average + (1 - d) * weights
            updates += 1
    return average


@pytest.mark.parametrize("n", [1, 3, 16])
def test_updates_per_step_reproduce_the_official_schedule(n):
    rng = np.random.default_rng(0)
    model, shadow = _model(), _model()
    history = [np.concatenate([w.reshape(-1) for w in model.get_weights()])]
    ema = WeightAverage(model, shadow, 0.999, updates_per_step=n)
    for step in range(40):
        ema.before_step(step)
        model.set_weights([w + rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
        ema.after_step(step)
        history.append(np.concatenate([w.reshape(-1) for w in model.get_weights()]))
    got = np.concatenate([w.reshape(-1) for w in shadow.get_weights()])
    np.testing.assert_allclose(got, _official_average(np.array(history, np.float64), 0.999, n), rtol=1e-4, atol=1e-5)


def test_sixteen_updates_per_step_decay_the_average_as_the_official_run():
    model, shadow = _model(), _model()
    ema = WeightAverage(model, shadow, 0.999, updates_per_step=16)
    step = 10_000  # past the warm-up
    before = [w.copy() for w in shadow.get_weights()]
    model.set_weights([w + 1.0 for w in model.get_weights()])  # the current weights sit 1 above the average
    ema.before_step(step)
    ema.after_step(step)
    moved = np.mean([np.mean(a - b) for a, b in zip(shadow.get_weights(), before)])
    assert moved == pytest.approx(1 - 0.999**16, rel=1e-3)  # 0.0159 per step, not 0.001


def test_bad_update_counts_are_refused():
    with pytest.raises(ValueError, match="updates_per_step"):
        WeightAverage(_model(), _model(), 0.999, updates_per_step=0)
