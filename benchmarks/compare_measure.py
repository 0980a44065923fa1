"""Measuring tools shared by the comparison benchmark: timers, the machine's limits and result rows.

The machine's limits are measured, not looked up. The matrix-multiply peak is the median rate of
a large square ``torch.matmul`` in fp32 and in bf16. The memory bandwidth is the faster of two
median read rates over a tensor much larger than the caches (a sum and a matrix-vector product,
each reading every byte once). Every row reports its achieved rate against one of these limits
(the roofline).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

GEMM_FP32 = "fp32 GEMM peak"
GEMM_BF16 = "bf16 GEMM peak"
BANDWIDTH = "memory bandwidth"


def median_seconds(step: Callable[[], object], warmup: int, repeats: int) -> float:
    """Run ``step`` ``warmup`` times untimed, then ``repeats`` times; return the median seconds of one run."""
    for _ in range(warmup):
        step()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def median_seconds_interleaved(steps: list[Callable[[], object]], warmup: int, repeats: int) -> list[float]:
    """Time several steps in turn (a, b, a, b, ...); return the median seconds of each.

    Alternating the sides spreads any load from other processes over both, so that the ratio
    stays meaningful on a shared machine even when the absolute times do not.
    """
    for _ in range(warmup):
        for step in steps:
            step()
    durations: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for index, step in enumerate(steps):
            start = time.perf_counter()
            step()
            durations[index].append(time.perf_counter() - start)
    return [statistics.median(times) for times in durations]


def cpu_flags() -> set[str]:
    """Return the feature flags of the first CPU in /proc/cpuinfo; empty where that file does not exist."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_support() -> tuple[bool, str]:
    """Return whether this CPU has bf16 matrix instructions that oneDNN uses, and why not when it lacks them."""
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (mkldnn), which runs bf16 matrix products on CPU"
    flags = cpu_flags() & {"avx512_bf16", "amx_bf16"}
    if not flags:
        return False, "the CPU lacks avx512_bf16 and amx_bf16, so bf16 runs emulated and slower than fp32"
    return True, " and ".join(sorted(flags))


@dataclass(frozen=True)
class Machine:
    """The machine a table was measured on, and its measured limits."""

    cores: int
    threads: int
    torch_version: str
    cpu: str
    bf16: bool
    bf16_reason: str
    gemm_fp32: float
    """Median fp32 matmul rate, FLOP/s."""
    gemm_bf16: float | None
    """Median bf16 matmul rate, FLOP/s; None without bf16 instructions."""
    bandwidth: float
    """Median rate of reading a large tensor, bytes/s."""

    def limit(self, roofline: str) -> float | None:
        """Return the measured limit named by ``roofline`` (FLOP/s or bytes/s)."""
        return {GEMM_FP32: self.gemm_fp32, GEMM_BF16: self.gemm_bf16, BANDWIDTH: self.bandwidth}[roofline]

    def describe(self) -> str:
        """Return the one-paragraph description printed above the table."""
        bf16_peak = f"{self.gemm_bf16 / 1e9:.0f} GFLOP/s" if self.gemm_bf16 else f"n/a ({self.bf16_reason})"
        return (
            f"machine: {self.cores} cores, {self.threads} torch thread{'s' if self.threads != 1 else ''}, "
            f"{self.cpu}, torch {self.torch_version}; "
            f"bf16 instructions: {self.bf16_reason if self.bf16 else 'none'}\n"
            f"measured limits: fp32 matmul {self.gemm_fp32 / 1e9:.0f} GFLOP/s, bf16 matmul {bf16_peak}, "
            f"memory read bandwidth {self.bandwidth / 1e9:.1f} GB/s"
        )


