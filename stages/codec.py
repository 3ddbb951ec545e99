"""The codec the voice speaks through: train a small speech codec (audiollm/tts/melcodec.py: log-mel frames ->
residual VQ codes -> magnitude spectrogram -> Griffin-Lim) on a manifest of audio, so that a TTS decoder has
codes worth predicting where no trained codec can be downloaded. The folder it writes loads with ``load_codec``.

Run:  audiollm train codec --config stages/configs/codec_demo.yaml [--key value ...]
Rows: {"audio": "clip.wav", ...}   (audio paths relative to the manifest; other keys are ignored)

Each step trains on fixed-length segments cut at random from the clips; unusable clips are skipped and counted
(bad_rows.jsonl), and training stops once they pass ``max_bad_fraction``.
"""

from __future__ import annotations

from transformers import TrainingArguments
from trl import TrlParser

from audiollm.crash_safety import CrashSafeTrainer
from audiollm.training import check_training_args, latest_checkpoint, skip_cpu_shm_allreduce_op
from audiollm.tts.codec_training import (
    ClipDataset,
    CodecDataArguments,
    CodecModelArguments,
    collators,
    load_codec_model,
    save_codec,
)


def parse_recipe(argv: list[str] | None = None) -> tuple[CodecModelArguments, CodecDataArguments, TrainingArguments]:
    """The recipe (``--config x.yaml`` plus CLI overrides) as the codec's dataclasses and TrainingArguments."""
    skip_cpu_shm_allreduce_op()  # before parsing, which starts the process group
    parser = TrlParser((CodecModelArguments, CodecDataArguments, TrainingArguments))
    model_args, data_args, args = parser.parse_args_and_config(argv)
    check_training_args(args)
    return model_args, data_args, args


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, args = parse_recipe(argv)

    model = load_codec_model(model_args)

    train = ClipDataset(data_args.train_files)
    evals = ClipDataset(data_args.eval_files) if data_args.eval_files else None
    train_collator, eval_collator = collators(model.config, data_args, args.output_dir)

    trainer = CrashSafeTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                               data_collator=train_collator, eval_data_collator=eval_collator,
                               max_bad_fraction=data_args.max_bad_fraction)  # one ceiling for ranks and workers
    trainer.train(resume_from_checkpoint=latest_checkpoint(args.output_dir))

    save_codec(trainer)


if __name__ == "__main__":
    main()
