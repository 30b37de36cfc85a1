"""Band-limited feature fields of the continuous rotation group SO(2), in pure numpy.

A band-limited field of maximum frequency L is escnn's ``spectral_regular_representation(*bl_irreps(L))`` (the
official code's field for ``group: orthogonal``): the Fourier coefficients of a function on the circle up to
frequency L, 2L + 1 channels laid out ``[a_0, cos_1, sin_1, cos_2, sin_2, ..., cos_L, sin_L]`` (escnn's order, its
change of basis the identity). A rotation by phi acts on the frequency-k pair by the rotation matrix R(k phi) and
leaves a_0 alone; pixels move counterclockwise (as ``np.rot90`` and ``layers.groups`` turn them). An image channel
is a field of maximum frequency 0.

Channel layout of a tensor of F such fields: field-major, channel ``f * (2L + 1) + i`` is coefficient i of field f
(the layout every layer of this package uses, with 2L + 1 in the place of |G|).
"""

import functools
import math

import numpy as np

# FourierELU's default number of samples on the circle (the official code's ``N=16``).
OFFICIAL_SAMPLES = 16


def check_frequency(frequency, name="frequency"):
    """``frequency`` as a non-negative int, or a ValueError naming it."""
    if isinstance(frequency, bool) or not isinstance(frequency, (int, np.integer)) or frequency < 0:
        raise ValueError(f"{name} (the fields' maximum SO(2) frequency) must be an int >= 0, got {frequency!r}")
    return int(frequency)


def field_size(frequency):
    """Channels of one band-limited field: 2L + 1."""
    return 2 * check_frequency(frequency) + 1


def irrep_slice(k):
    """The channels of frequency k inside one field."""
    return slice(0, 1) if k == 0 else slice(2 * k - 1, 2 * k + 1)


def rotation(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def field_rotation(frequency, angle):
    """``[2L+1, 2L+1]``: how a rotation by ``angle`` (radians, counterclockwise) acts on one field's coefficients."""
    matrix = np.zeros((field_size(frequency),) * 2)
    matrix[0, 0] = 1.0
    for k in range(1, frequency + 1):
        matrix[irrep_slice(k), irrep_slice(k)] = rotation(k * angle)
    return matrix


@functools.lru_cache(maxsize=None)
def fourier_sampling(frequency, samples=OFFICIAL_SAMPLES):
    """(A, A_inv): ``A [N, 2L+1]`` evaluates a field's function at the N angles 2 pi n / N, ``A_inv [2L+1, N]`` takes
    N samples back to coefficients (regularised least squares, as escnn's ``FourierPointwise``).

    Row n of A is rho(g_n) applied to escnn's unit-norm "delta" kernel (1, sqrt2, 0, sqrt2, 0, ...) / sqrt(2L+1), i.e.
    (1, sqrt2 cos(k t), sqrt2 sin(k t), ...) / sqrt(2L+1) at t = 2 pi n / N. With N > 2L the samples determine the
    coefficients, and A_inv A = I up to escnn's regulariser 1e-8.
    """
    frequency = check_frequency(frequency)
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2 * frequency + 1:
        raise ValueError(f"samples must be an int >= 2L + 1 = {2 * frequency + 1} to resolve frequency {frequency}, "
                         f"got {samples!r}")
    delta = np.zeros(field_size(frequency))
    delta[0] = 1.0
    for k in range(1, frequency + 1):
        delta[2 * k - 1] = math.sqrt(2.0)
    delta /= np.linalg.norm(delta)
    a = np.stack([field_rotation(frequency, 2 * math.pi * n / samples) @ delta for n in range(int(samples))])
    a_inv = np.linalg.inv(a.T @ a + 1e-8 * np.eye(a.shape[1])) @ a.T
    a.setflags(write=False)
    a_inv.setflags(write=False)
    return a, a_inv
