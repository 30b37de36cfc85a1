"""Model zoo: every model takes raw [0, 255] pixels and returns logits.

The names (``ARCHITECTURES``, ``HEADS``) are plain data; the builders import TensorFlow and are loaded on first
use, so that validating flags does not start TensorFlow.
"""

from eqdp_tf.models.names import ARCHITECTURES, HEADS

_LAZY = {
    "build_model": "eqdp_tf.models.build", "with_float32_logits": "eqdp_tf.models.build",
    "check_image_shape": "eqdp_tf.models.build",
    "equivariant_resnet9": "eqdp_tf.models.resnet9", "stage_outputs": "eqdp_tf.models.resnet9",
    "wide_resnet": "eqdp_tf.models.wrn", "so2_resnet9": "eqdp_tf.models.resnet9_so2",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eqdp_tf.models' has no attribute {name!r}")


__all__ = ["ARCHITECTURES", "HEADS", *_LAZY]
