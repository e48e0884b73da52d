#!/usr/bin/env bash
# Usage: RDZV_ENDPOINT=HOST:PORT NNODES=N launch/multinode.sh [DISTGRAFT TRAIN ARGS...]
#
# Train on SEVERAL machines. Run the SAME command on every node; the torchrun
# agents meet at the c10d rendezvous RDZV_ENDPOINT (a TCP store hosted by the
# agent on HOST), agree on global ranks, and each starts NPROC workers.
# When a worker or a node fails, all agents re-rendezvous and restart their
# workers (up to MAX_RESTARTS times) and the run resumes from the last epoch
# every network completed (run.resume=true is the default).
#
# Every argument is passed unchanged to `distgraft train`, e.g. on each of 2 nodes:
#   RDZV_ENDPOINT=node01:29400 NNODES=2 launch/multinode.sh \
#       --config configs/imagenet_resnet18.toml --run.name=in18
#
# Environment (defaults in brackets):
#   RDZV_ENDPOINT  HOST:PORT of the rendezvous, reachable from every node; HOST is
#                  one of the nodes (it hosts the store), PORT is free there,
#                  e.g. 29400 [required]
#   NNODES         number of nodes, the same on every node; MIN:MAX (e.g. 2:4)
#                  makes the job elastic between MIN and MAX nodes [2]
#   NPROC          worker processes per node [GPUs from `nvidia-smi -L`, else 2]
#   RDZV_ID        rendezvous id shared by the nodes of one job; use a new id
#                  for each job that reuses the endpoint [distgraft]
#   MAX_RESTARTS   times the workers are restarted after a failure [3]
#   NODE_RANK      optional. c10d assigns ranks itself, so this only says which
#                  node hosts the store: 0 on the node named in RDZV_ENDPOINT,
#                  anything else on the others. Set it when HOST is an alias (DNS
#                  name, load balancer, container service) that the hostname/IP
#                  match cannot recognise as the local machine.
#   LOCAL_ADDR     optional. The address the other nodes reach this node at
#                  (torchrun --local-addr): the rank-0 node's workers host the
#                  workers' store there, and nodes take ranks in the order of
#                  these addresses. Set it when the hostname resolves to an
#                  address the other nodes cannot reach [the FQDN]
#   PYTHON         interpreter that has torch and distgraft installed [python3]
#
# `launch/multinode.sh --help` (or -h) prints this text.
set -euo pipefail

# shellcheck source=SCRIPTDIR/common.bash
source "$(dirname "${BASH_SOURCE[0]}")/common.bash"
handle_help "$@"

# No sensible default exists: every node must name the same host, so fail early
# instead of letting each node wait for a rendezvous that never completes.
if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
    echo "error: RDZV_ENDPOINT is not set; export RDZV_ENDPOINT=HOST:PORT (the same on" \
        "every node, HOST one of the nodes), e.g. RDZV_ENDPOINT=node01:29400." \
        "See --help." >&2
    exit 2
fi
if [[ "$RDZV_ENDPOINT" != ?*:[0-9]* ]]; then
    echo "error: RDZV_ENDPOINT='$RDZV_ENDPOINT' must look like HOST:PORT" >&2
    exit 2
fi

NNODES="${NNODES:-2}"
NPROC="${NPROC:-$(gpu_count)}"
RDZV_ID="${RDZV_ID:-distgraft}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
PYTHON="${PYTHON:-python3}"

# Each rendezvous round, let rank 0's worker host a fresh store for the workers,
# instead of sharing the rank-0 agent's store: a non-rank-0 agent reads that
# shared store's address once and never again, so after the rank-0 agent is
# replaced (a crashed node relaunched) its workers keep dialling a dead port
# and the job hangs (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

extra=()
if [[ -n "${NODE_RANK:-}" ]]; then
    if [[ "$NODE_RANK" == "0" ]]; then
        extra=(--rdzv-conf is_host=true)
    else
        extra=(--rdzv-conf is_host=false)
    fi
fi
if [[ -n "${LOCAL_ADDR:-}" ]]; then
    extra+=(--local-addr "$LOCAL_ADDR")
fi

# `python -m torch.distributed.run` is torchrun; it works without torchrun on PATH.
# ${extra[@]+...} keeps `set -u` quiet about an empty array on bash < 4.4.
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --nproc-per-node "$NPROC" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$RDZV_ENDPOINT" \
    --rdzv-id "$RDZV_ID" \
    --max-restarts "$MAX_RESTARTS" \
    ${extra[@]+"${extra[@]}"} \
    -m distgraft train "$@"
