"""The speaking half: fine-tune a decoder LM to write codec tokens for a text (LLaSA / Orpheus style), so that
the codec's decoder turns them into speech. Works for any HF causal LM; the codec and token layout are chosen in
the recipe (XCodec2 + single, SNAC + snac7, Mimi + rvq). ``architecture: csm`` trains transformers'
CsmForConditionalGeneration instead: a backbone per frame and a depth decoder for the codebooks (any RVQ codec).

Run:  audiollm train tts --config stages/configs/tts.yaml [--key value ...]
      audiollm train tts --config stages/configs/tts_csm_demo.yaml
Rows: {"audio": "clip.wav", "text": "what the clip says"}   (audio paths relative to the manifest)

Audio is encoded to codes once and cached (cache_dir); rows become a numpy memmap of token ids. Loss is on the
speech part only: labels start at <|SPEECH_GENERATION_START|>.
"""

from __future__ import annotations

from transformers import TrainingArguments
from trl import TrlParser

from audiollm.crash_safety import CrashSafeTrainer
from audiollm.training import check_training_args, latest_checkpoint, skip_cpu_shm_allreduce_op
from audiollm.tts.csm_training import CsmArguments, CsmTrainer, csm_collator, load_csm_datasets, load_csm_model
from audiollm.tts.layout import ARCHITECTURES
from audiollm.tts.training import (
    TTSDataArguments,
    TTSModelArguments,
    collator,
    load_token_datasets,
    load_tts_model,
    save_tts,
)


def csm_trainer(model_args, data_args, csm_args, args):
    """(trainer, tokenizer, vocab) of the csm architecture."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # the frame embeddings are looked up outside the engine's gathered forward
        raise ValueError("architecture csm trains under ZeRO-2 (deepspeed_configs/zero2.json) or without DeepSpeed; "
                         "ZeRO-3 is not supported")
    if model_args.interleave != "none":
        raise ValueError(f"interleave {model_args.interleave!r}: architecture csm takes a turn's text before its "
                         "frames (no words inside the speech); set interleave: none")
    model, tokenizer, vocab = load_csm_model(model_args, csm_args)
    train, evals = load_csm_datasets(model_args, data_args, args, tokenizer, vocab, model.config)
    trainer = CsmTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals, csm_args=csm_args,
                         data_collator=csm_collator(tokenizer, model.config, csm_args, args.seed))
    return trainer, tokenizer, vocab


def flat_trainer(model_args, data_args, args):
    """(trainer, tokenizer, vocab) of the flat architecture: one LM over the layout's tokens."""
    model, tokenizer, vocab = load_tts_model(model_args)
    train, evals = load_token_datasets(model_args, data_args, args, tokenizer, vocab)
    trainer = CrashSafeTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                               data_collator=collator(tokenizer))
    return trainer, tokenizer, vocab


def main(argv: list[str] | None = None) -> None:
    skip_cpu_shm_allreduce_op()  # before parsing, which starts the process group
    parser = TrlParser((TTSModelArguments, TTSDataArguments, CsmArguments, TrainingArguments))
    model_args, data_args, csm_args, args = parser.parse_args_and_config(argv)
    check_training_args(args)
    if model_args.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {model_args.architecture!r}: expected one of {ARCHITECTURES}")

    if model_args.architecture == "csm":
        trainer, tokenizer, vocab = csm_trainer(model_args, data_args, csm_args, args)
    else:
        trainer, tokenizer, vocab = flat_trainer(model_args, data_args, args)

    trainer.train(resume_from_checkpoint=latest_checkpoint(args.output_dir))

    save_tts(trainer, tokenizer, vocab)


if __name__ == "__main__":
    main()
