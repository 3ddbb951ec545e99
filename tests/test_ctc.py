"""CTC on the encoder (audiollm/ctc.py): targets, the loss against hand-computed values, the model's total loss,
packing, gradient accumulation, and a pretraining stage whose final folder stays a stock checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import soundfile as sf
import torch
from safetensors import safe_open

from audiollm.audio import CHUNK_SAMPLES, SAMPLE_RATE
from audiollm.collator import ChatCollator
from audiollm.ctc import (
    CTC_CLASSES,
    CTC_DIVISOR,
    CTC_KEYS,
    CTC_LENGTHS,
    CTC_TARGETS,
    add_ctc_head,
    ctc_batch,
    ctc_loss,
)
from audiollm.packing import PACKED_SDPA, pack_batch

SAID = ["one two", "red", None]


def test_targets_are_the_transcripts_bytes_plus_one_and_long_clips_get_none():
    batch = ctc_batch(["ab", None, "é", "far too long"], [1, 1, 1, 2])
    assert batch[CTC_TARGETS].tolist() == [ord("a") + 1, ord("b") + 1, 0xC3 + 1, 0xA9 + 1]  # é is two bytes
    assert batch[CTC_LENGTHS].tolist() == [2, 0, 2, 0, 0]  # one length per chunk: the 2-chunk clip gets none


class Table(torch.nn.Module):
    """A 'head' whose logits are the frames themselves (frames are (C, N, CTC_CLASSES))."""

    weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + self.weight


def test_the_loss_equals_the_hand_computed_path_sum():
    """Two frames, target "a": the paths a a, a -, - a; one frame, target "b": the path b. Each divided by its
    target length (1), then the mean over the two chunks; a chunk without target is left out."""
    torch.manual_seed(0)
    frames = torch.randn(3, 2, CTC_CLASSES)
    p = frames.log_softmax(-1).exp()
    a, b = ord("a") + 1, ord("b") + 1
    first = -math.log(p[0, 0, a] * p[0, 1, a] + p[0, 0, a] * p[0, 1, 0] + p[0, 0, 0] * p[0, 1, a])
    second = -math.log(p[1, 0, b])
    batch = ctc_batch(["a", "b", None], [1, 1, 1])
    loss = ctc_loss(Table(), frames, torch.tensor([2, 1, 2]), batch[CTC_TARGETS], batch[CTC_LENGTHS])
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-5)


def test_without_targets_the_loss_is_zero_and_still_reaches_the_head():
    head = torch.nn.Linear(4, CTC_CLASSES)
    loss = ctc_loss(head, torch.randn(2, 3, 4), torch.tensor([3, 3]), torch.zeros(0, dtype=torch.long),
                    torch.tensor([0, 0]))
    loss.backward()
    assert loss.item() == 0.0 and head.weight.grad is not None


def rows(speech_like) -> list[dict]:
    out = []
    for i, said in enumerate(SAID):
        row = {"id": f"r{i}", "messages": [{"role": "user", "content": "<audio>What is said?"},
                                           {"role": "assistant", "content": said or "nothing"}],
               "audios": [speech_like(0.6 + 0.4 * i, seed=i)]}
        if said is not None:
            row["transcripts"] = [said]
        out.append(row)
    return out


def test_collator_gives_a_target_per_clip_with_a_transcript(tokenizer, speech_like):
    batch = ChatCollator(tokenizer, ctc=True)(rows(speech_like))
    assert batch[CTC_LENGTHS].tolist() == [7, 3, 0]
    assert bytes(t - 1 for t in batch[CTC_TARGETS].tolist()) == b"one twored"
    assert not set(CTC_KEYS) & set(ChatCollator(tokenizer)(rows(speech_like)))  # off unless asked


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_the_model_adds_the_weighted_ctc_loss_and_divides_it_under_accumulation(tokenizer, tiny_model, speech_like):
    model = tiny_model().train()
    batch = ChatCollator(tokenizer, ctc=True)(rows(speech_like))
    plain = model(**{k: v for k, v in batch.items() if k not in CTC_KEYS}).loss.detach()
    add_ctc_head(model, 0.5)
    total, _ = loss_and_grads(model, batch)
    ctc = model.last_ctc_loss
    assert ctc > 0 and total.item() == pytest.approx(plain.item() + 0.5 * ctc.item(), rel=1e-5)
    halved = model(**batch, **{CTC_DIVISOR: 2}).loss.detach()
    assert halved.item() == pytest.approx(plain.item() + 0.25 * ctc.item(), rel=1e-5)
    assert model.eval()(**batch).loss.item() == pytest.approx(plain.item(), rel=1e-5)  # evaluation: answers only


@pytest.mark.parametrize("max_tokens", [0, 40])
def test_packed_batch_gives_the_padded_batchs_loss_and_gradients(tokenizer, tiny_model, speech_like, max_tokens):
    model = tiny_model(attn_implementation=PACKED_SDPA).train()
    add_ctc_head(model, 1.0)
    padded = ChatCollator(tokenizer, ctc=True)(rows(speech_like))
    packed = pack_batch(padded, tokenizer.pad_token_id, max_tokens)
    results = [loss_and_grads(model, batch) for batch in (padded, packed)]
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-4)


def test_a_clip_over_30_seconds_trains_without_a_ctc_target(tokenizer, tiny_model, speech_like):
    long = {"id": "long", "messages": [{"role": "user", "content": "<audio>What is said?"},
                                       {"role": "assistant", "content": "a lot"}],
            "audios": [speech_like(CHUNK_SAMPLES / SAMPLE_RATE + 1.0)], "transcripts": ["a lot"]}
    batch = ChatCollator(tokenizer, ctc=True)([long, rows(speech_like)[1]])
    assert batch[CTC_LENGTHS].tolist() == [0, 0, 3]  # two chunks of the long clip, then "red"
    model = tiny_model().train()
    add_ctc_head(model, 1.0)
    assert math.isfinite(model(**batch).loss.item())


@pytest.mark.parametrize("packed", [False, True])
def test_an_inner_layers_frames_are_those_of_the_encoder_cut_after_it(tiny_model, speech_like, packed):
    """ctc_layer 1 of 2: ``tapped`` is layer 1's output pooled to 25 Hz, which the final LayerNorm turns into the
    output of the same encoder with its second layer removed."""
    from audiollm.audio import featurize

    model = tiny_model()
    add_ctc_head(model, 1.0, layer=1)
    encoder = model.audio_tower
    encoder.packed = packed
    audio = featurize([speech_like(0.7, seed=1), speech_like(1.3, seed=2)])
    encoder(audio.input_features, audio.feature_attention_mask)
    tapped = encoder.layer_norm(encoder.tapped)
    encoder.layers = encoder.layers[:1]
    encoder.tap_layer = 0
    cut, lengths = encoder(audio.input_features, audio.feature_attention_mask)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(tapped[i, :n], cut[i, :n], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="ctc_layer must be"):
        add_ctc_head(tiny_model(), 1.0, layer=2)


def test_ctc_needs_a_trained_encoder_without_lora():
    from audiollm.stage_args import ModelArguments

    with pytest.raises(ValueError, match="train_encoder"):
        ModelArguments(model_name_or_path="m", ctc_weight=0.3)
    with pytest.raises(ValueError, match="ctc_weight must be >= 0"):
        ModelArguments(model_name_or_path="m", train_encoder=True, ctc_weight=-1.0)


def write_pretrain_data(tmp_path, speech_like) -> str:
    lines = []
    for i, said in enumerate(["one two three", "red blue", "four five", "green"] * 2):
        sf.write(tmp_path / f"clip{i}.wav", speech_like(0.8 + 0.1 * i, seed=i), SAMPLE_RATE)
        lines.append(json.dumps({"audio": f"clip{i}.wav", "task": "asr", "text": said, "transcript": said}))
    (tmp_path / "pretrain.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "pretrain.jsonl")


def test_pretraining_with_ctc_logs_it_keeps_the_head_in_checkpoints_resumes_exactly_and_leaves_it_out_of_the_folder(
        tokenizer, tiny_model, speech_like, tmp_path):
    """Ten steps straight, or a resume from the straight run's checkpoint-5: the same final weights, which the
    encoder reaches only if the head was restored too (a new head would send it other gradients)."""
    import shutil

    import stages.pretrain as pretrain
    from safetensors.torch import load_file
    from transformers import Qwen2AudioForConditionalGeneration

    from audiollm.build import save_model_folder

    save_model_folder(tiny_model(), tokenizer, tmp_path / "model")
    manifest = write_pretrain_data(tmp_path, speech_like)

    def run(out, *extra):
        pretrain.main(["--model_name_or_path", str(tmp_path / "model"), "--train_files", manifest,
                       "--output_dir", str(out), "--max_steps", "10", "--per_device_train_batch_size", "4",
                       "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--logging_steps", "1",
                       "--report_to", "none", "--use_cpu", "true", "--train_encoder", "true", "--train_llm", "true",
                       "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--seed", "0",
                       "--ctc_weight", "0.5", "--ctc_layer", "1", *extra])

    out = tmp_path / "run"
    run(out, "--save_strategy", "steps", "--save_steps", "5")
    history = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    ctc = [e["ctc_loss"] for e in history]
    assert len(ctc) == 10 and ctc[-1] < 0.8 * ctc[0], ctc  # the head and encoder learn the bytes
    assert {(e["ctc_chunks"], e["ctc_chunks_without_target"]) for e in history} == {(4.0, 0.0)}
    with safe_open(str(out / "checkpoint-5" / "model.safetensors"), "pt") as f:
        assert [k for k in f.keys() if k.startswith("ctc_head.")]  # a resumed run continues the head
    straight = load_file(out / "model.safetensors")
    assert not [k for k in straight if k.startswith("ctc_head")]
    stock = Qwen2AudioForConditionalGeneration.from_pretrained(out, output_loading_info=True)[1]
    assert not any(stock.values()), stock  # no missing or unexpected keys: a stock checkpoint

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-5", resumed / "checkpoint-5")
    run(resumed, "--save_strategy", "no")
    again = load_file(resumed / "model.safetensors")
    assert straight.keys() == again.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, again[name]), name
