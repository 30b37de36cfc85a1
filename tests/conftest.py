import os

# Keep TensorFlow's C++ start-up chatter out of test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The local CIFAR-10 copy lives beside the project (never inside it); override with EQDP_CIFAR10_DIR.
CIFAR10_DIR = os.environ.get(
    "EQDP_CIFAR10_DIR",
    os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "cifar10", "cifar-10-batches-bin"),
)


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``: to assert that a command wrote nothing there."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files
