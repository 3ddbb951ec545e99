"""Distillation from the text LLM (audiollm/distill.py): the loss against hand-computed values, the teacher's text
rows, alignment under packing, cross-entropy for rows without transcripts, a frozen teacher outside the optimizer,
and a short SFT run with ``loss: kd``."""

from __future__ import annotations

import copy
import json
import math

import pytest
import soundfile as sf
import torch

from audiollm.audio import SAMPLE_RATE
from audiollm.bad_rows import BadRowLog
from audiollm.collator import IGNORE_INDEX, ChatCollator
from audiollm.data import pretrain_to_chat
from audiollm.distill import (
    KD_COUNTS,
    KD_LABELS,
    TEACHER_KEYS,
    DistillArguments,
    TeacherOutput,
    distill_loss,
    freeze,
    run_teacher,
    spoken_turns,
    text_version,
)
from audiollm.packing import PACKED_SDPA, pack_batch
from audiollm.row_checks import RowError

QUESTIONS = ["what is one plus two", "say the numbers from four to six", "which colour is the sky"]
ANSWERS = ["one plus two is three", "four five six", "blue"]


# ------------------------------------------------------------------------------------------- the loss by hand


def identity_head(vocab: int) -> torch.nn.Linear:
    """A head whose logits are the hidden states themselves: (n, V) -> (n, V)."""
    head = torch.nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    return head


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_loss_equals_the_hand_computed_kl_and_cross_entropy(ce_weight):
    """Two rows of 2 tokens over a 3-word vocabulary: row 0 distilled, row 1 without transcript (cross-entropy).

    Teacher logits [0, 2 ln 2, 0] at T = 2 are [0, ln 2, 0]: p_t = (1/4, 1/2, 1/4); the student's zero logits give
    p_s = 1/3 each. KL = 1/2 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(9/8), times T^2 = 4. Cross-entropy of zero logits: ln 3.
    """
    head = identity_head(3)
    hidden = torch.zeros(2, 2, 3, requires_grad=True)  # student logits 0 everywhere
    labels = torch.tensor([[IGNORE_INDEX, 1], [IGNORE_INDEX, 2]])
    kd_labels = torch.tensor([[IGNORE_INDEX, 1], [IGNORE_INDEX, IGNORE_INDEX]])  # row 1: no transcript
    teacher = TeacherOutput(torch.tensor([[0.0, 2 * math.log(2), 0.0]]), torch.tensor([1]), identity_head(3),
                            kd_labels, temperature=2.0, ce_weight=ce_weight)
    loss = distill_loss(hidden, labels, head, teacher)
    kd_token = (1 - ce_weight) * 4 * 0.5 * math.log(9 / 8) + ce_weight * math.log(3)
    assert float(loss.detach()) == pytest.approx((kd_token + math.log(3)) / 2, rel=1e-6)
    with torch.no_grad():  # gradient accumulation: the sum over the divisor of all micro-batches' tokens
        accumulated = distill_loss(hidden, labels, head, teacher, num_items_in_batch=4)
    assert float(accumulated) == pytest.approx((kd_token + math.log(3)) / 4, rel=1e-6)
    loss.backward()
    assert hidden.grad[0, 0].abs().sum() > 0 and hidden.grad[1, 0].abs().sum() > 0
    assert teacher.head.weight.grad is None or teacher.head.weight.grad.abs().sum() == 0


def test_a_teacher_equal_to_the_student_gives_zero_kl_and_misaligned_answers_raise():
    head = identity_head(5)
    hidden = torch.randn(1, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, 4]])
    same = TeacherOutput(hidden[0, :3].clone(), torch.tensor([3, 1, 4]), head, labels)
    with torch.no_grad():
        assert float(distill_loss(hidden, labels, head, same)) == pytest.approx(0.0, abs=1e-6)
    shifted = TeacherOutput(hidden[0, :3].clone(), torch.tensor([3, 4, 1]), head, labels)
    with pytest.raises(ValueError, match="do not pair"):
        distill_loss(hidden, labels, head, shifted)


# ----------------------------------------------------------------------------------------- rows and batches


def test_text_version_replaces_each_audio_by_its_transcript_in_order():
    row = {"messages": [{"role": "user", "content": "<audio>Repeat the second word."},
                        {"role": "assistant", "content": "two"}, {"role": "user", "content": "<audio>"},
                        {"role": "assistant", "content": "ok"}],
           "audios": ["a.wav", "b.wav"], "transcripts": ["one two three", "say ok"]}
    text = text_version(row, "m.jsonl:7")
    assert [m["content"] for m in text["messages"]] == ["one two three\nRepeat the second word.", "two", "say ok",
                                                        "ok"]
    assert text["audios"] == [] and text_version({**row, "transcripts": None}, "m.jsonl:7") is None
    with pytest.raises(RowError, match=r"m\.jsonl:7: 1 transcript\(s\) for 2 audio\(s\)"):
        text_version({**row, "transcripts": ["one"]}, "m.jsonl:7")


