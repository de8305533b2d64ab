"""The decode benchmark runs end to end on CPU (scaled-down shape) and reports every method honestly."""

from __future__ import annotations

import dataclasses
import json

import pytest

from retrieval_attn import RetrievalConfig
from retrieval_attn.cli import main
from retrieval_attn.engine import STEP_PARTS
from retrieval_attn.evaluation import decode_bench
from retrieval_attn.evaluation.decode_bench import BenchSettings, format_bench_table, run_decode_bench
from retrieval_attn.evaluation.report import Interrupted

TINY = dict(shape="tiny", contexts=(700,), steps=3, warmup=1, prefill_chunk=256, device="cpu", dtype="float32",
            retrieval=RetrievalConfig(sink_tokens=16, window_tokens=64, top_k=32))


def test_bench_measures_every_method_on_cpu():
    results = {r.method: r for r in run_decode_bench(BenchSettings(**TINY))}
    assert results["offloaded"].status.startswith("needs CUDA")
    for method in ("full", "flat", "roar"):
        r = results[method]
        assert r.status == "ok" and r.s_per_token > 0 and r.ttft_s >= r.prefill_s > 0 and r.cpu_rss_gib > 0
        assert r.step_max_s >= r.step_p90_s >= r.s_per_token
    for method in ("flat", "roar"):  # the timed steps come after every layer's index is ready
        assert results[method].index_ready_s >= results[method].ttft_s
        parts = results[method].breakdown_s
        assert set(parts) == {*STEP_PARTS, "rest_of_model"}
        assert parts["cpu_search"] > 0 and parts["device_attention"] > 0
        layers = results[method].layers_s
        assert len(layers) == 2 and all(set(layer) == set(STEP_PARTS) for layer in layers)
        assert sum(layer["cpu_search"] for layer in layers) > 0
    assert results["flat"].keys_scanned_fraction == 1.0 and 0 < results["roar"].keys_scanned_fraction <= 1.0


def test_bench_reports_a_request_the_planner_refuses():
    capped = dataclasses.replace(TINY["retrieval"], gpu_memory_gib=1e-4)
    settings = BenchSettings(**{**TINY, "methods": ("roar",), "retrieval": capped})
    (r,) = run_decode_bench(settings)
    assert r.status.startswith("refused by the planner") and "bytes" in r.status and r.s_per_token is None


def test_bench_cli_writes_table_json_and_csv(tmp_path, capsys):
    out = tmp_path / "decode"
    assert main(["bench", "--device", "cpu", "--shape", "tiny", "--contexts", "600", "--steps", "2",
                 "--warmup", "0", "--prefill-chunk", "256", "--sink", "16", "--window", "64", "--top-k", "32",
                 "--methods", "full", "roar", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "x faster than full" in printed and "roar" in printed
    payload = json.loads((out / "decode.json").read_text())
    assert [r["method"] for r in payload["results"]] == ["full", "roar"]
    assert payload["ratios"][0]["speedup_vs_full"] > 0
    assert (out / "decode.csv").read_text().count("\n") == 3
    assert "per layer" in printed and "layers bound by" in printed
    assert (out / "layers.csv").read_text().count("\n") == 1 + 2  # header, roar's 2 layers


@pytest.mark.parametrize("bad, match", [
    (dict(shape="huge"), "shape must be one of"),
    (dict(methods=("fast",)), "methods must be one of full, offloaded, flat, roar, .*got 'fast'"),
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(contexts=(1,)), r"contexts must be one or more ints >= 81 \(longer than sink \+ window = 80"),
])
def test_bench_settings_reject_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        BenchSettings(**{**TINY, **bad})


def test_ctrl_c_keeps_what_was_measured(monkeypatch):
    run = decode_bench._run_method
    calls = []

    def interrupt_the_third(*args, **kwargs):  # warm-up of each method, then the first context's full, roar
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return run(*args, **kwargs)

    monkeypatch.setattr(decode_bench, "_run_method", interrupt_the_third)
    with pytest.raises(Interrupted) as stop:
        run_decode_bench(BenchSettings(**{**TINY, "methods": ("full", "roar")}))
    assert isinstance(stop.value, KeyboardInterrupt)
    assert [r.method for r in stop.value.partial] == ["full"] and stop.value.partial[0].status == "ok"
    assert "full" in format_bench_table(stop.value.partial)
