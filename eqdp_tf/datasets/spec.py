"""What ``--dataset`` names, as plain data (no TensorFlow): the config validates the flag with it.

    cifar10 | cifar100 | tiny_imagenet | imagenette      the official code's four datasets
    tfds:NAME[/CONFIG]                                   any TFDS image-classification dataset
    folder:PATH                                          one subfolder of images per class
    npz:PATH                                             arrays in MedMNIST's layout

For the official four, ``OFFICIAL`` holds what the official code (hlzl/equivariant, ``data/dataloader.py``,
``data/augmentation.py``, ``conf/setup/dataset/*.yaml``) fixes for them: the image size, the number of classes and
the normalisation constants.
"""

import dataclasses
import os
from typing import Tuple

from eqdp_tf.errors import ConfigError

OFFICIAL_KINDS = ("cifar10", "cifar100", "tiny_imagenet", "imagenette")
PREFIXED_KINDS = ("tfds", "folder", "npz")
KINDS = OFFICIAL_KINDS + PREFIXED_KINDS

# The official AugMult pads the random crops by 4 pixels, reflecting, at every image size (it passes only the crop
# size on, never a padding): 4 at 32 px, and still 4 at 64 and 160 px.
OFFICIAL_CROP_PADDING = 4

# Per-channel mean and std of the CIFAR-10 training images, pixels scaled to [0, 1]. This program's constants since
# its first version (the official code writes the std's first value 0.2471).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# The official code normalises CIFAR-100 with the CIFAR-10 constants (one branch for both), to 4 decimals as here.
OFFICIAL_CIFAR_STD = (0.2471, 0.2435, 0.2616)
# ImageNet's statistics, which the official code uses for Tiny-ImageNet and ImageNette.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class OfficialSetting:
    title: str
    image_size: int
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    normalization_source: str


OFFICIAL = {
    "cifar10": OfficialSetting("CIFAR-10", 32, 10, CIFAR10_MEAN, CIFAR10_STD,
                               "official: the CIFAR-10 training images' statistics"),
    "cifar100": OfficialSetting("CIFAR-100", 32, 100, CIFAR10_MEAN, OFFICIAL_CIFAR_STD,
                                "official: the CIFAR-10 constants, which the official code also uses for CIFAR-100"),
    "tiny_imagenet": OfficialSetting("Tiny-ImageNet", 64, 200, IMAGENET_MEAN, IMAGENET_STD,
                                     "official: ImageNet's statistics, as the official code uses for Tiny-ImageNet"),
    "imagenette": OfficialSetting("ImageNette", 160, 10, IMAGENET_MEAN, IMAGENET_STD,
                                  "official: ImageNet's statistics, as the official code uses for ImageNette"),
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``--dataset``: ``kind`` (one of ``KINDS``) and, for the prefixed kinds, ``argument`` (the TFDS name
    with its optional config, or the path)."""

    kind: str
    argument: str = ""

    @property
    def official(self):
        """The official code's setting for this dataset, or None."""
        return OFFICIAL.get(self.kind)

    @property
    def path(self):
        """The absolute path of a folder: or npz: dataset."""
        return os.path.abspath(os.path.expanduser(self.argument))


def parse_spec(text) -> DatasetSpec:
    """``DatasetSpec`` of a ``--dataset`` value; a ``ConfigError`` naming the forms otherwise."""
    forms = f"{', '.join(OFFICIAL_KINDS)}, tfds:NAME[/CONFIG], folder:PATH or npz:PATH"
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"--dataset must be one of {forms}; got {text!r}")
    text = text.strip()
    if text in OFFICIAL_KINDS:
        return DatasetSpec(text)
    kind, colon, argument = text.partition(":")
    if not colon or kind not in PREFIXED_KINDS:
        raise ConfigError(f"--dataset must be one of {forms}; got {text!r}")
    if not argument.strip():
        what = "a TFDS dataset name" if kind == "tfds" else "a path"
        raise ConfigError(f"--dataset={kind}: needs {what} after the colon, e.g. "
                          + ("tfds:mnist" if kind == "tfds" else f"{kind}:/data/my_images"))
    return DatasetSpec(kind, argument.strip())
