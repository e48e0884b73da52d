"""The graft step at an epoch boundary: criterion, exchange, coefficients, in-place mix.

``Grafter`` holds what lives across epochs (the graft plan, the flat views of the model
state, whether the peers' signatures were checked); ``graft_step`` is the one-call form.
The order of one external graft:

1. first graft only: all ranks compare model signatures (names, shapes, dtypes);
2. own criterion in one batched pass, all_gather of every rank's criterion vector;
3. ring exchange of the flat state (own pre-graft weights out, predecessor's in);
4. alpha from own and predecessor criterion; non-finite tensors are not mixed;
5. one fused lerp per dtype buffer, and a record for telemetry.

Each collective marks this rank's arrival in the store first, so that a lost peer is
named in the PeerError (see ``distgraft.comm.peers``).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from distgraft.comm.dist import DistInfo
from distgraft.comm.ring import (
    PendingExchange,
    check_signature,
    gather_criteria,
    post_exchange,
)
from distgraft.config import GraftConfig
from distgraft.graft.entropy import invalid_filters
from distgraft.graft.flat import FlatState
from distgraft.graft.math import (
    coefficient,
    criterion,
    graft_internal_,
    graft_noise_,
    graft_plan,
)

__all__ = ["GraftRecord", "Grafter", "graft_step", "WIRE_DTYPES"]

WIRE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


@dataclass
class GraftRecord:
    """What one graft did, for the ``graft`` telemetry event."""

    epoch: int
    network: int
    peer: int
    source: str
    criterion: str
    level: str
    layers: list[str]
    alpha: list[float]
    h_self: list[float]
    h_peer: list[float]
    bytes: int = 0
    exchange_s: float = 0.0
    graft_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    invalid_01: int | None = None
    invalid_001: int | None = None
    taken: list[int] = field(default_factory=list)
    """Layers (indices into ``layers``) that took the peer's weights whole: own non-finite."""

    def event_fields(self) -> dict:
        """Fields of the telemetry event (network and epoch travel separately)."""
        d = asdict(self)
        del d["epoch"], d["network"], d["taken"]
        return d


