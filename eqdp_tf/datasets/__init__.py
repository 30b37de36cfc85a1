"""Datasets: one small reader per source behind one entry, ``load_dataset``, which returns uint8 arrays and their
``DatasetDescription`` (N, image shape, classes, normalisation, where they came from).

    cifar.py          CIFAR-10 and CIFAR-100: the official binary and pickle files, or TFDS
    tiny_imagenet.py  the official Tiny-ImageNet zip's folder
    folder.py         class folders: the user's own images, fast.ai's ImageNette
    npz.py            arrays in MedMNIST's layout
    tfds_reader.py    any TFDS image-classification dataset
    images.py         decoding, the size rule and the channel rule
    spec.py           what --dataset names, and the official settings (plain data, no TensorFlow)
    load.py           the entry

``spec`` and ``description`` are plain data and load at once (the config validates --dataset with them); the
readers import TensorFlow and load on first use.
"""

from eqdp_tf.datasets.description import DatasetDescription, LoadedDataset
from eqdp_tf.datasets.reading import MissingDataError, ReadOptions
from eqdp_tf.datasets.spec import KINDS, OFFICIAL, DatasetSpec, parse_spec

_LAZY = {"load_dataset": "eqdp_tf.datasets.load", "load_cifar10": "eqdp_tf.datasets.cifar"}

__all__ = ["DatasetDescription", "DatasetSpec", "KINDS", "LoadedDataset", "MissingDataError", "OFFICIAL",
           "ReadOptions", "load_cifar10", "load_dataset", "parse_spec"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eqdp_tf.datasets' has no attribute {name!r}")


def __dir__():
    # Without it dir() and tab completion list none of the lazily loaded names.
    return sorted(set(globals()) | set(__all__))
