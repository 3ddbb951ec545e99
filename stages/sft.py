"""Stage 2, instruction SFT: voice chat (a spoken question, no text instruction) and audio analysis (audio plus a
text instruction), mixed in one run with no mode switch; multi-turn and multi-audio; loss on assistant turns only.

Run:  audiollm train sft --config stages/configs/sft.yaml [--key value ...]
Rows: {"messages": [{"role": "user", "content": "<audio>..."}, {"role": "assistant", "content": "..."}],
       "audios": ["clip.wav"]}
"""

from __future__ import annotations

from transformers import Trainer, TrainingArguments
from trl import TrlParser

from audiollm.data import load_mixture
from audiollm.training import DataArguments, ModelArguments, latest_checkpoint, load_model, make_collator, save_final


def main(argv: list[str] | None = None) -> None:
    parser = TrlParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, args = parser.parse_args_and_config(argv)

    model, tokenizer = load_model(model_args)

    train = load_mixture(data_args.train_files, data_args.mix_weights, data_args.streaming, args.seed)
    evals = load_mixture(data_args.eval_files) if data_args.eval_files else None
    collator = make_collator(tokenizer, model, data_args)

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evals, data_collator=collator)
    trainer.train(resume_from_checkpoint=latest_checkpoint(args.output_dir))

    save_final(trainer, model_args, tokenizer)


if __name__ == "__main__":
    main()
