"""CIFAR-10 input pipeline for DP-SGD: loading, Poisson sampling, augmentation multiplicity.

The pipeline hands out raw uint8 pixels; the model normalises with `CIFAR10_MEAN` / `CIFAR10_STD` itself,
so an exported model needs no separate preprocessing.

Every random choice is a pure function of (seed, step[, physical batch]) so that a run resumed
after a crash at step s sees exactly the batches and augmentations the original run would have seen.
"""

import math
import os
import pickle
import socket
import urllib.parse
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import tensorflow as tf

from eqdp_tf.checks import whole_number
from eqdp_tf.errors import ConfigError, DataError, one_line

# Per-channel statistics of the 50000 training images, pixels scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
_PIXELS = 32 * 32 * 3
_RECORD_BYTES = 1 + _PIXELS  # one label byte, then the R, G and B planes
_OFFICIAL_RECORDS_PER_FILE = 10000

_BIN_DIR = "cifar-10-batches-bin"
_PY_DIR = "cifar-10-batches-py"
_SPLIT_FILES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}

# Reflect padding of the random crops in augmentation multiplicity (De et al. 2022).
CROP_PADDING = 4

# Keeps the augmentation random stream apart from the sampling stream drawn from the same seed.
_AUGMENT_STREAM = 0xA06


class MissingDataError(DataError):
    """The dataset files are not where they were looked for (as opposed to present but damaged)."""


# --------------------------------------------------------------------------------------------
# Loading


def load_cifar10(split: str, data_dir: Optional[str] = None,
                 subset: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [N,32,32,3] RGB, labels int64 [N]) for split 'train' or 'test'.

    With `data_dir`, reads the official binary or python-pickle files from disk; without it,
    uses TFDS (which downloads on first use). `subset=n` keeps the first n examples.
    """
    if split not in _SPLIT_FILES:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}.")
    if data_dir is None:
        images, labels = _load_from_tfds(split)
    else:
        images, labels = _load_from_dir(split, data_dir)
    return _take_subset(images, labels, subset)


def _take_subset(images, labels, subset):
    if subset is None:
        return images, labels
    if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)):
        raise ConfigError(f"subset must be a whole number of examples, got {subset!r}.")
    if not 1 <= subset <= len(labels):
        raise ConfigError(f"subset must be between 1 and {len(labels)} (the examples available), got {subset}.")
    return images[:subset], labels[:subset]


# Where TFDS's cifar10 builder downloads the archive from (its CifarInfo url).
TFDS_DOWNLOAD_HOST = ("www.cs.toronto.edu", 443)
_PROBE_SECONDS = 5.0


def _download_endpoint():
    """(host, port) a download would connect to first: the HTTPS proxy if one is set, else the archive's host."""
    proxy = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
    if not proxy:
        return TFDS_DOWNLOAD_HOST
    parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)


def _check_download_possible():
    """Fails within seconds when the download cannot even connect: TFDS itself retries for minutes offline."""
    host, port = _download_endpoint()
    try:
        socket.create_connection((host, port), timeout=_PROBE_SECONDS).close()
    except OSError as err:
        reason = one_line(err) or type(err).__name__
        raise MissingDataError(
            f"cannot download CIFAR-10 through TFDS: no connection to {host}:{port} ({reason}). Pass --data_dir "
            f"with a local copy ({_BIN_DIR} or {_PY_DIR}), or prepare TFDS's copy once on a machine online "
            "(its folder: TFDS_DATA_DIR, default ~/tensorflow_datasets).") from None


def _load_from_tfds(split):
    """CIFAR-10 from TFDS: its prepared copy if there is one (no network), else downloaded and prepared."""
    try:
        import tensorflow_datasets as tfds  # imported lazily: slow, and unused with --data_dir
    except ImportError as exc:
        raise DataError(f"TFDS cannot be imported ({exc}); reinstall the package (pip install -e .) or pass "
                        f"--data_dir with a local copy ({_BIN_DIR} or {_PY_DIR}).") from None
    try:
        builder = tfds.builder("cifar10")
        if not builder.is_prepared():
            _check_download_possible()
            builder.download_and_prepare()
        data = builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
        images, labels = tfds.as_numpy(data)
    except DataError:
        raise
    except Exception as exc:  # blocked proxy, failed download, corrupt cache, ...: all fixable the same way
        raise DataError(
            f"Could not load CIFAR-10 through TFDS ({type(exc).__name__}: {exc}); either pass --data_dir "
            f"pointing at a folder with {_BIN_DIR} or {_PY_DIR}, or allow TFDS to download it (needs internet)."
        ) from exc
    return _checked(np.asarray(images, np.uint8), np.asarray(labels, np.int64), "TFDS cifar10")


