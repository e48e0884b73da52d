#!/usr/bin/env bash
# Usage: docker/node.sh [DISTGRAFT TRAIN ARGS...]
#
# Entrypoint of the distgraft image: one torchrun agent per container (a
# "node"), NPROC workers in it. All containers of a job run this same command;
# they meet at the c10d rendezvous RDZV_HOST:RDZV_PORT, which the container
# whose hostname is RDZV_HOST hosts (node0 in docker-compose.yml). Runs go to
# RUNS_DIR (a volume shared by all nodes), so a restarted node resumes from the
# last epoch every network completed.
#
# Environment (defaults in brackets):
#   NODES         number of containers in the job, MIN:MAX for elastic [1]
#   NPROC         workers per container; "gpu" = one per visible GPU [1]
#   CONFIG        config file, relative to /workspace [configs/digits.toml]
#   RDZV_HOST     name of the container hosting the rendezvous [localhost]
#   RDZV_PORT     its port [29400]
#   RDZV_ID       rendezvous id shared by one job's containers [distgraft]
#   MAX_RESTARTS  times the workers are restarted after a failure [3]
#   RUNS_DIR      run.dir, the shared volume [/runs]
#   TELEMETRY_ADDRESS  telemetry.address, where rank 0's collector listens;
#                 tcp://*:0 lets other containers reach it [the config's]
#   TRAIN_ARGS    extra `distgraft train` arguments, split on whitespace, e.g.
#                 "--run.name=demo --run.epochs=3" [none]
#   PYTHON        interpreter [python3]
# Arguments given to the script (compose `command:`) come last and win.
set -euo pipefail

# shellcheck source=SCRIPTDIR/../launch/common.bash
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.bash"
handle_help "$@"

NODES="${NODES:-1}"
NPROC="${NPROC:-1}"
CONFIG="${CONFIG:-configs/digits.toml}"
RDZV_HOST="${RDZV_HOST:-localhost}"
RDZV_PORT="${RDZV_PORT:-29400}"
RDZV_ID="${RDZV_ID:-distgraft}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
RUNS_DIR="${RUNS_DIR:-/runs}"
PYTHON="${PYTHON:-python3}"

# Each rendezvous round, let rank 0's worker host a fresh store for the workers,
# instead of sharing the rank-0 agent's store: a non-rank-0 agent reads that
# shared store's address once and never again, so after the rank-0 agent is
# replaced (a crashed node relaunched) its workers keep dialling a dead port
# and the job hangs (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# Environment variables are the only knobs `docker compose up` can pass, hence
# TRAIN_ARGS; `read -a` splits it on whitespace without glob expansion.
train_args=()
if [[ -n "${TELEMETRY_ADDRESS:-}" ]]; then
    train_args+=("--telemetry.address=$TELEMETRY_ADDRESS")
fi
if [[ -n "${TRAIN_ARGS:-}" ]]; then
    read -r -a more <<<"$TRAIN_ARGS"
    train_args+=(${more[@]+"${more[@]}"})
fi

echo "distgraft node $(hostname): $NODES nodes x $NPROC workers," \
    "rendezvous $RDZV_HOST:$RDZV_PORT, config $CONFIG"

# ${train_args[@]+...} keeps `set -u` quiet about an empty array on bash < 4.4.
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NODES" \
    --nproc-per-node "$NPROC" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" \
    --rdzv-id "$RDZV_ID" \
    --max-restarts "$MAX_RESTARTS" \
    -m distgraft train \
    --config "$CONFIG" \
    --run.dir="$RUNS_DIR" \
    ${train_args[@]+"${train_args[@]}"} \
    "$@"
