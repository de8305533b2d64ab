"""``retrieval-attn serve`` under load: N concurrent clients, each holding a multi-turn conversation over
a long document, through the real ``openai`` client (streamed chat completions, greedy, short answers).

For each schedule (``--schedules``: ``interleave``, one forward pass per request in turn, and ``fifo``,
one request at a time) a server is started on 127.0.0.1 (the embedded model by default) and, for each
client count (``--clients``), every client opens its own conversation on its own document (a slice of
the shipped book, ``--document-tokens`` long; a client-specific first line, so no two share a prefix)
and asks ``--turns`` questions in a row, sending back every answer. Measured per (schedule, clients):
requests/s, time to the first answer token (p50 and p99, split into first turns, which prefill the
document, and later turns, which reuse the kept cache), answer tokens/s, prompt tokens reused, errors
(must be 0). On the first schedule's server, before the client counts (so the server's 20th request
is the soak's), ``--soak-clients`` clients ask turn after turn (a new conversation every
``--soak-turns``) until the server has answered ``--soak-requests`` requests: its resident memory after
20 and after that many requests (from ``/v1/stats``), beside the planned bytes of the conversations it
keeps (``--max-conversations``). The other servers get one warm-up request first.

Prints tables and a final JSON line; writes serve.json into ``--out``.

    python bench/serve.py --clients 1 2 4 8 --document-tokens 1000 --turns 3 --soak-requests 200 \\
        --server-args --sink 64 --window 128 --top-k 100
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval_attn.evaluation import format_columns, write_json  # noqa: E402
from retrieval_attn.evaluation.texts import book_text  # noqa: E402

QUESTIONS = ["Who is in this passage?", "What happens next?", "Say it in one sentence.", "Why?", "Anything else?"]
CHARS_PER_TOKEN = 4  # the book's text in the embedded tokenizer, near enough to size a slice


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``retrieval-attn serve`` in a subprocess on 127.0.0.1, ready when /health answers."""

    def __init__(self, args: list[str], log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "retrieval_attn", "serve", "--port", str(self.port),
                                         *args], stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                                        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited: {log.read_text()}")
            try:
                self.stats(path="/health")
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise SystemExit("the server did not start in 300 s")

    def stats(self, path: str = "/v1/stats") -> dict:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=60)


