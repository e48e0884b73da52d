"""Training: the loop (``trainer``), atomic checkpoints and resume, datasets and loaders
(``data``), and ``distgraft train`` (``cli``). Drives ``graft`` and ``comm``; nothing below
it imports it.
"""
