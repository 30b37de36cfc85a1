"""Input pipeline for DP-SGD over uint8 images of any shape: Poisson sampling, augmentation multiplicity, tf.data.

The pipeline hands out raw uint8 pixels; the model normalises them itself (with its dataset's constants), so an
exported model needs no separate preprocessing. The datasets themselves come from ``eqdp_tf.datasets``.

Every random choice is a pure function of (seed, step[, physical batch]) so that a run resumed
after a crash at step s sees exactly the batches and augmentations the original run would have seen.
"""

import math
from typing import List, NamedTuple, Optional

import numpy as np
import tensorflow as tf

from eqdp_tf.checks import whole_number
# The README's Keras example loads CIFAR-10 from here.
from eqdp_tf.datasets.cifar import load_cifar10  # noqa: F401
from eqdp_tf.datasets.spec import OFFICIAL_CROP_PADDING
from eqdp_tf.errors import ConfigError, DataError

# Reflect padding of the random crops in augmentation multiplicity (De et al. 2022), by default the official code's.
CROP_PADDING = OFFICIAL_CROP_PADDING

# Keeps the augmentation random stream apart from the sampling stream drawn from the same seed.
_AUGMENT_STREAM = 0xA06


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


def augment_views(images: tf.Tensor, num_views: int, seed: tf.Tensor, crop_padding: int = CROP_PADDING) -> tf.Tensor:
    """Returns uint8 [B,K,H,W,C]: view 0 is the image, views 1..K-1 random crops of the image reflect-padded by
    ``crop_padding`` pixels on each side, maybe flipped.

    `seed` is a shape-[2] integer tensor; only stateless ops are used so the result is a pure function
    of (images, seed) and is safe inside a parallel tf.data map. Each image and view gets its own crop.
    """
    num_views = _check_int("num_views", num_views, 1)
    crop_padding = _check_int("crop_padding", crop_padding, 0)
    images = tf.convert_to_tensor(images)
    if num_views == 1:
        return images[:, None]
    batch, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    crops = num_views - 1
    offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    offsets = tf.random.stateless_uniform(
        [batch, crops, 2], seed=offset_seed, minval=0, maxval=2 * crop_padding + 1, dtype=tf.int32)
    flips = tf.random.stateless_uniform([batch, crops, 1], seed=flip_seed, minval=0, maxval=2, dtype=tf.int32)

    padding = [[0, 0], [crop_padding, crop_padding], [crop_padding, crop_padding], [0, 0]]
    padded = tf.pad(images, padding, mode="REFLECT")  # [B, H+2p, W+2p, C]
    # A crop (optionally mirrored) is a choice of rows and columns of the padded image, so both
    # the crop and the flip become two gathers with per-view index vectors.
    rows = offsets[..., 0:1] + tf.range(height)[None, None]  # [B, K-1, H]
    cols = offsets[..., 1:2] + tf.where(flips == 1, tf.range(width - 1, -1, -1), tf.range(width))  # [B, K-1, W]
    views = tf.gather(padded, rows, axis=1, batch_dims=1)  # [B, K-1, H, W+2p, C]
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
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"images must be uint8 [N,H,W,C], got {images.dtype} {list(images.shape)}.")
    if labels.shape != images.shape[:1]:
        raise DataError(f"labels must have shape [{images.shape[0]}] to match the images, got {list(labels.shape)}.")
    return images, labels.astype(np.int64)


