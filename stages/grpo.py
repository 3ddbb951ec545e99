"""Stage 4 (optional), GRPO on audio: sampled answers to spoken prompts, scored by verifiable rewards.

For each prompt (audio + text), ``num_generations`` answers are sampled from the model; each is scored by the
recipe's reward functions (``audiollm/rewards.py``: exact match, MMAU choice, 1 - WER, format); an answer's
advantage is its reward minus its group's mean (scaled as ``scale_rewards`` says), and TRL's GRPO loss
(``loss_type``, clipping ``epsilon``, KL to the reference weighted by ``beta``) raises the log-probs of the better
answers. The loss, the sampling loop and the metrics are TRL's GRPOTrainer; this stage adds the audio: prompts are
encoded by the SFT collator, their encoder features travel with each sampled answer through TRL's shuffling and
splitting, and every forward pass (sampling, old and reference log-probs, the loss) sees them.

Run:  audiollm train grpo --config stages/configs/grpo.yaml [--key value ...]
Rows: any SFT row; its last assistant turn is the reference the rewards score against, the turns before it the
      prompt: {"messages": [{"role": "user", "content": "<audio>"}, {"role": "assistant", "content": "seven"}],
               "audios": ["clip.wav"]}        (other fields reach the rewards: "choices", "language", "normalizer")
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch
import trl.trainer.grpo_trainer as trl_grpo
from trl import GRPOConfig, GRPOTrainer, TrlParser
from trl.trainer.utils import RepeatSampler, add_fused_lm_head

from audiollm.audio import CHUNK_SAMPLES, featurize
from audiollm.augment import CollatorEpochs
from audiollm.bad_rows import check_ceiling
from audiollm.chat import AUDIO_SPECIAL_TOKENS
from audiollm.collator import ChatCollator, Encoded
from audiollm.crash_safety import CrashSafeTrainerMixin
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.rewards import reward_functions
from audiollm.stage_args import DataArguments, ModelArguments, without_fields
from audiollm.training import (
    augmentation,
    bad_row_log,
    check_training_args,
    latest_checkpoint,
    load_datasets,
    load_model,
    save_final,
    skip_cpu_shm_allreduce_op,
    unwrap,
)

log = logging.getLogger(__name__)

SHARED_MODEL_FIELDS = {"trust_remote_code"}  # GRPOConfig declares it too: parsed once, copied
AUDIO_KEYS = ("audio_features", "audio_feature_mask", "audio_chunks")  # per-row tensors in TRL's batch dict


@dataclass
class GRPOArguments:
    """What GRPO adds to the shared recipe keys; the rest (group size, beta, loss type...) is TRL's GRPOConfig."""

    rewards: list[str] = field(default_factory=lambda: ["exact"], metadata={"help": "Reward functions, summed "
                               "with reward_weights: exact, mcq, wer, format (audiollm/rewards.py) or "
                               "package.module:function."})


