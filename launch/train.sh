#!/usr/bin/env bash
# Train one stage on the GPUs of one node under DeepSpeed.
#
# Runs:      deepspeed --num_gpus NUM_GPUS stages/STAGE.py --config CONFIG --deepspeed DS_CONFIG [overrides...]
# Hardware:  one node, 1..N GPUs (the deepspeed launcher starts one rank per GPU). On a CPU-only machine pass
#            `--use_cpu true`: the ranks then talk over gloo (that is how tests/test_distributed.py runs it).
# Usage:     launch/train.sh STAGE CONFIG [NUM_GPUS] [DS_CONFIG] [--key value ...]
#   STAGE      a stage file's name: pretrain, sft, dpo (whatever stages/*.py holds)
#   CONFIG     the recipe YAML, e.g. stages/configs/sft.yaml
#   NUM_GPUS   ranks on this node; "all" or omitted: every GPU the node shows
#   DS_CONFIG  DeepSpeed JSON; default deepspeed_configs/zero2.json
#   --key value  recipe overrides, passed to the stage unchanged (--output_dir runs/sft-b --learning_rate 2e-5)
# The optional positionals end at the first argument that starts with "--".
# Environment: MASTER_PORT (default 29500): pick another one to run two jobs on one node.
#
# The script changes to the repository root first, so relative paths (CONFIG, DS_CONFIG and the paths inside the
# recipe: train_files, output_dir) mean the same thing wherever it is called from. Checking the recipe's values is
# the stage's job (its argument parser and check_training_args); this script only checks that the stage exists.
#
# Example:   launch/train.sh sft stages/configs/sft.yaml 8 deepspeed_configs/zero3.json --num_train_epochs 1
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

# The stage names are the files in stages/, so a new stage needs no change here.
known_stages() {
    local file names=()
    for file in "$REPO_ROOT"/stages/*.py; do
        [[ "$(basename "$file")" == __init__.py ]] || names+=("$(basename "$file" .py)")
    done
    echo "${names[*]}"
}

check_stage() {
    local stage=$1
    if [[ ! -f "$REPO_ROOT/stages/$stage.py" ]]; then
        echo "launch/train.sh: no stage '$stage' (stages/$stage.py); stages: $(known_stages)" >&2
        exit 2
    fi
}

main() {
    [[ $# -ge 2 ]] || usage
    local stage=$1 config=$2
    shift 2
    local num_gpus="all" ds_config="deepspeed_configs/zero2.json"
    if [[ $# -gt 0 && $1 != --* ]]; then num_gpus=$1; shift; fi
    if [[ $# -gt 0 && $1 != --* ]]; then ds_config=$1; shift; fi
    check_stage "$stage"

    # Without --num_gpus the launcher takes every visible GPU.
    local gpu_args=()
    [[ $num_gpus == all ]] || gpu_args=(--num_gpus "$num_gpus")

    cd "$REPO_ROOT"
    exec deepspeed "${gpu_args[@]}" --master_port "${MASTER_PORT:-29500}" \
        "stages/$stage.py" --config "$config" --deepspeed "$ds_config" "$@"
}

main "$@"
