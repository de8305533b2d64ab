"""Evaluation: settings validation, a tiny end-to-end run on the embedded model."""

from __future__ import annotations

import json

import pytest

from retrieval_attn import RetrievalConfig
from retrieval_attn.evaluation import FULL, SINK_WINDOW, make_needle
from retrieval_attn.evaluation.evaluate import EvalSettings, format_eval_table, run_eval, write_results


def test_bad_settings_raise_before_any_work(tokenizer):
    with pytest.raises(ValueError, match="task must be one of"):
        make_needle(tokenizer, "haystack", 1024, 0.5, 0)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        make_needle(tokenizer, "passkey", 1024, 1.5, 0)
    with pytest.raises(ValueError, match="lengths must exceed sink \\+ window = 640"):
        EvalSettings(lengths=(512,))
    with pytest.raises(ValueError, match="method must be one of"):
        EvalSettings(methods=("full", "annoy"))
    with pytest.raises(ValueError, match="ivf's nlist \\(256\\) must be <="):
        EvalSettings(methods=("ivf",), lengths=(800,), fidelity_tokens=0)
    with pytest.raises(ValueError, match=r"depths must be in \[0, 1\]"):
        EvalSettings(depths=(-0.1,))
    with pytest.raises(ValueError, match="nothing to run"):
        EvalSettings(tasks=(), fidelity_tokens=0)


@pytest.mark.slow
def test_tiny_eval_end_to_end(smollm, tmp_path):
    model, tokenizer = smollm
    settings = EvalSettings(
        methods=(FULL, "flat", SINK_WINDOW), tasks=("passkey",), lengths=(320, 480), depths=(0.2, 0.8),
        fidelity_tokens=24, fidelity_prefix=200, prefill_chunk=128,
        retrieval=RetrievalConfig(sink_tokens=16, window_tokens=48, top_k=1000, index="flat", telemetry=True,
                                  cpu_threads=1),
    )
    report = run_eval(settings, model=model, tokenizer=tokenizer, progress=False)
    acc = {(c["method"], c["length"], c["depth"]): c["accuracy"] for c in report.needle_cells}
    assert len(acc) == 3 * 2 * 2
    for key, value in acc.items():
        if key[0] == "flat":  # top_k covers every offloaded key: exactly full attention
            assert value == acc[(FULL, *key[1:])]
    fid = {r["method"]: r for r in report.fidelity}
    assert set(fid) == {FULL, "flat", SINK_WINDOW}
    assert fid["flat"]["kl_max"] < 1e-3 and fid["flat"]["top1_agreement"] == 1.0
    assert fid[SINK_WINDOW]["kl_mean"] > 10 * fid["flat"]["kl_mean"]
    flat_tel = [r for r in report.telemetry if r["method"] == "flat"]
    assert len(flat_tel) == 30 and all(r["recall_min"] == 1.0 and r["mass_min"] > 0.9999 for r in flat_tel)
    assert all(r["recall_mean"] == 0.0 for r in report.telemetry if r["method"] == SINK_WINDOW)
    paths = write_results(report, tmp_path)
    names = {p.name for p in paths}
    assert {"eval.json", "needle.csv", "fidelity.csv", "telemetry.csv", "needle_flat.png", "needle_sink_window.png",
            "fidelity.png", "telemetry.png"} <= names
    assert json.loads((tmp_path / "eval.json").read_text())["settings"]["lengths"] == [320, 480]
    assert "needle accuracy" in format_eval_table(report)
