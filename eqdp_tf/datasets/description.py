"""The description of a loaded dataset: everything the sampler, the accountant, the augmentation and the model read
from the data instead of assuming CIFAR-10. Plain data (no TensorFlow); it goes into config.json, the run plan and
the export."""

import dataclasses
import json
from typing import NamedTuple, Optional, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetDescription:
    dataset: str  # the --dataset value
    source: str  # where the arrays were read from (files, TFDS name and version)
    image_shape: Tuple[int, int, int]  # (height, width, channels) of every image, train and test
    num_classes: int
    num_train: int  # N: the sampling rate is batch_size / N, and the accountant counts on it
    num_test: int
    mean: Tuple[float, ...]  # per-channel normalisation of pixels scaled to [0, 1], inside the model
    std: Tuple[float, ...]
    normalization_source: str  # "official: ...", "computed from ...", or "given by ..."
    crop_padding: int  # reflect padding of the augmentation's random crops, in pixels
    crop_padding_source: str
    test_split: str  # which examples are the test set, and how they were chosen
    class_names: Optional[Tuple[str, ...]] = None  # label i is class_names[i], when the source names them
    preprocessing: Tuple[str, ...] = ()  # what was done to the images on loading (resizing, channels), in words
    notes: Tuple[str, ...] = ()  # anything else a reader of config.json should know (unused splits, ...)

    @property
    def normalization_computed(self):
        """True when the normalisation was computed from the (private) training images."""
        return self.normalization_source.startswith("computed")

    def to_json(self):
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data):
        tuples = {"image_shape", "mean", "std", "class_names", "preprocessing", "notes"}
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in data.items()})

    def summary(self):
        """One line for the start of a run."""
        height, width, channels = self.image_shape
        return (f"dataset {self.dataset}: {self.num_train} train, {self.num_test} test images of "
                f"{height}x{width}x{channels}, {self.num_classes} classes; from {self.source}; normalisation "
                f"{self.normalization_source}")


class LoadedDataset(NamedTuple):
    """uint8 images [N, H, W, C] and int64 labels [N] of both splits, their description, and the SHA-256 of the
    training images and labels (a resumed run must see the same ones). The fingerprint is kept out of the
    description, which config.json and the export publish: a hash of the training set would tell which of two
    neighbouring training sets it was, which no DP guarantee covers."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    description: DatasetDescription
    fingerprint: str

