"""Needle generators: deterministic under a seed, of the asked length, with the needle at its depth."""

from __future__ import annotations

import pytest

from retrieval_attn.evaluation.needle import TASKS, make_needle


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
