"""The speaking half: fine-tune a decoder LM to write codec tokens for a text (LLaSA / Orpheus style), so that
the codec's decoder turns them into speech. Works for any HF causal LM; the codec and token layout are chosen in
the recipe (XCodec2 + single, SNAC + snac7, Mimi + rvq).

Run:  audiollm train tts --config stages/configs/tts.yaml [--key value ...]
Rows: {"audio": "clip.wav", "text": "what the clip says"}   (audio paths relative to the manifest)

Audio is encoded to codes once and cached (cache_dir); rows become a numpy memmap of token ids. Loss is on the
speech part only: labels start at <|SPEECH_GENERATION_START|>.
"""

from __future__ import annotations

from transformers import TrainingArguments
from trl import TrlParser

from audiollm.crash_safety import CrashSafeTrainer
from audiollm.training import check_training_args, latest_checkpoint, skip_cpu_shm_allreduce_op
from audiollm.tts.training import (
    TTSDataArguments,
    TTSModelArguments,
    collator,
    load_token_datasets,
    load_tts_model,
    save_tts,
)


def main(argv: list[str] | None = None) -> None:
    skip_cpu_shm_allreduce_op()  # before parsing, which starts the process group
    parser = TrlParser((TTSModelArguments, TTSDataArguments, TrainingArguments))
    model_args, data_args, args = parser.parse_args_and_config(argv)
    check_training_args(args)

    model, tokenizer, vocab = load_tts_model(model_args)

    train, evals = load_token_datasets(model_args, data_args, args, tokenizer, vocab)

    trainer = CrashSafeTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                               data_collator=collator(tokenizer))
    trainer.train(resume_from_checkpoint=latest_checkpoint(args.output_dir))

    save_tts(trainer, tokenizer, vocab)


if __name__ == "__main__":
    main()
