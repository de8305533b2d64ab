"""Evaluation: deterministic needle generators, settings validation, a tiny end-to-end run on the embedded model."""

from __future__ import annotations

import json

import pytest

from retrieval_attn.evaluation.evaluate import (
    FULL,
    SINK_WINDOW,
    TASKS,
    EvalSettings,
    format_eval_table,
    make_needle,
    run_eval,
    write_results,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from retrieval_attn.hf import embedded_model_path

    path = embedded_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("task", TASKS)
def test_needle_is_deterministic_exact_length_and_at_its_depth(tokenizer, task):
    a = make_needle(tokenizer, task, 2048, 0.3, seed=7)
    assert a == make_needle(tokenizer, task, 2048, 0.3, seed=7)  # same seed, same sample
    b = make_needle(tokenizer, task, 2048, 0.3, seed=8)
    assert (a.answer, a.context_ids) != (b.answer, b.context_ids)  # another seed, another sample
    assert 2048 - 40 <= len(a.context_ids) <= 2048  # filled up to the length, less than one sentence short
    assert abs(a.needle_start / len(a.context_ids) - 0.3) < 0.03
    needle = tokenizer.decode(a.context_ids[a.needle_start : a.needle_start + 24])
    assert a.answer in needle and a.answer not in tokenizer.decode(a.question_ids)
    for depth in (0.0, 1.0):
        s = make_needle(tokenizer, task, 1024, depth, seed=1)
        assert abs(s.needle_start / len(s.context_ids) - depth) < 0.05
    if task == "multikey":  # distractors: other words, other numbers
        text = tokenizer.decode(a.context_ids)
        assert text.count("special magic number") == 4 and text.count(a.answer) == 1


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
        fidelity_tokens=24, fidelity_prefix=200, sink=16, window=48, top_k=1000, telemetry=True, prefill_chunk=128,
        cpu_threads=1,
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
