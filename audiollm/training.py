"""What the stages share: model preparation, data preparation, final save (their arguments: ``stage_args``).

The stages (``stages/*.py``) read top to bottom: parse the recipe, prepare the model, prepare the data, build the
Hugging Face / TRL trainer, train, save. Everything here works in a single plain process; DeepSpeed arrives only
through ``TrainingArguments.deepspeed`` and the launcher.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager

import numpy as np
import torch

from audiollm.augment import Augmentation, AugmentationError
from audiollm.bad_rows import BAD_ROWS_FILE, BadRowLog, check_ceiling, read_bad_rows
from audiollm.collator import ChatCollator
from audiollm.ctc import add_ctc_head
from audiollm.batching import TokenBudgetBatchSampler
from audiollm.crash_safety import final_save, save_trainer_state
from audiollm.data import add_lengths, load_mixture
from audiollm.model.attention import pick_attn_implementation
from audiollm.model.encoder import VARLEN_ATTENTION
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.model.trainable import set_trainable
from audiollm.packing import PackingCollator
from audiollm.stage_args import DataArguments, ModelArguments

log = logging.getLogger(__name__)

LLM_LORA_TARGETS = r"language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
ENCODER_LORA_TARGETS = r"audio_tower\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)"
# Files of a model folder that training does not rewrite but the next stage, eval and export need.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def skip_cpu_shm_allreduce_op() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on CPU ranks.

    On a CPU accelerator DeepSpeed's comm backend compiles ``deepspeed_shm_comm`` (C++, 30 s to over 7 min on 2
    cores, and the kernels need AVX2/AVX-512 or the ranks hang) when the process group starts. Only inference
    all-reduce uses it; ZeRO training reduces over gloo either way. Marking the op incompatible, in the dict
    DeepSpeed keeps for exactly that, makes the backend fall back to gloo at once. GPU runs are untouched.
    Call before the training arguments are parsed: parsing starts the process group.
    """
    if torch.cuda.is_available():
        return
    try:
        import deepspeed.ops
        from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
    except ImportError:  # DeepSpeed is an extra; a plain single-process run has nothing to skip
        return
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def check_training_args(args) -> None:
    """Settings every stage needs, whatever the recipe says.

    The collator reads the raw manifest columns (messages, audios), so the trainer must not drop them; and
    non-reentrant checkpointing works with a frozen encoder or embeddings (reentrant needs an input with grad).
    The seed is set here, before the stage builds its model: the Trainer seeds only once it is built, and a
    stage draws weights before that (a CTC head, new token rows, a whole codec). Without it those came from
    torch's per-process random seed, and two runs of one recipe trained different models. The process group, if
    any, is destroyed at exit (``destroy_process_group``).
    """
    from transformers import set_seed

    refuse_data_parallel(args)
    atexit.unregister(destroy_process_group)  # once, however many stages one process runs (the demo's four)
    atexit.register(destroy_process_group)
    set_seed(args.seed)
    args.remove_unused_columns = False
    if args.activation_checkpointing and not args.activation_checkpointing_kwargs:
        args.activation_checkpointing_kwargs = {"use_reentrant": False}


def refuse_data_parallel(args) -> None:
    """One process that sees several GPUs would have the Trainer split each batch over them with torch's
    DataParallel, which cuts every batch tensor into equal parts along its first axis on its own: rows, audio chunks
    and CTC targets no longer line up (a row's <|AUDIO|> placeholders meet another row's clip), and a packed batch
    (one row) cannot be split at all. One process per GPU keeps each batch whole."""
    from transformers.training_args import ParallelMode

    if args.n_gpu > 1 and args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
        raise ValueError(
            f"this process sees {args.n_gpu} GPUs, and one process cannot train on several (torch DataParallel "
            "splits rows and their audio apart): start one process per GPU, e.g. launch/train.sh STAGE CONFIG "
            f"{args.n_gpu} (DeepSpeed) or torchrun --nproc_per_node {args.n_gpu} stages/STAGE.py --config CONFIG; "
            "or train on one GPU with CUDA_VISIBLE_DEVICES=0")


