"""Compare minformer with Hugging Face ``transformers`` side by side, in one process and one table.

Workloads (fp32 unless named; torch threads = cores by default):

1. GPT training tokens/s: 6 layers, 6 heads, width 384, context 256, batch 8, AdamW step included.
2. GPT-2 greedy generation new tokens/s: 124M parameters (random weights), batch 1, 32-token
   prompt, 128 new tokens, KV cache on both sides.
3. BERT-base inference tokens/s: batch 8 x 128 tokens with a padding mask.
4. T5-small training tokens/s: batch 8, source 128, target 32 (tokens = source + target).
5. Growth: training tokens/s against width, and decoding time per token against context length
   with and without the cache, as tables and PNG plots.

bf16 rows (autocast for training, bf16 weights for inference) and torch.compile rows come with
workloads 1 and 2. A mixture-of-experts row times ``benchmarks/moe.py``'s layer against the dense
feed-forward of the same active size. Each row reports its achieved FLOP/s (bytes/s for decoding)
against the limit measured at start.

    python benchmarks/compare.py --out docs/benchmarks/compare.md
    python benchmarks/compare.py --quick          # tiny shapes, for the test suite
    python benchmarks/compare.py --only gpt-train,generation --no-compile
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))
sys.path.insert(0, str(BENCHMARKS))

import torch  # noqa: E402  (after the path inserts)

import compare_growth as growth  # noqa: E402
import compare_workloads as workloads  # noqa: E402
from compare_measure import GEMM_FP32, Row, format_bounds, format_table, measure_machine  # noqa: E402

WORKLOADS = ("gpt-train", "generation", "bert", "t5-train", "moe", "growth")

ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30), "MALLOC_TOP_PAD_": str(1 << 30)}
"""glibc malloc settings under which freed memory stays in the process: no mmap'd blocks and no trimming.

