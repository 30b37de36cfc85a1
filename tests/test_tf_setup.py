"""layers/_tf_setup.py: Keras 2 as tf.keras and TF-Privacy's import on every supported TensorFlow (2.15 to 2.21).

Each case runs in a fresh interpreter, since what it tests is the order of first imports. Where TensorFlow is 2.15
(Keras 2.15 installed) tf.keras is always Keras 2 and the Keras-3 cases cannot happen: they skip, saying so.
"""

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, subprocess_env

KERAS_MAJOR = int(importlib.metadata.version("keras").split(".")[0])
TF_VERSION = importlib.metadata.version("tensorflow")
needs_keras3 = pytest.mark.skipif(
    KERAS_MAJOR < 3, reason=f"TensorFlow {TF_VERSION} installs Keras 2 as tf.keras: no Keras 3 to guard against")


def _run(code):
    """Runs ``code`` in a fresh interpreter from the checkout, without the TF_USE_LEGACY_KERAS this process has."""
    env = subprocess_env()
    env.pop("TF_USE_LEGACY_KERAS", None)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


def test_no_file_imports_bare_keras():
    """``import keras`` is Keras 3 on TensorFlow 2.16+; the project uses tf.keras only."""
    bare = re.compile(r"^\s*(import keras\b|from keras\b)|import_module\([\"']keras\b", re.M)
    found, checked = [], 0
    for root, folders, names in os.walk(REPO_ROOT):
        folders[:] = [f for f in folders if not f.startswith(".") and f not in ("runs", "build", "dist")]
        for name in names:
            if name.endswith(".py"):
                checked += 1
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    if bare.search(f.read()):
                        found.append(os.path.relpath(os.path.join(root, name), REPO_ROOT))
    assert checked > 50 and not found, f"bare Keras imported in {found}"


def test_importing_the_packages_starts_no_tensorflow():
    out = _ok(_run("import sys, layers, eqdp_tf, eqdp_tf.config; print('tensorflow' in sys.modules)"))
    assert out == ["False"]


def test_the_arrangement_is_made_before_tensorflow_loads_and_only_where_needed():
    out = _ok(_run("import os, sys, layers; print(os.environ.get('TF_USE_LEGACY_KERAS'), "
                   "hasattr(sys, 'skip_tf_privacy_import'))"))
    if KERAS_MAJOR >= 3:
        assert out == ["1", "True"]
    else:  # TensorFlow 2.15: tf.keras is Keras 2 and TF-Privacy's whole package imports; nothing is changed.
        assert out == ["None", "False"]


@pytest.mark.parametrize("first", ["eqdp_tf", "tensorflow"])
def test_tf_keras_is_keras_2_and_tf_privacy_imports_whichever_comes_first(first):
    """Also with ``import tensorflow`` before ``import eqdp_tf``: tf.keras picks its Keras on first use."""
    second = "tensorflow" if first == "eqdp_tf" else "eqdp_tf"
    out = _ok(_run(
        f"import {first}, {second}; import tensorflow as tf\n"
        "from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras_vectorized import "
        "VectorizedDPKerasSGDOptimizer\n"
        "from eqdp_tf.privacy import dp_step\n"
        "print(tf.keras.layers.Layer.__module__.split('.')[0], tf.keras.Model.__module__.split('.')[0])"))
    assert out == (["tf_keras", "tf_keras"] if KERAS_MAJOR >= 3 else ["keras", "keras"])


@needs_keras3
def test_tensorflow_used_with_keras_3_before_the_package_stops_with_one_line():
    result = _run("import tensorflow as tf\ntf.keras.layers.Dense(1)\nimport eqdp_tf")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("layers._tf_setup.KerasVersionError: tf.keras is Keras 3."), last
    assert "set TF_USE_LEGACY_KERAS=1 before importing TensorFlow" in last


