import itertools

import numpy as np
import pytest

from layers import groups
from layers import kernels

ALL = ["C1", "C2", "C3", "C4", "C8", "D1", "D2", "D4", "D8"]
EXACT = ["C1", "C2", "C4", "D1", "D2", "D4"]


@pytest.mark.parametrize("name", ALL)
def test_group_axioms(name):
    g = groups.get(name)
    n = g.order
    assert n == g.rotations * (2 if g.reflections else 1)
    table = g.table
    assert set(np.unique(table)) == set(range(n))  # closure
    for a in range(n):
        assert table[g.identity, a] == a and table[a, g.identity] == a  # identity
        assert table[a, g.inverse[a]] == g.identity == table[g.inverse[a], a]  # inverse
        assert sorted(table[a]) == list(range(n))  # Latin square: cancellation
    for a, b, c in itertools.product(range(n), repeat=3):
        assert table[table[a, b], c] == table[a, table[b, c]]  # associativity


def test_dihedral_is_not_abelian_but_cyclic_is():
    d4, c4 = groups.get("D4"), groups.get("C4")
    assert not np.array_equal(d4.table, d4.table.T)
    assert np.array_equal(c4.table, c4.table.T)


@pytest.mark.parametrize("name", EXACT)
def test_grid_action_is_an_exact_homomorphism(name):
    g = groups.get(name)
    assert g.is_exact
    grid = np.random.RandomState(0).randn(7, 7, 2)
    for a, b in itertools.product(range(g.order), repeat=2):
        np.testing.assert_array_equal(g.act_on_grid(a, g.act_on_grid(b, grid)), g.act_on_grid(g.compose(a, b), grid))


def test_c8_contains_an_exact_c4():
    c8 = groups.get("C8")
    assert not c8.is_exact
    assert [c8.is_exact_element(e) for e in range(8)] == [True, False] * 4
    grid = np.random.RandomState(1).randn(5, 5)
    # 90 degrees is exact: rot90, bit for bit.
    np.testing.assert_array_equal(c8.act_on_grid(2, grid), np.rot90(grid))
    # 45 twice is close to 90 for a smooth pattern near the centre (interpolation error only).
    yy, xx = np.mgrid[-7:8, -7:8]
    smooth = np.exp(-(yy**2 + (xx - 2) ** 2) / 8.0)
    twice = c8.act_on_grid(1, c8.act_on_grid(1, smooth))
    centre = (slice(4, 11), slice(4, 11))
    # Measured 0.087: bilinear smoothing, twice. Not rotating at all would be off by ~0.9.
    assert np.max(np.abs(twice - np.rot90(smooth))[centre]) < 0.1
    assert np.max(np.abs(smooth - np.rot90(smooth))[centre]) > 0.5


def test_rotation_sense_matches_rot90():
    g = groups.get("C4")
    grid = np.arange(9).reshape(3, 3)
    np.testing.assert_array_equal(g.act_on_grid(1, grid), np.rot90(grid))
    d = groups.get("D4")
    np.testing.assert_array_equal(d.act_on_grid(4, grid), grid[:, ::-1])


@pytest.mark.parametrize(
    "big,small",
    [("D4", "D2"), ("D4", "C4"), ("C8", "C4"), ("D4", "C1"), ("C4", "C1"), ("D8", "D4"), ("C4", "C2")],
)
def test_subgroups_are_closed_and_cosets_partition(big, small):
    g, h = groups.get(big), groups.get(small)
    members = g.subgroup_embedding(h)
    assert len(set(members)) == h.order
    # the embedding is a homomorphism: h-products map to g-products
    for a, b in itertools.product(range(h.order), repeat=2):
        assert g.compose(members[a], members[b]) == members[h.compose(a, b)]
    reps = g.right_coset_representatives(h)
    assert len(reps) == g.order // h.order and reps[0] == g.identity
    cosets = [{g.compose(int(m), int(t)) for m in members} for t in reps]
    assert set().union(*cosets) == set(range(g.order))
    assert sum(len(c) for c in cosets) == g.order


@pytest.mark.parametrize("big,small", [("C4", "D2"), ("C4", "C3"), ("D4", "D8")])
def test_non_subgroups_are_refused(big, small):
    with pytest.raises(ValueError, match="not a subgroup"):
        groups.get(big).subgroup_embedding(small)


@pytest.mark.parametrize("bad", ["C0", "E4", "", "C-1", 4, None, "D"])
def test_bad_group_names(bad):
    with pytest.raises(ValueError):
        groups.get(bad)


def test_get_is_cached_and_case_insensitive():
    assert groups.get("d4") is groups.get("D4")
    assert groups.get(groups.get("C8")) is groups.get("C8")


@pytest.mark.parametrize("name", EXACT)
def test_exact_groups_give_gather_indices(name):
    perm = kernels.spatial_permutation(name, 3)
    assert perm is not None and perm.shape == (groups.get(name).order, 9)
    assert all(sorted(row) == list(range(9)) for row in perm)


def test_interpolated_groups_give_matrices():
    assert kernels.spatial_permutation("C8", 3) is None
    ops = kernels.spatial_operators("C8", 3)
    assert ops.shape == (8, 9, 5)  # filters on the radius-1 disk: 5 free taps
    # the exact elements of C8 are still permutations
    for e in (0, 2, 4, 6):
        assert set(np.unique(ops[e])) <= {0.0, 1.0}
