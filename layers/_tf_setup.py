"""Keras 2 as ``tf.keras`` and TF-Privacy's package import on every supported TensorFlow (2.15 to 2.21).

Imported first by ``layers`` and by ``eqdp_tf`` (which imports it through ``layers``), so it runs before anything in
the project imports TensorFlow. It imports neither TensorFlow nor TF-Privacy; it only tells them, in advance, what
the project needs:

- TensorFlow 2.16+ makes ``tf.keras`` Keras 3 unless the ``tf-keras`` package is installed and
  ``TF_USE_LEGACY_KERAS=1`` is set before TensorFlow is imported. Set here.
- ``import tensorflow_privacy`` (0.9, its newest release) imports its estimator modules, and TensorFlow 2.16+ has
  no ``tf.estimator``. With ``sys.skip_tf_privacy_import`` set, its package ``__init__`` skips them, and the
  submodules the project imports (optimizers, queries, analysis, fast gradient clipping) import as usual; the
  names its package would re-export (``tensorflow_privacy.DPModel`` ...) are then not there: import them from
  their submodules.

TensorFlow 2.15 needs neither; there, tf-keras (installed beside every TensorFlow) is kept out of the process
instead, see :func:`_keep_out_a_second_keras_2`. Which side an installation is on is read from the
installed Keras without importing anything: TensorFlow 2.16+ requires ``keras>=3``, TensorFlow 2.15 ``keras`` 2.15.

When TensorFlow was imported before this module (``import tensorflow`` then ``import eqdp_tf``), ``tf.keras`` is
still Keras 2 as long as nothing had touched it yet (TensorFlow picks the Keras on first use of ``tf.keras``); if it
had already become Keras 3, :class:`KerasVersionError` says in one line what to do.
"""

import importlib.metadata
import importlib.util
import os
import sys

_LEGACY_KERAS_VALUES = ("1", "true", "True")  # what TensorFlow reads as set


class KerasVersionError(ImportError):
    """``tf.keras`` is (or would be) Keras 3: the project's layers and TF-Privacy's optimizer need Keras 2."""


def _installed_version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _major(version):
    try:
        return int(version.split(".")[0])
    except (AttributeError, ValueError):
        return None


def _tf_keras_requirement():
    """'tf-keras~=2.18.0' for the installed TensorFlow 2.18.x (the release of tf-keras that goes with it)."""
    for distribution in ("tensorflow", "tensorflow-cpu", "tf-nightly"):
        version = _installed_version(distribution)
        if version:
            return "tf-keras~=" + ".".join(version.split(".")[:2]) + ".0"
    return "the tf-keras release of your TensorFlow's version"


def _keep_out_a_second_keras_2():
    """On TensorFlow 2.15, stops ``tf_keras`` (a second copy of Keras 2.15) from being imported beside ``keras``.

    The install puts tf-keras beside every TensorFlow (2.16+ needs it), so it is there on 2.15 too, where tf.keras is
    ``keras`` 2.15. Imported into the same process, tf_keras takes over the names Keras resolves its classes by, and
    from then on ``tf.keras.models.load_model`` of a Keras-format model loops forever (its ``InputLayer`` is
    tf_keras', which Keras' functional loader does not recognise). TensorFlow 2.15's own ``tf.saved_model.load``
    imports tf_keras whenever it finds a legacy optimizer (OptimizerV2, as TF-Privacy's DP optimizers are) in the
    SavedModel. Marking it absent makes those imports fail as if it were not installed, which TensorFlow handles
    (it falls back to ``keras``).
    """
    if (importlib.util.find_spec("tf_keras") is not None
            and os.environ.get("TF_USE_LEGACY_KERAS") not in _LEGACY_KERAS_VALUES):  # set: tf.keras *is* tf_keras
        sys.modules.setdefault("tf_keras", None)  # a no-op when the user has imported it already


def _arrange():
    keras_major = _major(_installed_version("keras"))
    if keras_major is None:
        return  # no Keras installed at all: TensorFlow's import will say so.
    if keras_major < 3:
        _keep_out_a_second_keras_2()  # TensorFlow 2.15 (Keras 2.15): nothing else to arrange.
        return
    if importlib.util.find_spec("tf_keras") is None:
        raise KerasVersionError(
            f"tf.keras would be Keras 3 (Keras {_installed_version('keras')} is installed, tf-keras is not); layers "
            f"and eqdp_tf need Keras 2: pip install '{_tf_keras_requirement()}'")
    if os.environ.get("TF_USE_LEGACY_KERAS") not in _LEGACY_KERAS_VALUES:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    if "tensorflow_privacy" not in sys.modules:
        sys.skip_tf_privacy_import = True
    if "tensorflow" in sys.modules:
        check_keras(sys.modules["tensorflow"])


def check_keras(tf):
    """Raises :class:`KerasVersionError` unless ``tf.keras`` is Keras 2 (its first use picks the version)."""
    package = tf.keras.layers.Layer.__module__.split(".")[0]  # keras (2.15 or 3) or tf_keras
    version = getattr(sys.modules.get(package), "__version__", "")
    if _major(version) is not None and _major(version) >= 3:
        raise KerasVersionError(
            f"tf.keras is Keras {version}, from a TensorFlow imported and used before eqdp_tf or layers were; they "
            "need Keras 2: set TF_USE_LEGACY_KERAS=1 before importing TensorFlow (or import eqdp_tf first)")


_arrange()
