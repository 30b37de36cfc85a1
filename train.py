"""Train an equivariant CNN with DP-SGD on CIFAR-10, or on another dataset (--dataset, docs/datasets.md).

    python train.py --flagfile=configs/cifar10.cfg [--output_dir=runs/x ...]
    python train.py --flagfile=configs/own_images.cfg --dataset=folder:my_images

Mistakes in flags, data or the output folder end with a one-line error and exit code 2. Rerunning the
same command resumes an interrupted run. SIGINT/SIGTERM stop cleanly after writing a checkpoint, with exit
code 130/143.
"""

import os
import sys

# Level 3 also hides the harmless CUDA-plugin registration errors TensorFlow prints at start-up.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, logging  # noqa: E402

from eqdp_tf import config  # noqa: E402
from eqdp_tf.errors import UserError, one_line  # noqa: E402
from eqdp_tf.native_log import native_log_level  # noqa: E402

config.define_flags()


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])} (flags look like --name=value)", file=sys.stderr)
        return 2
    # TensorFlow's INFO/WARNING chatter (pfor fallbacks, SavedModel tracing) drowns the progress lines.
    logging.set_verbosity(logging.ERROR)
    try:
        cfg = config.config_from_flags()
        with native_log_level():
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
