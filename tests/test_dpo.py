"""Stage 3, DPO on audio: the preference collator, TRL's loss through AudioDPOTrainer, the reference model paths
(frozen copy, LoRA base, precomputed), training moving the margin, main() end to end and the shipped recipe.

CPU only, offline: a tiny model folder, tonal wav files and preference manifests are written by the fixtures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audiollm.audio import SAMPLE_RATE, clip_token_count
from audiollm.chat import AUDIO_TOKEN
from audiollm.collator import IGNORE_INDEX, ChatCollator, RowError
from audiollm.model.config import AudioLLMConfig
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.preference import PreferenceCollator
from audiollm.tiny import tiny_audio_config, tiny_text_config, tiny_tokenizer
from audiollm.training import load_datasets, load_model
from stages.dpo import AudioDPOTrainer, load_reference, main, make_preference_collator, parse_recipe

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 128  # tokens; the fixture rows take about 60-90, LONG_ANSWER over 128
LONG_ANSWER = " ".join(["the red cat and the blue dog"] * 20)
ANSWERS = [("A dog.", "A red car."), ("A bird.", "Blue water."), ("A cat.", "The moon."), ("A man.", "A green tree.")]


def tone(seconds: float, hz: float) -> np.ndarray:
    """A 16 kHz sine with a little deterministic noise, (round(seconds * 16000),) float32."""
    t = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    noise = 0.01 * np.random.default_rng(int(hz)).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model folder, four wav files (0.5-2 s) and two manifests: 4 rows, and 5 rows with an over-long one."""
    root = tmp_path_factory.mktemp("dpo")
    tokenizer = tiny_tokenizer()
    config = AudioLLMConfig(
        audio_config=tiny_audio_config(),
        text_config=tiny_text_config(len(tokenizer)),
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
    )
    torch.manual_seed(0)
    AudioLLMForConditionalGeneration(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = []
    for i, (chosen, rejected) in enumerate(ANSWERS):
        sf.write(root / f"clip{i}.wav", tone(0.5 + 0.5 * i, 220.0 * (i + 1)), SAMPLE_RATE)
        rows.append({"messages": [{"role": "user", "content": "<audio>What is this sound?"}],
                     "audios": [f"clip{i}.wav"], "chosen": chosen, "rejected": rejected})
    long_row = dict(rows[0], rejected=LONG_ANSWER)
    return {
        "model": str(root / "model"),
        "prefs": write_jsonl(root / "prefs.jsonl", rows),
        "with_long": write_jsonl(root / "with_long.jsonl", rows[:2] + [long_row] + rows[2:]),
    }


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def recipe_argv(folder, out: Path, data: str | None = None, **overrides) -> list[str]:
    """CLI arguments of a small full-LLM DPO recipe; ``overrides`` replace or add keys."""
    recipe = dict(model_name_or_path=folder["model"], train_files=data or folder["prefs"], output_dir=str(out),
                  bf16="false", report_to="none", max_length=MAX_LENGTH, per_device_train_batch_size=2,
                  train_llm="true", train_projector="false", disable_tqdm="true", activation_checkpointing="false",
                  save_strategy="no", seed=0)
    recipe.update(overrides)
    return [token for key, value in recipe.items()
            for token in (f"--{key}", *map(str, value if isinstance(value, list) else [value]))]


def build_trainer(argv: list[str]) -> AudioDPOTrainer:
    """The trainer exactly as ``stages.dpo.main`` builds it, without training."""
    model_args, data_args, args = parse_recipe(argv)
    model, tokenizer = load_model(model_args)
    ref_model = load_reference(model_args, args, model)
    train, _ = load_datasets(data_args, args)
    collator = make_preference_collator(tokenizer, model, data_args)
    return AudioDPOTrainer(model, ref_model, args, collator, train, processing_class=tokenizer)


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """(2B,) summed log-probs of the labelled answer tokens, from plain logits (not TRL's fused head)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       input_features=batch["input_features"],
                       feature_attention_mask=batch["feature_attention_mask"]).logits  # (2B, S, V)
    labels = batch["labels"][:, 1:]  # token t is predicted at position t-1
    picked = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (2B, S-1)
    return (picked * (labels != IGNORE_INDEX)).sum(-1)


def margin(model, batch: dict) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected)."""
    chosen, rejected = sequence_logps(model, batch).chunk(2)
    return float((chosen - rejected).mean())


def step_loss(trainer: AudioDPOTrainer, rows: list[dict]) -> tuple[float, dict]:
    """The trainer's loss on one batch of ``rows`` and the metrics TRL recorded for it."""
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    mode = "train" if trainer.model.training else "eval"
    return float(loss), {key: values[-1] for key, values in trainer._metrics[mode].items()}


# ------------------------------------------------------------------------------------------------- collator


def test_collator_stacks_chosen_then_rejected_with_labels_on_answers_only(tok, folder):
    clips = [tone(1.0, 300.0), tone(0.6, 500.0)]
    rows = [
        {"messages": [{"role": "user", "content": "<audio>What is this sound?"}], "audios": [clips[0]],
         "chosen": "A dog.", "rejected": "A cat."},
        {"messages": [{"role": "user", "content": "<audio>Hello"}, {"role": "assistant", "content": "Yes."},
                      {"role": "user", "content": "What color?"}], "audios": [clips[1]],
         "chosen": [{"role": "assistant", "content": "Red."}],  # ms-swift: a list with one message
         "rejected_response": {"role": "assistant", "content": "Blue water."}},  # LLaMA-Factory's key
    ]
    batch = PreferenceCollator(tok)(rows)
    assert batch["input_ids"].shape[0] == 4 and batch["kept"].tolist() == [True, True]
    answers = ["A dog.", "Red.", "A cat.", "Blue water."]  # rows 0..B-1 chosen, B..2B-1 rejected
    for i, answer in enumerate(answers):
        labels = batch["labels"][i]
        assert tok.decode(labels[labels != IGNORE_INDEX]) == answer + "<|im_end|>"  # not the earlier "Yes."
    audio_id = tok.convert_tokens_to_ids(AUDIO_TOKEN)
    for i, clip in enumerate(clips):
        for row in (i, i + 2):
            assert int((batch["input_ids"][row] == audio_id).sum()) == clip_token_count(len(clip))
    # each half is ChatCollator's own encoding of the prompt plus that answer
    chat = ChatCollator(tok, train_on="last")(
        [dict(rows[1], messages=rows[1]["messages"] + [{"role": "assistant", "content": "Blue water."}])])
    width = chat["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][3, :width], chat["input_ids"][0])
    assert torch.equal(batch["labels"][3, :width], chat["labels"][0])
    # one chunk per clip for the chosen half, then the same chunks for the rejected half
    features, mask = batch["input_features"], batch["feature_attention_mask"]
    assert features.shape[0] == 4 and torch.equal(features[:2], features[2:]) and torch.equal(mask[:2], mask[2:])
    assert mask[0].sum() > mask[1].sum()  # clip order kept: 1.0 s before 0.6 s


def test_collator_errors_name_the_row(tok):
    row = {"id": "prefs.jsonl:3", "messages": [{"role": "user", "content": "<audio>And <audio>?"}],
           "audios": [tone(0.5, 200.0)], "chosen": "A.", "rejected": "B."}
    with pytest.raises(RowError, match=r"prefs.jsonl:3: 2 <audio> marker\(s\) .* but 1 file"):
        PreferenceCollator(tok)([row])
    no_rejected = dict(row, id="prefs.jsonl:4", audios=[tone(0.5, 200.0)] * 2, rejected=None)
    with pytest.raises(RowError, match=r"prefs.jsonl:4: no 'rejected' / 'rejected_response' answer"):
        PreferenceCollator(tok)([no_rejected])
    ends_with_answer = dict(row, id="prefs.jsonl:5", messages=row["messages"] + [{"role": "assistant", "content": "x"}])
    with pytest.raises(RowError, match="prefs.jsonl:5: 'messages' must .* end with a user turn"):
        PreferenceCollator(tok)([ends_with_answer])


def test_collator_drops_a_pair_when_either_side_is_too_long(tok):
    short = {"id": "short", "messages": [{"role": "user", "content": "<audio>Hi"}], "audios": [tone(0.5, 200.0)],
             "chosen": "Yes.", "rejected": "No."}
    long = dict(short, id="long", audios=[tone(1.0, 300.0)], rejected=LONG_ANSWER)
    collator = PreferenceCollator(tok, max_length=MAX_LENGTH)
    batch = collator([long, short])
    assert batch["kept"].tolist() == [False, True]
    assert batch["input_ids"].shape[0] == 2 and batch["input_features"].shape[0] == 2  # 1 pair, its clip twice
    assert collator.skipped["dropped_over_max_length"] == 1  # one count per dropped pair
    assert tok.decode(batch["labels"][1][batch["labels"][1] != IGNORE_INDEX]) == "No.<|im_end|>"


# ------------------------------------------------------------------------------------------------- trainer


def test_step0_loss_is_log2_and_logps_are_answer_token_sums(folder, tmp_path):
    trainer = build_trainer(recipe_argv(folder, tmp_path))
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    rows = [trainer.train_dataset[i] for i in range(4)]
    loss, metrics = step_loss(trainer, rows)
    assert abs(loss - math.log(2)) < 1e-5
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    chosen, rejected = sequence_logps(trainer.model, trainer.data_collator(rows)).chunk(2)
    assert metrics["logps/chosen"] == pytest.approx(float(chosen.mean()), abs=1e-4)
    assert metrics["logps/rejected"] == pytest.approx(float(rejected.mean()), abs=1e-4)
    assert metrics["logps/chosen"] != pytest.approx(metrics["logps/rejected"], abs=1e-2)  # so a swap would show


def test_loss_type_comes_from_the_recipe(folder, tmp_path):
    trainer = build_trainer(recipe_argv(folder, tmp_path, loss_type="hinge"))
    loss, _ = step_loss(trainer, [trainer.train_dataset[i] for i in range(2)])
    assert loss == pytest.approx(1.0, abs=1e-5)  # hinge: relu(1 - beta * 0) with the policy at the reference


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_training_raises_the_chosen_minus_rejected_margin(folder, tmp_path, kind):
    extra = {"full": dict(learning_rate=1e-3),
             "lora": dict(train_llm="false", llm_lora_r=8, lora_dropout=0.0, learning_rate=1e-2)}[kind]
    trainer = build_trainer(recipe_argv(folder, tmp_path, max_steps=8, logging_steps=4, **extra))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    base_weight = trainer.model.get_parameter(_first_llm_weight(trainer.model)).detach().clone()
    before = margin(trainer.model, batch)
    trainer.train()
    trainer.model.eval()
    after = margin(trainer.model, batch)
    assert after > before + 1.0
    logged = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    assert logged and {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"} <= logged[-1].keys()
    weight_moved = not torch.equal(trainer.model.get_parameter(_first_llm_weight(trainer.model)), base_weight)
    assert weight_moved == (kind == "full")  # LoRA trains the adapter; the base stays the reference
    if kind == "lora":
        assert trainer.ref_model is None  # TRL's path: the reference is the base with the adapter disabled


def _first_llm_weight(model) -> str:
    """Name of the first LLM q_proj base weight (under peft: the wrapped layer's base weight)."""
    return next(n for n, _ in model.named_parameters()
                if "language_model" in n and "q_proj" in n and "lora_" not in n and n.endswith("weight"))


def test_precomputed_reference_gives_the_live_reference_loss(folder, tmp_path):
    """Perturb two identical policies the same way: the precomputed and the live reference give one loss."""
    live = build_trainer(recipe_argv(folder, tmp_path / "live", data=folder["with_long"]))
    pre = build_trainer(recipe_argv(folder, tmp_path / "pre", data=folder["with_long"],
                                    precompute_ref_log_probs="true"))
    assert pre.ref_model is None  # the policy scored the dataset before any step
    ref_chosen = torch.tensor(pre.train_dataset["ref_chosen_logps"])
    assert torch.isnan(ref_chosen).tolist() == [False, False, True, False, False]  # the over-long row, aligned
    torch.manual_seed(1)
    with torch.no_grad():
        for p in live.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pre.model.load_state_dict(live.model.state_dict())
    rows = range(5)  # the batch drops the over-long row on both sides
    live_loss, _ = step_loss(live, [live.train_dataset[i] for i in rows])
    pre_loss, _ = step_loss(pre, [pre.train_dataset[i] for i in rows])
    assert abs(live_loss - math.log(2)) > 1e-3  # the perturbation moved the policy off its reference
    assert pre_loss == pytest.approx(live_loss, abs=1e-5)


def test_chosen_cross_entropy_beside_dpo_is_the_hand_computed_sum(folder, tmp_path):
    """The demo's ``loss_type: [sigmoid, sft]`` with weights [1, 4]: at the reference, log 2 plus 4 x the chosen
    answers' mean negative log-likelihood per token (their end-of-turn included), from plain logits."""
    trainer = build_trainer(recipe_argv(folder, tmp_path / "rpo", loss_type=["sigmoid", "sft"],
                                        loss_weights=[1.0, 4.0]))
    rows = [trainer.train_dataset[i] for i in range(4)]
    loss, _ = step_loss(trainer, rows)
    batch = trainer.data_collator(rows)
    chosen = sequence_logps(trainer.model, batch).chunk(2)[0]
    tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).chunk(2)[0].sum()
    assert loss == pytest.approx(math.log(2) + 4 * float(-chosen.sum() / tokens), abs=1e-4)


@pytest.mark.parametrize("attention, max_tokens", [("sdpa_packed", 0), ("sdpa", 100)])
def test_packed_dpo_gives_the_padded_loss_metrics_and_gradients(folder, tmp_path, attention, max_tokens):
    """The same rows padded and packed (one sequence; or sequences of <= 100 tokens, the sdpa mask path)."""
    padded = build_trainer(recipe_argv(folder, tmp_path / "padded", attn_implementation=attention))
    packed = build_trainer(recipe_argv(folder, tmp_path / "packed", attn_implementation=attention, packing="true",
                                       packing_max_tokens=max_tokens))
    torch.manual_seed(1)
    with torch.no_grad():  # off the reference, so the loss is not log 2 whatever the log-probs
        for p in padded.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    packed.model.load_state_dict(padded.model.state_dict())
    rows = [padded.train_dataset[i] for i in range(4)]
    batch = packed.data_collator(rows)
    assert batch["pack_rows"] == max_tokens and "pack_rows" not in padded.data_collator(rows)
    results = {}
    for name, trainer in (("padded", padded), ("packed", packed)):
        trainer.model.zero_grad()
        inputs = trainer._prepare_inputs(trainer.data_collator(rows))
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        mode = "train" if trainer.model.training else "eval"
        results[name] = float(loss.detach()), {k: v[-1] for k, v in trainer._metrics[mode].items()}, grads
    (loss, metrics, grads), (packed_loss, packed_metrics, packed_grads) = results["padded"], results["packed"]
    assert abs(loss - math.log(2)) > 1e-3 and packed_loss == pytest.approx(loss, abs=1e-5)
    for key in ("logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies"):
        assert packed_metrics[key] == pytest.approx(metrics[key], abs=1e-4), key
    assert grads.keys() == packed_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_rows_forward_returns_the_padded_layout(folder):
    """Plain logits (no fused head) of a packed forward equal the padded forward's on every real position."""
    model = AudioLLMForConditionalGeneration.from_pretrained(folder["model"], attn_implementation="sdpa_packed")
    tok = tiny_tokenizer()
    rows = [json.loads(line) for line in Path(folder["prefs"]).read_text().splitlines()]
    for row in rows:
        row["audios"] = [str(Path(folder["prefs"]).parent / a) for a in row["audios"]]
    batch = PreferenceCollator(tok)(rows)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "input_features", "feature_attention_mask")}
    with torch.no_grad():
        padded = model(**inputs).logits  # (2B, S, V)
        packed = model(**inputs, pack_rows=0).logits
    real = batch["attention_mask"].bool()
    assert packed.shape == padded.shape and bool((packed[~real] == 0).all())
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- stage


