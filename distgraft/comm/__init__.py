"""Communication: process groups from torchrun/SLURM, the ring exchange, criteria gathering.

The only package that calls ``torch.distributed`` collectives and P2P ops. It knows
nothing of training: callers hand it tensors, ranks and timeouts.
"""
