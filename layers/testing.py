"""Measuring equivariance: how far ``f(g.x)`` is from ``g.f(x)``, for every group element.

A tensor is described by what lives on its last axis: ``None`` for an ordinary image (only pixels
move) or a group, for regular fields over that group (pixels move and orientations permute). Tensors
without spatial axes (``[B, D]``, e.g. logits) are left unchanged: they should be invariant.
Band-limited SO(2) fields (``layers.so2``) turn by any angle: ``rotate_fields`` and ``so2_equivariance_error``.
"""

import math

import numpy as np

from layers import groups as groups_lib
from layers import so2


def transform(x, group, element, fields=None):
    """Applies ``element`` of ``group`` to a numpy array ``[B, H, W, C]`` (or ``[B, D]``: unchanged).

    ``fields`` is None for plain channels, else the group over which the channels are regular fields
    (``group`` itself or one of its subgroups, in which case ``element`` must lie in that subgroup).
    """
    group = groups_lib.get(group)
    x = np.asarray(x)
    if x.ndim == 2:
        return x
    if x.ndim != 4:
        raise ValueError(f"transform expects [B, H, W, C] or [B, D], got shape {x.shape}")
    moved = np.stack([group.act_on_grid(element, image) for image in x])
    if fields is None:
        return moved
    fields = groups_lib.get(fields)
    embedding = group.subgroup_embedding(fields)
    matches = np.nonzero(embedding == element)[0]
    if matches.size == 0:
        raise ValueError(f"element {element} of {group.name} is not in {fields.name}")
    perm = fields.regular_permutation(int(matches[0]))
    channels = x.shape[-1]
    if channels % fields.order:
        raise ValueError(f"{channels} channels are not regular fields over {fields.name}")
    split = moved.reshape(moved.shape[:3] + (channels // fields.order, fields.order))
    return split[..., perm].reshape(moved.shape)


def equivariance_errors(fn, x, group, in_fields=None, out_fields=None, elements=None, region=None):
    """Max relative error ``|f(g.x) - g.f(x)| / max|g.f(x)|`` per group element.

    ``region`` is an optional boolean ``[H', W']`` mask on the output grid (e.g. a central disk for
    interpolated rotations, whose corners leave the image).
    """
    group = groups_lib.get(group)
    x = np.asarray(x)
    reference = np.asarray(fn(x))
    errors = {}
    for e in range(group.order) if elements is None else elements:
        lhs = np.asarray(fn(transform(x, group, e, in_fields)))
        rhs = transform(reference, group, e, out_fields)
        if region is not None:
            lhs, rhs = lhs[:, region], rhs[:, region]
        scale = max(float(np.max(np.abs(rhs))), 1e-30)
        errors[e] = float(np.max(np.abs(lhs - rhs))) / scale
    return errors


def check_equivariance(fn, x, group, in_fields=None, out_fields=None, tolerance=1e-5, **kwargs):
    """Raises AssertionError naming the worst element when any relative error exceeds ``tolerance``."""
    errors = equivariance_errors(fn, x, group, in_fields, out_fields, **kwargs)
    worst = max(errors, key=errors.get)
    if errors[worst] > tolerance:
        raise AssertionError(
            f"not equivariant under element {worst} of {groups_lib.get(group).name}: relative error "
            f"{errors[worst]:.3g} > {tolerance:.3g}"
        )
    return errors


def rotate_fields(x, degrees, frequency=0):
    """``x [B, H, W, F*(2L+1)]`` (numpy) rotated counterclockwise by ``degrees``: pixels move (exactly for multiples
    of 90 degrees, else by bilinear resampling, ``groups.rotate_bilinear``) and each band-limited SO(2) field's
    coefficients turn by ``so2.field_rotation`` (frequency 0: plain channels, which only move)."""
    x = np.asarray(x)
    quarter_turns, rest = divmod(float(degrees), 90.0)
    if rest == 0:
        moved = np.rot90(x, k=int(quarter_turns) % 4, axes=(1, 2))
    else:
        moved = np.stack([groups_lib.rotate_bilinear(image, degrees) for image in x])
    size = so2.field_size(frequency)
    split = moved.reshape(moved.shape[:3] + (moved.shape[-1] // size, size))
    turned = split @ so2.field_rotation(frequency, math.radians(degrees)).T
    return turned.reshape(moved.shape)


def so2_equivariance_error(fn, x, degrees, in_frequency=0, out_frequency=0, radius=None):
    """Relative RMS error ``||f(g.x) - g.f(x)|| / ||g.f(x)||`` for the rotation g by ``degrees``, over the output
    pixels within ``radius`` of the centre (None: all). A disc keeps out the corners, which a rotation by other than
    90 degrees brings in from outside the grid."""
    reference = rotate_fields(np.asarray(fn(x)), degrees, out_frequency)
    rotated = np.asarray(fn(rotate_fields(x, degrees, in_frequency)))
    if radius is not None:
        size = reference.shape[1]
        offsets = np.arange(size) - (size - 1) / 2.0
        inside = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2
        reference, rotated = reference[:, inside], rotated[:, inside]
    return float(np.linalg.norm(rotated - reference) / max(np.linalg.norm(reference), 1e-30))
