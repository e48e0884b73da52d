"""``distgraft compress``: one module per command, ``common`` for what they share, ``cli``
to register them. The compression itself is pure tensor code in ``distgraft.compress``."""
