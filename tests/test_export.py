"""audiollm export: every input kind (folder, LoRA adapter, ZeRO-3 checkpoint) into both formats, reloaded offline
with stock transformers (qwen2_audio) or audiollm (native) and checked against the project's own model: the same
logits (fp32, < 1e-4) and the same greedy tokens. Also dtypes on disk, the model card, atomic writes, the upload.

The ZeRO-3 checkpoint comes from one 2-rank CPU DeepSpeed SFT run (2 steps, checkpoint at step 2), started in the
background when the module starts, so it trains while the other tests run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_distributed import aborted_at_exit_only
import soundfile as sf
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import (
    AutoModelForMultimodalLM,
    AutoModelForPreTraining,
    AutoModelForSeq2SeqLM,
    AutoProcessor,
    Qwen2AudioForConditionalGeneration,
)

from audiollm.audio import SAMPLE_RATE
from audiollm.build import DTYPES, build_tiny
from audiollm.collator import ChatCollator
from audiollm.export import ExportError, export, padding_check, synthetic_clip
from audiollm.export_choices import DTYPE_NAMES
from audiollm.export_cli import add_export_parser, run_export
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.model_card import write_training_summary
from eval.report import summarize

REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What does the speaker say?"
NEW_TOKENS = 8
LOGIT_ATOL = 1e-4  # fp32 both sides; measured differences are ~3e-7 (summation order only)
ZERO3_STEPS = 2
ZERO3_TIMEOUT_S = 600  # the run takes well under a minute here; this only bounds a hang


# ------------------------------------------------------------------------------------------------- helpers


def ours_unpadded(model, tokenizer, clip) -> tuple[torch.Tensor, list[int]]:
    """The project's path: unpadded features through audiollm's model. Returns (logits, greedy new ids)."""
    collator = ChatCollator(tokenizer, stack=model.config.projector_stack, generation=True)
    batch = collator([{"messages": [{"role": "user", "content": f"<audio>{QUESTION}"}], "audios": [clip]}])
    with torch.no_grad():
        logits = model(**batch).logits
        ids = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    return logits, ids[0, batch["input_ids"].shape[1]:].tolist()


def stock_padded(folder: Path, clip) -> tuple[torch.Tensor, list[int]]:
    """A stock user's path on the exported folder: AutoProcessor (30 s padding) + Qwen2AudioForConditionalGeneration,
    local files only (no network)."""
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                               local_files_only=True).eval()
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": "clip.wav"},
                                                 {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, audio=[clip], sampling_rate=SAMPLE_RATE, return_tensors="pt")
    assert inputs["input_features"].shape[-1] == 3000
    with torch.no_grad():
        logits = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return logits, ids[0, inputs["input_ids"].shape[1]:].tolist()


def assert_same_model(expected: tuple[torch.Tensor, list[int]], got: tuple[torch.Tensor, list[int]]) -> None:
    (logits_a, ids_a), (logits_b, ids_b) = expected, got
    assert logits_a.shape == logits_b.shape
    diff = (logits_a - logits_b).abs().max().item()
    assert diff < LOGIT_ATOL, f"max |logit diff| {diff:.2e}"
    assert ids_a == ids_b and len(ids_a) > 0


def load_ours(folder: Path):
    from transformers import AutoTokenizer

    model = AudioLLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def tensor_dtypes(folder: Path) -> set[torch.dtype]:
    found = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            assert handle.metadata().get("format") == "pt"
            found |= {handle.get_slice(name).get_dtype() for name in handle.keys()}
    return {getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[d]) for d in found}


def all_text(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.iterdir() if p.suffix in (".json", ".md", ".jinja"))


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(3.0, seed=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Factory of tiny model folders, built once per distinct argument set."""
    root, built = tmp_path_factory.mktemp("tiny"), {}

    def get(projector="linear", llm_type="qwen2", tie=False, seed=0) -> Path:
        key = (projector, llm_type, tie, seed)
        if key not in built:
            built[key] = root / "-".join(map(str, key))
            build_tiny(built[key], projector=projector, llm_type=llm_type, tie=tie, seed=seed)
        return built[key]

    return get


