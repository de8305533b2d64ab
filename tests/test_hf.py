"""transformers integration: generate() with RetrievalCache equals plain generate(), model loading errors."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from retrieval_attn import RetrievalConfig
from retrieval_attn.engine.indexing import Phase
from retrieval_attn.hf import RetrievalCache, cache_argument, cache_kwargs, capture_qk, load_model

from .conftest import count_device_syncs


@pytest.mark.slow
def test_smollm_generate_matches_sdpa_and_offloads(smollm, passkey_ids):
    model, tokenizer = smollm
    ids = passkey_ids
    assert ids.shape[1] >= 2000
    plain = model.generate(ids, max_new_tokens=64, do_sample=False, min_new_tokens=64)
    exact = RetrievalCache(model, RetrievalConfig(sink_tokens=64, window_tokens=128, top_k=ids.shape[1] + 64, index="flat"))
    out = model.generate(ids, max_new_tokens=64, do_sample=False, min_new_tokens=64, **cache_kwargs(model, exact))
    assert torch.equal(out, plain), (tokenizer.decode(out[0, ids.shape[1]:]), tokenizer.decode(plain[0, ids.shape[1]:]))
    assert exact.get_seq_length() == ids.shape[1] + 63  # the last token is never fed back

    approx = RetrievalCache(model, RetrievalConfig(sink_tokens=64, window_tokens=128, top_k=100))
    out = model.generate(ids, max_new_tokens=16, do_sample=False, **cache_kwargs(model, approx))
    stats = approx.stats
    assert len(stats) == model.config.num_hidden_layers
    seen = out.shape[1] - 1  # every token but the last generated one went through the cache
    assert all(s.device_tokens == 192 and s.offloaded_tokens == seen - 192 for s in stats)
    assert stats[0].retrieved_last_step == 9 * 100  # 9 query heads, top_k 100
    assert "52718" in tokenizer.decode(out[0, ids.shape[1]:])
    # a plain run of the model, still switched to "retrieval_attn", falls back to sdpa unchanged
    fallback = model.generate(ids[:, :300], max_new_tokens=8, do_sample=False, **cache_kwargs(model, DynamicCache()))
    model.set_attn_implementation("sdpa")
    assert torch.equal(fallback, model.generate(ids[:, :300], max_new_tokens=8, do_sample=False))


def _tiny(cls, config_cls, **extra):
    torch.manual_seed(0)
    cfg = config_cls(**{
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, **extra,
    })
    return cls(cfg).eval()


@pytest.mark.parametrize("cls, config_cls", [(Qwen2ForCausalLM, Qwen2Config), (LlamaForCausalLM, LlamaConfig)])
def test_tiny_random_model_generate_matches(cls, config_cls, device):
    model = _tiny(cls, config_cls).to(device)
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(1)).to(device)  # batch 2
    plain = model.generate(ids, max_new_tokens=40, do_sample=False, min_new_tokens=40)
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=16, window_tokens=32, top_k=1000, index="flat"))
    out = model.generate(ids, max_new_tokens=40, do_sample=False, min_new_tokens=40, **cache_kwargs(model, cache))
    assert torch.equal(out, plain)
    assert cache.stats[1].offloaded_tokens == 300 + 39 - 48


def converse(model, turns, new_tokens, **cache_kw) -> torch.Tensor:
    """generate() over a conversation: each turn's ids (1, n) appended to everything so far (the cache,
    passed in ``cache_kw``, holds the rest), then ``new_tokens`` answer tokens; returns all the ids."""
    ids = torch.empty(1, 0, dtype=torch.long)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    for turn in turns:
        ids = model.generate(torch.cat([ids, turn], dim=1), **kw, **cache_kw)
    return ids


@pytest.mark.parametrize("cls, config_cls", [(Qwen2ForCausalLM, Qwen2Config), (LlamaForCausalLM, LlamaConfig)])
def test_conversation_on_one_cache_equals_dynamic_cache(cls, config_cls):
    """A 2,100-token document, then turns of 40, 1, 300 and 7 tokens, each answered: token for token what
    a DynamicCache gives (sink 64, window 128, top_k covering everything), with cache= and past_key_values=."""
    model = _tiny(cls, config_cls)
    gen = torch.Generator().manual_seed(5)
    turns = [torch.randint(0, 128, (1, n), generator=gen) for n in (2100, 40, 1, 300, 7)]
    plain = converse(model, turns, 12, past_key_values=DynamicCache())
    cfg = RetrievalConfig(sink_tokens=64, window_tokens=128, top_k=4096, index="flat")
    cache = RetrievalCache(model, cfg)
    assert torch.equal(converse(model, turns, 12, **cache_kwargs(model, cache)), plain)
    assert all(s.offloaded_tokens == plain.shape[1] - 1 - 192 for s in cache.stats)  # the last token is not fed
    assert torch.equal(converse(model, turns, 12, past_key_values=RetrievalCache(model, cfg)), plain)


def test_a_prompt_that_does_not_extend_the_cache_is_refused_and_the_conversation_goes_on():
    """generate() with fewer tokens than the cache holds (or exactly as many), which transformers would feed
    at earlier positions (or not at all), raises a ValueError naming what the cache holds before any engine
    runs; the cache is left as it was, and the next proper turn equals a DynamicCache's."""
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    gen = torch.Generator().manual_seed(7)
    document, turn = (torch.randint(0, 128, (1, n), generator=gen) for n in (300, 9))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=8, window_tokens=16, top_k=4096, index="flat"))
    out = model.generate(document, **cache_kwargs(model, cache), **kw)
    held = cache.get_seq_length()
    for stale in (out[:, :50], out[:, :200], out[:, :-1]):  # nothing fed; 95 tokens at 105..; all 305 at 0..
        if cache_argument(model) == "cache":
            with pytest.raises(ValueError, match=rf"holds {held} tokens .* the prompt does not extend what the cache holds"):
                model.generate(stale, **cache_kwargs(model, cache), **kw)
        else:  # before transformers 5.24, generate() may fail on its own (IndexError) before calling the model
            with pytest.raises((ValueError, IndexError)):
                model.generate(stale, **cache_kwargs(model, cache), **kw)
    assert cache.get_seq_length() == held and all(s.seen_tokens == held for s in cache.stats)
    plain = converse(model, [document, turn], 6, past_key_values=DynamicCache())
    assert torch.equal(model.generate(torch.cat([out, turn], dim=1), **cache_kwargs(model, cache), **kw), plain)


