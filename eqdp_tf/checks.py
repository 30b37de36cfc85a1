"""Argument checks shared by every module that takes numbers from a user: one wording for one mistake."""

import math
import numbers

import numpy as np

from eqdp_tf.errors import ConfigError


def finite_number(name, value, *, above=None, at_least=None, error=ConfigError):
    """``value`` as a float, after checking it is a finite real number (``above``: strictly greater than;
    ``at_least``: greater or equal). Raises ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise error(f"{name} must be a finite number; got {value!r}")
    if above is not None and not value > above:
        raise error(f"{name} must be > {above}; got {value!r}")
    if at_least is not None and value < at_least:
        raise error(f"{name} must be >= {at_least}; got {value!r}")
    return float(value)


def whole_number(name, value, *, at_least=0, error=ConfigError):
    """``value`` as an int, after checking it is a whole number >= ``at_least`` (a float such as 3.0 is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < at_least:
        wanted = "a positive integer" if at_least == 1 else f"a whole number >= {at_least}"
        raise error(f"{name} must be {wanted}; got {value!r}")
    return int(value)
