"""Token selection policies: exact selections, forced tokens, per-row independence, errors."""

import math

import pytest
import torch

from evtrace.runtime.policies import (
    All,
    FixedCapacityThreshold,
    Policy,
    Selection,
    Threshold,
    TopFraction,
    TopK,
    as_policy,
)


def rows(selection: Selection) -> list[list[int]]:
    """Selected indices per batch row as sorted lists (order is unspecified)."""
    return [sorted(r) for r in selection.index.tolist()]


# Two batch rows with different orderings, so any union across the batch shows.
ERROR = torch.tensor(
    [
        [0.1, 5.0, 0.3, 4.0, 0.2, 3.0],
        [6.0, 0.1, 5.0, 0.2, 0.3, 0.4],
    ]
)
REF = torch.tensor(
    [
        [1.0, 100.0, 1.0, 1.0, 1.0, 100.0],
        [1.0, 1.0, 100.0, 1.0, 1.0, 1.0],
    ]
)


def test_topk_exact_per_row():
    sel = TopK(2).select(ERROR)
    assert sel.mask is None
    assert sel.index.dtype == torch.long and sel.index.shape == (2, 2)
    assert rows(sel) == [[1, 3], [0, 2]]


def test_topk_forced_tokens_always_selected():
    forced = torch.zeros(6, dtype=torch.bool)
    forced[0] = True
    sel = TopK(2).select(ERROR, forced=forced)
    assert rows(sel) == [[0, 1], [0, 2]]


def test_topk_r_can_change_between_frames():
    p = TopK(1)
    assert rows(p.select(ERROR)) == [[1], [0]]
    p.r = 3
    assert rows(p.select(ERROR)) == [[1, 3, 5], [0, 2, 5]]
    assert p.tokens_per_frame(6) == 3


def test_top_fraction():
    p = TopFraction(0.5)
    assert p.tokens_per_frame(6) == 3
    assert rows(p.select(ERROR)) == [[1, 3, 5], [0, 2, 5]]
    assert TopFraction(0.1).tokens_per_frame(30) == 3  # float rounding: not 4
    assert TopFraction(0.01).tokens_per_frame(6) == 1
    assert TopFraction(1.0).tokens_per_frame(7) == 7


def test_threshold_absolute_masks_the_padding_of_rows_with_fewer_tokens():
    sel = Threshold(2.5).select(ERROR)
    # row 0 has three tokens above 2.5, row 1 two: R = 3, row 1's third slot is padding, masked
    assert sel.index.shape == (2, 3)
    assert rows(sel) == [[1, 3, 5], [0, 2, 5]]
    assert sel.mask.tolist() == [[True, True, True], [True, True, False]]
    assert Threshold(2.5).select(ERROR[:1]).mask is None  # one stream: nothing to pad


def test_threshold_relative_and_zero_count():
    sel = Threshold(2.5, relative=True).select(ERROR, REF)
    # relative errors: row 0 [0.1, .05, .3, 4, .2, .03], row 1 [6, .1, .05, .2, .3, .4]
    assert rows(sel) == [[3], [0]]
    empty = Threshold(100.0).select(ERROR)
    assert empty.index.shape == (2, 0)
    assert Threshold(1.0).tokens_per_frame(6) is None


def test_threshold_forced():
    forced = torch.tensor([False, False, False, False, True, False])
    sel = Threshold(5.5).select(ERROR, forced=forced)
    assert sel.index.shape == (2, 2)
    assert [4 in r for r in rows(sel)] == [True, True]
    assert rows(sel)[1] == [0, 4]


def test_fixed_capacity_threshold_mask():
    forced = torch.tensor([False, False, False, False, True, False])
    sel = FixedCapacityThreshold(2.5, capacity=3).select(ERROR, forced=forced)
    assert sel.index.shape == (2, 3) and sel.mask.shape == (2, 3)
    chosen = [sorted(i for i, m in zip(ri, rm) if m) for ri, rm in zip(sel.index.tolist(), sel.mask.tolist())]
    # row 0: 5.0, 4.0, 3.0 exceed, forced 4 takes a slot -> top-3 = {4, 1, 3}
    assert chosen == [[1, 3, 4], [0, 2, 4]]
    rel = FixedCapacityThreshold(2.5, capacity=2, relative=True).select(ERROR, REF)
    chosen = [sorted(i for i, m in zip(ri, rm) if m) for ri, rm in zip(rel.index.tolist(), rel.mask.tolist())]
    assert chosen == [[3], [0]]
    assert rel.mask.sum().item() == 2
    assert FixedCapacityThreshold(0.0, 4).tokens_per_frame(10) == 4


def test_all():
    sel = All().select(ERROR)
    assert sel.mask is None
    assert sel.index.tolist() == [list(range(6))] * 2
    assert All().tokens_per_frame(9) == 9


