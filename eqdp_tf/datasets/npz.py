"""Arrays in an .npz file in MedMNIST's layout (``npz:PATH``):

    train_images  [N, H, W] (grayscale) or [N, H, W, C], uint8 pixels
    train_labels  [N] or [N, 1], integers 0..K-1
    test_images, test_labels                 the same for the test set
    val_images, val_labels                   optional; not used (training uses train_*, evaluation test_*)

Any size and any number of channels. The classes are 0..K-1 with K one more than the largest training label.
"""

import os
import zipfile

import numpy as np

from eqdp_tf.datasets import images as images_lib
from eqdp_tf.datasets.reading import MissingDataError, ReadResult, checked_labels, label_vector
from eqdp_tf.errors import DataError, one_line

REQUIRED = ("train_images", "train_labels", "test_images", "test_labels")
OPTIONAL = ("val_images", "val_labels")


def _arrays(path):
    """{name: array} of the required keys (and which optional ones there are), read eagerly so that the file is
    closed again and a damaged member fails here, naming itself."""
    try:
        archive = np.load(path, allow_pickle=False)  # no pickled objects: they could run code
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path} is not a readable .npz file: {one_line(err)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an .npz archive of named arrays ({', '.join(REQUIRED)})")
    with archive:
        keys = set(archive.files)
        missing = [key for key in REQUIRED if key not in keys]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)}: an .npz in MedMNIST's layout holds "
                            f"{', '.join(REQUIRED)} (val_* optional); it has {', '.join(sorted(keys)) or 'nothing'}")
        arrays = {}
        for key in REQUIRED:
            try:
                arrays[key] = archive[key]
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
                raise DataError(f"{path}: {key} is unreadable ({one_line(err)})") from None
        return arrays, sorted(keys & set(OPTIONAL))


def _images(array, where):
    """uint8 [N, H, W, C] of [N, H, W] or [N, H, W, C] pixel values."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or 0 in array.shape:
        raise DataError(f"{where} must be images [N, H, W] or [N, H, W, C]; got shape {list(array.shape)}")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind in "iub" and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    raise DataError(f"{where} must be uint8 pixel values 0..255; got {array.dtype}"
                    + (f" from {array.min()} to {array.max()}" if array.dtype.kind in "iuf" else ""))


def read(path, options):
    """A ``ReadResult`` of the .npz at ``path``."""
    if not os.path.isfile(path):
        raise MissingDataError(f"--dataset=npz:{path}: no such file")
    arrays, optional = _arrays(path)
    train_images, test_images = (_images(arrays[f"{split}_images"], f"{path}: {split}_images")
                                 for split in ("train", "test"))
    train_labels = label_vector(arrays["train_labels"], f"{path}: train_labels")
    if len(train_labels) == 0:
        raise DataError(f"{path}: train_labels is empty")
    num_classes = int(train_labels.max()) + 1
    train_labels = checked_labels(train_labels, max(num_classes, 1), f"{path}: train_labels")  # none negative
    if num_classes < 2:
        raise DataError(f"{path}: train_labels has 1 class (all 0); a classifier needs at least two")
    test_labels = checked_labels(arrays["test_labels"], num_classes, f"{path}: test_labels (classes of the training "
                                                                     "labels)")
    for split, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        if len(images) != len(labels):
            raise DataError(f"{path}: {split}_images holds {len(images)} images but {split}_labels {len(labels)} "
                            "labels")
    size = options.image_size
    resized = images_lib.describe_size_rule(size, {train_images.shape[1:3], test_images.shape[1:3]})
    return ReadResult(
        images_lib.fit_array(train_images, size), train_labels, images_lib.fit_array(test_images, size), test_labels,
        num_classes=num_classes, source=f"the arrays in {path}", test_split="test_images and test_labels",
        preprocessing=(resized,) if resized else (),
        notes=(f"{' and '.join(optional)} in the file not used",) if optional else ())
