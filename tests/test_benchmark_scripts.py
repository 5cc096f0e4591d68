"""The GPU check's scripts run: its shell script parses, and its whole-model checks pass in
their tiny CPU form (the timings and goals are for a GPU; nothing here judges speed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_parses():
    res = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_gpu_model_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_model_check.py"),
                          "smoke", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["ok"]
    assert result["compile"]["graphs_after_second_size"] == 0
    rows = result["train_step"]["rows"]
    assert {r["amp"] for r in rows} == {"fp32", "bf16"} and all(r["ours_s"] > 0 for r in rows)