def test_main_trains_saves_a_loadable_folder_and_resumes(folder, tmp_path):
    out = tmp_path / "runs" / "dpo"
    recipe = dict(model_name_or_path=folder["model"], train_files=[folder["prefs"]], output_dir=str(out),
                  train_llm=True, train_projector=False, max_length=MAX_LENGTH, beta=0.1, loss_type="sigmoid",
                  max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, save_steps=2,
                  bf16=False, activation_checkpointing=True, report_to="none", disable_tqdm=True)
    config = tmp_path / "dpo.yaml"
    config.write_text(json.dumps(recipe))  # JSON is YAML
    main(["--config", str(config)])
    start = AudioLLMForConditionalGeneration.from_pretrained(folder["model"])
    trained = AudioLLMForConditionalGeneration.from_pretrained(out)
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained.get_parameter(name), start.get_parameter(name))
    assert torch.equal(trained.audio_tower.conv1.weight, start.audio_tower.conv1.weight)  # frozen in the recipe
    assert (out / "tokenizer_config.json").is_file()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logged = {key for entry in state["log_history"] for key in entry}
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"} <= logged
    # Run again with another learning rate: it resumes at checkpoint-2 = max_steps, so the weights do not change.
    main(["--config", str(config), "--learning_rate", "5e-3"])
    resumed = AudioLLMForConditionalGeneration.from_pretrained(out)
    assert torch.equal(resumed.get_parameter(name), trained.get_parameter(name))


