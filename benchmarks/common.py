"""What every benchmark shares: interleaved timing, a CPU/CUDA peak-memory meter, the machine, the JSON output.

Variants are always compared in one process, interleaved round by round (A B C, B C A, ...), and the median over
rounds is reported: on a shared or throttling machine, load and clock drift then hit every variant alike, so the
ratios stay meaningful even when the absolute times move.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 2**20


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def pick_clock(device="cpu") -> tuple[str, object]:
    """("cpu", process_time) for a single-threaded CPU run, else ("wall", perf_counter).

    One torch thread on a shared machine: the process's CPU seconds are its compute, whatever else runs beside
    it, while wall time also counts the time other processes held the core. With more threads (or a GPU) CPU time
    stops meaning elapsed time, so wall time is used.
    """
    if torch.device(device).type == "cpu" and torch.get_num_threads() == 1:
        return "cpu", time.process_time
    return "wall", time.perf_counter


def interleaved_medians(steps: dict, repeats: int, warmup: int, device="cpu", clock=None) -> dict[str, float]:
    """Median seconds of each no-argument callable in ``steps`` over ``repeats`` rounds after ``warmup``.

    Round r runs the variants starting at variant r mod n, so none always goes first (warm caches) or last.
    ``clock``: a seconds counter, default ``time.perf_counter`` (wall); see ``pick_clock``.
    """
    clock = clock or time.perf_counter
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = clock()
            steps[name]()
            sync(device)
            if round_index >= warmup:
                times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory_bytes(fn, device="cpu") -> int:
    """Peak bytes of tensors allocated by ``fn()`` and alive at once, above what was alive before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU has no allocator counter, so the profiler's memory events
    (every allocation and free, with its size) are replayed in time order and the running sum's maximum is taken.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where the numbers come from: CPU, cores, torch threads, torch / transformers versions, GPU if any."""
    import transformers

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_result(name: str, report: dict, argv: list[str], path: Path | None = None) -> Path:
    """Write ``report`` (with the machine and the command that reproduces it) as JSON; returns the path."""
    path = path or RESULTS_DIR / f"{name}.json"
    command = " ".join(["python -m benchmarks." + name, *argv])
    report = {"benchmark": name, "command": command, "machine": machine(), **report}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    """A plain fixed-width table: floats to 3 significant digits."""
    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
