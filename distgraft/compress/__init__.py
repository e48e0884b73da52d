"""Compression: filter pruning, network trimming, magnitude pruning, Force Regularization
and low-rank approximation, with the params/FLOPs counting they are judged by.

Pure tensor code like ``distgraft.graft``: nothing here imports ``torch.distributed``;
work that needs processes is driven from ``distgraft.train`` and the command line.
"""

__all__ = ["load_model"]


def __getattr__(name: str):
    """``distgraft.compress.load_model`` without importing torch for the torch-free names
    module (``distgraft --help`` stays fast)."""
    if name == "load_model":
        from distgraft.compress.archive import load_model

        return load_model
    raise AttributeError(f"module 'distgraft.compress' has no attribute {name!r}")
