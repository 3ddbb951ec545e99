"""The GRPO stage (stages/grpo.py) and its rewards (audiollm/rewards.py), on a tiny model and tones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audiollm import rewards
from audiollm.audio import SAMPLE_RATE
from audiollm.chat import AUDIO_TOKEN
from audiollm.model.config import AudioLLMConfig
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.tiny import tiny_audio_config, tiny_text_config, tiny_tokenizer
from eval.tasks import score_record
from stages.grpo import AudioRows, as_prompt, main, parse_recipe
from tests.test_dpo import tone, write_jsonl

REPO = Path(__file__).resolve().parents[1]
ANSWERS = ["a dog", "a bird", "a cat", "a man"]
NAME = "language_model.model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model folder, four tones (0.5-2 s) and a manifest of four SFT rows that name them."""
    root = tmp_path_factory.mktemp("grpo")
    tokenizer = tiny_tokenizer()
    config = AudioLLMConfig(audio_config=tiny_audio_config(), text_config=tiny_text_config(len(tokenizer)),
                            audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
    torch.manual_seed(0)
    AudioLLMForConditionalGeneration(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = []
    for i, answer in enumerate(ANSWERS):
        sf.write(root / f"clip{i}.wav", tone(0.5 + 0.5 * i, 220.0 * (i + 1)), SAMPLE_RATE)
        rows.append({"messages": [{"role": "user", "content": "<audio>What is this sound?"},
                                  {"role": "assistant", "content": answer}], "audios": [f"clip{i}.wav"]})
    return {"root": root, "model": str(root / "model"), "rows": rows,
            "train": write_jsonl(root / "train.jsonl", rows)}


def recipe(folder, out: Path, **overrides) -> list[str]:
    """CLI arguments of a small full-LLM GRPO recipe; ``overrides`` replace or add keys."""
    keys = dict(model_name_or_path=folder["model"], train_files=folder["train"], output_dir=str(out),
                bf16="false", report_to="none", max_length=96, max_completion_length=6, num_generations=4,
                per_device_train_batch_size=4, train_llm="true", train_projector="false", learning_rate=1e-2,
                temperature=1.0, max_steps=2, logging_steps=1, save_strategy="no", disable_tqdm="true",
                activation_checkpointing="false", seed=0, rewards="exact")
    keys.update(overrides)
    return [token for key, value in keys.items() for token in (f"--{key}", str(value))]


# ---------------------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("prediction, reference", [
    ("Seven.", "seven"), ("7", "seven"), ("The dog", "a dog"), ("three plus four is 7", "three plus four is seven"),
    ("eight", "seven"), ("", "seven"),
])
def test_exact_reward_is_the_harness_short_score(prediction, reference):
    expected, _ = score_record({"kind": "short", "prediction": prediction, "reference": reference})
    assert rewards.exact([prediction], [reference]) == [expected]
    chat = [[{"role": "assistant", "content": prediction}]]  # TRL's completions for chat prompts
    assert rewards.exact(chat, [reference]) == [expected]


@pytest.mark.parametrize("prediction", ["A dog barking", "dog", "a cat or a dog", "the car", ""])
def test_mcq_reward_is_the_harness_mmau_score(prediction):
    choices = ["A dog barking", "A cat", "A car horn"]
    expected, _ = score_record({"kind": "mcq", "prediction": prediction, "reference": choices[0],
                                "choices": choices})
    assert rewards.mcq([prediction], [choices[0]], choices=[choices]) == [expected]
    assert rewards.mcq([prediction], [choices[0]], choices=[None]) == [None]  # no choices: not scored


def test_wer_reward_is_one_minus_the_harness_wer_floored_at_zero():
    refs = ["the cat sat on the mat", "one two three", "one"]
    preds = ["the cat sat on a mat", "one two three", "one two three four five"]
    for pred, ref, got in zip(preds, refs, rewards.wer(preds, refs)):
        wer, _ = score_record({"kind": "asr", "prediction": pred, "reference": ref})
        assert got == pytest.approx(max(0.0, 1 - wer))
    assert rewards.wer(preds, refs)[2] == 0.0  # WER 4.0: floored
    # a row may name its normaliser: by language "one two four" is the wrong number 124, word by word 2 of 3 right
    assert rewards.wer(["one two four"], ["one two three"]) == [0.0]
    assert rewards.wer(["one two four"], ["one two three"], normalizer=["words"]) == [pytest.approx(2 / 3)]


