"""What every reader gets (``ReadOptions``) and gives back (``ReadResult``), and the label check they share.

A reader turns one source (CIFAR files, TFDS, a class-folder tree, an .npz) into uint8 arrays; what it knows about
where they came from goes into the ``ReadResult``, from which ``load`` writes the dataset's description.
"""

import dataclasses
from typing import Optional, Tuple

import numpy as np

from eqdp_tf.errors import ConfigError, DataError


class MissingDataError(DataError):
    """The dataset is not where it was looked for (as opposed to present but damaged)."""


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    data_dir: Optional[str] = None  # a local copy (official datasets), or TFDS's data folder (tfds:)
    image_size: Optional[int] = None  # resize every image to image_size x image_size (images.SIZE_RULE)
    train_split: Optional[str] = None  # TFDS split names (None: each reader's default)
    test_split: Optional[str] = None
    test_fraction: float = 0.1  # a class-folder tree without train/ and test/: the share held out for testing
    split_seed: int = 0  # ... drawn with this seed


@dataclasses.dataclass
class ReadResult:
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int64 [N], each in 0..num_classes-1
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    source: str  # where the arrays came from, for the description
    test_split: str  # which examples are the test set
    class_names: Optional[Tuple[str, ...]] = None
    preprocessing: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()


def label_vector(labels, where):
    """``labels`` as int64 [N] after checking they are integers, one per image (a column vector [N, 1], as MedMNIST
    stores them, is accepted); a ``DataError`` naming ``where`` otherwise."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{where} must hold one label per image (shape [N] or [N, 1]); got shape "
                        f"{list(labels.shape)}")
    if labels.dtype.kind not in "iub":
        raise DataError(f"{where} must be integers (class numbers 0, 1, ...); got {labels.dtype}")
    return labels.astype(np.int64)


def checked_labels(labels, num_classes, where):
    """``label_vector`` of ``labels`` after checking each is in 0..num_classes-1."""
    labels = label_vector(labels, where)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{where} has label {labels[bad[0]]} at position {bad[0]}; labels must be "
                        f"0..{num_classes - 1}")
    return labels


def take_subset(images, labels, subset):
    """The first ``subset`` examples (all with None)."""
    if subset is None:
        return images, labels
    if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)):
        raise ConfigError(f"subset must be a whole number of examples, got {subset!r}.")
    if not 1 <= subset <= len(labels):
        raise ConfigError(f"subset must be between 1 and {len(labels)} (the examples available), got {subset}.")
    return images[:subset], labels[:subset]