class Grafter:
    """Grafts ``model`` (this process's network) at epoch boundaries."""

    def __init__(
        self,
        model: nn.Module,
        info: DistInfo,
        cfg: GraftConfig,
        timeout_s: float = 300.0,
        seed: int = 0,
    ) -> None:
        self.model, self.info, self.cfg, self.timeout_s = model, info, cfg, timeout_s
        self.seed = seed
        self.plan = graft_plan(model)
        self.flat = FlatState(model, self.plan)
        self._signature_checked = False
        sizes = torch.tensor([layer.filters for layer in self.plan.layers])
        self._filter_layer = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        self._filter_sizes = sizes

    # -- helpers --------------------------------------------------------------------------
    def _weights(self) -> list[Tensor]:
        tensors = self.flat.tensors()
        return [tensors[k] for k in self.plan.weights]

    def _conv_weights(self) -> list[Tensor]:
        tensors = self.flat.tensors()
        return [tensors[layer.weight] for layer in self.plan.layers if layer.conv]

    def _finite_layers(self, buffers: dict[torch.dtype, Tensor]) -> list[bool] | None:
        """None when everything is finite; else, per layer, whether all its tensors are.

        Fast path: a buffer's sum is finite iff its elements are (barring an overflow of
        the sum, which only sends us to the exact per-layer check). One pass, one sync.
        """
        sums = [b.sum(dtype=torch.float32) for b in buffers.values() if b.is_floating_point()]
        if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
            return None
        ok = [True] * len(self.plan.layers)
        layer_of = self.plan.layer_of()
        for key, t in self.flat.views(buffers).items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                ok[layer_of[key]] = False
        return None if all(ok) else ok

    def _per_layer_mean(self, values: Tensor) -> list[float]:
        if self.cfg.level == "layer":
            return values.float().cpu().tolist()
        parts = torch.split(values.float().cpu(), self._filter_sizes.tolist())
        return [float(v.mean()) for v in parts]

    def _criterion(self, finite: list[bool] | None) -> Tensor:
        weights = self._weights()
        if finite is not None:  # one diverged layer must not stop the whole graft
            weights = [torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0) for w in weights]
        return criterion(weights, self.cfg.criterion, self.cfg.level, self.cfg.bins)

    def _invalid(self, record: GraftRecord) -> None:
        try:
            record.invalid_01, record.invalid_001 = invalid_filters(
                self._conv_weights(), (0.1, 0.01)
            )
        except ValueError:  # non-finite weights left after the graft: say so, go on
            record.warnings.append("invalid filters not counted: non-finite conv weights")

    # -- the step -------------------------------------------------------------------------
    def step(self, epoch: int, own_bad: list[bool] | None = None) -> GraftRecord:
        """Graft once. ``own_bad`` flags layers to replace by the peer's even where their
        weights are finite (e.g. their optimizer state is not: the trainer's health check)."""
        start = time.perf_counter()
        self.flat.verify()
        if self.cfg.source == "external":
            record = self._external(epoch, own_bad)
        elif self.cfg.source in ("noise", "internal"):
            record = self._local(epoch)
        else:
            raise ValueError(f"graft.source = {self.cfg.source!r} does not graft")
        self._invalid(record)
        record.graft_s = time.perf_counter() - start
        return record

    def _external(self, epoch: int, own_bad: list[bool] | None) -> GraftRecord:
        info, cfg = self.info, self.cfg
        self._check_signature(epoch)
        t0 = time.perf_counter()
        pending = self._post(epoch)  # the pre-graft weights travel while we compute
        own_ok = self._finite_layers(self.flat.buffers)
        if own_bad is not None and any(own_bad):
            own_ok = [ok and not bad for ok, bad in
                      zip(own_ok or [True] * len(own_bad), own_bad, strict=True)]  # fmt: skip
        h_self = self._criterion(own_ok)
        pred_rank = info.rank_of(info.predecessor)
        h_peer = gather_criteria(h_self, self.timeout_s, epoch, info.replicas)[pred_rank]
        received = pending.wait()
        exchange_s = time.perf_counter() - t0
        peer = dict(zip(self.flat.buffers, received, strict=True))
        alpha, warnings, take = self._mix(peer, h_self, h_peer, own_ok)
        return GraftRecord(
            epoch, info.network, info.predecessor, cfg.source, cfg.criterion, cfg.level,
            [layer.name for layer in self.plan.layers], self._per_layer_mean(alpha),
            self._per_layer_mean(h_self), self._per_layer_mean(h_peer),
            sum(r.numel() * r.element_size() for r in received), exchange_s, warnings=warnings,
            taken=[i for i, t in enumerate(take or []) if t],
        )  # fmt: skip

    def _check_signature(self, epoch: int) -> None:
        """First graft only: every rank must hold the same model (names, shapes, layouts)."""
        if not self._signature_checked:
            info = self.info
            check_signature(
                self.flat.signature(), info.device, self.timeout_s, epoch, info.replicas
            )
            self._signature_checked = True

    def _post(self, epoch: int) -> PendingExchange:
        """Send the flat state to the successor, receive the predecessor's (non-blocking)."""
        info = self.info
        return post_exchange(
            list(self.flat.buffers.values()),
            send_to=info.rank_of(info.successor),
            recv_from=info.rank_of(info.predecessor),
            timeout_s=self.timeout_s,
            epoch=epoch,
            replicas=info.replicas,
            wire_dtype=WIRE_DTYPES[self.cfg.wire_dtype],
        )

    def _mix(
        self,
        peer: dict[torch.dtype, Tensor],
        h_self: Tensor,
        h_peer: Tensor,
        own_ok: list[bool] | None,
    ) -> tuple[Tensor, list[str], list[bool] | None]:
        """alpha from both criteria, non-finite layers pinned, then the in-place mix.

        Returns alpha, the warnings, and which layers took the peer's weights whole."""
        cfg = self.cfg
        alpha = coefficient(h_self, h_peer, cfg.a, cfg.c).to(h_self.device)
        peer_ok = self._finite_layers(peer)
        keep, take, warnings = self._guard(own_ok, peer_ok, self.info.predecessor)
        self._pin(alpha, keep, 1.0)
        self._pin(alpha, take, 0.0)
        self.flat.mix_(peer, alpha, cfg.level, keep, take)
        return alpha, warnings, take

    def _pin(self, alpha: Tensor, layers: list[bool] | None, value: float) -> None:
        """Record alpha = value for flagged layers (all their filters at filter level)."""
        if layers is None:
            return
        mask = torch.tensor(layers, device=alpha.device)
        if self.cfg.level == "filter":
            mask = mask[self._filter_layer.to(alpha.device)]
        alpha.masked_fill_(mask, value)

    def _guard(
        self, own_ok: list[bool] | None, peer_ok: list[bool] | None, peer: int
    ) -> tuple[list[bool] | None, list[bool] | None, list[str]]:
        """Which layers keep own weights (peer non-finite) or take the peer's (own are)."""
        names = [layer.name for layer in self.plan.layers]
        n = len(names)
        keep = None if peer_ok is None else [not ok for ok in peer_ok]
        take = None
        if own_ok is not None:
            take = [not own_ok[i] and (peer_ok is None or peer_ok[i]) for i in range(n)]
        warnings = []
        for flags, text in (
            (keep, f"network {peer} sent non-finite weights; kept own weights in"),
            (take, f"own state non-finite; took network {peer}'s weights in"),
        ):
            bad = [names[i] for i in range(n) if flags is not None and flags[i]]
            if bad:
                more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                warnings.append(f"{text} {', '.join(bad[:5])}{more}")
        return keep, take, warnings

    def _local(self, epoch: int) -> GraftRecord:
        cfg, info = self.cfg, self.info
        weights = self._conv_weights()
        if cfg.source == "noise":
            g = torch.Generator(device=info.device)
            g.manual_seed(self.seed * 100_003 + epoch)
            graft_noise_(weights, cfg.gamma, cfg.a_noise**epoch, g)
        else:
            graft_internal_(weights, cfg.gamma, cfg.criterion, cfg.a, cfg.c, cfg.bins)
        names = [layer.name for layer in self.plan.layers if layer.conv]
        h = criterion(weights, cfg.criterion, "layer", cfg.bins).cpu().tolist()
        return GraftRecord(
            epoch, info.network, info.network, cfg.source, cfg.criterion, "filter", names,
            alpha=[], h_self=h, h_peer=[],
        )  # fmt: skip


_GRAFTERS: weakref.WeakKeyDictionary[nn.Module, Grafter] = weakref.WeakKeyDictionary()


def graft_step(
    model: nn.Module, info: DistInfo, epoch: int, cfg: GraftConfig, timeout_s: float = 300.0
) -> GraftRecord:
    """Graft ``model`` once; the first call re-points its state into flat buffers.

    Build the optimizer before or after, either works (parameters keep their identity),
    but move the model to its device first: ``model.to`` after this breaks the views.
    """
    grafter = _GRAFTERS.get(model)
    if grafter is None or grafter.cfg != cfg or grafter.info != info:
        grafter = _GRAFTERS[model] = Grafter(model, info, cfg, timeout_s)
    return grafter.step(epoch)
