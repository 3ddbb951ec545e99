"""Training throughput and MFU on one GPU: Whisper-large-v3 encoder + a Qwen2.5-1.5B-shaped LLM, bf16, random init.

    python -m benchmarks.gpu_mfu                 # one GPU, ~3-5 min including model build; refuses to run on CPU
    python -m benchmarks.gpu_mfu --tiny          # the same code path on tiny shapes, CPU or GPU, seconds

One SFT step = the frozen encoder's forward (packed: only the clips' real frames, ``packed_encoder: true``), then
forward + backward + AdamW of the projector and the LLM, on a batch of ``--batch`` rows with LibriSpeech-like clips
(mean 12 s) and short answers, collated by ``ChatCollator``, packed into one sequence (``packing: true``) and
scored with the lean cross-entropy (``lean_loss_chunk_tokens``),
as the recipe runs it; then an epoch of ``--epoch-rows`` such rows in ``batch_tokens`` batches (audiollm/batching.py,
budget ``--batch-tokens``, by default the fixed batch's padded cost), each packed: what a recipe with a token
budget runs. Reported for both: tokens/s (LLM tokens, audio included), model FLOPs per step (counted analytically
below, the standard MFU convention: matmuls and attention, no recomputation), MFU against the GPU's dense bf16 peak,
peak memory, and the kernels in use (attention implementation, sdpa backends, the loss path).

FLOPs per step (2 per multiply-add): encoder forward, per clip of T' real positions (T = 2*T' + 1 mel frames read):
2*T*d*mels*3 + 2*T'*d*d*3 + layers * (2*T'*(4*d^2 + 2*d*ffn) + 4*T'^2*d); projector 2*tokens*1280*hidden (x3:
trained); LLM x3 (forward + backward): per token 2 * (matmul parameters of the decoder layers), attention 4*L^2*d/2
per packed row per layer (causal), the head 2*hidden*vocab per labelled token (the lean loss scores only those).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from audiollm.audio import SAMPLE_RATE
from audiollm.batching import TokenBudgetBatchSampler
from audiollm.chat import AUDIO_TOKEN
from audiollm.collator import ChatCollator
from audiollm.data import estimated_tokens
from audiollm.model.attention import pick_attn_implementation
from audiollm.model.config import AudioLLMConfig
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.model.trainable import set_trainable
from audiollm.packing import PACKED_SDPA, pack_batch
from audiollm.tiny import CORPUS_WORDS, tiny_audio_config, tiny_text_config, tiny_tokenizer
from benchmarks.common import MB, machine, peak_memory_bytes, print_table, write_result
from benchmarks.encoder import WHISPER_LARGE_V3, clip_durations

QWEN25_1P5B = dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True,
                   max_position_embeddings=32768)
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched on the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 756.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0}
LEAN_CHUNK_TOKENS = 1024


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # ordered: specific names before their prefixes
        if key in device_name:
            return value
    return None


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    tokenizer = tiny_tokenizer()
    audio = tiny_audio_config() if tiny else dict(WHISPER_LARGE_V3, encoder_layers=32)
    text = tiny_text_config(len(tokenizer)) if tiny else dict(QWEN25_1P5B, model_type="qwen2")
    config = AudioLLMConfig(audio_config=audio, text_config=text,
                            audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
    attn = pick_attn_implementation() if device.type == "cuda" else "sdpa"
    attn = PACKED_SDPA if attn == "sdpa" else attn  # packed batches: attention per row, not one dense mask
    torch.manual_seed(0)
    with torch.device(device):
        model = AudioLLMForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=dtype)
    set_trainable(model, encoder=False, projector=True, llm=True)
    model.loss_chunk_tokens = LEAN_CHUNK_TOKENS
    model.audio_tower.packed = True
    return model.train(), tokenizer


def make_rows(rows: int, seed: int = 0) -> list[dict]:
    """Chat rows with LibriSpeech-like noise clips (mean 12 s) and 30-word answers."""
    rng = np.random.default_rng(seed)
    return [{"audios": [(0.1 * rng.standard_normal(int(s * SAMPLE_RATE))).astype(np.float32)],
             "messages": [{"role": "user", "content": "<audio>What does the speaker say?"},
                          {"role": "assistant", "content": " ".join(rng.choice(CORPUS_WORDS, size=30))}]}
            for s in clip_durations("librispeech", rows, seed)]


def make_batch(tokenizer, rows: int, seed: int = 0) -> dict:
    return pack_batch(ChatCollator(tokenizer)(make_rows(rows, seed)), tokenizer.pad_token_id)


def row_tokens(row: dict) -> int:
    """A row's length as ``audiollm.data.add_lengths`` estimates it (text / 4 + 25 audio tokens a second)."""
    return estimated_tokens([m["content"] for m in row["messages"]], len(row["audios"][0]) / SAMPLE_RATE, 1)