def test_pretraining_rows_carry_their_transcript():
    row = {"id": "p:1", "audio": "a.wav", "task": "sex", "text": "male", "transcript": "one two"}
    assert pretrain_to_chat(row)["transcripts"] == ["one two"]
    assert "transcripts" not in pretrain_to_chat({k: v for k, v in row.items() if k != "transcript"})


def kd_rows(speech_like) -> list[dict]:
    """Three spoken questions with transcripts (the second a two-turn conversation) and one without."""
    out = []
    for i, (question, answer) in enumerate(zip(QUESTIONS, ANSWERS)):
        messages = [{"role": "user", "content": "<audio>"}, {"role": "assistant", "content": answer}]
        if i == 1:
            messages += [{"role": "user", "content": "and then"}, {"role": "assistant", "content": "seven"}]
        out.append({"id": f"row{i}", "messages": messages, "audios": [speech_like(0.5 + 0.7 * i, seed=i)],
                    "transcripts": [question]})
    out.insert(2, {"id": "plain", "messages": [{"role": "user", "content": "<audio>What is said?"},
                                               {"role": "assistant", "content": "red"}],
                   "audios": [speech_like(0.8, seed=9)]})
    return out


def test_only_spoken_rows_are_distilled_unless_kd_rows_is_all(tokenizer, speech_like):
    """A spoken question is distilled; a pretraining speaker question and an analysis question about a clip carry
    transcripts too (for CTC), but the teacher reading them would be handed or denied the answer: cross-entropy."""
    spoken = kd_rows(speech_like)[0]
    speaker = pretrain_to_chat({"id": "p:1", "audio": speech_like(0.6, seed=3), "task": "sex", "text": "male",
                                "transcript": "one two"})
    about = {"id": "a", "messages": [{"role": "user", "content": "<audio>Repeat the second word."},
                                     {"role": "assistant", "content": "two"}],
             "audios": [speech_like(0.7, seed=4)], "transcripts": ["one two three"]}
    assert spoken_turns(spoken) and not spoken_turns(speaker) and not spoken_turns(about)
    assert spoken_turns({"messages": [{"role": "user", "content": " <audio>\n<audio> "}]})
    rows = [spoken, speaker, about]
    assert ChatCollator(tokenizer, teacher_rows="spoken")(rows)[KD_COUNTS] == [1, 2, 0]
    assert ChatCollator(tokenizer, teacher_rows="all")(rows)[KD_COUNTS] == [3, 0, 0]
    with pytest.raises(ValueError, match="kd_rows must be one of"):
        DistillArguments(loss="kd", kd_rows="voice")


def test_collator_adds_the_teacher_rows_and_falls_back_for_rows_without_transcripts(tokenizer, speech_like):
    batch = ChatCollator(tokenizer, teacher_rows="spoken")(kd_rows(speech_like))
    assert batch[KD_COUNTS] == [3, 1, 0]  # distilled, without transcript, answer mismatch
    assert (batch[KD_LABELS][2] == IGNORE_INDEX).all() and (batch[KD_LABELS][0] == batch["labels"][0]).all()
    teacher_ids, teacher_mask, teacher_labels = (batch[k] for k in TEACHER_KEYS)
    assert teacher_ids.shape[0] == 3 and tokenizer.convert_tokens_to_ids("<|AUDIO|>") not in teacher_ids
    assert QUESTIONS[0] in tokenizer.decode(teacher_ids[0][teacher_mask[0].bool()])
    student = batch[KD_LABELS][:, 1:]
    assert student[student != IGNORE_INDEX].tolist() == teacher_labels[:, 1:][teacher_labels[:, 1:] != -100].tolist()


def test_a_transcript_count_mismatch_is_a_bad_row_named_by_its_id(tokenizer, speech_like):
    rows = kd_rows(speech_like)
    rows[0]["transcripts"] = ["one", "two"]
    with pytest.raises(RowError, match="row0: 2 transcript"):
        ChatCollator(tokenizer, teacher_rows="spoken")(rows)
    log = BadRowLog(max_fraction=1.0)
    batch = ChatCollator(tokenizer, teacher_rows="spoken", bad_rows=log)(rows)
    assert log.counts == {"transcript_mismatch": 1} and batch[KD_COUNTS] == [2, 1, 0]


def distilled(model, teacher, batch: dict, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's distillation loss on a (padded or packed) batch and its gradients, flattened."""
    batch = dict(batch)
    kd_labels, counts = batch.pop(KD_LABELS), batch.pop(KD_COUNTS)
    hidden, targets = run_teacher(teacher, *(batch.pop(k) for k in TEACHER_KEYS))
    assert counts[0] == 3 and int((kd_labels[:, 1:] != IGNORE_INDEX).sum()) == targets.numel()
    model.zero_grad()
    loss = model(**batch, distill=TeacherOutput(hidden, targets, teacher.get_output_embeddings(), kd_labels,
                                                **settings)).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("max_tokens", [0, 60])
def test_packed_batch_gives_the_padded_batchs_loss_and_gradients(tokenizer, tiny_model, speech_like, max_tokens):
    """The teacher's answer tokens pair with the student's by answer order, so packing (rows at other absolute
    positions, first labels dropped, several packed sequences) changes neither loss nor gradients."""
    model = tiny_model(attn_implementation=PACKED_SDPA).train()
    teacher = freeze(tiny_model(seed=1).language_model)
    padded = ChatCollator(tokenizer, teacher_rows="spoken")(kd_rows(speech_like))
    packed = pack_batch(padded, tokenizer.pad_token_id, max_tokens)
    assert max_tokens == 0 or packed["input_ids"].shape[0] > 1
    results = [distilled(model, teacher, batch, temperature=2.0, ce_weight=0.3) for batch in (padded, packed)]
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in teacher.parameters())


