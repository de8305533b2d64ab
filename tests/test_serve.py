"""retrieval_attn.serve: the server started as a subprocess on 127.0.0.1 and a free port, talked to with the
real ``openai`` client (and raw HTTP where a client would hide the status): greedy answers equal
``retrieval-attn generate``'s, streamed or not; a second turn reuses its conversation's cache and its
first token comes sooner than a fresh prefill's; 8 concurrent clients get the answers they get alone;
every bad input gets its 4xx and the server keeps answering; a client that goes away mid-stream frees its
slot; the API key is enforced; SIGINT and SIGTERM stop it cleanly. The pool's choice of conversation and
its eviction under a memory plan that does not fit are tested in process, on stub caches.

Every request has a timeout, every wait a deadline; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import openai
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from retrieval_attn.cli import main
from retrieval_attn.planner import MemoryBudgetError
from retrieval_attn.serve.pool import ConversationPool, PoolFull


ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-23"
TIMEOUT = 60  # seconds: any one request, and the server's start
RETRIEVAL = ["--sink", "16", "--window", "32", "--top-k", "64", "--prefill-chunk", "256"]
DOCUMENT = " ".join(f"Line {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7} marbles." for i in range(160))
QUESTION = "How many marbles are in the blue box of line 8?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class Server:
    """``retrieval-attn serve`` in a subprocess on 127.0.0.1 and a free port, ready when /health answers."""

    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "retrieval_attn", "serve", "--port", str(self.port), *args],
            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env(), cwd=ROOT,
        )
        deadline = time.monotonic() + 2 * TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}: {log.read_text()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"the server did not answer /health in time: {log.read_text()}")

    def request(self, method: str, path: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
        headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def get(self, path: str, key: str | None = KEY) -> tuple[int, dict]:
        return self.request("GET", path, key=key)

    def post(self, path: str, body: object, key: str | None = KEY) -> tuple[int, dict]:
        return self.request("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(), key)

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, timeout=TIMEOUT, max_retries=0)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=TIMEOUT)
            raise AssertionError(f"the server did not stop on signal {sig}: {self.log.read_text()}") from None


def generate_text(model: str | None, prompt: str, max_new_tokens: int, retrieval: list[str]) -> str:
    """What ``retrieval-attn generate`` streams for ``prompt`` (greedy, in the chat template)."""
    args = [sys.executable, "-m", "retrieval_attn", "generate", "--prompt", prompt, "--max-new-tokens",
            str(max_new_tokens), *retrieval, *(["--model", model] if model else [])]
    done = subprocess.run(args, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=4 * TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done.stdout[: done.stdout.index("\nprompt tokens")]


def chat(client: openai.OpenAI, messages: list[dict], max_tokens: int, stream: bool = False, **kw):
    """(text, usage, seconds to the first text) of a greedy chat completion."""
    start = time.perf_counter()
    if not stream:
        r = client.chat.completions.create(model=kw.pop("model", "tiny"), messages=messages, max_tokens=max_tokens,
                                           temperature=0, **kw)
        return r.choices[0].message.content, r.usage, time.perf_counter() - start
    pieces, usage, first = [], None, None
    for chunk in client.chat.completions.create(model=kw.pop("model", "tiny"), messages=messages,
                                                max_tokens=max_tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter() - start
                pieces.append(choice.delta.content)
    return "".join(pieces), usage, first


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama over the embedded SmolLM2's vocabulary (and its chat template), saved as a folder."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         max_position_embeddings=16384,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    s = Server(["--model", str(tiny_folder), "--model-name", "tiny", "--api-key", KEY, "--max-context", "4096",
                "--max-new-tokens", "16", "--max-conversations", "4", "--max-concurrent", "12", *RETRIEVAL],
               tmp_path_factory.mktemp("log") / "server.log")
    yield s
    assert s.stop(signal.SIGTERM) == 0  # SIGTERM: a clean stop, exit code 0
    log = s.log.read_text()
    assert "stopped (SIGTERM)" in log and "Traceback" not in log, log


def test_answers_equal_generate_streamed_or_not(server, tiny_folder):
    prompt = f"{DOCUMENT}\n\n{QUESTION}"
    expected = generate_text(str(tiny_folder), prompt, 12, RETRIEVAL)
    assert len(expected) > 10
    client = server.client()
    messages = [{"role": "user", "content": prompt}]
    text, usage, _ = chat(client, messages, 12)
    assert text == expected
    assert usage.completion_tokens == 12 and usage.prompt_tokens > 1500  # the document is offloaded: 48 on device
    streamed, stream_usage, _ = chat(client, messages, 12, stream=True)
    assert streamed == expected and stream_usage.prompt_tokens == usage.prompt_tokens
    stats = server.get("/v1/stats")[1]
    conversation = next(c for c in stats["conversations"] if c["tokens"] == usage.total_tokens)
    assert conversation["device_tokens"] == 48 and conversation["offloaded_tokens"] == usage.total_tokens - 48
    # a stop string cuts the answer before it, streamed or not, and ends it with finish_reason "stop"
    stop = expected[6:10]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].message.content == expected[: expected.index(stop)] and r.choices[0].finish_reason == "stop"
    assert chat(client, messages, 12, stream=True, stop=stop)[0] == expected[: expected.index(stop)]


def test_completions_stream_equals_whole_answer_and_continues_its_text(server):
    client = server.client()
    prompt = f"{DOCUMENT[:3000]}\nThe blue box"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].text and whole.usage.completion_tokens == 10
    more = client.completions.with_raw_response.create(model="tiny", prompt=prompt + whole.choices[0].text + " and",
                                                       max_tokens=4, temperature=0)
    assert int(more.headers["x-retrieval-attn-reused-tokens"]) == whole.usage.total_tokens
    assert more.parse().usage.prompt_tokens_details.cached_tokens == whole.usage.total_tokens


def test_second_turn_reuses_the_cache_and_answers_sooner_than_a_fresh_prefill(server):
    client = server.client()
    first = [{"role": "user", "content": f"{DOCUMENT}\n\n{QUESTION}"}]  # its prefill is what a reused turn saves
    answer, usage, _ = chat(client, first, 8)
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And in line 30?"}]
    _, reused_usage, reused_ttft = chat(client, second, 4, stream=True)
    assert reused_usage.prompt_tokens_details.cached_tokens == usage.total_tokens  # the first turn and its answer
    assert reused_usage.prompt_tokens - usage.total_tokens < 30  # only the new turn was prefilled
    fresh = [{"role": "system", "content": "Answer briefly."}, *second]  # no kept cache holds its beginning
    _, fresh_usage, fresh_ttft = chat(client, fresh, 4, stream=True)
    assert fresh_usage.prompt_tokens_details.cached_tokens == 0
    assert abs(fresh_usage.prompt_tokens - reused_usage.prompt_tokens) < 30
    assert reused_ttft < fresh_ttft, (reused_ttft, fresh_ttft)
    stats = server.get("/v1/stats")[1]
    assert any(c["prefill_tokens_saved"] == usage.total_tokens and c["last_request"]["reused_tokens"] > 0
               for c in stats["conversations"])


def test_eight_concurrent_clients_get_the_answers_they_get_alone(server):
    client = server.client()
    prompts = [[{"role": "user", "content": f"{DOCUMENT[: 400 + 90 * i]}\n\nQuestion {i}: {QUESTION}"}]
               for i in range(8)]
    alone = [chat(client, p, 6)[0] for p in prompts]
    assert len(set(alone)) > 1
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda ip: chat(client, ip[1], 6, stream=ip[0] % 2 == 1)[0], enumerate(prompts)))
    assert together == alone
    stats = server.get("/v1/stats")[1]
    assert stats["active_requests"] == 0 and stats["requests"]["failed"] == 0
    assert sum(not c["busy"] for c in stats["conversations"]) <= 4  # --max-conversations


def chat_body(**fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


BAD_REQUESTS = [  # (path, body, status, param, code)
    ("/v1/chat/completions", b"{not json", 400, None, "invalid_json"),
    ("/v1/chat/completions", [1, 2], 400, None, "invalid_json"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", chat_body(messages=[]), 400, "messages", "invalid_value"),
    ("/v1/chat/completions", chat_body(messages="hi"), 400, "messages", "invalid_value"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role",
     "invalid_value"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content",
     "invalid_value"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages[0].content", "invalid_value"),
    ("/v1/chat/completions", chat_body(model="gpt-4o"), 404, "model", "model_not_found"),
    ("/v1/chat/completions", chat_body(model=7), 400, "model", "invalid_value"),
    ("/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", chat_body(max_tokens=-3), 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", chat_body(max_tokens=10**12), 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", chat_body(max_tokens="5"), 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", chat_body(max_tokens=None, max_completion_tokens=1.5), 400, "max_completion_tokens",
     "invalid_value"),
    ("/v1/chat/completions", chat_body(max_tokens=4095), 400, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", chat_body(temperature=3), 400, "temperature", "invalid_value"),
    ("/v1/chat/completions", chat_body(temperature=float("nan")), 400, "temperature", "invalid_value"),
    ("/v1/chat/completions", chat_body(top_p=0), 400, "top_p", "invalid_value"),
    ("/v1/chat/completions", chat_body(seed=-1), 400, "seed", "invalid_value"),
    ("/v1/chat/completions", chat_body(n=2), 400, "n", "unsupported_value"),
    ("/v1/chat/completions", chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
    ("/v1/chat/completions", chat_body(stream="yes"), 400, "stream", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": [10**9]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * 5000}, 400, "prompt", "context_length_exceeded"),
    ("/v1/nothing-here", chat_body(), 404, None, "not_found"),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD_REQUESTS)
def test_every_bad_input_gets_its_4xx_and_the_server_keeps_serving(server, path, body, status, param, code):
    got, answer = server.post(path, body)
    assert got == status, answer
    error = answer["error"]
    assert error["param"] == param and error["code"] == code and error["type"] == "invalid_request_error"
    assert error["message"] and "Traceback" not in error["message"]
    assert server.get("/health", key=None)[0] == 200


def test_wrong_method_and_the_real_client_see_openai_errors(server):
    assert server.get("/v1/chat/completions")[0] == 405
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        server.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert server.get("/v1/models")[1]["data"][0]["id"] == "tiny"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)  # a body too large: unread
    connection.putrequest("POST", "/v1/chat/completions")
    for name, value in (("authorization", f"Bearer {KEY}"), ("content-type", "application/json"),
                        ("content-length", str(1 << 30))):
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()


def test_the_readme_server_example_runs(server, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "OpenAI(base_url" in b)
    block = block.replace("http://127.0.0.1:8000", server.url).replace('"unused"', repr(KEY))
    (tmp_path / "book.txt").write_text(DOCUMENT[:2000])
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(block.replace("SmolLM2-135M-Instruct", "tiny").replace("max_tokens=64", "max_tokens=8"), namespace)
    assert namespace["answer"].usage.completion_tokens == 8


def test_api_key_is_enforced(server):
    for key in (None, "wrong"):
        status, answer = server.get("/v1/models", key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert server.post("/v1/chat/completions", chat_body(), key=key)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    assert server.get("/health", key=None)[0] == 200  # health needs no key


def test_a_client_gone_mid_stream_frees_its_slot(server):
    body = json.dumps(chat_body(messages=[{"role": "user", "content": "Tell me everything."}], max_tokens=3000,
                                temperature=0, stream=True))
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    connection.request("POST", "/v1/chat/completions", body, {"authorization": f"Bearer {KEY}",
                                                              "content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    events = 0
    while events < 4:
        events += response.readline().startswith(b"data: ")
    connection.close()  # the client goes away after a few tokens
    deadline = time.monotonic() + TIMEOUT
    while server.get("/v1/stats")[1]["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = server.get("/v1/stats")[1]
    assert stats["active_requests"] == 0 and stats["requests"]["cancelled"] >= 1
    gone = [c for c in stats["conversations"] if c["last_request"].get("finish_reason") == "cancelled"]
    assert gone and all(c["last_request"]["answer_tokens"] < 2000 for c in gone)  # it stopped early
    assert chat(server.client(), [{"role": "user", "content": "hi"}], 3)[2] is not None  # the slot serves again


def test_ctrl_c_stops_the_server_cleanly_mid_stream(tiny_folder, tmp_path):
    """SIGINT while a long answer streams: the job is cancelled, the server exits with 130 (SIGTERM, with 0:
    the module server's teardown)."""
    s = Server(["--model", str(tiny_folder), "--model-name", "tiny", "--max-context", "8192", *RETRIEVAL],
               tmp_path / "server.log")
    try:
        stream = s.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go on."}],
                                                    max_tokens=8000, temperature=0, stream=True)
        next(iter(stream))
        started = time.monotonic()
        assert s.stop(signal.SIGINT) == 130
        assert time.monotonic() - started < 20
    finally:
        s.stop(signal.SIGKILL)
    log = s.log.read_text()
    assert "Traceback" not in log and "stopped (Ctrl-C)" in log


