"""Train an equivariant CNN on CIFAR-10 with DP-SGD.

    python train.py --flagfile=configs/cifar10.cfg [--output_dir=runs/x ...]

Mistakes in flags, data or the output folder end with a one-line error and exit code 2. Rerunning the
same command resumes an interrupted run. SIGINT/SIGTERM stop cleanly after writing a checkpoint, with exit
code 130/143.
"""

import contextlib
import os
import re
import sys
import threading

# Level 3 also hides the harmless CUDA-plugin registration errors TensorFlow prints at start-up.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# A line of C++ (absl) logging: severity letter, date, time, thread, file:line.
_NATIVE_LOG_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ")
_ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


@contextlib.contextmanager
def _native_log_level():
    """Applies TF_CPP_MIN_LOG_LEVEL to what TensorFlow 2.18+ logs from C++ while it loads (oneDNN and CUDA notes):
    it writes those straight to stderr, before its logging reads the level. Other output passes unchanged."""
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

    def pump():
        with os.fdopen(read, "rb") as lines, os.fdopen(os.dup(saved), "wb", buffering=0) as out:
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


from absl import app, logging  # noqa: E402

from eqdp_tf import config  # noqa: E402
from eqdp_tf.errors import UserError, one_line  # noqa: E402

config.define_flags()


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])} (flags look like --name=value)", file=sys.stderr)
        return 2
    # TensorFlow's INFO/WARNING chatter (pfor fallbacks, SavedModel tracing) drowns the progress lines.
    logging.set_verbosity(logging.ERROR)
    try:
        cfg = config.config_from_flags()
        with _native_log_level():
            import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
        # imported late: TensorFlow start-up is slow
        from eqdp_tf.training import checkpoint, loop

        try:
            loop.run(cfg)
        except checkpoint.Interrupted as err:
            print(f"interrupted: {err}", file=sys.stderr)
            return err.exit_code
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopped at once (second Ctrl-C); the last checkpoint is kept; rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=config.parse_flags)
