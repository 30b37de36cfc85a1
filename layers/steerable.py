"""Band-limited steerable filter bases for C_N and D_N (the official code's escnn ``R2Conv`` basis), in pure numpy.

A group convolution's base filter (the filter of output orientation e, ``[k*k, |G|_in]``) is here not free but a
fixed matrix times trainable coefficients. The basis is built the way escnn builds it, in our own conventions:

1. Rings and harmonics. On the k x k grid (k odd) the rings sit at radii 0, 1, ..., (k-1)/2, each with a Gaussian
   radial profile (width 0.005 for the centre, 0.6 for inner rings, 0.4 for the outermost; escnn's defaults for
   ``sigma=None``), times circular harmonics cos(j theta), sin(j theta) of frequency j <= ``max_frequency(r)``
   (official: 3 r). A harmonic of frequency j > 0 is zero at the centre. For k = 3: the centre, plus frequencies
   0..3 on the outer ring: 8 functions per input orientation, not 9 (the missing one is the outer ring's
   alternating corner/edge pattern, frequency 4).
2. Irreps. The regular representation splits into real irreducible ones through an orthonormal change of basis
   Q (``regular_change_of_basis``); a kernel between regular fields is Q_out K Q_in^T with K block-structured:
   one block per (input irrep copy, output irrep copy). Each block's elements of one ring and one frequency span
   the kernels of that block that are equivariant, found as a null space.
3. Normalisation. Within a (block, ring, frequency) the elements are orthonormalised on the grid and scaled so
   that each has squared norm equal to its output irrep's dimension (escnn's rule), measured on the full kernel
   (all output orientations). Elements of different frequencies are not orthogonal on a 3x3 grid (frequencies 1
   and 3 overlap): this geometry is what DP-SGD's clipping and noise see, and it is the official model's.

escnn's own elements within one (block, ring, frequency) come from a randomised numerical solver, so they equal
ours up to a rotation inside that small space; what a test can and does compare (tests/test_steerable.py,
against escnn where installed and against a committed reference otherwise) is the spanned space, each element's
norm and the kernel covariance B B^T that coefficient noise induces.

Imports numpy only.
"""

import functools
import math
from typing import NamedTuple

import numpy as np

from layers import groups as groups_lib
from layers import kernels


class Irrep(NamedTuple):
    """A real irreducible representation: ``matrices[e]`` is its ``[dim, dim]`` matrix for element e; ``copies``
    is how often it occurs in the regular representation (dim over the dimension of its endomorphisms)."""

    name: str
    dim: int
    matrices: np.ndarray
    copies: int


