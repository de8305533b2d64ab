"""bench/threads.py: every thread setting and full attention decode from one prefill, side by side."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_threads", Path(__file__).resolve().parents[1] / "bench" / "threads.py")
threads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(threads)


def test_each_setting_is_timed_against_the_best_explicit_one_and_full_attention(tmp_path, capsys):
    out = tmp_path / "threads"
    assert threads.main(["--shape", "tiny", "--contexts", "700", "--index", "flat", "--threads", "default", "1", "2",
                         "--rounds", "2", "--steps", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "threads.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["default", "cpu_threads=1", "cpu_threads=2", "full"]
    explicit = [r["over_best_explicit"] for r in rows[1:3]]
    assert min(explicit) == 1.0 and max(explicit) >= 1.0 and rows[0]["over_best_explicit"] > 0
    assert all(len(r["rounds_s"]) == 2 and r["s_per_step"] > 0 for r in rows)
    assert all(r["cpu_search"] > 0 and r["x_faster_than_full"] > 0 for r in rows[:3])
    assert rows[3]["x_faster_than_full"] is None and "cpu_search" not in rows[3]
    assert "x faster than full" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--contexts", "640"], "--contexts must exceed sink \\+ window = 640"),
    (["--threads", "0"], "a thread setting is 'default' or an int >= 1"),
    (["--rounds", "0"], "--rounds must be >= 1"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        threads.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
