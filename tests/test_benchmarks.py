"""Each benchmark runs on its tiny shape, writes valid JSON with every variant, and the report renders it.

Speed and memory are measured by the benchmarks, never asserted here: only structure and the exact facts
(same loss across variants, fewer positions when packed, counted ratios).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from benchmarks import (
    batching, dpo, encoder, eval_order, features, gpu_mfu, packed_attention, real_size_smoke, report, train_step,
)
from benchmarks.common import interleaved_medians, peak_memory_bytes


def load(path) -> dict:
    data = json.loads(path.read_text())
    assert {"benchmark", "command", "machine"} <= data.keys()
    assert {"cpu", "cores", "torch"} <= data["machine"].keys()
    return data


def test_interleaved_medians_runs_every_variant_every_round():
    calls = []
    medians = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"] and medians.keys() == {"a", "b"}


def test_cpu_peak_memory_sees_a_temporary_tensor():
    def make():
        x = torch.ones(1_000_000)  # 4 MB, freed before the function returns
        return float(x.sum())

    assert 4_000_000 <= peak_memory_bytes(make) < 8_000_000


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every benchmark's smoke run, once, into one results folder (as benchmarks/results/ holds them)."""
    folder = tmp_path_factory.mktemp("results")
    train_step.main(["--quick", "--json", str(folder / "train_step.json")])
    features.main(["--quick", "--json", str(folder / "features.json")])
    dpo.main(["--quick", "--json", str(folder / "dpo.json")])
    batching.main(["--quick", "--json", str(folder / "batching.json")])
    eval_order.main(["--quick", "--json", str(folder / "eval_order.json")])
    packed_attention.main(["--quick", "--json", str(folder / "packed_attention.json")])
    gpu_mfu.main(["--tiny", "--json", str(folder / "gpu_mfu_tiny.json")])
    real_size_smoke.main(["--out", str(folder / "smoke_run"), "--tiny", "--steps", "2", "--batch", "2", "--json",
                          str(folder / "real_size_smoke_tiny.json")])
    encoder.main(["--configs", "tiny", "--repeats", "1", "--warmup", "0", "--clips", "short", "--batches", "1",
                  "--json", str(folder / "encoder_short.json")])
    # flat vs csm trains the demo voice for minutes and needs its listener: the committed result is rendered
    shutil.copy(report.RESULTS_DIR / "tts_csm.json", folder / "tts_csm.json")
    return folder


def test_train_step_quick(results):
    data = load(results / "train_step.json")
    rows = data["sizes"]["tiny"]["results"]
    assert list(rows) == list(train_step.VARIANTS)
    losses = [r["loss"] for r in rows.values()]
    assert max(losses) - min(losses) < 1e-5  # the same tokens, the same logits: padding, packing, lean loss
    assert rows["packed"]["positions_per_real"] == 1.0 < rows["unpadded"]["positions_per_real"]
    assert rows["stock"]["frames_per_real"] > rows["unpadded"]["frames_per_real"]
    assert all(r["tokens_per_s"] > 0 and r["peak_mb"] > 0 for r in rows.values())


def test_features_quick(results):
    data = load(results / "features.json")["results"]
    assert data.keys() == {"ours", "transformers", "openai"}
    assert all(r["clips_per_s"] > 0 for r in data.values())