def make_train_dataset(images, labels, sampler, num_views: int, seed: int,
                       start_step: int = 0, num_steps: Optional[int] = None,
                       num_replicas: int = 1, replica_ids=None, crop_padding: int = CROP_PADDING) -> tf.data.Dataset:
    """All physical batches of logical steps start_step .. start_step+num_steps-1, in order.

    `start_step` may be a function returning the first step, called each time the dataset is iterated.

    Elements are dicts: views uint8 [P,K,H,W,C], labels int64 [P], mask float32 [P], step int64 scalar
    and last bool scalar (True on the final physical batch of its step, where the optimiser applies the
    noisy update). `num_steps=None` streams steps without end. Views 1..K-1 are crops with `crop_padding`.

    With `num_replicas` R > 1, each logical batch is dealt out to R replicas by `split_for_replicas` (P =
    `sampler.physical_batch_size` rows per replica and physical batch), and the elements hold only the rows of
    the replicas in `replica_ids` (default: all), with a leading axis over them: views [L,P,K,H,W,C], labels
    [L,P], mask [L,P]. Every process of a multi-worker run draws the whole logical batch (a pure function of the
    sampler's seed and the step) and keeps its own replicas' share, so all agree on the batch and on the number
    of physical batches per step. Each replica's views are augmented with a seed of their own.

    The images stay in the numpy array given (the sampled ones are gathered from it batch by batch), so the
    training set is held in memory once.
    """
    images, labels = _check_arrays(images, labels)
    if sampler.num_examples != len(labels):
        raise ConfigError(f"sampler was built for {sampler.num_examples} examples but the data has {len(labels)}.")
    num_views = _check_int("num_views", num_views, 1)
    seed = _check_int("seed", seed, 0)
    crop_padding = _check_int("crop_padding", crop_padding, 0)
    if not callable(start_step):
        start_step = _check_int("start_step", start_step, 0)
    if num_steps is not None:
        num_steps = _check_int("num_steps", num_steps, 1)
    num_replicas = _check_int("num_replicas", num_replicas, 1)
    replica_ids = tuple(range(num_replicas)) if replica_ids is None else tuple(int(r) for r in replica_ids)
    if not replica_ids or any(not 0 <= r < num_replicas for r in replica_ids):
        raise ConfigError(f"replica_ids must be some of 0..{num_replicas - 1}, got {replica_ids}.")

    def steps():
        # A callable start is asked afresh at every iteration of the dataset (Keras iterates once per epoch).
        first = _check_int("start_step", start_step(), 0) if callable(start_step) else start_step
        step = first
        while num_steps is None or step < first + num_steps:
            yield step
            step += 1

    if num_replicas == 1:
        batches, signature = _one_device_batches(sampler, steps, images, labels, seed)
    else:
        batches, signature = _replica_batches(sampler, steps, images, labels, seed, num_replicas, replica_ids)

    def build(batch_images, batch_labels, mask, step, last, aug_seeds):
        if num_replicas == 1:
            views = augment_views(batch_images, num_views, aug_seeds, crop_padding)
        else:  # each replica's share augmented with its own seed
            views = tf.stack([augment_views(batch_images[j], num_views, aug_seeds[j], crop_padding)
                              for j in range(len(replica_ids))])
        views = tf.ensure_shape(views, [*signature[0].shape[:-3], num_views, *images.shape[1:]])
        return {"views": views, "labels": batch_labels, "mask": mask, "step": step, "last": last}

    dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
    return dataset.map(build, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _batch_signature(leading, image_shape):
    """The generators' element: images, labels, mask, step, last, augmentation seed(s); ``leading`` is [P] on one
    device, [L, P] for L replicas."""
    seeds = [2] if len(leading) == 1 else [leading[0], 2]
    return (tf.TensorSpec([*leading, *image_shape], tf.uint8), tf.TensorSpec(leading, tf.int64),
            tf.TensorSpec(leading, tf.float32), tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.bool),
            tf.TensorSpec(seeds, tf.int64))


def _one_device_batches(sampler, steps, images, labels, seed):
    """(generator of the physical batches' rows, its signature) for one device."""

    def batches():
        # Sampling and gathering run in Python (one copy of the training set, the caller's); augmenting runs in the
        # parallel map.
        for step in steps():
            physical = sampler.physical_batches(step)
            for i, batch in enumerate(physical):
                yield (images[batch.indices], labels[batch.indices], batch.mask, np.int64(step),
                       i == len(physical) - 1, _augment_seed(seed, step, i))

    return batches, _batch_signature([sampler.physical_batch_size], images.shape[1:])


def _replica_batches(sampler, steps, images, labels, seed, num_replicas, replica_ids):
    """As ``_one_device_batches``, each logical batch dealt out to replicas (only those in ``replica_ids``)."""
    rows = np.asarray(replica_ids)
    size = sampler.physical_batch_size

    def batches():
        for step in steps():
            physical = split_for_replicas(sampler.sample(step), size, num_replicas)
            for i, batch in enumerate(physical):
                indices = batch.indices[rows]
                aug_seeds = np.stack([_augment_seed(seed, step, i, r) for r in replica_ids])
                yield (images[indices], labels[indices], batch.mask[rows], np.int64(step), i == len(physical) - 1,
                       aug_seeds)

    return batches, _batch_signature([len(replica_ids), size], images.shape[1:])


def make_eval_dataset(images, labels, batch_size: int) -> tf.data.Dataset:
    """Plain (uint8 images [b,H,W,C], int64 labels [b]) batches, no augmentation, last partial batch kept. The
    images stay in the caller's array (sliced batch by batch), not copied into the dataset."""
    images, labels = _check_arrays(images, labels)
    batch_size = _check_int("batch_size", batch_size, 1)

    def batches():
        for start in range(0, len(labels), batch_size):
            yield images[start:start + batch_size], labels[start:start + batch_size]

    signature = (tf.TensorSpec([None, *images.shape[1:]], tf.uint8), tf.TensorSpec([None], tf.int64))
    return tf.data.Dataset.from_generator(batches, output_signature=signature).prefetch(tf.data.AUTOTUNE)