@dataclass
class AudioRows:
    """The encoder inputs of a batch of prompts filed per row, so that TRL shuffles and splits them with the rest of
    its batch: features (B, C, n_mels, T) of each row's 30 s chunks (C the most of any row), mask (B, C, T) and
    chunks (B,), how many of a row's C slots are real."""

    features: torch.Tensor
    mask: torch.Tensor
    chunks: torch.Tensor

    @classmethod
    def of(cls, rows: list[Encoded], stack: int) -> AudioRows:
        """All clips of ``rows`` featurized in one batch (exactly what sampling sees), then filed per row."""
        per_row = [sum(max(1, math.ceil(len(clip) / CHUNK_SAMPLES)) for clip in row.clips) for row in rows]
        if not any(per_row):
            empty = torch.zeros(len(rows), 0, 0)
            return cls(empty[..., None], empty.long(), torch.zeros(len(rows), dtype=torch.long))
        names = [f"{row.row_id} audio {k}" for row in rows for k in range(len(row.clips))]
        audio = featurize([clip for row in rows for clip in row.clips], names, stack)
        features = audio.input_features.new_zeros(len(rows), max(per_row), *audio.input_features.shape[1:])
        mask = audio.feature_attention_mask.new_zeros(len(rows), max(per_row), audio.feature_attention_mask.shape[1])
        start = 0
        for i, n in enumerate(per_row):
            features[i, :n] = audio.input_features[start:start + n]
            mask[i, :n] = audio.feature_attention_mask[start:start + n]
            start += n
        return cls(features, mask, torch.tensor(per_row))

    def take(self, index: list[int]) -> AudioRows:
        """Rows ``index`` of these (repeats allowed): a group's copies of a prompt share one featurized row."""
        index = torch.tensor(index, dtype=torch.long)
        return AudioRows(self.features[index], self.mask[index], self.chunks[index])

    def model_inputs(self, start: int = 0, end: int | None = None) -> dict:
        """``input_features`` (N, n_mels, T) and ``feature_attention_mask`` (N, T) of rows start:end, in row order."""
        chunks = self.chunks[start:end]
        if int(chunks.sum()) == 0:
            return {}
        real = torch.arange(self.features.shape[1], device=chunks.device)[None, :] < chunks[:, None]  # (b, C)
        return {"input_features": self.features[start:end][real],
                "feature_attention_mask": self.mask[start:end][real]}

    def as_batch(self) -> dict:
        return dict(zip(AUDIO_KEYS, (self.features, self.mask, self.chunks)))

    @classmethod
    def from_batch(cls, batch: dict) -> AudioRows:
        return cls(*(batch[key] for key in AUDIO_KEYS))


