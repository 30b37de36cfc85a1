"""Durable file writes, used by everything that writes a run's files.

A crash (or a full disk) must never leave half a file where a reader expects a whole one: text goes to a temporary
file in the same folder, is fsynced, and replaces the target with ``os.replace`` (atomic on POSIX); then the
folder is fsynced so that the rename itself survives a power loss.
"""

import json
import os
import tempfile


def fsync_dir(folder):
    """Makes a folder's entries (a created or renamed file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path, text, mode=None):
    """Writes ``text`` to ``path`` durably: readers see the old file or the new one, never a mix. ``mode`` (e.g.
    0o600 for a secret) is set before any byte is written."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)
    return path


def write_json_atomic(path, obj, mode=None):
    """``write_text_atomic`` of ``obj`` as indented JSON (NaN and infinities refused: not JSON)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", mode)
