"""Any TFDS image-classification dataset (features ``image`` and ``label``), read into memory as uint8 arrays.

It does not stream: every split is read once, image by image (or in batches when all images have one size), into
one array, which the sampler then indexes at random; Poisson sampling needs every example at hand at every step.
"""

import difflib
import os
import socket
import urllib.parse

import numpy as np

from eqdp_tf.datasets import images as images_lib
from eqdp_tf.datasets.reading import MissingDataError, ReadResult, checked_labels
from eqdp_tf.errors import DataError, one_line

_PROBE_SECONDS = 5.0
# TFDS reads fixed-size images this many at a time.
_BATCH = 512


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # imported lazily: slow, and unused for files on disk
    except ImportError as exc:
        raise DataError(f"TFDS cannot be imported ({exc}); reinstall the package (pip install -e .)") from None
    return tfds


def _download_endpoint(host, port):
    """(host, port) a download would connect to first: the HTTPS proxy if one is set, else the archive's host."""
    proxy = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
    if not proxy:
        return host, port
    parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)


def check_download_possible(host, what, local_copy):
    """Fails within seconds when a download from ``host`` cannot even connect (TFDS itself retries for minutes
    offline). ``what`` names the dataset, ``local_copy`` the --data_dir alternative."""
    host, port = _download_endpoint(host, 443)
    try:
        socket.create_connection((host, port), timeout=_PROBE_SECONDS).close()
    except OSError as err:
        reason = one_line(err) or type(err).__name__
        raise MissingDataError(
            f"cannot download {what} through TFDS: no connection to {host}:{port} ({reason}). Pass --data_dir "
            f"with {local_copy}, or prepare TFDS's copy once on a machine online (its folder: TFDS_DATA_DIR, "
            "default ~/tensorflow_datasets).") from None


def _builder(tfds, name, data_dir):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(base.lower(), tfds.list_builders(), n=3)
        raise DataError(f"TFDS has no dataset {base!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                        + "; --dataset=tfds:NAME[/CONFIG] takes a name of tfds.list_builders()") from None
    except Exception as err:  # an unknown config or version: TFDS's message says which exist
        text = one_line(err)
        raise DataError(f"TFDS cannot build {name!r}: {text[:400]}{'...' if len(text) > 400 else ''}") from None


def _check_features(tfds, builder, name):
    """(number of classes, class names) after checking ``builder`` has an ``image`` and a ``label`` feature."""
    features = builder.info.features
    keys = sorted(features.keys()) if hasattr(features, "keys") else []
    missing = [key for key in ("image", "label") if key not in keys]
    if missing:
        raise DataError(f"TFDS {name} has no {' and no '.join(repr(m) for m in missing)} feature (its features: "
                        f"{', '.join(keys) or 'none'}); --dataset=tfds: needs an image-classification dataset with "
                        "'image' and 'label'")
    if not isinstance(features["image"], tfds.features.Image):
        raise DataError(f"TFDS {name}'s 'image' feature is a {type(features['image']).__name__}, not an Image")
    label = features["label"]
    if not isinstance(label, tfds.features.ClassLabel):
        raise DataError(f"TFDS {name}'s 'label' feature is a {type(label).__name__}, not a ClassLabel (one class "
                        "number per image)")
    names = tuple(label.names) if label.names else None
    return label.num_classes, names


def default_splits(builder, train_split, test_split):
    """The splits to read: as given, else 'train' and the first of 'test', 'validation' the dataset has."""
    known = set(builder.info.splits.keys())
    train = train_split or "train"
    if test_split:
        return train, test_split
    for candidate in ("test", "validation"):
        if not known or candidate in known:
            return train, candidate
    raise DataError(f"TFDS {builder.info.full_name} has no 'test' or 'validation' split (its splits: "
                    f"{', '.join(sorted(known))}); name the test split with --test_split")


def _examples(tfds, dataset, image_shape):
    """(image, label) pairs of ``dataset``, read in batches when every image has the same (known) size."""
    if None not in image_shape[:2]:
        for batch in tfds.as_numpy(dataset.batch(_BATCH)):
            yield from zip(batch["image"], batch["label"])
    else:
        for example in tfds.as_numpy(dataset):
            yield example["image"], example["label"]


def read_split(tfds, builder, split, name, size=None, channels=None):
    """(images uint8 [N, H, W, C], labels int64 [N], the collector's notes) of one split."""
    try:
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except Exception as err:  # an unknown split name: TFDS names the ones there are
        raise DataError(f"TFDS {name} has no split {split!r} ({one_line(err)[:300]}); choose one with "
                        "--train_split/--test_split") from None
    known = builder.info.splits[split].num_examples if split in builder.info.splits else 0
    collector = images_lib.ImageCollector(capacity=known or 1024, channels=channels)
    labels = []
    try:
        for image, label in _examples(tfds, dataset, builder.info.features["image"].shape):
            collector.add(image, f"{name} {split} image {len(labels)}", size)
            labels.append(label)
    except DataError:
        raise
    except Exception as err:  # a damaged TFDS file, a failed read
        raise DataError(f"reading TFDS {name} {split} failed: {one_line(err)[:400]}") from None
    if not labels:
        raise DataError(f"TFDS {name} split {split!r} holds no examples")
    return collector.result(), np.asarray(labels), collector.notes(size)


def prepared_builder(name, data_dir=None, probe=None):
    """(the tfds module, the builder of ``name`` with its data prepared, its number of classes, its class names).
    A dataset not prepared yet in ``data_dir`` (None: TFDS_DATA_DIR or ~/tensorflow_datasets) is downloaded and
    prepared, after ``probe()`` (which may raise when that cannot work)."""
    tfds = _import_tfds()
    builder = _builder(tfds, name, data_dir)
    num_classes, class_names = _check_features(tfds, builder, name)
    if not builder.is_prepared():
        if probe is not None:
            probe()
        try:
            builder.download_and_prepare()
        except Exception as err:  # blocked proxy, failed download, corrupt cache: all fixable the same way
            raise DataError(f"could not download and prepare TFDS {name} ({type(err).__name__}: "
                            f"{one_line(err)[:300]}); prepare it once on a machine online and pass its folder "
                            "with --data_dir (or TFDS_DATA_DIR)") from None
    return tfds, builder, num_classes, class_names


def read_tfds(name, options, *, channels=None, probe=None):
    """A ``ReadResult`` of TFDS dataset ``name`` ('NAME' or 'NAME/CONFIG'); ``options.data_dir`` is TFDS's data
    folder; ``channels=3`` makes every image colour; ``probe`` as for ``prepared_builder``."""
    tfds, builder, num_classes, class_names = prepared_builder(name, options.data_dir, probe)
    train_split, test_split = default_splits(builder, options.train_split, options.test_split)
    size = options.image_size
    train_images, train_labels, train_notes = read_split(tfds, builder, train_split, name, size, channels)
    test_images, test_labels, test_notes = read_split(tfds, builder, test_split, name, size, channels)
    return ReadResult(
        train_images, checked_labels(train_labels, num_classes, f"TFDS {name} {train_split} labels"),
        test_images, checked_labels(test_labels, num_classes, f"TFDS {name} {test_split} labels"),
        num_classes=num_classes, class_names=class_names,
        source=f"TFDS {builder.info.full_name} (splits {train_split!r} and {test_split!r})",
        test_split=f"TFDS split {test_split!r}",
        preprocessing=tuple(dict.fromkeys(train_notes + test_notes)))
