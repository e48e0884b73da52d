# shellcheck shell=bash
# Helpers sourced (not run) by launch/torchrun.sh, launch/multinode.sh and docker/node.sh.

# Print the running script's header comment (its documentation) without the '#'.
usage() {
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
}

# Exit after printing usage when the first argument asks for help.
handle_help() {
    if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
        usage
        exit 0
    fi
}

# One process per visible GPU; without a usable nvidia-smi, 2 CPU processes (gloo).
gpu_count() {
    local n
    if command -v nvidia-smi >/dev/null 2>&1 \
        && n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')" \
        && [[ "$n" -gt 0 ]]; then
        echo "$n"
    else
        echo 2
    fi
}
