"""Determinism and thread safety: the same outputs for any CPU thread count, and from concurrent Python threads."""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from retrieval_attn import RetrievalAttention, RetrievalConfig
from retrieval_attn.hf import RetrievalCache, cache_kwargs
from retrieval_attn.index import cpu_threads, make_index

from .conftest import random_qkv

THREADS = sorted({1, 2, numba.config.NUMBA_NUM_THREADS})
BACKENDS = {"flat": {}, "roar": {"ef": 48}, "keygraph": {"ef": 48}, "hnsw": {"ef": 48}, "ivf": {"nlist": 16, "nprobe": 4}}


def decode_run(index: str, threads: int | None, seed: int = 0) -> torch.Tensor:
    """Outputs of 400 prefill + 40 decode steps (batch 2, GQA), approximate retrieval (top_k 32 of ~400 keys)."""
    q, k, v = random_qkv(2, 6, 2, 440, 16, seed=seed)
    config = RetrievalConfig(sink_tokens=8, window_tokens=16, top_k=32, index=index, index_params=BACKENDS[index],
                             cpu_threads=threads)
    engine = RetrievalAttention(config, 6, 2, 16)
    outs = [engine.prefill(q[:, :, :400], k[:, :, :400], v[:, :, :400])]
    outs += [engine.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]) for t in range(400, 440)]
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("index", sorted(BACKENDS))
def test_engine_outputs_identical_for_every_thread_count(index):
    outs = [decode_run(index, n) for n in THREADS]
    for n, out in zip(THREADS[1:], outs[1:]):
        assert torch.equal(out, outs[0]), f"cpu_threads={n} differs from cpu_threads={THREADS[0]}"


@pytest.mark.parametrize("index", sorted(BACKENDS))
def test_index_search_identical_for_every_thread_count(index):
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3, 2000, 32)).astype(np.float32)
    train = rng.standard_normal((3, 300, 32)).astype(np.float32)
    queries = rng.standard_normal((3, 16, 32)).astype(np.float32)
    results = []
    for n in THREADS:
        with cpu_threads(n):
            idx = make_index(index, **BACKENDS[index])
            idx.build(keys[:, :1800], train)
            idx.add(keys[:, 1800:])
            res = idx.search(queries, 20)
        results.append((res.ids, res.scores, res.scored))
    for n, (ids, scores, scored) in zip(THREADS[1:], results[1:]):
        assert np.array_equal(ids, results[0][0]) and np.array_equal(scores, results[0][1]), f"threads={n}"
        assert np.array_equal(scored, results[0][2])


def run_in_threads(jobs: list) -> list:
    """Run the callables at once, one Python thread each (released together), and return their results."""
    results, errors = [None] * len(jobs), []
    start = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = jobs[i]()
        except BaseException as err:  # re-raised in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_two_engines_in_two_threads_equal_each_alone():
    jobs = [lambda: decode_run("roar", 1, seed=1), lambda: decode_run("hnsw", THREADS[-1], seed=2),
            lambda: decode_run("ivf", None, seed=3)]
    alone = [job() for job in jobs]
    main_threads = torch.get_num_threads()
    for _ in range(2):
        together = run_in_threads(jobs)
        for a, b in zip(alone, together):
            assert torch.equal(a, b)
    # the thread counts the blocks set are gone: in this thread and in threads started afterwards
    assert torch.get_num_threads() == main_threads
    assert run_in_threads([torch.get_num_threads])[0] == main_threads


def test_overlapping_thread_blocks_restore_torch_default():
    """A enters cpu_threads(1); B, started meanwhile, enters cpu_threads(2); A exits, then B: nothing leaks."""
    default = torch.get_num_threads()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with cpu_threads(1):
            a_in.set()
            b_in.wait()
        a_out.set()

    def b():
        a_in.wait()
        with cpu_threads(2):
            b_in.set()
            a_out.wait()

    run_in_threads([a, b])
    assert run_in_threads([torch.get_num_threads])[0] == default  # a thread started now gets the default
    assert torch.get_num_threads() == default


def test_one_model_two_caches_in_two_threads_equal_each_alone():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    )).eval()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (1, n), generator=gen) for n in (150, 110)]

    def job(ids):
        cache = RetrievalCache(model, RetrievalConfig(sink_tokens=4, window_tokens=16, top_k=16, index="roar",
                                                      index_params={"ef": 32}))
        return model.generate(ids, max_new_tokens=15, min_new_tokens=15, do_sample=False, **cache_kwargs(model, cache))

    alone = [job(p) for p in prompts]
    together = run_in_threads([lambda p=p: job(p) for p in prompts])
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_thread_chooser_follows_the_faster_count():
    """The counts take turns 3 times each; the faster one is kept, the other is tried again after waits that
    double while it loses, and takes over once it wins (the machine got busy)."""
    from retrieval_attn.index import ThreadChooser

    chooser = ThreadChooser(4, explore=2, max_explore=8)
    cost = {4: 1.0, 1: 1.1}  # a quiet machine: 4 threads are faster (10%: a cheap try, waits just double)
    picks = []
    for _ in range(40):
        n = chooser.pick()
        picks.append(n)
        chooser.record(n, cost[n])
    assert picks[:6] == [4, 1] * 3 and chooser.current == 4
    tries = [i for i, n in enumerate(picks) if n == 1]
    assert tries[3:7] == [7, 11, 19, 27] and all(b - a <= 8 for a, b in zip(tries, tries[1:]))  # waits 2, 4, 8, 8
    cost[4] = 10.0  # busy: a stalled team of 4 threads
    for _ in range(30):
        n = chooser.pick()
        chooser.record(n, cost[n])
    assert chooser.current == 1
    assert ThreadChooser(1).candidates == (1,) and ThreadChooser(1).pick() == 1


def test_thread_chooser_needs_two_wins_in_a_row_to_switch():
    """On a busy machine a call's time is bimodal: one lucky call of the other count does not switch; a
    win is confirmed by a try at the very next call."""
    from retrieval_attn.index import ThreadChooser

    chooser = ThreadChooser(2, explore=4)
    for n, seconds in [(2, 0.5), (1, 1.0), (2, 3.0), (1, 1.0), (2, 3.0), (1, 1.0)]:  # a lucky first call of 2
        assert chooser.pick() == n
        chooser.record(n, seconds)
    assert chooser.current == 1  # by the medians of 3 calls each, not by the first call of each
    picks = []
    tries = iter([0.1, 5.0, 1.05])  # 2's first try since is lucky, its confirmation is not, the next one is close
    for _ in range(100):
        n = chooser.pick()
        picks.append(n)
        chooser.record(n, next(tries) if n == 2 else 1.0)
    # 2 is tried as the 4th call (explore=4; won), at once again (lost, 5x slower: the next try waits (5 - 1) /
    # 0.05 = 80 calls, so tries cost at most 5% of the time), then as the 80th call after (lost by 5%)
    assert [i for i, n in enumerate(picks) if n == 2] == [3, 4, 84] and chooser.current == 1


def test_thread_budget_leaves_the_decoding_thread_a_core_on_a_gpu():
    from retrieval_attn.index import thread_budget

    cores = min(len(os.sched_getaffinity(0)), numba.config.NUMBA_NUM_THREADS)
    assert thread_budget("cpu") == cores and thread_budget("cuda") == max(1, cores - 1)
