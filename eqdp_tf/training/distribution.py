"""Several devices and hosts: the ``tf.distribute`` strategy of ``--distribution``, who the chief is, and the few
collectives that keep all workers in step.

- ``none``: TensorFlow's default strategy; everything runs as it always did, in this process.
- ``mirrored``: ``MirroredStrategy`` over this host's GPUs (over its logical CPU devices when it has none).
- ``multi_worker``: ``MultiWorkerMirroredStrategy`` over every GPU (or the CPU) of every host listed in the
  ``TF_CONFIG`` environment variable; task 0 of ``chief`` (or else ``worker`` 0) is the chief.

What stays exactly as on one device (see ``DPStep.apply``): every example of a logical batch is clipped once, on
one replica; each replica sums its clipped gradients; replica 0 alone adds the noise N(0, (sigma*C)^2) to its sum;
the replicas' sums are all-reduced, so every replica holds the same noised global sum with one noise draw, which is
divided by the expected global batch q*N and applied by every replica to its copy of the weights (no further
aggregation). The accountant sees the global q = batch_size/N and the global step count, as before.

Sharding: the Poisson sample of a step is a pure function of (key, step), so every worker draws the whole logical
batch and keeps its replicas' rows (``data.split_for_replicas``); all replicas run the same number of padded,
masked physical batches per step, as collectives require. The key comes from the chief: only the chief touches the
run folder (config.json, dp_secret.json, journal, checkpoints, metrics, TensorBoard, export); it broadcasts what the
others need (key, start step, sigma, re-taken steps, and after a resume the restored weights) through collectives,
so the other workers need neither a shared file system nor write access to ``--output_dir``.
"""

import json
import os

import numpy as np
import tensorflow as tf

from eqdp_tf.config import DISTRIBUTIONS
from eqdp_tf.errors import ConfigError, UserError

_TASK_TYPES = ("chief", "worker")


class WorkerError(UserError):
    """Another worker stopped with an error, so this one cannot go on (its own output names the cause)."""


def check_tf_config(environ=None):
    """The parsed ``TF_CONFIG`` for ``--distribution=multi_worker``; raises ``ConfigError`` naming what is wrong."""
    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG")
    hint = ('e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}\'')
    if not text:
        raise ConfigError(f"--distribution=multi_worker needs the TF_CONFIG environment variable on every host, {hint}")
    try:
        tf_config = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({err}); {hint}") from None
    if not isinstance(tf_config, dict) or not isinstance(tf_config.get("cluster"), dict) \
            or not isinstance(tf_config.get("task"), dict):
        raise ConfigError(f"TF_CONFIG needs a 'cluster' and a 'task' object; {hint}")
    cluster, task = tf_config["cluster"], tf_config["task"]
    for job, addresses in cluster.items():
        if job not in _TASK_TYPES:
            raise ConfigError(f"TF_CONFIG cluster has a {job!r} job; only 'chief' and 'worker' are supported")
        if not isinstance(addresses, list) or not addresses or \
                not all(isinstance(a, str) and ":" in a for a in addresses):
            raise ConfigError(f"TF_CONFIG cluster[{job!r}] must be a non-empty list of 'host:port' addresses; "
                              f"got {addresses!r}")
    if not cluster:
        raise ConfigError(f"TF_CONFIG cluster lists no workers; {hint}")
    if len(cluster.get("chief", [])) > 1:
        raise ConfigError("TF_CONFIG cluster may have at most one 'chief'")
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster:
        raise ConfigError(f"TF_CONFIG task type {kind!r} is not a job of its cluster ({', '.join(cluster)})")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise ConfigError(f"TF_CONFIG task index must be 0..{len(cluster[kind]) - 1} for job {kind!r}; got {index!r}")
    return tf_config


