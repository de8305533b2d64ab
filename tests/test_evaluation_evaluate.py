"""Evaluation: settings validation, a tiny end-to-end run on the embedded model."""

from __future__ import annotations

import json

import pytest

from retrieval_attn import RetrievalConfig
from retrieval_attn.evaluation import FULL, SINK_WINDOW, make_needle
from retrieval_attn.evaluation.evaluate import format_eval_table, run_eval, write_results
from retrieval_attn.evaluation.settings import EvalSettings


def test_bad_settings_raise_before_any_work(tokenizer):
    with pytest.raises(ValueError, match="task must be one of"):
        make_needle(tokenizer, "haystack", 1024, 0.5, 0)
    with pytest.raises(ValueError, match=r"depth must be a finite number in \[0, 1\]"):
        make_needle(tokenizer, "passkey", 1024, 1.5, 0)
    with pytest.raises(ValueError, match=r"lengths must be one or more ints >= 641 \(longer than sink \+ window = 640"):
        EvalSettings(lengths=(512,))
    with pytest.raises(ValueError, match=r"methods must be one or more of full, sink\+window"):
        EvalSettings(methods=("full", "annoy"))
    with pytest.raises(ValueError, match="ivf's nlist \\(256\\) must be <="):
        EvalSettings(methods=("ivf",), lengths=(800,), fidelity_tokens=0)
    with pytest.raises(ValueError, match=r"depths must be one or more numbers in \[0, 1\]"):
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
    assert fid["flat"]["disagreements"] == 0 and fid["flat"]["top1_agreement_decided"] == 1.0
    sw = fid[SINK_WINDOW]
    assert sw["disagreements"] == round(24 * (1 - sw["top1_agreement"])) >= sw["near_tie_disagreements"] >= 0
    flat_tel = [r for r in report.telemetry if r["method"] == "flat"]
    assert len(flat_tel) == 30 and all(r["recall_min"] == 1.0 and r["mass_min"] > 0.9999 for r in flat_tel)
    assert all(r["recall_mean"] == 0.0 for r in report.telemetry if r["method"] == SINK_WINDOW)
    paths = write_results(report, tmp_path)
    names = {p.name for p in paths}
    assert {"eval.json", "needle.csv", "fidelity.csv", "telemetry.csv", "needle_flat.png", "needle_sink_window.png",
            "fidelity.png", "telemetry.png"} <= names
    assert json.loads((tmp_path / "eval.json").read_text())["settings"]["lengths"] == [320, 480]
    assert "needle accuracy" in format_eval_table(report)


def test_ctrl_c_keeps_what_finished(small_model_with_the_embedded_vocabulary, tokenizer, monkeypatch):
    """Ctrl-C in the needle grid keeps the samples every method finished; in the fidelity task, the
    positions compared (whole chunks)."""
    from retrieval_attn.evaluation import needle
    from retrieval_attn.evaluation.methods import Methods
    from retrieval_attn.evaluation.report import Interrupted

    model = small_model_with_the_embedded_vocabulary
    config = RetrievalConfig(sink_tokens=8, window_tokens=16, top_k=1000, index="flat")
    grid = EvalSettings(methods=(FULL, "flat"), tasks=("passkey",), lengths=(200,), depths=(0.2, 0.8),
                        fidelity_tokens=0, retrieval=config)
    make, made = needle.make_needle, []
    monkeypatch.setattr(needle, "make_needle", lambda *a, **k: make(*a, **k) if len(made) < 1 and not made.append(1)
                        else _interrupt())
    with pytest.raises(Interrupted) as stop:
        run_eval(grid, model=model, tokenizer=tokenizer, progress=False)
    assert sorted((c["method"], c["depth"]) for c in stop.value.partial.needle_cells) == [("flat", 0.2), (FULL, 0.2)]
    assert "needle accuracy" in format_eval_table(stop.value.partial)

    fidelity = EvalSettings(methods=(FULL, "flat"), tasks=(), fidelity_tokens=48, fidelity_prefix=100,
                            prefill_chunk=16, retrieval=config)
    step, steps = Methods.step, []
    monkeypatch.setattr(Methods, "step", lambda self, *a, **k: step(self, *a, **k) if len(steps) < 32
                        and not steps.append(1) else _interrupt())  # flat's steps: the third chunk is cut
    with pytest.raises(Interrupted) as stop:
        run_eval(fidelity, model=model, tokenizer=tokenizer, progress=False)
    assert {r["method"]: r["tokens"] for r in stop.value.partial.fidelity} == {FULL: 32, "flat": 32}
    assert "teacher-forced fidelity" in format_eval_table(stop.value.partial)


