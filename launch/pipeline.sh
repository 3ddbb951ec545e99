#!/usr/bin/env bash
# The whole recipe on one node: pretrain -> sft -> dpo, each stage starting from the previous stage's output.
#
# Runs:      launch/train.sh pretrain $PRETRAIN_CONFIG NUM_GPUS $PRETRAIN_DS --model_name_or_path INIT_MODEL
#                                     --output_dir RUN_DIR/pretrain [overrides...]
#            launch/train.sh sft      $SFT_CONFIG      NUM_GPUS $SFT_DS      --model_name_or_path RUN_DIR/pretrain
#                                     --output_dir RUN_DIR/sft [overrides...]
#            launch/train.sh dpo      $DPO_CONFIG      NUM_GPUS $DPO_DS      --model_name_or_path RUN_DIR/sft
#                                     --output_dir RUN_DIR/dpo [overrides...]
# Hardware:  one node with NUM_GPUS GPUs (for several nodes, run the stages one by one with launch/multinode.sh or
#            launch/slurm.sbatch, passing the same two flags).
# Usage:     launch/pipeline.sh RUN_DIR INIT_MODEL [NUM_GPUS] [--key value ...]
#   RUN_DIR     where the stage folders go: RUN_DIR/pretrain, RUN_DIR/sft, RUN_DIR/dpo (RUN_DIR=runs gives the
#               recipes' own output_dir values)
#   INIT_MODEL  the folder stage 1 starts from (`audiollm init ... --out runs/init`)
#   NUM_GPUS    ranks per stage; "all" or omitted: every GPU of the node
#   --key value overrides passed to every stage (e.g. --report_to wandb)
# Environment (defaults in brackets):
#   STAGES           stages to run, in order ["pretrain sft dpo"]; e.g. "sft dpo" with INIT_MODEL a pretrained folder
#   PRETRAIN_CONFIG  [stages/configs/pretrain.yaml]   PRETRAIN_DS [deepspeed_configs/zero2.json]
#   SFT_CONFIG       [stages/configs/sft.yaml]        SFT_DS      [deepspeed_configs/zero3.json]
#   DPO_CONFIG       [stages/configs/dpo.yaml]        DPO_DS      [deepspeed_configs/zero3.json]
#   MASTER_PORT      as in launch/train.sh
# Stage 1 trains the projector alone (small, ZeRO-2 is enough); SFT and DPO train the LLM, so ZeRO-3 shards it.
#
# A finished stage (its folder has training_summary.json) is skipped and an unfinished one resumes from its newest
# checkpoint, so rerunning the same command after a crash continues where it stopped. Paths are relative to the
# repository root, as in launch/train.sh.
#
# Example:   launch/pipeline.sh runs runs/init 8
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

# The recipe and DeepSpeed config of a stage: $<STAGE>_CONFIG / $<STAGE>_DS, or the shipped defaults.
stage_config() {
    local var="${1^^}_CONFIG"
    echo "${!var:-stages/configs/$1.yaml}"
}

stage_ds_config() {
    local var="${1^^}_DS" default=deepspeed_configs/zero3.json
    [[ $1 == pretrain ]] && default=deepspeed_configs/zero2.json
    echo "${!var:-$default}"
}

main() {
    [[ $# -ge 2 ]] || usage
    local run_dir=$1 model=$2
    shift 2
    local num_gpus=all
    if [[ $# -gt 0 && $1 != --* ]]; then num_gpus=$1; shift; fi

    local stage stages
    read -r -a stages <<< "${STAGES:-pretrain sft dpo}"
    for stage in "${stages[@]}"; do
        if [[ -f $run_dir/$stage/training_summary.json ]]; then  # written last by a finished stage
            echo "pipeline.sh: $run_dir/$stage is finished; skipping $stage" >&2
        else
            echo "pipeline.sh: $stage from $model -> $run_dir/$stage" >&2
            "$REPO_ROOT/launch/train.sh" "$stage" "$(stage_config "$stage")" "$num_gpus" "$(stage_ds_config "$stage")" \
                --model_name_or_path "$model" --output_dir "$run_dir/$stage" "$@"
        fi
        model="$run_dir/$stage"
    done
}

main "$@"
