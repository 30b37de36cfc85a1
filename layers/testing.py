"""Measuring equivariance: how far ``f(g.x)`` is from ``g.f(x)``, for every group element.

A tensor is described by what lives on its last axis: ``None`` for an ordinary image (only pixels
move) or a group, for regular fields over that group (pixels move and orientations permute). Tensors
without spatial axes (``[B, D]``, e.g. logits) are left unchanged: they should be invariant.
"""

import numpy as np

from layers import groups as groups_lib


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