# ----------------------------------------------------------------------------------------- the ZeRO-3 run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_zero3_inputs(root: Path) -> Path:
    """A tiny init folder, 4 clips with an SFT manifest, and the shipped SFT recipe changed for 2 CPU ranks."""
    build_tiny(root / "init")
    rows = []
    for i in range(4):
        t = np.arange(int(0.5 * SAMPLE_RATE)) / SAMPLE_RATE
        sf.write(root / f"clip{i}.wav", (0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t)).astype(np.float32), SAMPLE_RATE)
        rows.append({"messages": [{"role": "user", "content": "<audio>What does the speaker say?"},
                                  {"role": "assistant", "content": "one two three"}], "audios": [f"clip{i}.wav"]})
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = yaml.safe_load((REPO_ROOT / "stages" / "configs" / "sft.yaml").read_text())
    recipe.pop("mix_weights", None)
    recipe.update(model_name_or_path=str(root / "init"), train_files=[str(root / "sft.jsonl")],
                  output_dir=str(root / "run"), bf16=False, use_cpu=True, max_steps=ZERO3_STEPS,
                  save_steps=ZERO3_STEPS, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                  learning_rate=1e-3, warmup_steps=0, train_sampling_strategy="random", logging_steps=1,
                  dataloader_num_workers=0, activation_checkpointing=False, report_to="none")
    (root / "sft.yaml").write_text(yaml.safe_dump(recipe))
    return root / "sft.yaml"


@pytest.fixture(scope="module", autouse=True)
def zero3_run(request, tmp_path_factory):
    """Start the 2-rank ZeRO-3 run in the background when a test of this module needs it; stop it if unfinished."""
    if not any("zero3" in item.name for item in request.session.items if item.module is request.module):
        yield None
        return
    root = tmp_path_factory.mktemp("zero3")
    recipe = write_zero3_inputs(root)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's deepspeed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "stages/sft.py", "--config",
           str(recipe), "--deepspeed", "deepspeed_configs/zero3.json"]
    with open(root / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    yield proc, root
    if proc.poll() is None:  # a failed or interrupted test left it running: stop the group this fixture started
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zero3_checkpoint(zero3_run) -> tuple[Path, Path]:
    """(checkpoint-2 without its gathered weights, the run's final folder), once the run has finished."""
    proc, root = zero3_run
    rc = proc.wait(timeout=ZERO3_TIMEOUT_S)
    log = (root / "run.log").read_text(errors="replace")
    assert rc == 0 or aborted_at_exit_only(log), "\n".join(log.splitlines()[-60:])
    run = root / "run"
    checkpoint = run / f"checkpoint-{ZERO3_STEPS}"
    # As with stage3_gather_16bit_weights_on_model_save: false, only the shards remain; the export must use them.
    (checkpoint / "model.safetensors").unlink()
    return checkpoint, run


# ----------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("llm_type,tie", [("qwen2", False), ("qwen3", True)])
def test_linear_model_exports_as_stock_qwen2_audio(tiny, tmp_path, clip, llm_type, tie):
    """Qwen2 and Qwen3 LLMs (the latter with a tied head, which stock Qwen2-Audio never ties): the folder loads with
    stock classes and gives the project's logits and greedy tokens; the padding check records ~3e-7."""
    source = tiny("linear", llm_type, tie)
    out = export(source, tmp_path / "export", dtype="fp32", check=True)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_audio"
    assert config["architectures"] == ["Qwen2AudioForConditionalGeneration"]
    assert "projector_type" not in config and "projector_stack" not in config
    for name in ("preprocessor_config.json", "processor_config.json", "generation_config.json",
                 "tokenizer.json", "chat_template.jinja", "README.md"):
        assert (out / name).is_file(), name
    assert_same_model(ours_unpadded(*load_ours(source), clip), stock_padded(out, clip))
    for auto_class in (AutoModelForMultimodalLM, AutoModelForSeq2SeqLM, AutoModelForPreTraining):
        assert type(auto_class.from_pretrained(out, local_files_only=True)) is Qwen2AudioForConditionalGeneration
    padding = padding_check(out)
    assert padding["max_abs_logit_diff"] < LOGIT_ATOL and padding["unpadded_frames"] < padding["padded_frames"]
    assert f"max |logit difference| = {padding['max_abs_logit_diff']:.2e}" in (out / "README.md").read_text()


@pytest.mark.parametrize("projector", ["mlp", "stack"])
def test_other_projectors_export_native(tiny, tmp_path, clip, projector):
    """auto picks native; audiollm reloads it with the same logits; stock Auto classes refuse it."""
    source = tiny(projector)
    out = export(source, tmp_path / "export", dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "audiollm" and config["projector_type"] == projector
    assert config["architectures"] == ["AudioLLMForConditionalGeneration"]
    assert_same_model(ours_unpadded(*load_ours(source), clip), ours_unpadded(*load_ours(out), clip))
    with pytest.raises(ValueError, match="audiollm"):
        AutoModelForMultimodalLM.from_pretrained(out, local_files_only=True)
    assert padding_check(out)["max_abs_logit_diff"] < LOGIT_ATOL


def test_stock_class_on_a_native_folder_is_the_documented_limitation(tiny, tmp_path):
    """transformers 5.24 only warns when the explicit Qwen2-Audio class meets model_type "audiollm", and loads a
    random projector; the card must say so (this test fails, and the card is stale, the day transformers refuses)."""
    out = export(tiny("mlp"), tmp_path / "export", dtype="fp32")
    model = Qwen2AudioForConditionalGeneration.from_pretrained(out, local_files_only=True)
    assert type(model) is Qwen2AudioForConditionalGeneration
    card = (out / "README.md").read_text()
    assert "does **not** fail" in card and "random projector" in card


@pytest.mark.parametrize("projector,why", [("mlp", "has two layers"), ("stack", "concatenates 4 frames")])
def test_qwen2_audio_format_is_refused_for_other_projectors(tiny, tmp_path, projector, why):
    with pytest.raises(ExportError, match=f"projector '{projector}' {why}.*one Linear.*--format native"):
        export(tiny(projector), tmp_path / "export", format="qwen2_audio")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                            ("fp32", torch.float32)])
