"""From image files and images of any size to one uint8 array [N, H, W, C]: decoding, the size rule, the channel
rule.

The size rule (``--image_size=S``): an image is center-cropped to the largest square, then resized to S x S
(bilinear, antialiased); an image already S x S is kept as it is. Without S every image must have the size of the
first. The models need square images: a 90-degree rotation maps only a square onto itself.

The channel rule: an alpha channel is dropped; when some images are grayscale and others colour, the grayscale ones
are repeated to three channels (so are all of them with ``channels=3``); a dataset of grayscale images stays one
channel.
"""

import os

import numpy as np
import tensorflow as tf

from eqdp_tf.errors import DataError, one_line

# What tf.keras.utils.image_dataset_from_directory reads, and tf.io.decode_image decodes.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
SIZE_RULE = "center-cropped to a square, then resized to {size}x{size} (bilinear, antialiased)"
_JPEG_START, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
# Resizing whole arrays (CIFAR, .npz, TFDS) goes this many images at a time, to bound the float32 copy.
_CHUNK = 1024


def decode_file(path):
    """uint8 [H, W, C] of a PNG, JPEG, BMP or GIF (its first frame) file; a ``DataError`` if it is unreadable or
    truncated."""
    try:
        with open(path, "rb") as f:
            contents = f.read()
    except OSError as err:
        raise DataError(f"cannot read {path}: {one_line(err)}") from None
    if contents.startswith(_JPEG_START) and _JPEG_END not in contents[2:]:
        # Checked before decoding: libjpeg reports some truncations by printing to stderr itself.
        raise DataError(f"{path} is not a readable image: a truncated JPEG (no end-of-image marker)")
    try:
        image = tf.io.decode_image(contents, channels=0, expand_animations=False)
    except (tf.errors.OpError, ValueError) as err:
        raise DataError(f"{path} is not a readable image: {one_line(err)}") from None
    return image.numpy()


def without_alpha(image):
    """[H, W, C] with C 1 or 3: gray+alpha becomes gray, RGBA becomes RGB; an [H, W] image gets its channel axis."""
    image = np.asarray(image)
    if image.ndim == 2:
        return image[:, :, None]
    if image.shape[-1] == 2:
        return image[:, :, :1]
    if image.shape[-1] == 4:
        return image[:, :, :3]
    return image


def _square_window(height, width):
    """(rows, cols) slices of the largest square centred in a height x width image."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return slice(top, top + side), slice(left, left + side)


def _resized(images, size):
    """uint8 [B, size, size, C] of uint8 square images [B, S, S, C]."""
    resized = tf.image.resize(images, [size, size], method="bilinear", antialias=True)
    return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


def fit(image, size):
    """``image`` [H, W, C] by the size rule (``size`` None: as it is)."""
    return fit_array(image[None], size)[0]


def fit_array(images, size):
    """uint8 [N, H, W, C] by the size rule, ``_CHUNK`` images at a time (``size`` None: as it is)."""
    if size is None or images.shape[1:3] == (size, size):
        return images
    rows, cols = _square_window(*images.shape[1:3])
    cropped = images[:, rows, cols]
    if cropped.shape[1] == size:
        return np.ascontiguousarray(cropped)
    out = np.empty((len(images), size, size, images.shape[3]), np.uint8)
    for start in range(0, len(images), _CHUNK):
        out[start:start + _CHUNK] = _resized(cropped[start:start + _CHUNK], size)
    return out


def describe_size_rule(size, original_shapes):
    """The preprocessing note for the size rule, or None when nothing was resized or cropped."""
    if size is None or all(shape == (size, size) for shape in original_shapes):
        return None
    return "images " + SIZE_RULE.format(size=size)


class ImageCollector:
    """Collects images of one size into a uint8 array [N, H, W, C] (the channel rule applied on the way), growing it
    as needed. ``channels=3`` makes every image colour (as the official code does for its ImageNet subsets)."""

    def __init__(self, capacity=1024, channels=None):
        self.capacity = max(int(capacity), 1)
        self.channels = channels
        self.array = None
        self.count = 0
        self.first = None  # the name of the first image, for the error naming two sizes
        self.shapes = set()  # the images' sizes before fitting, (H, W)
        self.expanded_gray = False  # True once a grayscale image was repeated to three channels
        self.dropped_alpha = False

    def add(self, image, name, size=None):
        """Appends ``image`` (any size, 1-4 channels) fitted to ``size``; ``name`` names it in errors."""
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] in (2, 4):
            self.dropped_alpha = True
        image = without_alpha(image)
        if image.dtype != np.uint8 or image.ndim != 3:
            raise DataError(f"{name} is not an 8-bit image (got {image.dtype} of shape {list(image.shape)})")
        self.shapes.add(image.shape[:2])
        image = fit(image, size)
        if self.array is None:
            self.first = name
            channels = self.channels or image.shape[2]
            self.array = np.empty((self.capacity, *image.shape[:2], channels), np.uint8)
        elif image.shape[:2] != self.array.shape[1:3]:
            height, width = image.shape[:2]
            raise DataError(
                f"images differ in size: {name} is {height}x{width}, {self.first} is "
                f"{self.array.shape[1]}x{self.array.shape[2]}; give --image_size=S to make them all S x S "
                f"({SIZE_RULE.format(size='S')})")
        image = self._matching_channels(image)
        if self.count == len(self.array):
            self.array = np.concatenate([self.array, np.empty_like(self.array)])
        self.array[self.count] = image
        self.count += 1

    def _matching_channels(self, image):
        have, held = image.shape[2], self.array.shape[3]
        if have == held:
            return image
        self.expanded_gray = True
        if have == 1:
            return np.repeat(image, held, axis=2)
        # The first colour image after grayscale ones: every image so far becomes colour.
        self.array = np.repeat(self.array, have, axis=3)
        return image

    def result(self):
        """The collected images, uint8 [N, H, W, C] (no memory held beyond them)."""
        if self.array is None:
            raise DataError("no images were collected")
        if self.count == len(self.array):
            return self.array
        return self.array[:self.count].copy()

    def notes(self, size):
        """What the rules did, in words, for the description."""
        done = []
        if self.dropped_alpha:
            done.append("alpha channels dropped")
        if self.expanded_gray:
            done.append("grayscale images repeated to 3 channels")
        resized = describe_size_rule(size, self.shapes)
        if resized:
            done.append(resized)
        return done


def decode_files(files, size, channels=None):
    """(uint8 images [N, H, W, C], int64 labels [N], what the rules did) of the image files [(path, label)], by the
    size rule (``size``) and the channel rule (``channels=3``: all colour)."""
    collector = ImageCollector(capacity=len(files), channels=channels)
    for path, _ in files:
        collector.add(decode_file(path), path, size)
    return collector.result(), np.array([label for _, label in files], np.int64), collector.notes(size)


def listed_images(folder):
    """Sorted paths of the image files under ``folder`` (recursively; hidden files and folders skipped), and the
    number of other files skipped."""
    images, others = [], 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(os.path.join(root, name))
            else:
                others += 1
    return images, others
