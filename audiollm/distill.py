"""Knowledge distillation from the text LLM: the student hears the question, a frozen teacher reads its transcript.

Ultravox trains its audio path this way: a row's audio carries a transcript, the teacher (the text LLM the audio
model was built from) reads the prompt with each ``<audio>`` replaced by its transcript, the student reads the
audio, and the loss on the answer tokens is KL(teacher || student) between their next-token distributions. The
student then learns to answer the spoken question as the LLM answers the typed one, instead of re-learning (and
overwriting) the LLM's knowledge from the answers alone.

Rows carry transcripts as ``"transcripts": ["...", ...]``, one per entry of ``audios``. Per labelled token:

    kd rows:  (1 - kd_ce_weight) * T^2 * KL(softmax(t / T) || softmax(s / T)) + kd_ce_weight * CE(s, answer)
    others:   CE(s, answer)                     (counted as ``kd_fallback_rows``)

summed and divided by the batch's labelled tokens (or the Trainer's ``num_items_in_batch`` over the accumulated
micro-batches), as the cross-entropy is: gradient accumulation and a mix of both kinds of rows weigh every answer
token alike. T^2 keeps the gradient's size independent of the temperature (Hinton et al. 2015).

Which rows are distilled (``kd_rows``): by default only rows whose every clip is a whole user turn, the user's
message spoken (voice chat). There the transcript is the same message typed, and the teacher's answer is the one to
copy. A row that asks about its audio ("<audio>Transcribe the speech.", "<audio>Is the speaker male or female?")
keeps the cross-entropy: given the transcript, the teacher is handed a transcription's answer, and cannot know who
spoke. Such rows carry transcripts anyway when the encoder's CTC loss reads them (``ctc_weight``); distilling them
too made the demo's SFT forget transcription (validation WER 0.31 -> 1.02). ``kd_rows: all`` distils every row with
transcripts.

The teacher runs in the same training step under ``no_grad`` rather than being precomputed like DPO's reference:
DPO needs one log-probability per answer, distillation a whole distribution per answer token (151,936 floats for
Qwen, 0.6 MB a token), which no cache can hold for a corpus; the teacher's forward costs about a third of the
student's (text only, no encoder, no backward). It lives on the trainer, not inside the model: the optimizer and
DeepSpeed never see its weights.

Alignment: the teacher's rows are padded text, the student's may be packed (``audiollm/packing.py``) and hold audio
tokens, so absolute positions differ. The answer tokens of a row are the same token ids in the same order on both
sides, so the k-th labelled prediction of the student's kd rows (row-major) pairs with the k-th of the teacher's;
the loss checks that the paired target ids are equal.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from audiollm.chat import AUDIO_MARKER
from audiollm.loss import DEFAULT_CHUNK_TOKENS, IGNORE_INDEX, shift_labels
from audiollm.ranks import summed_over_ranks
from audiollm.row_checks import RowError

log = logging.getLogger(__name__)

# Batch keys of the teacher's text rows (padded on the right), the kd rows' labels in the student's layout, and the
# batch's row counts [distilled, without transcripts, answer mismatch]; packing passes the first four through.
TEACHER_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels")
KD_LABELS, KD_COUNTS = "kd_labels", "kd_row_counts"
LOSSES = ("ce", "kd")
KD_ROW_KINDS = ("spoken", "all")


@dataclass
class DistillArguments:
    """The training loss: cross-entropy, or distillation from the text LLM on rows that carry transcripts."""

    loss: str = field(default="ce", metadata={"help": "ce: cross-entropy on the answers; kd: KL(teacher || "
                      "student) on the answers of rows with 'transcripts', the teacher reading them as text "
                      "(audiollm/distill.py); rows without transcripts fall back to cross-entropy."})
    kd_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of both distributions; "
                                  "the KL is scaled by T^2."})
    kd_ce_weight: float = field(default=0.0, metadata={"help": "On distilled rows, this share of each answer "
                                "token's loss is cross-entropy, the rest the KL; 0: pure distillation."})
    kd_teacher: str | None = field(default=None, metadata={"help": "Folder of the teacher: an audiollm model "
                                   "(its LLM is used) or a causal LM with the same vocabulary; default: "
                                   "model_name_or_path, i.e. the model's own LLM as it was at the start."})
    kd_rows: str = field(default="spoken", metadata={"help": "spoken: distil only rows whose every clip is a "
                         "whole user turn (a spoken message; its transcript is the message typed); rows that ask "
                         "about their audio keep the cross-entropy. all: every row with transcripts."})

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if not 0.0 <= self.kd_ce_weight <= 1.0:
            raise ValueError(f"kd_ce_weight is a share in [0, 1], got {self.kd_ce_weight}")
        if self.kd_rows not in KD_ROW_KINDS:
            raise ValueError(f"kd_rows must be one of {KD_ROW_KINDS}, got {self.kd_rows!r}")

    @property
    def enabled(self) -> bool:
        return self.loss == "kd"

    @property
    def teacher_rows(self) -> str | None:
        """Which rows the collator writes out as text for the teacher (``kd_rows``); None without distillation."""
        return self.kd_rows if self.enabled else None


# ----------------------------------------------------------------------------------------------- rows -> batch


def text_version(row: dict, row_id: str) -> dict | None:
    """The row as the teacher reads it: each ``<audio>`` (in order over the turns) replaced by its transcript, no
    audio; None when the row has no ``transcripts``. Raises RowError when they do not match the audios one to one.

    A transcript followed by more text in the same turn ("<audio>Repeat the second word.") gets a newline after
    it, as the student's audio line does."""
    transcripts = row.get("transcripts")
    if transcripts is None:
        return None
    audios = row.get("audios") or []
    if not isinstance(transcripts, list) or not all(isinstance(t, str) for t in transcripts):
        raise RowError(f"{row_id}: 'transcripts' must be a list of strings, one per audio", "transcript_mismatch")
    if len(transcripts) != len(audios):
        raise RowError(f"{row_id}: {len(transcripts)} transcript(s) for {len(audios)} audio(s); give one "
                       "transcript per entry of 'audios', in the same order", "transcript_mismatch")
    spoken = iter(transcripts)
    messages = []
    for m in row["messages"]:
        pieces = m["content"].split(AUDIO_MARKER)
        text = pieces[0] + "".join(next(spoken) + ("\n" if p else "") + p for p in pieces[1:])
        messages.append({**m, "content": text})
    return {"id": row_id, "messages": messages, "audios": []}


