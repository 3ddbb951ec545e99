"""Stage 3, DPO on audio: (audio + prompt, chosen, rejected) triplets, TRL's DPO loss on the audio model.

L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]) for loss_type sigmoid;
beta, loss_type and precompute_ref_log_probs come from the recipe (trl.DPOConfig), and the loss code is TRL's own.

Run:  audiollm train dpo --config stages/configs/dpo.yaml [--key value ...]
Rows: {"messages": [{"role": "user", "content": "<audio>..."}], "audios": ["clip.wav"],
       "chosen": "...", "rejected": "..."}        (answers may also be assistant messages; see audiollm/preference.py)
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import trl.trainer.dpo_trainer as trl_dpo
from accelerate.utils import is_peft_model
from trl import DPOConfig, DPOTrainer, TrlParser
from trl.trainer.utils import add_fused_lm_head

from audiollm.bad_rows import TALLY_KEY
from audiollm.collator import IGNORE_INDEX
from audiollm.crash_safety import CrashSafeTrainerMixin
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.preference import PreferenceCollator
from audiollm.stage_args import DataArguments, ModelArguments, without_fields
from audiollm.training import (
    bad_row_log,
    check_training_args,
    latest_checkpoint,
    load_datasets,
    load_model,
    packing_tokens,
    preflight,
    save_final,
    skip_cpu_shm_allreduce_op,
    unwrap,
)

# Fields DPOConfig declares too (argparse refuses one flag twice): the recipe sets them once, DPOConfig keeps them.
# train_on is left out as well: DPO trains on the answer only.
SHARED_MODEL_FIELDS = {"trust_remote_code"}
SHARED_DATA_FIELDS = {"max_length", "train_on"}


class AudioDPOTrainer(CrashSafeTrainerMixin, DPOTrainer):
    """TRL's DPOTrainer on ``AudioLLMForConditionalGeneration`` and ``PreferenceCollator`` batches.

    TRL's ``_compute_loss`` runs unchanged: one forward of the policy over the (2B, S) chosen-then-rejected batch,
    one of the reference (a frozen copy, the LoRA base with the adapter off, or precomputed log-probs), summed
    answer-token log-probs per sequence, the DPO loss of ``loss_type`` and TRL's metrics. What differs from text DPO:
    the dataset stays raw (the collator tokenizes and featurizes lazily), the batch comes as ``labels`` and is
    handed to TRL as its ``completion_mask``, and TRL's fused LM head goes on the inner causal LM.
    """

    def __init__(self, model, ref_model, args: DPOConfig, data_collator: PreferenceCollator, train_dataset,
                 eval_dataset=None, processing_class=None, max_bad_fraction: float | None = None, callbacks=None):
        audio_model = unwrap(model)
        if not hasattr(audio_model, "generation_config"):
            # TRL writes the pad id into model.generation_config; the audio model generates through its LLM's config.
            audio_model.generation_config = audio_model.language_model.generation_config
        with _fused_head_on_language_model():
            super().__init__(model=model, ref_model=ref_model, args=args, data_collator=data_collator,
                             train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                             max_bad_fraction=max_bad_fraction, callbacks=callbacks)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Keep the raw rows: TRL's text tokenization knows no audio; the collator encodes each batch."""
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's DPO loss and metrics on a PreferenceCollator batch."""
        batch, _ = to_trl_batch(inputs)
        return super().compute_loss(model, batch, return_outputs, num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs for ``precompute_ref_log_probs``: (B_in,) chosen and rejected, one per input row.

        A row the collator dropped as over-long gets NaN; training drops it again, so the value is never read.
        """
        batch, kept = to_trl_batch(inputs)
        chosen, rejected = super().compute_ref_log_probs(model, batch)  # (B_kept,) each
        return tuple(torch.full(kept.shape, torch.nan, dtype=v.dtype, device=v.device).masked_scatter(kept, v)
                     for v in (chosen, rejected))


def to_trl_batch(inputs: dict) -> tuple[dict, torch.Tensor]:
    """Collator batch -> (TRL's batch, kept-rows mask): ``labels`` become TRL's ``completion_mask``.

    TRL rebuilds the labels as ``input_ids`` with -100 outside the mask, which equals the collator's labels: an
    answer token's label is its own id.
    """
    batch = dict(inputs)
    batch.pop(TALLY_KEY, None)  # the reference pass before training counts no rows: training meets them again
    labels = batch.pop("labels")
    kept = batch.pop("kept").to(labels.device)
    batch["completion_mask"] = (labels != IGNORE_INDEX).long()  # (2B, S)
    return batch, kept


@contextlib.contextmanager
def _fused_head_on_language_model():
    """While TRL builds the trainer, put its fused LM head on ``model.language_model`` instead of the audio model.

    The fused head runs the model's backbone and scores only the answer positions through the LM head, never
    materialising (2B, S, vocab) logits. The audio model's own forward embeds the audio and passes TRL's keywords
    (``fused_lm_head``, ``labels``) on to its causal LM, whose backbone TRL knows how to call.
    """
    original = trl_dpo.add_fused_lm_head
    trl_dpo.add_fused_lm_head = lambda model, **kwargs: add_fused_lm_head(unwrap(model).language_model, **kwargs)
    try:
        yield
    finally:
        trl_dpo.add_fused_lm_head = original


def load_reference(model_args: ModelArguments, args: DPOConfig, policy):
    """The frozen reference, or None where TRL needs none.

    LoRA: TRL switches the adapter off (the base weights are the reference). Precomputed log-probs: TRL scores the
    dataset with the policy before its first step. Otherwise a second copy of the starting weights, which TRL
    prepares for DeepSpeed (ZeRO-3 shards it like the policy).
    """
    if is_peft_model(policy) or (args.precompute_ref_log_probs and not args.fsdp):
        return None
    reference = AudioLLMForConditionalGeneration.from_pretrained(
        model_args.model_name_or_path,
        dtype=getattr(torch, model_args.model_dtype),
        attn_implementation=unwrap(policy).config._attn_implementation,
    )
    return reference.eval().requires_grad_(False)


def make_preference_collator(tokenizer, model, data_args: DataArguments, output_dir: str | None = None
                             ) -> PreferenceCollator:
    """The preference collator with the model's projector stacking, the recipe's length policy and bad-row log;
    with ``packing`` its batches tell the model to run the LLM packed (TRL's loss still reads them padded)."""
    return PreferenceCollator(
        tokenizer,
        max_length=data_args.max_length,
        stack=unwrap(model).config.projector_stack,
        overflow=data_args.overflow,
        system_prompt=data_args.system_prompt or None,
        data_root=data_args.data_root,
        max_audio_seconds=data_args.max_audio_seconds,
        bad_rows=bad_row_log(data_args, output_dir, run_ceiling=True),
        return_row_ids=True,
        pack_rows=packing_tokens(data_args, model),
    )


def parse_recipe(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, DPOConfig]:
    """The recipe (``--config x.yaml`` plus CLI overrides) as the shared dataclasses and TRL's DPOConfig.

    ``max_length`` and ``trust_remote_code`` are parsed once, as DPOConfig fields, and copied to the shared ones.
    """
    skip_cpu_shm_allreduce_op()  # before parsing, which starts the process group
    parser = TrlParser((without_fields(ModelArguments, SHARED_MODEL_FIELDS),
                        without_fields(DataArguments, SHARED_DATA_FIELDS), DPOConfig))
    model_fields, data_fields, args = parser.parse_args_and_config(argv)
    if args.max_length is None:
        raise ValueError("max_length: give the tokens per sequence (audio included); over-long pairs are dropped")
    model_args = ModelArguments(**dataclasses.asdict(model_fields), trust_remote_code=args.trust_remote_code)
    data_args = DataArguments(**dataclasses.asdict(data_fields), max_length=args.max_length)
    if data_args.augmentation is not None:  # the shared DataArguments has it; the preference collator does not
        raise ValueError("augmentation applies to pretraining and SFT rows only; remove it from the DPO recipe")
    if data_args.batch_tokens or data_args.batch_audio_seconds:
        raise ValueError("batch_tokens / batch_audio_seconds apply to pretraining and SFT; DPO batches "
                         "per_device_train_batch_size pairs (packing: true takes their padding out)")
    check_training_args(args)
    return model_args, data_args, args


def main(argv: list[str] | None = None, callbacks: list | None = None) -> None:
    """``callbacks``: more TrainerCallbacks for this run (the demo's thread sharing)."""
    model_args, data_args, args = parse_recipe(argv)

    model, tokenizer = load_model(model_args)
    ref_model = load_reference(model_args, args, model)

    train, evals = load_datasets(data_args, args)
    collator = make_preference_collator(tokenizer, model, data_args, args.output_dir)  # bad rows: skipped
    preflight(train, collator, data_args, args.seed)  # a mostly broken manifest stops here, not hours later

    trainer = AudioDPOTrainer(model, ref_model, args, collator, train, evals, processing_class=tokenizer,
                              max_bad_fraction=data_args.max_bad_fraction,  # one ceiling for ranks and workers
                              callbacks=callbacks)
    trainer.train(resume_from_checkpoint=latest_checkpoint(args.output_dir))

    save_final(trainer, "dpo", model_args, data_args, tokenizer)


if __name__ == "__main__":
    main()
