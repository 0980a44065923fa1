"""Benchmark attention backends on CPU: forward time, backward time and peak memory.

Backends: ``naive`` (minformer's eq. 1 with the weights materialised), ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention``) and ``flash`` (``minformer.flash``).
Every cell is causal self-attention in float32 with batch 1, 8 heads and head size 64, and runs in
a fresh subprocess so that one cell's freed memory and allocator state cannot hide another's peak.

    python benchmarks/attention.py --out attention.md          # 1k, 4k, 8k, 16k and 64k
    python benchmarks/attention.py --quick                     # 256 and 512, for the test suite
    python benchmarks/attention.py --seq-lens 8192 --backends naive flash --threads 2

A cell whose predicted memory exceeds half of the machine's RAM prints ``skipped: needs X GB``.
The times are one run each after a warm-up on a short sequence, so they include the first touch of
the cell's memory and are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

BACKENDS = ("naive", "sdpa", "flash")
FULL_SEQ_LENS = (1024, 4096, 8192, 16384, 65536)
QUICK_SEQ_LENS = (256, 512)
BATCH, HEADS, HEAD_DIM = 1, 8, 64
FLOAT32_BYTES = 4

# Block sizes for the flash backend: each block step costs a few Python-level tensor ops, so on CPU
# 512 x 512 blocks keep the interpreter overhead small while one block of scores stays small.
FLASH_BLOCK = 512

# The naive backend's peak contains about this many (batch, heads, seq, seq) float32 tensors (scores,
# masked scores, weights, masked weights and their gradients). An estimate: this script measured
# 4.3 copies at 1k, 3.5 at 2k and 3.1 at 8k on a 2-CPU x86_64 machine with PyTorch 2.13.
NAIVE_SCORE_COPIES = 4
# Linear backends keep the inputs, output, gradients and float32 copies: about this many
# (batch, heads, seq, head_dim) tensors, an estimate with a wide margin.
LINEAR_TENSOR_COPIES = 16


def format_seq(seq_len: int) -> str:
    """Write 1024 as ``1k`` and 512 as ``512``."""
    return f"{seq_len // 1024}k" if seq_len % 1024 == 0 else str(seq_len)


def predicted_bytes(backend: str, seq_len: int) -> int:
    """Estimate a cell's peak memory in bytes; used only to skip cells that would not fit."""
    linear = LINEAR_TENSOR_COPIES * BATCH * HEADS * seq_len * HEAD_DIM * FLOAT32_BYTES
    if backend == "naive":
        return linear + NAIVE_SCORE_COPIES * BATCH * HEADS * seq_len * seq_len * FLOAT32_BYTES
    if backend == "flash":
        return linear + 8 * BATCH * HEADS * FLASH_BLOCK * FLASH_BLOCK * FLOAT32_BYTES
    return linear


def machine_memory_bytes() -> int:
    """Return MemTotal from /proc/meminfo in bytes."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemTotal not found in /proc/meminfo")


def read_status_kb(field: str) -> int:
    """Read a field such as ``VmRSS`` or ``VmHWM`` of /proc/self/status, in kB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux: write 5 to /proc/self/clear_refs, see proc(5))."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def attention_function(backend: str):
    """Return ``attend(queries, keys, values) -> output`` for causal attention with ``backend``."""
    import torch.nn.functional as F

    from minformer.attention import scaled_dot_product_attention
    from minformer.flash import flash_attention

    if backend == "naive":
        return lambda q, k, v: scaled_dot_product_attention(q, k, v, causal=True, backend="naive")[0]
    if backend == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return lambda q, k, v: flash_attention(q, k, v, causal=True, block_q=FLASH_BLOCK, block_k=FLASH_BLOCK)


