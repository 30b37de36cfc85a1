"""Checkpoints that survive a crash at any moment, and a clean stop on SIGINT/SIGTERM.

``CheckpointStore`` writes a ``tf.train.Checkpoint`` as ``checkpoints/ckpt-<step>``. TensorFlow writes the data
and index files under temporary names and renames them into place; the store then fsyncs them and only
afterwards points the ``checkpoint`` state file (read by ``tf.train.latest_checkpoint``) at the new one, with
an atomic rename. So a crash while writing leaves the previous checkpoint intact and pointed to. On restore
the store verifies a checkpoint before using it (every tensor is read, which checks TensorFlow's CRC32C
checksums) and falls back to an older one if the newest is truncated or corrupt; the privacy journal then
accounts for the lost steps (``checkpoint_journal``).

What a checkpoint holds: the model, the EMA model, the optimizer (with its iteration count and any momentum),
the step counter and the model's privacy ledger. The step counter is the whole random state: sampling, noise
and augmentation are pure functions of (key, step) (``privacy.randomness``; the key is kept out of checkpoints).

``StopSignals`` turns SIGINT/SIGTERM into a request the training loop honours at the next physical batch:
it abandons a half-accumulated step (nothing of it was noised or applied), checkpoints the last finished
step and raises ``Interrupted`` (exit code 130 or 143). A second SIGINT stops at once (KeyboardInterrupt).
"""

import glob
import os
import re
import shutil
import signal
import threading

import tensorflow as tf

from eqdp_tf.errors import one_line
from eqdp_tf.io import fsync_dir, write_text_atomic

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d+)\.index$")


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class CheckpointStore:
    """``ckpt-<step>`` checkpoints of ``checkpoint`` in ``directory``; keeps the newest ``keep``."""

    def __init__(self, checkpoint: tf.train.Checkpoint, directory: str, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.checkpoint = checkpoint
        self.directory = directory
        self.keep = keep

    def prefix(self, step):
        return os.path.join(self.directory, f"ckpt-{int(step)}")

    def steps(self):
        """Steps with a (complete-looking) checkpoint on disk, ascending."""
        if not os.path.isdir(self.directory):
            return []
        found = (_NAME.match(name) for name in os.listdir(self.directory))
        return sorted(int(m.group(1)) for m in found if m)

    @staticmethod
    def verify(prefix):
        """Reads every tensor of the checkpoint at ``prefix``; raises if it is missing, truncated or corrupt."""
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)

    def latest_valid(self, on_skip=None):
        """(step, prefix) of the newest checkpoint that verifies, or (0, None).

        A newer one that does not verify is set aside (its files renamed to ``*.unreadable``), and
        ``on_skip(prefix, error)`` hears about it.
        """
        for step in reversed(self.steps()):
            prefix = self.prefix(step)
            try:
                self.verify(prefix)
            except Exception as err:  # noqa: BLE001 - TF reports damage as OpError, IndexError, ValueError, ...
                for path in glob.glob(glob.escape(prefix) + ".*"):
                    os.replace(path, path + ".unreadable")
                if on_skip is not None:
                    on_skip(prefix, one_line(err))
                continue
            return step, prefix
        return 0, None

    def restore(self, prefix):
        # Optimizer variables are created at the first update; their values are restored then.
        self.checkpoint.read(prefix).expect_partial()

    def save(self, step):
        """Writes ``ckpt-<step>`` durably, then points the state file at it, then deletes old ones."""
        os.makedirs(self.directory, exist_ok=True)
        self._remove_debris()
        prefix = self.prefix(step)
        # Creating save_counter puts it into the checkpoint, as Checkpoint.save would: a plain
        # tf.train.Checkpoint(...).restore(path) then matches every object it has.
        self.checkpoint.save_counter.assign(step)
        self.checkpoint.write(prefix)
        for path in glob.glob(glob.escape(prefix) + ".*"):
            _fsync_file(path)
        fsync_dir(self.directory)
        kept = [s for s in self.steps() if s <= step][-self.keep:]
        lines = [f'model_checkpoint_path: "ckpt-{step}"']
        lines += [f'all_model_checkpoint_paths: "ckpt-{s}"' for s in kept]
        write_text_atomic(os.path.join(self.directory, "checkpoint"), "\n".join(lines) + "\n")
        for old in self.steps():
            if old not in kept and old < step:
                for path in glob.glob(glob.escape(self.prefix(old)) + ".*"):
                    os.remove(path)
        return prefix

    def _remove_debris(self):
        """Temporary files of a write that a crash interrupted."""
        for path in glob.glob(os.path.join(glob.escape(self.directory), "*_temp")):
            shutil.rmtree(path, ignore_errors=True)
        for path in glob.glob(os.path.join(glob.escape(self.directory), "*.tempstate*")):
            os.remove(path)


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


class StopSignals:
    """Context manager: SIGINT/SIGTERM set ``requested`` (the signal number) instead of killing the process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stream=None):
        self.requested = None
        self._previous = {}
        self._stream = stream

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def reinstall(self):
        """Takes SIGINT/SIGTERM back after something else took them (MultiWorkerMirroredStrategy's coordination
        service installs a C++ SIGTERM handler for its preemption notices, which would swallow our SIGTERM)."""
        if self._previous:
            for signum in self.SIGNALS:
                signal.signal(signum, self._handle)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, keeping the last checkpoint
        self.requested = signum
        name = signal.Signals(signum).name
        print(f"\n{name} received: stopping after this physical batch; writing a checkpoint first "
              "(Ctrl-C again to stop at once)", flush=True, file=self._stream)
