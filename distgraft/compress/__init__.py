"""Compression: filter pruning, network trimming, magnitude pruning, Force Regularization
and low-rank approximation, with the params/FLOPs counting they are judged by.

Pure tensor code like ``distgraft.graft``: nothing here imports ``torch.distributed``;
work that needs processes is driven from ``distgraft.train`` and the command line.
"""