def spoken_turns(row: dict) -> bool:
    """Whether every clip of the row is a whole user turn: each turn that holds ``<audio>`` holds nothing else
    (whitespace aside). Such a row is a spoken conversation, and its text version the same conversation typed."""
    return all(not m["content"].replace(AUDIO_MARKER, "").strip()
               for m in row["messages"] if AUDIO_MARKER in m["content"])


def answer_ids(labels: list[int]) -> list[int]:
    """The labelled token ids of one row in order, without its first position (never predicted)."""
    return [t for t in labels[1:] if t != IGNORE_INDEX]


def teacher_batch(encoded: list, labels: torch.Tensor, pad_id: int) -> dict:
    """The teacher's part of a training batch.

    Args:
        encoded: the batch's ``Encoded`` rows in order, each with ``teacher`` (its text version, or None).
        labels: (R, S) the student's padded labels of those rows.
        pad_id: the tokenizer's pad id.
    Returns:
        ``kd_labels`` (R, S): the labels of distilled rows, IGNORE_INDEX elsewhere; ``kd_row_counts``; and, when a
        row is distilled, ``teacher_input_ids`` / ``teacher_attention_mask`` / ``teacher_labels`` (K, S_t).
    """
    kd_labels, teachers, counts = labels.clone(), [], Counter()
    for i, row in enumerate(encoded):
        if row.teacher is None:
            kind = "none"
        elif answer_ids(row.teacher.labels) != answer_ids(row.labels):
            # e.g. overflow: trim_text cut the student's answer; the pairs would no longer line up
            log.warning("%s: the teacher's answer tokens differ from the student's; cross-entropy", row.row_id)
            kind = "mismatch"
        else:
            kind = "kd"
            teachers.append(row.teacher)
        counts[kind] += 1
        if kind != "kd":
            kd_labels[i] = IGNORE_INDEX
    out = {KD_LABELS: kd_labels, KD_COUNTS: [counts["kd"], counts["none"], counts["mismatch"]]}
    if teachers:
        width = max(len(t.input_ids) for t in teachers)
        ids = torch.full((len(teachers), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        teacher_labels = torch.full_like(ids, IGNORE_INDEX)
        for k, t in enumerate(teachers):
            n = len(t.input_ids)
            ids[k, :n], mask[k, :n], teacher_labels[k, :n] = torch.tensor(t.input_ids), 1, torch.tensor(t.labels)
        out.update(zip(TEACHER_KEYS, (ids, mask, teacher_labels)))
    return out


# ----------------------------------------------------------------------------------------------------- the loss


@dataclass
class TeacherOutput:
    """What the student's loss needs from the teacher, for one batch.

    hidden: (N, H) the teacher's final hidden states at its N labelled predictions (row-major), no grad.
    targets: (N,) the answer token each of them predicts.
    head: the teacher's LM head, (n, H) -> (n, V).
    kd_labels: (B, S) the student's labels of distilled rows (IGNORE_INDEX elsewhere), in the student's layout.
    """

    hidden: torch.Tensor
    targets: torch.Tensor
    head: torch.nn.Module
    kd_labels: torch.Tensor
    temperature: float = 1.0
    ce_weight: float = 0.0


def kd_token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                    temperature: float, ce_weight: float) -> torch.Tensor:
    """(n, V) student and teacher logits, (n,) answer ids -> (n,) per-token losses in fp32:
    (1 - w) T^2 KL(p_t || p_s) at temperature T, plus w times the student's cross-entropy at T = 1."""
    student, teacher = student_logits.float(), teacher_logits.float()
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1) * temperature**2  # (n,)
    if ce_weight == 0.0:
        return kl
    return (1.0 - ce_weight) * kl + ce_weight * F.cross_entropy(student, targets, reduction="none")


