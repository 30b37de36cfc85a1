"""Tiny-ImageNet in the layout of the official zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip):

    tiny-imagenet-200/wnids.txt                          the 200 classes, one WordNet id a line
    tiny-imagenet-200/train/<wnid>/images/*.JPEG         500 training images per class, 64x64
    tiny-imagenet-200/val/images/*.JPEG                  10000 labelled images ...
    tiny-imagenet-200/val/val_annotations.txt            ... labelled here: file, wnid, box
    tiny-imagenet-200/test/images/*.JPEG                 unlabelled: not used

As in the official code the labelled val split is the test set, and grayscale images become RGB. Labels follow the
order of wnids.txt (the official code numbers the classes in os.listdir order, which depends on the file system).
"""

import os

from eqdp_tf.datasets import images as images_lib
from eqdp_tf.datasets.reading import MissingDataError, ReadResult
from eqdp_tf.errors import DataError, one_line

FOLDER = "tiny-imagenet-200"


def _root(data_dir):
    if data_dir is None:
        raise MissingDataError("--dataset=tiny_imagenet needs --data_dir: the folder tiny-imagenet-200 unzipped from "
                               "http://cs231n.stanford.edu/tiny-imagenet-200.zip (TFDS does not have it)")
    for root in (data_dir, os.path.join(data_dir, FOLDER)):
        if os.path.isfile(os.path.join(root, "wnids.txt")):
            return root
    raise MissingDataError(f"no wnids.txt in {data_dir} or {os.path.join(data_dir, FOLDER)}: --data_dir takes the "
                           "tiny-imagenet-200 folder of the official zip, or the folder holding it")


def _lines(path, what):
    try:
        with open(path) as f:
            return [line.split() for line in f if line.strip()]
    except OSError as err:
        raise MissingDataError(f"cannot read {path} ({what}): {one_line(err)}") from None


def _train_files(root, wnids):
    files = []
    for label, wnid in enumerate(wnids):
        folder = os.path.join(root, "train", wnid, "images")
        if not os.path.isdir(folder):
            raise DataError(f"{folder} is missing: wnids.txt lists {wnid}, but train/ has no images of it")
        paths, _ = images_lib.listed_images(folder)
        if not paths:
            raise DataError(f"{folder} holds no images")
        files += [(path, label) for path in paths]
    return files


def _val_files(root, labels_of):
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(annotations):
        raise DataError(f"the test split is missing: no {annotations} (the labels of val/images)")
    files = []
    for number, fields in enumerate(_lines(annotations, "the labels of val/images"), 1):
        if len(fields) < 2:
            raise DataError(f"{annotations} line {number} is not 'file wnid ...': {' '.join(fields)!r}")
        name, wnid = fields[:2]
        if wnid not in labels_of:
            raise DataError(f"{annotations} line {number} labels {name} {wnid}, which is not in wnids.txt")
        files.append((os.path.join(root, "val", "images", name), labels_of[wnid]))
    return files


def read(options):
    """A ``ReadResult`` of Tiny-ImageNet in ``options.data_dir``."""
    root = _root(options.data_dir)
    wnids = [fields[0] for fields in _lines(os.path.join(root, "wnids.txt"), "the class list")]
    if len(set(wnids)) != len(wnids) or len(wnids) < 2:
        raise DataError(f"{os.path.join(root, 'wnids.txt')} must list at least two distinct classes, one a line")
    labels_of = {wnid: i for i, wnid in enumerate(wnids)}
    size = options.image_size
    train_images, train_labels, train_notes = images_lib.decode_files(_train_files(root, wnids), size, channels=3)
    test_images, test_labels, test_notes = images_lib.decode_files(_val_files(root, labels_of), size, channels=3)
    return ReadResult(train_images, train_labels, test_images, test_labels, num_classes=len(wnids),
                      class_names=tuple(wnids), source=f"the Tiny-ImageNet folder {root}",
                      test_split="the labelled val/ images (val/val_annotations.txt), as the official code; test/ "
                                 "has no labels and is not used",
                      preprocessing=tuple(dict.fromkeys(train_notes + test_notes)))
