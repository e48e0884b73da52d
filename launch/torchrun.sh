#!/usr/bin/env bash
# Usage: launch/torchrun.sh [DISTGRAFT TRAIN ARGS...]
#
# Train on ONE machine: torchrun starts NPROC worker processes (one network, or one
# replica, per process) and restarts all of them up to MAX_RESTARTS times when one
# fails; the run then resumes from the last epoch every network completed
# (run.resume=true is the default).
#
# Every argument is passed unchanged to `distgraft train`, e.g.
#   launch/torchrun.sh --config configs/digits.toml --run.epochs=3 --run.name=demo
#   NPROC=4 launch/torchrun.sh --config configs/cifar10_resnet32.toml --run.name=c10
#
# Environment (defaults in brackets):
#   NPROC         worker processes [number of GPUs listed by `nvidia-smi -L`, else 2]
#   MAX_RESTARTS  times torchrun restarts the workers after a failure [3]
#   MASTER_PORT   local TCP port of the c10d rendezvous store [29500];
#                 0 lets torchrun pick a free port (--standalone), handy when
#                 several runs share a machine
#   PYTHON        interpreter that has torch and distgraft installed [python3]
#
# `launch/torchrun.sh --help` (or -h) prints this text; put --help after another
# argument to get the help of `distgraft train` itself.
set -euo pipefail

# shellcheck source=SCRIPTDIR/common.bash
source "$(dirname "${BASH_SOURCE[0]}")/common.bash"
handle_help "$@"

NPROC="${NPROC:-$(gpu_count)}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-python3}"

if [[ "$MASTER_PORT" == "0" ]]; then
    # --standalone: a private c10d store on a free port, new rendezvous id per launch.
    rdzv=(--standalone)
else
    # What --standalone does, but on a known port. is_host=true makes this
    # launcher host the store itself, so a port already taken by another run
    # fails loudly instead of silently joining that run's store as a client.
    rdzv=(--nnodes 1 --rdzv-backend c10d --rdzv-endpoint "localhost:$MASTER_PORT"
        --rdzv-id "distgraft-$$" --rdzv-conf is_host=true)
fi

# `python -m torch.distributed.run` is torchrun; it works without torchrun on PATH.
exec "$PYTHON" -m torch.distributed.run \
    "${rdzv[@]}" \
    --nproc-per-node "$NPROC" \
    --max-restarts "$MAX_RESTARTS" \
    -m distgraft train "$@"