@pytest.mark.slow
def test_smollm_conversation_on_one_cache_equals_dynamic_cache(smollm, passkey_ids):
    model, tokenizer = smollm
    follow_ups = ["\nWhat is the pass key? Say it again.", "\nAnd what colour is the grass?", "\nThanks."]
    turns = [passkey_ids, *(tokenizer(t, return_tensors="pt").input_ids for t in follow_ups)]
    plain = converse(model, turns, 10, **cache_kwargs(model, DynamicCache()))
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=64, window_tokens=128, top_k=4096, index="flat"))
    out = converse(model, turns, 10, **cache_kwargs(model, cache))
    assert torch.equal(out, plain), (tokenizer.decode(out[0, passkey_ids.shape[1]:]),
                                     tokenizer.decode(plain[0, passkey_ids.shape[1]:]))
    assert cache.stats[0].offloaded_tokens == out.shape[1] - 1 - 192


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (batch, longest) of the prompts, padded on the left with token 0."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :], mask[i, longest - len(p) :] = p, 1
    return ids, mask


@pytest.mark.parametrize("cls, config_cls", [(Qwen2ForCausalLM, Qwen2Config), (LlamaForCausalLM, LlamaConfig)])
def test_left_padded_batch_decodes_each_prompt_as_alone(cls, config_cls, device):
    model = _tiny(cls, config_cls).to(device)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (n,), generator=gen).to(device) for n in (120, 75, 90)]
    ids, mask = (x.to(device) for x in left_padded([p.cpu() for p in prompts]))
    sink, window, new = 4, 16, 20
    config = RetrievalConfig(sink_tokens=sink, window_tokens=window, top_k=1000, index="flat")
    cache = RetrievalCache(model, config)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), **kw)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], **kw)  # plain sdpa, no padding
        assert torch.equal(out[i, ids.shape[1] :], alone[0, len(p) :]), f"sequence {i}"
        for layer in cache.sequence_stats:  # padding is never stored: only each prompt's real tokens
            s = layer[i]
            assert (s.seen_tokens, s.offloaded_tokens) == (len(p) + new - 1, len(p) + new - 1 - sink - window)
    cache.reset()  # the same cache then serves an unpadded batch on one batched engine
    same = torch.stack([prompts[0][:60], prompts[1][:60]])
    out = model.generate(same, **cache_kwargs(model, cache), **kw)
    assert torch.equal(out, model.generate(same, **kw))
    assert all(len(layer) == 1 for layer in cache.sequence_stats)


