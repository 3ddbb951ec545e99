"""Token-budget batches: every batch within its budget, each row once per epoch, deterministic per seed and epoch,
disjoint per rank with equal step counts, the per-token loss across gradient accumulation equal to one batch of all
rows, and an SFT run that resumes mid-epoch exactly (with packing and the packed encoder)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import TrainingArguments

from audiollm.audio import SAMPLE_RATE
from audiollm.batching import TokenBudgetBatchSampler, TokenBudgetTrainer, batch_sizes, bucket_bounds
from audiollm.build import save_model_folder
from audiollm.packing import PACKED_SDPA
from audiollm.stage_args import DataArguments
from audiollm.training import make_batch_sampler, make_collator

LENGTHS = np.random.default_rng(0).integers(50, 650, size=203)  # LibriSpeech-like: 2-26 s of audio tokens


def test_every_batch_fits_the_budget_and_every_row_comes_once():
    sampler = TokenBudgetBatchSampler(LENGTHS, budget=2000, buckets=8, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    costs = [len(b) * LENGTHS[b].max() for b in batches]
    assert max(costs) <= 2000 and len(batches) == len(sampler)
    assert np.mean(costs) > 0.7 * 2000  # batches are filled, not just bounded
    spread = [LENGTHS[b].max() / LENGTHS[b].min() for b in batches if len(b) > 1]
    assert np.median(spread) < 1.3  # rows of a batch are alike (the whole set spans 13x)
    firsts = [LENGTHS[b[0]] for b in batches]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)  # shuffled across buckets


def test_shuffle_is_per_seed_and_epoch_and_the_count_never_changes():
    sampler = TokenBudgetBatchSampler(LENGTHS, budget=2000, buckets=8, seed=3)
    epoch0 = list(sampler)
    assert list(TokenBudgetBatchSampler(LENGTHS, budget=2000, buckets=8, seed=3)) == epoch0  # deterministic
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and len(epoch1) == len(epoch0) == len(sampler)
    assert list(TokenBudgetBatchSampler(LENGTHS, budget=2000, buckets=8, seed=4)) != epoch0


def test_ranks_get_disjoint_batches_and_the_same_number_of_steps():
    ranks = [TokenBudgetBatchSampler(LENGTHS, budget=2000, buckets=8, seed=3, rank=r, world_size=3) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(2)
    per_rank = [list(s) for s in ranks]
    alone = TokenBudgetBatchSampler(LENGTHS, budget=2000, buckets=8, seed=3)
    alone.set_epoch(2)
    everything = list(alone)
    assert len({len(b) for b in per_rank}) == 1 and all(len(b) == len(ranks[0]) for b in per_rank)
    assert len(everything) % 3 != 0  # so the padding is exercised: the first batches repeat at the end
    assert [b for r in range(3) for b in per_rank[r]] != everything
    interleaved = [per_rank[r][k] for k in range(len(per_rank[0])) for r in range(3)]
    padding = -len(everything) % 3
    assert interleaved[: len(everything)] == everything and interleaved[len(everything) :] == everything[:padding]


def test_buckets_and_over_budget_rows():
    assert bucket_bounds(np.array([1, 1, 1, 5, 9]), 4).tolist() == [1, 5, 9]
    # rows x largest bound <= 60: three 10s, then two 20s (a third would cost 3 x 50), then the 50 alone
    assert batch_sizes(np.array([10, 10, 10, 20, 20, 50]), 60) == [3, 2, 1]
    # a bucket's rest joins the next bucket's rows: 4 batches where cutting each bucket alone makes 3 + 2
    assert batch_sizes(np.array([10] * 7 + [12] * 5), 36) == [3, 3, 3, 3]
    sampler = TokenBudgetBatchSampler([10, 10, 500, 10], budget=100, buckets=2)
    assert sampler.over_budget == 1 and sorted(map(len, sampler)) == [1, 3]  # the long row alone
    stats = sampler.describe()
    assert stats["batches_per_rank"] == 2 and stats["tokens_per_batch"] == pytest.approx(530 / 2)
    assert sampler.take_stats()["padding_fraction"] == pytest.approx(0.0)  # taken over the batches yielded
    with pytest.raises(ValueError, match="budget > 0"):
        TokenBudgetBatchSampler([10], budget=0)


def test_recipe_switches(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, seed=5)
    rows = {"length": [30, 40, 50], "seconds": [1.0, 1.5, 2.0]}
    assert make_batch_sampler(rows, DataArguments(train_files=["x"]), args) is None
    by_seconds = make_batch_sampler(rows, DataArguments(train_files=["x"], batch_audio_seconds=4.0), args)
    assert by_seconds.lengths.tolist() == [1.0, 1.5, 2.0] and by_seconds.seed == 5
    with pytest.raises(ValueError, match="not both"):
        make_batch_sampler(rows, DataArguments(train_files=["x"], batch_tokens=9, batch_audio_seconds=4.0), args)
    grouped = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                train_sampling_strategy="group_by_length")
    with pytest.raises(ValueError, match="group_by_length"):
        make_batch_sampler(rows, DataArguments(train_files=["x"], batch_tokens=90), grouped)


# ------------------------------------------------------------------------------------------------ with a model


def write_rows(tmp_path, speech_like, count: int = 10) -> str:
    """``count`` SFT rows with 0.3-2.1 s clips and answers of 1-6 words; returns the manifest."""
    rng = np.random.default_rng(1)
    lines = []
    for i in range(count):
        sf.write(tmp_path / f"clip{i}.wav", speech_like(0.3 + 0.2 * i, seed=i), SAMPLE_RATE)
        answer = " ".join(["one", "two", "red", "cat", "blue", "dog"][: int(rng.integers(1, 7))])
        lines.append(json.dumps({"messages": [{"role": "user", "content": "<audio>What is said?"},
                                              {"role": "assistant", "content": answer}],
                                 "audios": [f"clip{i}.wav"]}))
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "sft.jsonl")


def test_accumulated_budget_batches_give_one_batchs_per_token_gradient(tokenizer, tiny_model, speech_like,
                                                                       tmp_path):
    """Gradient accumulation over an epoch of budget batches (of different sizes) equals one batch of every row:
    the Trainer divides by the epoch's labelled tokens, not by the number of batches."""
    from audiollm.data import add_lengths, load_manifest

    model = tiny_model().train()
    train = add_lengths(load_manifest(write_rows(tmp_path, speech_like)))
    data_args = DataArguments(train_files=["x"], batch_tokens=160, length_buckets=3)
    sampler = make_batch_sampler(train, data_args, TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    steps = len(sampler)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                             gradient_accumulation_steps=steps, dataloader_num_workers=0)
    collator = make_collator(tokenizer, model, data_args)
    trainer = TokenBudgetTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                                 train_batch_sampler=sampler)
    loader = trainer.get_train_dataloader()
    batches, items = trainer.get_batch_samples(iter(loader), steps, torch.device("cpu"))
    assert len({b["input_ids"].shape[0] for b in batches}) > 1  # batches of different sizes
    trainer.current_gradient_accumulation_steps = steps
    for batch in batches:
        trainer.training_step(model, batch, items)
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    whole = collator([train[i] for i in range(len(train))])
    whole.pop("row_ids")
    model(**whole).loss.backward()
    for name, grad in accumulated.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-6, rtol=1e-4, msg=name)


