"""The randomness of DP-SGD as resumable state: a secret key, and per-step seeds derived from it.

DP-SGD's guarantee assumes nobody can predict which examples a step samples or the noise it adds. So both
are drawn from a per-run secret key, not from ``--seed`` (which config.json publishes; it still seeds the
initialisation and the augmentations, which need no secrecy):

- the Poisson sample of step t comes from (key, salt) and t (``data.PoissonSampler`` is (seed, step)-pure);
- the Gaussian noise of step t comes from (key, t, salt) through stateless random ops.

Every random draw is therefore a pure function of the key and the step counter, and a checkpoint's step
counter is the whole RNG state: a resumed run takes exactly the steps the uninterrupted run would have taken.
(TensorFlow's stateful ``tf.random.normal``, which TF-Privacy's ``GaussianSumQuery`` uses, restarts its stream
in every process, so a resumed run would add step 1's noise again at its first step: two released updates
with the same noise reveal their difference noise-free.)

``salt`` is 0, except when a step that an earlier process already *released* (see ``checkpoint_journal``)
has to be taken again: then both the sample and the noise are drawn afresh (salt = the attempt number), so
that the two releases are independent mechanisms and their privacy composes as two steps.

The key lives in ``dp_secret.json`` in the run folder (mode 0600), never in config.json, the checkpoints
or the privacy ledger. ``--dp_seed`` replaces it by a public seed, for reproducible experiments only.
"""

import json
import os
import secrets
import stat
from typing import Callable, Dict

import numpy as np
import tensorflow as tf

from eqdp_tf.errors import ConfigError
from eqdp_tf.privacy.dp_step import DPKerasSGDOptimizer
from eqdp_tf.training.checkpoint_journal import fsync_dir

SECRET_NAME = "dp_secret.json"
_KEY_BITS = 256
# Domain separation of the streams drawn from one key.
_FROM_DP_SEED = 0x5EED
_SAMPLE_STREAM = 0x5A3
_NOISE_STREAM = 0x401CE


def load_or_create_key(output_dir: str, dp_seed=None) -> int:
    """The run's key: from ``dp_seed`` if given, else read from (or created in) ``output_dir/dp_secret.json``."""
    if dp_seed is not None:
        words = np.random.SeedSequence([_FROM_DP_SEED, int(dp_seed)]).generate_state(_KEY_BITS // 32, np.uint32)
        return int.from_bytes(words.tobytes(), "little")
    path = os.path.join(output_dir, SECRET_NAME)
    if os.path.exists(path):
        try:
            with open(path) as f:
                key = int(json.load(f)["key"], 16)
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is unreadable; without it this run's sampling and noise cannot be "
                              "continued safely: start the run in a new folder") from None
        return key
    key = secrets.randbits(_KEY_BITS)
    text = json.dumps({
        "key": f"{key:064x}",
        "note": "Secret seed of this run's batch sampling and DP noise. Anyone holding it and the released models "
                "can undo the noise: never publish or copy it with the results; delete it once training is over.",
    }, indent=2) + "\n"
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(output_dir)
    return key


class StepRandomness:
    """Per-step seeds for sampling and noise from the run key; ``salts`` maps steps to re-take afresh."""

    def __init__(self, key: int, salts: Dict[int, int] = None):
        self._key = int(key)
        self._salts = dict(salts or {})

    def salt(self, step: int) -> int:
        return self._salts.get(int(step), 0)

    def sampler_seed(self, salt: int = 0) -> int:
        words = np.random.SeedSequence([self._key, _SAMPLE_STREAM, int(salt)]).generate_state(4, np.uint32)
        return int.from_bytes(words.tobytes(), "little")

    def noise_seed(self, step: int) -> np.ndarray:
        """int64 [2], a seed for stateless random ops, for the noise of logical step ``step`` (1-based)."""
        entropy = [self._key, _NOISE_STREAM, int(step), self.salt(step)]
        state = np.random.SeedSequence(entropy).generate_state(2, np.uint64)
        return (state >> np.uint64(1)).astype(np.int64)  # non-negative int64


class SaltedSampler:
    """A sampler whose steps in ``randomness``'s salt table are drawn with a fresh seed; otherwise the base one.

    ``make(seed)`` builds a ``data`` sampler; everything but ``sample``/``physical_batches`` is the base's.
    """

    def __init__(self, make: Callable[[int], object], randomness: StepRandomness):
        self._make = make
        self._randomness = randomness
        self._base = make(randomness.sampler_seed(0))
        self._by_salt = {0: self._base}

    def __getattr__(self, name):
        return getattr(self._base, name)

    def _for(self, step):
        salt = self._randomness.salt(step)
        if salt not in self._by_salt:
            self._by_salt[salt] = self._make(self._randomness.sampler_seed(salt))
        return self._by_salt[salt]

    def sample(self, step):
        return self._for(step).sample(step)

    def physical_batches(self, step):
        return self._for(step).physical_batches(step)


class KeyedNoiseDPOptimizer(DPKerasSGDOptimizer):
    """``DPKerasSGDOptimizer`` whose noise is drawn by stateless ops from a seed set before each step.

    The noise N(0, (sigma*C)^2) has the stddev of TF-Privacy's ``GaussianSumQuery`` (the optimizer's global
    state); only the random source differs: ``set_noise_seed(seed)`` before a step makes its noise a pure
    function of that seed. The seed variable is deliberately not tracked, so it is never written into a
    checkpoint (a released checkpoint must not reveal the noise of the next step).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._noise_seed = tf.Variable(tf.zeros([2], tf.int64), trainable=False, name="noise_seed")
        self.keyed_noise_traced = False

    def set_noise_seed(self, seed):
        self._noise_seed.assign(np.asarray(seed, np.int64))

    def noised_sum(self, summed_clipped_grads):
        grads = list(summed_clipped_grads)
        stddev = self._global_state.stddev
        seeds = tf.random.experimental.stateless_split(self._noise_seed, num=len(grads))
        noised = [
            g + tf.random.stateless_normal(tf.shape(g), seed=seeds[i], stddev=tf.cast(stddev, g.dtype),
                                           dtype=g.dtype, alg="philox")
            for i, g in enumerate(grads)
        ]
        self._was_dp_gradients_called = True  # as the parent: the stock apply_gradients asserts it
        self.keyed_noise_traced = True
        return noised