def test_left_padded_batch_continues_each_conversation_as_alone():
    """A padded batch's next turn (every sequence's ids so far, then its new tokens) runs on each sequence's
    own engine: each answer is the one its conversation gets alone."""
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, 128, (n,), generator=gen) for n in (120, 75)]
    ids, mask = left_padded(prompts)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=4, window_tokens=16, top_k=1000, index="flat"))
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), **kw)
    turn = torch.randint(1, 128, (2, 30), generator=gen)
    more = torch.cat([out, turn], dim=1)
    out2 = model.generate(more, attention_mask=torch.cat([mask, torch.ones_like(more[:, ids.shape[1]:])], dim=1),
                          **cache_kwargs(model, cache), **kw)
    for i, p in enumerate(prompts):
        alone = torch.cat([p, more[i, ids.shape[1]:]])[None]
        assert torch.equal(out2[i, more.shape[1]:], model.generate(alone, **kw)[0, alone.shape[1]:]), f"sequence {i}"


def test_left_padding_is_read_once_per_forward_pass(device, monkeypatch):
    """The mask transformers builds once per forward pass is read once, not once per layer."""
    import retrieval_attn.hf.cache as cache_module

    model = _tiny(LlamaForCausalLM, LlamaConfig, num_hidden_layers=3).to(device)
    prompts = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (40, 25)]
    ids, mask = (x.to(device) for x in left_padded(prompts))
    reads = []
    original = cache_module.left_padding
    monkeypatch.setattr(cache_module, "left_padding", lambda *args: reads.append(args[1:]) or original(*args))
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=4, window_tokens=8, top_k=1000, index="flat"))
    model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                   **cache_kwargs(model, cache))
    assert [past for _, past, _ in reads] == [0, 40, 41, 42, 43]  # one per forward pass: prefill, 4 steps


def test_device_map_split_generate_matches(device):
    """accelerate's device_map with the layers split between ``device`` and the CPU: each layer's engine keeps
    its window where its layer runs, and generate() equals plain generate() under the same split."""
    from accelerate import dispatch_model

    model = _tiny(LlamaForCausalLM, LlamaConfig, num_hidden_layers=4)
    first = "cuda:0" if device == "cuda" else "cpu"
    split = {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first,
             "model.layers.1": first, "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu",
             "lm_head": "cpu"}
    model = dispatch_model(model, device_map=split)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(7)).to(device)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    plain = model.generate(ids, **kw)
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=8, window_tokens=16, top_k=1000, index="flat"))
    assert torch.equal(model.generate(ids, **cache_kwargs(model, cache), **kw), plain)
    where = [layer.engine.window.k.device.type for layer in cache.layers]
    assert where == [torch.device(device).type] * 2 + ["cpu"] * 2
    assert all(s.offloaded_tokens == 200 + 15 - 24 for s in cache.stats)


