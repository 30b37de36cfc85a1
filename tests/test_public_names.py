"""The packages' public names: listed by dir() (tab completion) although loaded lazily, and each importable."""

import pytest

import eqdp_tf
import layers


@pytest.mark.parametrize("package", [eqdp_tf, layers], ids=lambda p: p.__name__)
def test_dir_lists_every_public_name(package):
    listed = dir(package)
    missing = [name for name in package.__all__ if name not in listed]
    assert not missing, f"dir({package.__name__}) lacks {missing}"
    assert listed == sorted(listed)


@pytest.mark.parametrize("package", [eqdp_tf, layers], ids=lambda p: p.__name__)
def test_every_listed_public_name_resolves(package):
    for name in package.__all__:
        assert getattr(package, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        getattr(package, "no_such_name")
