"""Images in class folders: the user's own (``folder:PATH``) and fast.ai's ImageNette folder.

    PATH/train/<class>/...  and  PATH/test/<class>/...   the test set given
    PATH/<class>/...                                      one tree: --test_fraction of it held out for testing,
                                                          drawn with --split_seed

This is the layout of ``tf.keras.utils.image_dataset_from_directory``: the classes are the subfolders, numbered in
sorted order of their names (label 0 is the first), and every PNG, JPEG, BMP or GIF below a class folder is one of
its images. Other files are skipped (and counted in the description).
"""

import os

import numpy as np

from eqdp_tf.datasets import images as images_lib
from eqdp_tf.datasets.reading import MissingDataError, ReadResult
from eqdp_tf.errors import DataError

_LAYOUT = ("one subfolder of images per class (PATH/<class>/*.png), or train/ and test/ each with such "
           "subfolders")


def _subfolders(root):
    return sorted(name for name in os.listdir(root)
                  if not name.startswith(".") and os.path.isdir(os.path.join(root, name)))


def _class_files(root, classes, required):
    """[(path, label)] of the images of each class folder of ``root`` that exists, and the other files skipped.
    ``required``: every class folder must exist and hold an image (the training set)."""
    files, skipped = [], 0
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        paths, others = images_lib.listed_images(folder)
        skipped += others
        if required and not paths:
            raise DataError(f"class folder {folder} holds no images (PNG, JPEG, BMP or GIF)")
        files += [(path, label) for path in paths]
    return files, skipped


def _checked_classes(root, classes):
    if not classes:
        raise DataError(f"{root} holds no class folders: it needs {_LAYOUT}")
    if len(classes) == 1:
        raise DataError(f"{root} has one class folder ({classes[0]}); a classifier needs at least two")


def read_split_tree(train_root, test_root, options, channels=None, source=""):
    """A ``ReadResult`` of a training tree and a test tree of class folders (the test tree's classes must be the
    training tree's; it may lack some)."""
    classes = _subfolders(train_root)
    _checked_classes(train_root, classes)
    unknown = [name for name in _subfolders(test_root) if name not in classes]
    if unknown:
        raise DataError(f"{os.path.join(test_root, unknown[0])} is not a class of {train_root} "
                        f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    train_files, skipped = _class_files(train_root, classes, required=True)
    test_files, test_skipped = _class_files(test_root, classes, required=False)
    if not test_files:
        raise DataError(f"the test folder {test_root} holds no images in class folders")
    train_images, train_labels, train_notes = images_lib.decode_files(train_files, options.image_size, channels)
    test_images, test_labels, test_notes = images_lib.decode_files(test_files, options.image_size, channels)
    return ReadResult(train_images, train_labels, test_images, test_labels, num_classes=len(classes),
                      class_names=tuple(classes), source=source or f"the class folders in {train_root}",
                      test_split=f"the images in {test_root}", preprocessing=tuple(dict.fromkeys(
                          train_notes + test_notes)), notes=_skipped_note(skipped + test_skipped))


def _skipped_note(skipped):
    return (f"{skipped} files that are not PNG, JPEG, BMP or GIF images skipped",) if skipped else ()


def _held_out(count, fraction, seed, root):
    """Sorted (train, test) indices of ``count`` images, ``fraction`` of them drawn for testing with ``seed``."""
    num_test = int(round(fraction * count))
    if not 1 <= num_test < count:
        raise DataError(f"--test_fraction={fraction:g} of the {count} images in {root} holds out {num_test} for "
                        "testing; it must leave at least one for each set (or give train/ and test/ folders)")
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def read_folder(path, options):
    """A ``ReadResult`` of ``folder:PATH`` (either layout above)."""
    if not os.path.isdir(path):
        raise MissingDataError(f"--dataset=folder:{path}: no such folder")
    top = _subfolders(path)
    if "train" in top or "test" in top:
        missing = "test" if "train" in top else "train"
        if missing not in top:
            raise DataError(f"{path} has {'train' if missing == 'test' else 'test'}/ but no {missing}/ folder: "
                            f"give both, or put the class folders directly in {path} to hold out "
                            "--test_fraction of them for testing")
        return read_split_tree(os.path.join(path, "train"), os.path.join(path, "test"), options,
                               source=f"the class folders in {path}/train and {path}/test")
    _checked_classes(path, top)
    files, skipped = _class_files(path, top, required=True)
    train, test = _held_out(len(files), options.test_fraction, options.split_seed, path)
    # Split before decoding, so that no image is held twice.
    size = options.image_size
    train_images, train_labels, train_notes = images_lib.decode_files([files[i] for i in train], size)
    test_images, test_labels, test_notes = images_lib.decode_files([files[i] for i in test], size)
    return ReadResult(train_images, train_labels, test_images, test_labels, num_classes=len(top),
                      class_names=tuple(top), source=f"the class folders in {path}",
                      test_split=f"{len(test)} of the {len(files)} images ({options.test_fraction:g}) held out at "
                                 f"random with --split_seed={options.split_seed}",
                      preprocessing=tuple(dict.fromkeys(train_notes + test_notes)), notes=_skipped_note(skipped))


# fast.ai's imagenette-160 archive unpacks to this folder (imagenette2-160 for its second version, which TFDS has).
IMAGENETTE_FOLDERS = ("imagenette2-160", "imagenette-160")


def read_imagenette(options):
    """A ``ReadResult`` of fast.ai's ImageNette folder (``train/`` and ``val/`` with one folder per class, as the
    official code reads it; val is the test set) in ``options.data_dir`` or one of ``IMAGENETTE_FOLDERS`` in it."""
    root = options.data_dir
    if not os.path.isdir(root):
        raise MissingDataError(f"ImageNette --data_dir {root} does not exist or is not a folder")
    for name in IMAGENETTE_FOLDERS:
        if os.path.isdir(os.path.join(root, name, "train")):
            root = os.path.join(root, name)
            break
    missing = [name for name in ("train", "val") if not os.path.isdir(os.path.join(root, name))]
    if missing:
        raise MissingDataError(f"{root} has no {' and no '.join(m + '/' for m in missing)} folder: --dataset="
                               f"imagenette --data_dir takes fast.ai's imagenette-160 folder (train/ and val/, one "
                               "folder per class) or the folder holding it")
    result = read_split_tree(os.path.join(root, "train"), os.path.join(root, "val"), options, channels=3,
                             source=f"fast.ai's ImageNette folder {root}")
    result.test_split = f"the val/ images of {root}, as the official code"
    return result