@pytest.mark.parametrize("switch", ["config", "set_attn_implementation"])
def test_switching_the_attention_implementation_behind_the_cache_is_one_clear_error(switch):
    """After the model's attention implementation is switched to sdpa behind a RetrievalCache, generating again
    with that cache fails at once with an error naming RetrievalCache and the implementation it needs (it
    was a size mismatch deep inside the model), and changes nothing: switched back, the conversation goes on."""
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(9))
    cfg = RetrievalConfig(sink_tokens=8, window_tokens=16, top_k=1000, index="flat")
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    cache = RetrievalCache(model, cfg)
    first = model.generate(ids, **cache_kwargs(model, cache), **kw)
    held = [layer.engine.seen for layer in cache.layers]
    if switch == "config":
        model.config._attn_implementation = "sdpa"
    else:
        model.set_attn_implementation("sdpa")
    more = torch.cat([first, ids[:, :20]], dim=1)
    with pytest.raises(ValueError, match=r"RetrievalCache needs the model's attention implementation "
                                         r"'retrieval_attn', but it was switched to 'sdpa'"):
        model.generate(more, **cache_kwargs(model, cache), **kw)
    assert [layer.engine.seen for layer in cache.layers] == held
    model.set_attn_implementation("retrieval_attn")
    out = model.generate(more, **cache_kwargs(model, cache), **kw)
    plain = RetrievalCache(model, cfg)
    assert torch.equal(out, model.generate(more, **cache_kwargs(model, plain), **kw))  # top_k covers every key


def test_cache_syncs_the_device_at_most_once_per_layer_and_step(device, monkeypatch):
    """Decode steps through a RetrievalCache sync the device at most once per layer more than the same steps
    through transformers' DynamicCache (whose forward passes may sync on their own); on the CPU the counter
    counts the reads of tensor values that would sync a GPU (conftest.count_device_syncs)."""
    from transformers import DynamicCache

    model = _tiny(LlamaForCausalLM, LlamaConfig, num_hidden_layers=3).to(device)
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(8)).to(device)
    counts = {}
    for name, cache in (("dynamic", DynamicCache()),
                        ("retrieval", RetrievalCache(model, RetrievalConfig(sink_tokens=8, window_tokens=16, top_k=20)))):
        with torch.no_grad():
            token = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)  # [1, 1], stays on the device
            for _ in range(3):  # warm-up: the first step builds the indexes
                token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
            with count_device_syncs(monkeypatch) as syncs:
                for _ in range(5):
                    token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
        counts[name] = syncs
    # on the CPU the counter also sees the one host-side read of the left padding per forward pass
    host_reads = 0 if torch.cuda.is_available() else 5
    assert len(counts["retrieval"]) <= len(counts["dynamic"]) + 3 * 5 + host_reads, counts


def test_planner_refuses_before_any_work_on_the_device(device):
    """A request over the device budget (or the host's memory) is refused at construction, before any
    buffer is made or any token runs, on every device."""
    from retrieval_attn.planner import MemoryBudgetError

    model = _tiny(LlamaForCausalLM, LlamaConfig).to(device)
    with pytest.raises(MemoryBudgetError, match=r"device budget needs \d+ bytes .* but 1073741 bytes"):
        RetrievalCache(model, RetrievalConfig(gpu_memory_gib=0.001), max_context=4096)
    with pytest.raises(MemoryBudgetError, match=r"memory.* needs \d+ bytes .* but \d+ bytes"):
        RetrievalCache(model, RetrievalConfig(index="flat"), max_context=1 << 30)  # host (and device) memory
    cache = RetrievalCache(model, RetrievalConfig(), max_context=4096)
    assert all(layer.engine.seen == 0 and layer.engine.store is None for layer in cache.layers)


