"""A judge for open-ended answers: any local Hugging Face causal LM, prompted as AIR-Bench prompts GPT-4.

With a reference answer, the judge sees two answers and gives each a score from 1 to 10 (AIR-Bench chat's prompt
and output format: one line, two numbers). LLM judges favour one position, so every item is judged twice with the
two answers swapped and the model's two scores are averaged (the reference's too). Without a reference
(VoiceBench's open questions) the judge scores the one answer, once. A reply without readable scores leaves the
item unscored and is counted; nothing is guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from eval import metrics

# AIR-Bench chat's judge prompt (score_chat.py), with the audio description optional: only AIR-Bench ships one.
PAIR_PROMPT = (
    "You are a helpful and precise assistant for checking the quality of the answer.\n"
    "{context}[Question]\n{question}\n"
    "[The Start of Assistant 1s Answer]\n{first}\n[The End of Assistant 1s Answer]\n"
    "[The Start of Assistant 2s Answer]\n{second}\n[The End of Assistant 2s Answer]\n[System]\n"
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question{shown} displayed above.\n"
    "Please rate the helpfulness, relevance, accuracy, and comprehensiveness of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance. "
    "Please output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space."
)
SINGLE_PROMPT = (
    "You are a helpful and precise assistant for checking the quality of the answer.\n"
    "{context}[Question]\n{question}\n"
    "[The Start of the Assistant's Answer]\n{answer}\n[The End of the Assistant's Answer]\n[System]\n"
    "We would like to request your feedback on the performance of an AI assistant in response to the user "
    "question{shown} displayed above.\n"
    "Please rate the helpfulness, relevance, accuracy, and comprehensiveness of the response. The assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance. "
    "Please output a single line containing only the score."
)


def _context(context: str | None) -> tuple[str, str]:
    if context:
        return f"[Detailed Audio Description]\n{context}\n", " and audio description"
    return "", ""


def pair_prompt(question: str, first: str, second: str, context: str | None = None) -> str:
    block, shown = _context(context)
    return PAIR_PROMPT.format(context=block, question=question, first=first, second=second, shown=shown)


def single_prompt(question: str, answer: str, context: str | None = None) -> str:
    block, shown = _context(context)
    return SINGLE_PROMPT.format(context=block, question=question, answer=answer, shown=shown)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class Judge:
    """Scores open-ended records. ``complete`` maps prompts to replies; ``from_pretrained`` makes it an HF LM."""

    def __init__(self, complete: Callable[[list[str]], list[str]], name: str):
        self.complete = complete
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = None, dtype: str | None = None,
                        trust_remote_code: bool = False, batch_size: int = 4, max_new_tokens: int = 32) -> "Judge":
        """A local causal-LM folder; its own code runs only with ``trust_remote_code``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from eval.generate import pick_device, pick_dtype

        place = pick_device(device)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(  # no Hub kernels: see AudioLLMForConditionalGeneration
            path, dtype=pick_dtype(dtype, place), trust_remote_code=trust_remote_code, use_kernels=False
        ).to(place).eval()
        complete = HFCompleter(model, tokenizer, batch_size, max_new_tokens)
        return cls(complete, Path(path).resolve().name)

    def judge(self, records: list[dict]) -> list[dict]:
        """Per record: {"model_score", "reference_score", "outputs"}; scores are None when no reply parsed."""
        prompts, spans = [], []
        for record in records:
            question = record.get("question") or record.get("prompt") or ""
            answer, reference, context = record.get("prediction") or "", record.get("reference"), record.get("context")
            if reference:  # reference first, then the model first
                batch = [pair_prompt(question, reference, answer, context),
                         pair_prompt(question, answer, reference, context)]
            else:
                batch = [single_prompt(question, answer, context)]
            spans.append((len(prompts), len(batch)))
            prompts += batch
        replies = self.complete(prompts)
        return [self._read(replies[start : start + count]) for start, count in spans]

    @staticmethod
    def _read(replies: list[str]) -> dict:
        """Model and reference scores from the replies of one item (pair: reference first, then model first)."""
        model, reference = [], []
        if len(replies) == 1:
            scores = metrics.parse_judge_scores(replies[0], expected=1)
            model += scores or []
        else:
            first = metrics.parse_judge_scores(replies[0])  # Assistant 1 = reference, 2 = model
            second = metrics.parse_judge_scores(replies[1])  # Assistant 1 = model, 2 = reference
            if first:
                reference.append(first[0])
                model.append(first[1])
            if second:
                model.append(second[0])
                reference.append(second[1])
        return {"model_score": _mean(model), "reference_score": _mean(reference), "outputs": replies}


class HFCompleter:
    """Greedy completions of a causal LM in left-padded batches; prompts go through its chat template if any."""

    def __init__(self, model, tokenizer, batch_size: int = 4, max_new_tokens: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def render(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt + "\n"

    def __call__(self, prompts: list[str]) -> list[str]:
        import torch
        from tqdm.auto import tqdm

        replies = []
        templated = bool(getattr(self.tokenizer, "chat_template", None))  # the template already adds any BOS
        for start in tqdm(range(0, len(prompts), self.batch_size), desc="judge", unit="batch"):
            texts = [self.render(p) for p in prompts[start : start + self.batch_size]]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
            enc = {key: value.to(self.model.device) for key, value in enc.items()}
            with torch.no_grad():
                ids = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                                          pad_token_id=self.tokenizer.pad_token_id)
            new_ids = ids[:, enc["input_ids"].shape[1] :]
            replies += [text.strip() for text in self.tokenizer.batch_decode(new_ids, skip_special_tokens=True)]
        return replies