def test_per_batch_row_independence():
    torch.manual_seed(0)
    err = torch.rand(4, 50)
    for policy in (TopK(7), TopFraction(0.2), Threshold(0.8), FixedCapacityThreshold(0.5, 9)):
        batched = policy.select(err)
        for b in range(4):
            single = policy.select(err[b : b + 1])
            want = set(single.index[0].tolist())
            got = set(batched.index[b].tolist())
            if isinstance(policy, Threshold):  # R is the batch max: a superset of the row's own
                assert want <= got
            else:
                assert want == got


def test_reprs():
    assert repr(TopK(4)) == "TopK(r=4)"
    assert repr(TopFraction(0.25)) == "TopFraction(f=0.25)"
    assert repr(Threshold(0.15, relative=True)) == "Threshold(tau=0.15, relative=True)"
    assert (
        repr(FixedCapacityThreshold(0.3, 64))
        == "FixedCapacityThreshold(tau=0.3, capacity=64, relative=False)"
    )
    assert repr(All()) == "All()"


def test_as_policy():
    p = as_policy(5)
    assert isinstance(p, TopK) and p.r == 5
    q = Threshold(1.0)
    assert as_policy(q) is q
    for bad in ("5", 0.5, True, None):
        with pytest.raises(TypeError, match="expected a Policy .* or an int budget, got"):
            as_policy(bad)
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        as_policy(0)


@pytest.mark.parametrize(
    "make, exc, pattern",
    [
        (lambda: TopK(0), ValueError, r"r must be an int >= 1, got 0"),
        (lambda: TopK(-3), ValueError, r"r must be an int >= 1"),
        (lambda: TopK(2.0), TypeError, r"r must be an int"),
        (lambda: TopFraction(0.0), ValueError, r"f must be a real number in \(0, 1\], got 0.0"),
        (lambda: TopFraction(1.5), ValueError, r"f must be a real number in \(0, 1\]"),
        (lambda: TopFraction("a"), TypeError, r"f must be a real number"),
        (lambda: Threshold(-0.1), ValueError, r"tau must be a finite real number >= 0, got -0.1"),
        (lambda: Threshold(float("nan")), ValueError, r"tau must be"),
        (lambda: Threshold(1.0, relative="yes"), TypeError, r"relative must be a bool"),
        (lambda: FixedCapacityThreshold(-1.0, 3), ValueError, r"tau must be"),
        (lambda: FixedCapacityThreshold(1.0, 0), ValueError, r"capacity must be an int >= 1"),
    ],
)
def test_constructor_errors(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_setter_validates():
    p = TopK(3)
    with pytest.raises(ValueError, match="r must be"):
        p.r = 0
    assert p.r == 3
    t = Threshold(0.5)
    with pytest.raises(ValueError, match="tau must be"):
        t.tau = -1


def test_select_errors():
    with pytest.raises(ValueError, match=r"r must be in \[1, N\] = \[1, 6\], got r=7 for N=6"):
        TopK(7).select(ERROR)
    with pytest.raises(ValueError, match=r"capacity must be in \[1, N\] = \[1, 6\], got capacity=8"):
        FixedCapacityThreshold(0.1, 8).select(ERROR)
    with pytest.raises(ValueError, match=r"error must be a \(B, N\) tensor"):
        TopK(1).select(ERROR[0])
    with pytest.raises(TypeError, match="error must be a floating point"):
        TopK(1).select(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="reference_norm is required"):
        Threshold(0.1, relative=True).select(ERROR)
    with pytest.raises(ValueError, match="reference_norm must have the shape of error"):
        Threshold(0.1, relative=True).select(ERROR, REF[:, :3])
    with pytest.raises(ValueError, match=r"forced must be a bool tensor of shape \(N,\) = \(6,\)"):
        TopK(1).select(ERROR, forced=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="forced must be a bool tensor"):
        TopK(1).select(ERROR, forced=torch.zeros(6))


def test_base_class_is_abstract():
    with pytest.raises(NotImplementedError):
        Policy().select(ERROR)
    assert math.isclose(TopFraction(0.5).f, 0.5)


def test_topk_compiles_fullgraph():
    policy = TopK(3)
    forced = torch.zeros(10, dtype=torch.bool)
    forced[0] = True

    def gate(c, p):
        err = (c - p).norm(dim=-1)
        sel = policy.select(err, forced=forced)
        gathered = c.gather(1, sel.index[..., None].expand(-1, -1, c.shape[-1]))
        return p.scatter(1, sel.index[..., None].expand(-1, -1, c.shape[-1]), gathered)

    torch.manual_seed(0)
    c, p = torch.randn(2, 10, 4), torch.randn(2, 10, 4)
    compiled = torch.compile(gate, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(c, p), gate(c, p))
