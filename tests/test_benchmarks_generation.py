"""The generation benchmark runs end to end in its quick mode; its times are never asserted."""

import subprocess
import sys

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "generation.py"


def test_generation_benchmark_quick_reports_both_paths(tmp_path):
    report_path = tmp_path / "generation.md"

    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(report_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr
    assert "| cached (KV cache) |" in completed.stdout
    assert "| uncached |" in completed.stdout
    assert "mismatch" not in completed.stdout
    assert "cached / uncached speed:" in report_path.read_text(encoding="utf-8")