def _rotation(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


@functools.lru_cache(maxsize=None)
def _irreps(group_name):
    group = groups_lib.get(group_name)
    n = group.rotations
    flips = np.array([f for f, _ in group.elements])
    rots = np.array([r for _, r in group.elements])
    one = lambda values: np.asarray(values, np.float64).reshape(-1, 1, 1)  # noqa: E731
    out = [Irrep("trivial", 1, one(np.ones(group.order)), 1)]
    if group.reflections:
        out.append(Irrep("flip", 1, one((-1.0) ** flips), 1))
    if n % 2 == 0:
        out.append(Irrep(f"rot{n // 2}", 1, one((-1.0) ** rots), 1))
        if group.reflections:
            out.append(Irrep(f"flip_rot{n // 2}", 1, one((-1.0) ** (rots + flips)), 1))
    mirror = np.diag([1.0, -1.0])
    for k in range(1, (n + 1) // 2):
        # R^r F^f -> R(2 pi k r / N) M^f: a homomorphism since M R(a) = R(-a) M, as F R = R^-1 F in the group.
        mats = np.stack([_rotation(2 * math.pi * k * r / n) @ np.linalg.matrix_power(mirror, f)
                         for f, r in group.elements])
        # Over the reals a rotation irrep of C_N commutes with a 2-dim algebra (complex type): it occurs once in the
        # regular representation. With mirrors (D_N) only scalars commute with it: it occurs twice.
        out.append(Irrep(f"{'flip_' if group.reflections else ''}rot{k}", 2, mats, 2 if group.reflections else 1))
    for irrep in out:
        irrep.matrices.setflags(write=False)
    return tuple(out)


def irreps(group):
    """The real irreps of C_N or D_N, trivial first."""
    return _irreps(groups_lib.get(group).name)


def regular_permutations(group):
    """``[|G|, |G|, |G|]``: the regular representation, ``P[g] @ f`` = g.f with (g.f)[h] = f[g^-1 h] (the
    orientation axis of our layers)."""
    group = groups_lib.get(group)
    mats = np.zeros((group.order, group.order, group.order))
    for g in range(group.order):
        mats[g, np.arange(group.order), group.regular_permutation(g)] = 1.0
    return mats


@functools.lru_cache(maxsize=None)
def _regular_change_of_basis(group_name):
    group = groups_lib.get(group_name)
    columns, slots = [], []
    for index, irrep in enumerate(irreps(group)):
        # Column (i, copy c) is the matrix coefficient h -> sqrt(d/|G|) psi(h)[i, c]; P[g] maps the columns of one
        # copy by psi(g). A complex-type irrep's second column would repeat the first's space, so it is skipped.
        for copy in range(irrep.copies):
            start = len(columns)
            for i in range(irrep.dim):
                columns.append(math.sqrt(irrep.dim / group.order) * irrep.matrices[:, i, copy])
            slots.append((index, copy, start))
    q = np.stack(columns, axis=1)
    q.setflags(write=False)
    return q, tuple(slots)


def regular_change_of_basis(group):
    """(Q, slots): the orthonormal ``[|G|, |G|]`` Q with ``P[g] Q = Q (+) psi(g)`` (every irrep copy in turn), and
    for each copy (irrep index, copy number, first column of Q)."""
    return _regular_change_of_basis(groups_lib.get(group).name)


def default_rings(kernel_size):
    """(radii, widths) of escnn's default rings for a k x k filter (``sigma=None``)."""
    count = math.ceil(kernel_size / 2)
    radii = np.linspace(0, (kernel_size - 1) // 2, count)
    widths = [0.6] * (count - 1) + [0.4]
    widths = [0.005 if r == 0 else w for r, w in zip(radii, widths)]
    return tuple(float(r) for r in radii), tuple(widths)


def harmonics(kernel_size, radius, width, frequency):
    """``[k*k, 1 or 2]``: the Gaussian ring at ``radius`` times cos/sin(frequency theta), sampled on the grid.

    Grid point (row i, column j) sits at x = j - c, y = c - i (c the centre; y up, as images are shown)."""
    centre = (kernel_size - 1) / 2.0
    rows, cols = np.mgrid[0:kernel_size, 0:kernel_size]
    x, y = (cols - centre).reshape(-1), (centre - rows).reshape(-1)
    r = np.hypot(x, y)
    profile = np.exp(-0.5 * (r - radius) ** 2 / width**2)
    if frequency == 0:
        return profile[:, None]
    theta = np.arctan2(y, x)
    at_centre = r < 1e-9
    cos = np.where(at_centre, 0.0, np.cos(frequency * theta))
    sin = np.where(at_centre, 0.0, np.sin(frequency * theta))
    return np.stack([profile * cos, profile * sin], axis=1)


def _null_space(matrix, tol=1e-9):
    if matrix.shape[0] == 0:
        return np.eye(matrix.shape[1])
    _, s, vh = np.linalg.svd(matrix)
    rank = int(np.sum(s > tol * max(1.0, s[0] if s.size else 1.0)))
    return vh[rank:].T


def full_kernels_from_base(group, kernel_size, lifting):
    """``[k*k * n_in, k*k * n_in * |G|]``: the linear map from a base filter (out orientation e) to the full
    kernel over all output orientations, as the layers expand it (``kernels``). n_in = 1 for lifting, |G| else."""
    taps = kernel_size * kernel_size
    if lifting:
        index = kernels.lifting_indices(group, kernel_size)  # [G, k*k]
        rows = taps
        gather = index  # full[p, g] = base[index[g, p]]
    else:
        index = kernels.group_conv_indices(group, kernel_size)  # [G_out, k*k, G_in] into base [k*k * G_in]
        rows = taps * group.order
        gather = index.reshape(group.order, -1)
    mapping = np.zeros((rows, rows, group.order))  # [base entry, full entry (row), out orientation]
    for g in range(group.order):
        mapping[gather[g], np.arange(rows), g] = 1.0
    return mapping.reshape(rows, rows * group.order)


class SteerableBasis(NamedTuple):
    """``base``: ``[D, k*k, n_in]``, element d's base filter (output orientation e; n_in = 1 for a lifting conv,
    |G| input orientations otherwise). ``blocks``: per element, (input irrep, output irrep, output copy, radius,
    frequency): what escnn's generalised He initialisation reads."""

    base: np.ndarray
    blocks: tuple


def max_frequency_official(radius):
    """The official code's band limit, ``frequencies_cutoff=lambda r: 3 * r``."""
    return 3 * radius


@functools.lru_cache(maxsize=None)
def _steerable_basis(group_name, kernel_size, lifting):
    group = groups_lib.get(group_name)
    if kernels.spatial_permutation(group, kernel_size) is None:
        raise ValueError(f"the steerable basis needs a group that permutes the {kernel_size}x{kernel_size} grid "
                         f"exactly (C1, C2, C4, D1, D2, D4), got {group.name}")
    taps, order = kernel_size * kernel_size, group.order
    n_in = 1 if lifting else order
    expand = full_kernels_from_base(group, kernel_size, lifting)  # base -> full [k*k, n_in, G_out]
    q_out, out_slots = regular_change_of_basis(group)
    if lifting:
        q_in, in_slots = np.ones((1, 1)), ((0, 0, 0),)
    else:
        q_in, in_slots = q_out, out_slots
    reps = irreps(group)
    # The full kernel in irrep coordinates: K[p, i, o] = sum_{h, g} Q_in[h, i] full[p, h, g] Q_out[g, o].
    to_irreps = np.einsum("hi,go->hgio", q_in, q_out)
    radii, widths = default_rings(kernel_size)
    elements, blocks = [], []
    for in_index, in_copy, in_start in in_slots:
        in_irrep = reps[in_index]
        for out_index, out_copy, out_start in out_slots:
            out_irrep = reps[out_index]
            block = np.zeros((n_in, order), bool)
            block[in_start:in_start + in_irrep.dim, out_start:out_start + out_irrep.dim] = True
            for radius, width in zip(radii, widths):
                for frequency in range(int(max_frequency_official(radius)) + 1):
                    funcs = harmonics(kernel_size, radius, width, frequency)  # [k*k, m]
                    # Candidates: a function of this ring and frequency on one input orientation (or channel).
                    base = np.einsum("pm,hu->muph", funcs, np.eye(n_in)).reshape(-1, taps * n_in)
                    full = (base @ expand).reshape(-1, taps, n_in, order)
                    irrep_coords = np.einsum("cphg,hgio->cpio", full, to_irreps)
                    outside = irrep_coords[:, :, ~block].reshape(irrep_coords.shape[0], -1)
                    solutions = _null_space(outside.T)  # [candidates, s]
                    if solutions.shape[1] == 0:
                        continue
                    kernels_full = (solutions.T @ full.reshape(full.shape[0], -1))  # [s, k*k * n_in * G]
                    # Orthonormal on the grid within this block, ring and frequency; then |element|^2 = dim(out).
                    u, s, _ = np.linalg.svd(kernels_full.T, full_matrices=False)
                    u = u[:, s > 1e-6 * max(1.0, s[0])]
                    for column in u.T:
                        element = column * math.sqrt(out_irrep.dim)
                        elements.append(element.reshape(taps, n_in, order)[:, :, 0])
                        blocks.append((in_irrep.name, out_irrep.name, (out_index, out_copy), radius, frequency))
    base = np.stack(elements)
    base.setflags(write=False)
    return SteerableBasis(base, tuple(blocks))


def steerable_basis(group, kernel_size, lifting):
    """The band-limited basis of a lifting (``lifting=True``: image channels -> regular fields) or group
    convolution (regular -> regular fields) over an exact group; see the module doc."""
    return _steerable_basis(groups_lib.get(group).name, int(kernel_size), bool(lifting))


def he_init_std(basis, in_fields):
    """Per-element standard deviation of escnn's generalised He initialisation for a layer with ``in_fields`` input
    fields (or image channels): 1 / sqrt(#input irrep kinds feeding an output irrep copy x #elements from that kind
    into it, over all input fields)."""
    kinds, counts = {}, {}
    for in_irrep, _, out_slot, _, _ in basis.blocks:
        kinds.setdefault(out_slot, set()).add(in_irrep)
        counts[(in_irrep, out_slot)] = counts.get((in_irrep, out_slot), 0) + in_fields
    return np.array([1.0 / math.sqrt(len(kinds[out_slot]) * counts[(in_irrep, out_slot)])
                     for in_irrep, _, out_slot, _, _ in basis.blocks])