@pytest.mark.slow
def test_smollm_left_padded_batch_decodes_each_prompt_as_alone(smollm, passkey_ids):
    model, _ = smollm
    prompts = [passkey_ids[0, :240], passkey_ids[0, 1000:1150]]
    ids, mask = left_padded(prompts)
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=16, window_tokens=32, top_k=1000, index="flat"))
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), **kw)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, ids.shape[1] :], model.generate(p[None], **kw)[0, len(p) :]), f"sequence {i}"
        assert cache.sequence_stats[0][i].offloaded_tokens == len(p) + 7 - 48


@pytest.mark.parametrize(
    "holes",
    [
        [(0, slice(15, 20))],  # right padding
        [(1, slice(7, 9))],  # a hole between real tokens
        [(0, slice(0, 3)), (1, slice(10, 11))],  # left padding in one sequence, a hole in the other
    ],
)
def test_right_padding_and_holes_are_clear_errors(holes):
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    ids = torch.randint(1, 128, (2, 20))
    mask = torch.ones_like(ids)
    for row, cols in holes:
        mask[row, cols] = 0
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=2, window_tokens=4))
    with pytest.raises(ValueError, match=r"attention_mask of sequence \d is not left padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, **cache_kwargs(model, cache))


def test_left_padding_reads_bool_and_float_masks():
    from retrieval_attn.hf import left_padding

    cols, rows = torch.arange(7), torch.arange(3) + 4  # 4 cached tokens, 3 new ones
    pads = torch.tensor([0, 2, 6])
    visible = (cols >= pads[:, None, None]) & (cols <= rows[:, None])  # [B, 3, 7]
    assert torch.equal(left_padding(visible[:, None], 3, 4, 3), pads)
    as_float = torch.zeros(3, 1, 3, 7).masked_fill(~visible[:, None], torch.finfo(torch.float32).min)
    assert torch.equal(left_padding(as_float, 3, 4, 3), pads)
    assert torch.equal(left_padding(None, 2, 0, 5), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expected a 4D mask \(batch=3, heads, 3, 7\)"):
        left_padding(visible, 3, 4, 3)
    visible[1, 2, 5] = False
    with pytest.raises(ValueError, match="attention_mask of sequence 1 is not left padding"):
        left_padding(visible[:, None], 3, 4, 3)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)).eval()
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'"):
        RetrievalCache(gpt2, RetrievalConfig())


def test_capture_qk_returns_post_rope_queries_and_keys():
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    ids = torch.randint(0, 128, (1, 50))
    with capture_qk(model, layers=[1]) as captured:
        model(ids)
    q, k = captured[1]
    assert q.shape == (1, 4, 50, 16) and k.shape == (1, 2, 50, 16)
    with pytest.raises(ValueError, match=r"layers must be in \[0, 1\]"):
        with capture_qk(model, layers=[2]):
            pass


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_model(bogus)
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(tmp_path)


def test_signature_drift_is_tolerated():
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=2, window_tokens=4))
    k = torch.randn(1, 2, 5, 16)
    assert cache.get_mask_sizes(3, 0) == (3, 0)
    assert cache.get_mask_sizes(torch.arange(0, 3), 0) == (3, 0)  # mask size from a cache_position tensor
    # older callers pass cache_kwargs positionally or by name
    assert cache.update(k, k, 0, {"cache_position": torch.arange(5)})[0] is k
    assert cache.update(k, k, 1, cache_kwargs={"sin": None})[0] is k
    assert cache.get_seq_length() == 5
    assert cache.layers[0].get_mask_sizes(3) == (8, 0)
    assert cache.layers[0].get_mask_sizes(torch.arange(5, 8)) == (8, 0)