def _load_from_dir(split, data_dir):
    if not os.path.isdir(data_dir):
        raise MissingDataError(f"CIFAR-10 data_dir {data_dir!r} does not exist or is not a folder.")
    names = _SPLIT_FILES[split]
    # The folder may hold the files itself or be the parent of the extracted archive.
    for folder, suffix, reader in [
        (data_dir, ".bin", _read_bin_file),
        (os.path.join(data_dir, _BIN_DIR), ".bin", _read_bin_file),
        (os.path.join(data_dir, _PY_DIR), "", _read_pickle_file),
        (data_dir, "", _read_pickle_file),
    ]:
        paths = [os.path.join(folder, name + suffix) for name in names]
        if any(os.path.isfile(p) for p in paths):
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise MissingDataError(f"CIFAR-10 {split} split is incomplete: missing {', '.join(missing)}.")
            parts = [reader(p) for p in paths]
            return (np.concatenate([images for images, _ in parts]),
                    np.concatenate([labels for _, labels in parts]))
    raise MissingDataError(
        f"No CIFAR-10 {split} files found in {data_dir!r}: looked for {names[0]}.bin (directly or in "
        f"{_BIN_DIR}/) and the pickle file {names[0]} (directly or in {_PY_DIR}/)."
    )


def _read_bin_file(path):
    try:
        size = os.path.getsize(path)
        if size == 0 or size % _RECORD_BYTES:
            raise DataError(
                f"{path} is truncated or corrupt: {size} bytes, expected a positive multiple of {_RECORD_BYTES} "
                f"({_OFFICIAL_RECORDS_PER_FILE * _RECORD_BYTES} for an official batch file)."
            )
        records = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"cannot read {path}: {one_line(err)}.") from None
    if records.size != size:
        raise DataError(f"{path} changed or was cut short while being read ({records.size} of {size} bytes).")
    records = records.reshape(-1, _RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    # Records store channel planes (CHW); the pipeline works in HWC.
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _checked(np.ascontiguousarray(images), labels, path)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except the few numpy needs, so a hostile pickle cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("__builtin__", "object"), ("builtins", "object"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 pickle")
        return super().find_class(module, name)


def _read_pickle_file(path):
    try:
        with open(path, "rb") as f:
            # encoding='bytes' reads both the official python2 pickles and python3 ones.
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:
        raise DataError(f"{path} is not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc}).") from exc
    if data.ndim != 2 or data.shape[1] != _PIXELS or data.shape[0] != labels.shape[0]:
        raise DataError(
            f"{path} has data of shape {data.shape} and {labels.shape[0]} labels; "
            f"expected [n, {_PIXELS}] and n labels."
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _checked(np.ascontiguousarray(images), labels, path)


def _checked(images, labels, source):
    """Validates shapes and label range so later stages can trust the arrays."""
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.shape[0] != labels.shape[0]:
        raise DataError(f"{source} gave images of shape {images.shape} for {labels.shape[0]} labels.")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(
            f"{source} has label {labels[bad[0]]} at record {bad[0]}; CIFAR-10 labels must be 0..{NUM_CLASSES - 1}."
        )
    return images, labels


# --------------------------------------------------------------------------------------------
# Sampling


class PhysicalBatch(NamedTuple):
    """One fixed-size slice of a logical batch; padding slots point at example 0 with mask 0."""

    indices: np.ndarray  # int64 [P]
    mask: np.ndarray  # float32 [P], 1 for real examples, 0 for padding


def _check_int(name, value, minimum):
    return whole_number(name, value, at_least=minimum)


class _Sampler:
    """Shared part: splitting a logical batch into fixed-shape physical batches."""

    method = None

    def __init__(self, num_examples, physical_batch_size, seed):
        self.num_examples = _check_int("num_examples", num_examples, 1)
        self.physical_batch_size = _check_int("physical_batch_size", physical_batch_size, 1)
        self.seed = _check_int("seed", seed, 0)

    def sample(self, step: int) -> np.ndarray:
        raise NotImplementedError

    def physical_batches(self, step: int) -> List[PhysicalBatch]:
        """Pads the logical batch of `step` to ceil(n/P) batches of P indices (at least one).

        An empty logical batch still gives one all-padding batch: the DP step must still run and
        add noise, otherwise the accountant's guarantee would not describe what happened.
        """
        indices = self.sample(step)
        size = self.physical_batch_size
        count = max(1, math.ceil(len(indices) / size))
        padded = np.zeros(count * size, np.int64)
        padded[: len(indices)] = indices
        mask = np.zeros(count * size, np.float32)
        mask[: len(indices)] = 1.0
        return [PhysicalBatch(padded[i * size:(i + 1) * size], mask[i * size:(i + 1) * size])
                for i in range(count)]


def split_for_replicas(indices, physical_batch_size: int, num_replicas: int) -> List[PhysicalBatch]:
    """A logical batch's ``indices`` dealt out to ``num_replicas`` replicas, ``physical_batch_size`` rows at a time.

    Returns ceil(n / (R*P)) batches (at least one, as ``physical_batches``) whose ``indices`` and ``mask`` are
    [R, P]: row r is replica r's physical batch. Every replica gets the same number of batches (padding slots point
    at example 0 with mask 0), as collectives need; every sampled example appears exactly once, the j-th of a
    global batch of R*P going to replica j % R, so real examples are spread evenly over the replicas.
    """
    indices = np.asarray(indices, np.int64)
    physical_batch_size = _check_int("physical_batch_size", physical_batch_size, 1)
    num_replicas = _check_int("num_replicas", num_replicas, 1)
    size = physical_batch_size * num_replicas
    count = max(1, math.ceil(len(indices) / size))
    padded = np.zeros(count * size, np.int64)
    padded[: len(indices)] = indices
    mask = np.zeros(count * size, np.float32)
    mask[: len(indices)] = 1.0
    shape = (count, physical_batch_size, num_replicas)
    padded = padded.reshape(shape).transpose(0, 2, 1)
    mask = mask.reshape(shape).transpose(0, 2, 1)
    return [PhysicalBatch(np.ascontiguousarray(padded[i]), np.ascontiguousarray(mask[i])) for i in range(count)]


class PoissonSampler(_Sampler):
    """Includes each example independently with probability q: the sampling RDP accounting assumes."""

    method = "poisson"

    def __init__(self, num_examples: int, sampling_rate: float, physical_batch_size: int, seed: int):
        super().__init__(num_examples, physical_batch_size, seed)
        if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float, np.floating)) \
                or not 0.0 < sampling_rate <= 1.0:
            raise ConfigError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}.")
        self.sampling_rate = float(sampling_rate)
        self.expected_batch_size = self.sampling_rate * self.num_examples

    def sample(self, step: int) -> np.ndarray:
        """Sorted int64 indices of logical step `step`, reproducible from (seed, step) alone."""
        step = _check_int("step", step, 0)
        rng = np.random.default_rng([self.seed, step])
        return np.flatnonzero(rng.random(self.num_examples) < self.sampling_rate).astype(np.int64)