def destroy_process_group() -> None:
    """Destroy torch.distributed's process group, if one is up: run at the interpreter's exit (``atexit``, while it is
    still whole). A rank that exits with its gloo group alive can die of SIGABRT after its work is done ("terminate
    called without an active exception"): gloo's worker threads still hold tensors when the interpreter tears down.
    A two-node test run saw it once: rank 1 finished and wrote its shards, then aborted, and its node exited 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def load_model(model_args: ModelArguments):
    """The model and tokenizer from ``model_name_or_path``, with the stage's trainable parts and LoRA applied."""
    from transformers import AutoTokenizer

    path = model_args.model_name_or_path
    model = AudioLLMForConditionalGeneration.from_pretrained(
        path,
        dtype=getattr(torch, model_args.model_dtype),
        attn_implementation=model_args.attn_implementation or pick_attn_implementation(),
        use_safetensors=True,  # never unpickle weights: a folder with only pytorch_model.bin is refused
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    set_trainable(model, encoder=model_args.train_encoder, projector=model_args.train_projector,
                  llm=model_args.train_llm)
    model.loss_chunk_tokens = model_args.lean_loss_chunk_tokens
    model.audio_tower.packed = model_args.packed_encoder
    if model_args.encoder_dropout is not None:
        model.audio_tower.set_dropout(model_args.encoder_dropout)
    if model_args.ctc_weight:
        add_ctc_head(model, model_args.ctc_weight, model_args.ctc_layer)
    if model_args.packed_encoder and model.config._attn_implementation not in VARLEN_ATTENTION:
        log.warning("packed_encoder on %s attends through one block-diagonal mask, (sum of clip lengths)^2 per "
                    "batch; attn_implementation: sdpa_packed attends per clip", model.config._attn_implementation)
    if model_args.uses_lora:
        model = add_lora(model, model_args)
    return model, tokenizer


def add_lora(model, model_args: ModelArguments):
    """One peft adapter over the chosen parts: rank ``llm_lora_r`` on the LLM, ``encoder_lora_r`` on the encoder.

    Fully trained parts (the projector, usually) go in ``modules_to_save`` so that the adapter checkpoint carries
    them and a disabled adapter (the DPO reference) sees their original weights.
    """
    from peft import LoraConfig, get_peft_model

    targets = [p for p, r in ((LLM_LORA_TARGETS, model_args.llm_lora_r),
                              (ENCODER_LORA_TARGETS, model_args.encoder_lora_r)) if r > 0]
    base_rank = model_args.llm_lora_r or model_args.encoder_lora_r
    rank_pattern = {ENCODER_LORA_TARGETS: model_args.encoder_lora_r} if len(targets) == 2 else {}
    config = LoraConfig(
        r=base_rank,
        lora_alpha=model_args.lora_alpha_ratio * base_rank,
        lora_dropout=model_args.lora_dropout,
        target_modules="|".join(f"(?:{t})" for t in targets),
        rank_pattern=rank_pattern,
        alpha_pattern={k: model_args.lora_alpha_ratio * v for k, v in rank_pattern.items()},
        modules_to_save=[name for name, on in (("multi_modal_projector", model_args.train_projector),
                                               ("audio_tower", model_args.train_encoder),
                                               ("language_model", model_args.train_llm)) if on],
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def load_datasets(data_args: DataArguments, args):
    """(train, eval or None) datasets of chat rows from the recipe's manifests, in any of the row formats.

    Length-grouped batching (``train_sampling_strategy: group_by_length``) gets its ``length`` column here, and
    streamed rows turn off accelerate's batch dispatching in ``args`` (below: why), before the trainer exists.
    """
    train = load_mixture(data_args.train_files, data_args.mix_weights, data_args.streaming, args.seed,
                         data_args.prompt_seed, bad_row_log(data_args, args.output_dir))  # unparseable lines
    evals = load_mixture(data_args.eval_files, prompt_seed=data_args.prompt_seed) if data_args.eval_files else None
    budget = data_args.batch_tokens or data_args.batch_audio_seconds
    if (args.train_sampling_strategy == "group_by_length" or budget) and not data_args.streaming:
        train = add_lengths(train)
    if data_args.streaming:
        # Streamed rows: each rank collates its own part of every step's rows. Accelerate's default for an
        # iterable dataset (rank 0 collates the step's batches and concatenates them to split them) fails on
        # audio batches, whose widths differ from rank to rank (its "batches of different size" error).
        args.accelerator_config.dispatch_batches = False
    return train, evals


def make_batch_sampler(train, data_args: DataArguments, args) -> TokenBudgetBatchSampler | None:
    """The recipe's token (or audio-seconds) budget batches for this rank, or None for fixed-size batches."""
    if not (data_args.batch_tokens or data_args.batch_audio_seconds):
        return None
    if data_args.batch_tokens and data_args.batch_audio_seconds:
        raise ValueError("give batch_tokens or batch_audio_seconds, not both")
    if data_args.streaming or args.train_sampling_strategy == "group_by_length":
        raise ValueError("batch_tokens / batch_audio_seconds group rows by length themselves: they need a "
                         "non-streamed dataset and no train_sampling_strategy: group_by_length")
    column, budget = ("length", data_args.batch_tokens) if data_args.batch_tokens else \
        ("seconds", data_args.batch_audio_seconds)
    sampler = TokenBudgetBatchSampler(train[column], budget, data_args.length_buckets,
                                      args.data_seed if args.data_seed is not None else args.seed,
                                      args.process_index, args.world_size)
    log.info("batches by %s <= %g: %s", column, budget, sampler.describe())
    if sampler.over_budget:
        log.warning("%d rows are longer than the budget of %g %s; each gets a batch of its own",
                    sampler.over_budget, budget, column)
    return sampler


def make_collator(tokenizer, model, data_args: DataArguments, output_dir: str | None = None,
                  train: bool = True, seed: int = 0, teacher_rows: str | None = None) -> ChatCollator | PackingCollator:
    """The chat collator with the model's projector stacking and the recipe's length policy, packed on request;
    ``train=False`` for evaluation rows: no augmentation. ``seed`` seeds the augmentation's draws.
    ``teacher_rows``: batches also carry these rows' text versions for a distillation teacher (audiollm.distill;
    ``DistillArguments.teacher_rows``); None: no teacher."""
    augment = augmentation(data_args, seed) if train else None
    collator = ChatCollator(
        tokenizer,
        max_length=data_args.max_length,
        stack=unwrap(model).config.projector_stack,
        train_on=data_args.train_on,
        overflow=data_args.overflow,
        system_prompt=data_args.system_prompt or None,
        data_root=data_args.data_root,
        max_audio_seconds=data_args.max_audio_seconds,
        bad_rows=bad_row_log(data_args, output_dir, run_ceiling=train),
        return_row_ids=True,
        augment=augment,
        teacher_rows=teacher_rows if train else None,
        ctc=train and getattr(unwrap(model), "ctc_head", None) is not None,
    )
    max_tokens = packing_tokens(data_args, model)
    return collator if max_tokens is None else PackingCollator(collator, max_tokens)


def packing_tokens(data_args: DataArguments, model) -> int | None:
    """Tokens per packed sequence for the recipe's ``packing`` (0: the whole batch in one), None when off;
    refuses what the model's attention cannot keep apart."""
    if not data_args.packing:
        return None
    attention = unwrap(model).config._attn_implementation
    if data_args.packing_max_tokens and attention == "flash_attention_2":
        raise ValueError("packing_max_tokens > 0 makes several packed sequences per batch, which flash-attention "
                         "cannot keep apart; set packing_max_tokens: 0 (one sequence per batch) or use sdpa")
    if attention in ("sdpa", "eager"):
        log.warning("packing on %s attends through one block-diagonal mask, (sum of lengths)^2 per sequence; "
                    "attn_implementation: sdpa_packed attends per row", attention)
    return data_args.packing_max_tokens


def augmentation(data_args: DataArguments, seed: int) -> Augmentation | None:
    """The recipe's ``augmentation`` (a mapping from YAML, or a JSON string from the command line), checked."""
    spec = data_args.augmentation
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise AugmentationError(f"augmentation: not a JSON mapping ({err}): {spec!r}") from None
    return Augmentation(spec, seed)


def bad_row_log(data_args: DataArguments, output_dir: str | None, run_ceiling: bool = False) -> BadRowLog:
    """Where the collator records skipped rows: ``output_dir/bad_rows.jsonl``, shared by all ranks and workers.
    ``run_ceiling``: a training collator's log, whose counts the trainer sums over all ranks and workers against
    one ceiling (the trainer's ``max_bad_fraction``); otherwise the log checks its own counts."""
    path = None
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, BAD_ROWS_FILE)
    return BadRowLog(path, data_args.max_bad_fraction, check=not run_ceiling)


def preflight(dataset, collator, data_args: DataArguments, seed: int = 0) -> None:
    """Encode ``preflight_rows`` rows (audio decoded) before training: a manifest with more than
    ``max_bad_fraction`` bad rows stops here, in seconds, instead of after hours. A manifest on disk gives a random
    sample; streamed data (no length, no random access) its first rows. Every rank checks the same rows, so all
    stop together."""
    if data_args.preflight_rows <= 0:
        return
    if hasattr(dataset, "__len__"):
        indices = np.random.default_rng(seed).permutation(len(dataset))[: data_args.preflight_rows]
        rows, which = (dataset[int(i)] for i in indices), "sampled"
    else:
        rows, which = itertools.islice(iter(dataset), data_args.preflight_rows), "first streamed"
    sample = BadRowLog(max_fraction=data_args.max_bad_fraction, check=False)  # checked once, over all of them
    chat = getattr(collator, "collator", collator)  # a PackingCollator wraps the ChatCollator that checks rows
    probe = dataclasses.replace(chat, bad_rows=sample, augment=None)  # checks the files, not the augmentation
    for row in rows:
        probe([row])  # the collator's own path: a chat row, a preference pair, packed or not
    check_ceiling(sample.seen, sample.total_bad, sample.max_fraction, 1, dict(sample.counts),
                  where=f" {which} before training")
    log.info("preflight: %d of %d %s rows are bad %s", sample.total_bad, sample.seen, which, dict(sample.counts))


def unwrap(model) -> AudioLLMForConditionalGeneration:
    """The AudioLLM model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (resume point), or None to start fresh.

    Checkpoints are renamed into place only once written (``audiollm.crash_safety``), so ``.saving/`` is never a
    candidate; a folder without ``trainer_state.json`` (written last, e.g. by an older tool) is passed over.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = [int(m.group(1)) for name in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", name))]
    for step in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, f"checkpoint-{step}")
        if os.path.isfile(os.path.join(folder, "trainer_state.json")):
            return folder
        log.warning("%s: no trainer_state.json, an unfinished checkpoint; not resuming from it", folder)
    return None


def save_final(trainer, stage: str, model_args: ModelArguments, data_args: DataArguments, tokenizer) -> None:
    """Write the output folder as a normal model folder that the next stage, eval and export can load.

    ZeRO-3 weights are gathered by the trainer (``stage3_gather_16bit_weights_on_model_save``). A LoRA run saves
    its adapter under ``adapter/`` and, on the main process, merges it into a full copy of the base. The folder
    also gets ``training_summary.json``: this stage appended to the previous stages' record, for the model card.
    Everything is written into ``.saving/final`` first and moved in with ``training_summary.json`` last, the
    marker of a finished stage (``audiollm.crash_safety.final_save``): a crash while saving leaves no half model.
    """
    from audiollm.model_card import SUMMARY_FILE, stage_entry, write_training_summary

    out = trainer.args.output_dir
    unwrap(trainer.model).save_ctc_head = False  # the CTC head trained this stage; the folder stays stock
    with final_save(trainer, last=("config.json", SUMMARY_FILE)) as staging:
        save_trainer_state(trainer, staging)  # the loss curve and metrics, for reports and plots
        if model_args.uses_lora:
            trainer.save_model(os.path.join(staging, "adapter"))
            if trainer.is_world_process_zero():
                merge_adapter(model_args.model_name_or_path, os.path.join(staging, "adapter"), staging)
        else:
            trainer.save_model(staging)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(staging)
            copy_processor_files(model_args.model_name_or_path, staging)
            rows = len(trainer.train_dataset) if hasattr(trainer.train_dataset, "__len__") else None
            entry = stage_entry(stage, model_args, data_args, trainer.args, trainer.state, rows,
                                getattr(trainer, "distill_args", None))
            entry["bad_rows_skipped"] = read_bad_rows(out)  # {kind: distinct rows}, over all ranks and workers
            write_training_summary(staging, model_args.model_name_or_path, entry)
    # Close trackers and the process group together: a gloo rank that exits while the group is still open can
    # abort ("terminate called ...").
    trainer.accelerator.end_training()


def merge_adapter(base_path: str, adapter_path: str, out: str) -> None:
    """Base folder + peft adapter -> one full model folder at ``out`` (on CPU, fp32)."""
    from peft import PeftModel

    with zero3_paused():  # only rank 0 merges; a ZeRO-3 load would wait for ranks that have finished
        base = AudioLLMForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
        merged.save_pretrained(out)
    log.info("merged the LoRA adapter %s into %s", adapter_path, out)


@contextmanager
def zero3_paused():
    """Load models in this process alone while a ZeRO-3 run's global DeepSpeed config is set."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def copy_processor_files(src: str, dst: str) -> None:
    """Carry the feature-extractor, processor, chat-template and generation configs to the next stage."""
    for name in PROCESSOR_FILES:
        if os.path.isfile(os.path.join(src, name)) and os.path.abspath(src) != os.path.abspath(dst):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
