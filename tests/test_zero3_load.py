"""Loading the audio model under ZeRO-3 more than once (policy, then the DPO reference) keeps every layer usable.

The regression: with transformers 5.25 + kernels 0.19 + DeepSpeed 0.19, the second model built under
``zero.Init`` had Qwen2 attention layers without ``_kernel_funcs`` and died in forward (see
``AudioLLMForConditionalGeneration.from_pretrained``). It only shows in a process that has not yet imported the
LLM's modeling module, so the loads run in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.test_distributed import free_port

pytest.importorskip("deepspeed")

LOAD_TWICE = textwrap.dedent("""
    import os, sys
    import deepspeed, torch
    from transformers.integrations import HfDeepSpeedConfig
    from audiollm.model.modeling import AudioLLMForConditionalGeneration

    assert "transformers.models.qwen2.modeling_qwen2" not in sys.modules, "the LLM module must load under zero.Init"
    deepspeed.init_distributed(dist_backend="gloo")
    keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    ids = torch.tensor([[1, 2, 3]])
    for attempt in ("policy", "reference"):
        model = AudioLLMForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
        with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
            logits = model(input_ids=ids).logits
        print(attempt, tuple(logits.shape), flush=True)
""")


def test_second_load_under_zero3_runs_forward(tiny_model, tmp_path):
    tiny_model().save_pretrained(tmp_path / "model")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1"}
    run = subprocess.run([sys.executable, "-c", LOAD_TWICE, str(tmp_path / "model")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "reference (1, 3," in run.stdout