With glibc's defaults, a large tensor (an embedding gradient, a logits tensor) is often a fresh
mmap whose pages fault in again at each step. In trials, that made single T5 training steps
take 0.8 to 2.4 s on either side. With these settings the steps took 0.81 to 0.84 s. Both sides
run in the same process, so the setting applies to both alike.
"""


def rerun_with_steady_allocator() -> None:
    """Re-execute this script with ``ALLOCATOR_ENV`` in its environment unless it is there already (Linux only)."""
    if not sys.platform.startswith("linux") or all(os.environ.get(key) == value for key, value in ALLOCATOR_ENV.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})


def allocator_description() -> str:
    """Describe the allocator settings in force, for the report."""
    settings = [f"{key}={os.environ[key]}" for key in ALLOCATOR_ENV if key in os.environ]
    return "allocator: glibc with " + " ".join(settings) if settings else "allocator: default settings"


def moe_rows(settings: workloads.Settings) -> list[Row]:
    """Return the mixture-of-experts layer (8 experts, top-2) against the dense layer of the same active size."""
    from moe import FeedForward, MoEFeedForward, time_forward_backward

    d_model, d_ff, tokens = (32, 64, 256) if settings.quick else (512, 1024, 4096)
    torch.manual_seed(0)
    moe = MoEFeedForward(d_model, d_ff, "gelu", n_experts=8, top_k=2)
    dense = FeedForward(d_model, 2 * d_ff, "gelu")
    hidden = torch.randn(tokens, d_model)
    dense_seconds = time_forward_backward(dense, hidden, settings.repeats)
    moe_seconds = time_forward_backward(moe, hidden, settings.repeats)
    # Forward and backward cost 3 forward passes of 2 FLOPs per active weight (router left out).
    active_weights = 2 * d_model * 2 * d_ff
    row = Row(
        "MoE layer (8 experts, top-2), forward + backward", "tokens/s", peer_name="minformer dense FFN, same active size",
        work_per_unit=6.0 * active_weights, roofline=GEMM_FP32, check="no peer in transformers; ratio to dense",
    )
    row.ours = tokens / moe_seconds
    row.peer = tokens / dense_seconds
    return [row]


def run_workloads(names: list[str], settings: workloads.Settings) -> tuple[list[Row], dict, dict[str, tuple[float, float]]]:
    """Run the named workloads; return the table rows, the growth records and each one's (wall, CPU) seconds."""
    rows: list[Row] = []
    growth_records: dict = {}
    seconds: dict[str, tuple[float, float]] = {}
    for name in names:
        start, cpu_start = time.perf_counter(), time.process_time()
        if name == "gpt-train":
            rows += workloads.training_rows(workloads.gpt_training_pair(settings), settings, workloads.TARGETS["gpt_train"])
        elif name == "generation":
            rows += workloads.generation_rows(settings)
        elif name == "bert":
            rows += workloads.bert_rows(settings)
        elif name == "t5-train":
            pair = workloads.t5_training_pair(settings)
            # The bf16 and compile targets are set for the GPT workloads only.
            t5_rows = workloads.training_rows(pair, settings, workloads.TARGETS["t5_train"], variants=False)
            workloads.add_matrix_product_bound(t5_rows[0], pair, settings)
            rows += t5_rows
        elif name == "moe":
            rows += moe_rows(settings)
        elif name == "growth":
            growth_records["width"] = growth.width_growth(settings)
            growth_records["context"] = growth.context_growth(settings)
        seconds[name] = (time.perf_counter() - start, time.process_time() - cpu_start)
        # Progress goes to stderr, so that stdout holds only the report.
        print(f"{name}: done in {seconds[name][0]:.0f} s", file=sys.stderr, flush=True)
    return rows, growth_records, seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and one repeat, for the test suite")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: one per core)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5; quick 1)")
    parser.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated workloads (default: all of {','.join(WORKLOADS)})")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16 rows")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    parser.add_argument("--plots", type=Path, default=None, help="folder for the growth PNGs (default: next to --out, else none)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        parser.error(f"--only names unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    args.names = names
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads={args.threads} is invalid; it must be at least 1")
    return args


def build_report(command: str, machine, rows: list[Row], growth_records: dict, seconds: dict, plots: list) -> str:
    lines = [f"Command: `{command}`", "", machine.describe(), allocator_description(), "", format_table(rows, machine)]
    bounds = format_bounds(rows)
    if bounds:
        lines += ["", bounds]
    if growth_records:
        lines += ["", f"Training tokens/s against width (fp32, {growth.width_shape(growth_records['width'])}):", ""]
        lines.append(growth.format_width_table(growth_records["width"]))
        context_shape = growth.context_shape(growth_records["context"])
        lines += ["", f"Decoding time per token against context length (minformer, fp32, {context_shape}):", ""]
        lines.append(growth.format_context_table(growth_records["context"]))
    for path in plots:
        lines.append(f"\nPlot: {path}")
    wall = ", ".join(f"{name} {wall:.0f} s" for name, (wall, _) in seconds.items())
    cpu = ", ".join(f"{name} {cpu:.0f} s" for name, (_, cpu) in seconds.items())
    lines += ["", f"Wall time per workload: {wall}; total {sum(wall for wall, _ in seconds.values()):.0f} s."]
    # On a shared machine, CPU seconds divided by the thread count estimate the wall time on idle cores.
    lines.append(f"CPU time per workload (all threads): {cpu}; total {sum(cpu for _, cpu in seconds.values()):.0f} s.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    machine = measure_machine(args.quick)
    settings = workloads.make_settings(
        args.quick, compile=not args.no_compile, bf16=machine.bf16 and not args.no_bf16,
        bf16_reason=machine.bf16_reason if machine.bf16 else f"the CPU has no bf16 instructions ({machine.bf16_reason})",
        repeats=args.repeats,
    )
    if args.no_bf16 and machine.bf16:
        settings = dataclasses.replace(settings, bf16_reason="left out with --no-bf16")
    try:
        rows, growth_records, seconds = run_workloads(args.names, settings)
    finally:
        shutil.rmtree(settings.workdir, ignore_errors=True)
    plot_dir = args.plots or (args.out.parent if args.out else None)
    plots = []
    if growth_records and plot_dir is not None:
        plots = growth.plot_growth(growth_records["width"], growth_records["context"], plot_dir)
    command = "python benchmarks/compare.py " + " ".join(shlex.quote(arg) for arg in (argv if argv is not None else sys.argv[1:]))
    report = build_report(command.strip(), machine, rows, growth_records, seconds, plots)
    report += f"\nTotal wall time including the machine measurement: {time.perf_counter() - start:.0f} s."
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    rerun_with_steady_allocator()
    sys.exit(main())
