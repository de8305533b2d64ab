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
    assert re.search(r"\nindex +roar -> roar \(top_k 100\)\n", result.stdout), result.stdout  # the graph ran
    fraction = float(re.search(r"keys scanned per query head \(mean fraction\) +([0-9.]+)", result.stdout).group(1))
    assert 0 < fraction < 1, result.stdout  # it scored a part of the offloaded keys, not all
    assert "warning" not in result.stderr.lower(), result.stderr[-2000:]  # no deprecation or other warning
    assert "Loading weights" not in result.stderr, result.stderr[-2000:]  # transformers' own bars are silenced


def test_index_example_runs():
    block = next(b for b in python_blocks() if "make_index(" in b)
    exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command_verbatim():
    """.ci/run's one command is the README's test command, verbatim (the suite, then the transformers-floor
    run, which installs nothing into the environment the README sets up)."""
    test_cmd = next(line for line in README.splitlines() if line.startswith("pip install") and "pytest" in line)
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line and not line.startswith("#") and line != "set -euo pipefail"
                and not line.startswith("cd ")]
    assert commands == [test_cmd] and test_cmd.endswith("python -m pytest && bash .ci/transformers_floor")


def test_planner_example_runs(capsys):
    block = next(b for b in python_blocks() if "plan_memory(" in b)
    exec(compile(block, "README.md", "exec"), {})
    assert "cpu: offloaded KV (bfloat16) 15.92 GiB" in capsys.readouterr().out


def test_sdist_carries_what_the_readme_points_to(tmp_path):
    """The source distribution holds every bench/, tests/ and .ci/ file the README names, and the license;
    its metadata has the SPDX license expression, the project's URLs and classifiers."""
    import shutil
    import sys
    import tarfile

    root = Path(__file__).parent.parent
    tree = tmp_path / "src"
    shutil.copytree(root, tree, ignore=shutil.ignore_patterns(".git", "results", "__pycache__", "*.egg-info", "build",
                                                              "dist", ".venv", ".pytest_cache", ".hypothesis"))
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=tree, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "license" not in result.stderr.lower(), result.stderr[-2000:]  # no deprecated license form
    with tarfile.open(tmp_path / result.stdout.split()[-1]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
        pkg_info = sdist.extractfile(next(n for n in sdist.getnames() if n.count("/") == 1 and
                                          n.endswith("/PKG-INFO"))).read().decode()
    pointed = set(re.findall(r"(?:bench|tests|\.ci)/[\w./-]*\w", README))
    assert pointed >= {"bench/README.md", "bench/decode.py", ".ci/run", ".ci/transformers_floor"}, pointed
    assert pointed | {"LICENSE", "retrieval_attn/data/passkey.txt", "tests/conftest.py"} <= names, pointed - names
    assert "License-Expression: Apache-2.0" in pkg_info and "License-File: LICENSE" in pkg_info
    assert "Project-URL: " in pkg_info and "Classifier: Programming Language :: Python :: 3" in pkg_info
