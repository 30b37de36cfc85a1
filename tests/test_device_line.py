"""The training program's start line names the device it trains on (GPUs faked: none here)."""

import types

import pytest
import tensorflow as tf

from eqdp_tf.training.reporting import describe_device

ONE_DEVICE = types.SimpleNamespace(distributed=False)
MIRRORED = types.SimpleNamespace(distributed=True)


def _fake_gpus(monkeypatch, count, name="NVIDIA A100-SXM4-40GB"):
    gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(count)]
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda device: {"device_name": name} if name else {})


def test_without_a_gpu_it_says_cpu(monkeypatch):
    _fake_gpus(monkeypatch, 0)
    assert describe_device(ONE_DEVICE) == "CPU (TensorFlow sees no GPU)"


@pytest.mark.parametrize("count, dist, expected", [
    (1, ONE_DEVICE, "GPU:0 (NVIDIA A100-SXM4-40GB)"),
    (4, ONE_DEVICE, "GPU:0 (NVIDIA A100-SXM4-40GB), one of 4 (--distribution=mirrored uses all)"),
    (4, MIRRORED, "4 GPUs (NVIDIA A100-SXM4-40GB) per worker"),
])
def test_a_gpu_is_named(monkeypatch, count, dist, expected):
    _fake_gpus(monkeypatch, count)
    assert describe_device(dist) == expected


def test_a_gpu_without_a_reported_name(monkeypatch):
    _fake_gpus(monkeypatch, 1, name=None)
    assert describe_device(ONE_DEVICE) == "GPU:0"
