"""escnn's band-limited steerable basis between SO(2) fields (``layers.so2``), in pure numpy.

What the official code's ``R2Conv(in, out, sigma=None, frequencies_cutoff=None)`` builds for ``group: orthogonal``,
in our conventions. SO(2) is continuous, so the kernel constraint K(R_phi x) = rho_out(phi) K(x) rho_in(phi)^T is
solved in closed form for every pair of irreps (input frequency m, output frequency n) instead of over a grid
permutation:

- Rings and widths are the discrete basis's (``steerable.default_rings``); the band limit is escnn's default for
  ``frequencies_cutoff=None`` (``default_max_frequency``: 0 at the centre, 2 on the outer ring of a 3x3 filter).
- A block m -> n lives on the harmonics of frequency |n - m| ("difference") and, when m, n > 0, n + m ("sum"). With
  alpha = theta - pi/2 (escnn measures angles from the +y axis, ``CircularShellsBasis(axis=pi/2)``) the first
  element is the difference block R((n - m) alpha) (its first column for m = 0, first row for n = 0) or the sum block
  R((n + m) alpha) diag(1, -1); the second is the first with its harmonic a quarter period later,
  alpha -> alpha - pi / (2 j). At frequency 0 (m = n > 0) the two elements are the identity and the quarter turn J.
  These are escnn's elements exactly, sign included (``tests/test_steerable_so2.py`` compares element by element),
  which matters because the official fork standardises the coefficient vector: its mean depends on the signs.
- Each element, sampled on the grid (Gaussian ring profile times harmonic), is scaled to a squared norm equal to
  its output irrep's dimension (escnn's ``normalize_basis``).

Imports numpy only.
"""

import functools
import math
from typing import NamedTuple

import numpy as np

from layers import so2
from layers import steerable

# escnn's angular origin for circular harmonics: the +y axis (CircularShellsBasis' default axis, pi/2).
HARMONIC_AXIS = math.pi / 2


def default_max_frequency(radius, kernel_size):
    """escnn's band limit for ``frequencies_cutoff=None`` (``_manual_fco1``): the highest harmonic frequency kept on the
    ring of ``radius`` in a k x k filter."""
    max_radius = kernel_size // 2
    if radius == 0:
        return 0
    return min(2 * radius, 2 if radius == max_radius else 2 * radius - (radius + 1) % 2)


def _harmonic(kernel_size, radius, width, frequency):
    """``[k*k, 2]`` (cos j alpha, sin j alpha) times the ring's profile, alpha measured from ``HARMONIC_AXIS``;
    ``[k*k, 1]`` (the profile) for j = 0."""
    values = steerable.harmonics(kernel_size, radius, width, frequency)
    if frequency == 0:
        return values
    return values @ so2.rotation(frequency * HARMONIC_AXIS)  # (c, s) R(j a) = (cos(j t - j a), sin(j t - j a))


def _irrep_matrix(angles, k_out, k_in, kind):
    """``[P, d_out, d_in]``: R(angle) (kind 'difference') or R(angle) diag(1, -1) ('sum'), cut to the irreps' dims
    (1 for frequency 0: the first column or row)."""
    c, s = np.cos(angles), np.sin(angles)
    if kind == "sum":
        full = np.stack([np.stack([c, s], -1), np.stack([s, -c], -1)], -2)
    else:
        full = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    return full[:, :1 if k_out == 0 else 2, :1 if k_in == 0 else 2]


def _pair_elements(kernel_size, radius, width, m, n):
    """[(frequency, element [k*k, d_out, d_in])] for input frequency m -> output frequency n on one ring, escnn's
    elements and order within the block (see the module doc), before normalisation."""
    limit = default_max_frequency(radius, kernel_size)
    out = []
    kinds = [("difference", abs(n - m))] + ([("sum", n + m)] if m > 0 and n > 0 else [])
    for kind, j in kinds:
        if j > limit:
            continue
        profile = steerable.harmonics(kernel_size, radius, width, 0)[:, 0]
        if j == 0:
            if m == 0:  # n = 0 too: the scalar ring
                out.append((0, profile[:, None, None]))
                continue
            quarter_turn = so2.rotation(math.pi / 2)
            out.append((0, profile[:, None, None] * np.eye(2)))
            out.append((0, profile[:, None, None] * quarter_turn))
            continue
        harmonic = _harmonic(kernel_size, radius, width, j)  # [k*k, 2], zero at the centre
        alpha = np.arctan2(harmonic[:, 1], harmonic[:, 0])  # j alpha on the ring
        sign = 1.0 if kind == "sum" or n >= m else -1.0  # R((n - m) alpha) rotates backwards when m > n
        for shift in (0.0, -math.pi / 2):  # the second element: a quarter period later
            matrices = _irrep_matrix(sign * (alpha + shift), n, m, kind)
            out.append((j, np.hypot(harmonic[:, 0], harmonic[:, 1])[:, None, None] * matrices))
    return out


class SO2Basis(NamedTuple):
    """``base``: ``[D, k*k, d_in, d_out]``, element d as the kernel between one input field (2 L_in + 1 channels)
    and one output field (2 L_out + 1). ``blocks``: per element (input irrep, output irrep, output slot, radius,
    frequency), the layout ``steerable.he_init_std`` reads."""

    base: np.ndarray
    blocks: tuple


@functools.lru_cache(maxsize=None)
def _so2_basis(in_frequency, out_frequency, kernel_size):
    radii, widths = steerable.default_rings(kernel_size)
    d_in, d_out = so2.field_size(in_frequency), so2.field_size(out_frequency)
    taps = kernel_size * kernel_size
    elements, blocks = [], []
    for m in range(in_frequency + 1):
        for n in range(out_frequency + 1):
            for radius, width in zip(radii, widths):
                for frequency, block in _pair_elements(kernel_size, radius, width, m, n):
                    scale = math.sqrt(np.sum(block**2) / block.shape[1])
                    if scale < 1e-9:
                        continue
                    element = np.zeros((taps, d_in, d_out))
                    element[:, so2.irrep_slice(m), so2.irrep_slice(n)] = np.transpose(block, (0, 2, 1)) / scale
                    elements.append(element)
                    blocks.append((f"so2_{m}", f"so2_{n}", (n, 0), radius, frequency))
    if not elements:
        raise ValueError(f"no SO(2) steerable kernel of size {kernel_size} maps frequency {in_frequency} to "
                         f"{out_frequency} fields")
    base = np.stack(elements)
    base.setflags(write=False)
    return SO2Basis(base, tuple(blocks))


def so2_steerable_basis(in_frequency, out_frequency, kernel_size):
    """The basis of kernels from a band-limited field of maximum frequency ``in_frequency`` (0: an image channel) to
    one of ``out_frequency``; see the module doc."""
    return _so2_basis(so2.check_frequency(in_frequency, "in_frequency"),
                      so2.check_frequency(out_frequency, "out_frequency"), int(kernel_size))
