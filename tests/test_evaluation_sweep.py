"""Tests of the recall sweep: its evaluation helpers on hand-made data, and small end-to-end sweeps.

The end-to-end sweeps run a tiny random Llama (2 layers, 4 query heads, 2 KV heads) or take q/k
arrays directly; the slow test runs ``retrieval-attn sweep`` on the embedded model at 1K tokens.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval_attn import RetrievalConfig, cli
from retrieval_attn.evaluation import BackendSpec, CapturedQK, default_layers, parse_backend_spec
from retrieval_attn.evaluation import sweep
from retrieval_attn.evaluation.report import Interrupted
from retrieval_attn.evaluation.sweep import (
    SweepSettings,
    evaluate_layer,
    format_sweep_table,
    operating_point,
    run_sweep,
    write_results,
)

SMALL = dict(retrieval=RetrievalConfig(sink_tokens=8, window_tokens=16), n_test=8, ks=(10,))


def random_qk(hq=4, hkv=2, n=300, d=16, seed=0) -> CapturedQK:
    rng = np.random.default_rng(seed)
    return CapturedQK.from_pairs({
        0: (rng.standard_normal((hq, n, d), dtype=np.float32), rng.standard_normal((hkv, n, d), dtype=np.float32))
    })


def test_operating_point_is_cheapest_point_reaching_target():
    scanned = [0.01, 0.02, 0.05, 0.03]
    min_recall = [0.80, 0.96, 0.99, 0.95]
    assert operating_point(scanned, min_recall, 0.95) == 1
    assert operating_point(scanned, min_recall, 0.97) == 2
    assert operating_point(scanned, min_recall, 0.999) is None


def test_parse_backend_spec_and_defaults():
    spec = parse_backend_spec("hnsw:ef=100,400:M=32")
    assert spec == BackendSpec("hnsw", {"ef": (100, 400), "M": (32,)})
    assert str(spec) == "hnsw:ef=100,400:M=32"
    with pytest.raises(ValueError, match="param=v1"):
        parse_backend_spec("roar:ef")
    assert default_layers(30) == (3, 9, 16, 22, 29)
    assert default_layers(2) == (0, 1)
    with pytest.raises(ValueError, match="sink \\+ window \\+ n_test"):
        SweepSettings(lengths=(40,), **SMALL, backends=())  # 40 < 8 + 16 + 8 + 10


def test_flat_has_recall_one_and_exact_mass():
    qk = random_qk()
    settings = SweepSettings(lengths=(300,), **SMALL, backends=(BackendSpec("flat"),))
    notes: set[str] = set()
    rows = evaluate_layer(qk.q[0], qk.k[0], settings, qk.scale, layer=0, notes=notes)
    assert [r["kv_head"] for r in rows] == [0, 1]
    for r in rows:
        assert r["recall"] == 1.0
        assert r["mass"] == pytest.approx(r["mass_exact"], rel=1e-9)
        assert r["scanned"] == 1.0 and r["n_keys"] == 300 - 8 - 16 - 8
        assert r["us_per_query"] > 0 and r["index_bytes"] > 0


def test_unknown_backends_and_parameters_are_refused():
    with pytest.raises(ValueError, match=r"backends must be one of flat, hnsw.*, got 'no-such-index'"):
        SweepSettings(lengths=(300,), **SMALL, backends=(BackendSpec("flat"), BackendSpec("no-such-index")))
    with pytest.raises(ValueError, match=r"backend 'roar': unknown parameter\(s\) \['bogus'\]"):
        SweepSettings(lengths=(300,), **SMALL, backends=(BackendSpec("roar", {"bogus": (1,)}),))


def test_sweep_on_given_qk_with_one_thread():
    one_thread = {**SMALL, "retrieval": RetrievalConfig(sink_tokens=8, window_tokens=16, cpu_threads=1)}
    settings = SweepSettings(lengths=(200, 300), **one_thread, backends=(BackendSpec("flat"),))
    threads = torch.get_num_threads()
    report = run_sweep(settings, qk={0: (torch.randn(1, 4, 300, 16), torch.randn(1, 2, 300, 16))}, progress=False)
    assert torch.get_num_threads() == threads  # restored after the sweep
    assert [s["length"] for s in report.summary] == [200, 300]
    assert all(s["recall_min"] == 1.0 for s in report.summary)
    assert all(o["reached"] for o in report.operating_points)


def test_end_to_end_tiny_llama_writes_results(tiny_llama, tmp_path):
    backends = (BackendSpec("flat"), BackendSpec("roar", {"ef": (5, 10, 40)}), BackendSpec("ivf", {"nprobe": (1, 4)}))
    settings = SweepSettings(lengths=(256, 384), layers=(0, 1), **SMALL, backends=backends)
    ids = torch.randint(0, 128, (1, 384), generator=torch.Generator().manual_seed(0))
    report = run_sweep(settings, model=tiny_llama, token_ids=ids, progress=False)
    paths = write_results(report, tmp_path / "out")

    names = sorted(p.name for p in paths)
    assert names == ["recall_vs_latency.png", "recall_vs_scanned.png", "rows.csv", "summary.csv", "sweep.json"]
    for p in paths:
        assert p.stat().st_size > 0
    data = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert data["layers"] == [0, 1] and data["capture"]["tokens"] == 384
    with open(tmp_path / "out" / "rows.csv") as f:
        rows = list(csv.DictReader(f))
    # per (length, layer, KV head) rows for every grid point: flat 1, roar 2 (ef=5 < k skipped), ivf 2
    points = {"flat": 1, "roar": 2, "ivf": 2}
    assert len(rows) == 2 * 2 * 2 * sum(points[b.name] for b in backends)
    flat = [s for s in data["summary"] if s["backend"] == "flat"]
    assert all(s["recall_min"] == 1.0 and s["scanned_median"] == 1.0 for s in flat)
    assert any("ef=5 skipped" in note for note in data["notes"])
    table = format_sweep_table(report)
    assert "operating points" in table and "flat" in table


@pytest.mark.slow
def test_sweep_command_on_embedded_model(tmp_path, capsys):
    """``retrieval-attn sweep`` end to end on the embedded model: 1,024 tokens, one layer, flat and roar."""
    argv = ["sweep", "--lengths", "1024", "--layers", "16", "--sink", "16", "--window", "64",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            "--backend", "flat", "--backend", "roar:ef=100,200"]
    assert cli.main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    points = {o["backend"]: o for o in last["operating_points"]}
    assert points["flat"]["reached"] and points["flat"]["recall_min"] == 1.0
    assert points["roar"]["reached"], points["roar"]  # ~880 indexed keys: 0.95 at ef <= 200
    assert (tmp_path / "out" / "recall_vs_scanned.png").is_file()
    assert any((tmp_path / "cache").rglob("layer016.npz"))
    assert last["capture"]["source"] == "forward"
    assert cli.main(argv) == 0  # again: q/k and tokens from the cache
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["capture"]["source"] == "cache"


def test_bench_script_is_the_sweep_command():
    script = Path(__file__).parents[1] / "bench" / "recall_sweep.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--backend" in result.stdout


def test_backends_with_different_build_parameters_stay_apart():
    g = np.random.default_rng(1)
    qk = CapturedQK.from_pairs({0: (g.standard_normal((4, 700, 8)), g.standard_normal((2, 700, 8)))})
    settings = SweepSettings(lengths=(700,), layers=(0,), **SMALL, backends=(
        BackendSpec("roar", {"conn": (4,), "ef": (40,)}), BackendSpec("roar", {"conn": (8,), "ef": (40,)})))
    report = run_sweep(settings, qk=qk, progress=False)
    assert sorted(s["backend"] for s in report.summary) == ["roar(conn=4)", "roar(conn=8)"]
    assert sorted(o["backend"] for o in report.operating_points) == ["roar(conn=4)", "roar(conn=8)"]


def test_ctrl_c_keeps_the_finished_lengths_and_layers(monkeypatch):
    evaluate = sweep.evaluate_layer
    calls = []

    def interrupt_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(sweep, "evaluate_layer", interrupt_the_second)
    settings = SweepSettings(lengths=(200, 300), **SMALL, backends=(BackendSpec("flat"),))
    with pytest.raises(Interrupted) as stop:
        run_sweep(settings, qk=random_qk(), progress=False)
    report = stop.value.partial
    assert [s["length"] for s in report.summary] == [200] and report.operating_points[0]["reached"]
    assert "200" in format_sweep_table(report)


def test_plot_axis_labels_do_not_overlap(tmp_path, monkeypatch):
    """Every panel of both plots labels its x axis with at least two numbers, none overlapping the next
    (log axes spanning less than a decade used to label every minor tick, in one unreadable string)."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures to measure their labels
    backends = (BackendSpec("flat"), parse_backend_spec("ivf:nlist=8:nprobe=1,2,4,8"), parse_backend_spec("roar:ef=20,40"))
    report = run_sweep(SweepSettings(lengths=(200, 300), **SMALL, backends=backends), qk=random_qk(), progress=False)
    write_results(report, tmp_path)
    assert len(figures) == 2
    for fig in figures:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            low, high = ax.get_xlim()
            boxes = [label.get_window_extent(renderer) for x, label in zip(ax.get_xticks(), ax.get_xticklabels())
                     if low <= x <= high and label.get_text()]
            assert len(boxes) >= 2, ax.get_title()
            assert not any(a.x1 > b.x0 for a, b in zip(boxes, boxes[1:])), ax.get_title()  # left to right, apart
        close(fig)


