"""Old import path, kept for this release: the code lives in ``distgraft.graft.entropy``."""

from distgraft.graft.entropy import (  # noqa: F401
    entropy_from_counts,
    filter_entropies,
    filter_l1,
    invalid_filters,
    layer_entropies,
    layer_l1,
)
