"""Property and golden tests of the information criteria in ``distgraft.graft.entropy``.

The golden tests compare against a short, literal re-implementation of the authors' entropy
(see ``reference_entropy``), written here from the formula in the spec, not from their code.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from distgraft.graft.entropy import (
    entropy_from_counts,
    filter_entropies,
    filter_l1,
    invalid_filters,
    layer_entropies,
    layer_l1,
)

SETTINGS = settings(max_examples=50, deadline=None)

BINS = st.integers(min_value=2, max_value=64)

# Magnitudes from 2**-66 (~1e-20) up: far enough from float32's smallest and largest numbers that a
# layer's width (max - min) and bins / width stay finite.  The edges of the float range are
# covered by the explicit tests at the end of the file.
_MAG = st.floats(min_value=2.0**-66, max_value=1e6, width=32)
_VALUE = st.one_of(st.just(0.0), _MAG, _MAG.map(lambda x: -x))


@st.composite
def shapes(draw, max_numel: int = 256) -> tuple[int, ...]:
    dims = draw(st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=4))
    while math.prod(dims) > max_numel:
        dims[dims.index(max(dims))] //= 2
    return tuple(dims)


@st.composite
def tensors(draw, max_numel: int = 256) -> torch.Tensor:
    """float32 tensors: arbitrary values (ties, signs, scales), integer grids, or Gaussian."""
    shape = draw(shapes(max_numel))
    n = math.prod(shape)
    kind = draw(st.sampled_from(["values", "grid", "normal"]))
    if kind == "values":
        vals = draw(st.lists(_VALUE, min_size=n, max_size=n))
        return torch.tensor(vals, dtype=torch.float32).reshape(shape)
    if kind == "grid":  # few distinct values, many of them exactly on bin edges
        ints = draw(st.lists(st.integers(-5, 5), min_size=n, max_size=n))
        scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 7.5, 1e3]))
        return (torch.tensor(ints, dtype=torch.float32) * scale).reshape(shape)
    return normal_tensor(draw, shape)


def normal_tensor(draw, shape: tuple[int, ...]) -> torch.Tensor:
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-4, 0.05, 1.0, 30.0]))
    offset = draw(st.sampled_from([0.0, -2.0, 0.5]))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale + offset


@st.composite
def weights(draw, max_numel: int = 512) -> torch.Tensor:
    """Conv/linear-like weights of 1 to 4 dims (dim 0 = filters)."""
    return draw(tensors(max_numel))


def eta(p: float) -> float:
    """-p ln p with 0 ln 0 = 0."""
    return -p * math.log(p) if p > 0 else 0.0


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(t=tensors(), bins=BINS)
def test_entropy_within_zero_and_log_bins(t: torch.Tensor, bins: int) -> None:
    h = layer_entropies([t], bins)
    assert h.shape == (1,) and h.dtype == torch.float32
    assert 0.0 <= h.item() <= math.log(bins) + 1e-6
    hf = filter_entropies(t.reshape(t.shape[0], -1), bins)
    assert hf.shape == (t.shape[0],)
    assert bool((hf >= 0).all()) and bool((hf <= math.log(bins) + 1e-6).all())


@SETTINGS
@given(t=tensors(), bins=BINS, seed=st.integers(0, 2**31 - 1))
def test_entropy_invariant_to_permutation(t: torch.Tensor, bins: int, seed: int) -> None:
    perm = torch.randperm(t.numel(), generator=torch.Generator().manual_seed(seed))
    shuffled = t.reshape(-1)[perm].reshape(t.shape)
    # Same multiset of values -> the same counts -> bitwise the same entropy.
    assert torch.equal(layer_entropies([t], bins), layer_entropies([shuffled], bins))
    # The layer entropy does not see the shape either.
    assert torch.equal(layer_entropies([t], bins), layer_entropies([t.reshape(-1)], bins))


@SETTINGS
@given(value=_VALUE, shape=shapes(), bins=BINS)
def test_constant_tensor_has_zero_entropy(value: float, shape: tuple[int, ...], bins: int) -> None:
    t = torch.full(shape, value)
    assert layer_entropies([t], bins).tolist() == [0.0]
    assert filter_entropies(t.reshape(shape[0], -1), bins).tolist() == [0.0] * shape[0]


@pytest.mark.parametrize("value", [0.0, -3.5, 1e-20, 7e5])
def test_single_element_has_zero_entropy(value: float) -> None:
    for t in (torch.tensor([value]), torch.tensor(value), torch.tensor([[[[value]]]])):
        assert layer_entropies([t]).tolist() == [0.0]
    assert filter_entropies(torch.tensor([[value]])).tolist() == [0.0]
    assert filter_entropies(torch.tensor([value, value + 1])).tolist() == [0.0, 0.0]


@SETTINGS
@given(t=tensors(), pos=st.integers(0, 10**6), bad=st.sampled_from(["nan", "inf", "-inf"]))
def test_non_finite_input_raises_clear_error(t: torch.Tensor, pos: int, bad: str) -> None:
    flat = t.reshape(-1).clone()
    flat[pos % flat.numel()] = float(bad)
    broken = flat.reshape(t.shape)
    good = torch.ones(3)
    with pytest.raises(ValueError, match=r"layers \[1\] contain NaN or Inf"):
        layer_entropies([good, broken, good])
    with pytest.raises(ValueError, match="NaN or Inf"):
        filter_entropies(broken.reshape(t.shape[0], -1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer_l1([broken])
    with pytest.raises(ValueError, match="NaN or Inf"):
        filter_l1(broken.reshape(t.shape[0], -1))


@SETTINGS
@given(ts=st.lists(tensors(max_numel=128), min_size=1, max_size=6), bins=BINS)
def test_batched_layers_equal_each_layer_alone(ts: list[torch.Tensor], bins: int) -> None:
    batched = layer_entropies(ts, bins)
    alone = torch.cat([layer_entropies([t], bins) for t in ts])
    assert torch.equal(batched, alone)


@SETTINGS
@given(w=weights(), bins=BINS)
def test_filter_entropies_equal_layer_entropies_of_each_filter(w: torch.Tensor, bins: int) -> None:
    per_filter = filter_entropies(w, bins)
    one_by_one = layer_entropies(list(w.reshape(w.shape[0], -1).unbind(0)), bins)
    assert torch.equal(per_filter, one_by_one)


def test_empty_and_invalid_arguments() -> None:
    assert layer_entropies([]).shape == (0,)
    assert layer_l1([]).shape == (0,)
    with pytest.raises(ValueError, match="bins"):
        layer_entropies([torch.ones(3)], bins=1)
    with pytest.raises(ValueError, match="bins"):
        filter_entropies(torch.ones(2, 3), bins=0)
    with pytest.raises(ValueError, match="empty"):
        layer_entropies([torch.ones(3), torch.ones(0)])


@SETTINGS
@given(counts=st.lists(st.integers(0, 1000), min_size=2, max_size=64))
def test_entropy_from_counts(counts: list[int]) -> None:
    total = sum(counts)
    expected = sum(eta(c / total) for c in counts) if total else 0.0
    got = entropy_from_counts(torch.tensor(counts)).item()
    assert got == pytest.approx(expected, abs=1e-12)
    assert math.copysign(1.0, got) == 1.0  # never -0.0


# ---------------------------------------------------------------------------------- L1

_K = st.one_of(
    st.just(0.0),
    st.floats(min_value=1e-3, max_value=1e3),
    st.floats(min_value=-1e3, max_value=-1e-3),
)


@SETTINGS
@given(w=weights(), k=_K)
def test_l1_scales_linearly(w: torch.Tensor, k: float) -> None:
    w = w.clamp(-1e4, 1e4)  # keep k * w far from float32 overflow
    scaled = w * k
    # k * w rounds each element (relative 2**-24), and the float32 sums round too.
    torch.testing.assert_close(layer_l1([scaled]), abs(k) * layer_l1([w]), rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(filter_l1(scaled), abs(k) * filter_l1(w), rtol=1e-5, atol=1e-30)


@SETTINGS
@given(w=weights())
def test_l1_definitions(w: torch.Tensor) -> None:
    w2 = w.reshape(w.shape[0], -1)
    # layer: mean |w| (size-independent); filter: sum |w| over the filter (the L1 norm).
    torch.testing.assert_close(layer_l1([w]), w.abs().double().mean().float()[None])
    torch.testing.assert_close(filter_l1(w), w2.abs().double().sum(1).float())


def test_invalid_filters_counts() -> None:
    w = torch.ones(4, 2, 3, 3)
    w[0] *= 1e-4  # L1 = 1.8e-3
    w[1] *= 1e-3  # L1 = 1.8e-2
    w[2] *= 0.1  # L1 = 1.8
    assert invalid_filters([w, torch.ones(3, 5)], [0.01, 0.1, 10.0]) == [1, 2, 6]
    assert invalid_filters([], [0.1]) == [0]


# ---------------------------------------------------------------- golden: authors' entropy


def reference_entropy(w: torch.Tensor, bins: int = 10) -> tuple[float, list[int]]:
    """The authors' whole-layer entropy, literally: half-open bins [lo + k*step, lo + (k+1)*step).

    Returns the entropy and the bin counts. The maximum lies on the right edge of the last
    bin and is therefore counted in no bin; p_k = count_k / numel still divides by all
    elements, so the probabilities sum to (numel - 1) / numel.
    """
    x = w.reshape(-1)
    lo = x.min().item()
    hi = x.max().item()
    step = (hi - lo) / bins
    counts = []
    for k in range(bins):
        counts.append(int(((x >= lo + k * step) & (x < lo + (k + 1) * step)).sum().item()))
    n = x.numel()
    return sum(eta(c / n) for c in counts), counts


def near_interior_edges(w: torch.Tensor, bins: int) -> int:
    """How many values lie within rounding distance of an inner bin edge.

    Such values may land on either side in either implementation, and both are right: the
    reference rounds the edge lo + k*step to float32 (an error of up to half an ulp of
    max |x|, large when the values sit far from 0), distgraft rounds
    (x - lo) * (bins / (hi - lo)) (a relative error of a few 2**-24 of the bin index).
    """
    x = w.reshape(-1).double()
    lo, hi = x.min(), x.max()
    step = (hi - lo) / bins
    u = (x - lo) / step
    dist = (u - u.round()).abs() * step
    tol = 4 * 2.0**-24 * x.abs().max() + 1e-4 * step
    inner = (u > 0.5) & (u < bins - 0.5)
    return int((dist < tol)[inner].sum())


@st.composite
def gaussian_layers(draw) -> torch.Tensor:
    return normal_tensor(draw, draw(shapes(max_numel=2048).filter(lambda s: math.prod(s) >= 2)))


@SETTINGS
@given(w=gaussian_layers(), bins=st.one_of(st.just(10), BINS))
def test_golden_entropy_against_reference(w: torch.Tensor, bins: int) -> None:
    assume(near_interior_edges(w, bins) == 0)
    n = w.numel()
    ours = layer_entropies([w], bins).item()
    ref, counts = reference_entropy(w, bins)
    missing = n - sum(counts)  # the maximum (ties of it, or 0 where lo + B*step rounds up)
    assert missing == int((w == w.max()).sum()) or missing == 0

    # Tolerance: the two differ only in where the `missing` elements go, and only bin B-1
    # changes: |H_ours - H_ref| = |eta(p + m/n) - eta(p)| with eta(p) = -p ln p. eta is
    # concave, so the change over an interval of length d is largest at p = 0 and at most
    # eta(d) for d <= 1/2.  For one missing element (a unique max) that is ln(n) / n.
    d = missing / n
    assert d <= 0.5
    bound = eta(d)
    assert abs(ref - ours) <= bound + 1e-6

    # Putting the missing mass into the reference's last bin reproduces distgraft exactly.
    counts[-1] += missing
    fixed = sum(eta(c / n) for c in counts)
    assert ours == pytest.approx(fixed, abs=1e-6)


def test_golden_entropy_worked_example() -> None:
    # B = 10 on [0, 1]: bins of width 0.1.
    w = torch.tensor([0.0, 0.05, 0.15, 0.95, 1.0])
    ref, counts = reference_entropy(w)
    assert counts == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]  # the max (1.0) is in no bin
    assert ref == pytest.approx(2 * eta(0.2) + eta(0.4))  # 1.0103; p sums to 0.8
    # distgraft counts 1.0 in the last bin: [2, 1, 0, ..., 0, 2].
    assert layer_entropies([w]).item() == pytest.approx(2 * eta(0.4) + eta(0.2), abs=1e-6)
    assert abs(ref - layer_entropies([w]).item()) <= math.log(5) / 5


def test_golden_entropy_on_trained_like_layers() -> None:
    """Whole conv layers of the size in ResNets, kaiming-like and heavy tailed."""
    gen = torch.Generator().manual_seed(0)
    layers = [
        torch.randn(16, 3, 3, 3, generator=gen) * 0.27,
        torch.randn(64, 64, 3, 3, generator=gen) * 0.06,
        torch.distributions.StudentT(3.0).sample((32, 16, 3, 3)) * 0.1,
    ]
    ours = layer_entropies(layers)
    for w, h in zip(layers, ours.tolist(), strict=True):
        ref, counts = reference_entropy(w)
        n = w.numel()
        # A value within an ulp of an inner edge may fall on either side in either code
        # (1 of the 36864 values of the second layer does); moving one value between two
        # bins changes two terms of H by at most eta(1/n) each.
        edge = near_interior_edges(w, 10)
        slack = 2 * edge * eta(1 / n) + 1e-6
        assert abs(ref - h) <= math.log(n) / n + slack
        counts[-1] += n - sum(counts)
        assert h == pytest.approx(sum(eta(c / n) for c in counts), abs=slack)


# ------------------------------------------- edges of the float range, dtypes and layouts


@pytest.mark.parametrize("fn", [layer_entropies, lambda ts: filter_entropies(ts[0][None])])
def test_tiny_but_nonzero_range_does_not_crash(fn) -> None:
    t = torch.tensor([0.0, 1e-39, 2e-39])  # finite, distinct, subnormal
    h = fn([t])
    assert 0.0 <= h.item() <= math.log(10)


def test_huge_range_does_not_crash() -> None:
    t = torch.tensor([-3e38, 0.0, 3e38])
    assert 0.0 <= layer_entropies([t]).item() <= math.log(10)


def test_float64_layers_are_binned_in_float64() -> None:
    t = torch.tensor([1.0, 1.0 + 1e-12, 1.0 + 2e-12], dtype=torch.float64)
    # bins 0, 5 and 9 of 10: three equally likely bins (all one value in float32).
    assert layer_entropies([t]).item() == pytest.approx(math.log(3), abs=1e-6)


@SETTINGS
@given(
    w=weights(),
    bins=BINS,
    layout=st.sampled_from(["channels_last", "offset_view", "transposed", "sliced"]),
)
def test_entropy_ignores_memory_layout(w: torch.Tensor, bins: int, layout: str) -> None:
    """Dense non-contiguous layouts (read straight from storage) and views give the same."""
    w4 = w.reshape(w.shape[0], -1, 1, 1) if w.dim() != 4 else w
    if layout == "channels_last":
        other = w4.contiguous(memory_format=torch.channels_last)
    elif layout == "offset_view":  # like a FlatState view: at an offset in a bigger buffer
        buf = torch.full((w4.numel() + 7,), 123.0)
        buf[5 : 5 + w4.numel()] = w4.reshape(-1)
        other = buf.as_strided(w4.shape, w4.contiguous().stride(), 5)
    elif layout == "transposed":
        other = w4.transpose(0, 1).contiguous().transpose(0, 1)
    else:  # a strided slice of a bigger tensor, not dense
        big = torch.full((w4.shape[0] * 2, *w4.shape[1:]), -77.0)
        big[::2] = w4
        other = big[::2]
    assert torch.equal(other, w4)
    assert torch.equal(layer_entropies([other], bins), layer_entropies([w4], bins))
    assert torch.equal(filter_entropies(other, bins), filter_entropies(w4, bins))


def test_float64_filter_entropies_match_layer_entropies() -> None:
    w = torch.tensor([[1.0, 1.0 + 1e-12, 1.0 + 2e-12]], dtype=torch.float64)
    assert torch.equal(filter_entropies(w), layer_entropies([w[0]]))


def test_float16_layer_with_small_range() -> None:
    w = (torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0)) * 1e-5).half()
    torch.testing.assert_close(layer_entropies([w]), layer_entropies([w.float()]))


def test_bfloat16_layer_binned_like_its_float32_values() -> None:
    w = torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(0)).bfloat16()
    torch.testing.assert_close(layer_entropies([w]), layer_entropies([w.float()]))


def test_float64_layer_beyond_float32_range() -> None:
    t = torch.tensor([0.0, 1e300], dtype=torch.float64)
    assert layer_entropies([t]).item() == pytest.approx(math.log(2))


def test_filter_tail_counts_and_percentiles_match_a_literal_computation() -> None:
    from distgraft.graft.entropy import filter_tail

    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(40, 3, 3, 3, generator=g) * 0.02, torch.randn(60, 4, generator=g)]
    l1 = sorted(float(w[i].abs().sum()) for w in weights for i in range(w.shape[0]))
    got = filter_tail(weights)
    assert got["filters"] == 100 and got["min"] == pytest.approx(l1[0])
    for t in (0.01, 0.1, 1.0):
        assert got[f"below_{t:g}"] == sum(v < t for v in l1)
    # torch.quantile's linear interpolation: position q * (n - 1)
    for key, q in (("p1", 0.01), ("p5", 0.05)):
        pos = q * 99
        lo = int(pos)
        assert got[key] == pytest.approx(l1[lo] + (pos - lo) * (l1[lo + 1] - l1[lo]))
    assert filter_tail([]) == {}