class ShuffleSampler(_Sampler):
    """Fixed-size batches read off a stream of per-epoch permutations (not what RDP accounting assumes)."""

    method = "shuffle"

    def __init__(self, num_examples: int, batch_size: int, physical_batch_size: int, seed: int):
        super().__init__(num_examples, physical_batch_size, seed)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if self.batch_size > self.num_examples:
            raise ConfigError(f"batch_size {batch_size} is larger than the {num_examples} examples available.")
        self.expected_batch_size = self.batch_size

    def _permutation(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples).astype(np.int64)

    def sample(self, step: int) -> np.ndarray:
        """Indices of logical step `step`; a batch crossing an epoch boundary continues into the next permutation."""
        step = _check_int("step", step, 0)
        start = step * self.batch_size
        epoch, offset = divmod(start, self.num_examples)
        head = self._permutation(epoch)[offset:offset + self.batch_size]
        if len(head) == self.batch_size:
            return head
        return np.concatenate([head, self._permutation(epoch + 1)[: self.batch_size - len(head)]])


# --------------------------------------------------------------------------------------------
# Augmentation multiplicity


def augment_views(images: tf.Tensor, num_views: int, seed: tf.Tensor) -> tf.Tensor:
    """Returns uint8 [B,K,H,W,C]: view 0 is the image, views 1..K-1 random reflect-padded crops, maybe flipped.

    `seed` is a shape-[2] integer tensor; only stateless ops are used so the result is a pure function
    of (images, seed) and is safe inside a parallel tf.data map. Each image and view gets its own crop.
    """
    num_views = _check_int("num_views", num_views, 1)
    images = tf.convert_to_tensor(images)
    if num_views == 1:
        return images[:, None]
    batch, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    crops = num_views - 1
    offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    offsets = tf.random.stateless_uniform(
        [batch, crops, 2], seed=offset_seed, minval=0, maxval=2 * CROP_PADDING + 1, dtype=tf.int32)
    flips = tf.random.stateless_uniform([batch, crops, 1], seed=flip_seed, minval=0, maxval=2, dtype=tf.int32)

    padding = [[0, 0], [CROP_PADDING, CROP_PADDING], [CROP_PADDING, CROP_PADDING], [0, 0]]
    padded = tf.pad(images, padding, mode="REFLECT")  # [B, H+8, W+8, C]
    # A crop (optionally mirrored) is a choice of rows and columns of the padded image, so both
    # the crop and the flip become two gathers with per-view index vectors.
    rows = offsets[..., 0:1] + tf.range(height)[None, None]  # [B, K-1, H]
    cols = offsets[..., 1:2] + tf.where(flips == 1, tf.range(width - 1, -1, -1), tf.range(width))  # [B, K-1, W]
    views = tf.gather(padded, rows, axis=1, batch_dims=1)  # [B, K-1, H, W+8, C]
    views = tf.gather(views, cols, axis=3, batch_dims=2)  # [B, K-1, H, W, C]
    return tf.concat([images[:, None], views], axis=1)