@pytest.mark.parametrize("rows_dtype", ["bfloat16", "float16"])
def test_half_rows_are_read_in_place_and_exact_search_stays_exact(rows_dtype):
    """rows_dtype: the indexes read the middle keys rounded to the half dtype, from one store (no fp32 copy of
    their own); flat, exact over the rounded keys, keeps recall 1; a graph still finds the top keys."""
    qk = random_qk(n=500)
    settings = SweepSettings(lengths=(500,), **SMALL, rows_dtype=rows_dtype,
                             backends=(BackendSpec("flat"), BackendSpec("roar", {"ef": (64,)})))
    rows = evaluate_layer(qk.q[0], qk.k[0], settings, qk.scale, layer=0, notes=set())
    flat = [r for r in rows if r["backend"] == "flat"]
    roar = [r for r in rows if r["backend"].startswith("roar")]
    assert flat and all(r["recall"] == 1.0 for r in flat)
    assert roar and all(r["recall"] > 0.8 and r["scanned"] < 1.0 for r in roar)
    assert all(r["index_bytes"] < 500 * 16 * 4 for r in flat)  # no fp32 copy of the keys
    with pytest.raises(ValueError, match="rows_dtype must be one of"):
        SweepSettings(lengths=(500,), **SMALL, rows_dtype="int8")
