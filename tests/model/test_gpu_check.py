"""benchmarks/gpu_check.py, the GPU check, runs here as its CPU dry run's part (a), made small: one
layer of the SmolLM2-135M shape (real widths and vocabulary), 4 tokens, against Hugging Face. It
keeps the script from rotting between the rare runs on a lent GPU (~20 s)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_run_exactness():
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--skip-speed", "--layers", "1",
           "--shapes", "SmolLM2-135M", "--new-tokens", "4"]  # fmt: skip
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert sum("plain same" in line and "prefix-hit same" in line for line in lines) == 8, result.stdout
    assert any(line.strip().startswith("(a) float32") and "PASS" in line for line in lines), result.stdout
