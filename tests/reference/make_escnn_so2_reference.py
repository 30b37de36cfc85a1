"""Writes tests/reference/escnn_so2.npz: what escnn 1.0.11 computes for the official SO(2) model's pieces, so that
tests/test_so2_layers.py checks ours against escnn in CI without torch or escnn (install escnn as
make_escnn_basis.py says, then ``python tests/reference/make_escnn_so2_reference.py``).

Arrays:
- ``basis/{m}-{n}``: ``[D, k*k, 2m+1, 2n+1]`` escnn's ``R2Conv`` basis (``sigma=None, frequencies_cutoff=None``,
  k = 3) from one band-limited field of maximum frequency m (0: an image channel) to one of n, in escnn's element
  order, each element expanded from a unit coefficient and laid out [row * k + column, input, output] as ours.
- ``he_std/{m}-{n}``: escnn's generalised He standard deviations for a conv from 3 such fields to 2.
- ``fourier_a/{L}``: ``[16, 2L+1]`` the sampling matrix A of ``FourierELU(..., N=16)``.
- ``pool_filter``: the ``PointwiseAvgPoolAntialiased(sigma=0.66)`` filter; ``mask``: ``MaskModule(S=32, margin=1)``.
- ``restriction/{L}``: ``[2, 2*(2L+1)]`` escnn's ``RestrictionModule(type, 1)`` + ``DisentangleModule`` applied to two
  random pixels of 2 fields (input row 0, output row 1).
"""

import os
import sys
import warnings

import numpy as np

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "escnn_so2.npz")
# (input, output) maximum frequencies of the official model's convolutions for L = 1, 2, 3.
PAIRS = ((0, 1), (1, 1), (0, 2), (2, 2), (0, 3), (3, 3))


def field_type(frequency, fields):
    from escnn import gspaces, nn

    gs = gspaces.rot2dOnR2(-1)
    group = gs.fibergroup
    rep = group.spectral_regular_representation(*group.bl_irreps(frequency)) if frequency else gs.trivial_repr
    return nn.FieldType(gs, [rep] * fields)


def escnn_conv(m, n, in_fields=1, out_fields=1):
    from escnn import nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.R2Conv(field_type(m, in_fields), field_type(n, out_fields), 3, padding=1, sigma=None,
                         frequencies_cutoff=None)


def escnn_so2_basis(m, n):
    """``[D, 9, 2m+1, 2n+1]`` float64: escnn's elements for one field pair (module doc)."""
    import torch

    conv = escnn_conv(m, n)
    dim = conv.basisexpansion.dimension()
    with torch.no_grad():
        units = torch.eye(dim)
        filters = [conv.basisexpansion(units[i]).reshape(2 * n + 1, 2 * m + 1, 3, 3).double().numpy()
                   for i in range(dim)]
    return np.stack([np.transpose(f, (2, 3, 1, 0)).reshape(9, 2 * m + 1, 2 * n + 1) for f in filters])


def escnn_he_std(m, n):
    from escnn.nn.init import _generalized_he_init_variances

    return _generalized_he_init_variances(escnn_conv(m, n, 3, 2).basisexpansion).numpy()


def escnn_fourier_matrix(frequency):
    from escnn import nn

    fields = field_type(frequency, 1)
    return nn.FourierELU(fields.gspace, 1, irreps=fields.gspace.fibergroup.bl_irreps(frequency), N=16).A.numpy()


def escnn_restriction(frequency):
    import torch
    from escnn import nn

    fields = field_type(frequency, 2)
    restrict = nn.RestrictionModule(fields, 1)
    modules = nn.SequentialModule(restrict, nn.DisentangleModule(restrict.out_type))
    x = torch.randn(1, fields.size, 1, 2, generator=torch.Generator().manual_seed(0))
    y = modules(nn.GeometricTensor(x, fields)).tensor
    return np.stack([x[0, :, 0, 0].numpy(), y[0, :, 0, 0].numpy()])


def main():
    import escnn
    from escnn import nn

    arrays = {}
    for m, n in PAIRS:
        arrays[f"basis/{m}-{n}"] = escnn_so2_basis(m, n).astype(np.float32)
        arrays[f"he_std/{m}-{n}"] = escnn_he_std(m, n).astype(np.float32)
    for frequency in (1, 2, 3):
        arrays[f"fourier_a/{frequency}"] = escnn_fourier_matrix(frequency).astype(np.float32)
        arrays[f"restriction/{frequency}"] = escnn_restriction(frequency).astype(np.float32)
    image = field_type(0, 1)
    arrays["pool_filter"] = nn.PointwiseAvgPoolAntialiased(image, sigma=0.66, stride=2).filter[0, 0].numpy()
    arrays["mask"] = nn.MaskModule(image, S=32, margin=1).mask[0, 0].numpy()
    arrays["escnn_version"] = np.array(getattr(escnn, "__version__", "unknown"))
    np.savez_compressed(PATH, **arrays)
    print(f"wrote {PATH}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items() if v.ndim))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main()