def _kd_chunk_sum(head, hidden, teacher_hidden, targets, teacher_head, temperature, ce_weight) -> torch.Tensor:
    """Summed distillation loss of a chunk: (n, H) student and teacher hidden states -> a scalar."""
    with torch.no_grad():  # (n, V), recomputed in backward: cheaper than keeping it; in the teacher's own dtype
        teacher_logits = teacher_head(teacher_hidden.to(teacher_head.weight.dtype))  # (a bf16 student: fp32 teacher)
    return kd_token_losses(head(hidden), teacher_logits, targets, temperature, ce_weight).sum()


def _ce_chunk_sum(head, hidden, targets) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _chunked_sum(fn, total, head, hidden, *per_row, consts=(), chunk_tokens=DEFAULT_CHUNK_TOKENS):
    """``total`` + sum over chunks of ``fn(head, hidden[c], *(x[c] for x in per_row), *consts)``; under activation
    checkpointing when training, so at most one chunk's (chunk, V) logits live at a time (audiollm/loss.py)."""
    for start in range(0, hidden.shape[0], chunk_tokens):
        span = slice(start, start + chunk_tokens)
        args = (head, hidden[span], *(x[span] for x in per_row), *consts)
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(fn, *args, use_reentrant=False)
        else:
            total = total + fn(*args)
    return total


