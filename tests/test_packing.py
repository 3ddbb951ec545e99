"""Sequence packing: rows stay isolated (a packed row's logits equal the row run alone), the loss equals the padded
batch's, audio stays aligned with its rows, and the recipe switch reaches the SFT stage."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import soundfile as sf
import torch
from transformers.masking_utils import find_packed_sequence_indices

from audiollm.audio import SAMPLE_RATE
from audiollm.collator import IGNORE_INDEX, ChatCollator
from audiollm.packing import (
    PACKED_SDPA,
    PackingCollator,
    bins_in_order,
    pack_batch,
    pack_rows,
    packed_row_starts,
    plan_rows,
    unpack_rows,
)
from audiollm.stage_args import DataArguments
from audiollm.training import make_collator

ANSWERS = ["one two three", "a red cat and a blue dog said hello", "yes", "the moon"]


def rows(speech_like, seconds=(1.5, 0.4, 2.5, 0.8)) -> list[dict]:
    """Chat rows of mixed lengths, one clip each (the second with a two-turn conversation)."""
    out = []
    for i, (length, answer) in enumerate(zip(seconds, ANSWERS)):
        messages = [{"role": "user", "content": "<audio>What does the speaker say?"},
                    {"role": "assistant", "content": answer}]
        if i == 1:
            messages += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": "thank you"}]
        out.append({"id": f"row{i}", "messages": messages, "audios": [speech_like(length, seed=i)]})
    return out


def forward(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_transformers_detects_restarting_positions_as_packed_rows():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert find_packed_sequence_indices(positions).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]
    assert find_packed_sequence_indices(torch.arange(5)[None]) is None  # one row: the plain causal mask


def test_bins_keep_row_order_and_respect_the_budget():
    assert bins_in_order([5, 3, 4, 9, 1], 0) == [[0, 1, 2, 3, 4]]
    assert bins_in_order([5, 3, 4, 9, 1], 9) == [[0, 1], [2], [3], [4]]
    assert bins_in_order([12, 2], 10) == [[0], [1]]  # an over-budget row gets a sequence of its own


@pytest.mark.parametrize("max_tokens", [0, 4, 6])
def test_pack_rows_lays_out_embeddings_as_pack_batch_and_unpacks_back(max_tokens):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    ids = torch.arange(1, 13).view(3, 4) * mask
    labels = torch.where(mask.bool(), ids + 100, IGNORE_INDEX)
    plan = plan_rows(mask, max_tokens)
    embeds, positions, packed_labels = pack_rows(ids[..., None].float().expand(3, 4, 2), labels, plan)
    reference = pack_batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, pad_id=0,
                           max_tokens=max_tokens)
    assert plan.shape == tuple(reference["input_ids"].shape) == {0: (1, 9), 4: (3, 4), 6: (2, 5)}[max_tokens]
    assert torch.equal(embeds[..., 1].long(), reference["input_ids"])  # padding tails: zero embeddings
    assert torch.equal(positions, reference["position_ids"]) and torch.equal(packed_labels, reference["labels"])
    # a per-prediction value at packed (k, p) is about token p + 1: unpacked, it lines up with the padded labels
    unpacked = unpack_rows(packed_labels[:, 1:], plan)
    assert torch.equal(unpacked, torch.where(mask[:, 1:].bool(), labels[:, 1:], 0))
    assert torch.equal(unpack_rows(embeds, plan, shifted=False)[..., 0].long(), ids)
    with pytest.raises(ValueError, match="right-padded"):
        plan_rows(torch.tensor([[0, 1, 1]]))


def test_packed_row_starts_only_for_packed_positions():
    assert packed_row_starts(torch.tensor([[0, 1, 2, 0, 1, 0]]), 6) == [[0, 3, 5]]
    assert packed_row_starts(torch.arange(6)[None], 6) is None  # one row
    assert packed_row_starts(torch.tensor([[1, 1, 0, 1, 2, 3]]), 6) is None  # left-padded generation positions
    assert packed_row_starts(torch.tensor([[0, 1, 2, 0, 1, 0]]), 1) is None  # a decoding step


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
def test_a_packed_rows_logits_equal_the_row_run_alone(tokenizer, tiny_model, speech_like, attn):
    model = tiny_model(attn_implementation=attn)
    collator = ChatCollator(tokenizer)
    examples = rows(speech_like)
    packed = PackingCollator(collator)(examples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    logits = forward(model, packed)[0]  # (sum of lengths, V)
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist() + [packed["input_ids"].shape[1]]
    assert len(starts) == len(examples) + 1
    for k, row in enumerate(examples):
        alone = forward(model, collator([row]))[0]  # (length, V), no padding
        assert alone.shape[0] == starts[k + 1] - starts[k]
        torch.testing.assert_close(logits[starts[k] : starts[k + 1]], alone, atol=2e-5, rtol=1e-4)
    # The control: the same sequence without restarting positions lets rows attend to earlier rows.
    leaky = forward(model, {k: v for k, v in packed.items() if k != "position_ids"})[0]
    assert not torch.allclose(leaky[starts[1] : starts[2]], forward(model, collator([examples[1]]))[0], atol=1e-3)
    # Padded batches take the plain path on every implementation: the same logits as sdpa's.
    padded = collator(examples)
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(forward(model, padded)[real], forward(tiny_model(), padded)[real], atol=2e-5,
                               rtol=1e-4)


def test_per_row_attention_gives_the_dense_masks_loss_and_gradients(tokenizer, tiny_model, speech_like):
    packed = PackingCollator(ChatCollator(tokenizer))(rows(speech_like))
    results = []
    for attn in ("sdpa", PACKED_SDPA):
        model = tiny_model(attn_implementation=attn).train()
        loss = model(**packed).loss
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("max_tokens", [0, 160])
def test_packed_loss_and_gradients_equal_the_padded_batch(tokenizer, tiny_model, speech_like, max_tokens):
    model = tiny_model().train()
    collator = ChatCollator(tokenizer)
    examples = rows(speech_like)
    padded = collator(examples)
    packed = pack_batch(padded, tokenizer.pad_token_id, max_tokens)
    if max_tokens:
        assert packed["input_ids"].shape[0] > 1  # several packed sequences, the shorter one padded
        assert packed["input_ids"].shape[1] <= max(max_tokens, int(padded["attention_mask"].sum(-1).max()))
    # Same labelled tokens: the packed layout only drops each row's unused first label.
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    losses, grads = [], []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
def test_packed_encoder_gives_each_clip_its_padded_encoding_and_gradients(tiny_model, attn):
    """Clips of 3 to 200 mel frames (one too short for a token), padded to the longest + 2 edge frames as the
    collator pads them: the packed encoder gives the same real tokens and the same weight gradients."""
    encoder = tiny_model(attn_implementation=attn).audio_tower.train()
    encoder.dropout = 0.0
    mel_lengths = torch.tensor([57, 200, 3, 120, 4, 2])
    width = int(mel_lengths.max()) + 2
    features = torch.randn(len(mel_lengths), encoder.config.num_mel_bins, width,
                           generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(width)[None] < mel_lengths[:, None]).long()
    outputs, grads = [], []
    for packed in (False, True):
        encoder.packed = packed
        encoder.zero_grad()
        hidden, lengths = encoder(features, mask)
        real = torch.arange(hidden.shape[1])[None, :] < lengths[:, None]
        (hidden * real[..., None]).pow(2).sum().backward()
        outputs.append((hidden.detach(), lengths))
        grads.append(torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None]))
    (padded, lengths), (packed, packed_lengths) = outputs
    assert torch.equal(lengths, packed_lengths) and lengths.tolist() == [14, 50, 1, 30, 1, 0]
    assert packed.shape[1] == int(lengths.max())  # padded only to the longest clip's tokens
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(packed[i, :n], padded[i, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)


def test_packed_encoder_switch_reaches_the_model(tokenizer, tiny_model, tmp_path):
    from audiollm.build import save_model_folder
    from audiollm.stage_args import ModelArguments
    from audiollm.training import load_model

    save_model_folder(tiny_model(), tokenizer, tmp_path / "model")
    for switch in (False, True):
        model, _ = load_model(ModelArguments(model_name_or_path=str(tmp_path / "model"), packed_encoder=switch,
                                             attn_implementation=PACKED_SDPA))
        assert model.audio_tower.packed is switch


def test_encoder_dropout_trains_with_noise_and_saves_nothing(tokenizer, tiny_model, tmp_path):
    """``encoder_dropout`` makes two training forwards of the same clip differ (every layer and the input drop),
    leaves evaluation exact, and stays out of the config a stage saves; None keeps the folder's 0."""
    from audiollm.build import save_model_folder
    from audiollm.stage_args import ModelArguments
    from audiollm.training import load_model

    save_model_folder(tiny_model(), tokenizer, tmp_path / "model")
    features = torch.randn(1, 128, 202, generator=torch.Generator().manual_seed(0))
    for rate in (None, 0.0, 0.3):
        model, _ = load_model(ModelArguments(model_name_or_path=str(tmp_path / "model"), encoder_dropout=rate))
        encoder = model.audio_tower
        assert [encoder.dropout, *(layer.dropout for layer in encoder.layers)] == [rate or 0.0] * 3
        assert model.config.audio_config.dropout == 0.0  # a saved folder would not carry the rate
        encoder.train()
        first, second = encoder(features)[0], encoder(features)[0]
        assert torch.equal(first, second) is (not rate)
        encoder.eval()
        assert torch.equal(encoder(features)[0], encoder(features)[0])
    with pytest.raises(ValueError, match="encoder_dropout"):
        ModelArguments(model_name_or_path="x", encoder_dropout=1.0)