def _documents(n: int, tokens: int) -> list[str]:
    """n different documents of about ``tokens`` tokens: slices of the book at different places."""
    book, size = book_text(), tokens * CHARS_PER_TOKEN
    step = max(1, (len(book) - size) // max(n, 1))
    return [f"Document {i} for client {i}.\n{book[i * step: i * step + size]}" for i in range(n)]


class Conversation:
    """One client's conversation: its messages so far, sent back whole with each question."""

    def __init__(self, client, model: str, document: str, max_tokens: int):
        self.client, self.model, self.max_tokens = client, model, max_tokens
        self.document, self.messages, self.turn = document, [], 0

    def ask(self) -> dict:
        """One streamed turn: seconds to the first answer token, the whole request, its tokens; or its error."""
        question = QUESTIONS[self.turn % len(QUESTIONS)]
        content = f"{self.document}\n\n{question}" if not self.messages else question
        messages = [*self.messages, {"role": "user", "content": content}]
        start, first, pieces, usage = time.perf_counter(), None, [], None
        try:
            for chunk in self.client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=self.max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}):
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        first = first if first is not None else time.perf_counter() - start
                        pieces.append(choice.delta.content)
        except Exception as err:  # counted: the benchmark's errors must be 0
            return {"error": f"{type(err).__name__}: {err}", "turn": self.turn}
        self.messages = [*messages, {"role": "assistant", "content": "".join(pieces)}]
        self.turn += 1
        return {"turn": self.turn - 1, "ttft": first if first is not None else time.perf_counter() - start,
                "seconds": time.perf_counter() - start, "completion_tokens": usage.completion_tokens,
                "prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.prompt_tokens_details.cached_tokens}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def _level(server: Server, client, model: str, schedule: str, clients: int, args) -> dict:
    """``clients`` conversations at once, ``--turns`` turns each."""
    conversations = [Conversation(client, model, d, args.max_tokens) for d in _documents(clients, args.document_tokens)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(lambda c: [c.ask() for _ in range(args.turns)], conversations) for r in rs]
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    first = [r["ttft"] for r in ok if r["turn"] == 0]
    later = [r["ttft"] for r in ok if r["turn"] > 0]
    return {
        "schedule": schedule, "clients": clients, "requests": len(results), "errors": len(results) - len(ok),
        "error_messages": sorted({r["error"] for r in results if "error" in r})[:3], "wall_seconds": wall,
        "requests_per_second": len(ok) / wall, "tokens_per_second": sum(r["completion_tokens"] for r in ok) / wall,
        "ttft_p50": _percentile([r["ttft"] for r in ok], 50), "ttft_p99": _percentile([r["ttft"] for r in ok], 99),
        "first_turn_ttft_p50": _percentile(first, 50), "first_turn_ttft_p99": _percentile(first, 99),
        "later_turn_ttft_p50": _percentile(later, 50), "later_turn_ttft_p99": _percentile(later, 99),
        "reused_prompt_tokens": sum(r["cached_tokens"] for r in ok),
        "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
    }


def _soak(server: Server, client, model: str, args) -> dict:
    """``--soak-clients`` conversations asking until the server has answered ``--soak-requests`` requests: RSS
    and the kept conversations' planned bytes after 20 requests and at the end."""
    served = lambda: server.stats()["requests"]["completed"]  # noqa: E731
    conversations = [Conversation(client, model, d, args.max_tokens)
                     for d in _documents(args.soak_clients, args.document_tokens)]
    marks, lock, errors = {}, threading.Lock(), []

    def run(c: Conversation) -> None:
        while True:
            with lock:
                done = served()
                if done >= 20 and 20 not in marks:
                    s = server.stats()
                    marks[20] = {"requests": done, "rss_bytes": s["rss_bytes"], "planned_bytes": s["planned_bytes"],
                                 "conversations": len(s["conversations"])}
                if done >= args.soak_requests:
                    return
            r = c.ask()
            if "error" in r:
                errors.append(r["error"])
                return
            if c.turn >= args.soak_turns:  # a long conversation ends; the client starts a new one
                c.messages, c.turn = [], 0
                c.document = f"Again: {c.document}"

    with ThreadPoolExecutor(args.soak_clients) as pool:
        list(pool.map(run, conversations))
    s = server.stats()
    end = {"requests": s["requests"]["completed"], "rss_bytes": s["rss_bytes"], "planned_bytes": s["planned_bytes"],
           "conversations": len(s["conversations"]), "dropped": s["conversations_dropped"]}
    return {"after_20": marks.get(20), "after_all": end, "errors": len(errors), "error_messages": errors[:3],
            "rss_growth_bytes": end["rss_bytes"] - marks[20]["rss_bytes"] if 20 in marks else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file or folder (default: the embedded SmolLM2)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--schedules", nargs="+", default=["interleave", "fifo"], choices=["interleave", "fifo"])
    parser.add_argument("--document-tokens", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=3, help="questions per conversation at each client count")
    parser.add_argument("--max-tokens", type=int, default=8, help="answer tokens per request")
    parser.add_argument("--soak-requests", type=int, default=200, help="requests answered before the last RSS reading")
    parser.add_argument("--soak-clients", type=int, default=4)
    parser.add_argument("--soak-turns", type=int, default=25, help="turns of a soak conversation before a new one")
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--max-conversations", type=int, default=8)
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="more flags for retrieval-attn serve (e.g. --sink 64 --window 128), last")
    parser.add_argument("--out", default="results/serve")
    args = parser.parse_args(argv)
    import openai

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels, soak = [], None
    for i, schedule in enumerate(args.schedules):
        server = Server([*(["--model", args.model] if args.model else []), "--schedule", schedule,
                         "--max-context", str(args.max_context), "--max-conversations", str(args.max_conversations),
                         "--max-concurrent", str(max(args.clients + [args.soak_clients])), *args.server_args],
                        out / f"server-{schedule}.log")
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="bench", timeout=600, max_retries=0)
            model = client.models.list().data[0].id
            base = server.stats()["rss_bytes"]
            if i == 0 and args.soak_requests:  # first, so that its 20th request is the server's 20th
                soak = {"schedule": schedule, "rss_at_start_bytes": base, **_soak(server, client, model, args)}
                print(f"soak: {soak['after_all']['requests']} requests, errors {soak['errors']}", file=sys.stderr,
                      flush=True)
            else:  # warm-up (kernels compiled, thread choices made), not measured
                Conversation(client, model, "Warm up.", args.max_tokens).ask()
            for clients in args.clients:
                levels.append(_level(server, client, model, schedule, clients, args))
                print(f"{schedule} x{clients}: {levels[-1]['requests_per_second']:.2f} req/s, "
                      f"errors {levels[-1]['errors']}", file=sys.stderr, flush=True)
        finally:
            server.stop()

    def secs(x):
        return "-" if x is None else f"{x:.2f}"

    print(format_columns(
        ["schedule", "clients", "requests", "errors", "req/s", "tokens/s", "TTFT p50", "TTFT p99",
         "1st turn p50", "1st turn p99", "later p50", "later p99", "reused / prompt tokens"],
        [(r["schedule"], r["clients"], r["requests"], r["errors"], f"{r['requests_per_second']:.2f}",
          f"{r['tokens_per_second']:.1f}", secs(r["ttft_p50"]), secs(r["ttft_p99"]), secs(r["first_turn_ttft_p50"]),
          secs(r["first_turn_ttft_p99"]), secs(r["later_turn_ttft_p50"]), secs(r["later_turn_ttft_p99"]),
          f"{r['reused_prompt_tokens']} / {r['prompt_tokens']}") for r in levels]))
    if soak is not None:
        mib = 2**20
        rows = [("at start", soak["rss_at_start_bytes"] / mib, None, None)]
        for name in ("after_20", "after_all"):
            m = soak[name]
            if m:
                rows.append((f"after {m['requests']} requests", m["rss_bytes"] / mib, m["planned_bytes"] / mib,
                             m["conversations"]))
        print()
        print(format_columns(["server", "RSS MiB", "kept conversations' planned MiB", "kept conversations"],
                             [(a, f"{b:.0f}", "-" if c is None else f"{c:.0f}", "-" if d is None else d)
                              for a, b, c, d in rows]))
        print(f"soak errors: {soak['errors']}; conversations dropped: {soak['after_all']['dropped']}")
    result = {"settings": {k: v for k, v in vars(args).items()}, "levels": levels, "soak": soak}
    write_json(out / "serve.json", result)
    print(json.dumps({"levels": [{k: r[k] for k in ("schedule", "clients", "requests_per_second", "ttft_p50",
                                                    "ttft_p99", "errors")} for r in levels],
                      "rss_growth_bytes": soak and soak["rss_growth_bytes"]}))
    errors = sum(r["errors"] for r in levels) + (soak["errors"] if soak else 0)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
