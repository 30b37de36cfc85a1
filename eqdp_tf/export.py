"""Export for serving: EMA weights -> frozen plain convs -> a versioned SavedModel.

Layout as TF Serving expects: ``<export_dir>/<version>/saved_model.pb`` + ``variables/``. The
``serving_default`` signature takes a uint8 batch ``images [None, H, W, C]`` (the model's input shape, e.g.
[None, 32, 32, 3] for CIFAR) and returns ``probabilities [None, classes]`` and ``classes [None]`` (int64). Loading
needs only TensorFlow (``tf.saved_model.load``), no project code. The training program puts the run's privacy.json
and its dataset's description (dataset.json) beside it in ``assets.extra/`` (TF Serving's folder for files it does
not load), so an exported model carries its guarantee and what it was trained on.
"""

import json
import os
import shutil
import tempfile

import tensorflow as tf

import layers
from eqdp_tf.errors import UserError, one_line


class ExportError(UserError):
    """The SavedModel could not be written (disk full, no permission, ...)."""


def _versions(export_dir):
    return [int(name) for name in os.listdir(export_dir) if name.isdigit()] if os.path.isdir(export_dir) else []


def _next_version(export_dir):
    return max(_versions(export_dir), default=0) + 1


def latest_version(export_dir):
    """Path of the newest complete version under ``export_dir``, or None (staging folders are not versions)."""
    versions = _versions(export_dir)
    return os.path.join(export_dir, str(max(versions))) if versions else None


class _Servable(tf.Module):
    def __init__(self, model, image_shape):
        super().__init__()
        self.model = model
        self.serve = tf.function(
            self._serve, input_signature=[tf.TensorSpec([None, *image_shape], tf.uint8, name="images")]
        )

    def _serve(self, images):
        logits = self.model(tf.cast(images, tf.float32), training=False)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=-1)}


def export_saved_model(model, export_dir, version=None, extra_files=None):
    """Freezes ``model`` and writes it as ``export_dir/<version>``; returns that path.

    ``extra_files`` (``{name: JSON-serialisable value}``) are written as JSON into ``assets.extra/``.

    The SavedModel is written to a temporary folder beside it and renamed into place, so a crash
    or a full disk never leaves a half-written version that a server would pick up.
    """
    frozen = layers.freeze(model)
    version = _next_version(export_dir) if version is None else int(version)
    final = os.path.join(export_dir, str(version))
    if os.path.exists(final):
        raise ExportError(f"export version {final} already exists; refusing to overwrite it")
    try:
        os.makedirs(export_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_dir)
    except OSError as err:
        raise ExportError(f"cannot write the export folder {export_dir}: {one_line(err)}") from None
    try:
        servable = _Servable(frozen, tuple(model.input_shape[1:]))
        tf.saved_model.save(servable, staging, signatures={"serving_default": servable.serve})
        if extra_files:
            os.makedirs(os.path.join(staging, "assets.extra"))
            for name, value in extra_files.items():
                with open(os.path.join(staging, "assets.extra", name), "w") as f:
                    json.dump(value, f, indent=2, sort_keys=True, allow_nan=False)
        os.rename(staging, final)
    except (OSError, tf.errors.OpError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        message = one_line(err)
        raise ExportError(f"exporting the SavedModel to {final} failed: {message}") from None
    return final