class AudioGRPOTrainer(CrashSafeTrainerMixin, GRPOTrainer):
    """TRL's GRPOTrainer on ``AudioLLMForConditionalGeneration`` and spoken prompts.

    TRL samples, scores and computes the loss unchanged; four hooks bring the audio in. ``_tokenize_prompts``
    encodes the batch's rows with ``prompt_collator`` (placeholders expanded, clips featurized) and hands the
    features to TRL's ``generate`` call; ``_get_per_token_logps_and_entropies`` gives them to every scoring forward;
    ``_generate_and_score_completions`` files them per row in TRL's batch, and ``_compute_loss`` takes them back
    from the shuffled, split batch. Sampling runs on ``model.generate`` (vLLM and continuous batching know no audio).
    """

    def __init__(self, model, reward_funcs, args: GRPOConfig, prompt_collator: ChatCollator, train_dataset,
                 eval_dataset=None, eval_prompt_collator: ChatCollator | None = None):
        if args.use_vllm or args.use_transformers_continuous_batching:
            raise ValueError("use_vllm / use_transformers_continuous_batching: neither passes audio to the model; "
                             "set both to false (sampling runs on the model's generate)")
        audio_model = unwrap(model)
        if not hasattr(audio_model, "generation_config"):
            audio_model.generation_config = audio_model.language_model.generation_config
        tokenizer = prompt_collator.tokenizer
        # A sampled audio placeholder would have no features behind it.
        suppress = [tokenizer.convert_tokens_to_ids(t) for t in AUDIO_SPECIAL_TOKENS]
        args.generation_kwargs = {"suppress_tokens": suppress, **(args.generation_kwargs or {})}
        self.prompt_collator = prompt_collator  # training prompts: augmented when the recipe says so
        self.eval_prompt_collator = eval_prompt_collator or dataclasses.replace(prompt_collator, augment=None)
        self._rows: list[dict] | None = None  # the generation batch's rows, while TRL samples for them
        self._audio: AudioRows | None = None  # the audio of the rows whose log-probs are being computed
        with _audio_model_in_trl():
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=tokenizer,
                             callbacks=[CollatorEpochs(prompt_collator)])  # the epoch augmentation draws for

    def _get_train_sampler(self, dataset=None) -> EpochRepeatSampler:
        return EpochRepeatSampler.like(super()._get_train_sampler(dataset))

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        """TRL's sampling and scoring of a generation batch, with each row's audio added to the batch it returns."""
        self._rows = inputs
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._rows = None
        output.update(self._audio.as_batch())  # (B, ...) tensors: TRL shuffles and splits them with the answers
        return output

    def _tokenize_prompts(self, prompts: list):
        """Prompt ids (audio placeholders expanded) and the encoder features that TRL passes to ``generate``."""
        collator = self.prompt_collator if self.model.training else self.eval_prompt_collator
        # TRL repeats each prompt num_generations times. Its copies share the row's id: each distinct row is read,
        # encoded and featurized once, and its copies hear the same (augmented) clip, drawn per row and epoch
        # (4 demo prompts x 8: 57.5 -> 9.3 ms per generation batch on one thread, the same ids and features).
        distinct, slots = {}, []
        for i, row in enumerate(self._rows):
            key = ("id", row["id"]) if "id" in row else ("position", i)
            if key not in distinct:
                distinct[key] = (len(distinct), collator.encode(as_prompt(row), i))
            slots.append(distinct[key][0])
        rows = [encoded for _, encoded in distinct.values()]
        self._audio = AudioRows.of(rows, collator.stack).take(slots)
        return [rows[slot].input_ids for slot in slots], None, self._audio.model_inputs()

    def _compute_loss(self, model, inputs):
        self._audio = AudioRows.from_batch(inputs)
        return super()._compute_loss(model, inputs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **_image_fields):
        """TRL's per-token log-probs (and entropies) of the last ``logits_to_keep`` tokens, (B, logits_to_keep),
        from forwards that see each row's audio; computed ``batch_size`` rows at a time, like TRL's own."""
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            ids, mask = input_ids[start:end], attention_mask[start:end]
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100  # only the answer tokens are scored
            with self.accelerator.autocast():
                out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True,
                            **self._audio.model_inputs(start, end))
            logps.append(out.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(out.entropy[:, -logits_to_keep:])
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None


class EpochRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler (each prompt ``num_generations`` times, groups kept on one step), whose order is drawn
    from (seed, epoch) alone. TRL's draws each epoch from where the previous one left its generator, so a run
    resumed in a later epoch would see another order than the run that was never stopped."""

    @classmethod
    def like(cls, sampler: RepeatSampler) -> EpochRepeatSampler:
        return cls(sampler.data_source, sampler.mini_repeat_count, sampler.batch_size, sampler.repeat_count,
                   sampler.shuffle, sampler.seed)

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer's data loader at the start of every epoch, also the one a resumed run starts in."""
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + epoch)


@contextlib.contextmanager
def _audio_model_in_trl():
    """While TRL builds the trainer: its fused LM head goes on ``model.language_model`` (as in the DPO stage), and
    the reference it loads for ``beta > 0`` is an AudioLLM model, not an Auto class."""
    originals = trl_grpo.add_fused_lm_head, trl_grpo.create_model_from_path
    trl_grpo.add_fused_lm_head = lambda model, **kwargs: add_fused_lm_head(unwrap(model).language_model, **kwargs)
    trl_grpo.create_model_from_path = lambda path, **kwargs: AudioLLMForConditionalGeneration.from_pretrained(
        path, dtype=kwargs.get("dtype"), attn_implementation=kwargs.get("attn_implementation"))
    try:
        yield
    finally:
        trl_grpo.add_fused_lm_head, trl_grpo.create_model_from_path = originals


def prompt_row(row: dict) -> dict:
    """A chat row as a GRPO prompt: the turns before its last assistant turn (``prompt``), and that turn's text as
    the reference the rewards read (``answer``); a row that ends with the user turn keeps ``answer`` if it has one."""
    messages = list(row["messages"])
    answer = row.get("answer") or ""
    if messages and messages[-1]["role"] == "assistant":
        answer = messages.pop()["content"]
    return {"prompt": messages, "answer": answer}


def as_prompt(row: dict) -> dict:
    """The row the prompt collator encodes: its prompt turns as ``messages``."""
    return {**row, "messages": row["prompt"]}