def test_last_prefill_chunk_builds_indexes_in_the_background_with_the_same_tokens(device):
    """Chunked prefill whose last chunk starts every layer's index build gives the tokens of build-at-decode."""
    model = _tiny(LlamaForCausalLM, LlamaConfig).to(device)
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(2)).to(device)
    cfg = RetrievalConfig(sink_tokens=16, window_tokens=32, top_k=40, index="roar", serve_while_building=False)
    tokens = {}
    for background in (False, True):
        cache = RetrievalCache(model, cfg, max_context=430)
        with torch.no_grad():
            model(ids[:, :200], **cache_kwargs(model, cache))
            with cache.last_prefill_chunk() if background else contextlib.nullcontext():
                logits = model(ids[:, 200:], **cache_kwargs(model, cache)).logits
            started = [layer.engine.indexing.phase is not Phase.SAMPLING for layer in cache.layers]
            assert started == [background] * 2
            out = []
            for _ in range(30):
                out.append(int(logits[0, -1].argmax()))
                logits = model(torch.tensor([[out[-1]]], device=device), **cache_kwargs(model, cache)).logits
        tokens[background] = out
        assert all(s.index == "roar" and s.index_build_seconds > 0 for s in cache.stats)
    assert tokens[True] == tokens[False]


def test_last_prefill_chunk_starts_the_builds_of_cpu_layers_after_the_forward_pass(device, monkeypatch):
    """A GPU layer starts its build right after its own prefill (overlapping the next layers'); a CPU layer's
    build waits for the end of the block, so it does not take the cores the following layers prefill on."""
    from retrieval_attn.engine import RetrievalAttention

    model = _tiny(LlamaForCausalLM, LlamaConfig).to(device)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(3)).to(device)
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=16, window_tokens=32, index="roar"), max_context=310)
    seen_at_start = []
    start = RetrievalAttention.start_index_build
    monkeypatch.setattr(RetrievalAttention, "start_index_build", lambda self: (
        seen_at_start.append([layer.engine.seen for layer in cache.layers]), start(self))[1])
    with torch.no_grad(), cache.last_prefill_chunk():
        model(ids, **cache_kwargs(model, cache))
    assert len(seen_at_start) == 2
    if device == "cpu":  # both after the whole forward pass
        assert seen_at_start == [[300, 300], [300, 300]]
    else:  # layer 0's while layer 1 had not prefilled yet
        assert seen_at_start[0] == [300, 0]
    cache.wait_for_index()


class _InterruptAfter:
    """A generate() streamer that raises KeyboardInterrupt at its n-th put (the prompt is the first)."""

    def __init__(self, n: int):
        self.n = n

    def put(self, value):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt

    def end(self):
        pass


def test_interrupted_generate_leaves_cache_resettable_and_model_usable():
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    ids = torch.randint(0, 128, (2, 120), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    plain = model.generate(ids, **kw)
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=4, window_tokens=16, top_k=1000, index="flat"))
    with pytest.raises(KeyboardInterrupt):  # between two decode steps
        model.generate(ids, streamer=_InterruptAfter(5), **cache_kwargs(model, cache), **kw)
    assert cache.get_seq_length() > ids.shape[1]
    cache.reset()
    assert all(s.offloaded_tokens == 0 and s.cpu_bytes == 0 for s in cache.stats)  # CPU store (pinned on CUDA) dropped
    assert torch.equal(model.generate(ids, **cache_kwargs(model, cache), **kw), plain)

    # inside a forward pass: layer 1's cache update ran, its attention did not
    cache.reset()
    layer = cache.layers[1]
    update = layer.update

    def update_then_interrupt(*args, **kwargs):
        update(*args, **kwargs)
        raise KeyboardInterrupt

    layer.update = update_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        model.generate(ids, **cache_kwargs(model, cache), **kw)
    layer.update = update
    with pytest.raises(ValueError, match=r"layer 1 holds 0 tokens but the cache counts .* call cache.reset\(\)"):
        model(ids[:, :1], **cache_kwargs(model, cache))
    cache.reset()
    assert torch.equal(model.generate(ids, **cache_kwargs(model, cache), **kw), plain)
    fresh = RetrievalCache(model, RetrievalConfig(sink_tokens=4, window_tokens=16, top_k=1000, index="flat"))
    assert torch.equal(model.generate(ids, **cache_kwargs(model, fresh), **kw), plain)


