"""bench/gpu_check.sh --cpu: the GPU check's sequence with tiny shapes on the CPU, end to end, with faiss,
hnswlib and gguf hidden as on the GPU machine (which lacks them): every test file must still be
collected there, and the check must say which backends it skips."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIDE = "import sys\nfor name in ('faiss', 'hnswlib', 'gguf'):\n    sys.modules[name] = None  # import fails, find_spec is None\n"


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_stage_and_writes_the_summary(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text(HIDE)
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHONPATH": f"{hidden}{os.pathsep}{ROOT}",
           "GPU_CHECK_PYTEST_ARGS": "--collect-only"}  # this suite runs the device tests itself
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    stages = [s["stage"] for s in summary["stages"]]
    assert stages == ["env", "wheels", "tests", "device_map", "bench_32k", "bench_128k"] and summary["ok"]
    assert "total:" in (out / "summary.txt").read_text()
    tests = (out / "tests.log").read_text()
    assert "exit status: 0" in tests and "error" not in tests.lower() and (out / "tests.xml").is_file()
    assert "[cpu]" in tests and "[cuda]" not in tests  # the cpu cases of the device tests, collected
    for bench in ("bench_32k", "bench_128k"):
        results = json.loads((out / bench / "decode.json").read_text())["results"]
        assert [r["method"] for r in results] == ["sketch", "sketch-gather", "roar", "full", "offloaded", "flat"]
        assert all(r["layers_s"] for r in results if r["method"] in ("flat", "roar", "sketch", "sketch-gather"))
        sketch = next(r for r in results if r["method"] == "sketch")
        assert sum(layer["device_scoring"] for layer in sketch["layers_s"]) > 0  # the first stage, timed apart
        assert (out / bench / "layers.csv").is_file()
    assert json.loads((out / "device_map" / "device_map.json").read_text())["ok"]
    wheels = (out / "wheels.log").read_text()
    for line in ("ivf: skipped: the faiss library is missing", "hnsw: skipped: the hnswlib library is missing",
                 "GGUF model loading: skipped: the gguf library is missing",
                 "index backends available: ['flat', 'keygraph', 'roar', 'sketch']", "exit status: 0"):
        assert line in wheels, wheels
    assert (out / "gpu_check.tar.gz").is_file() and "== bench_128k.log" in run.stdout