def budget_batches(tokenizer, examples: list[dict], budget: int) -> tuple[list[dict], TokenBudgetBatchSampler]:
    """An epoch of ``examples`` as ``batch_tokens: budget`` batches them (estimated lengths, as add_lengths), each
    collated and packed as the recipe runs it."""
    sampler = TokenBudgetBatchSampler([row_tokens(row) for row in examples], budget)
    collator = ChatCollator(tokenizer)
    batches = [pack_batch(collator([examples[i] for i in index]), tokenizer.pad_token_id) for index in sampler]
    return batches, sampler


def step_flops(model, batch: dict) -> float:
    """Model FLOPs of one step (module docstring), from the batch's shapes and the model's config."""
    audio, text = model.config.audio_config, model.config.text_config
    d, ffn, mels = audio.d_model, audio.encoder_ffn_dim, audio.num_mel_bins
    positions = ((batch["feature_attention_mask"].sum(-1) - 1) // 2 + 1).tolist()  # T' per clip (packed encoder)
    encoder = sum(2 * (2 * t + 1) * d * mels * 3 + 2 * t * d * d * 3 + audio.encoder_layers
                  * (2 * t * (4 * d * d + 2 * d * ffn) + 4 * t**2 * d) for t in positions)
    tokens = batch["input_ids"].numel()
    audio_tokens = int((batch["input_ids"] == model.config.audio_token_id).sum())
    projector = 3 * 2 * audio_tokens * d * text.hidden_size
    layer_params = sum(p.numel() for n, p in model.language_model.named_parameters()
                       if ".layers." in n and p.dim() == 2)
    starts = (batch["position_ids"].flatten() == 0).nonzero().flatten().tolist() + [tokens]
    attention = sum(4 * (b - a) ** 2 * text.num_attention_heads * text.head_dim / 2 for a, b in zip(starts, starts[1:]))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    llm = 3 * (2 * tokens * layer_params + text.num_hidden_layers * attention + 2 * labelled * text.hidden_size
               * text.vocab_size)
    return float(encoder + projector + llm)


def kernels(model, device: torch.device) -> dict:
    info = {"llm_attention": model.language_model.config._attn_implementation,
            "encoder_attention": model.audio_tower.config._attn_implementation,
            "loss": f"audiollm.loss chunked cross-entropy, {LEAN_CHUNK_TOKENS} labelled tokens per chunk"}
    if device.type == "cuda":
        info.update(sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
                    sdpa_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                    sdpa_cudnn=torch.backends.cuda.cudnn_sdp_enabled())
    return info


def timed(step, device: torch.device) -> float:
    """Seconds of one ``step()``, the GPU synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def budget_result(args, model, tokenizer, step, device: torch.device, peak: float | None) -> dict:
    """The same model stepping through an epoch of ``--epoch-rows`` rows in ``batch_tokens`` batches (what a
    recipe with ``batch_tokens`` runs): tokens/s and MFU over the epoch, the largest batch's peak memory."""
    examples = make_rows(args.epoch_rows, seed=1)
    budget = args.batch_tokens or args.batch * max(map(row_tokens, make_rows(args.batch)))  # the fixed batch's
    batches, sampler = budget_batches(tokenizer, examples, budget)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    step(batches[0])  # warm-up on a batch of this epoch
    # Two passes: the first pays each new shape's kernel selection (cuDNN attention plans, GEMM heuristics), the
    # second runs with every shape seen. On an H200 the first pass ran 9x slower (1.76k against 15.9k tokens/s).
    first = sum(timed(lambda b=b: step(b), device) for b in batches)
    seconds = sum(timed(lambda b=b: step(b), device) for b in batches)
    flops = sum(step_flops(model, b) for b in batches)
    tokens = sum(b["input_ids"].numel() for b in batches)
    plan = sampler.describe()
    largest = sorted(batches, key=lambda b: -b["input_ids"].numel())[:3]  # peak memory: the 3 longest batches
    result = {"batch_tokens": budget, "rows": len(examples), "batches": len(batches),
              "rows_per_batch": len(examples) / len(batches), "tokens_per_s": tokens / seconds,
              "tokens_per_s_first_pass": tokens / first,
              "achieved_tflops": flops / seconds / 1e12, "mfu": flops / seconds / 1e12 / peak if peak else None,
              "padding_fraction_unpacked": plan["padding_fraction"],
              "peak_memory_mb": max(peak_memory_bytes(lambda b=b: step(b), device) for b in largest) / MB}
    print_table(f"the same, an epoch of {len(examples)} rows in batch_tokens: {budget} batches ({len(batches)} "
                "batches, packed)", ["tokens/s", "rows/batch", "TFLOP/s", "MFU", "peak MB"],
                [[result["tokens_per_s"], result["rows_per_batch"], result["achieved_tflops"],
                  result["mfu"] if result["mfu"] is not None else "n/a", result["peak_memory_mb"]]])
    return result


def main(argv: list[str] | None = None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_mfu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (runs on CPU too)")
    parser.add_argument("--batch", type=int, default=16, help="rows per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=0, help="token budget of the batch_tokens run "
                        "(default: --batch rows x the longest of them, the fixed batch's padded cost)")
    parser.add_argument("--epoch-rows", type=int, default=64, help="rows of the batch_tokens run's epoch")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--json", help="output file (default benchmarks/results/gpu_mfu.json)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no GPU: the full-size run needs one; --tiny runs the same path on tiny shapes on CPU")
    if args.tiny:
        args.batch, args.steps, args.warmup = min(args.batch, 4), min(args.steps, 2), min(args.warmup, 1)
        args.epoch_rows = min(args.epoch_rows, 8)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = build(args.tiny, device, dtype)
    batch = {k: v.to(device) for k, v in make_batch(tokenizer, args.batch).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step(inputs=batch):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    step_s = float(np.median([timed(step, device) for _ in range(args.steps)]))
    flops = step_flops(model, batch)
    name = machine().get("gpu", "cpu")
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    result = {"device": name, "dtype": str(dtype).removeprefix("torch."), "shape": "tiny" if args.tiny else
              "whisper-large-v3 encoder + Qwen2.5-1.5B-shaped LLM", "rows": args.batch,
              "tokens": batch["input_ids"].numel(), "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "step_s": step_s, "tokens_per_s": batch["input_ids"].numel() / step_s,
              "model_tflops_per_step": flops / 1e12, "achieved_tflops": flops / step_s / 1e12,
              "peak_tflops": peak, "mfu": flops / step_s / 1e12 / peak if peak else None,
              "peak_memory_mb": peak_memory_bytes(step, device) / MB, "kernels": kernels(model, device)}
    print_table(f"{result['shape']} on {name}, {result['dtype']}, {args.batch} rows packed into {result['tokens']} "
                f"tokens, median of {args.steps} steps",
                ["tokens/s", "step s", "TFLOP/step", "TFLOP/s", "MFU", "peak MB"],
                [[result["tokens_per_s"], step_s, result["model_tflops_per_step"], result["achieved_tflops"],
                  result["mfu"] if result["mfu"] is not None else "n/a", result["peak_memory_mb"]]])
    print("kernels:", result["kernels"])
    budget = budget_result(args, model, tokenizer, step, device, peak)
    report = {"results": result, "token_budget": budget}
    default = Path(__file__).resolve().parent / "results" / ("gpu_mfu_tiny.json" if args.tiny else "gpu_mfu.json")
    write_result("gpu_mfu", report, argv, Path(args.json) if args.json else default)
    return report


if __name__ == "__main__":
    main()
