"""Grafting: the math (entropy, coefficients, what grafts with what) and the graft step.

``entropy``, ``math`` and ``flat`` are pure tensor code; ``step`` runs one graft at an
epoch boundary and leaves every byte that crosses processes to ``distgraft.comm``. No
module here imports ``torch.distributed`` (``tests/test_layout.py`` checks it).
"""

from distgraft.graft.math import (
    GraftLayer,
    GraftPlan,
    coefficient,
    criterion,
    graft_internal_,
    graft_noise_,
    graft_plan,
)

__all__ = [
    "coefficient",
    "GraftLayer",
    "GraftPlan",
    "graft_plan",
    "criterion",
    "graft_noise_",
    "graft_internal_",
]