def distill_loss(hidden: torch.Tensor, labels: torch.Tensor, head, teacher: TeacherOutput,
                 num_items_in_batch: torch.Tensor | int | None = None,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """The student's loss: distillation on ``teacher.kd_labels``' tokens, cross-entropy on the other labels.

    Args:
        hidden: (B, S, H) the student LLM's final hidden states (padded or packed batch).
        labels: (B, S) the batch's labels (unshifted; packed: each row's first label already dropped).
        head: the student's LM head.
        teacher: the teacher's outputs at the distilled answer tokens, in the same row-major order.
        num_items_in_batch: labelled tokens over the accumulated micro-batches (the divisor); None: this batch's.
    Returns:
        A scalar: the summed per-token losses over the divisor.
    """
    targets = shift_labels(labels).to(hidden.device)
    kd_targets = shift_labels(teacher.kd_labels).to(hidden.device)
    kd = kd_targets != IGNORE_INDEX  # (B, S): predictions of a distilled answer token
    ce = (targets != IGNORE_INDEX) & ~kd
    if not torch.equal(kd_targets[kd], teacher.targets.to(hidden.device)):
        raise ValueError(f"the student's {int(kd.sum())} distilled answer tokens do not pair with the teacher's "
                         f"{teacher.targets.numel()}: kd_labels and teacher_labels must hold the same answers in "
                         "the same row order")
    if bool((kd_targets[kd] != targets[kd]).any()):
        raise ValueError("kd_labels must be the batch's labels on distilled rows")
    total = hidden.new_zeros((), dtype=torch.float32) + 0.0 * hidden.sum()
    total = _chunked_sum(_ce_chunk_sum, total, head, hidden[ce], targets[ce], chunk_tokens=chunk_tokens)
    total = _chunked_sum(_kd_chunk_sum, total, head, hidden[kd], teacher.hidden.to(hidden.device), kd_targets[kd],
                         consts=(teacher.head, teacher.temperature, teacher.ce_weight), chunk_tokens=chunk_tokens)
    if num_items_in_batch is None:
        return total / (kd | ce).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# ------------------------------------------------------------------------------------------------- the teacher


def freeze(teacher: torch.nn.Module) -> torch.nn.Module:
    """No gradients, eval mode (no dropout): the teacher's distributions are fixed targets."""
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def run_teacher(teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, S_t) text rows -> the teacher's (N, H) final hidden states at its N labelled predictions and their (N,)
    targets, row-major. Only the backbone runs here; the head is applied chunk by chunk in the loss."""
    hidden = teacher.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).last_hidden_state  # (K, S_t, H)
    targets = shift_labels(labels)
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep]


class DistillMixin:
    """Trainer mixin: with a ``teacher``, batches that hold teacher rows train on ``distill_loss``.

    The teacher's hidden states reach the model's forward as ``distill=TeacherOutput``; the model computes the loss
    from its own hidden states, so the Trainer's handling of ``num_items_in_batch``, gradient accumulation and
    DeepSpeed stays as for the cross-entropy. Evaluation batches (no teacher rows) keep the cross-entropy.
    """

    def __init__(self, *args, teacher=None, distill_args: DistillArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.distill_args = teacher, distill_args or DistillArguments()
        self.kd_rows = Counter()  # rows distilled / without transcripts / answer mismatch since the last log
        if teacher is not None:
            trained = {id(p) for p in self.model.parameters() if p.requires_grad}
            if any(id(p) in trained for p in teacher.parameters()):
                raise ValueError("the teacher shares weights with the trained model; load it as its own copy")
            self.teacher = freeze(teacher).to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts = inputs.pop(KD_COUNTS, None)
        kd_labels = inputs.pop(KD_LABELS, None)
        teacher_inputs = [inputs.pop(key, None) for key in TEACHER_KEYS]
        if counts is not None and model.training:
            self.kd_rows.update(dict(zip(("kd_rows", "kd_fallback_rows", "kd_mismatch_rows"), counts)))
        if self.teacher is None or teacher_inputs[0] is None or kd_labels is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        hidden, targets = run_teacher(self.teacher, *teacher_inputs)
        inputs["distill"] = TeacherOutput(hidden, targets, self.teacher.get_output_embeddings(), kd_labels,
                                          self.distill_args.kd_temperature, self.distill_args.kd_ce_weight)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Training logs get the rows distilled and the rows that fell back to cross-entropy since the last log."""
        if "loss" in logs and self.teacher is not None:  # every rank logs the loss at the same step
            keys = ("kd_rows", "kd_fallback_rows", "kd_mismatch_rows")
            totals = summed_over_ranks([self.kd_rows[k] for k in keys], self.args.device)
            if any(totals):
                logs = logs | dict(zip(keys, totals))
            self.kd_rows = Counter()
        super().log(logs, *args, **kwargs)
