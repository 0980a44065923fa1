"""The attention benchmark script runs end to end in its quick mode and reports every cell.

Only the report's shape is checked; its times depend on the machine and are never asserted.
"""

import subprocess
import sys

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "attention.py"


def test_attention_benchmark_quick_reports_every_cell(tmp_path):
    report_path = tmp_path / "attention.md"

    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(report_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr
    report = report_path.read_text(encoding="utf-8")
    assert report == completed.stdout
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| backend | seq |")
    cells = [tuple(cell.strip() for cell in row.strip("|").split("|")[:2]) for row in rows[1:]]
    assert cells == [(backend, seq) for seq in ("256", "512") for backend in ("naive", "sdpa", "flash")]
    assert all("failed" not in row and "skipped" not in row for row in rows)
    assert "flash / naive peak memory at 512:" in report
    assert "longest sequence handled: naive 512, sdpa 512, flash 512" in report
