"""The randomness of DP-SGD as a function of a secret key and the step number.

DP-SGD's guarantee assumes nobody can predict which examples a step samples or the noise it adds, so both come
from a per-run secret key (``--seed`` only seeds the initialisation and the augmentations, which need no
secrecy):

- the Poisson sample of step t comes from (key, salt) and t (``data.PoissonSampler`` is (seed, step)-pure);
- the Gaussian noise of step t comes from (key, t, salt) through stateless random ops (``noise_seed``, set on
  ``dp_step.DPKerasSGDOptimizer`` before the step).

Every random draw is then a pure function of the key and the step counter, and a checkpoint's step counter is the
whole RNG state: a resumed run takes exactly the steps the uninterrupted run would have taken. (TensorFlow's
stateful ``tf.random.normal`` restarts its stream in every process, so a resumed run would add step 1's noise again
at its first step: two released updates with the same noise reveal their difference noise-free.)

``salt`` is 0, except when a step that an earlier process already *released* has to be taken again: then both
the sample and the noise are drawn afresh (salt = the attempt number), so that the two releases are independent
mechanisms and their privacy composes as two steps. Where the key is kept is the training program's business
(``training.secret_key``).
"""

from typing import Callable, Dict

import numpy as np

# Domain separation of the streams drawn from one key.
_SAMPLE_STREAM = 0x5A3
_NOISE_STREAM = 0x401CE


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

    ``make(seed)`` builds a ``data`` sampler; everything but ``sample``/``physical_batches`` is the base's. Samplers
    number the logical steps from 0 (``data.make_train_dataset`` asks for step t - 1 to take step t), the salt
    table and the noise from 1, as the privacy journal does: ``sample(t - 1)`` is step t's batch.
    """

    def __init__(self, make: Callable[[int], object], randomness: StepRandomness):
        self._make = make
        self._randomness = randomness
        self._base = make(randomness.sampler_seed(0))
        self._by_salt = {0: self._base}

    def __getattr__(self, name):
        return getattr(self._base, name)

    def _for(self, step):
        salt = self._randomness.salt(step + 1)  # sampler step ``step`` is logical step ``step + 1``
        if salt not in self._by_salt:
            self._by_salt[salt] = self._make(self._randomness.sampler_seed(salt))
        return self._by_salt[salt]

    def sample(self, step):
        return self._for(step).sample(step)

    def physical_batches(self, step):
        return self._for(step).physical_batches(step)
