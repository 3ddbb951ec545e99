"""Packed attention's forward + backward: pieces cut by ``split`` (audiollm/packing.py) vs a slice per piece.

    python -m benchmarks.packed_attention              # the demo's shapes, ~1 min on 2 CPU cores
    python -m benchmarks.packed_attention --quick      # smoke run

Why it matters: a slice's backward writes its gradient into a zero tensor as long as the whole packed sequence, so
cutting n pieces by slicing allocates and adds n full-size tensors per q, k and v; ``split``'s backward is one cat.
Two batches shaped like the demo's pretraining (``stages/configs/pretrain_demo.yaml``, one thread):
  encoder  30 clips of 1-3 s packed into one sequence (50 positions a second), bidirectional attention per clip
  llm      32 rows of 40-100 tokens packed into one sequence, causal attention per row
Reported: median seconds per forward + backward of the attention alone, the ratio, and whether the gradients agree.
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from audiollm.packing import packed_sdpa_attention
from benchmarks.common import interleaved_medians, print_table, write_result

HEADS, HEAD_DIM = 4, 32  # the demo's encoder and LLM: width 128
POSITIONS_PER_SECOND = 50  # Whisper's encoder after its stride-2 convolution


def sliced_attention(query, key, value, starts: list[int], causal: bool) -> torch.Tensor:
    """The reference: one slice per piece (what audiollm/packing.py did before), (1, H, S, D) -> (1, S, H, D)."""
    ends = starts[1:] + [query.shape[2]]
    pieces = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=causal)
              for s, e in zip(starts, ends)]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous()


def packed_batch(kind: str, pieces: int, seed: int = 0) -> tuple[list[int], int]:
    """Piece starts and the total length: clips of 1-3 s for the encoder, rows of 40-100 tokens for the LLM."""
    g = torch.Generator().manual_seed(seed)
    low, high = (POSITIONS_PER_SECOND, 3 * POSITIONS_PER_SECOND) if kind == "encoder" else (40, 100)
    lengths = torch.randint(low, high + 1, (pieces,), generator=g).tolist()
    starts = [sum(lengths[:i]) for i in range(pieces)]
    return starts, sum(lengths)


def measure(kind: str, pieces: int, repeats: int) -> dict:
    starts, length = packed_batch(kind, pieces)
    causal = kind == "llm"
    qkv = [torch.randn(1, HEADS, length, HEAD_DIM, requires_grad=True) for _ in range(3)]
    module = types.SimpleNamespace(is_causal=causal)
    if causal:  # positions restart at 0 per row
        positions = torch.cat([torch.arange(e - s) for s, e in zip(starts, starts[1:] + [length])])[None]
        kwargs = {"position_ids": positions}
    else:
        kwargs = {"cu_seq_lens_q": torch.tensor(starts + [length])}
    weight = torch.randn(1, length, HEADS, HEAD_DIM)

    def run(split: bool) -> list[torch.Tensor]:
        out = (packed_sdpa_attention(module, *qkv, None, **kwargs)[0] if split
               else sliced_attention(*qkv, starts, causal))
        return torch.autograd.grad((out * weight).sum(), qkv)

    agree = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(run(True), run(False)))
    times = interleaved_medians({"split": lambda: run(True), "sliced": lambda: run(False)}, repeats, warmup=2)
    return {"kind": kind, "pieces": pieces, "positions": length, "split_s": times["split"],
            "sliced_s": times["sliced"], "speedup": times["sliced"] / times["split"], "gradients_agree": agree}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.packed_attention", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 pieces, 2 repeats: a smoke run")
    parser.add_argument("--json", type=Path, help="output file (default benchmarks/results/packed_attention.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the demo's stages run beside the voice
    pieces, repeats = (4, 2) if args.quick else (None, 15)
    rows = [measure("encoder", pieces or 30, repeats), measure("llm", pieces or 32, repeats)]
    print_table("packed attention, forward + backward (s)", list(rows[0]), [list(r.values()) for r in rows])
    write_result("packed_attention", {"repeats": repeats, "heads": HEADS, "head_dim": HEAD_DIM, "results": rows},
                 argv or [], args.json)


if __name__ == "__main__":
    main()
