"""The run's secret key (``dp_secret.json``), from which ``privacy.randomness`` derives the batch sampling and the
noise of every step.

The key lives in ``dp_secret.json`` in the run folder (mode 0600), never in config.json, the checkpoints or the
privacy journal. ``--dp_seed`` replaces it by a public seed, for reproducible experiments only.
"""

import json
import os
import secrets
import stat

import numpy as np

from eqdp_tf.errors import ConfigError
from eqdp_tf.io import write_text_atomic

SECRET_NAME = "dp_secret.json"
_KEY_BITS = 256
# Domain separation of a public --dp_seed from any key drawn from the OS.
_FROM_DP_SEED = 0x5EED


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
    write_text_atomic(path, text, mode=stat.S_IRUSR | stat.S_IWUSR)
    return key
