"""CIFAR-10 and CIFAR-100 from the official binary or python-pickle files, or through TFDS.

The two share their file formats up to the names and the labels: a CIFAR-10 binary record is one label byte and
the R, G and B planes; a CIFAR-100 record has two label bytes, coarse then fine, and the fine label is the class (as
in the official code, which trains on torchvision's CIFAR100, fine labels).
"""

import dataclasses
import os
import pickle
from typing import Dict, Optional, Tuple

import numpy as np

from eqdp_tf.datasets import images as images_lib
from eqdp_tf.datasets import tfds_reader
from eqdp_tf.datasets.reading import MissingDataError, ReadResult, take_subset
from eqdp_tf.errors import ConfigError, DataError, one_line

_PIXELS = 32 * 32 * 3
IMAGE_SHAPE = (32, 32, 3)
# Where TFDS's cifar10 and cifar100 builders download the archives from (their CifarInfo urls).
TFDS_DOWNLOAD_HOST = "www.cs.toronto.edu"


@dataclasses.dataclass(frozen=True)
class CifarFormat:
    title: str
    num_classes: int
    bin_dir: str  # the folder of the binary archive, e.g. cifar-10-batches-bin
    py_dir: str  # the folder of the python archive
    split_files: Dict[str, Tuple[str, ...]]  # file names per split; the binary ones add ".bin"
    label_bytes: int  # label bytes before the pixels of a binary record; the last one is the class
    pickle_labels: bytes  # the key of the class labels in a pickled batch
    official_records: Dict[str, int]  # records per file of the official archive, per split
    tfds_name: str

    @property
    def record_bytes(self):
        return self.label_bytes + _PIXELS


