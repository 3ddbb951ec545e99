"""What ``audiollm export`` can read, loaded in fp32 on CPU: ``load_source()``.

- a model folder (``audiollm init`` or a stage's output);
- a Trainer ``checkpoint-N`` with DeepSpeed ZeRO (2 or 3) shards ``global_stepN/*``: consolidated on CPU, without a
  GPU, unpickled weights-only (they hold the fp32 master weights);
- a peft LoRA adapter on its base folder, merged (``merge_lora``), since stock transformers needs full weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from audiollm.build import BuildError
from audiollm.model.modeling import AudioLLMForConditionalGeneration

log = logging.getLogger(__name__)

CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")


class ExportError(BuildError):
    """An input or request the exporter cannot serve; the message names the path and what to do."""


@dataclass
class Source:
    """A loaded model and where its tokenizer, processor and training records may be found."""

    model: AudioLLMForConditionalGeneration  # fp32, on CPU
    folders: list[Path]  # searched in order for tokenizer / processor / generation config / training records
    kind: str  # "folder", "zero checkpoint" or "LoRA adapter merged into its base"
    adapter: dict | None = None  # adapter_config.json of a merged adapter
    base_models: tuple[str, ...] = ()  # Hub ids the model derives from, for the card's metadata


# --------------------------------------------------------------------------------------------------- inputs


def _run_folders(folder: Path) -> list[Path]:
    """The folder, then its run folder when it is a ``checkpoint-N`` or a run's ``adapter/``."""
    if CHECKPOINT_DIR.match(folder.name) or folder.name == "adapter":
        return [folder, folder.parent]
    return [folder]


def _zero_shards(folder: Path) -> Path | None:
    """The ``global_stepN`` folder named by a DeepSpeed checkpoint's ``latest`` file, if this is one."""
    latest = folder / "latest"
    if not latest.is_file():
        return None
    tag = folder / latest.read_text().strip()
    return tag if tag.is_dir() and any(tag.glob("*_optim_states.pt")) else None


@contextmanager
def _weights_only_torch_load():
    """Make DeepSpeed's consolidation unpickle weights-only.

    DeepSpeed's ``zero_to_fp32`` unpickles its files with weights-only loading turned off, which runs whatever a
    pickle asks. Its files hold tensors, plain containers and two DeepSpeed classes (the loss scaler and the ZeRO
    stage enum); allowing just those lets the loader run with ``weights_only=True`` and refuse anything else.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum]):
            return original(*args, **kwargs)

    with mock.patch.object(torch, "load", load):
        yield


def consolidate_zero(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A DeepSpeed ZeRO (2 or 3) checkpoint folder -> the full fp32 state dict, on CPU, without a GPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with _weights_only_torch_load():
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    except Exception as err:  # a pickle with other globals, a missing rank's shard, a truncated file
        raise ExportError(f"{checkpoint}: cannot consolidate the ZeRO shards: {type(err).__name__}: {err}") from err


def _load_zero(folder: Path) -> AudioLLMForConditionalGeneration:
    """Build the model from the checkpoint's config.json and fill it from the consolidated ZeRO shards."""
    from transformers.initialization import no_init_weights

    from audiollm.model.config import AudioLLMConfig

    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: a ZeRO checkpoint without config.json; export the run folder instead")
    config = AudioLLMConfig.from_pretrained(folder)
    state_dict = consolidate_zero(folder)
    with no_init_weights():  # every weight comes from the shards: skip the random init (minutes for 7B)
        model = AudioLLMForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = config.text_config.tie_word_embeddings
    missing = [name for name in missing if not (tied and name.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ExportError(f"{folder}: the ZeRO shards do not fit config.json: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]} (a LoRA run's checkpoint needs its adapter_config.json)")
    model.tie_weights()
    return model.float().eval()


def _adapter_config(folder: Path, merge_lora: bool) -> dict:
    """adapter_config.json, once it is clear the user asked for the merge that stock loading needs."""
    if not merge_lora:
        raise ExportError(f"{folder}: this is a LoRA adapter; stock transformers needs full weights: pass "
                          "--merge-lora to merge it into its base (and --base PATH if the base moved)")
    return json.loads((folder / "adapter_config.json").read_text())


def _adapter_base(adapter_config: dict, folder: Path, base: str | None) -> Path:
    """The local base folder of an adapter: --base, else adapter_config.json's base_model_name_or_path."""
    recorded = adapter_config.get("base_model_name_or_path")
    path = Path(base) if base else (Path(recorded) if recorded else None)
    if path is None or not (path / "config.json").is_file():
        raise ExportError(f"{folder}: the adapter's base model {str(path or recorded)!r} is not a local model "
                          "folder; pass --base PATH (the folder the LoRA run started from)")
    return path


def _load_adapter(folder: Path, base: str | None, merge_lora: bool) -> Source:
    """Merge a peft adapter (LoRA weights plus any modules_to_save, e.g. the projector) into its base."""
    from peft import PeftModel

    adapter_config = _adapter_config(folder, merge_lora)
    base_path = _adapter_base(adapter_config, folder, base)
    model = AudioLLMForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, folder).merge_and_unload()
    recorded = adapter_config.get("base_model_name_or_path")
    log.info("merged the LoRA adapter %s into %s", folder, base_path)
    return Source(merged.eval(), [*_run_folders(folder), base_path], "LoRA adapter merged into its base",
                  adapter_config, (recorded,) if recorded else ())


def source_config(model_path: str | os.PathLike, base: str | None = None, merge_lora: bool = False):
    """The model's config, read before any weights: an adapter's from its base, others from their config.json."""
    from audiollm.model.config import AudioLLMConfig

    folder = Path(model_path)
    if (folder / "adapter_config.json").is_file():
        folder = _adapter_base(_adapter_config(folder, merge_lora), folder, base)
    if not (folder / "config.json").is_file():
        checkpoints = sorted((p for p in folder.glob("checkpoint-*") if CHECKPOINT_DIR.match(p.name)),
                             key=lambda p: int(p.name.split("-")[1]))
        hint = f"; the run did not finish: export {checkpoints[-1]}" if checkpoints else ""
        raise ExportError(f"{folder}: no config.json, adapter_config.json or ZeRO checkpoint; nothing to export{hint}")
    return AudioLLMConfig.from_pretrained(folder)


def load_source(model_path: str | os.PathLike, base: str | None = None, merge_lora: bool = False) -> Source:
    """Load any export input in fp32 on CPU; see the module docstring for what counts as an input."""
    folder = Path(model_path)
    if not folder.is_dir():
        raise ExportError(f"{folder}: not found; pass a model folder, a checkpoint-N folder or a LoRA adapter")
    extra = [Path(base)] if base else []
    if (folder / "adapter_config.json").is_file():
        return _load_adapter(folder, base, merge_lora)
    if merge_lora:
        log.warning("%s holds full weights (no adapter_config.json): --merge-lora has nothing to merge", folder)
    shards = _zero_shards(folder)
    if shards is not None:
        log.info("consolidating the ZeRO shards in %s (fp32 master weights)", shards)
        return Source(_load_zero(folder), [*_run_folders(folder), *extra], "ZeRO checkpoint")
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: no config.json, adapter_config.json or ZeRO shards; nothing to export")
    model = AudioLLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return Source(model.eval(), [*_run_folders(folder), *extra], "model folder")
