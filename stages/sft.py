"""Stage 2, instruction SFT: voice chat (a spoken question, no text instruction) and audio analysis (audio plus a
text instruction), mixed in one run with no mode switch; multi-turn and multi-audio; loss on assistant turns only.

Run:  audiollm train sft --config stages/configs/sft.yaml [--key value ...]
Rows: {"messages": [{"role": "user", "content": "<audio>..."}, {"role": "assistant", "content": "..."}],
       "audios": ["clip.wav"]}
"""

from __future__ import annotations

from transformers import TrainingArguments
from trl import TrlParser

from audiollm.augment import CollatorEpochs
from audiollm.distill import DistillArguments
from audiollm.teacher import StageTrainer, make_teacher
from audiollm.stage_args import DataArguments, ModelArguments
from audiollm.training import (
    check_training_args,
    latest_checkpoint,
    load_datasets,
    load_model,
    make_batch_sampler,
    make_collator,
    preflight,
    save_final,
    skip_cpu_shm_allreduce_op,
)


def main(argv: list[str] | None = None, callbacks: list | None = None) -> None:
    """``callbacks``: more TrainerCallbacks for this run (the demo's thread sharing)."""
    skip_cpu_shm_allreduce_op()  # before parsing, which starts the process group
    parser = TrlParser((ModelArguments, DataArguments, DistillArguments, TrainingArguments))
    model_args, data_args, kd_args, args = parser.parse_args_and_config(argv)
    check_training_args(args)

    model, tokenizer = load_model(model_args)
    teacher = make_teacher(kd_args, model_args)  # loss: kd: the frozen text LLM, outside the optimizer; else None

    train, evals = load_datasets(data_args, args)
    collator = make_collator(tokenizer, model, data_args, args.output_dir, seed=args.seed,  # bad rows: skipped
                             teacher_rows=kd_args.teacher_rows)  # loss: kd: text for the teacher
    preflight(train, collator, data_args, args.seed)  # a mostly broken manifest stops here, not hours later

    eval_collator = make_collator(tokenizer, model, data_args, args.output_dir, train=False)  # audio as it is

    batches = make_batch_sampler(train, data_args, args)  # None: per_device_train_batch_size rows a batch
    trainer = StageTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals, data_collator=collator,
                           eval_data_collator=eval_collator, train_batch_sampler=batches,
                           max_bad_fraction=data_args.max_bad_fraction, teacher=teacher, distill_args=kd_args,
                           callbacks=[CollatorEpochs(collator), *(callbacks or [])])  # CollatorEpochs: the
                                                                                    # epoch augmentation draws for
    trainer.train(resume_from_checkpoint=latest_checkpoint(args.output_dir))

    save_final(trainer, "sft", model_args, data_args, tokenizer)


if __name__ == "__main__":
    main()
