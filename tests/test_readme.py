"""The README's examples run as written, and its main-job command prints the pass key."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from .conftest import PASSKEY

README = (Path(__file__).parent.parent / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_library_api_example_runs():
    block = next(b for b in python_blocks() if "RetrievalAttention(" in b)
    exec(compile(block, "README.md", "exec"), {})


@pytest.mark.slow
def test_transformers_example_runs(smollm, monkeypatch, capsys):
    import retrieval_attn.hf

    monkeypatch.setattr(retrieval_attn.hf, "load_model", lambda path=None: smollm)  # load once per session
    block = next(b for b in python_blocks() if "RetrievalCache(" in b)
    names = {}
    exec(compile(block, "README.md", "exec"), names)
    assert PASSKEY in capsys.readouterr().out
    seen = names["cache"].get_seq_length()
    turn = next(b for b in python_blocks() if "torch.cat([out, turn]" in b)  # the multi-turn example continues it
    exec(compile(turn, "README.md", "exec"), names)
    assert names["cache"].stats[0].seen_tokens == names["more"].shape[1] - 1 > seen


@pytest.mark.slow
def test_main_job_command_prints_the_answer():
    main_job = next(line for line in README.splitlines() if line.startswith("pip install") and "generate" in line)
    cli = shlex.split(main_job.split("&&")[-1])
    assert cli[0] == "retrieval-attn"
    result = subprocess.run(cli, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert PASSKEY in result.stdout
    assert "offloaded" in result.stdout and "seconds per decoded token" in result.stdout


def test_index_example_runs():
    block = next(b for b in python_blocks() if "make_index(" in b)
    exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = next(line for line in README.splitlines() if line.startswith("pip install") and "pytest" in line)
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == test_cmd


def test_planner_example_runs(capsys):
    block = next(b for b in python_blocks() if "plan_memory(" in b)
    exec(compile(block, "README.md", "exec"), {})
    assert "cpu: offloaded KV (bfloat16) 15.92 GiB" in capsys.readouterr().out
