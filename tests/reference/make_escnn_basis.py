"""Writes tests/reference/escnn_basis.npz: escnn's own kernel bases for the official code's convolutions, so that
tests/test_steerable.py checks ours against escnn on machines (and in CI) without torch or escnn.

Run once where escnn is installed (CPU torch, then ``pip install numpy scipy joblib autograd pymanopt lie_learn
'scikit-learn<1.3'`` and ``pip install --no-deps escnn``; py3nj is not needed for these groups):

    python tests/reference/make_escnn_basis.py

Each array ``GROUP/lifting`` or ``GROUP/group`` is ``[D, k*k * in * out]`` (float32): element d's full kernel for
one input field (or image channel) and one output field, laid out [row, column, input orientation, output
orientation] as our layers lay out theirs. escnn's R2Conv is built with the official arguments (``sigma=None,
frequencies_cutoff=lambda r: 3 * r``, kernel 3); its filter [out, in, row, column] is read by expanding each unit
coefficient vector (upstream escnn has no weight standardisation, so this is the plain basis). escnn's element
order and the action of each element on the grid are ours (checked by ``element_order_matches``), so no channel
relabelling is needed.
"""

import os
import sys
import warnings

import numpy as np

GROUPS = ("C1", "C2", "C4", "D2", "D4")
PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "escnn_basis.npz")


def _gspace(name):
    from escnn import gspaces

    n = int(name[1:])
    return gspaces.flipRot2dOnR2(n) if name[0] == "D" else gspaces.rot2dOnR2(n)


def escnn_basis(name, lifting, kernel_size=3):
    """[D, k*k * in * out] float64: escnn's basis for one (trivial or regular) input field -> one regular field."""
    import torch
    from escnn import nn

    gs = _gspace(name)
    reg = nn.FieldType(gs, [gs.regular_repr])
    source = nn.FieldType(gs, [gs.trivial_repr]) if lifting else reg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = nn.R2Conv(source, reg, kernel_size=kernel_size, padding=kernel_size // 2, sigma=None,
                         frequencies_cutoff=lambda r: 3 * r)
    dim = conv.basisexpansion.dimension()
    with torch.no_grad():
        units = torch.eye(dim, dtype=torch.float64)
        filters = [conv.basisexpansion(units[i].float()).reshape(reg.size, source.size, kernel_size, kernel_size)
                   .double().numpy() for i in range(dim)]
    return np.stack([np.transpose(f, (2, 3, 1, 0)).reshape(-1) for f in filters])


def element_order_matches(name):
    """True when escnn's i-th element moves the 3x3 grid as our i-th element does and its regular representation
    is ours (rho(g) e_h = e_{gh}), i.e. its channels are laid out as ours."""
    from layers import groups, kernels

    gs = _gspace(name)
    elements = list(gs.fibergroup.elements)
    ours = kernels.spatial_permutation(groups.get(name), 3)
    for e, g in enumerate(elements):
        matrix = np.asarray(gs.basespace_action(g))
        moved = np.empty(9, int)
        for p in range(9):
            row, col = divmod(p, 3)
            x, y = matrix @ np.array([col - 1, 1 - row])
            moved[p] = int(round(1 - y)) * 3 + int(round(x + 1))
        source = np.empty(9, int)
        source[moved] = np.arange(9)  # (g.psi)(q) = psi(g^-1 q)
        if not np.array_equal(ours[e], source):
            return False
        rho = np.asarray(gs.regular_repr(g))
        for h, other in enumerate(elements):
            if not np.allclose(rho[:, h], np.eye(len(elements))[elements.index(g @ other)]):
                return False
    return True


def main():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    arrays = {}
    for name in GROUPS:
        if not element_order_matches(name):
            raise SystemExit(f"escnn's {name} elements are not laid out as ours: relabel before comparing")
        for lifting, kind in ((True, "lifting"), (False, "group")):
            arrays[f"{name}/{kind}"] = escnn_basis(name, lifting).astype(np.float32)
    import escnn

    arrays["escnn_version"] = np.array(getattr(escnn, "__version__", "unknown"))
    np.savez_compressed(PATH, **arrays)
    print(f"wrote {PATH}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items() if v.ndim))


if __name__ == "__main__":
    main()
