"""The model side of evaluation: load a model folder, generate answers in left-padded batches, score preferences.

Prompts are built by ``ChatCollator(generation=True)``, the same code that built the training batches, so the eval
prompt is exactly the trained template (system prompt, numbered audio lines, unpadded audio features).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from audiollm.chat import ENDOFTEXT, IM_END
from audiollm.collator import IGNORE_INDEX, ChatCollator
from audiollm.data import audio_seconds, estimated_tokens
from eval.items import EvalError, Item
from eval.tasks import build_messages

NO_LENGTH_LIMIT = sys.maxsize  # eval never drops or trims a prompt: a long one is the model's problem to report
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class GenerationSettings:
    """Decoding settings; temperature 0 means greedy (and top_p is then unused). ``num_beams`` > 1 keeps that many
    partial answers each step and returns the most probable finished one (beam search; with a temperature, beams
    that sample), at about ``num_beams`` times the decoding cost."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    num_beams: int = 1

    def as_dict(self) -> dict:
        return asdict(self)

    def kwargs(self) -> dict:
        beams = {"num_beams": self.num_beams, "early_stopping": True} if self.num_beams > 1 else {}
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens, **beams}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, **beams}


def pick_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def pick_dtype(dtype: str | None, device: torch.device):
    """fp32 on CPU (bf16 matmuls are slow there), the folder's stored dtype on a GPU, unless one is named."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else "auto"
    if dtype not in DTYPES:
        raise EvalError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(model_dir: str, device: str | None = None, dtype: str | None = None):
    """(model, tokenizer) of a folder written by ``audiollm init`` / training, or a stock Qwen2-Audio folder."""
    from transformers import AutoTokenizer

    from audiollm.model.modeling import AudioLLMForConditionalGeneration

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise EvalError(f"{folder}: no config.json; pass a model folder (audiollm init / a training output)")
    place = pick_device(device)
    model = AudioLLMForConditionalGeneration.from_pretrained(folder, dtype=pick_dtype(dtype, place),
                                                             use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:  # left padding needs some pad id; the mask hides it
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(place).eval(), tokenizer


def stop_ids(tokenizer) -> list[int]:
    """End of a chat turn or of a document, like Qwen2-Audio's generation config."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[token] for token in (IM_END, ENDOFTEXT) if token in vocab]
    return ids or [tokenizer.eos_token_id]


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def item_length(item: Item) -> int:
    """Estimated prompt tokens of an item (audio from file headers, text by characters): a sort key only."""
    texts = [m["content"] for m in build_messages(item)]
    return estimated_tokens(texts, sum(audio_seconds(source) for source in item.audios), len(item.audios))


def batch_order(items: list[Item], size: int, by_length: bool = True) -> list[list[int]]:
    """Item indices in batches of ``size``: longest first when ``by_length`` (a batch pads to its longest prompt
    and decodes until its longest answer, so similar prompts together waste fewer positions; the longest batch
    first shows an out-of-memory at once), else in file order. Ties keep file order."""
    order = list(range(len(items)))
    if by_length:
        lengths = [item_length(item) for item in items]
        order.sort(key=lambda i: -lengths[i])
    return [order[start : start + size] for start in range(0, len(order), size)]


def _on_device(batch: dict, model) -> dict:
    """Move a collated batch to the model; audio features take the model's dtype (bf16 weights need bf16 input)."""
    moved = {key: value.to(model.device) for key, value in batch.items()}
    if "input_features" in moved:
        moved["input_features"] = moved["input_features"].to(model.dtype)
    return moved


def _collate(collator: ChatCollator, rows: list[dict]) -> dict:
    batch = collator(rows)
    if batch["input_ids"].shape[0] != len(rows):  # cannot happen without a length limit; never misalign answers
        raise EvalError(f"the collator dropped rows of the batch starting at {rows[0]['id']}")
    return batch


def generate_answers(model, tokenizer, items: list[Item], settings: GenerationSettings, batch_size: int = 8,
                     desc: str = "generate", by_length: bool = True) -> list[str]:
    """One decoded answer per item (special tokens dropped, whitespace stripped), in item order whatever the
    batch order (``batch_order``)."""
    from tqdm.auto import tqdm

    collator = ChatCollator(tokenizer, max_length=NO_LENGTH_LIMIT, stack=model.config.projector_stack,
                            generation=True)
    torch.manual_seed(settings.seed)  # sampling is reproducible run to run
    answers: list[str | None] = [None] * len(items)
    with tqdm(total=len(items), desc=desc, unit="item") as bar:
        for indices in batch_order(items, batch_size, by_length):
            chunk = [items[i] for i in indices]
            rows = [{"id": item.id, "messages": build_messages(item), "audios": item.audios} for item in chunk]
            batch = _on_device(_collate(collator, rows), model)
            ids = model.generate(**batch, **settings.kwargs(), eos_token_id=stop_ids(tokenizer),
                                 pad_token_id=tokenizer.pad_token_id)
            new_ids = ids[:, batch["input_ids"].shape[1] :]  # generate returns prompt + new ids
            for i, text in zip(indices, tokenizer.batch_decode(new_ids, skip_special_tokens=True)):
                answers[i] = text.strip()
            bar.update(len(chunk))
    return answers


@torch.no_grad()
def answer_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens (the answer and its end-of-turn), shape (B,)."""
    labels = batch["labels"][:, 1:]  # token t is predicted from position t - 1
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * mask).sum(dim=-1)


def preference_logps(model, tokenizer, items: list[Item], batch_size: int = 8,
                     desc: str = "preference", by_length: bool = True) -> list[tuple[float, float]]:
    """(chosen, rejected) summed answer log-probabilities per preference item, in item order.

    Each answer is appended to the prompt as the last assistant turn; ``train_on="last"`` puts labels on exactly
    that answer (and its ``<|im_end|>``), as DPO scores it.
    """
    from tqdm.auto import tqdm

    collator = ChatCollator(tokenizer, max_length=NO_LENGTH_LIMIT, stack=model.config.projector_stack,
                            train_on="last")
    pairs: list[tuple[float, float] | None] = [None] * len(items)
    with tqdm(total=len(items), desc=desc, unit="item") as bar:
        for indices in batch_order(items, batch_size, by_length):
            chunk = [items[i] for i in indices]
            rows = [
                {"id": item.id, "audios": item.audios,
                 "messages": build_messages(item) + [{"role": "assistant", "content": getattr(item, side)}]}
                for side in ("chosen", "rejected")
                for item in chunk
            ]  # every chosen row first, then every rejected row
            logps = answer_logps(model, _on_device(_collate(collator, rows), model)).tolist()
            for i, chosen, rejected in zip(indices, logps[: len(chunk)], logps[len(chunk) :]):
                pairs[i] = (chosen, rejected)
            bar.update(len(chunk))
    return pairs