def test_shipped_recipe_parses(folder, tmp_path):
    model_args, data_args, args = parse_recipe([
        "--config", str(REPO / "stages" / "configs" / "dpo.yaml"), "--bf16", "false",
        "--model_name_or_path", folder["model"], "--train_files", folder["prefs"], "--output_dir", str(tmp_path),
    ])
    assert args.beta == 0.1 and args.loss_type == ["sigmoid"] and args.precompute_ref_log_probs is False
    assert args.activation_checkpointing and args.remove_unused_columns is False and args.report_to == []
    assert model_args.train_llm != (model_args.llm_lora_r > 0)  # full LLM or LoRA, one of the two
    assert data_args.max_length == args.max_length and model_args.trust_remote_code is False
    assert data_args.train_files == [folder["prefs"]]
    with pytest.raises(ValueError, match="augmentation applies to pretraining and SFT rows only"):
        parse_recipe(["--config", str(REPO / "stages" / "configs" / "dpo.yaml"), "--bf16", "false",
                      "--model_name_or_path", folder["model"], "--train_files", folder["prefs"],
                      "--output_dir", str(tmp_path), "--augmentation", '{"gain": {"p": 1.0, "db": [0, 1]}}'])
    with pytest.raises(ValueError, match="batch_tokens / batch_audio_seconds apply to pretraining and SFT"):
        parse_recipe(["--config", str(REPO / "stages" / "configs" / "dpo.yaml"), "--bf16", "false",
                      "--model_name_or_path", folder["model"], "--train_files", folder["prefs"],
                      "--output_dir", str(tmp_path), "--batch_tokens", "4096"])