def test_serve_refuses_mistakes_in_one_line(tiny_folder, capsys):
    """Flags are checked before the model loads; a --max-context whose plan does not fit, right after."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        for args, message in [
            (["--port", "70000"], "--port must be in [1, 65535]"),
            (["--port", str(taken.getsockname()[1])], "cannot listen there"),
            (["--max-new-tokens", "9000"], "--max-new-tokens must be < --max-context (8192)"),
            (["--api-key", " "], "--api-key (or $RETRIEVAL_ATTN_API_KEY) is empty"),
            (["--max-context", str(2**40), "--model", str(tiny_folder)],
             f"--max-context {2**40}: one conversation does not fit"),
        ]:
            assert main(["serve", "--port", str(free_port()), *args]) == 2
            last = capsys.readouterr().err.strip().splitlines()[-1]
            assert last.startswith("retrieval-attn serve: error: ") and message in last, last
    finally:
        taken.close()


class StubCache:
    """What the pool reads of a cache: its plan (none) and its per-layer stats (none)."""

    memory_plan = None
    stats = ()

    def __init__(self):
        self.reset_calls = 0

    def reset(self):
        self.reset_calls += 1


def test_pool_continues_the_longest_prefix_and_drops_least_recent_for_memory():
    fits = {"room": 2}  # caches the "host" can still take
    made = []

    def new_cache(prompt_tokens):
        if sum(c.reset_calls == 0 for c in made) >= fits["room"]:
            raise MemoryBudgetError("a context of 100 tokens (batch 1) does not fit: host memory needs ...")
        made.append(StubCache())
        return made[-1]

    pool = ConversationPool(new_cache, max_kept=8)
    a = pool.open("chat", 3)
    a.tokens, a.text = [1, 2, 3], "abc"
    pool.give_back(a, keep=True)
    b = pool.open("chat", 5)
    b.tokens, b.text = [1, 2, 3, 4, 5], "abcde"
    pool.give_back(b, keep=True)
    assert pool.find("chat", "abcdefg", [9], lambda text: [ord(c) for c in text]) == (b, [ord("f"), ord("g")])
    assert pool.find("chat", None, [1, 2, 3, 7], list) == (a, [7])  # by token ids
    assert pool.find("completion", "abcdefg", [1, 2, 3, 7], list) == (None, [1, 2, 3, 7])  # another kind
    assert pool.find("chat", "abc", [1, 2, 3], list) == (None, [1, 2, 3])  # nothing new to prefill: a new one
    c = pool.open("chat", 4)  # the plan does not fit beside a and b: a, the least recent, is dropped
    assert pool.conversations == [b, c] and made[0].reset_calls == 1 and pool.dropped == 1
    b.busy = True
    with pytest.raises(PoolFull) as err:  # b is busy, c busy (open): nothing to drop
        pool.open("chat", 4)
    assert err.value.busy == 2 and "does not fit" in str(err.value)
    pool.give_back(c, keep=False)  # a failed request's conversation is dropped
    assert pool.conversations == [b]


@pytest.mark.slow
def test_embedded_model_answers_like_generate_and_continues_its_text_sooner(tmp_path):
    """The embedded SmolLM2 on a pass-key document as plain text (the README's main command, shortened): the
    server's greedy completion is ``generate --no-chat-template``'s, and a request that continues the text
    reuses the kept cache (only its new tokens prefilled) and gets its first token sooner."""
    text = resources.files("retrieval_attn").joinpath("data", "passkey.txt").read_text()
    document = text[:4500] + "\nWhat is the pass key? The pass key is"  # ~1,200 tokens
    flags = ["--sink", "64", "--window", "128", "--top-k", "100"]
    path = tmp_path / "document.txt"
    path.write_text(document)
    done = subprocess.run([sys.executable, "-m", "retrieval_attn", "generate", "--prompt-file", str(path),
                           "--no-chat-template", "--max-new-tokens", "6", *flags], capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=4 * TIMEOUT)
    assert done.returncode == 0, done.stderr
    expected = done.stdout[: done.stdout.index("\nprompt tokens")]
    assert expected.strip()
    s = Server(["--max-context", "2048", *flags], tmp_path / "server.log")
    try:
        client = s.client("any")  # no --api-key: any key is accepted
        name = client.models.list().data[0].id
        start = time.perf_counter()
        first = client.completions.create(model=name, prompt=document, max_tokens=6, temperature=0)
        fresh_seconds = time.perf_counter() - start
        assert first.choices[0].text == expected
        follow = f"{document}{expected} Repeat the pass key:"
        start, ttft = time.perf_counter(), None
        for chunk in client.completions.create(model=name, prompt=follow, max_tokens=6, temperature=0, stream=True,
                                               stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].text and ttft is None:
                ttft = time.perf_counter() - start
            usage = chunk.usage or None
        assert usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens
        assert ttft < fresh_seconds / 3, (ttft, fresh_seconds)
    finally:
        assert s.stop() == 0


def test_a_request_beyond_the_memory_plan_gets_400_alone_and_503_beside_busy_conversations(tiny_folder):
    """The planner refuses a new conversation's cache: with nothing to drop it is the request's own size (400),
    while other requests hold conversations it is load (503); nothing ran on the model either way."""
    from retrieval_attn import RetrievalConfig
    from retrieval_attn.hf import load_model
    from retrieval_attn.serve import APIError, ServeSettings, Service
    from retrieval_attn.serve.protocol import parse_chat

    model, tokenizer = load_model(tiny_folder)
    service = Service(model, tokenizer, RetrievalConfig(sink_tokens=16, window_tokens=32),
                      ServeSettings(model_name="tiny", max_context=1024))

    def refuse(prompt_tokens):
        raise MemoryBudgetError("a context of 1024 tokens (batch 1) does not fit: host memory needs ...")

    service.pool.new_cache = refuse
    request = parse_chat(chat_body(), 1024)
    with pytest.raises(APIError) as err:
        service.admit(request, print, print)
    assert err.value.status == 400 and err.value.code == "context_length_exceeded" and "does not fit" in str(err.value)
    held = service.pool.conversations
    busy = {"busy": True, "kind": "chat", "tokens": [], "text": None, "cache": None, "planned_bytes": 0}
    held.append(type("Busy", (), busy)())  # a conversation a request in flight holds
    with pytest.raises(APIError) as err:
        service.admit(request, print, print)
    assert err.value.status == 503 and err.value.code == "server_overloaded"
    assert service.scheduler.active == 0 and service.counts["refused"] == 2