def test_dpo_quick(results):
    data = load(results / "dpo.json")["sizes"]["tiny"]["results"]
    assert data["live"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert data["precompute"]["loss"] == pytest.approx(data["live"]["loss"], abs=1e-6)
    assert data["packed"]["loss"] == pytest.approx(data["live"]["loss"], abs=1e-6)
    assert data["packed"]["weights_mb"] == data["live"]["weights_mb"] and data["live"]["positions_per_real"] > 1
    assert data["live"]["weights_mb"] == pytest.approx(2 * data["precompute"]["weights_mb"])


def test_batching_quick(results):
    data = load(results / "batching.json")
    rows = data["results"]
    assert list(rows) == list(batching.VARIANTS)
    assert rows["token-budget"]["loss"] == pytest.approx(rows["fixed+grouped"]["loss"], abs=1e-5)  # same rows
    assert sum(r["steps"] * r["rows_per_step"] for r in rows.values()) == 2 * data["rows"]
    assert rows["fixed+grouped"]["rows_per_step"] == data["batch_size"]


def test_eval_order_quick(results):
    data = load(results / "eval_order.json")
    assert data["same_answers"] is True  # greedy answers do not depend on the batch order
    rows = data["results"]
    assert rows["by-length"]["positions_per_real"] <= rows["file-order"]["positions_per_real"]
    assert all(r["items_per_s"] > 0 for r in rows.values())


def test_packed_attention_quick(results):
    rows = load(results / "packed_attention.json")["results"]
    assert [r["kind"] for r in rows] == ["encoder", "llm"]
    assert all(r["gradients_agree"] is True and r["pieces"] == 4 and r["split_s"] > 0 for r in rows)


def test_gpu_mfu_tiny(results, tmp_path):
    result = load(results / "gpu_mfu_tiny.json")["results"]
    assert result["shape"] == "tiny" and result["tokens_per_s"] > 0 and result["model_tflops_per_step"] > 0
    assert result["kernels"]["llm_attention"] in ("sdpa_packed", "flash_attention_2")
    budget = load(results / "gpu_mfu_tiny.json")["token_budget"]
    assert budget["rows"] == 8 and budget["batches"] * budget["rows_per_batch"] == 8 and budget["tokens_per_s"] > 0
    if not torch.cuda.is_available():
        assert result["mfu"] is None  # no peak for a CPU
        with pytest.raises(SystemExit):
            gpu_mfu.main(["--json", str(tmp_path / "full.json")])  # the full shape needs a GPU


def test_encoder_distribution_reports_the_no_padding_bound(results):
    dist = load(results / "encoder_short.json")["clips"]["results"]["tiny"]
    assert dist["flop_ratio_padded-30s/no-padding"] >= dist["flop_ratio_padded-30s/padded-longest"] > 1
    # the packed encoder computes (about) only the real frames: the bound, up to one edge frame per clip
    assert dist["packed"]["frames_computed_per_real"] < dist["padded-longest"]["frames_computed_per_real"]
    assert dist["flop_ratio_padded-30s/packed"] == pytest.approx(dist["flop_ratio_padded-30s/no-padding"], rel=0.05)


def test_peak_table_matches_specific_names_first():
    assert gpu_mfu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_mfu.peak_tflops("NVIDIA H200") == 989.0 and gpu_mfu.peak_tflops("Some GPU") is None


def test_tiny_smoke_trains_the_shipped_sft_recipe(results):
    """The real-size smoke run's path on tiny shapes: HF folders written, joined by ``audiollm init``, trained by
    stages/sft.py with the shipped recipe; one finite loss per step."""
    report = load(results / "real_size_smoke_tiny.json")["results"]
    assert report["losses_finite"] and len(report["losses"]) == 2 and report["shape"] == "tiny"
    assert (results / "smoke_run" / "model" / "config.json").is_file()  # the audiollm init folder it trained


def test_report_renders_every_results_file(results, tmp_path):
    text = report.main(["--results", str(results), "--out", str(tmp_path / "BENCHMARKS.md")])
    assert (tmp_path / "BENCHMARKS.md").read_text() == text
    for title, *_ in report.SECTIONS:
        assert f"## {title}" in text
    assert "Not run on this machine" not in text  # every section found its file
    assert "| grouped+packed+lean |" in text and "| ours |" in text and "| precompute |" in text
    assert "(no padding at all)" in text and "needs a GPU" in text  # no gpu_mfu.json: said, not hidden
    assert "python -m benchmarks.train_step --quick" in text and "cores" in text
    assert "(chosen on validation)" in text and "| flat |" in text  # the flat vs csm comparison
