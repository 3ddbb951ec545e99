"""The tts stage on 2 DeepSpeed CPU ranks (gloo, ZeRO-2), as launch/train.sh runs it. Its recipes are parsed with
the other stages' in tests/test_distributed.py."""

from __future__ import annotations

import json
import math

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file

from tests.test_distributed import free_port, run

STEPS = 3


def noise_manifest(tmp_path, word_times: bool = False) -> None:
    """tmp_path/m.jsonl: 8 noise clips of 0.5-1.2 s with short texts (and where each word starts)."""
    rows = []
    for i in range(8):
        wav = 0.1 * np.random.default_rng(i).standard_normal(int((0.5 + 0.1 * i) * 16000)).astype(np.float32)
        sf.write(tmp_path / f"c{i}.wav", wav, 16000)
        text = ["one two", "red blue green", "cat"][i % 3]
        rows.append({"audio": f"c{i}.wav", "text": text})
        if word_times:
            rows[-1]["words"] = [{"word": w, "start": 0.15 * k} for k, w in enumerate(text.split())]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_tts_trains_on_two_deepspeed_ranks(tmp_path):
    from audiollm.tts.tiny import tiny_codec, tiny_lm

    codec, lm = tiny_codec("snac", tmp_path / "codec"), tiny_lm(tmp_path / "lm")
    noise_manifest(tmp_path, word_times=True)  # the demo recipe interleaves words: times for each
    out = tmp_path / "out"
    run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "stages/tts.py",
         "--config", "stages/configs/tts_demo.yaml", "--model_name_or_path", str(lm),
         "--codec_name_or_path", str(codec), "--layout", "snac7", "--train_files", str(tmp_path / "m.jsonl"),
         "--eval_files", str(tmp_path / "m.jsonl"), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
         "--max_steps", str(STEPS), "--per_device_train_batch_size", "2", "--logging_steps", "1",
         "--use_cpu", "true", "--deepspeed", "deepspeed_configs/zero2.json"], tmp_path / "logs" / "train.log")
    state = json.loads((out / "trainer_state.json").read_text())
    losses = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
    assert (out / "tts_config.json").is_file() and (out / "tokenizer.json").is_file()
    [meta] = (tmp_path / "cache" / "tokens").glob("*/meta.json")
    assert json.loads(meta.read_text())["encoded"] == 8  # rank 0 encoded each clip once; rank 1 read the cache
    before, after = load_file(lm / "model.safetensors"), load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[name], after[name])


def test_tts_csm_trains_on_two_deepspeed_ranks(tmp_path):
    """The csm architecture (backbone + depth decoder, amortized) under ZeRO-2 on 2 ranks: finite losses of both
    halves and a gradient each step, and the folder loads in stock transformers."""
    from transformers import CsmForConditionalGeneration

    from audiollm.tts.tiny import tiny_codec, tiny_lm

    codec, lm = tiny_codec("melcodec", tmp_path / "codec"), tiny_lm(tmp_path / "lm")
    noise_manifest(tmp_path)
    out = tmp_path / "out"
    run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "stages/tts.py",
         "--config", "stages/configs/tts_csm_demo.yaml", "--model_name_or_path", str(lm),
         "--codec_name_or_path", str(codec), "--codec_codebooks", "3", "--train_files", str(tmp_path / "m.jsonl"),
         "--eval_files", str(tmp_path / "m.jsonl"), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
         "--max_steps", str(STEPS),
         "--per_device_train_batch_size", "2", "--logging_steps", "1", "--use_cpu", "true",
         "--deepspeed", "deepspeed_configs/zero2.json"], tmp_path / "logs" / "train.log")
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, STEPS + 1))
    for h in logged:  # both halves of the model get a loss and a gradient on every step
        assert all(math.isfinite(h[k]) for k in ("loss", "backbone_loss", "depth_loss")) and h["grad_norm"] > 0
    model, info = CsmForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and model.config.num_codebooks == 3
    assert (out / "tts_config.json").is_file() and (out / "tokenizer.json").is_file()
