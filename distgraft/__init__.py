"""distgraft: distributed multi-process filter grafting for PyTorch."""

__version__ = "0.1.0"
