"""hf.chat.Chat: turns continue one cache exactly as a DynamicCache does, interruptions keep the session,
templates that rewrite the past and turns beyond max_context are refused; the ``chat`` command answers
two facts of its built-in document in two piped turns."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from retrieval_attn import RetrievalConfig
from retrieval_attn.cli import main
from retrieval_attn.hf import RetrievalCache
from retrieval_attn.hf.chat import Chat, chat_opening

DOCUMENT = " ".join(f"Line {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7} marbles." for i in range(60))
QUESTIONS = ["How many marbles are in the blue box of line 8?", "And in line 30?", "Thanks!"]


@pytest.fixture(scope="module")
def chat_model(tokenizer):
    """A tiny random Llama over the embedded SmolLM2's vocabulary, with its tokenizer (and chat template)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def exact_cache(model):
    return RetrievalCache(model, RetrievalConfig(sink_tokens=16, window_tokens=32, top_k=4096, index="flat"))


def run_chat(model, tokenizer, cache, stop_after=None, **kw):
    """The answers of a Chat over DOCUMENT to QUESTIONS; the second answer ends after ``stop_after`` tokens."""
    chat = Chat(model, tokenizer, cache, DOCUMENT, max_new_tokens=8, **kw)
    answers = []
    for i, question in enumerate(QUESTIONS):
        pieces = []
        interrupted = (lambda: len(pieces) >= stop_after) if i == 1 and stop_after is not None else (lambda: False)
        answers.append(chat.ask(question, on_token=pieces.append, interrupted=interrupted))
        assert "".join(pieces) == answers[-1]
    return chat, answers


@pytest.mark.parametrize("stop_after", [None, 3])
def test_turns_on_a_retrieval_cache_equal_a_dynamic_cache(chat_model, stop_after):
    model, tokenizer = chat_model
    plain, expected = run_chat(model, tokenizer, DynamicCache(), stop_after)
    cache = exact_cache(model)
    chat, answers = run_chat(model, tokenizer, cache, stop_after)
    assert answers == expected and chat.held == plain.held
    assert cache.stats[0].offloaded_tokens == len(chat.held) - 48 > 400  # the document is offloaded
    assert cache.get_seq_length() == len(chat.held)
    assert chat.turns[0].prompt_tokens < 25  # the first turn prefilled only its question and the headers
    assert [t.interrupted for t in chat.turns] == [False, stop_after is not None, False]
    if stop_after is not None:
        assert chat.turns[1].answer_tokens == stop_after  # the session went on after the interrupted answer
    chat.reset()
    assert chat.held == [] and cache.get_seq_length() == 0
    assert chat.ask(QUESTIONS[0]) == expected[0]  # the documents are read again


class _RewritingTemplate:
    """A tokenizer whose chat template renders past answers in upper case (it rewrites the past)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, messages, **kwargs):
        messages = [{**m, "content": m["content"].upper()} if m["role"] == "assistant" else m for m in messages]
        return self._tokenizer.apply_chat_template(messages, **kwargs)


def test_template_that_rewrites_the_past_and_turns_beyond_max_context_are_refused(chat_model):
    model, tokenizer = chat_model
    chat = Chat(model, _RewritingTemplate(tokenizer), exact_cache(model), DOCUMENT, max_new_tokens=8)
    chat.ask(QUESTIONS[0])
    held = list(chat.held)
    with pytest.raises(ValueError, match="renders the earlier turns differently"):
        chat.ask(QUESTIONS[1])
    assert chat.held == held and len(chat.messages) == 2  # nothing was fed, the question was dropped

    opening = len(tokenizer(chat_opening(tokenizer, DOCUMENT), add_special_tokens=False).input_ids)
    chat = Chat(model, tokenizer, exact_cache(model), DOCUMENT, max_context=opening + 20, max_new_tokens=8)
    with pytest.raises(ValueError, match=r"beyond max_context="):
        chat.ask(QUESTIONS[0] * 5)
    chat.ask(QUESTIONS[1])
    assert len(chat.held) <= opening + 20  # the answer stopped at max_context
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        Chat(model, tokenizer, DynamicCache(), max_new_tokens=0)


@pytest.mark.slow
def test_chat_command_answers_two_facts_in_two_piped_turns(tmp_path):
    """Default settings (sink 128, window 512, top_k 100): the facts of the built-in document lie in its
    offloaded middle; each turn's answer names its fact; /stats and /save work."""
    transcript = tmp_path / "transcript.txt"
    turns = f"What is the pass key number?\n/stats\nWhat is the name of the ship?\n/save {transcript}\n"
    result = subprocess.run([sys.executable, "-m", "retrieval_attn.cli", "chat", "--max-new-tokens", "24"],
                            input=turns, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = result.stdout.split("> What is the name of the ship?")
    assert "52718" in first.split("> What is the pass key number?")[1]
    assert "Silver Gull" in second
    assert "tokens on device / offloaded (per layer)" in first and " 640 / " in first
    assert "memory plan for a conversation" in result.stderr and "reading built-in two_facts.txt" in result.stderr
    saved = Path(transcript).read_text()
    assert "> What is the pass key number?" in saved and "Silver Gull" in saved


@pytest.mark.parametrize("argv, message", [
    (["--document", "missing.txt"], "--document: missing.txt does not exist"),
    (["--max-context", "1"], "--max-context must be >= 2, got 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--top-k", "0"], "--top-k must be an int >= 1, got 0"),
])
def test_chat_command_refuses_bad_arguments_in_one_line_before_loading_the_model(argv, message, monkeypatch, capsys):
    import retrieval_attn.hf

    monkeypatch.setattr(retrieval_attn.hf, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["chat", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retrieval-attn chat: error: ") and message in err and err.count("\n") == 1


def test_chat_command_on_a_tiny_model_plans_refuses_and_runs_piped_turns(chat_model, tmp_path, monkeypatch, capsys):
    """The plan for --max-context is shown; a plan over budget and a --max-context the documents fill are one
    line each; piped turns answer, /stats, unknown commands and /save without a file answer in one line."""
    import retrieval_attn.hf

    monkeypatch.setattr(retrieval_attn.hf, "load_model", lambda *a, **k: chat_model)
    document = tmp_path / "doc.txt"
    document.write_text(DOCUMENT)
    assert main(["chat", "--document", str(document), "--max-context", str(2**40)]) == 2  # more than this RAM
    err = capsys.readouterr().err.splitlines()[-1]  # after the loading line
    assert err.startswith("retrieval-attn chat: error: --max-context 1099511627776 exceeds the model's trained context")
    assert main(["chat", "--document", str(document), "--max-context", "100"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("retrieval-attn chat: error: --max-context 100 leaves no room after the documents")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTIONS[0]}\n/stats\n/nope\n/save\n{QUESTIONS[1]}\n"))
    assert main(["chat", "--document", str(document), "--max-context", "2000", "--max-new-tokens", "4",
                 "--sink", "16", "--window", "32"]) == 0
    out, err = capsys.readouterr()
    assert "memory plan for a conversation of up to 2000 tokens (--max-context)" in err
    assert f"> {QUESTIONS[0]}" in out and f"> {QUESTIONS[1]}" in out
    assert re.search(r"tokens on device / offloaded \(per layer\) +48 / \d+", out)
    assert "last turn: tokens prefilled" in out
    assert "unknown command /nope" in out and "usage: /save FILE" in out