@needs_keras3
def test_keras_3_without_tf_keras_names_the_package_to_install():
    # sys.modules[name] = None: the interpreter finds no such package.
    result = _run("import sys\nsys.modules['tf_keras'] = None\nimport layers")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    minor = ".".join(TF_VERSION.split(".")[:2])
    assert last.startswith("layers._tf_setup.KerasVersionError: tf.keras would be Keras 3 (Keras 3."), last
    assert last.endswith(f"pip install 'tf-keras~={minor}.0'"), last


@pytest.mark.parametrize("level, kept", [
    ("3", ["F0000 00:00:1796474821.886123    8509 x.cc:1] fatal", "a line of Python", "after"]),
    ("1", ["E0000 00:00:1796474821.886123    8509 cuda_dnn.cc:8310] Unable to register cuDNN factory",
           "F0000 00:00:1796474821.886123    8509 x.cc:1] fatal", "a line of Python", "after"]),
])
def test_the_log_level_applies_to_what_tensorflow_logs_from_cpp_while_it_loads(level, kept):
    """TensorFlow 2.18+ writes oneDNN and CUDA notes straight to stderr at import, whatever TF_CPP_MIN_LOG_LEVEL
    says; train.py's one-line errors would come with four more lines (TF 2.21 on a CPU). eqdp_tf/native_log.py."""
    written = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796479748.189322   18565 port.cc:153] oneDNN custom operations are on.",
        "E0000 00:00:1796474821.886123    8509 cuda_dnn.cc:8310] Unable to register cuDNN factory",
        "F0000 00:00:1796474821.886123    8509 x.cc:1] fatal",
        "a line of Python",
    ]
    code = ("import os\nfrom eqdp_tf.native_log import native_log_level\nwith native_log_level():\n"
            + "".join(f"    os.write(2, {line!r}.encode() + b'\\n')\n" for line in written)
            + "os.write(2, b'after\\n')\n")
    env = dict(subprocess_env(), TF_CPP_MIN_LOG_LEVEL=level)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == kept


def test_loading_a_savedmodel_with_an_optimizer_leaves_keras_loading_working():
    """TensorFlow 2.15's ``tf.saved_model.load`` imports tf_keras (installed beside every TensorFlow) when the
    SavedModel holds a legacy (OptimizerV2) optimizer, as TF-Privacy's are; a second Keras 2 in the process then
    made every later ``load_model`` of a Keras-format model loop forever (it hung CI's TensorFlow 2.15 suite).
    Must finish, and reload the same outputs."""
    difference, tf_keras_loaded = _ok(_run(
        "import sys, tempfile, numpy as np, layers\n"
        "import tensorflow as tf\n"
        "folder = tempfile.mkdtemp()\n"
        "inputs = tf.keras.Input((4,))\n"
        "trained = tf.keras.Model(inputs, tf.keras.layers.Dense(2)(inputs))\n"
        "trained.compile(optimizer=tf.keras.optimizers.legacy.SGD(0.1), loss='mse')\n"
        "trained.train_on_batch(np.ones((2, 4), 'float32'), np.ones((2, 2), 'float32'))\n"
        "trained.save(folder + '/saved', save_format='tf')\n"
        "tf.saved_model.load(folder + '/saved')\n"
        "x = np.arange(8, dtype='float32').reshape(2, 4)\n"
        "model = tf.keras.Model(inputs, tf.keras.layers.Dense(3)(tf.keras.layers.Dense(5)(inputs)))\n"
        "model.save(folder + '/model.keras')\n"
        "reloaded = tf.keras.models.load_model(folder + '/model.keras')\n"
        "print(float(np.abs(reloaded(x).numpy() - model(x).numpy()).max()), sys.modules.get('tf_keras') is not None)"))
    assert float(difference) == 0.0
    assert tf_keras_loaded == ("True" if KERAS_MAJOR >= 3 else "False")  # on 2.15 only keras 2.15 is in the process
