#!/usr/bin/env bash
# Train one stage on several nodes, started from one of them over ssh by the deepspeed launcher.
#
# Runs:      deepspeed --hostfile HOSTFILE --master_addr ADDR --master_port PORT
#                      stages/STAGE.py --config CONFIG --deepspeed DS_CONFIG [overrides...]
# Hardware:  the nodes listed in HOSTFILE, each with the GPUs its "slots=" says. Needs passwordless ssh from this
#            node to every node (the launcher uses pdsh), and the repository and the data at the same path on every
#            node (a shared filesystem). Environment variables for the ranks go in ~/.deepspeed_env or
#            ./.deepspeed_env (NAME=value lines), e.g. NCCL_SOCKET_IFNAME=eth0. On SLURM use launch/slurm.sbatch.
# Usage:     launch/multinode.sh HOSTFILE STAGE CONFIG [DS_CONFIG] [--key value ...]
#   HOSTFILE   MPI-style host list, one "hostname slots=GPUS" line per node; the first host is rank 0's node
#   STAGE      a stage file's name: pretrain, sft, dpo (whatever stages/*.py holds)
#   CONFIG     the recipe YAML, e.g. stages/configs/sft.yaml
#   DS_CONFIG  DeepSpeed JSON; default deepspeed_configs/zero3.json (across nodes, sharded weights save memory
#              where the network is the bottleneck anyway)
#   --key value  recipe overrides, passed to the stage unchanged
# Environment: MASTER_ADDR (default: the first host in HOSTFILE, as the other nodes reach it),
#              MASTER_PORT (default 29500).
#
# Relative paths (HOSTFILE is read before, CONFIG and DS_CONFIG after changing to the repository root) work as in
# launch/train.sh. The global batch is nodes x GPUs x per_device_train_batch_size x gradient_accumulation_steps:
# lower gradient_accumulation_steps in the recipe to keep it when adding nodes.
#
# Example:   launch/multinode.sh hosts.txt sft stages/configs/sft.yaml deepspeed_configs/zero3.json
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

check_stage() {
    local stage=$1
    if [[ ! -f "$REPO_ROOT/stages/$stage.py" ]]; then
        echo "launch/multinode.sh: no stage '$stage' (stages/$stage.py)" >&2
        exit 2
    fi
}

# The first host named in the hostfile (comments and blank lines skipped): rank 0 runs there.
first_host() {
    awk '{ sub(/#.*/, "") } NF { print $1; exit }' "$1"
}

main() {
    [[ $# -ge 3 ]] || usage
    local hostfile=$1 stage=$2 config=$3
    shift 3
    local ds_config="deepspeed_configs/zero3.json"
    if [[ $# -gt 0 && $1 != --* ]]; then ds_config=$1; shift; fi
    check_stage "$stage"
    if [[ ! -f $hostfile ]]; then
        echo "launch/multinode.sh: hostfile $hostfile not found" >&2
        exit 2
    fi
    hostfile="$(cd "$(dirname "$hostfile")" && pwd)/$(basename "$hostfile")"
    local master_addr=${MASTER_ADDR:-$(first_host "$hostfile")}
    if [[ -z $master_addr ]]; then
        echo "launch/multinode.sh: $hostfile names no host; write one 'hostname slots=GPUS' line per node" >&2
        exit 2
    fi

    cd "$REPO_ROOT"
    exec deepspeed --hostfile "$hostfile" --master_addr "$master_addr" --master_port "${MASTER_PORT:-29500}" \
        "stages/$stage.py" --config "$config" --deepspeed "$ds_config" "$@"
}

main "$@"