def test_dtype_on_disk(tiny, tmp_path, dtype, expected):
    assert set(DTYPE_NAMES) == set(DTYPES)  # the CLI's choices are the exporter's dtypes
    source = tiny("linear")
    out = export(source, tmp_path / "export", dtype=dtype)
    assert tensor_dtypes(out) == {expected}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(expected).removeprefix("torch.")
    with safe_open(str(source / "model.safetensors"), framework="pt") as src, \
            safe_open(str(out / "model.safetensors"), framework="pt") as dst:
        name = "multi_modal_projector.linear.weight"
        assert torch.equal(dst.get_tensor(name), src.get_tensor(name).to(expected))


def make_adapter(base: Path, adapter_dir: Path):
    """LoRA on the LLM with the projector in modules_to_save (as stages do), with non-zero trained weights."""
    from audiollm.stage_args import ModelArguments
    from audiollm.training import add_lora

    model = AudioLLMForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    peft_model = add_lora(model, ModelArguments(model_name_or_path=str(base), llm_lora_r=4, train_projector=True))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as if trained: LoRA B starts at zero, which would make the merge a no-op
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(adapter_dir)
    return peft_model.eval()


def test_lora_adapter_is_merged(tiny, tmp_path, clip):
    base = tiny("linear", seed=5)
    adapter = tmp_path / "run" / "adapter"
    peft_model = make_adapter(base, adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    with pytest.raises(ExportError, match="--merge-lora"):
        export(adapter, tmp_path / "refused")
    from transformers import AutoTokenizer

    expected = ours_unpadded(peft_model, AutoTokenizer.from_pretrained(base), clip)  # unmerged LoRA forward
    out = export(adapter, tmp_path / "export", dtype="fp32", merge_lora=True)
    assert_same_model(expected, stock_padded(out, clip))
    assert "LoRA adapter merged into its base: rank 4" in (out / "README.md").read_text()
    assert not any(f.name.startswith("adapter") for f in out.iterdir())


def test_zero3_checkpoint_is_consolidated_on_cpu(zero3_checkpoint, tmp_path, clip):
    """checkpoint-2 of a 2-rank ZeRO-3 SFT run, shards only: the fp32 masters equal the run's final weights (fp32
    training, last step), and stock transformers reproduces the trained model."""
    checkpoint, run = zero3_checkpoint
    out = export(checkpoint, tmp_path / "export", dtype="fp32")
    with safe_open(str(run / "model.safetensors"), framework="pt") as final, \
            safe_open(str(out / "model.safetensors"), framework="pt") as got:
        assert set(final.keys()) == set(got.keys())
        for name in final.keys():
            assert torch.equal(final.get_tensor(name), got.get_tensor(name)), name
    with safe_open(str(run.parent / "init" / "model.safetensors"), framework="pt") as init:
        name = "language_model.lm_head.weight"
        assert not torch.equal(init.get_tensor(name), load_ours(out)[0].state_dict()[name])  # it trained
    assert_same_model(ours_unpadded(*load_ours(run), clip), stock_padded(out, clip))
    card = (out / "README.md").read_text()  # the run's training_summary.json (written by the stage) is the record
    assert "| sft | " in card and f" | {ZERO3_STEPS} | " in card


def write_results(path: Path) -> Path:
    """An eval results.json made by eval's own summarizer: one scored MCQ task, one unscored open task."""
    records = [{"task": "mmau-mini", "kind": "mcq", "stats": [s], "model": "/local/run"} for s in (1, 1, 0)]
    records += [{"task": "chat", "kind": "open", "stats": None, "model": "/local/run"}]
    path.write_text(json.dumps(summarize(records, judge=None, n_resamples=50)))
    return path


def test_model_card_metadata_training_and_results(tiny, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(tiny("linear"), source)
    config = json.loads((source / "config.json").read_text())
    config["text_config"]["_name_or_path"] = "/home/someone/models/Qwen2.5-7B"  # what a local LLM folder leaves
    config["audio_config"]["_name_or_path"] = "openai/whisper-large-v3"
    (source / "config.json").write_text(json.dumps(config))
    (tmp_path / "pretrain-out").mkdir()
    write_training_summary(tmp_path / "pretrain-out", None, {"stage": "pretrain", "train_files":
                           ["/data/me/asr.jsonl"], "train_rows": 1000, "steps": 50, "trainable": ["projector"]})
    write_training_summary(source, tmp_path / "pretrain-out", {"stage": "sft", "train_files":
                           ["someone/voice-chat", "/data/me/analysis.jsonl"], "train_rows": 400, "steps": 20,
                           "trainable": ["projector", "llm"], "final_loss": 0.5})

    out = export(source, tmp_path / "export", results=write_results(tmp_path / "results.json"),
                 license="apache-2.0")
    text = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta == yaml.safe_load(text.split("---")[1])
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "audio-text-to-text"
    assert {"audio", "audio-text-to-text", "qwen2-audio"} <= set(meta["tags"])
    assert meta["base_model"] == ["openai/whisper-large-v3"] and meta["datasets"] == ["someone/voice-chat"]
    assert "| mmau-mini | mcq | accuracy ↑ | 0.6667 |" in text
    assert "| chat | open | judge_score ↑ | unscored (" in text
    assert "| pretrain | asr.jsonl | 1000 | 50 |" in text and "| sft | someone/voice-chat, analysis.jsonl |" in text
    assert "/home/someone" not in all_text(out) and "/data/me" not in all_text(out)
    assert "/local/run" not in text


def test_failed_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    import audiollm.model_card

    def broken(facts):
        raise RuntimeError("disk full")

    monkeypatch.setattr(audiollm.model_card, "render_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(tiny("linear"), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "old.safetensors").write_text("")
    with pytest.raises(ExportError, match="not an empty folder"):
        export(tiny("linear"), tmp_path / "taken")


def test_cli_push_without_network_fails_fast_and_keeps_the_folder(tiny, tmp_path, monkeypatch):
    """The Hub endpoint is a closed local port (refused at once, whatever this machine's network): the command
    fails with one clear ExportError and the exported folder is complete."""
    import argparse

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "export"
    args = parser.parse_args(["export", "--model", str(tiny("mlp")), "--out", str(out), "--dtype", "fp16",
                              "--push-to-hub", "someone/tiny-audio", "--private", "--revision", "v1"])
    with pytest.raises(ExportError, match=r"upload to someone/tiny-audio failed .* local folder .* is complete"):
        run_export(args)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["model_type"] == "audiollm"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_llm_that_stock_qwen2_audio_cannot_run_is_refused(tokenizer):
    """Gemma-2 soft-caps its logits; stock Qwen2-Audio's head would not, so auto picks native and qwen2_audio is
    refused, naming the reason."""
    from audiollm.export import resolve_format
    from audiollm.model.config import AudioLLMConfig
    from audiollm.tiny import tiny_audio_config

    config = AudioLLMConfig(audio_config=tiny_audio_config(), text_config={"model_type": "gemma2",
                            "final_logit_softcapping": 30.0, "vocab_size": len(tokenizer)}, projector_type="linear")
    assert resolve_format(config, "auto") == "native"
    with pytest.raises(ExportError, match="gemma2.*final_logit_softcapping"):
        resolve_format(config, "qwen2_audio")
    config.text_config.final_logit_softcapping = None
    assert resolve_format(config, "auto") == "qwen2_audio"


@pytest.mark.parametrize("projector", ["linear", "stack"])
def test_card_usage_snippet_runs(tiny, tmp_path, monkeypatch, projector):
    """The card's Python block, run as written from the folder's parent (repo = the folder's name), on a 22.05 kHz
    file: stock transformers for qwen2_audio, audiollm for native."""
    out = export(tiny(projector), tmp_path / "export", dtype="fp32")
    code = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    assert 'repo = "export"' in code
    assert ("Qwen2AudioForConditionalGeneration" in code) == (projector == "linear")
    sf.write(tmp_path / "clip.wav", synthetic_clip(2.0), 22050)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(out / "README.md"), "exec"), namespace)
    prompt = namespace["inputs"] if projector == "linear" else namespace["batch"]
    assert namespace["ids"].shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(namespace["answer"], str)


def test_stage_entry_chains_into_the_card(tiny, tmp_path):
    """What a stage's final save would record (its real argument dataclasses and trainer state), chained over two
    stages, is what the exported card's training table shows."""
    from transformers import TrainerState, TrainingArguments

    from audiollm.distill import DistillArguments
    from audiollm.model_card import read_training_summary, stage_entry
    from audiollm.stage_args import DataArguments, ModelArguments

    args = TrainingArguments(output_dir=str(tmp_path / "unused"), use_cpu=True, per_device_train_batch_size=4,
                             gradient_accumulation_steps=8, learning_rate=2e-5, report_to="none")
    state = TrainerState(global_step=120, epoch=2.0, log_history=[{"loss": 1.5, "step": 60}, {"loss": 0.9}])
    first = stage_entry("pretrain", ModelArguments("init", train_projector=True, train_encoder=True, ctc_weight=0.3),
                        DataArguments(["/d/asr.jsonl"]), args, state, train_rows=1920)
    second = stage_entry("sft", ModelArguments("runs/pretrain", llm_lora_r=16),
                         DataArguments(["/d/chat.jsonl", "/d/asr.jsonl"], mix_weights=[0.8, 0.2]), args, state,
                         distill_args=DistillArguments(loss="kd", kd_temperature=2.0))
    assert first["global_batch"] == 32 and first["trainable"] == ["encoder", "projector"]
    assert first["final_loss"] == 0.9 and first["ctc"] == {"weight": 0.3, "layer": 0} and second["ctc"] is None
    assert second["lora"] == {"llm_r": 16, "encoder_r": 0, "alpha_ratio": 2.0} and first["distillation"] is None
    assert second["distillation"] == {"temperature": 2.0, "ce_weight": 0.0, "teacher": "the starting model's LLM",
                                      "rows": "spoken"}
    stage_one, source = tmp_path / "pretrain", tmp_path / "sft"
    stage_one.mkdir()
    shutil.copytree(tiny("linear"), source)
    write_training_summary(stage_one, None, first)
    write_training_summary(source, stage_one, second)
    assert [s["stage"] for s in read_training_summary([source])["stages"]] == ["pretrain", "sft"]
    text = (export(source, tmp_path / "export") / "README.md").read_text()
    assert ('| pretrain | asr.jsonl | 1920 | 120 | 2 | 32 | 2e-05 | encoder, projector; CTC on the encoder '
            '{"weight": 0.3, "layer": 0} | 0.9 |') in text
    assert ('| sft | chat.jsonl (0.8), asr.jsonl (0.2) | not recorded | 120 | 2 | 32 | 2e-05 | projector; LoRA '
            '{"llm_r": 16') in text
    assert 'distilled from the text LLM {"temperature": 2.0, "ce_weight": 0.0' in text