def test_without_teacher_rows_the_loss_is_the_cross_entropy(tokenizer, tiny_model, speech_like):
    """kd_ce_weight 1 is the cross-entropy on every row: the same loss as the model's own."""
    model = tiny_model().train()
    teacher = freeze(tiny_model(seed=1).language_model)
    batch = ChatCollator(tokenizer, teacher_rows="spoken")(kd_rows(speech_like))
    loss, _ = distilled(model, teacher, batch, ce_weight=1.0)
    plain = model(**{k: v for k, v in batch.items() if k not in (*TEACHER_KEYS, KD_LABELS, KD_COUNTS)}).loss
    torch.testing.assert_close(loss, plain.detach(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ the trainer


def write_sft_data(tmp_path, speech_like) -> str:
    lines = []
    for i, row in enumerate(kd_rows(speech_like)):
        sf.write(tmp_path / f"clip{i}.wav", row["audios"][0], SAMPLE_RATE)
        lines.append(json.dumps({**row, "audios": [f"clip{i}.wav"]}))
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "sft.jsonl")


def test_teacher_is_frozen_and_outside_the_optimizer(tokenizer, tiny_model, speech_like, tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from audiollm.teacher import StageTrainer

    model = tiny_model().train()
    teacher = copy.deepcopy(model.language_model)  # "its weights at the start", as its own copy
    rows = kd_rows(speech_like)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=1,
                             remove_unused_columns=False, learning_rate=1e-2)
    trainer = StageTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"i": 0}]),
                           data_collator=lambda _: None, teacher=teacher, distill_args=DistillArguments(loss="kd"))
    trainer.create_optimizer()
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised and not optimised & {id(p) for p in teacher.parameters()}
    before = [p.detach().clone() for p in teacher.parameters()]
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    trainer.training_step(model, ChatCollator(tokenizer, teacher_rows="spoken")(rows))
    trainer.optimizer.step()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.language_model.parameters()))
    with pytest.raises(ValueError, match="shares weights"):
        StageTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"i": 0}]), teacher=model.language_model)


def test_sft_stage_trains_with_the_kd_loss(tokenizer, tiny_model, speech_like, tmp_path):
    """A short packed SFT run with ``loss: kd``: the teacher is the starting model's LLM, the loss falls, and the
    logs count the distilled rows and the row without transcript."""
    import stages.sft as sft
    from audiollm.build import save_model_folder

    save_model_folder(tiny_model(), tokenizer, tmp_path / "model")
    out = tmp_path / "run"
    sft.main(["--model_name_or_path", str(tmp_path / "model"), "--train_files", write_sft_data(tmp_path, speech_like),
              "--output_dir", str(out), "--max_steps", "12", "--per_device_train_batch_size", "4",
              "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--logging_steps", "1",
              "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--train_llm", "true",
              "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--packing", "true",
              "--attn_implementation", PACKED_SDPA, "--loss", "kd", "--kd_temperature", "2", "--kd_ce_weight", "0.2"])
    history = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(history) == 12 and all(math.isfinite(e["loss"]) for e in history)
    assert history[-1]["loss"] < 0.6 * history[0]["loss"], [e["loss"] for e in history]  # measured: 2.04 -> 1.02
    assert {(e["kd_rows"], e["kd_fallback_rows"]) for e in history} == {(3.0, 1.0)}


def test_data_check_refuses_transcripts_that_do_not_match_the_audios(speech_like, tmp_path):
    from audiollm.data_check import CheckOptions, RowReport, check_report

    sf.write(tmp_path / "q.wav", speech_like(0.6), SAMPLE_RATE)
    row = {"id": "m.jsonl:3", "messages": [{"role": "user", "content": "<audio>"},
                                          {"role": "assistant", "content": "two"}],
           "audios": [str(tmp_path / "q.wav")], "transcripts": ["one plus one", "extra"]}
    bad = check_report(RowReport("m.jsonl", 3, "m.jsonl:3", row), CheckOptions())
    assert [kind for kind, _ in bad.problems] == ["transcript_mismatch"] and "m.jsonl:3" in bad.problems[0][1]
    good = check_report(RowReport("m.jsonl", 3, "m.jsonl:3", {**row, "transcripts": ["one plus one"]}),
                        CheckOptions())
    assert not good.has_error, good.problems
