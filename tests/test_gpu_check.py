"""bench/gpu_check.sh --cpu: the GPU check's sequence with tiny shapes on the CPU, end to end."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_stage_and_writes_the_summary(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "GPU_CHECK_PYTEST_ARGS": "--collect-only", "PYTHONPATH": str(ROOT)}  # this suite runs them
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    stages = [s["stage"] for s in summary["stages"]]
    assert stages == ["env", "wheels", "tests", "device_map", "bench_32k", "bench_128k"] and summary["ok"]
    assert "total:" in (out / "summary.txt").read_text()
    assert "exit status: 0" in (out / "tests.log").read_text() and (out / "tests.xml").is_file()
    for bench in ("bench_32k", "bench_128k"):
        results = json.loads((out / bench / "decode.json").read_text())["results"]
        assert {r["method"] for r in results} == {"full", "offloaded", "flat", "roar"}
        assert all(r["layers_s"] for r in results if r["method"] in ("flat", "roar"))
    assert json.loads((out / "device_map" / "device_map.json").read_text())["ok"]
    wheels = (out / "wheels.log").read_text()
    assert "index backends available" in wheels and "exit status: 0" in wheels
