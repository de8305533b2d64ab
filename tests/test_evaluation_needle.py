"""Needle generators: deterministic under a seed, of the asked length, with the needle at its depth."""

from __future__ import annotations

import pytest

from retrieval_attn import RetrievalConfig
from retrieval_attn.evaluation.needle import make_needle, plot_needle
from retrieval_attn.evaluation.settings import TASKS, EvalSettings


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


def test_needle_heatmap_of_one_cell_is_large_enough_to_read(tmp_path):
    from matplotlib.image import imread

    settings = EvalSettings(methods=("sink+window",), tasks=("passkey",), lengths=(1024,), depths=(0.5,),
                            fidelity_tokens=0, retrieval=RetrievalConfig(sink_tokens=16, window_tokens=64))
    cells = [{"task": "passkey", "length": 1024, "depth": 0.5, "method": "sink+window", "samples": 1, "accuracy": 1.0}]
    (path,) = plot_needle(cells, settings, tmp_path)
    height, width = imread(path).shape[:2]
    assert width >= 450 and height >= 300, (width, height)  # was 253 x 154 with a clipped title
    (path,) = plot_needle([], settings, tmp_path)  # an interrupted run: no cell finished
    assert path.stat().st_size > 0