CIFAR10 = CifarFormat(
    "CIFAR-10", 10, "cifar-10-batches-bin", "cifar-10-batches-py",
    {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    1, b"labels", {"train": 10000, "test": 10000}, "cifar10")
CIFAR100 = CifarFormat(
    "CIFAR-100", 100, "cifar-100-binary", "cifar-100-python", {"train": ("train",), "test": ("test",)},
    2, b"fine_labels", {"train": 50000, "test": 10000}, "cifar100")
FORMATS = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def load_cifar(fmt: CifarFormat, split: str, data_dir: Optional[str] = None,
               subset: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [N,32,32,3] RGB, labels int64 [N]) of ``fmt``'s split 'train' or 'test'.

    With ``data_dir``, reads the official binary or python-pickle files from disk; without it, uses TFDS (which
    downloads on first use). ``subset=n`` keeps the first n examples.
    """
    if split not in fmt.split_files:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}.")
    if data_dir is None:
        images, labels = _from_tfds(fmt, split)
    else:
        images, labels = _from_dir(fmt, split, data_dir)
    return take_subset(images, labels, subset)


def load_cifar10(split: str, data_dir: Optional[str] = None,
                 subset: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``load_cifar`` of CIFAR-10: (images uint8 [N,32,32,3], labels int64 [N]) of split 'train' or 'test'."""
    return load_cifar(CIFAR10, split, data_dir, subset)


def _local_copy(fmt):
    return f"a local copy ({fmt.bin_dir} or {fmt.py_dir})"


def _from_tfds(fmt, split):
    """The split through TFDS: its prepared copy if there is one (no network), else downloaded and prepared."""

    def probe():
        tfds_reader.check_download_possible(TFDS_DOWNLOAD_HOST, fmt.title, _local_copy(fmt))

    try:
        tfds, builder, _, _ = tfds_reader.prepared_builder(fmt.tfds_name, probe=probe)
        images, labels, _ = tfds_reader.read_split(tfds, builder, split, fmt.tfds_name)
    except MissingDataError:
        raise
    except DataError as err:
        raise DataError(f"Could not load {fmt.title} through TFDS ({err}); either pass --data_dir pointing at a "
                        f"folder with {fmt.bin_dir} or {fmt.py_dir}, or allow TFDS to download it (needs "
                        "internet).") from None
    return _checked(fmt, images, labels.astype(np.int64), f"TFDS {fmt.tfds_name}")


def _from_dir(fmt, split, data_dir):
    if not os.path.isdir(data_dir):
        raise MissingDataError(f"{fmt.title} data_dir {data_dir!r} does not exist or is not a folder.")
    names = fmt.split_files[split]
    # The folder may hold the files itself or be the parent of the extracted archive.
    for folder, suffix, reader in [
        (data_dir, ".bin", _read_bin_file),
        (os.path.join(data_dir, fmt.bin_dir), ".bin", _read_bin_file),
        (os.path.join(data_dir, fmt.py_dir), "", _read_pickle_file),
        (data_dir, "", _read_pickle_file),
    ]:
        paths = [os.path.join(folder, name + suffix) for name in names]
        if any(os.path.isfile(p) for p in paths):
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise MissingDataError(f"{fmt.title} {split} split is incomplete: missing {', '.join(missing)}.")
            parts = [reader(fmt, p, fmt.official_records[split]) for p in paths]
            return (np.concatenate([images for images, _ in parts]),
                    np.concatenate([labels for _, labels in parts]))
    raise MissingDataError(
        f"No {fmt.title} {split} files found in {data_dir!r}: looked for {names[0]}.bin (directly or in "
        f"{fmt.bin_dir}/) and the pickle file {names[0]} (directly or in {fmt.py_dir}/)."
    )


def _read_bin_file(fmt, path, official_records):
    record = fmt.record_bytes
    try:
        size = os.path.getsize(path)
        if size == 0 or size % record:
            raise DataError(
                f"{path} is truncated or corrupt: {size} bytes, expected a positive multiple of {record} "
                f"({official_records * record} for an official file)."
            )
        records = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"cannot read {path}: {one_line(err)}.") from None
    if records.size != size:
        raise DataError(f"{path} changed or was cut short while being read ({records.size} of {size} bytes).")
    records = records.reshape(-1, record)
    labels = records[:, fmt.label_bytes - 1].astype(np.int64)
    # Records store channel planes (CHW); the pipeline works in HWC.
    images = records[:, fmt.label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _checked(fmt, np.ascontiguousarray(images), labels, path)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except the few numpy needs, so a hostile pickle cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("__builtin__", "object"), ("builtins", "object"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR pickle")
        return super().find_class(module, name)


def _read_pickle_file(fmt, path, official_records):
    del official_records  # a pickle says how many records it holds
    try:
        with open(path, "rb") as f:
            # encoding='bytes' reads both the official python2 pickles and python3 ones.
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[fmt.pickle_labels], dtype=np.int64)
    except Exception as exc:
        raise DataError(f"{path} is not a readable {fmt.title} pickle ({type(exc).__name__}: {exc}).") from exc
    if data.ndim != 2 or data.shape[1] != _PIXELS or data.shape[0] != labels.shape[0]:
        raise DataError(
            f"{path} has data of shape {data.shape} and {labels.shape[0]} labels; "
            f"expected [n, {_PIXELS}] and n labels."
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _checked(fmt, np.ascontiguousarray(images), labels, path)


def _checked(fmt, images, labels, source):
    """Validates shapes and label range so later stages can trust the arrays."""
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.shape[0] != labels.shape[0]:
        raise DataError(f"{source} gave images of shape {images.shape} for {labels.shape[0]} labels.")
    bad = np.flatnonzero((labels < 0) | (labels >= fmt.num_classes))
    if bad.size:
        raise DataError(f"{source} has label {labels[bad[0]]} at record {bad[0]}; {fmt.title} labels must be "
                        f"0..{fmt.num_classes - 1}.")
    return images, labels


def read(kind, options):
    """A ``ReadResult`` of ``kind`` ('cifar10' or 'cifar100'): from the files in ``options.data_dir``, else TFDS."""
    fmt = FORMATS[kind]
    try:
        train = load_cifar(fmt, "train", options.data_dir)
        test = load_cifar(fmt, "test", options.data_dir)
    except MissingDataError as err:
        if options.data_dir is None:  # TFDS's own message says what to do
            raise
        raise DataError(f"{err} Point --data_dir at the folder with the {fmt.title} files, or leave it unset to "
                        f"download {fmt.title} through TFDS.") from None
    size = options.image_size
    train_images, test_images = images_lib.fit_array(train[0], size), images_lib.fit_array(test[0], size)
    resized = images_lib.describe_size_rule(size, [IMAGE_SHAPE[:2]])
    where = (f"the {fmt.title} files in {os.path.abspath(options.data_dir)}" if options.data_dir
             else f"TFDS {fmt.tfds_name}")
    return ReadResult(train_images, train[1], test_images, test[1], num_classes=fmt.num_classes, source=where,
                      test_split=f"the official {fmt.title} test set", preprocessing=(resized,) if resized else ())