def build(mode):
    """The ``Distribution`` for ``--distribution=mode``. Call before any other TensorFlow work in the process
    (``MultiWorkerMirroredStrategy`` must start its server before the runtime is initialised); for
    ``multi_worker`` this waits until every worker of the cluster is up."""
    if mode not in DISTRIBUTIONS:
        raise ConfigError(f"--distribution must be one of {', '.join(DISTRIBUTIONS)}; got {mode!r}")
    if mode == "none":
        return Distribution(mode, tf.distribute.get_strategy())
    if mode == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return Distribution(mode, tf.distribute.MirroredStrategy(devices))
    check_tf_config()
    return Distribution(mode, tf.distribute.MultiWorkerMirroredStrategy())


class Distribution:
    """A strategy plus what the training loop needs to know about it.

    Attributes:
      mode: 'none', 'mirrored' or 'multi_worker'.
      strategy: the ``tf.distribute.Strategy`` (the default strategy for 'none').
      num_replicas: replicas in sync across all workers (devices that each take a share of a physical batch).
      num_workers, worker_index: processes, and this one's position (the chief is 0).
      is_chief: whether this process writes the run's files.
      replica_ids: the global ids of this process's replicas (consecutive).
    """

    def __init__(self, mode, strategy):
        self.mode = mode
        self.strategy = strategy
        self.distributed = mode != "none"
        self.num_replicas = int(strategy.num_replicas_in_sync)
        if mode == "multi_worker":
            self.is_chief = bool(strategy.extended.should_checkpoint)
            resolver = strategy.cluster_resolver
            spec = resolver.cluster_spec().as_dict()
            self.num_workers = sum(len(spec.get(job, [])) for job in _TASK_TYPES)
        else:
            self.is_chief = True
            self.num_workers = 1
        self.replica_ids = self._local_replica_ids() if self.distributed else (0,)
        self.worker_index = self.replica_ids[0] // len(self.replica_ids)
        self._devices = tuple(strategy.extended.worker_devices) if self.distributed else (None,)
        self._broadcast_fn = None
        self._max_fn = None

    def _local_replica_ids(self):
        """The replica ids TensorFlow gives this process's devices (as ``ValueContext`` reports them)."""
        ids = []

        def record(context):
            ids.append(int(context.replica_id_in_sync_group))
            return tf.constant(0)

        self.strategy.experimental_distribute_values_from_function(record)
        return tuple(ids)

    def scope(self):
        """Variables made in this scope are mirrored on every replica (a no-op scope for 'none')."""
        return self.strategy.scope()

    def describe(self):
        if not self.distributed:
            return "one device"
        where = f"{self.num_workers} worker{'s' if self.num_workers > 1 else ''}"
        return (f"{self.mode}: {self.num_replicas} replica{'s' if self.num_replicas > 1 else ''} on {where}; "
                f"this is worker {self.worker_index}{' (chief)' if self.is_chief else ''} with "
                f"{', '.join(d.split('/')[-1] if d else '?' for d in self._devices)}")

    # ---------------------------------------------------------------------------------------------- data

    def distribute(self, batch, keys=("views", "labels", "mask")):
        """Per-replica inputs from one element of ``data.make_train_dataset(..., replica_ids=self.replica_ids)``.

        The element's ``keys`` have a leading axis over this process's replicas; replica ``replica_ids[i]`` gets
        row i, on its own device. With one replica (and no leading axis) the element is returned as it is.
        """
        if self.num_replicas == 1:
            return batch
        position = {rid: i for i, rid in enumerate(self.replica_ids)}

        def value(context):
            i = position[int(context.replica_id_in_sync_group)]
            with tf.device(self._devices[i]):
                return {k: tf.identity(batch[k][i]) for k in keys}

        return self.strategy.experimental_distribute_values_from_function(value)

    # ---------------------------------------------------------------------------------------------- collectives
    # Every worker must call these at the same point of the program, in the same order.

    def _first_replica_value(self, values):
        """In replica context: every replica gets replica 0's ``values`` (exactly: x + 0 + ... + 0)."""
        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group, 0)
        shares = [tf.where(first, v, tf.zeros_like(v)) for v in values]
        return context.all_reduce(tf.distribute.ReduceOp.SUM, shares)

    def _local(self, per_replica):
        return self.strategy.experimental_local_results(per_replica)[0]

    def broadcast_floats(self, values):
        """The chief's float64 vector ``values`` on every worker (the others' are ignored, but must have its shape)."""
        if self._broadcast_fn is None:
            self._broadcast_fn = tf.function(
                lambda v: self._local(self.strategy.run(lambda x: self._first_replica_value([x])[0], args=(v,))),
                autograph=False, reduce_retracing=True)
        return self._broadcast_fn(tf.constant(values, tf.float64)).numpy()

    def max_over_workers(self, value):
        """The largest of every worker's integer ``value`` (0 <= value < 2**31); for agreeing on a decision."""
        if self.num_workers == 1:
            return int(value)
        if self._max_fn is None:
            def one_replica(v):
                context = tf.distribute.get_replica_context()
                # Each worker's value goes in its own slot (on its first replica), so a sum gives all of them.
                slot = tf.one_hot(context.replica_id_in_sync_group // len(self.replica_ids), self.num_workers,
                                  dtype=tf.float64)
                first_local = tf.equal(context.replica_id_in_sync_group % len(self.replica_ids), 0)
                share = tf.where(first_local, slot * v, tf.zeros_like(slot))
                return context.all_reduce(tf.distribute.ReduceOp.SUM, share)

            self._max_fn = tf.function(
                lambda v: tf.reduce_max(self._local(self.strategy.run(one_replica, args=(v,)))), autograph=False)
        return int(self._max_fn(tf.constant(float(value), tf.float64)).numpy())

    def broadcast_json(self, obj=None):
        """The chief's JSON-serialisable ``obj`` on every worker (the others pass nothing)."""
        if self.num_workers == 1:
            return obj
        data = json.dumps(obj).encode() if self.is_chief else b""
        size = int(self.broadcast_floats([float(len(data))])[0])
        payload = np.zeros(size, np.float64)
        if self.is_chief:
            payload[:] = np.frombuffer(data, np.uint8)
        received = self.broadcast_floats(payload)
        return json.loads(received.astype(np.uint8).tobytes().decode())

    def from_chief(self, compute, what):
        """Runs ``compute()`` on the chief and returns its (JSON-serialisable) result on every worker.

        A ``UserError`` on the chief is raised on the chief and, as a ``WorkerError`` quoting it, on every other
        worker, so no worker is left waiting for the others in a collective.
        """
        if self.num_workers == 1:
            return compute()
        error, result = None, None
        if self.is_chief:
            try:
                result = compute()
            except UserError as err:
                error = err
        shared = self.broadcast_json({"error": str(error) if error else None, "result": result})
        if error is not None:
            raise error
        if shared["error"] is not None:
            raise WorkerError(f"the chief stopped during {what}: {shared['error']}")
        return result if self.is_chief else shared["result"]

    def on_every_worker(self, compute, what):
        """Runs ``compute()`` on every worker; if it raises a ``UserError`` on any, every worker stops: that one
        with its own error, the others with a ``WorkerError`` naming it."""
        error, result = None, None
        try:
            result = compute()
        except UserError as err:
            if self.num_workers == 1:
                raise
            error = err
        failed = self.max_over_workers(0 if error is None else self.worker_index + 1)
        if error is not None:
            raise error
        if failed:
            raise WorkerError(f"worker {failed - 1} stopped during {what} (its output says why)")
        return result

    def sync_from_chief(self, variables):
        """Copies the chief's values of (mirrored) ``variables`` into every replica of every worker."""
        if self.num_workers == 1:
            return
        variables = list(variables)

        def replica_fn():
            # One all-reduce of float64 values (exact for float32 and for integers below 2**53).
            return self._first_replica_value([tf.cast(v.read_value(), tf.float64) for v in variables])

        @tf.function(autograph=False)
        def sync():
            shared = self.strategy.run(replica_fn)
            for v, value in zip(variables, shared):
                v.assign(tf.cast(self._local(value), v.dtype))

        sync()