def run_cell(backend: str, seq_len: int, threads: int | None) -> dict:
    """Time one forward and backward pass and measure the rise of the resident set during them."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    attend = attention_function(backend)
    generator = torch.Generator().manual_seed(0)

    def make_inputs(length):
        shape = (BATCH, HEADS, length, HEAD_DIM)
        return [torch.randn(shape, generator=generator, requires_grad=True) for _ in range(3)]

    # Warm up on a short sequence so one-time initialisation is not timed or counted.
    warm_queries, warm_keys, warm_values = make_inputs(128)
    attend(warm_queries, warm_keys, warm_values).sum().backward()

    queries, keys, values = make_inputs(seq_len)
    grad_output = torch.randn(BATCH, HEADS, seq_len, HEAD_DIM, generator=generator)

    # Peak memory is the rise of the resident set's high-water mark (VmHWM) over the resident set
    # just before the work, with the mark reset to that point. PyTorch has no allocator statistics
    # for CPU tensors, and the resident set counts every page the work touches, including ones it
    # frees before the end. ru_maxrss cannot be reset, so an earlier peak could hide the work's.
    peak_reset = reset_peak_rss()
    baseline_kb = read_status_kb("VmRSS")

    start = time.perf_counter()
    output = attend(queries, keys, values)
    forward_end = time.perf_counter()
    output.backward(grad_output)
    backward_end = time.perf_counter()

    peak_kb = read_status_kb("VmHWM")
    return {
        "backend": backend,
        "seq_len": seq_len,
        "forward_ms": (forward_end - start) * 1e3,
        "backward_ms": (backward_end - forward_end) * 1e3,
        "peak_mb": max(peak_kb - baseline_kb, 0) / 1024,
        "peak_reset": peak_reset,
        "threads": torch.get_num_threads(),
    }


def run_cell_subprocess(backend: str, seq_len: int, threads: int | None) -> dict:
    """Run one cell in a fresh interpreter and return its result, or a ``status`` for a failure."""
    command = [sys.executable, __file__, "--cell", backend, str(seq_len)]
    if threads is not None:
        command += ["--threads", str(threads)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or [f"exit code {completed.returncode}"])[-1]
        return {"backend": backend, "seq_len": seq_len, "status": f"failed: {last_line}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure(backends, seq_lens, memory_limit: int, threads: int | None) -> list[dict]:
    """Run or skip every (backend, seq_len) cell, in order of sequence length."""
    results = []
    for seq_len in seq_lens:
        for backend in backends:
            needed = predicted_bytes(backend, seq_len)
            if needed > memory_limit:
                result = {"backend": backend, "seq_len": seq_len, "status": f"skipped: needs {needed / 1e9:.1f} GB"}
            else:
                result = run_cell_subprocess(backend, seq_len, threads)
            print(f"{backend} {format_seq(seq_len)}: {result.get('status', 'done')}", file=sys.stderr)
            results.append(result)
    return results


def format_report(results: list[dict], ratio_seq: int) -> str:
    """Write the markdown report: one table row per cell, the flash/naive memory ratio, the longest sequences."""
    threads = sorted({str(r["threads"]) for r in results if "threads" in r}) or ["-"]
    lines = [
        f"Causal attention, float32, batch {BATCH}, {HEADS} heads, head size {HEAD_DIM}, flash blocks "
        f"{FLASH_BLOCK} x {FLASH_BLOCK}; {os.cpu_count()} CPUs ({platform.machine()}), "
        f"{'/'.join(threads)} PyTorch threads, one run per cell.",
        "",
        "| backend | seq | forward ms | backward ms | peak MB |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for result in results:
        name, seq = result["backend"], format_seq(result["seq_len"])
        if "status" in result:
            lines.append(f"| {name} | {seq} | {result['status']} | | |")
        else:
            lines.append(
                f"| {name} | {seq} | {result['forward_ms']:.1f} | {result['backward_ms']:.1f} | {result['peak_mb']:.1f} |"
            )

    measured = {(r["backend"], r["seq_len"]): r for r in results if "status" not in r}
    lines.append("")
    flash, naive = measured.get(("flash", ratio_seq)), measured.get(("naive", ratio_seq))
    if flash and naive and naive["peak_mb"] > 0:
        ratio = flash["peak_mb"] / naive["peak_mb"]
        lines.append(f"flash / naive peak memory at {format_seq(ratio_seq)}: {ratio:.4f} (1/{1 / max(ratio, 1e-9):.0f})")
    else:
        lines.append(f"flash / naive peak memory at {format_seq(ratio_seq)}: not measured")

    longest = []
    for backend in sorted({r["backend"] for r in results}, key=BACKENDS.index):
        handled = [seq for (name, seq) in measured if name == backend]
        longest.append(f"{backend} {format_seq(max(handled)) if handled else 'none'}")
    lines.append("longest sequence handled: " + ", ".join(longest))
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"run only sequence lengths {QUICK_SEQ_LENS}")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths to run (default: 1k 4k 8k 16k 64k)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="backends to run")
    parser.add_argument("--threads", type=int, help="PyTorch CPU threads per cell (default: PyTorch's default)")
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--cell", nargs=2, metavar=("BACKEND", "SEQ_LEN"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cell:
        backend, seq_len = args.cell[0], int(args.cell[1])
        print(json.dumps(run_cell(backend, seq_len, args.threads)))
        return

    seq_lens = args.seq_lens or (QUICK_SEQ_LENS if args.quick else FULL_SEQ_LENS)
    ratio_seq = 8192 if 8192 in seq_lens else max(seq_lens)
    results = measure(args.backends, seq_lens, machine_memory_bytes() // 2, args.threads)
    report = format_report(results, ratio_seq)
    print(report, end="")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out_file:
            out_file.write(report)


if __name__ == "__main__":
    main()