def _interrupt():
    raise KeyboardInterrupt


def test_a_fidelity_run_longer_than_the_text_is_refused_before_the_needle_grid(
        small_model_with_the_embedded_vocabulary, tokenizer, monkeypatch):
    """The one check that needs the tokenizer (the text holds prefix + tokens + 1) runs before any task."""
    from retrieval_attn.checks import ConfigError
    from retrieval_attn.evaluation import evaluate

    monkeypatch.setattr(evaluate, "run_needle", lambda *a, **k: pytest.fail("the needle grid ran"))
    settings = EvalSettings(methods=(FULL, "flat"), tasks=("passkey",), lengths=(200,), depths=(0.5,),
                            fidelity_tokens=10**6, fidelity_prefix=100,
                            retrieval=RetrievalConfig(sink_tokens=8, window_tokens=16, top_k=1000, index="flat"))
    with pytest.raises(ConfigError, match=r"fidelity_tokens must be an int in \[1, \d+\] \(what alice.txt's \d+ "
                                          r"tokens hold after fidelity_prefix = 100\), got 1000000") as err:
        run_eval(settings, model=small_model_with_the_embedded_vocabulary, tokenizer=tokenizer, progress=False)
    assert err.value.field == "fidelity_tokens"


def test_eval_ctrl_c_writes_the_results_that_finished(tmp_path, monkeypatch, capsys):
    """``retrieval-attn eval`` interrupted writes its results files (telemetry included) for what
    finished, prints its table and exits 130."""
    import torch

    from retrieval_attn import cli
    from retrieval_attn.engine.telemetry import LayerTelemetry, summarise
    from retrieval_attn.evaluation import evaluate
    from retrieval_attn.evaluation.report import Interrupted

    layer = LayerTelemetry()
    layer.record(torch.full((2, 3), 0.9), torch.full((2, 3), 0.95))

    def stopped(settings, **kwargs):
        raise Interrupted(evaluate.EvalReport(
            settings, "m", [], [], [{"method": "flat", "tokens": 3, "kl_mean": 0.01, "kl_max": 0.02, "kl_p99": 0.02,
                                     "top1_agreement": 1.0, "disagreements": 0, "near_tie_disagreements": 0,
                                     "top1_agreement_decided": 1.0, "ppl": 2.0}], [],
            [{"method": "flat", "layer": 0, **summarise(layer)}], {"flat": 1.0, "total": 1.0}, {"flat": 0.1}))

    monkeypatch.setattr(evaluate, "run_eval", stopped)
    monkeypatch.setattr("retrieval_attn.hf.load_model", lambda path: (None, None))
    out = tmp_path / "ev"
    assert cli.main(["eval", "--tasks", "--methods", "full", "flat", "--out", str(out)]) == 130
    printed, err = capsys.readouterr()
    assert "teacher-forced fidelity" in printed
    assert err.strip().splitlines()[-1] == f"interrupted (Ctrl-C): the table above and the files in {out}/ cover what ran"
    assert json.loads((out / "eval.json").read_text())["fidelity"][0]["method"] == "flat"
    assert (out / "telemetry.csv").read_text().startswith("method,layer,steps,recall_mean")


def test_fidelity_tables_count_the_disagreements_that_are_near_ties():
    import torch

    from retrieval_attn.evaluation.fidelity import fidelity_tables

    agree = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1])
    near_tie = torch.tensor([0.0, 1, 0, 1, 1, 0, 0, 0])  # misses at 1 and 4 are near ties, at 2 decided
    res = {"m": {"kl": torch.zeros(8), "agree": agree, "nll": torch.zeros(8), "near_tie": near_tie}}
    (row,), bins = fidelity_tables(res, prefix=100)
    assert row["top1_agreement"] == 5 / 8
    assert row["disagreements"] == 3 and row["near_tie_disagreements"] == 2
    assert row["top1_agreement_decided"] == pytest.approx(4 / 5)  # positions 0, 2, 5, 6, 7: one miss
    res["m"]["near_tie"] = torch.ones(8)  # full attention never decided: nothing to miss there
    assert fidelity_tables(res, prefix=100)[0][0]["top1_agreement_decided"] == 1.0
