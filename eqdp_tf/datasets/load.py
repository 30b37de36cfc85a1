"""The one entry: ``load_dataset`` reads a ``--dataset`` with the reader of its kind and describes the result.

What it decides beyond the readers: the official datasets' image size, both splits of one image shape, the
training and test subsets, the normalisation (official constants, given ones, or computed from the training
images), the crop padding of the augmentation, and the fingerprint a resumed run must match.
"""

import dataclasses
import hashlib
from typing import Optional, Sequence

import numpy as np

from eqdp_tf.datasets import cifar, folder, npz, tfds_reader, tiny_imagenet
from eqdp_tf.datasets import images as images_lib
from eqdp_tf.datasets.description import DatasetDescription, LoadedDataset
from eqdp_tf.datasets.reading import ReadOptions, take_subset
from eqdp_tf.datasets.spec import OFFICIAL_CROP_PADDING, parse_spec
from eqdp_tf.errors import ConfigError, DataError

# TFDS's imagenette/160px downloads fast.ai's archive from here.
IMAGENETTE_DOWNLOAD_HOST = "s3.amazonaws.com"
_STATISTICS_CHUNK = 1024


def _read(spec, options):
    if spec.kind in cifar.FORMATS:
        return cifar.read(spec.kind, options)
    if spec.kind == "tiny_imagenet":
        return tiny_imagenet.read(options)
    if spec.kind == "imagenette":
        if options.data_dir is not None:
            return folder.read_imagenette(options)
        return tfds_reader.read_tfds("imagenette/160px", options, channels=3, probe=lambda: (
            tfds_reader.check_download_possible(IMAGENETTE_DOWNLOAD_HOST, "ImageNette",
                                                "fast.ai's imagenette-160 folder")))
    if spec.kind == "tfds":
        return tfds_reader.read_tfds(spec.argument, options)
    if spec.kind == "folder":
        return folder.read_folder(spec.path, options)
    return npz.read(spec.path, options)


def _one_shape(result):
    """Train and test images of one size, and one channel count (grayscale repeated when the other is colour)."""
    train, test = result.train_images, result.test_images
    if train.shape[1:3] != test.shape[1:3]:
        raise DataError(f"the training images are {train.shape[1]}x{train.shape[2]} but the test images "
                        f"{test.shape[1]}x{test.shape[2]}; give --image_size=S to make them all S x S "
                        f"({images_lib.SIZE_RULE.format(size='S')})")
    channels = (train.shape[3], test.shape[3])
    if channels[0] != channels[1]:
        if 1 not in channels:
            raise DataError(f"the training images have {channels[0]} channels but the test images {channels[1]}")
        result.train_images = np.repeat(train, max(channels) // channels[0], axis=3)
        result.test_images = np.repeat(test, max(channels) // channels[1], axis=3)
        result.preprocessing = tuple(dict.fromkeys(result.preprocessing + ("grayscale images repeated to 3 "
                                                                           "channels",)))


def channel_statistics(images):
    """(mean, std) per channel of uint8 images [N, H, W, C], pixels scaled to [0, 1], summed in float64 a chunk at
    a time (no float copy of the whole set)."""
    channels = images.shape[-1]
    total, squares, count = np.zeros(channels), np.zeros(channels), 0
    for start in range(0, len(images), _STATISTICS_CHUNK):
        pixels = images[start:start + _STATISTICS_CHUNK].reshape(-1, channels).astype(np.float64) / 255.0
        total += pixels.sum(axis=0)
        squares += np.square(pixels).sum(axis=0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def _per_channel(values, channels, name):
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ConfigError(f"--{name} gives {len(values)} values for images with {channels} channels: give one per "
                          "channel, or one for all")
    return values


def _normalization(spec, images, mean, std):
    """(mean, std, where they came from) for images [N, H, W, C]."""
    channels = images.shape[-1]
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ConfigError("give both --normalization_mean and --normalization_std, or neither")
        return (_per_channel(mean, channels, "normalization_mean"), _per_channel(std, channels, "normalization_std"),
                "given by --normalization_mean and --normalization_std")
    official = spec.official
    if official is not None and channels == len(official.mean):
        return official.mean, official.std, official.normalization_source
    mean, std = channel_statistics(images)
    constant = [c for c, s in enumerate(std) if s == 0.0]
    if constant:
        raise DataError(f"channel {constant[0]} of the training images is constant, so it cannot be standardised; "
                        "give --normalization_mean and --normalization_std")
    return mean, std, (f"computed from the {len(images)} training images (mean and std per channel; not covered "
                       "by the DP guarantee)")


def fingerprint(images, labels):
    """SHA-256 of the images and labels: equal for the same examples in the same order."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).data)
    digest.update(np.ascontiguousarray(labels, np.int64).data)
    return digest.hexdigest()


def load_dataset(dataset: str, options: ReadOptions = ReadOptions(), *, train_subset: Optional[int] = None,
                 test_subset: Optional[int] = None, normalization_mean: Optional[Sequence[float]] = None,
                 normalization_std: Optional[Sequence[float]] = None,
                 crop_padding: int = OFFICIAL_CROP_PADDING) -> LoadedDataset:
    """uint8 images and int64 labels of both splits of ``dataset`` (a ``--dataset`` value) and their description.

    ``train_subset``/``test_subset`` keep the first n examples of a split; the normalisation is the official one
    for the official datasets, ``normalization_mean``/``_std`` when given, else computed from the training images.
    """
    spec = parse_spec(dataset)
    if spec.official is not None and options.image_size is None:
        options = dataclasses.replace(options, image_size=spec.official.image_size)
    result = _read(spec, options)
    _one_shape(result)
    try:
        train_images, train_labels = take_subset(result.train_images, result.train_labels, train_subset)
        test_images, test_labels = take_subset(result.test_images, result.test_labels, test_subset)
    except ConfigError as err:
        raise ConfigError(f"--train_subset/--test_subset: {err}") from None
    if result.num_classes < 2:
        raise DataError(f"{dataset} has {result.num_classes} class; a classifier needs at least two")
    height, width, channels = train_images.shape[1:]
    if crop_padding >= min(height, width):
        raise ConfigError(f"--crop_padding={crop_padding} needs images larger than {crop_padding} pixels (reflect "
                          f"padding); these are {height}x{width}")
    mean, std, normalization_source = _normalization(spec, train_images, normalization_mean, normalization_std)
    description = DatasetDescription(
        dataset=dataset, source=result.source, image_shape=(height, width, channels), num_classes=result.num_classes,
        num_train=len(train_labels), num_test=len(test_labels), mean=mean, std=std,
        normalization_source=normalization_source, crop_padding=crop_padding,
        crop_padding_source=("the official code's: 4 pixels at every image size" if crop_padding ==
                             OFFICIAL_CROP_PADDING else "given by --crop_padding"),
        test_split=result.test_split,
        class_names=result.class_names, preprocessing=tuple(result.preprocessing), notes=tuple(result.notes))
    return LoadedDataset(train_images, train_labels, test_images, test_labels, description,
                         fingerprint(train_images, train_labels))