@pytest.mark.parametrize("n, chunk", [(10, 4), (9, 4), (4, 4), (1, 4), (2049, 512)])
def test_prefill_spans_cover_the_prompt_without_a_one_token_last_forward(n, chunk):
    from retrieval_attn.hf import prefill_spans

    spans = list(prefill_spans(n, chunk))
    assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(j - i <= chunk + 1 for i, j in spans) and (n == 1 or spans[-1][1] - spans[-1][0] > 1)


@pytest.mark.parametrize("new_length", [10, 45 - 2, 45 - 1])
def test_a_used_cache_refuses_a_new_prompt_naming_reset(new_length):
    """A second generate() from an unrelated prompt on a used cache: a clear error naming reset(), before
    any layer runs; after reset() the same call works. (A prompt that extends what the cache holds is
    continuation, not tested here.) transformers before 5.24 fails in generate() itself first."""
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 128, (1, 40), generator=gen)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=4, window_tokens=8, top_k=1000, index="flat"))
    model.generate(ids, **cache_kwargs(model, cache), **kw)
    held = cache.get_seq_length()
    assert held == 44
    other = torch.randint(0, 128, (1, new_length), generator=gen)
    if cache_argument(model) == "cache":
        with pytest.raises(ValueError, match=r"holds 44 tokens .* does not extend what the cache holds; .* "
                                             r"call cache\.reset\(\)"):
            model.generate(other, **cache_kwargs(model, cache), **kw)
    else:  # before transformers 5.24, generate() fails on its own (IndexError) before calling the model
        with pytest.raises(IndexError):
            model.generate(other, **cache_kwargs(model, cache), **kw)
    assert cache.get_seq_length() == held and all(s.offloaded_tokens + s.device_tokens == held for s in cache.stats)
    cache.reset()
    plain = model.generate(other, **kw)
    assert torch.equal(model.generate(other, **cache_kwargs(model, cache), **kw), plain)


@pytest.mark.slow
def test_dequantised_model_is_cached_and_loads_the_same(tmp_path, monkeypatch, smollm):
    """The first load of a GGUF file caches the de-quantised model; the next loads it from there: same
    weights, same tokenizer (ids, chat template), and it is the copy that ``retrieval-attn cache`` lists."""
    from retrieval_attn.hf import cached_copy, embedded_model_path
    from retrieval_attn.model_files import cache_entries, clear_model_cache, inspect_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = embedded_model_path()
    assert not inspect_model(path).cached
    cold_model, cold_tok = load_model(path)
    copy = cached_copy(path, torch.float32)
    assert (copy / "config.json").is_file() and (copy / "model.safetensors").is_file()
    assert inspect_model(path).cached and inspect_model(path).num_layers == 30
    warm_model, warm_tok = load_model(path)
    reference, reference_tok = smollm  # loaded by the session (from the user's cache or the GGUF file)
    for model in (cold_model, warm_model):
        for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(a, b), name
    text = "The grass is green. What is the pass key?"
    messages = [{"role": "user", "content": text}]
    for tok in (cold_tok, warm_tok):
        assert tok(text).input_ids == reference_tok(text).input_ids
        chat = tok.apply_chat_template(messages, tokenize=False)
        assert chat == reference_tok.apply_chat_template(messages, tokenize=False) and "<|im_start|>user" in chat
        assert tok.eos_token_id == reference_tok.eos_token_id
    assert [p.name for p, _ in cache_entries()] == [copy.name]
    assert clear_model_cache() > 100 * 2**20 and cache_entries() == []
