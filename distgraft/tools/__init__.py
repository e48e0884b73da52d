"""Tools that read what training wrote: ``distgraft analyze`` (checkpoints layer by layer)
and ``distgraft report`` (a run's metrics as a picture)."""