def make_prompt_collator(tokenizer, model, data_args: DataArguments, args: GRPOConfig, train: bool = True
                         ) -> ChatCollator:
    """The generation collator of the prompts, which must leave ``max_completion_length`` tokens in ``max_length``;
    training prompts' clips are augmented as the recipe's ``augmentation`` says."""
    if args.max_completion_length >= data_args.max_length:
        raise ValueError(f"max_completion_length {args.max_completion_length} leaves no room for the prompt in "
                         f"max_length {data_args.max_length}")
    return ChatCollator(tokenizer, max_length=data_args.max_length - args.max_completion_length,
                        stack=unwrap(model).config.projector_stack, overflow="drop",
                        system_prompt=data_args.system_prompt or None, generation=True, data_root=data_args.data_root,
                        max_audio_seconds=data_args.max_audio_seconds,
                        augment=augmentation(data_args, args.seed) if train else None)


def usable_prompts(dataset, collator: ChatCollator, data_args: DataArguments, output_dir: str):
    """The dataset without the rows it cannot sample for (missing or corrupt audio, a placeholder count that does
    not match the audio list, a prompt over max_length...), each recorded in ``output_dir/bad_rows.jsonl``.

    GRPO samples a whole group per prompt, so a bad row cannot be skipped inside a batch: every row is checked
    (audio decoded) once, before training. More than ``max_bad_fraction`` bad rows stop the run here.
    """
    checked = dataclasses.replace(collator, bad_rows=bad_row_log(data_args, output_dir, run_ceiling=True),
                                  augment=None)  # checks the files, not the augmentation
    keep = []
    for i in range(len(dataset)):
        row = dataset[i]
        if checked.usable(as_prompt(row), i) is not None:
            keep.append(i)
    bad = checked.bad_rows
    check_ceiling(bad.seen, bad.total_bad, bad.max_fraction, 1, dict(bad.counts), bad.path)
    log.info("GRPO prompts: %d of %d usable; skipped %s", len(keep), len(dataset), dict(bad.counts))
    return dataset if len(keep) == len(dataset) else dataset.select(keep)


def parse_recipe(argv: list[str] | None = None):
    """The recipe as the shared dataclasses, the GRPO rewards and TRL's GRPOConfig."""
    skip_cpu_shm_allreduce_op()  # before parsing, which starts the process group
    parser = TrlParser((without_fields(ModelArguments, SHARED_MODEL_FIELDS), DataArguments, GRPOArguments,
                        GRPOConfig))
    model_fields, data_args, grpo_args, args = parser.parse_args_and_config(argv)
    model_args = ModelArguments(**dataclasses.asdict(model_fields), trust_remote_code=args.trust_remote_code)
    if data_args.streaming:
        raise ValueError("streaming: GRPO checks every prompt before training and samples groups by index; "
                         "give a manifest on disk")
    for key in ("batch_tokens", "batch_audio_seconds", "packing"):
        if getattr(data_args, key):
            raise ValueError(f"{key} applies to pretraining and SFT batches; remove it from the GRPO recipe")
    reward_functions(grpo_args.rewards)  # an unknown name fails here, not after the model has loaded
    check_training_args(args)
    return model_args, data_args, grpo_args, args


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, grpo_args, args = parse_recipe(argv)

    model, tokenizer = load_model(model_args)

    train, evals = load_datasets(data_args, args)
    train = train.map(prompt_row)
    evals = evals.map(prompt_row) if evals is not None else None
    collator = make_prompt_collator(tokenizer, model, data_args, args)
    train = usable_prompts(train, collator, data_args, args.output_dir)  # bad rows: skipped and counted

    eval_collator = make_prompt_collator(tokenizer, model, data_args, args, train=False)  # audio as it is
    trainer = AudioGRPOTrainer(model, reward_functions(grpo_args.rewards), args, collator, train, evals,
                               eval_collator)
    trainer.train(resume_from_checkpoint=latest_checkpoint(args.output_dir))

    save_final(trainer, "grpo", model_args, data_args, tokenizer)


if __name__ == "__main__":
    main()
