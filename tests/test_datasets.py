"""eqdp_tf.datasets: every reader on small files written in the real formats (CIFAR: test_datasets_cifar.py), TFDS
through tfds.testing.mock_data, the description, the normalisation and the image rules; and bad input, each a
one-line error naming what to fix."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import dataset_files as files
from eqdp_tf import data as data_lib
from eqdp_tf.datasets import DatasetDescription, ReadOptions, load_dataset, parse_spec, spec
from eqdp_tf.datasets.load import channel_statistics, fingerprint
from eqdp_tf.errors import ConfigError, DataError


def _one_line_error(kind, call, *fragments):
    """Runs ``call``; it must raise ``kind`` with a one-line message holding every fragment. Returns the message."""
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --------------------------------------------------------------------------------------------------------------------
# --dataset


@pytest.mark.parametrize("text, kind, argument", [
    ("cifar10", "cifar10", ""), ("cifar100", "cifar100", ""), ("tiny_imagenet", "tiny_imagenet", ""),
    ("imagenette", "imagenette", ""), ("tfds:mnist", "tfds", "mnist"), ("tfds:imagenette/160px", "tfds",
                                                                        "imagenette/160px"),
    ("folder:/data/x", "folder", "/data/x"), ("npz:rel/path.npz", "npz", "rel/path.npz"),
])
def test_dataset_values_parse(text, kind, argument):
    parsed = parse_spec(text)
    assert (parsed.kind, parsed.argument) == (kind, argument)
    assert (parsed.official is not None) == (kind in spec.OFFICIAL_KINDS)


@pytest.mark.parametrize("text", ["", "mnist", "cifar", "tfds:", "folder:", "file:/x", "npz: "])
def test_bad_dataset_values_are_config_errors(text):
    _one_line_error(ConfigError, lambda: parse_spec(text), "--dataset")


def test_official_settings_are_the_official_codes():
    # data/dataloader.py and conf/setup/dataset/*.yaml of hlzl/equivariant
    assert [(s.image_size, s.num_classes) for s in spec.OFFICIAL.values()] == [(32, 10), (32, 100), (64, 200),
                                                                                 (160, 10)]
    assert spec.OFFICIAL["cifar100"].mean == (0.4914, 0.4822, 0.4465)
    assert spec.OFFICIAL["cifar100"].std == (0.2471, 0.2435, 0.2616)
    for kind in ("tiny_imagenet", "imagenette"):
        assert spec.OFFICIAL[kind].mean == (0.485, 0.456, 0.406) and spec.OFFICIAL[kind].std == (0.229, 0.224, 0.225)
    assert spec.OFFICIAL_CROP_PADDING == 4


# --------------------------------------------------------------------------------------------------------------------
# Class folders (the user's own images)


def test_class_folders_with_train_and_test(tmp_path):
    root = tmp_path / "mine"
    train = files.write_class_tree(str(root / "train"), {"cats": 3, "dogs": 4, "birds": 2}, seed=1, gray={"dogs"})
    test = files.write_class_tree(str(root / "test"), {"cats": 1, "dogs": 2}, seed=2)
    (root / "train" / "cats" / "notes.txt").write_text("not an image")
    loaded = load_dataset(f"folder:{root}")
    d = loaded.description
    # Classes in sorted order, as image_dataset_from_directory numbers them; grayscale dogs repeated to RGB.
    assert d.class_names == ("birds", "cats", "dogs") and d.num_classes == 3
    assert (d.num_train, d.num_test, d.image_shape) == (9, 3, (12, 12, 3))
    expected = [(path, "birds cats dogs".split().index(os.path.basename(os.path.dirname(path))))
                for path in sorted(train)]
    np.testing.assert_array_equal(loaded.train_labels, [label for _, label in expected])
    for image, (path, _) in zip(loaded.train_images, expected):
        pixels = train[path]
        np.testing.assert_array_equal(image, pixels if pixels.shape[-1] == 3 else np.repeat(pixels, 3, axis=2))
    np.testing.assert_array_equal(loaded.test_labels, [1, 2, 2])
    np.testing.assert_array_equal(loaded.test_images[0], test[sorted(test)[0]])
    assert "grayscale images repeated to 3 channels" in d.preprocessing
    assert d.notes == ("1 files that are not PNG, JPEG, BMP or GIF images skipped",)
    assert d.test_split == f"the images in {root}/test"
    assert d.normalization_source.startswith("computed from the 9 training images")


def test_one_tree_holds_out_a_recorded_fraction_with_its_seed(tmp_path):
    root = tmp_path / "tree"
    files.write_class_tree(str(root), {"a": 10, "b": 10}, gray={"a", "b"})
    first = load_dataset(f"folder:{root}", ReadOptions(test_fraction=0.25, split_seed=3))
    again = load_dataset(f"folder:{root}", ReadOptions(test_fraction=0.25, split_seed=3))
    other = load_dataset(f"folder:{root}", ReadOptions(test_fraction=0.25, split_seed=4))
    d = first.description
    assert (d.num_train, d.num_test, d.image_shape) == (15, 5, (12, 12, 1))  # all grayscale: one channel
    assert d.test_split == "5 of the 20 images (0.25) held out at random with --split_seed=3"
    np.testing.assert_array_equal(first.test_images, again.test_images)
    assert first.fingerprint == again.fingerprint != other.fingerprint
    # Every image is in exactly one of the two sets.
    every = {image.tobytes() for image in np.concatenate([first.train_images, first.test_images])}
    assert len(every) == 20 and not {i.tobytes() for i in first.train_images} & {i.tobytes() for i in
                                                                                 first.test_images}


def test_mixed_sizes_are_resized_by_the_stated_rule(tmp_path):
    root = tmp_path / "sizes"
    # A 12x20 image whose centred 12x12 square is one colour, the rest another: the crop keeps only the square.
    image = np.zeros((12, 20, 3), np.uint8)
    image[:, 4:16] = (200, 10, 90)
    files.write_image(str(root / "train" / "a" / "wide.png"), image)
    files.write_image(str(root / "train" / "b" / "small.png"), files.random_images(1, (6, 6, 3))[0])
    files.write_image(str(root / "test" / "a" / "t.png"), files.random_images(1, (8, 8, 3))[0])
    _one_line_error(DataError, lambda: load_dataset(f"folder:{root}"), "images differ in size", "--image_size=S")
    loaded = load_dataset(f"folder:{root}", ReadOptions(image_size=8))
    assert loaded.train_images.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(loaded.train_images[0], np.broadcast_to([200, 10, 90], (8, 8, 3)))
    assert loaded.description.preprocessing == ("images center-cropped to a square, then resized to 8x8 (bilinear, "
                                                "antialiased)",)


@pytest.mark.parametrize("case, fragments", [
    ("missing", ["no such folder"]),
    ("empty", ["holds no class folders", "one subfolder of images per class"]),
    ("one class", ["one class folder (only)", "at least two"]),
    ("empty class", ["class folder", "holds no images"]),
    ("train without test", ["has train/ but no test/ folder"]),
    ("test class unknown", ["is not a class of"]),
    ("unreadable image", ["broken.png is not a readable image", "Unknown image file format"]),
    ("truncated jpeg", ["cut.jpg is not a readable image"]),
    ("truncated png", ["cut.png is not a readable image", "Invalid PNG data"]),
    ("too few to hold out", ["--test_fraction=0.1 of the 4 images", "holds out 0"]),
])
def test_bad_class_folders_are_one_line_errors(tmp_path, case, fragments):
    root = tmp_path / "bad"
    if case != "missing":
        root.mkdir()
    if case == "one class":
        files.write_class_tree(str(root), {"only": 3})
    elif case == "empty class":
        files.write_class_tree(str(root), {"a": 3})
        (root / "b").mkdir()
        (root / "b" / "readme.txt").write_text("no images here")
    elif case == "train without test":
        files.write_class_tree(str(root / "train"), {"a": 2, "b": 2})
    elif case == "test class unknown":
        files.write_class_tree(str(root / "train"), {"a": 2, "b": 2})
        files.write_class_tree(str(root / "test"), {"a": 1, "zebra": 1})
    elif case == "unreadable image":
        files.write_class_tree(str(root), {"a": 3, "b": 3})
        (root / "a" / "broken.png").write_bytes(b"this is not a PNG")
    elif case.startswith("truncated"):
        suffix = ".jpg" if case.endswith("jpeg") else ".png"
        files.write_class_tree(str(root), {"a": 3, "b": 3})
        whole = root / "b" / f"whole{suffix}"
        files.write_image(str(whole), files.random_images(1, (12, 12, 3))[0])
        data = whole.read_bytes()
        (root / "b" / f"cut{suffix}").write_bytes(data[:len(data) * 2 // 3])
    elif case == "too few to hold out":
        files.write_class_tree(str(root), {"a": 2, "b": 2})
    _one_line_error(DataError, lambda: load_dataset(f"folder:{root}"), *fragments)


# --------------------------------------------------------------------------------------------------------------------
# Tiny-ImageNet and ImageNette folders


def test_tiny_imagenet_tree(tmp_path):
    wnids = ["n09999999", "n01443537", "n02000000"]  # not sorted: the labels follow wnids.txt
    train, val = files.write_tiny_imagenet(str(tmp_path / "tiny-imagenet-200"), wnids)
    loaded = load_dataset("tiny_imagenet", ReadOptions(data_dir=str(tmp_path)))  # the folder holding the tree
    d = loaded.description
    assert (d.num_train, d.num_test, d.image_shape, d.num_classes) == (9, 6, (64, 64, 3), 3)
    assert d.class_names == tuple(wnids)
    assert d.mean == spec.IMAGENET_MEAN and d.normalization_source.startswith("official")
    assert "val/" in d.test_split and "test/ has no labels" in d.test_split
    # Classes in wnids.txt's order, each class's images in name order (as the writer made them).
    np.testing.assert_array_equal(loaded.train_labels, [label for _, label in train])
    reference = tf.io.decode_jpeg(open(train[1][0], "rb").read()).numpy()
    np.testing.assert_array_equal(loaded.train_images[1], reference)
    # The grayscale first image is repeated to RGB; val labels come from val_annotations.txt.
    assert tf.io.decode_jpeg(open(train[0][0], "rb").read()).shape[-1] == 1
    np.testing.assert_array_equal(loaded.train_images[0], np.repeat(
        tf.io.decode_jpeg(open(train[0][0], "rb").read()).numpy(), 3, axis=2))
    np.testing.assert_array_equal(loaded.test_labels, [label for _, label in val])
    reference = tf.io.decode_jpeg(open(val[0][0], "rb").read()).numpy()
    np.testing.assert_array_equal(loaded.test_images[0], reference)


@pytest.mark.parametrize("damage, fragments", [
    ("no annotations", ["the test split is missing", "val_annotations.txt"]),
    ("unknown wnid", ["val_annotations.txt line 1 labels val_0.JPEG n00000000, which is not in wnids.txt"]),
    ("class missing", ["wnids.txt lists n2, but train/ has no images of it"]),
    ("no wnids", ["no wnids.txt in"]),
])
def test_damaged_tiny_imagenet_trees(tmp_path, damage, fragments):
    root = tmp_path / "tiny-imagenet-200"
    files.write_tiny_imagenet(str(root), ["n1", "n2"], train_per_class=1, val_per_class=1, gray_train_image=False)
    if damage == "no annotations":
        (root / "val" / "val_annotations.txt").unlink()
    elif damage == "unknown wnid":
        text = (root / "val" / "val_annotations.txt").read_text()
        (root / "val" / "val_annotations.txt").write_text(text.replace("n1", "n00000000", 1))
    elif damage == "class missing":
        import shutil
        shutil.rmtree(root / "train" / "n2")
    else:
        (root / "wnids.txt").unlink()
    _one_line_error(DataError, lambda: load_dataset("tiny_imagenet", ReadOptions(data_dir=str(root))), *fragments)


def test_tiny_imagenet_without_data_dir_says_where_to_get_it():
    _one_line_error(DataError, lambda: load_dataset("tiny_imagenet"), "needs --data_dir", "tiny-imagenet-200.zip")


def test_imagenette_folder_is_squared_and_resized(tmp_path):
    files.write_imagenette(str(tmp_path / "imagenette2-160"), ["n01440764", "n02102040"])
    loaded = load_dataset("imagenette", ReadOptions(data_dir=str(tmp_path), image_size=16))
    d = loaded.description
    assert (d.num_train, d.num_test, d.image_shape, d.class_names) == (6, 6, (16, 16, 3), ("n01440764",
                                                                                           "n02102040"))
    assert d.test_split.startswith("the val/ images") and d.mean == spec.IMAGENET_MEAN
    assert "images center-cropped to a square, then resized to 16x16 (bilinear, antialiased)" in d.preprocessing
    assert "grayscale images repeated to 3 channels" in d.preprocessing
    # Without --image_size the official 160 px: the same tree then gives 160x160 images.
    assert load_dataset("imagenette", ReadOptions(data_dir=str(tmp_path))).train_images.shape == (6, 160, 160, 3)


def test_imagenette_folder_without_val_is_a_missing_split(tmp_path):
    files.write_class_tree(str(tmp_path / "train"), {"a": 1, "b": 1})
    _one_line_error(DataError, lambda: load_dataset("imagenette", ReadOptions(data_dir=str(tmp_path))),
                    "has no val/ folder")


# --------------------------------------------------------------------------------------------------------------------
# .npz in MedMNIST's layout


@pytest.mark.parametrize("channels", [None, 3])
def test_medmnist_npz(tmp_path, channels):
    arrays = files.medmnist_arrays(channels=channels)
    np.savez_compressed(tmp_path / "pathmnist.npz", **arrays)
    loaded = load_dataset(f"npz:{tmp_path / 'pathmnist.npz'}")
    d = loaded.description
    assert (d.num_train, d.num_test, d.image_shape, d.num_classes) == (40, 12, (28, 28, channels or 1), 4)
    np.testing.assert_array_equal(loaded.train_images.reshape(arrays["train_images"].shape), arrays["train_images"])
    np.testing.assert_array_equal(loaded.test_labels, arrays["test_labels"][:, 0])
    assert loaded.train_labels.dtype == np.int64
    assert d.notes == ("val_images and val_labels in the file not used",)
    mean, std = channel_statistics(loaded.train_images)
    assert d.mean == mean and d.std == std
    pixels = arrays["train_images"].reshape(-1, channels or 1) / 255.0
    np.testing.assert_allclose(d.mean, pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(d.std, pixels.std(0), atol=1e-6)


@pytest.mark.parametrize("change, fragments", [
    (dict(test_images=None), ["lacks test_images", "MedMNIST's layout", "it has"]),
    (dict(train_labels=None, test_labels=None), ["lacks train_labels, test_labels"]),
    (dict(test_labels=np.full((12, 1), 4, np.uint8)), ["test_labels", "has label 4 at position 0", "0..3"]),
    (dict(train_labels=np.full(40, -1, np.int64)), ["train_labels has label -1 at position 0"]),
    (dict(train_labels=np.linspace(0, 3, 40)), ["train_labels must be integers", "float64"]),
    (dict(train_labels=np.zeros((40, 2), np.uint8)), ["one label per image", "[40, 2]"]),
    (dict(train_images=np.zeros((40, 28, 28), np.float32)), ["train_images must be uint8 pixel values", "float32"]),
    (dict(test_labels=np.zeros(11, np.uint8)), ["test_images holds 12 images but test_labels 11 labels"]),
    (dict(train_labels=np.zeros(40, np.uint8)), ["has 1 class", "at least two"]),
])
def test_bad_npz_files_are_one_line_errors(tmp_path, change, fragments):
    arrays = {**files.medmnist_arrays(), **change}
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in arrays.items() if v is not None})
    _one_line_error(DataError, lambda: load_dataset(f"npz:{tmp_path / 'bad.npz'}"), *fragments)


def test_npz_that_is_not_an_archive(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 cut short")
    _one_line_error(DataError, lambda: load_dataset(f"npz:{tmp_path / 'junk.npz'}"), "is not a readable .npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    os.rename(tmp_path / "single.npy", tmp_path / "single.npz")
    _one_line_error(DataError, lambda: load_dataset(f"npz:{tmp_path / 'single.npz'}"), "holds a single array")
    _one_line_error(DataError, lambda: load_dataset(f"npz:{tmp_path / 'none.npz'}"), "no such file")


# --------------------------------------------------------------------------------------------------------------------
# TFDS (tfds.testing.mock_data: no download)


def test_tfds_dataset_is_read_as_served():
    with tfds.testing.mock_data(as_dataset_fn=files.tfds_as_dataset()):
        loaded = load_dataset("tfds:mnist")
    d = loaded.description
    train_images, train_labels = files.tfds_examples("train")
    test_images, test_labels = files.tfds_examples("test")
    np.testing.assert_array_equal(loaded.train_images, train_images)
    np.testing.assert_array_equal(loaded.train_labels, train_labels)
    np.testing.assert_array_equal(loaded.test_images, test_images)
    np.testing.assert_array_equal(loaded.test_labels, test_labels)
    assert (d.image_shape, d.num_classes, d.class_names) == ((28, 28, 1), 10, tuple(str(i) for i in range(10)))
    assert d.source == "TFDS mnist/3.0.1 (splits 'train' and 'test')" and d.test_split == "TFDS split 'test'"


def test_tfds_splits_are_chosen_by_flags():
    with tfds.testing.mock_data(as_dataset_fn=files.tfds_as_dataset()):
        loaded = load_dataset("tfds:mnist", ReadOptions(train_split="test", test_split="train[:5]"))
    assert loaded.description.num_train == 9 and loaded.description.test_split == "TFDS split 'train[:5]'"


def test_tfds_images_of_many_sizes_need_and_get_a_size():
    # TFDS's imagenette/160px has images of many sizes; mock_data draws random ones.
    with tfds.testing.mock_data(num_examples=6):
        _one_line_error(DataError, lambda: load_dataset("tfds:imagenette/160px"), "images differ in size",
                        "--image_size")
        loaded = load_dataset("tfds:imagenette/160px", ReadOptions(image_size=24))
    assert loaded.train_images.shape == (6, 24, 24, 3) and loaded.description.num_classes == 10


def test_poisson_sampler_over_a_tfds_dataset_draws_its_examples():
    """The TFDS path does not stream: the split is read into memory once, and the sampler indexes it. The batches
    the pipeline builds hold exactly the sampled examples of the TFDS split."""
    with tfds.testing.mock_data(as_dataset_fn=files.tfds_as_dataset(num_train=50)):
        loaded = load_dataset("tfds:mnist")
    served_images, served_labels = files.tfds_examples("train", num_train=50)
    sampler = data_lib.PoissonSampler(loaded.description.num_train, 0.2, 8, seed=4)
    dataset = data_lib.make_train_dataset(loaded.train_images, loaded.train_labels, sampler, 2, seed=0, num_steps=3)
    elements = [{key: value.numpy() for key, value in element.items()} for element in dataset]
    sampled = 0
    for step in range(3):
        for element, batch in zip([e for e in elements if e["step"] == step], sampler.physical_batches(step)):
            real = batch.mask == 1
            np.testing.assert_array_equal(element["views"][real, 0], served_images[batch.indices[real]])
            np.testing.assert_array_equal(element["labels"][real], served_labels[batch.indices[real]])
            sampled += int(real.sum())
    assert sampled > 0


@pytest.mark.parametrize("name, fragments", [
    ("tfds:mnsit", ["TFDS has no dataset 'mnsit'", "did you mean mnist"]),
    ("tfds:celeb_a", ["TFDS celeb_a has no 'label' feature", "attributes", "'image' and 'label'"]),
    ("tfds:mnist/no_such_config", ["TFDS cannot build 'mnist/no_such_config'", "BuilderConfig"]),
])
def test_bad_tfds_names_are_one_line_errors(name, fragments):
    with tfds.testing.mock_data(num_examples=2):
        _one_line_error(DataError, lambda: load_dataset(name), *fragments)


# --------------------------------------------------------------------------------------------------------------------
# The entry: normalisation, crop padding, subsets, the description


def test_normalisation_given_by_flags_and_per_channel_checks(tmp_path):
    np.savez(tmp_path / "rgb.npz", **files.medmnist_arrays(channels=3))
    path = f"npz:{tmp_path / 'rgb.npz'}"
    given = load_dataset(path, normalization_mean=[0.5], normalization_std=[0.2, 0.3, 0.4]).description
    assert (given.mean, given.std) == ((0.5, 0.5, 0.5), (0.2, 0.3, 0.4))
    assert given.normalization_source == "given by --normalization_mean and --normalization_std"
    assert not given.normalization_computed
    _one_line_error(ConfigError, lambda: load_dataset(path, normalization_mean=[0.5, 0.5],
                                                      normalization_std=[0.2]),
                    "--normalization_mean gives 2 values for images with 3 channels")
    computed = load_dataset(path).description
    assert computed.normalization_computed and "not covered by the DP guarantee" in computed.normalization_source


def test_constant_channel_cannot_be_standardised(tmp_path):
    arrays = files.medmnist_arrays()
    arrays["train_images"][:] = 7
    np.savez(tmp_path / "flat.npz", **arrays)
    _one_line_error(DataError, lambda: load_dataset(f"npz:{tmp_path / 'flat.npz'}"), "channel 0", "is constant")


def test_subsets_crop_padding_and_fingerprint(tmp_path):
    arrays = files.medmnist_arrays(side=12)
    np.savez(tmp_path / "small.npz", **arrays)
    path = f"npz:{tmp_path / 'small.npz'}"
    loaded = load_dataset(path, train_subset=10, test_subset=3, crop_padding=2)
    d = loaded.description
    assert (d.num_train, d.num_test, d.crop_padding, d.crop_padding_source) == (10, 3, 2, "given by --crop_padding")
    assert loaded.fingerprint == fingerprint(arrays["train_images"][:10, :, :, None], arrays["train_labels"][:10, 0])
    assert "fingerprint" not in d.to_json()  # config.json and the export publish the description
    assert load_dataset(path).description.crop_padding_source == "the official code's: 4 pixels at every image size"
    _one_line_error(ConfigError, lambda: load_dataset(path, crop_padding=12), "--crop_padding=12 needs images larger")
    _one_line_error(ConfigError, lambda: load_dataset(path, train_subset=41), "--train_subset/--test_subset")


def test_description_round_trips_through_json(tmp_path):
    np.savez(tmp_path / "d.npz", **files.medmnist_arrays())
    description = load_dataset(f"npz:{tmp_path / 'd.npz'}").description
    assert DatasetDescription.from_json(description.to_json()) == description
    assert description.summary().startswith(f"dataset npz:{tmp_path / 'd.npz'}: 40 train, 12 test images of "
                                            "28x28x1, 4 classes")
