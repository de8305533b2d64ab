"""The CI scripts work from the environments users have: ``.ci/transformers_floor`` run from a venv whose
packages its base interpreter does not have (as in any venv with its own installs) sees them in its
floor environment, beside transformers at the pin's floor."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_transformers_floor_runs_from_a_venv(tmp_path):
    user_venv = tmp_path / "user-venv"
    subprocess.run([sys.executable, "-m", "venv", str(user_venv)], check=True, timeout=120)
    python = user_venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the user's venv sees what the environment running this test has (torch, ...), whether that is the
    # machine's Python or a venv itself, and has one package of its own, as torch is in a venv made on a
    # bare system Python
    running = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (Path(site) / "running_environment.pth").write_text(f"import site; list(map(site.addsitedir, {running!r}))\n")
    (Path(site) / "only_in_the_user_venv.py").write_text("HERE = True\n")
    assert Path(site) != Path(sysconfig.get_path("purelib"))
    check = tmp_path / "test_floor_sees_the_venv.py"
    check.write_text("import only_in_the_user_venv\nimport transformers\n\n\n"
                     "def test_sees_the_venv():\n    assert only_in_the_user_venv.HERE\n"
                     "    assert transformers.__version__.startswith('5.0')\n")
    env = {**os.environ, "PATH": f"{user_venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "VIRTUAL_ENV": str(user_venv), "FLOOR_PYTEST_ARGS": f"{check} -p no:cacheprovider"}
    run = subprocess.run(["bash", ".ci/transformers_floor"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "1 passed" in run.stdout and "transformers 5.0" in run.stdout, run.stdout[-3000:]