def test_format_reward_and_answer_tags():
    good = "<think>two and two</think> <answer>four</answer>"
    assert rewards.think_format([good, "four", "<answer>four</answer>", good + " more"]) == [1.0, 0.0, 0.0, 0.0]
    assert rewards.exact([good], ["four"]) == [1.0]  # the tagged answer is what is scored


def test_rewards_resolve_by_name_or_module_path():
    assert rewards.reward_functions(["exact", "format"]) == [rewards.exact, rewards.think_format]
    assert rewards.reward_functions(["audiollm.rewards:wer"]) == [rewards.wer]
    for bad in (["exactly"], ["audiollm.rewards:nothing"], []):
        with pytest.raises(ValueError, match="rewards"):
            rewards.reward_functions(bad)


# ------------------------------------------------------------------------------------------------ audio rows


def test_audio_rows_give_each_slice_its_own_clips_in_order(folder):
    from audiollm.audio import featurize
    from audiollm.collator import Encoded

    clips = [tone(0.5, 300), tone(1.0, 400), tone(31.0, 500), tone(0.7, 600)]  # row 1: two clips, one over 30 s
    rows = [Encoded("a", [], [], [clips[0]]), Encoded("b", [], [], clips[1:3]), Encoded("c", [], [], []),
            Encoded("d", [], [], [clips[3]])]
    audio = AudioRows.of(rows, stack=1)
    assert audio.chunks.tolist() == [1, 3, 0, 1]
    whole = featurize(clips)
    assert torch.equal(audio.model_inputs()["input_features"], whole.input_features)
    part = audio.model_inputs(1, 3)
    assert torch.equal(part["input_features"], whole.input_features[1:4])
    assert torch.equal(part["feature_attention_mask"], whole.feature_attention_mask[1:4])
    assert audio.model_inputs(2, 3) == {}


# ------------------------------------------------------------------------------------------------------ stage