def matmul_rate(size: int, dtype: torch.dtype, repeats: int) -> float:
    """Return the median FLOP/s of multiplying two (size, size) matrices of ``dtype``."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(dtype)
    right = torch.randn(size, size, generator=generator).to(dtype)
    seconds = median_seconds(lambda: torch.matmul(left, right), warmup=1, repeats=repeats)
    return 2.0 * size**3 / seconds


def read_bandwidth(n_bytes: int, repeats: int) -> float:
    """Return the faster of two median read rates (bytes/s) over a float32 tensor of ``n_bytes`` bytes.

    The two reads are a sum and a matrix-vector product (the kernel of batch-1 decoding). Each
    reads every byte once. The faster is the tighter lower bound on the machine's bandwidth:
    on a 2-core x86 machine, the sum read 21 to 27 GB/s and the product 31 to 33 GB/s.
    """
    values = torch.ones(n_bytes // 4)
    columns = 4096
    matrix = values[: (values.numel() // columns) * columns].view(-1, columns)
    vector = torch.ones(columns)
    rates = []
    for read, size in ((lambda: values.sum(), values.numel() * 4), (lambda: torch.mv(matrix, vector), matrix.numel() * 4)):
        rates.append(size / median_seconds(read, warmup=1, repeats=repeats))
    return max(rates)


def measure_machine(quick: bool) -> Machine:
    """Measure the matrix-multiply peaks and memory bandwidth with the current torch thread count."""
    size = 256 if quick else 2048
    bandwidth_bytes = (16 if quick else 512) * 2**20
    repeats = 2 if quick else 5
    has_bf16, reason = bf16_support()
    return Machine(
        cores=os.cpu_count() or 1,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        cpu=platform.machine(),
        bf16=has_bf16,
        bf16_reason=reason,
        gemm_fp32=matmul_rate(size, torch.float32, repeats),
        gemm_bf16=matmul_rate(size, torch.bfloat16, repeats) if has_bf16 else None,
        bandwidth=read_bandwidth(bandwidth_bytes, repeats),
    )


@dataclass
class Row:
    """One line of the comparison table: minformer and its peer on one workload."""

    workload: str
    unit: str
    peer_name: str = "transformers"
    ours: float | None = None
    """minformer's rate in ``unit``."""
    peer: float | None = None
    """The peer's rate in ``unit``."""
    target: float | None = None
    """The ratio ours / peer the row aims for; None for a row without one."""
    work_per_unit: float | None = None
    """FLOPs (or bytes, for decoding) behind one unit of the rate, for the roofline columns."""
    roofline: str | None = None
    """Measured limit the achieved rate is compared with: GEMM_FP32, GEMM_BF16 or BANDWIDTH."""
    peer_work_per_unit: float | None = None
    """The peer's work per unit where it differs from minformer's (the peer decodes fp32 weights in a bf16 row)."""
    peer_roofline: str | None = None
    """The peer's limit where it differs from minformer's (the peer trains in fp32 in a bf16 row)."""
    check: str = ""
    """Finding of the correctness check, such as the loss difference or the share of tokens that agree."""
    status: str = "ok"
    """ok, or FAILED / n/a / skipped followed by the reason; a row that is not ok prints no speed."""
    bound: str = ""
    """A limit on this row measured in the same run (what the row's kernels alone take), printed under the table."""

    @property
    def ratio(self) -> float | None:
        if self.status != "ok" or not self.ours or not self.peer:
            return None
        return self.ours / self.peer

    def achieved(self, rate: float | None) -> float | None:
        """Return the FLOP/s (or bytes/s) that ``rate`` units per second amount to."""
        if rate is None or self.work_per_unit is None:
            return None
        return rate * self.work_per_unit

    def roofline_fraction(self, machine: Machine, rate: float | None) -> float | None:
        """Return the achieved rate as a fraction of the machine's limit for this row."""
        achieved = self.achieved(rate)
        limit = machine.limit(self.roofline) if self.roofline else None
        if achieved is None or not limit:
            return None
        return achieved / limit

    def peer_roofline_fraction(self, machine: Machine) -> float | None:
        """Return the peer's achieved rate as a fraction of the limit of the precision the peer runs in."""
        work = self.peer_work_per_unit or self.work_per_unit
        roofline = self.peer_roofline or self.roofline
        limit = machine.limit(roofline) if roofline else None
        if self.peer is None or work is None or not limit:
            return None
        return self.peer * work / limit

    def target_met(self, machine: Machine) -> str:
        """Return yes or no: the ratio reaches its target, or minformer reaches 90% of the roofline."""
        if self.target is None or self.ratio is None:
            return ""
        fraction = self.roofline_fraction(machine, self.ours)
        if self.ratio >= self.target:
            return "yes"
        if fraction is not None and fraction >= 0.9:
            return "yes (90% of roofline)"
        return "no"


def format_rate(value: float | None) -> str:
    if value is None:
        return ""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def format_achieved(value: float | None, roofline: str | None) -> str:
    if value is None:
        return ""
    unit = "GB/s" if roofline == BANDWIDTH else "GFLOP/s"
    return f"{value / 1e9:.1f} {unit}"


def format_fraction(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


TABLE_HEADER = (
    "| workload | unit | minformer | peer | peer figure | ratio | target | met | "
    "minformer achieved | roofline | minformer % | peer % | check |"
)


def format_table(rows: list[Row], machine: Machine) -> str:
    """Return the markdown table of ``rows``; a row that is not ok shows its status in place of speeds."""
    lines = [TABLE_HEADER, "|" + " --- |" * TABLE_HEADER.count(" | ") + " --- |"]
    for row in rows:
        if row.status != "ok":
            lines.append(f"| {row.workload} | {row.unit} | {row.status} | {row.peer_name} | | | | | | | | | {row.check} |")
            continue
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
        target = "" if row.target is None else f">= {row.target:.2f}x"
        cells = [
            row.workload,
            row.unit,
            format_rate(row.ours),
            row.peer_name,
            format_rate(row.peer),
            ratio,
            target,
            row.target_met(machine),
            format_achieved(row.achieved(row.ours), row.roofline),
            row.roofline or "",
            format_fraction(row.roofline_fraction(machine, row.ours)),
            format_fraction(row.peer_roofline_fraction(machine)),
            row.check,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_bounds(rows: list[Row]) -> str:
    """Return the measured bounds of the rows that have one, as a list under a heading; empty when none has."""
    lines = [f"- {row.workload}, against {row.peer_name}: {row.bound}" for row in rows if row.bound and row.status == "ok"]
    if not lines:
        return ""
    return "\n".join(["Bounds measured in this run, from the kernels each row cannot avoid:", "", *lines])
