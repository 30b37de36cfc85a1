"""How a group turns one small filter bank into the filters for all orientations.

Pure numpy. For every group element g we need the spatial operator S_g on a k x k filter,
``(g.psi)(p) = psi(g^-1 p)``. For exact groups S_g is a permutation of the k*k taps, returned as
gather indices. Groups with other angles (C8, D8, ...) get interpolation matrices instead, built
by *splatting*: each tap pushes its weight onto the four grid points around its rotated position
(the transpose of bilinear sampling). Unlike sampling, splatting keeps a filter's sum and centre of
mass, which is what a filter's response to smooth inputs depends on most, so it is the more
equivariant choice. Interpolated filters live on the disk of radius (k-1)/2 (5 taps for k=3, 13
for k=5): a rotated disk tap splats only onto grid points, so no weight is lost off the edge.
(Measured: a 45 degree rotation error of ~2% with this disk, ~10-30% with the full square.) Layers build
these once in ``build`` and apply them in ``call`` with one gather or one einsum.
"""

import functools

import numpy as np

from layers import groups as groups_lib


def disk_taps(kernel_size):
    """Row-major indices of the taps within (k-1)/2 of the centre of a k x k grid."""
    centre = (kernel_size - 1) / 2.0
    rows, cols = np.mgrid[0:kernel_size, 0:kernel_size] - centre
    inside = rows**2 + cols**2 <= centre**2 + 1e-9
    return np.flatnonzero(inside.reshape(-1))


@functools.lru_cache(maxsize=None)
def _spatial_operators(group_name, kernel_size):
    group = groups_lib.get(group_name)
    taps = kernel_size * kernel_size
    basis = np.eye(taps, dtype=np.float64).reshape(kernel_size, kernel_size, taps)
    # Column q of a sampling operator is the image of the unit filter e_q under act_on_grid.
    sampling = np.stack([group.act_on_grid(e, basis).reshape(taps, taps) for e in range(group.order)])
    # Splatting by g is sampling by g^-1, transposed; for permutations both are the same matrix.
    ops = np.stack([sampling[group.inverse[e]].T for e in range(group.order)])
    if not group.is_exact:
        ops = ops[:, :, disk_taps(kernel_size)]
    ops.setflags(write=False)
    return ops


def spatial_operators(group, kernel_size):
    """Array ``[|G|, k*k, T]`` with ``flat(g.psi) = S[g] @ psi``, psi given on its T free taps.

    T = k*k for exact groups, the disk taps (see ``disk_taps``) for interpolated ones.
    """
    group = groups_lib.get(group)
    return _spatial_operators(group.name, int(kernel_size))


def free_taps(group, kernel_size):
    """Number of spatial parameters of one base filter: k*k, or the disk's taps when interpolated."""
    return spatial_operators(group, kernel_size).shape[2]


def spatial_permutation(group, kernel_size):
    """Gather indices ``[|G|, k*k]`` with ``flat(g.psi)[p] = psi_flat[idx[g, p]]``, or None.

    None means at least one element needs interpolation (e.g. C8's 45 degree rotations).
    """
    ops = spatial_operators(group, kernel_size)
    is_permutation = ops.shape[1] == ops.shape[2] and np.all((ops == 0) | (ops == 1)) and np.all(ops.sum(axis=2) == 1)
    if not is_permutation:
        return None
    return np.argmax(ops, axis=2).astype(np.int32)


def lifting_indices(group, kernel_size):
    """Gather indices into a base filter flattened as ``[k*k]``: shape ``[|G|, k*k]``."""
    return spatial_permutation(group, kernel_size)


def group_conv_indices(group, kernel_size, spatial=True):
    """Gather indices ``[|G|_out, k*k, |G|_in]`` into a base filter flattened as ``[k*k * |G|]``.

    Entry ``[g, p, h]`` points at tap ``(g^-1 p, g^-1 h)`` of the base filter: the filter for output
    orientation g is the base filter moved by g in space and along the orientation axis. With
    ``spatial=False`` only the orientation axis is permuted (over the T free taps, which stay put);
    interpolated groups use that and apply S_g with a matrix afterwards.
    """
    group = groups_lib.get(group)
    taps = free_taps(group, kernel_size)
    if spatial:
        perm = spatial_permutation(group, kernel_size)
        if perm is None:
            raise ValueError(f"{group.name} does not permute a {kernel_size}x{kernel_size} grid exactly")
    else:
        perm = np.tile(np.arange(taps, dtype=np.int32), (group.order, 1))
    index = np.empty((group.order, taps, group.order), dtype=np.int32)
    for g in range(group.order):
        orientation = group.regular_permutation(g)  # h -> g^-1 h
        index[g] = perm[g][:, None] * group.order + orientation[None, :]
    return index