def even_tokens(completions, completion_ids, **_) -> list[float]:
    """A reward a random model can learn: the fraction of its answer's token ids that are even."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def rewards_logged(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry["reward"] for entry in state["log_history"] if "reward" in entry]


def test_grpo_raises_the_reward_and_saves_a_loadable_folder(folder, tmp_path):
    out = tmp_path / "grpo"
    main(recipe(folder, out, max_steps=12, rewards="tests.test_grpo:even_tokens", learning_rate=5e-2,
                per_device_train_batch_size=16, lr_scheduler_type="constant"))
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logged) == 12 and all(math.isfinite(entry["loss"]) for entry in logged)
    assert {"reward", "rewards/even_tokens/mean", "completions/mean_length", "entropy"} <= set(logged[0])
    reward = rewards_logged(out)
    assert np.mean(reward[-3:]) > np.mean(reward[:3]) + 0.2, reward  # ~0.5 at random
    start = AudioLLMForConditionalGeneration.from_pretrained(folder["model"])
    trained = AudioLLMForConditionalGeneration.from_pretrained(out)
    assert not torch.equal(trained.get_parameter(NAME), start.get_parameter(NAME))
    assert torch.equal(trained.audio_tower.conv1.weight, start.audio_tower.conv1.weight)  # frozen by the recipe


def build_trainer(argv: list[str]):
    """The trainer as ``stages.grpo.main`` builds it, without training."""
    from audiollm.training import load_datasets, load_model
    from stages.grpo import AudioGRPOTrainer, make_prompt_collator, prompt_row, usable_prompts

    model_args, data_args, grpo_args, args = parse_recipe(argv)
    model, tokenizer = load_model(model_args)
    train, _ = load_datasets(data_args, args)
    collator = make_prompt_collator(tokenizer, model, data_args, args)
    train = usable_prompts(train.map(prompt_row), collator, data_args, args.output_dir)
    return AudioGRPOTrainer(model, rewards.reward_functions(grpo_args.rewards), args, collator, train)


def test_scored_log_probs_are_the_model_s_with_each_row_s_audio(folder, tmp_path):
    trainer = build_trainer(recipe(folder, tmp_path / "out", beta=0.1))
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer._generate_and_score_completions(rows)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].shape[1]
    trainer._audio = AudioRows.from_batch(batch)
    got, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, width, batch_size=3)
    model = trainer.model
    with torch.no_grad():  # plain logits, all rows at once: the fused head in chunks of 3 must agree
        logits = model(input_ids=ids, attention_mask=mask, **trainer._audio.model_inputs()).logits
        other = {key: value.clone() for key, value in trainer._audio.model_inputs().items()}
        other["input_features"].normal_()  # the same placeholders, other audio
        other_logits = model(input_ids=ids, attention_mask=mask, **other).logits
    def answer_logps(logits):
        logps = logits[:, -width - 1:-1].log_softmax(-1)
        return logps.gather(-1, batch["completion_ids"][..., None])[..., 0]
    real = batch["completion_mask"].bool()
    torch.testing.assert_close(got[real], answer_logps(logits)[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[real], answer_logps(other_logits)[real], atol=1e-3)
    assert "ref_per_token_logps" in batch  # beta > 0: the reference (an AudioLLM copy) scored them too
    assert isinstance(trainer.ref_model, AudioLLMForConditionalGeneration)


def test_bad_rows_are_skipped_counted_and_logged_before_training(folder, tmp_path):
    good = folder["rows"]
    bad = [{"messages": good[0]["messages"], "audios": ["missing.wav"]},
           {"messages": [{"role": "user", "content": "<audio><audio>Two?"}, {"role": "assistant", "content": "no"}],
            "audios": ["clip0.wav"]}]
    data = write_jsonl(folder["root"] / "with_bad.jsonl", good * 25 + bad)  # 2 bad of 102
    out = tmp_path / "out"
    trainer = build_trainer(recipe(folder, out, train_files=data, max_bad_fraction=0.05))
    assert len(trainer.train_dataset) == 100
    logged = [json.loads(line) for line in (out / "bad_rows.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all("with_bad.jsonl" in entry["id"] for entry in logged)
    from audiollm.bad_rows import TooManyBadRows

    with pytest.raises(TooManyBadRows):
        build_trainer(recipe(folder, tmp_path / "out2", train_files=data, max_bad_fraction=0.01))


def test_refuses_what_it_cannot_do(folder, tmp_path):
    with pytest.raises(ValueError, match="use_vllm"):
        build_trainer(recipe(folder, tmp_path / "a", use_vllm="true"))
    with pytest.raises(ValueError, match="streaming"):
        parse_recipe(recipe(folder, tmp_path / "b", streaming="true"))
    with pytest.raises(ValueError, match="no room for the prompt"):
        build_trainer(recipe(folder, tmp_path / "c", max_completion_length=96))
    with pytest.raises(ValueError, match="unknown reward"):
        parse_recipe(recipe(folder, tmp_path / "d", rewards="exactly"))


def test_resume_continues_exactly(folder, tmp_path):
    argv = dict(max_steps=4, rewards="tests.test_grpo:even_tokens", per_device_train_batch_size=8, save_steps=2,
                save_strategy="steps", lr_scheduler_type="constant")  # the first half stops at max_steps 2
    main(recipe(folder, tmp_path / "straight", **argv))
    main(recipe(folder, tmp_path / "split", **dict(argv, max_steps=2)))  # stops at checkpoint-2...
    main(recipe(folder, tmp_path / "split", **argv))  # ...and the same command with 4 steps resumes there
    straight = AudioLLMForConditionalGeneration.from_pretrained(tmp_path / "straight")
    resumed = AudioLLMForConditionalGeneration.from_pretrained(tmp_path / "split")
    torch.testing.assert_close(resumed.get_parameter(NAME), straight.get_parameter(NAME))
    assert rewards_logged(tmp_path / "split")[2:] == rewards_logged(tmp_path / "straight")[2:]


def test_lora_trains_the_adapter(folder, tmp_path):
    out = tmp_path / "lora"
    main(recipe(folder, out, train_llm="false", llm_lora_r=4, beta=0.1, max_steps=2,
                rewards="tests.test_grpo:even_tokens"))
    trained = AudioLLMForConditionalGeneration.from_pretrained(out)  # the adapter merged into the saved folder
    start = AudioLLMForConditionalGeneration.from_pretrained(folder["model"])
    assert not torch.equal(trained.get_parameter(NAME), start.get_parameter(NAME))


def test_a_group_s_copies_of_a_prompt_are_read_and_featurized_once(folder, tmp_path, monkeypatch):
    trainer = build_trainer(recipe(folder, tmp_path / "out"))
    first, second = trainer.train_dataset[0], trainer.train_dataset[1]
    trainer._rows = [first, dict(first), second, dict(second), dict(first)]  # two groups, as TRL repeats them
    trainer.model.eval()
    encode, calls = trainer.eval_prompt_collator.encode, []
    monkeypatch.setattr(trainer.eval_prompt_collator, "encode", lambda row, i: calls.append(i) or encode(row, i))
    ids, _, audio = trainer._tokenize_prompts(None)
    assert calls == [0, 2]  # one encoding (audio read and featurized) per distinct prompt
    one = [encode(as_prompt(row), i) for i, row in enumerate(trainer._rows)]  # each copy on its own, as before
    assert ids == [row.input_ids for row in one]
    expected = AudioRows.of(one, trainer.eval_prompt_collator.stack).model_inputs()
    assert torch.equal(audio["input_features"], expected["input_features"])
    assert torch.equal(audio["feature_attention_mask"], expected["feature_attention_mask"])


def test_augmentation_reaches_training_prompts_only_and_a_group_hears_one_clip(folder, tmp_path):
    trainer = build_trainer(recipe(folder, tmp_path / "out", augmentation='{"noise": {"p": 1.0, "snr_db": [0, 5]}}'))
    row = trainer.train_dataset[0]
    trainer._rows = [row, dict(row)]  # two copies of one prompt, as in a group
    trainer.model.train()  # as the Trainer sets it before each step's sampling
    _, _, noisy = trainer._tokenize_prompts(None)
    torch.testing.assert_close(noisy["input_features"][0], noisy["input_features"][1])
    trainer.model.eval()
    _, _, clean = trainer._tokenize_prompts(None)
    assert not torch.allclose(noisy["input_features"], clean["input_features"])
    from audiollm.audio import featurize
    from audiollm.audio_sources import load_audio_source

    as_read = featurize([load_audio_source(str(folder["root"] / "clip0.wav"), "clip0")]).input_features[0]
    torch.testing.assert_close(clean["input_features"][0], as_read)


def test_grpo_trains_on_two_deepspeed_ranks(folder, tmp_path):
    from safetensors.torch import load_file

    from tests.test_distributed import free_port, run

    out = tmp_path / "out"
    run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "stages/grpo.py",
         "--config", "stages/configs/grpo_demo.yaml",
         *recipe(folder, out, max_steps=3, rewards="tests.test_grpo:even_tokens", per_device_train_batch_size=4),
         "--use_cpu", "true", "--deepspeed", "deepspeed_configs/zero2.json"], tmp_path / "logs" / "train.log")
    state = json.loads((out / "trainer_state.json").read_text())
    losses = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    before = load_file(Path(folder["model"]) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert not torch.equal(before[NAME], after[NAME])


def test_demo_measurement_pairs_items_and_reports(tmp_path):
    from audiollm.demo_grpo import report
    from eval.report import paired_gain

    def predictions(path: Path, scores: list[float]) -> Path:
        path.write_text("".join(json.dumps({"task": "heldout_voice_chat", "kind": "short", "id": f"q{i}",
                                            "prediction": "", "score": s}) + "\n"
                                for i, s in enumerate(scores)))
        return path

    before = predictions(tmp_path / "before.jsonl", [0, 0, 1, 1, 0, 1, 0, 0])
    after = predictions(tmp_path / "after.jsonl", [1, 0, 1, 0, 1, 1, 1, 0])
    gain = paired_gain(before, after, "heldout_voice_chat")
    assert gain["gain"] == pytest.approx(2 / 8) and (gain["fixed"], gain["broken"], gain["items"]) == (3, 1, 8)
    assert gain["ci95"][0] <= 0.25 <= gain["ci95"][1]
    split = {"voice_chat_accuracy": 0.5, "analysis_accuracy": 0.6, "asr_wer": 0.4, "classification_accuracy": 0.7,
             "typed_question_accuracy": 0.9}
    text = report({"sft": {"heldout": split, "validation": split}, "grpo": {"heldout": split, "validation": split},
                   "voice_chat_gain": {"heldout": gain}, "reward_curve": [[10, 0.5]], "completions_per_second": 3.0,
                   "train_seconds": 12.0})
    assert "| heldout | voice_chat_accuracy | 0.500 | 0.500 |" in text and "+0.250" in text and "3 items fixed" in text


def test_evaluation_samples_unaugmented_prompts_and_logs_the_reward(folder, tmp_path):
    out = tmp_path / "out"
    main(recipe(folder, out, max_steps=2, eval_files=folder["train"], eval_strategy="steps", eval_steps=2,
                per_device_eval_batch_size=4, rewards="tests.test_grpo:even_tokens",
                augmentation='{"gain": {"p": 1.0, "db": [-6, 0]}}'))
    state = json.loads((out / "trainer_state.json").read_text())
    [evaluated] = [entry for entry in state["log_history"] if "eval_reward" in entry]
    assert evaluated["step"] == 2 and 0.0 <= evaluated["eval_reward"] <= 1.0
