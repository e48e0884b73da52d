"""Old import path, kept for this release: the code lives in ``distgraft.comm.ring``."""

from distgraft.comm.ring import (  # noqa: F401
    PeerError,
    SignatureError,
    exchange_buffers,
    flatten_by_dtype,
    gather_criteria,
    ring_exchange,
    unflatten_by_dtype,
)
