"""TF_CPP_MIN_LOG_LEVEL for what TensorFlow 2.18+ logs from C++ while it loads.

TensorFlow 2.18+ writes oneDNN and CUDA notes (``I0000 ... port.cc:153] oneDNN custom operations are on``, the
cuDNN/cuBLAS registration errors) straight to stderr at import, before its logging reads the level; on TensorFlow
2.21 on a CPU that is four lines and absl's preamble in front of every one-line error of ``train.py``. No
TensorFlow import here.
"""

import contextlib
import os
import re
import sys
import threading

# A line of C++ (absl) logging: severity letter, date, time, thread, file:line.
_NATIVE_LOG_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ")
_ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


@contextlib.contextmanager
def native_log_level():
    """Within it, lines of C++ logging written to stderr below TF_CPP_MIN_LOG_LEVEL (1: I; 2: I, W; 3: I, W, E) and
    absl's preamble are dropped; everything else passes unchanged. Wrap ``import tensorflow`` in it."""
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")
    hidden = b"IWE"[:int(level)] if level in ("1", "2", "3") else b""
    if not hidden:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    lines, out = os.fdopen(read, "rb"), os.fdopen(os.dup(saved), "wb", buffering=0)

    def pump():
        with lines, out:
            for line in lines:
                match = _NATIVE_LOG_LINE.match(line)
                if not (line.startswith(_ABSL_PREAMBLE) or (match and match.group(1) in hidden)):
                    out.write(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump reads to the end and stops
        os.close(saved)
        thread.join()
