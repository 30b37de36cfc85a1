"""Small datasets written in the real formats, for the dataset tests: CIFAR-100 binary and pickle, the Tiny-ImageNet
zip's tree, an ImageNette folder, class folders of PNG and JPEG (grayscale too), a MedMNIST-style .npz, and a TFDS
stand-in for ``tfds.testing.mock_data``. Each writer returns what a reader must give back."""

import os
import pickle

import numpy as np
import tensorflow as tf


def random_images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_image(path, image):
    """Writes ``image`` [H, W, C] as PNG or JPEG (by the suffix); returns the pixels a decoder gives back (JPEG is
    lossy: those of the file written, decoded by TensorFlow's own decoder)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.lower().endswith(".png"):
        encoded = tf.io.encode_png(image).numpy()
    else:
        encoded = tf.io.encode_jpeg(image, quality=95).numpy()
    with open(path, "wb") as f:
        f.write(encoded)
    return tf.io.decode_image(encoded, channels=image.shape[-1]).numpy()


# --------------------------------------------------------------------------------------------------------------------
# CIFAR-100


def write_cifar100_binary(folder, images, coarse, fine, name):
    """``folder/name`` in the binary layout: per record the coarse label byte, the fine one, then R, G, B planes."""
    os.makedirs(folder, exist_ok=True)
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    records = np.concatenate([np.asarray(coarse, np.uint8)[:, None], np.asarray(fine, np.uint8)[:, None], planes], 1)
    records.astype(np.uint8).tofile(os.path.join(folder, name))


def write_cifar100_pickle(folder, images, coarse, fine, name):
    """``folder/name`` as the python archive's pickles: data rows in CHW order, fine and coarse labels."""
    os.makedirs(folder, exist_ok=True)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    with open(os.path.join(folder, name), "wb") as f:
        pickle.dump({b"data": rows, b"fine_labels": [int(v) for v in fine], b"coarse_labels": [int(v) for v in coarse],
                     b"filenames": [b"x.png"] * len(images), b"batch_label": b"fake"}, f)


def cifar100_splits(train=12, test=5, seed=0):
    """{split: (images, coarse labels, fine labels)} with fine labels spread over 0..99."""
    rng = np.random.default_rng(seed)
    return {split: (random_images(n, (32, 32, 3), seed + i), rng.integers(0, 20, n), rng.integers(0, 100, n))
            for i, (split, n) in enumerate((("train", train), ("test", test)))}


# --------------------------------------------------------------------------------------------------------------------
# Image trees


def write_class_tree(root, classes, seed=0, size=(12, 12), suffixes=(".png", ".jpg"), gray=()):
    """``root/<class>/img<i><suffix>`` for ``classes`` = {name: count}; classes in ``gray`` are grayscale.
    Returns {path: decoded pixels}."""
    written = {}
    for c, (name, count) in enumerate(sorted(classes.items())):
        channels = 1 if name in gray else 3
        for i, image in enumerate(random_images(count, (*size, channels), seed * 100 + c)):
            path = os.path.join(root, name, f"img{i}{suffixes[i % len(suffixes)]}")
            written[path] = write_image(path, image)
    return written


def write_tiny_imagenet(root, wnids, train_per_class=3, val_per_class=2, gray_train_image=True):
    """The official zip's tree under ``root`` (64x64 JPEGs): wnids.txt, train/<wnid>/images and <wnid>_boxes.txt,
    val/images with val/val_annotations.txt, an unlabelled test/images. The first training image of the first class
    is grayscale, as some are in the real set. Returns (train, val): [(path, label)] with labels by wnids.txt."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "wnids.txt"), "w") as f:
        f.write("".join(w + "\n" for w in wnids))
    train, val, annotations = [], [], []
    for label, wnid in enumerate(wnids):
        boxes = []
        for i in range(train_per_class):
            channels = 1 if (gray_train_image and label == 0 and i == 0) else 3
            path = os.path.join(root, "train", wnid, "images", f"{wnid}_{i}.JPEG")
            write_image(path, random_images(1, (64, 64, channels), 10 * label + i)[0])
            train.append((path, label))
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n")
        with open(os.path.join(root, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
            f.write("".join(boxes))
        for i in range(val_per_class):
            name = f"val_{len(annotations)}.JPEG"
            path = os.path.join(root, "val", "images", name)
            write_image(path, random_images(1, (64, 64, 3), 1000 + len(annotations))[0])
            val.append((path, label))
            annotations.append(f"{name}\t{wnid}\t1\t2\t60\t61\n")
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        f.write("".join(annotations))
    write_image(os.path.join(root, "test", "images", "test_0.JPEG"), random_images(1, (64, 64, 3), 999)[0])
    return train, val


def write_imagenette(root, wnids, sizes=((40, 30), (30, 44), (36, 36))):
    """fast.ai's layout, ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``, images of several sizes (the
    real ones have a shorter side of 160 and another longer); a grayscale one among them."""
    for split, offset in (("train", 0), ("val", 50)):
        for label, wnid in enumerate(wnids):
            for i, (height, width) in enumerate(sizes):
                channels = 1 if (split == "train" and label == 0 and i == 1) else 3
                image = random_images(1, (height, width, channels), offset + 10 * label + i)[0]
                write_image(os.path.join(root, split, wnid, f"{wnid}_{i}.JPEG"), image)


# --------------------------------------------------------------------------------------------------------------------
# MedMNIST .npz


def medmnist_arrays(train=40, test=12, val=6, side=28, channels=None, classes=4, seed=0):
    """The arrays of a MedMNIST .npz: images [N, side, side] (``channels=None``: grayscale) or [N, side, side, C]
    uint8, labels [N, 1] uint8 covering 0..classes-1."""
    shape = (side, side) if channels is None else (side, side, channels)
    arrays = {}
    for i, (split, n) in enumerate((("train", train), ("test", test), ("val", val))):
        arrays[f"{split}_images"] = random_images(n, shape, seed + i)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8)[:, None]
    return arrays


# --------------------------------------------------------------------------------------------------------------------
# TFDS


def tfds_examples(split, num_train=24, num_test=9, shape=(28, 28, 1), classes=10):
    """Deterministic (images, labels) of a TFDS stand-in's split, different for 'train' and the others."""
    n = num_train if str(split).startswith("train") else num_test
    seed = 1 if str(split).startswith("train") else 2
    return random_images(n, shape, seed), (np.arange(n) * 7 + seed) % classes


def tfds_as_dataset(**kwargs):
    """An ``as_dataset_fn`` for ``tfds.testing.mock_data`` serving ``tfds_examples`` (with ``kwargs``)."""

    def as_dataset(self, split, **unused):
        images, labels = tfds_examples(split, **kwargs)
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels.astype(np.int64)})

    return as_dataset
