"""Property/fuzz tests (hypothesis): every input either raises a clear error or gives a finite, correct result.

"Clear" means ``ValueError`` (``FileNotFoundError`` for a missing path) whose message names the bad
argument, raised before any state changes; "correct" means equal to ``reference_attention`` (or to
the exact ``flat`` index) within the fp32/bf16 tolerances of tests/test_engine.py. Anything else (a
crash inside torch, numba or faiss, NaN out, a silent clamp) fails the test. Shapes and lengths are
drawn around the boundaries that matter: 0, 1, sink - 1, sink + window +- 1 and far beyond.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from retrieval_attn import RetrievalAttention, RetrievalConfig, merge_state
from retrieval_attn.attention import partial_attention, reference_attention
from retrieval_attn.index import available_indexes, make_index
from retrieval_attn.offload import attend_rows

from .conftest import gathered_reference

FP32_TOL = 1e-5
HALF_TOL = 2e-2  # bf16/fp16 outputs are rounded to 8 or 11 mantissa bits


def fuzz(cases: int) -> settings:
    """Hypothesis settings: ``cases`` examples, no deadline, derandomized (the same cases on every run)."""
    return settings(max_examples=cases, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# an exhaustive setting of each backend for the small key sets drawn here (at most 64 keys per group)
EXACT_PARAMS = {
    "flat": {},
    "auto": {"ef": 64},
    "roar": {"ef": 64},
    "keygraph": {"ef": 64},
    "hnsw": {"ef": 64},
    "ivf": {"nlist": 1, "nprobe": 1},
}
ANY_VALUE = st.one_of(
    st.integers(-5, 300), st.just(10**12), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=3)
)


def expect_clear_error(err: Exception, *names: str) -> None:
    """The error is a ValueError whose message names one of ``names``."""
    assert isinstance(err, ValueError), f"{type(err).__name__}: {err}"
    assert any(name in str(err) for name in names), f"message names none of {names}: {err}"


# ---------------------------------------------------------------------------------------------- config


@fuzz(300)
@given(
    field=st.sampled_from(["sink_tokens", "window_tokens", "top_k", "prefill_block", "cpu_threads", "index"]),
    value=ANY_VALUE,
    index=st.sampled_from(["auto", *available_indexes(), "faiss", ""]),
    params=st.dictionaries(st.sampled_from(["ef", "nq", "M", "nlist", "nprobe", "knn", "bogus"]), ANY_VALUE, max_size=2),
)
def test_config_rejects_or_accepts_consistently(field, value, index, params):
    kwargs = {"index": index, "index_params": params, field: value}
    try:
        config = RetrievalConfig(**kwargs)
    except ValueError as err:
        expect_clear_error(err, f"RetrievalConfig.{field}", "RetrievalConfig.index", "RetrievalConfig.top_k")
        return
    for name in ("sink_tokens", "window_tokens", "top_k", "prefill_block"):
        v = getattr(config, name)
        assert type(v) is int and v >= (0 if name == "sink_tokens" else 1)
    assert config.cpu_threads is None or (type(config.cpu_threads) is int and config.cpu_threads >= 1)
    assert config.index in ("auto", *available_indexes())


# ---------------------------------------------------------------------------------------------- engine


@st.composite
def engine_case(draw):
    """A valid engine setting, its inputs and a prefill/decode split around the sink/window boundaries."""
    sink, window = draw(st.integers(0, 5)), draw(st.integers(1, 5))
    prompt = draw(st.sampled_from(sorted({1, max(1, sink - 1), max(1, sink), sink + window - 1 or 1,
                                          sink + window, sink + window + 1, 40})))
    steps = draw(st.integers(0, 6))
    turn = draw(st.sampled_from([0, 1, 2, sink + window + 1, 13])) if steps else 0  # a prefill after decoding
    return dict(
        batch=draw(st.integers(1, 2)), hkv=draw(st.integers(1, 2)), group=draw(st.integers(1, 3)),
        d=draw(st.sampled_from([1, 4, 16])), sink=sink, window=window, prompt=prompt, steps=steps,
        index=draw(st.sampled_from(sorted(EXACT_PARAMS))), dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        chunks=draw(st.integers(1, 3)), block=draw(st.sampled_from([1, 7, 1024])),
        strided=draw(st.booleans()), seed=draw(st.integers(0, 2**16)), turn=turn, steps2=draw(st.integers(0, 3)),
    )


def make_inputs(c, total):
    """q (B, Hq, total, D), k, v (B, Hkv, total, D); non-contiguous views when ``strided``."""
    g = torch.Generator().manual_seed(c["seed"])
    hq = c["hkv"] * c["group"]
    if c["strided"]:  # (B, T, H, D) memory seen as (B, H, T, D), as transformers hands them over
        q = torch.randn(c["batch"], total, hq, c["d"], generator=g).transpose(1, 2)
        k, v = (torch.randn(c["batch"], total, c["hkv"], c["d"], generator=g).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(c["batch"], hq, total, c["d"], generator=g)
        k, v = (torch.randn(c["batch"], c["hkv"], total, c["d"], generator=g) for _ in range(2))
    return q.to(c["dtype"]), k.to(c["dtype"]), v.to(c["dtype"])


@fuzz(120)
@given(c=engine_case())
def test_engine_equals_full_attention_when_top_k_covers_everything(c):
    """Prefill in chunks, decode, then (``turn``) prefill again and decode: exact at every position."""
    decoded = c["prompt"] + c["steps"]
    turned = decoded + c["turn"]
    total = turned + (c["steps2"] if c["turn"] else 0)
    config = RetrievalConfig(sink_tokens=c["sink"], window_tokens=c["window"], top_k=64, index=c["index"],
                             index_params=EXACT_PARAMS[c["index"]], prefill_block=c["block"])
    engine = RetrievalAttention(config, c["hkv"] * c["group"], c["hkv"], c["d"])
    q, k, v = make_inputs(c, total)
    cuts = np.linspace(0, c["prompt"], c["chunks"] + 1).astype(int)
    outs = [engine.prefill(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]

    def step(t: int) -> torch.Tensor:
        return engine.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])

    outs += [step(t) for t in range(c["prompt"], decoded)]
    if c["turn"]:
        outs.append(engine.prefill(q[:, :, decoded:turned], k[:, :, decoded:turned], v[:, :, decoded:turned]))
    outs += [step(t) for t in range(turned, total)]
    out = torch.cat(outs, dim=2)
    assert out.dtype == c["dtype"] and out.shape == q.shape and bool(torch.isfinite(out).all())
    ref = reference_attention(q.float(), k.float(), v.float(), c["d"] ** -0.5)
    assert (out.double() - ref).abs().max() <= (FP32_TOL if c["dtype"] == torch.float32 else HALF_TOL)
    s = engine.stats
    assert (s.seen_tokens, s.offloaded_tokens) == (total, max(0, total - c["sink"] - c["window"]))


BAD_CALLS = [
    "nan_q", "inf_k", "nan_v", "float64", "int", "mixed_dtype", "batch_mismatch", "heads", "kv_heads", "head_dim",
    "rank", "seq_mismatch", "empty", "decode_two_tokens", "decode_first", "not_tensor", "meta", "dtype_change",
    "batch_change",
]


@fuzz(200)
@given(bad=st.sampled_from(BAD_CALLS), n=st.integers(1, 12), decoding=st.booleans(), turn=st.booleans(),
       seed=st.integers(0, 2**16))
def test_engine_bad_call_is_a_clear_error_and_leaves_no_trace(bad, n, decoding, turn, seed):
    """A bad prefill (or decode, when ``decoding``; or a prefill after decoding, a new turn, when both
    ``decoding`` and ``turn``) call raises ValueError naming the problem and changes nothing."""
    engine = RetrievalAttention(RetrievalConfig(sink_tokens=2, window_tokens=3, top_k=4, index="flat"), 4, 2, 8)
    g = torch.Generator().manual_seed(seed)
    decoding = decoding or bad in ("dtype_change", "batch_change", "decode_two_tokens")
    turn = turn and bad not in ("decode_two_tokens", "decode_first")
    if bad == "decode_first":
        decoding = True
    elif decoding:
        engine.prefill(torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))
        engine.decode(torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    m = 1 if decoding and not turn else n
    q, k, v = torch.randn(1, 4, m, 8, generator=g), torch.randn(1, 2, m, 8, generator=g), torch.randn(1, 2, m, 8, generator=g)
    names = {"q", "k", "v"}
    if bad == "nan_q":
        q[0, 1, -1, 2] = float("nan")
    elif bad == "inf_k":
        k[0, 0, 0, 0] = float("inf")
    elif bad == "nan_v":
        v[0, 1, m // 2, 7] = float("-inf")
    elif bad == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif bad == "int":
        k = k.long()
    elif bad == "mixed_dtype":
        v = v.bfloat16()
    elif bad == "batch_mismatch":
        k, v = k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)
    elif bad == "heads":
        q = torch.randn(1, 6, m, 8)
    elif bad == "kv_heads":
        k, v = torch.randn(1, 1, m, 8), torch.randn(1, 1, m, 8)
    elif bad == "head_dim":
        q = q[..., :5]
    elif bad == "rank":
        q = q[0]
    elif bad == "seq_mismatch":
        v = torch.randn(1, 2, m + 1, 8)
    elif bad == "empty":
        q, k, v = q[:, :, :0], k[:, :, :0], v[:, :, :0]
    elif bad == "decode_two_tokens":
        q, k, v = (t.expand(-1, -1, max(2, n), -1) for t in (q, k, v))
        names = {"seq_len"}
    elif bad == "decode_first":
        names = {"decode called before prefill"}
    elif bad == "not_tensor":
        q = q.numpy()
    elif bad == "meta":
        q, k, v = (t.to("meta") for t in (q, k, v))
        names = {"meta"}
    elif bad == "dtype_change":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        names = {"call reset() first"}
    elif bad == "batch_change":
        q, k, v = (t.expand(3, -1, -1, -1) for t in (q, k, v))
        names = {"batch size changed"}
    call = engine.prefill if not decoding or turn else engine.decode
    before = engine.stats
    with pytest.raises(ValueError) as info:
        call(q, k, v)
    expect_clear_error(info.value, *names)
    assert engine.stats == before  # nothing was stored


# ---------------------------------------------------------------------------------------------- indexes

PARAM_VALUES = st.one_of(st.integers(-3, 80), st.sampled_from([10**13, 2.5, True, "8", None, np.int64(16)]))


@st.composite
def index_case(draw):
    name = draw(st.sampled_from([*available_indexes(), "auto", "FLAT", 3, ["flat"]]))
    declared = sorted(make_index(name).config) if name in available_indexes() else []
    params = draw(st.dictionaries(st.sampled_from([*declared, "bogus"]) if declared else st.just("bogus"),
                                  PARAM_VALUES, max_size=2))
    return dict(
        name=name, params=params, groups=draw(st.integers(1, 3)), n=draw(st.sampled_from([0, 1, 2, 5, 33, 64])),
        dim=draw(st.sampled_from([1, 3, 16])), m=draw(st.integers(0, 4)), added=draw(st.integers(0, 9)),
        k=draw(st.one_of(st.integers(-1, 70), st.sampled_from([2.0, None, True]))),
        train=draw(st.sampled_from([None, 0, 1, 12])), fortran=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


def _search_is_correct(index, keys, queries, k):
    """Search, then check: ids valid and distinct, scores = q . key exactly, exhaustive settings match flat."""
    res = index.search(queries, k)
    g, m = queries.shape[:2]
    assert res.ids.shape == res.scores.shape == (g, m, k) and res.scored.shape == (g, m)
    assert np.isfinite(res.scores).all() and (res.ids >= 0).all() and (res.ids < keys.shape[1]).all()
    for row in res.ids.reshape(-1, k):
        assert len(set(row.tolist())) == k
    exact = np.einsum("gmkd,gmd->gmk", keys[np.arange(g)[:, None, None], res.ids], queries)
    np.testing.assert_allclose(res.scores, exact, rtol=1e-4, atol=1e-4)
    return res


@fuzz(400)
@given(c=index_case())
def test_index_build_add_search_never_crash_and_are_correct(c):
    rng = np.random.default_rng(c["seed"])
    keys = rng.standard_normal((c["groups"], c["n"] + c["added"], c["dim"])).astype(np.float32)
    queries = rng.standard_normal((c["groups"], c["m"], c["dim"])).astype(np.float32)
    train = None if c["train"] is None else rng.standard_normal((c["groups"], c["train"], c["dim"])).astype(np.float32)
    base = keys[:, : c["n"]]
    if c["fortran"]:
        base = np.asfortranarray(base)
    try:
        index = make_index(c["name"], **c["params"])
        index.build(base, train)
        index.add(keys[:, c["n"] :])
        res = _search_is_correct(index, keys, queries, c["k"])
    except ValueError as err:
        expect_clear_error(err, "index", "parameter", "k must be", "nlist", "nprobe", "ef", "train_queries", "keys")
        return
    # what succeeded is exact wherever the setting is exhaustive
    if c["name"] == "flat" or (c["name"] == "ivf" and index.config["nprobe"] == index.config["nlist"]):
        truth = np.sort(np.einsum("gmd,gnd->gmn", queries, keys), axis=2)[:, :, ::-1][:, :, : c["k"]]
        np.testing.assert_allclose(res.scores, truth, rtol=1e-4, atol=1e-4)


@fuzz(100)
@given(
    name=st.sampled_from(available_indexes()),
    bad=st.sampled_from(["float64", "nan", "inf", "rank2", "list", "groups", "dim", "zero_dim", "zero_groups"]),
    where=st.sampled_from(["build", "train", "add", "search"]),
)
def test_index_bad_arrays_are_clear_errors(name, bad, where):
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 20, 4)).astype(np.float32)
    train = rng.standard_normal((2, 6, 4)).astype(np.float32)
    params = {"nlist": 2, "nprobe": 2} if name == "ivf" else {}
    x = {"build": keys, "train": train, "add": keys[:, :3].copy(), "search": train[:, :2].copy()}[where]
    x = {
        "float64": lambda a: a.astype(np.float64), "nan": lambda a: np.where(a > 1, np.nan, a).astype(np.float32),
        "inf": lambda a: np.full_like(a, np.inf), "rank2": lambda a: a[0], "list": lambda a: a.tolist(),
        "groups": lambda a: np.concatenate([a, a]), "dim": lambda a: a[..., :3].copy(),
        "zero_dim": lambda a: a[..., :0], "zero_groups": lambda a: a[:0],
    }[bad](x)
    index = make_index(name, **params)
    with pytest.raises(ValueError) as info:
        if where in ("build", "train"):
            index.build(x if where == "build" else keys, x if where == "train" else train)
        index.build(keys, train)
        if where == "add":
            index.add(x)
        index.search(x, 2)
    expect_clear_error(info.value, "keys", "train_queries", "queries")


# ---------------------------------------------------------------------------------------------- attention math


@fuzz(200)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), d=st.integers(1, 8),
    magnitude=st.sampled_from([1.0, 1e4, 1e30]), empty=st.sampled_from(["none", "a", "b", "both"]),
    poison=st.sampled_from([None, "o_a nan", "o_b inf", "lse_a nan", "lse_b +inf"]), seed=st.integers(0, 2**16),
)
def test_merge_state_is_exact_or_refuses(shape, d, magnitude, empty, poison, seed):
    g = torch.Generator().manual_seed(seed)
    o_a, o_b = torch.randn(*shape, d, generator=g), torch.randn(*shape, d, generator=g)
    lse_a, lse_b = torch.randn(*shape, generator=g) * magnitude, torch.randn(*shape, generator=g) * magnitude
    if empty in ("a", "both"):
        lse_a, o_a = torch.full_like(lse_a, float("-inf")), torch.zeros_like(o_a)
    if empty in ("b", "both"):
        lse_b, o_b = torch.full_like(lse_b, float("-inf")), torch.zeros_like(o_b)
    if poison:
        name, value = poison.split()
        target = {"o_a": o_a, "o_b": o_b, "lse_a": lse_a, "lse_b": lse_b}[name]
        target.view(-1)[0] = float(value)
        with pytest.raises(ValueError) as info:
            merge_state(o_a, lse_a, o_b, lse_b)
        expect_clear_error(info.value, name)
        return
    o, lse = merge_state(o_a, lse_a, o_b, lse_b)
    assert bool(torch.isfinite(o).all()) and not bool(torch.isnan(lse).any())
    w = torch.softmax(torch.stack([lse_a, lse_b]).double(), dim=0).nan_to_num(0.0)  # both empty: 0 and 0
    expected = w[0, ..., None] * o_a.double() + w[1, ..., None] * o_b.double()
    assert (o.double() - expected).abs().max() <= 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_a) & torch.isinf(lse_b))


@fuzz(200)
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 3), group=st.integers(1, 3), n=st.integers(1, 5), t=st.integers(0, 9),
    d=st.integers(1, 8), causal=st.booleans(), scale=st.sampled_from([0.1, 1.0, 50.0]),
    bad=st.sampled_from([None, "heads", "batch", "dim", "nan", "inf", "rank"]), seed=st.integers(0, 2**16),
)
def test_partial_attention_is_exact_or_refuses(b, hkv, group, n, t, d, causal, scale, bad, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * group, n, d, generator=g)
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    if bad == "heads" and hkv > 1 and group == 1:
        q = q[:, :-1]
    elif bad == "batch":
        k, v = torch.cat([k, k]), torch.cat([v, v])
    elif bad == "dim":
        q = torch.cat([q, q], dim=-1)
    elif bad == "nan" and t:
        k[..., 0, 0] = float("nan")
    elif bad == "inf" and t:  # (without keys a query's values do not matter: the empty result is correct)
        q[0, 0, 0, 0] = float("inf")
    elif bad == "rank":
        q = q[0]
    else:
        bad = None
    if bad:
        with pytest.raises(ValueError) as info:
            partial_attention(q, k, v, scale, causal)
        expect_clear_error(info.value, "partial_attention")
        return
    assume(not causal or t >= n)  # causal: the queries are the last n of the t keys
    out, lse = partial_attention(q, k, v, scale, causal)
    assert bool(torch.isfinite(out).all()) and not bool(torch.isnan(lse).any())
    if t == 0:
        assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
        return
    ref = reference_attention(q, k, v, scale, causal=causal)
    assert (out.double() - ref).abs().max() <= 1e-4


@fuzz(150)
@given(
    groups=st.integers(1, 3), m=st.integers(1, 3), kk=st.integers(0, 6), n=st.integers(1, 8), d=st.integers(1, 6),
    spread=st.sampled_from([1.0, 100.0]), seed=st.integers(0, 2**16),
)
def test_attend_rows_is_exact(groups, m, kk, n, d, spread, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(groups, n, d, generator=g)
    ids = torch.randint(0, n, (groups, m, kk), generator=g)
    scores = torch.randn(groups, m, kk, generator=g) * spread  # wide logits need the max shift
    out, lse = np.empty((groups, m, d), np.float32), np.empty((groups, m), np.float32)
    attend_rows(scores.numpy(), ids.numpy(), values.numpy(), 0.5, out, lse)
    assert np.isfinite(out).all()
    if kk == 0:
        assert (out == 0).all() and np.isneginf(lse).all()
        return
    ref_out, ref_lse = gathered_reference(scores, ids, values, 0.5)
    assert np.abs(out - ref_out.numpy()).max() <= 1e-5 and np.abs(lse - ref_lse.numpy()).max() <= 1e-3


# ---------------------------------------------------------------------------------------------- model paths


@fuzz(40)
@given(
    kind=st.sampled_from(["missing", "empty", "random", "gguf_magic", "gguf_v3", "folder_bare", "bad_json",
                          "gpt2", "no_type", "int", "bad_dtype", "bad_device"]),
    payload=st.binary(max_size=64),
)
def test_load_model_bad_paths_are_clear_errors(tmp_path_factory, kind, payload):
    from retrieval_attn.hf import load_model

    root = tmp_path_factory.mktemp("model")
    path, kwargs = root / "model.gguf", {}
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(b"XGUF" + payload)
    elif kind == "gguf_magic":
        path.write_bytes(b"GGUF" + payload)
    elif kind == "gguf_v3":
        path.write_bytes(b"GGUF\x03\x00\x00\x00" + payload)
    elif kind == "folder_bare":
        path = root
    elif kind in ("bad_json", "gpt2", "no_type"):
        path = root
        text = {"bad_json": "{" + payload.hex(), "gpt2": json.dumps({"model_type": "gpt2"}), "no_type": "{}"}[kind]
        (root / "config.json").write_text(text)
    elif kind == "int":
        path = len(payload)
    elif kind == "bad_dtype":
        kwargs = {"dtype": "float32"}
    elif kind == "bad_device":
        kwargs = {"device": "gpu-" + payload.hex()}
    if kind == "missing":
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_model(path)
        return
    with pytest.raises(ValueError) as info:
        load_model(path, **kwargs)
    expect_clear_error(info.value, "model", "path", "dtype", "device", "architecture")
