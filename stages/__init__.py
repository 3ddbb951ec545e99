"""The training stages: pretrain (audio-text alignment), sft (instruction following), dpo (preferences).

Each stage is one readable module with a ``main(argv)``; run it as ``audiollm train STAGE --config YAML`` or, on
several GPUs, through ``launch/train.sh``. Stages compose library parts and never import each other.
"""