def test_sft_with_a_token_budget_resumes_mid_epoch_exactly(tokenizer, tiny_model, speech_like, tmp_path):
    """Seven steps straight, or a resume from the straight run's checkpoint-5 (mid-epoch 2): the same weights;
    packed rows and the packed encoder on; tokens per batch and padding fraction in the logs."""
    import shutil

    import stages.sft as sft

    save_model_folder(tiny_model(), tokenizer, tmp_path / "model")
    manifest = write_rows(tmp_path, speech_like)

    def run(out, *extra):
        sft.main(["--model_name_or_path", str(tmp_path / "model"), "--train_files", manifest,
                  "--output_dir", str(out), "--max_steps", "7", "--batch_tokens", "250", "--length_buckets", "3",
                  "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--logging_steps", "1",
                  "--report_to", "none", "--use_cpu", "true", "--train_llm", "true", "--disable_tqdm", "true",
                  "--seed", "0", "--dataloader_num_workers", "0", "--packing", "true", "--packed_encoder", "true",
                  "--attn_implementation", PACKED_SDPA, "--preflight_rows", "0", *extra])

    run(tmp_path / "straight", "--save_steps", "5")
    state = json.loads((tmp_path / "straight" / "checkpoint-5" / "trainer_state.json").read_text())
    assert 1 < state["epoch"] < 2  # checkpoint-5 lies inside the second epoch
    logged = [e for e in state["log_history"] if "tokens_per_batch" in e]  # a log without a batch drawn has none
    assert len(logged) >= 3 and all(e["tokens_per_batch"] > 0 and 0 <= e["padding_fraction"] < 1 for e in logged)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-5", resumed / "checkpoint-5")
    run(resumed, "--save_strategy", "no")
    from safetensors.torch import load_file

    straight, again = load_file(tmp_path / "straight" / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert straight.keys() == again.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, again[name]), name


@pytest.mark.parametrize("recipe", ["pretrain.yaml", "sft.yaml"])
def test_the_recipes_commented_budget_is_a_valid_setting(recipe, tmp_path):
    from pathlib import Path

    import yaml

    lines = (Path(__file__).parents[1] / "stages" / "configs" / recipe).read_text().splitlines()
    keys = ("# batch_tokens:", "# batch_audio_seconds:", "# length_buckets:")
    shown = yaml.safe_load("\n".join(line[2:] for line in lines if line.startswith(keys)))
    assert set(shown) == {"batch_tokens", "batch_audio_seconds", "length_buckets"}
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    rows = {"length": LENGTHS.tolist(), "seconds": (LENGTHS / 25).tolist()}
    for budget in ("batch_tokens", "batch_audio_seconds"):
        data_args = DataArguments(train_files=["x"], length_buckets=shown["length_buckets"], **{budget: shown[budget]})
        sampler = make_batch_sampler(rows, data_args, args)
        assert sampler.over_budget == 0 and len(sampler) < len(LENGTHS) / 4  # more rows a batch than 4
