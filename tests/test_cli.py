"""The ``retrieval-attn`` command as a user meets it: a mistake is one line on stderr and exit code 2, with
no traceback and (for the mistakes that can be seen without it) no model loaded first; Ctrl-C prints
what ran and exits with 130; ``--version``, ``python -m retrieval_attn``, defaults in every ``--help``.

The mistakes of issue 14 run the real command in a subprocess; their kin run ``cli.main`` in this
process, which reports them the same way.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from retrieval_attn import cli
from retrieval_attn.model_files import embedded_model_path

from .conftest import PASSKEY


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m retrieval_attn ARGS`` in a subprocess, the way a user runs it."""
    return subprocess.run([sys.executable, "-m", "retrieval_attn", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_mistake(result: subprocess.CompletedProcess | tuple[int, str], expect: str) -> None:
    """Exit code 2, one line on stderr naming ``expect``, no traceback, no model loaded first."""
    code, err = (result.returncode, result.stderr) if isinstance(result, subprocess.CompletedProcess) else result
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert expect in err, err
    assert "loading" not in err, err  # refused before the model loads


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files a user may pass by mistake: not GGUF, a truncated GGUF, an empty folder, a binary prompt."""
    root = tmp_path_factory.mktemp("mistakes")
    (root / "notes.gguf").write_text("not a model\n")
    (root / "truncated.gguf").write_bytes(embedded_model_path().read_bytes()[:20])  # "GGUF" and half a header
    (root / "empty").mkdir()
    (root / "image.bin").write_bytes(bytes(range(256)) * 4)
    (root / "a-file").write_text("x")
    (root / "blank.txt").write_text("  \n\n")
    (root / "config-only").mkdir()
    (root / "config-only" / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    return root


ISSUE_MISTAKES = [  # (arguments, what the one line must name); {root}: the bad_inputs folder
    (["generate", "--model", "{root}/missing.gguf"], "does not exist"),
    (["generate", "--model", "{root}/notes.gguf"], "is not a GGUF file"),
    (["generate", "--model", "{root}/truncated.gguf"], "is not a readable GGUF file (truncated or damaged?)"),
    (["generate", "--model", "{root}/empty"], "has no config.json"),
    (["generate", "--prompt-file", "{root}/image.bin"], "--prompt-file: {root}/image.bin is not UTF-8 text"),
    (["generate", "--prompt", ""], "--prompt is empty"),
    (["generate", "--device", "banana"], "--device: 'banana' is not a device"),
    (["generate", "--cpu-threads", "99"], "--cpu-threads must be in [1, "),
    (["sweep", "--layers", "99"], "--layers: 99 not in the model's layers, 0 to 29"),
    (["sweep", "--backend", "bogus"], "--backend must be one of flat, "),
]
if not torch.cuda.is_available():
    ISSUE_MISTAKES.append((["generate", "--device", "cuda"], "--device cuda: CUDA is not available"))


@pytest.mark.parametrize("args, expect", ISSUE_MISTAKES, ids=[" ".join(a) for a, _ in ISSUE_MISTAKES])
def test_issue_mistakes_are_one_line_in_a_subprocess(bad_inputs, args, expect):
    root = str(bad_inputs)
    start = time.perf_counter()
    result = run_cli(*(a.format(root=root) for a in args))
    assert_one_line_mistake(result, expect.format(root=root))
    assert result.stdout == ""
    assert time.perf_counter() - start < 60  # no model was loaded (the embedded one takes ~25 s uncached)


KIN = [
    (["generate", "--prompt-file", "{root}/missing.txt"], "does not exist"),
    (["generate", "--prompt", "   \n"], "--prompt is empty"),
    (["generate", "--top-k", "0"], "--top-k must be an int >= 1, got 0"),
    (["generate", "--sink", "-1"], "--sink must be an int >= 0, got -1"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "--prefill-chunk", "1"], "--prefill-chunk must be >= 2"),
    (["generate", "--cpu-threads", "0"], "--cpu-threads must be an int >= 1, got 0"),
    (["generate", "--device", "cuda:x"], "--device: 'cuda:x' is not a device"),
    (["generate", "--gpu-memory-gib", "8"], "--gpu-memory-gib caps a CUDA device's memory; --device is cpu"),
    (["generate", "--index-param", "ef"], "--index-param: index parameter 'ef': expected NAME=VALUE"),
    (["generate", "--index-param", "ef=many"], "parameter 'ef' must be int, got 'many'"),
    (["generate", "--index-param", "bogus=1"], "unknown parameter 'bogus'; allowed: ['M', "),
    (["generate", "--index", "flat", "--index-param", "ef=300"], "index 'flat': unknown parameter 'ef'; allowed: none"),
    (["generate", "--top-k", "300", "--index-param", "ef=200"], "--top-k must be <= the search queue ef (200) of index 'roar', got 300: raise the index's ef"),
    (["generate", "--seed", "1"], "--seed seeds the sampling: it needs --temperature > 0 or --top-p"),
    (["generate", "--temperature", "0", "--top-p", "0.9"], "--top-p samples"),
    (["generate", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["generate", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["generate", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "--temperature", "1", "--seed", "-3"], "--seed must be >= 0"),
    (["generate", "--telemetry-png", "{root}/plot.jpg"], "--telemetry-png: {root}/plot.jpg must name a .png file"),
    (["generate", "--model", "{root}/a-file"], "is not a GGUF file"),
    (["sweep", "--layers", "-1", "3"], "--layers: -1 not in the model's layers"),
    (["sweep", "--backend", "flat", "roar:bogus=1"], "backend 'roar': unknown parameter(s) ['bogus']"),
    (["sweep", "--backend", "roar:ef"], "expected param=v1,v2"),
    (["sweep", "--top-k", "0"], "--top-k must be one or more ints >= 1, got 0"),
    (["sweep", "--cpu-threads", "99"], "--cpu-threads must be in [1, "),
    (["sweep", "--out", "{root}/a-file"], "--out: {root}/a-file is a file"),
    (["eval", "--methods", "bogus"], "--methods must be one or more of full, sink+window, auto, flat"),
    (["eval", "--lengths", "10"], "--lengths must be one or more ints >= 641 (longer than sink + window = 640, so that something is offloaded), got 10"),
    (["eval", "--model", "{root}/empty"], "has no config.json"),
    (["eval", "--out", "{root}/a-file"], "is a file"),
    (["bench", "--shape", "huge"], "--shape must be one of llama3-8b, small, tiny, got huge"),
    (["bench", "--device", "cpu", "--gpu-memory-gib", "8"], "--gpu-memory-gib caps a CUDA device's memory"),
    (["bench", "--device", "cpu", "--steps", "0"], "--steps must be an int >= 1, got 0"),
    (["bench", "--device", "cpu", "--contexts", "10"], "--contexts must be one or more ints >= 641 (longer than sink + window = 640"),
    (["generate", "--gpu-memory-gib", "-1"], "--gpu-memory-gib must be a finite number > 0 (GiB), got -1"),
    (["sweep", "--lengths", "100"], "--lengths must be one or more ints >= 804 (sink + window + n_test"),
    (["sweep", "--target-recall", "2"], "--target-recall must be a finite number in (0, 1], got 2"),
    (["eval", "--fidelity-tokens", "-1"], "--fidelity-tokens must be an int >= 0, got -1"),
    (["eval", "--depths", "2"], "--depths must be one or more numbers in [0, 1], got 2"),
    (["chat", "--document", "{root}"], "--document: {root} is a folder, not a file"),
    (["chat", "--document", "{root}/image.bin"], "--document: {root}/image.bin is not UTF-8 text (a binary file?)"),
    (["chat", "--document", "{root}/blank.txt"], "--document: {root}/blank.txt is empty"),
    (["chat", "--document", "{root}/a-file", "--document", "{root}/missing.txt"],
     "--document: {root}/missing.txt does not exist"),  # the second --document is read too
    (["generate", "--model", "{root}/config-only"], "has config.json but no weights"),
    (["generate", "--prompt-file", "{root}"], "--prompt-file: {root} is a folder, not a file"),
]


@pytest.mark.parametrize("args, expect", KIN, ids=[" ".join(a) for a, _ in KIN])
def test_kin_mistakes_are_one_line(bad_inputs, args, expect, capsys):
    root = str(bad_inputs)
    code = cli.main([a.format(root=root) for a in args])
    out, err = capsys.readouterr()
    assert_one_line_mistake((code, err), expect.format(root=root))
    assert out == ""


@pytest.mark.parametrize("args, expect", [
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["generate", "--top-k", "many"], "argument --top-k: invalid int value: 'many'"),
    (["generate", "--index", "faiss"], "argument --index: invalid choice: 'faiss'"),
    (["generate", "--prompt", "a", "--prompt-file", "b"], "not allowed with argument --prompt"),
])
def test_usage_mistakes_are_one_line(args, expect, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    err = capsys.readouterr().err
    assert_one_line_mistake((stop.value.code, err), expect)


def test_debug_shows_the_traceback(bad_inputs):
    result = run_cli("generate", "--model", str(bad_inputs / "empty"), "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "UserError" in result.stderr


def test_version_and_python_dash_m():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("retrieval-attn 0.1.0 (torch ")
    assert "transformers" in result.stdout


def test_every_option_has_help_and_shows_its_default():
    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    assert sorted(subcommands(cli._parser([]))) == ["bench", "cache", "chat", "eval", "generate", "serve", "sweep"]
    one_name = {"cpu-threads": "threads", "top-k": "k"}  # one name per concept across subcommands
    for name in cli.COMMANDS:
        sub = subcommands(cli._parser([name]))[name]  # a command's flags are added when it is named
        helps = {a.dest: a for a in sub._actions if a.option_strings and a.dest != "help"}
        text = sub.format_help()
        for dest, action in helps.items():
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.default is not None and action.default is not False and action.default != []:
                assert "(default:" in sub._get_formatter()._get_help_string(action), (name, dest)
        assert "(default:" in text or name == "cache"  # cache has flags only
        flags = {f for a in sub._actions for f in a.option_strings}
        for kept, old in one_name.items():
            assert f"--{old}" not in flags, f"{name} has --{old}; the flag is --{kept}"


def test_readme_synopsis_backend_takes_several_names(monkeypatch, capsys):
    """``--backend a b`` (the README's synopsis) and ``--backend a --backend b`` both add backends."""
    seen = []

    def stop(settings, **kwargs):
        seen.extend(str(b) for b in settings.backends)
        raise KeyboardInterrupt

    monkeypatch.setattr("retrieval_attn.evaluation.sweep.run_sweep", stop)
    assert cli.main(["sweep", "--backend", "flat", "roar:ef=100,200", "--backend", "ivf"]) == 130
    assert seen == ["flat", "roar:ef=100,200", "ivf"]
    assert capsys.readouterr().err.strip() == "retrieval-attn sweep: interrupted (Ctrl-C)"


def test_cache_command_lists_and_clears(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    entry = tmp_path / "retrieval-attn" / "models" / "model-0123456789-float32"
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"\0" * 3 * 2**20)
    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "retrieval-attn" / "models") in out and "model-0123456789-float32  3 MiB" in out
    assert cli.main(["cache", "--clear"]) == 0
    assert "removed 1 cached model(s), 3 MiB" in capsys.readouterr().out
    assert not entry.exists()


@pytest.mark.slow
def test_instruct_prompt_gets_an_answer_in_the_chat_template(capsys):
    assert cli.main(["generate", "--prompt", "Write a long story about a dragon.", "--max-new-tokens", "12",
                     "--sink", "4", "--window", "8", "--top-k", "8"]) == 0
    out = capsys.readouterr().out
    answer = out.split("\nprompt tokens")[0]
    assert len(answer.split()) >= 5, out  # the model answers instead of ending its turn at once
    assert "(chat template)" in out and "decoding" in out


@pytest.mark.slow
def test_sampling_repeats_under_a_seed(capsys):
    argv = ["generate", "--prompt", "Name three colours.", "--max-new-tokens", "10", "--temperature", "0.9",
            "--top-p", "0.95", "--seed", "7"]
    answers = []
    for _ in range(2):
        assert cli.main(argv) == 0
        answers.append(capsys.readouterr().out.split("\nprompt tokens")[0])
    assert answers[0] == answers[1] and answers[0].strip()
    assert cli.main(argv[:-2] + ["--seed", "8"]) == 0


@pytest.mark.slow
def test_ctrl_c_prints_the_partial_table_and_exits_130(tmp_path):
    """SIGINT while tokens stream: the line ends, the table of what ran follows, one line on stderr, 130.

    The command starts with SIGINT ignored, as a background job of a script or ``nohup`` inherits it
    (whatever way this suite was started): the CLI's own handler must still stop it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrieval_attn", "generate", "--max-new-tokens", "4000", "--sink", "64",
         "--window", "128"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    first = proc.stdout.read(len(PASSKEY) + 1)  # the streamed answer's first tokens: decoding runs
    proc.send_signal(signal.SIGINT)  # whatever the machine's load, mid-stream (4,000 tokens asked for)
    try:
        out, err = proc.communicate(timeout=120)  # one decode step takes well under a second
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("SIGINT did not stop generate within 120 s") from None
    out = first + out
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted (Ctrl-C): the table above covers what ran"
    assert out.startswith(f" {PASSKEY}"), out[:200]
    assert "\nprompt tokens" in out and "seconds per decoded token" in out


def test_interrupt_while_loading_is_one_line(monkeypatch, capsys):
    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("retrieval_attn.hf.load_model", interrupted_load)
    assert cli.main(["generate", "--prompt", "hello"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "retrieval-attn generate: interrupted (Ctrl-C)"
    assert "Traceback" not in err




@pytest.fixture
def small_generate(small_model_with_the_embedded_vocabulary, tokenizer, monkeypatch, tmp_path):
    """``generate`` on a small random model (loaded in place of the embedded one, whose header checks still
    apply) with a ~700-token prompt file. Returns ``run(*flags)`` -> exit code, the ``RetrievalConfig`` of
    every cache the runs made, and the (backend, parameters) of every index they made."""
    import retrieval_attn.hf
    from retrieval_attn.index import registry

    model = small_model_with_the_embedded_vocabulary
    monkeypatch.setattr(retrieval_attn.hf, "load_model", lambda *a, **k: (model, tokenizer))
    configs, made = [], []

    class RecordingCache(retrieval_attn.hf.RetrievalCache):
        def __init__(self, model, config, **kwargs):
            configs.append(config)
            super().__init__(model, config, **kwargs)

    make_index = registry.make_index

    def recording_make_index(name, **params):
        made.append((name, params))
        return make_index(name, **params)

    monkeypatch.setattr(retrieval_attn.hf, "RetrievalCache", RecordingCache)
    monkeypatch.setattr(registry, "make_index", recording_make_index)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The grass is green and the sky is blue. " * 70)

    def run(*flags: str) -> int:
        configs.clear()
        made.clear()
        return cli.main(["generate", "--prompt-file", str(prompt), "--max-new-tokens", "3", "--sink", "4",
                         "--window", "8", "--wait-for-index", *flags])  # stats name the index built

    return run, configs, made


@pytest.mark.parametrize("flags, backend, params", [
    (["--top-k", "300"], "flat", {}),  # auto over ~700 keys: exact search (was refused: "raise ef")
    (["--top-k", "300", "--index", "roar"], "roar", {"ef": 300}),
    (["--top-k", "300", "--index", "roar", "--index-param", "ef=400"], "roar", {"ef": 400}),
    (["--index", "roar", "--index-param", "M=8"], "roar", {"M": 8}),
    (["--index", "hnsw", "--index-param", "M=8", "--index-param", "ef_construction=50"], "hnsw",
     {"M": 8, "ef_construction": 50}),
    (["--index", "ivf", "--index-param", "nlist=8", "--index-param", "nprobe=2"], "ivf", {"nlist": 8, "nprobe": 2}),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_index_params_reach_the_backend_and_ef_follows_top_k(small_generate, flags, backend, params, capsys):
    """``--index-param`` sets any backend's parameters; a ``--top-k`` above the default ef works with ``auto``
    and with a graph (whose ef follows it), where it asked for ``ef`` before."""
    run, _, made = small_generate
    assert run(*flags) == 0, capsys.readouterr().err
    assert made and all(m == (backend, params) for m in made), made  # one index per layer
    assert f"-> {backend} (top_k " in capsys.readouterr().out


def test_telemetry_png_implies_telemetry(small_generate, tmp_path, capsys):
    run, configs, _ = small_generate
    png = tmp_path / "plots" / "telemetry.png"
    assert run("--telemetry-png", str(png)) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert configs[-1].telemetry and "telemetry: recall@100" in out and png.stat().st_size > 0


def test_ctrl_c_during_prefill_prints_what_ran(small_generate, monkeypatch, capsys):
    from retrieval_attn.hf import Decoder

    run, _, _ = small_generate
    forward, calls = Decoder._forward, []

    def interrupt_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "_forward", interrupt_the_second)
    assert run("--prefill-chunk", "256") == 130
    out, err = capsys.readouterr()
    assert re.search(r"prefill seconds +[0-9.]+ \(interrupted after 256 of \d+ tokens\)", out), out
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted (Ctrl-C): the table above covers what ran"


def test_help_loads_no_torch_numba_or_transformers():
    """``retrieval-attn --help`` builds the parser without the heavy libraries (it took ~4 s with torch)."""
    code = ("import sys\nfrom retrieval_attn.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numba', 'transformers', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_a_prompt_beyond_the_trained_context_is_refused_with_the_numbers(small_generate, capsys):
    """The small model has 4,096 positions: ~700 prompt tokens + 3,500 new ones do not fit."""
    run, _, made = small_generate
    assert run("--max-new-tokens", "3500") == 2
    err = capsys.readouterr().err
    assert "exceeds the model's trained context of 4096 positions (max_position_embeddings)" in err
    assert err.strip().splitlines()[-1].startswith("retrieval-attn generate: error: the prompt (")
    assert "Traceback" not in err and not made  # one line after the loading line, before any prefill


def test_a_window_holding_everything_warns_that_nothing_is_offloaded(small_generate, capsys):
    run, _, _ = small_generate
    assert run("--window", "5000") == 0
    err = capsys.readouterr().err
    assert "nothing is offloaded, every step is full attention" in err
