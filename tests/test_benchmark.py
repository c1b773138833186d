"""The benchmark script runs end to end (at a small N; its figures are checked by people, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def test_benchmark_runs_every_workload_and_prints_ratios(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    command = [sys.executable, str(SCRIPT), "--n", "200", "--stores", "file,sqlite", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["n"] == 200
    assert set(results["stores"]) == {"file", "sqlite"}
    for key in ("file_read", "file_read_gc", "sqlite_read", "sqlite_read_gc", "sqlite_write", "file_write"):
        assert results["floor"][key] > 0, key
    for workloads in results["stores"].values():
        assert {"1-add-flush", "2-add-batch", "3-reopen", "5-ls", "6-remove"} <= set(workloads)
        assert workloads["3-reopen"]["count"] == 200 and workloads["5-ls"]["count"] == 200
        assert workloads["1-add-flush"]["median_growth"] > 0
        for name in ("3-reopen", "5-ls"):  # run five times, the fastest counts
            times = workloads[name]["times"]
            assert len(times) == 5 and workloads[name]["time"] == min(times), name
    assert results["stores"]["file"]["5-ls"]["bare_time"] > 0  # the bare loop over the files: files only
    assert "bare_time" not in results["stores"]["sqlite"]["5-ls"]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("file ", "sqlite "))]
    assert len(rows) == 12
    file_ls = [line for line in rows if line.startswith("file ") and " ls " in line]
    assert [line for line in rows if "bare loop" in line] == file_ls and len(file_ls) == 1
    assert all("x" in line.split("  ")[-1] for line in rows)  # every figure is a ratio to the floor
