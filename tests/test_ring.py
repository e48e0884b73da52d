"""Ring exchange and graft step on real processes (gloo, CPU), checked against one process.

Every rank of a task builds its network's small conv net (seeded per network; replicas of
a network share the seed), runs two train-mode forward passes so BatchNorm's running
statistics are not trivial, grafts once, and returns its state before and after the graft.
The test then recomputes the same ring graft in this process from the returned pre-graft
states -- for network k: h_k = criterion(k), h_p = criterion(k - 1 mod N),
alpha = coefficient(h_k, h_p), and member tensor t of layer i becomes
t_k.lerp(t_p, 1 - alpha_i) (per filter row at filter level) -- and requires bitwise
equality (float32 wire).

The workers come from one pool shared by the session (``dist_helpers``), so most tests pay
only for a fresh process group, not for starting Python and importing torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_helpers import Outcome, graft_once_then_shorten, shared_pool, to_numpy, values
from torch import Tensor, nn

from distgraft.comm.dist import init_distributed
from distgraft.comm.ring import (
    PeerError,
    SignatureError,
    flatten_by_dtype,
    ring_exchange,
    unflatten_by_dtype,
)
from distgraft.config import GraftConfig
from distgraft.graft.flat import FlatState
from distgraft.graft.math import coefficient, criterion, graft_plan
from distgraft.graft.step import Grafter

TIMEOUT_S = 60.0  # process-group timeout of the healthy tasks: generous, still bounded
SHORT_TIMEOUT_S = 5.0  # the missing-peer tests
EPOCH = 3

pytestmark = pytest.mark.timeout(120)


# -- the model and what each worker does -------------------------------------------------
def make_net(seed: int, variant: str | None = None) -> nn.Module:
    """Conv-BN-conv-BN-linear; ``variant`` "extra" adds a layer, "shape" narrows conv 3."""
    torch.manual_seed(seed)
    c2 = 12 if variant == "shape" else 16
    layers: list[nn.Module] = [
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, c2, 3),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c2, 10),
    ]
    if variant == "extra":
        layers.append(nn.Linear(10, 10))
    model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():  # two batches: BN running stats move away from 0 / 1
        for _ in range(2):
            model(torch.randn(4, 3, 8, 8, generator=gen))
    return model


def seed_of(network: int) -> int:
    return 1000 + 17 * network


def _graft_once(info, cfg: GraftConfig, variant: str | None = None) -> dict:
    model = make_net(seed_of(info.network), variant)
    pre = to_numpy(model.state_dict())
    record = Grafter(model, info, cfg, TIMEOUT_S).step(EPOCH)
    return {"pre": pre, "post": to_numpy(model.state_dict()), "record": asdict(record)}


def graft_task(rank: int, world: int, networks: int, cfgs: list[dict]) -> dict:
    info = init_distributed(networks, "gloo", TIMEOUT_S)
    runs = [_graft_once(info, GraftConfig(networks=networks, **cfg)) for cfg in cfgs]
    return {"network": info.network, "replica": info.replica, "runs": runs}


def ring_tensors(rank: int) -> list[Tensor]:
    """Mixed dtypes and shapes, different on every rank."""
    base = 1000 * (rank + 1)
    return [
        torch.arange(12, dtype=torch.float32).reshape(3, 4) + base + 0.25,
        torch.arange(5, dtype=torch.float64) / 3 + base,
        torch.arange(6, dtype=torch.int64).reshape(2, 3) * 7 + base,
        torch.full((2, 2, 2), base + 0.5, dtype=torch.float32),
        torch.tensor(base + 1 / 7, dtype=torch.float64),
        torch.tensor([base, -base], dtype=torch.int64),
    ]


def ring_task(rank: int, world: int) -> list[np.ndarray]:
    init_distributed(0, "gloo", TIMEOUT_S)
    got = ring_exchange(ring_tensors(rank), timeout_s=TIMEOUT_S)
    return [t.numpy().copy() for t in got]


def flat_state_of(rank: int) -> FlatState:
    """A channels_last model's graftable state as FlatState views (the Grafter's case)."""
    model = make_net(seed_of(rank)).to(memory_format=torch.channels_last)
    return FlatState(model, graft_plan(model))


def flat_ring_task(rank: int, world: int) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    init_distributed(0, "gloo", TIMEOUT_S)
    got = ring_exchange(list(flat_state_of(rank).tensors().values()), timeout_s=TIMEOUT_S)
    return [(t.numpy().copy(), t.stride()) for t in got]


def mismatch_task(rank: int, world: int, odd_rank: int, variant: str) -> tuple:
    info = init_distributed(0, "gloo", TIMEOUT_S)
    model = make_net(seed_of(info.network), variant if rank == odd_rank else None)
    grafter = Grafter(model, info, GraftConfig(), TIMEOUT_S)
    start = time.perf_counter()
    try:
        grafter.step(EPOCH)
    except SignatureError as e:
        return "SignatureError", str(e), time.perf_counter() - start
    return "no error", "", time.perf_counter() - start


def missing_peer_task(rank: int, world: int, absent: int, how: str, folder: str) -> tuple:
    """Epoch 1 grafts normally; at epoch 2 rank ``absent`` sleeps or exits."""
    info = init_distributed(0, "gloo", TIMEOUT_S)
    grafter = Grafter(make_net(seed_of(info.network)), info, GraftConfig(), TIMEOUT_S)
    graft_once_then_shorten(grafter, 1, SHORT_TIMEOUT_S)
    if rank == absent:
        if how == "exit":
            os._exit(0)
        # never reach the graft; wake up once the others have given up (bounded)
        others = [Path(folder, f"done-{r}") for r in range(world) if r != rank]
        end = time.monotonic() + 60
        while not all(p.exists() for p in others) and time.monotonic() < end:
            time.sleep(0.1)
        return "absent", "", 0.0
    start = time.perf_counter()
    try:
        grafter.step(2)
        result = ("no error", "", time.perf_counter() - start)
    except PeerError as e:
        result = ("PeerError", str(e), time.perf_counter() - start)
    Path(folder, f"done-{rank}").touch()
    return result


def nan_task(rank: int, world: int, bad_network: int, bad_key: str) -> dict:
    info = init_distributed(0, "gloo", TIMEOUT_S)
    model = make_net(seed_of(info.network))
    grafter = Grafter(model, info, GraftConfig(), TIMEOUT_S)
    if info.network == bad_network:
        with torch.no_grad():
            model.state_dict()[bad_key].view(-1)[1] = float("nan")
    pre = to_numpy(model.state_dict())
    record = grafter.step(EPOCH)
    return {"pre": pre, "post": to_numpy(model.state_dict()), "record": asdict(record)}


# -- the single-process reference ---------------------------------------------------------
def tensors(state: dict[str, np.ndarray]) -> dict[str, Tensor]:
    return {k: torch.from_numpy(v) for k, v in state.items()}


def reference_graft(
    pre: list[dict[str, Tensor]], cfg: GraftConfig, keep_own: frozenset[str] = frozenset()
) -> list[tuple[dict[str, Tensor], Tensor]]:
    """The ring graft of every network, computed in one process: (state, alpha) per network.

    Layers named in ``keep_own`` keep network k's own values (alpha 1), as the graft does
    when the peer's layer is not finite; the criterion sees non-finite weights as 0.
    """
    plan = graft_plan(make_net(0))
    n = len(pre)

    def info(state: dict[str, Tensor]) -> Tensor:
        weights = [
            torch.nan_to_num(state[w], nan=0.0, posinf=0.0, neginf=0.0) for w in plan.weights
        ]
        return criterion(weights, cfg.criterion, cfg.level, cfg.bins)

    out = []
    for k in range(n):
        own, peer = pre[k], pre[(k - 1) % n]
        alpha = coefficient(info(own), info(peer), cfg.a, cfg.c)
        post = {key: t.clone() for key, t in own.items()}
        start = 0
        for layer in plan.layers:
            if cfg.level == "layer":
                a = alpha[plan.layers.index(layer)]
            else:
                a = alpha[start : start + layer.filters]
                start += layer.filters
            if layer.name in keep_own:
                continue
            for key in layer.members:
                if cfg.level == "layer":
                    post[key] = own[key].lerp(peer[key], 1 - a)
                else:
                    f = layer.filters
                    rows = own[key].reshape(f, -1).lerp(peer[key].reshape(f, -1), (1 - a)[:, None])
                    post[key] = rows.reshape(own[key].shape)
        out.append((post, alpha))
    return out


def by_network(outs: list[dict], run: int) -> list[dict[str, Tensor]]:
    """Pre-graft state of each network (replica 0), checking the replicas agree."""
    pre: dict[int, dict[str, Tensor]] = {}
    for o in outs:
        state = tensors(o["runs"][run]["pre"])
        if o["network"] in pre:
            for key, t in state.items():
                assert torch.equal(t, pre[o["network"]][key]), (o["network"], key)
        else:
            pre[o["network"]] = state
    return [pre[k] for k in sorted(pre)]


def assert_state_equal(got: dict[str, Tensor], want: dict[str, Tensor], where: str) -> None:
    assert got.keys() == want.keys(), where
    for key in want:
        g, w = got[key], want[key]
        assert g.dtype == w.dtype and g.shape == w.shape, (where, key)
        if not torch.equal(g, w):
            diff = (g.double() - w.double()).abs().max().item()
            raise AssertionError(f"{where}: {key} differs from the reference (max |diff| {diff})")


# -- ring_exchange ------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_exchange_returns_predecessor_tensors(world: int) -> None:
    got = values(shared_pool(4).run(ring_task, world))
    for rank, received in enumerate(got):
        want = ring_tensors((rank - 1) % world)  # world 1: its own tensors
        assert len(received) == len(want)
        for r, w in zip(received, want, strict=True):
            r = torch.from_numpy(r)
            assert r.dtype == w.dtype and r.shape == w.shape
            assert torch.equal(r, w), (rank, r, w)


def test_flat_state_views_are_sent_without_a_copy() -> None:
    """Views that tile one buffer per dtype are packed as that buffer itself (no torch.cat);
    anything else is copied, and both unpack to the originals, strides included."""
    state = flat_state_of(0)
    views = list(state.tensors().values())
    packed = flatten_by_dtype(views)
    assert packed.keys() == state.buffers.keys()
    for dtype, buf in packed.items():
        assert (
            buf.data_ptr() == state.buffers[dtype].data_ptr()
            and buf.numel() == state.buffers[dtype].numel()
        )
    mixed = ring_tensors(0) + [views[0]]  # separate tensors: copied
    assert flatten_by_dtype(mixed)[torch.float32].data_ptr() != views[0].data_ptr()
    for like in (views, mixed):
        copies = {d: b.clone() for d, b in flatten_by_dtype(like).items()}
        for a, b in zip(like, unflatten_by_dtype(copies, like), strict=True):
            assert torch.equal(a, b) and a.stride() == b.stride() and a.dtype == b.dtype


@pytest.mark.parametrize("world", [2, 3])
def test_ring_exchange_of_flat_state_views(world: int) -> None:
    got = values(shared_pool(4).run(flat_ring_task, world))
    for rank, received in enumerate(got):
        want = list(flat_state_of((rank - 1) % world).tensors().values())
        for (array, stride), w in zip(received, want, strict=True):
            assert stride == w.stride()
            assert torch.equal(torch.from_numpy(array), w.detach())


# -- the graft against the single-process reference ---------------------------------------
LAYER = {"level": "layer", "criterion": "entropy"}
FILTER = {"level": "filter", "criterion": "entropy"}
L1 = {"level": "layer", "criterion": "l1"}
L1_FILTER = {"level": "filter", "criterion": "l1"}


@pytest.mark.parametrize(
    ("world", "networks", "cfg"),
    [
        (1, 1, LAYER),
        (2, 2, LAYER),
        (3, 3, LAYER),
        (4, 4, LAYER),
        (4, 2, LAYER),  # 2 networks x 2 replicas
        (3, 3, FILTER),
        (4, 2, FILTER),
        (2, 2, L1),
        (2, 2, L1_FILTER),
    ],
    ids=lambda v: v["level"] + "-" + v["criterion"] if isinstance(v, dict) else str(v),
)
def test_graft_matches_single_process(world: int, networks: int, cfg: dict) -> None:
    outs = values(shared_pool(4).run(graft_task, world, networks, [cfg]))
    gcfg = GraftConfig(networks=networks, **cfg)
    pre = by_network(outs, 0)
    assert len(pre) == networks
    if networks > 1:  # the networks really differ, so the test is not trivial
        assert not torch.equal(pre[0]["0.weight"], pre[1]["0.weight"])
    ref = reference_graft(pre, gcfg)
    nbytes = 4 * sum(t.numel() for k, t in pre[0].items() if t.is_floating_point())
    for rank, o in enumerate(outs):
        k = o["network"]
        assert (k, o["replica"]) == divmod(rank, world // networks)
        want, alpha = ref[k]
        assert_state_equal(tensors(o["runs"][0]["post"]), want, f"rank {rank} (network {k})")
        rec = o["runs"][0]["record"]
        assert rec["network"] == k and rec["peer"] == (k - 1) % networks
        assert rec["epoch"] == EPOCH and rec["level"] == cfg["level"]
        assert rec["bytes"] == nbytes
        assert rec["warnings"] == []
        if cfg["level"] == "layer":
            assert rec["alpha"] == alpha.tolist()
        else:
            assert len(rec["alpha"]) == len(rec["layers"])
        if networks == 1:
            assert all(a == 0.5 for a in rec["alpha"])  # grafting with itself: no change


def test_bfloat16_wire_is_close_and_half_the_bytes() -> None:
    """bf16 rounds each peer value to 8 significant bits: |error| <= 2^-9 |peer|.

    The mixed value moves by at most (1 - alpha) * 2^-9 * |peer|; the test allows
    (1 - alpha) * 2^-8 * |peer| plus a few float32 ulps of the operands for the lerp itself.
    """
    outs = values(
        shared_pool(4).run(graft_task, 2, 2, [LAYER, {**LAYER, "wire_dtype": "bfloat16"}])
    )
    plan = graft_plan(make_net(0))
    pre = by_network(outs, 0)
    for o in outs:
        k = o["network"]
        f32, bf16 = (o["runs"][i] for i in (0, 1))
        assert f32["record"]["alpha"] == bf16["record"]["alpha"]  # criteria are not on the wire
        assert bf16["record"]["bytes"] * 2 == f32["record"]["bytes"]
        assert_state_equal(tensors(bf16["pre"]), tensors(f32["pre"]), "same start")
        alpha = f32["record"]["alpha"]
        exact, approx = tensors(f32["post"]), tensors(bf16["post"])
        own, peer = pre[k], pre[(k - 1) % 2]
        moved = False
        for i, layer in enumerate(plan.layers):
            for key in layer.members:
                err = (approx[key] - exact[key]).abs()
                ulps = 2.0**-22 * (own[key].abs() + peer[key].abs())
                bound = (1 - alpha[i]) * 2.0**-8 * peer[key].abs() + ulps
                assert bool((err <= bound).all()), (k, key, (err - bound).max().item())
                moved |= not torch.equal(approx[key], exact[key])
        assert moved, "bf16 wire gave bitwise the float32 result: was it used?"


# -- failures: a different model, a missing peer, a diverged peer -------------------------
@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("extra", ["'9.weight'", "only on rank 2"]),
        ("shape", ["'3.weight'", "[16, 8, 3, 3]", "[12, 8, 3, 3]"]),
    ],
)
def test_mismatched_model_fails_on_every_rank(variant: str, expected: list[str]) -> None:
    start = time.monotonic()
    got = values(shared_pool(4).run(mismatch_task, 3, 2, variant, deadline_s=60))
    assert time.monotonic() - start < 60
    for rank, (kind, message, seconds) in enumerate(got):
        assert kind == "SignatureError", (rank, kind)
        assert seconds < TIMEOUT_S
        assert "rank 0" in message and "rank 2" in message, message
        for text in expected:
            assert text in message, message


def _check_peer_errors(got: list[Outcome], absent: int, max_s: float) -> None:
    for o in got:
        if o.rank == absent:
            continue
        assert o.ok, o.error
        kind, message, seconds = o.value
        assert kind == "PeerError", (o.rank, kind)
        assert f"network {absent} (rank {absent}) did not reach" in message, message
        assert "epoch 3" in message, message
        assert seconds <= max_s, (o.rank, seconds)


def test_missing_peer_raises_peer_error_within_timeout(tmp_path: Path) -> None:
    got = shared_pool(4).run(missing_peer_task, 3, 1, "sleep", str(tmp_path), deadline_s=90)
    assert got[1].ok and got[1].value[0] == "absent", got[1].error
    _check_peer_errors(got, 1, SHORT_TIMEOUT_S + 15)  # slack: a loaded 2-core machine
    for o in got:
        if o.rank != 1:
            assert o.value[2] >= SHORT_TIMEOUT_S * 0.8, "gave up before the timeout"


def test_peer_that_exits_raises_peer_error(tmp_path: Path) -> None:
    got = shared_pool(4).run(missing_peer_task, 3, 1, "exit", str(tmp_path), deadline_s=90)
    assert got[1].exc_type == "WorkerExited", got[1]
    _check_peer_errors(got, 1, SHORT_TIMEOUT_S + 15)


def test_nan_peer_layer_is_not_grafted() -> None:
    """Network 0 has one NaN in conv '3': network 1 keeps its own layer '3' and grafts the
    rest; network 0 takes network 2's layer '3' instead of its own diverged one."""
    world, bad_key = 3, "3.weight"
    got = values(shared_pool(4).run(nan_task, world, 0, bad_key))
    pre = [tensors(o["pre"]) for o in got]
    assert bool(pre[0][bad_key].isnan().any())
    cfg = GraftConfig()
    plan = graft_plan(make_net(0))
    members = next(layer.members for layer in plan.layers if layer.name == "3")
    for k, o in enumerate(got):
        post = tensors(o["post"])
        assert all(bool(t.isfinite().all()) for t in post.values()), f"network {k} has NaN"
        warnings = " ".join(o["record"]["warnings"])
        if k == 1:  # successor of the diverged network
            want = reference_graft(pre, cfg, keep_own=frozenset({"3"}))[1][0]
            assert_state_equal(post, want, "network 1")
            for key in members:
                assert torch.equal(post[key], pre[1][key]), key
            assert "network 0" in warnings and "3" in warnings, warnings
        elif k == 2:  # its predecessor is healthy: a normal graft
            assert_state_equal(post, reference_graft(pre, cfg)[2][0], "network 2")
            assert warnings == ""
        else:  # the diverged network takes its predecessor's layer, grafts the rest
            want = reference_graft(pre, cfg)[0][0]
            for key in members:
                want[key] = pre[2][key]
            assert_state_equal(post, want, "network 0")
            assert "network 2" in warnings, warnings
