"""Force Regularization (Wen et al. 2017): the batched force is the paper's pairwise sum, it
gathers filter directions without touching their norms, and it lowers the rank a low-rank
approximation keeps.

The batched force is compared with a literal double loop in float64 (rtol 1e-9, atol
1e-12: the two differ only in the order of additions).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from distgraft.compress.force import (
    KINDS,
    add_force_to_grads_,
    force_layers,
    force_term,
    rank_at_energy,
)


def literal(weight: torch.Tensor, kind: str, same: float = 1e-12) -> torch.Tensor:
    """Delta W_i = |W_i| sum_j (f_ji - (f_ji . w_i) w_i), one pair at a time; pairs of
    directions closer than ``same`` add nothing."""
    W = weight.reshape(weight.shape[0], -1)
    power = KINDS.index(kind)
    out = torch.zeros_like(W)
    for i in range(W.shape[0]):
        ni = W[i].norm()
        if ni == 0:
            continue
        wi = W[i] / ni
        for j in range(W.shape[0]):
            nj = W[j].norm()
            wj = W[j] / nj if nj > 0 else torch.zeros_like(wi)
            d = (wj - wi).norm()
            if d <= same:
                continue
            f = (wj - wi) / d**power
            out[i] += ni * (f - (f @ wi) * wi)
    return out.reshape(weight.shape)


def layers() -> list[torch.Tensor]:
    torch.manual_seed(0)
    conv = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    conv[4] = 2.5 * conv[1]  # same direction as filter 1: d = 0, that pair adds nothing
    conv[5] = 0.0  # a dead filter: no direction, no force on it
    return [conv, torch.randn(5, 7, dtype=torch.float64)]


@pytest.mark.parametrize("kind", KINDS)
def test_batched_force_equals_the_pairwise_sum(kind: str) -> None:
    for weight in layers():
        got = force_term(weight, kind)
        assert got.shape == weight.shape and got.dtype == weight.dtype
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, literal(weight, kind), rtol=1e-9, atol=1e-12)
    assert not force_term(layers()[0], kind)[5].any()


def test_float32_and_unknown_kind() -> None:
    w = torch.randn(8, 4, 3, 3)
    assert force_term(w).dtype == torch.float32
    torch.testing.assert_close(force_term(w), force_term(w.double()).float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="allowed degradation, constant, linear, gravity"):
        force_term(w, "magnetic")


def with_twin(offset: float, seed: int = 0) -> torch.Tensor:
    """A float64 layer whose filter 3 is 2.5 x filter 1, turned by about ``offset`` (radians)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64, generator=g)
    turn = torch.randn(w[1].shape, dtype=torch.float64, generator=g)
    w[3] = 2.5 * (w[1] + offset * w[1].norm() * turn / turn.norm())
    return w


EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [0.0, 1e-10, 1e-6, 1e-2])
def test_close_filters_at_the_resolution_of_the_dtype(kind: str, offset: float) -> None:
    """Twin filters (the same direction, other norms) are one point: float32 cannot tell
    directions closer than sqrt(eps) apart, so its force leaves such pairs out, and equals
    the float64 force with those pairs left out; float64 resolves them down to its own
    sqrt(eps). Every force stays within the bound a pair at the tolerance gives."""
    w = with_twin(offset)
    f64, f32 = force_term(w, kind), force_term(w.float(), kind)
    assert torch.isfinite(f32).all() and torch.isfinite(f64).all()
    scale = float(literal(w, kind, same=EPS32**0.5).abs().max())
    torch.testing.assert_close(f32.double(), literal(w, kind, same=EPS32**0.5), rtol=1e-3,
                               atol=1e-4 * scale)  # fmt: skip
    torch.testing.assert_close(f64, literal(w, kind, same=EPS64**0.5), rtol=1e-6, atol=1e-9)
    for force, eps in ((f32, EPS32), (f64, EPS64)):
        power = KINDS.index(kind)
        pair = max(2.0 ** (1 - power), eps ** (0.5 * (1 - power)))  # largest |w_j - w_i| s(d)
        norms = w.reshape(6, -1).norm(dim=1)
        bound = 5 * norms * pair  # five pairs pull on each filter
        assert (force.double().reshape(6, -1).norm(dim=1) <= bound * (1 + 1e-3)).all()


def mean_cosine(w: torch.Tensor) -> float:
    u = F.normalize(w.reshape(w.shape[0], -1), dim=1)
    n = u.shape[0]
    return float(((u @ u.T).sum() - n) / (n * (n - 1)))


def test_the_force_alone_gathers_directions_and_keeps_norms() -> None:
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(16, 4, 3, 3))
    assert abs(mean_cosine(w.detach())) < 0.2
    norms = w.detach().reshape(16, -1).norm(dim=1)
    opt = torch.optim.SGD([w], lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        add_force_to_grads_([w], decay=1.0)  # no data loss: grad = -force
        opt.step()
    assert mean_cosine(w.detach()) > 0.99
    # the force is tangent to each filter's sphere: norms change only to second order
    after = w.detach().reshape(16, -1).norm(dim=1)
    assert ((after - norms) / norms).abs().max() < 0.1
    small = force_term(w.detach()) * 1e-4
    moved = (w.detach() + small).reshape(16, -1).norm(dim=1)
    assert ((moved - after) / after).abs().max() < 1e-6


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


def train_digits(decay: float) -> tuple[int, float, float]:
    """(rank at 95% energy of the conv, first loss, last loss) after 150 SGD steps."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        add_force_to_grads_([model.conv.weight], decay)
        opt.step()
        losses.append(loss.item())
    return rank_at_energy(model.conv.weight, 0.95), sum(losses[:10]), sum(losses[-10:])


def test_the_force_lowers_the_rank_and_training_still_learns() -> None:
    plain_rank, _, plain_last = train_digits(0.0)
    forced_rank, first, last = train_digits(0.005)
    assert forced_rank <= plain_rank - 2, (forced_rank, plain_rank)  # measured: 2 vs 6
    assert last < 0.25 * first  # measured: 3.2 vs 22.4 (plain: 1.3)


def test_force_layers_and_grads() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(),
                          nn.Linear(8, 4))  # fmt: skip
    assert [n for n, _ in force_layers(model)] == ["0.weight"]
    assert [n for n, _ in force_layers(model, "conv+linear")] == ["0.weight", "3.weight"]
    with pytest.raises(ValueError, match="allowed conv, conv\\+linear"):
        force_layers(model, "all")
    w = model[0].weight
    assert w.grad is None
    add_force_to_grads_([w], 0.1)
    torch.testing.assert_close(w.grad, -0.1 * force_term(w))
    before = w.grad.clone()
    add_force_to_grads_([w], 0.0)
    assert torch.equal(w.grad, before)


def test_rank_at_energy() -> None:
    torch.manual_seed(0)
    two = torch.randn(10, 2) @ torch.randn(2, 27)
    assert rank_at_energy(two, 0.999) == 2
    assert rank_at_energy(torch.randn(6, 27), 1.0) == 6
    assert rank_at_energy(torch.eye(8), 0.5) == 4
    assert rank_at_energy(torch.zeros(4, 9)) == 0
    with pytest.raises(ValueError, match="outside"):
        rank_at_energy(two, 0.0)