def test_packing_takes_padding_out_and_keeps_audio_in_row_order(tokenizer, speech_like):
    collator = ChatCollator(tokenizer)
    examples = rows(speech_like)
    padded = collator(examples)
    packed = PackingCollator(collator)(examples)
    real = int(padded["attention_mask"].sum())
    assert packed["input_ids"].numel() == real < padded["input_ids"].numel()
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][padded["attention_mask"].bool()])
    assert torch.equal(packed["input_features"], padded["input_features"])  # clip k still fills row k's slots
    with pytest.raises(ValueError, match="right-padded"):
        pack_batch(ChatCollator(tokenizer, generation=True)(examples[:2]), tokenizer.pad_token_id)


def test_make_collator_switch(tokenizer):
    model = SimpleNamespace(config=SimpleNamespace(projector_stack=1, _attn_implementation="sdpa"))
    args = DataArguments(train_files=["x.jsonl"])
    assert isinstance(make_collator(tokenizer, model, args), ChatCollator)
    packer = make_collator(tokenizer, model, DataArguments(train_files=["x.jsonl"], packing=True,
                                                           packing_max_tokens=512))
    assert isinstance(packer, PackingCollator) and packer.max_tokens == 512
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash-attention"):
        make_collator(tokenizer, model, DataArguments(train_files=["x.jsonl"], packing=True, packing_max_tokens=512))
    assert make_collator(tokenizer, model, DataArguments(train_files=["x.jsonl"], packing=True)).max_tokens == 0


