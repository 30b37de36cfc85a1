"""Rotation-equivariant CNNs trained with DP-SGD (Hoelzl et al. 2023) in TensorFlow/Keras.

The Keras entry points are importable from here: ``make_private``, ``PrivateModel``, ``PrivacySettings``,
``ExponentialMovingAverage`` and ``layer_registry`` (see ``eqdp_tf.keras_api``). They are loaded on first use,
so that ``import eqdp_tf.config`` (``train.py --help``) does not start TensorFlow.
"""

# First: Keras 2 as tf.keras and TF-Privacy's import on TensorFlow 2.16+ (layers/_tf_setup.py), before any module
# of the package imports TensorFlow.
from layers import _tf_setup  # noqa: F401

_KERAS_API = ("ExponentialMovingAverage", "PrivacySettings", "PrivateModel", "layer_registry", "make_private")

__all__ = list(_KERAS_API)


def __getattr__(name):
    if name in _KERAS_API:
        from eqdp_tf import keras_api

        return getattr(keras_api, name)
    raise AttributeError(f"module 'eqdp_tf' has no attribute {name!r}")


def __dir__():
    # Without it dir() and tab completion list none of the lazily loaded names.
    return sorted(set(globals()) | set(__all__))
