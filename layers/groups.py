"""Planar rotation groups C_N and rotation-reflection groups D_N as plain data.

Element layout: index ``e = flip * N + r`` stands for the map ``x -> R^r F^flip x``: first mirror
(column axis) when ``flip == 1``, then rotate by ``r * 360 / N`` degrees. C_N has only the
``flip == 0`` half. Composition follows from ``F R^b = R^-b F``:

    (R^a F^f)(R^b F^h) = R^(a + (-1)^f b) F^(f + h)

Spatial action on a square grid (arrays ``[H, W, ...]``) uses ``(g.x)(p) = x(g^-1 p)``. Rotations by
a multiple of 90 degrees (and mirrors) permute the grid exactly. Any other angle is done as exact
quarter turns plus a bilinear interpolation of the remainder, so e.g. C_8 contains an exact C_4.

This module imports numpy only: groups know nothing about layers.
"""

import functools
import math
import re

import numpy as np

_NAME = re.compile(r"^\s*([CcDd])\s*(\d+)\s*$")


class Group:
    """C_N (``reflections=False``) or D_N (``reflections=True``), N >= 1."""

    def __init__(self, rotations, reflections):
        if isinstance(rotations, bool) or not isinstance(rotations, (int, np.integer)):
            raise ValueError(f"rotations must be an int >= 1, got {rotations!r}")
        if rotations < 1:
            raise ValueError(f"rotations must be >= 1, got {rotations}")
        self.rotations = int(rotations)
        self.reflections = bool(reflections)
        self.name = f"{'D' if self.reflections else 'C'}{self.rotations}"
        n = self.rotations
        self.elements = tuple((f, r) for f in range(2 if self.reflections else 1) for r in range(n))
        self.order = len(self.elements)
        table = np.empty((self.order, self.order), dtype=np.int64)
        for i, (f, a) in enumerate(self.elements):
            for j, (h, b) in enumerate(self.elements):
                table[i, j] = self._index((f + h) % 2, (a + (b if f == 0 else -b)) % n)
        table.setflags(write=False)
        self.table = table
        inverse = np.array([int(np.argmax(table[i] == 0)) for i in range(self.order)])
        inverse.setflags(write=False)
        self.inverse = inverse

    def _index(self, flip, rot):
        return flip * self.rotations + rot

    def __repr__(self):
        return f"Group({self.name})"

    def __eq__(self, other):
        return isinstance(other, Group) and other.name == self.name

    def __hash__(self):
        return hash(self.name)

    @property
    def identity(self):
        return 0

    @property
    def is_exact(self):
        """True when every element permutes the pixel grid exactly (N in 1, 2, 4)."""
        return all(self.is_exact_element(e) for e in range(self.order))

    def is_exact_element(self, e):
        return (4 * self.elements[e][1]) % self.rotations == 0

    def compose(self, a, b):
        return int(self.table[a, b])

    def regular_permutation(self, e):
        """Index array ``perm`` with ``(e.f)[g] = f[perm[g]] = f[e^-1 g]`` on the orientation axis."""
        return self.table[self.inverse[e]].copy()

    def act_on_grid(self, e, array):
        """Transforms the two leading (row, column) axes of a square numpy array by element ``e``."""
        array = np.asarray(array)
        if array.ndim < 2 or array.shape[0] != array.shape[1]:
            raise ValueError(f"act_on_grid needs a square grid in the leading axes, got shape {array.shape}")
        flip, rot = self.elements[e]
        if flip:
            array = array[:, ::-1]
        quarter_turns, rest = divmod(4 * rot, self.rotations)
        if rest:
            array = rotate_bilinear(array, 90.0 * rest / self.rotations)
        return np.rot90(array, k=quarter_turns, axes=(0, 1)).copy()

    # Subgroups ---------------------------------------------------------------------------------

    def subgroup_embedding(self, subgroup):
        """Indices in this group of the elements of ``subgroup`` (in the subgroup's own order).

        C_M sits in C_N and D_N, and D_M in D_N, whenever M divides N: rotation r of the subgroup is
        rotation r * N / M here, mirrors map to mirrors.
        """
        sub = get(subgroup)
        if sub.reflections and not self.reflections:
            raise ValueError(f"{sub.name} is not a subgroup of {self.name}: {self.name} has no reflections")
        if self.rotations % sub.rotations:
            raise ValueError(
                f"{sub.name} is not a subgroup of {self.name}: {sub.rotations} does not divide {self.rotations}"
            )
        step = self.rotations // sub.rotations
        return np.array([self._index(f, r * step) for f, r in sub.elements], dtype=np.int64)

    def right_coset_representatives(self, subgroup):
        """Representatives t_j with G = union over j of H t_j, the first one the identity."""
        members = self.subgroup_embedding(subgroup)
        covered = set()
        reps = []
        for t in range(self.order):
            if t in covered:
                continue
            reps.append(t)
            covered.update(int(self.table[h, t]) for h in members)
        return np.array(reps, dtype=np.int64)


def rotate_bilinear(array, degrees):
    """Rotates the leading square grid of ``array`` by ``degrees`` (same sense as np.rot90).

    Each output pixel p samples the input at R^-1 p (about the grid centre) with bilinear weights;
    samples falling outside the grid read zero.
    """
    array = np.asarray(array)
    n = array.shape[0]
    centre = (n - 1) / 2.0
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    rows, cols = np.meshgrid(np.arange(n) - centre, np.arange(n) - centre, indexing="ij")
    # np.rot90 maps (row, col) -> (-col, row); R_theta generalises it, and we sample at R^-1 p.
    src_r = cos * rows + sin * cols + centre
    src_c = -sin * rows + cos * cols + centre
    r0 = np.floor(src_r).astype(np.int64)
    c0 = np.floor(src_c).astype(np.int64)
    wr = src_r - r0
    wc = src_c - c0
    out = np.zeros(array.shape, dtype=np.result_type(array.dtype, np.float32))
    for dr, dc, weight in ((0, 0, (1 - wr) * (1 - wc)), (0, 1, (1 - wr) * wc), (1, 0, wr * (1 - wc)), (1, 1, wr * wc)):
        rr, cc = r0 + dr, c0 + dc
        inside = (rr >= 0) & (rr < n) & (cc >= 0) & (cc < n) & (weight > 1e-12)
        w = np.where(inside, weight, 0.0).reshape(weight.shape + (1,) * (array.ndim - 2))
        out += w * array[np.clip(rr, 0, n - 1), np.clip(cc, 0, n - 1)]
    return out


@functools.lru_cache(maxsize=None)
def _cached(rotations, reflections):
    return Group(rotations, reflections)


def get(group):
    """Returns the group named like ``"C4"``/``"D4"`` (case-insensitive), or ``group`` if it is one."""
    if isinstance(group, Group):
        return group
    if not isinstance(group, str):
        raise ValueError(f"group must be a name like 'C4' or 'D4', got {group!r}")
    match = _NAME.match(group)
    if not match:
        raise ValueError(f"unknown group {group!r}: expected 'C<N>' or 'D<N>' with N >= 1, e.g. 'C4', 'D4'")
    n = int(match.group(2))
    if n < 1:
        raise ValueError(f"unknown group {group!r}: N must be >= 1")
    return _cached(n, match.group(1).upper() == "D")


def cyclic_group(n):
    return get(f"C{int(n)}")


def dihedral_group(n):
    return get(f"D{int(n)}")