def test_sft_stage_trains_with_packing_and_the_lean_loss(tokenizer, tiny_model, speech_like, tmp_path):
    """The recipe switches reach the Trainer: two SFT steps run, and the first logged loss equals the plain run's."""
    import stages.sft as sft
    from audiollm.build import save_model_folder

    save_model_folder(tiny_model(), tokenizer, tmp_path / "model")
    lines = []
    for i, row in enumerate(rows(speech_like)):
        sf.write(tmp_path / f"clip{i}.wav", row["audios"][0], SAMPLE_RATE)
        lines.append(json.dumps({"messages": row["messages"], "audios": [f"clip{i}.wav"]}))
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n")

    def first_loss(name: str, *extra: str) -> float:
        out = tmp_path / name
        sft.main(["--model_name_or_path", str(tmp_path / "model"), "--train_files", str(tmp_path / "sft.jsonl"),
                  "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
                  "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
                  "--use_cpu", "true", "--train_llm", "true", "--disable_tqdm", "true", "--seed", "0",
                  "--dataloader_num_workers", "0", *extra])
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry][0]

    plain = first_loss("plain")
    lean_packed = first_loss("packed", "--packing", "true", "--lean_loss_chunk_tokens", "16",
                             "--attn_implementation", PACKED_SDPA, "--packed_encoder", "true")
    assert lean_packed == pytest.approx(plain, rel=1e-4)