# --------------------------------------------------------------------------------------------
# tf.data pipelines


def _augment_seed(seed, step, batch_index, replica=None):
    """A stateless-op seed that depends only on (seed, step, physical batch[, replica]), so resumes match."""
    entropy = [_AUGMENT_STREAM, seed, step, batch_index] + ([] if replica is None else [replica])
    rng = np.random.default_rng(entropy)
    return rng.integers(0, 2**31 - 1, size=2, dtype=np.int64)


def _check_arrays(images, labels):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"images must be uint8 [N,32,32,3], got {images.dtype} {list(images.shape)}.")
    if labels.shape != images.shape[:1]:
        raise DataError(f"labels must have shape [{images.shape[0]}] to match the images, got {list(labels.shape)}.")
    return images, labels.astype(np.int64)


def make_train_dataset(images, labels, sampler, num_views: int, seed: int,
                       start_step: int = 0, num_steps: Optional[int] = None,
                       num_replicas: int = 1, replica_ids=None) -> tf.data.Dataset:
    """All physical batches of logical steps start_step .. start_step+num_steps-1, in order.

    `start_step` may be a function returning the first step, called each time the dataset is iterated.

    Elements are dicts: views uint8 [P,K,32,32,3], labels int64 [P], mask float32 [P], step int64 scalar
    and last bool scalar (True on the final physical batch of its step, where the optimiser applies the
    noisy update). `num_steps=None` streams steps without end.

    With `num_replicas` R > 1, each logical batch is dealt out to R replicas by `split_for_replicas` (P =
    `sampler.physical_batch_size` rows per replica and physical batch), and the elements hold only the rows of
    the replicas in `replica_ids` (default: all), with a leading axis over them: views [L,P,K,32,32,3], labels
    [L,P], mask [L,P]. Every process of a multi-worker run draws the whole logical batch (a pure function of the
    sampler's seed and the step) and keeps its own replicas' share, so all agree on the batch and on the number
    of physical batches per step. Each replica's views are augmented with a seed of their own.
    """
    images, labels = _check_arrays(images, labels)
    if sampler.num_examples != len(labels):
        raise ConfigError(f"sampler was built for {sampler.num_examples} examples but the data has {len(labels)}.")
    num_views = _check_int("num_views", num_views, 1)
    seed = _check_int("seed", seed, 0)
    if not callable(start_step):
        start_step = _check_int("start_step", start_step, 0)
    if num_steps is not None:
        num_steps = _check_int("num_steps", num_steps, 1)
    num_replicas = _check_int("num_replicas", num_replicas, 1)
    replica_ids = tuple(range(num_replicas)) if replica_ids is None else tuple(int(r) for r in replica_ids)
    if not replica_ids or any(not 0 <= r < num_replicas for r in replica_ids):
        raise ConfigError(f"replica_ids must be some of 0..{num_replicas - 1}, got {replica_ids}.")
    size = sampler.physical_batch_size

    def steps():
        # A callable start is asked afresh at every iteration of the dataset (Keras iterates once per epoch).
        first = _check_int("start_step", start_step(), 0) if callable(start_step) else start_step
        step = first
        while num_steps is None or step < first + num_steps:
            yield step
            step += 1

    tables = (tf.constant(images), tf.constant(labels))
    if num_replicas == 1:
        batches, signature, build = _one_device_batches(sampler, steps, tables, num_views, seed, size)
    else:
        batches, signature, build = _replica_batches(sampler, steps, tables, num_views, seed, size, num_replicas,
                                                     replica_ids)
    dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
    return dataset.map(build, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _one_device_batches(sampler, steps, tables, num_views, seed, size):
    """(generator of index batches, its signature, the map building the batch dicts) for one device."""
    image_table, label_table = tables

    def batches():
        # Only the cheap index sampling runs in Python; gathering and augmenting run in the parallel map.
        for step in steps():
            physical = sampler.physical_batches(step)
            for i, batch in enumerate(physical):
                yield (batch.indices, batch.mask, np.int64(step), i == len(physical) - 1,
                       _augment_seed(seed, step, i))

    signature = (
        tf.TensorSpec([size], tf.int64), tf.TensorSpec([size], tf.float32), tf.TensorSpec([], tf.int64),
        tf.TensorSpec([], tf.bool), tf.TensorSpec([2], tf.int64),
    )

    def build(indices, mask, step, last, aug_seed):
        views = augment_views(tf.gather(image_table, indices), num_views, aug_seed)
        views = tf.ensure_shape(views, [size, num_views, *IMAGE_SHAPE])
        return {"views": views, "labels": tf.gather(label_table, indices), "mask": mask, "step": step,
                "last": last}

    return batches, signature, build


def _replica_batches(sampler, steps, tables, num_views, seed, size, num_replicas, replica_ids):
    """As ``_one_device_batches``, each logical batch dealt out to replicas (only those in ``replica_ids``)."""
    image_table, label_table = tables
    rows = np.asarray(replica_ids)
    local = len(replica_ids)

    def batches():
        for step in steps():
            physical = split_for_replicas(sampler.sample(step), size, num_replicas)
            for i, batch in enumerate(physical):
                aug_seeds = np.stack([_augment_seed(seed, step, i, r) for r in replica_ids])
                yield (batch.indices[rows], batch.mask[rows], np.int64(step), i == len(physical) - 1,
                       aug_seeds)

    signature = (
        tf.TensorSpec([local, size], tf.int64), tf.TensorSpec([local, size], tf.float32),
        tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.bool), tf.TensorSpec([local, 2], tf.int64),
    )

    def build(indices, mask, step, last, aug_seeds):
        views = tf.stack([augment_views(tf.gather(image_table, indices[j]), num_views, aug_seeds[j])
                          for j in range(local)])
        views = tf.ensure_shape(views, [local, size, num_views, *IMAGE_SHAPE])
        return {"views": views, "labels": tf.gather(label_table, indices), "mask": mask, "step": step,
                "last": last}

    return batches, signature, build


def make_eval_dataset(images, labels, batch_size: int) -> tf.data.Dataset:
    """Plain (uint8 images [b,32,32,3], int64 labels [b]) batches, no augmentation, last partial batch kept."""
    images, labels = _check_arrays(images, labels)
    batch_size = _check_int("batch_size", batch_size, 1)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size).prefetch(tf.data.AUTOTUNE)
