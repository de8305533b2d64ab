"""``retrieval-attn generate``: its flags, and the run that loads a model (the embedded SmolLM2 by
default; a GGUF file is de-quantised once and cached, ``model_files``), encodes the prompt (in the
tokenizer's chat template when it has one, the built-in pass-key document as plain text), prefills it
in chunks with a progress bar, streams greedy or sampled decoding token by token, and ends with a
table of where the tokens are and what each step cost (with ``--telemetry``, also recall@k and
attention mass per layer, and a PNG).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from ..checks import DTYPE_NAMES
from .common import (
    UserError, _at_least, _cpu_threads, _device, _interrupted, _load_model, _model,
    _out_dir, _read_text, _user_errors,
)

from .flags import DECODING, add_retrieval_flags, retrieval_config

BUILTIN_PROMPT = "passkey.txt"
TELEMETRY_PNG = "results/telemetry.png"


def _png(path: str, flag: str) -> Path:
    """A PNG file path whose folder exists or can be made."""
    if Path(path).suffix.lower() != ".png":
        raise UserError(f"{flag}: {path} must name a .png file")
    _out_dir(str(Path(path).parent), flag)
    return Path(path)


def _read_prompt(args: argparse.Namespace) -> tuple[str, bool]:
    """The prompt text and whether it is the built-in pass-key document; UserError for an empty or
    unreadable one."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty: give the text to answer or continue "
                            "(or leave --prompt out for the built-in pass-key document)")
        return args.prompt, False
    if args.prompt_file is not None:
        return _read_text(Path(args.prompt_file), "--prompt-file"), False
    return resources.files("retrieval_attn").joinpath("data", BUILTIN_PROMPT).read_text(), True


def _sampling(args: argparse.Namespace) -> tuple[float, float, int | None]:
    """(temperature, top_p, seed) of ``generate``: temperature 0 is greedy; ``--top-p`` alone samples at
    temperature 1; ``--seed`` needs sampling."""
    temperature, top_p, seed = args.temperature, args.top_p, args.seed
    if temperature is not None and not 0 <= temperature < math.inf:
        raise UserError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {top_p}")
        if temperature == 0:
            raise UserError("--top-p samples from the most likely tokens: it needs --temperature > 0 (0 is greedy)")
    temperature = temperature if temperature is not None else (1.0 if top_p is not None else 0.0)
    if seed is not None:
        if temperature == 0:
            raise UserError("--seed seeds the sampling: it needs --temperature > 0 or --top-p (decoding is greedy)")
        if seed < 0:
            raise UserError(f"--seed must be >= 0, got {seed}")
    return temperature, 1.0 if top_p is None else top_p, seed


def generate_command(args: argparse.Namespace) -> int:
    telemetry = args.telemetry or args.telemetry_png is not None  # a plot of the telemetry implies measuring it
    with _user_errors():
        config = retrieval_config(args, telemetry=telemetry)
    _cpu_threads(args.cpu_threads)
    _at_least("--max-new-tokens", args.max_new_tokens, 1)
    _at_least("--prefill-chunk", args.prefill_chunk, 2)
    device = _device(args.device)
    if args.gpu_memory_gib is not None and device.type != "cuda":
        raise UserError(f"--gpu-memory-gib caps a CUDA device's memory; --device is {device}")
    temperature, top_p, seed = _sampling(args)
    prompt, builtin = _read_prompt(args)
    png = _png(args.telemetry_png or TELEMETRY_PNG, "--telemetry-png") if telemetry else None
    info = _model(args.model)

    from ..evaluation.report import format_columns
    from ..hf import Decoder, RetrievalCache, greedy, prompt_ids, sampler, stop_tokens, trained_positions
    from ..planner import MemoryBudgetError

    model, tokenizer = _load_model(args.model, info, device, args.dtype)
    ids, chat = prompt_ids(tokenizer, prompt, chat=not (builtin or args.no_chat_template))
    n = ids.shape[1]
    positions = trained_positions(model)
    if positions is not None and n + args.max_new_tokens > positions:
        raise UserError(f"the prompt ({n} tokens) + --max-new-tokens ({args.max_new_tokens}) = "
                        f"{n + args.max_new_tokens} tokens exceeds the model's trained context of {positions} "
                        "positions (max_position_embeddings): shorten the prompt or lower --max-new-tokens")
    if config.sink_tokens + config.window_tokens >= n + args.max_new_tokens:
        print(f"warning: --sink {config.sink_tokens} + --window {config.window_tokens} hold the whole prompt and "
              f"answer ({n} + {args.max_new_tokens} tokens): nothing is offloaded, every step is full attention",
              file=sys.stderr)
    try:
        cache = RetrievalCache(model, config, max_context=n + args.max_new_tokens, prefill_chunk=args.prefill_chunk)
    except MemoryBudgetError as err:
        raise UserError(str(err)) from None
    choose = greedy if temperature == 0 else sampler(temperature, top_p, seed)

    decoder = Decoder(model, cache, args.prefill_chunk)  # the last prefill chunk starts every layer's index build
    generated: list[int] = []
    printed = ""
    scanned: list[int] = []
    step_seconds: list[float] = []  # with --wait-for-index the first decode step waits for every layer's index
    prefilled = 0

    def stream(token: int) -> None:
        nonlocal printed
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        print(text[len(printed):], end="", flush=True)
        printed = text

    def record(step: int, seconds: float) -> None:
        scanned.append(sum(s.keys_scanned_last_step for s in cache.stats))
        step_seconds.append(seconds)

    def prefill_progress(tokens: int) -> None:
        nonlocal prefilled
        prefilled += tokens
        bar.update(tokens)

    start = time.perf_counter()
    prefill_s = None
    interrupted = False
    try:
        with tqdm(total=n, desc="prefill", unit="tok", file=sys.stderr) as bar:
            logits = decoder.prefill(ids, progress=prefill_progress)
        prefill_s = time.perf_counter() - start
        decoder.decode(logits, args.max_new_tokens, choose=choose, stop=stop_tokens(model, tokenizer),
                       on_token=stream, on_step=record)
    except KeyboardInterrupt:
        interrupted = True
    print()
    stats = cache.stats
    layers = len(stats)
    later = step_seconds[1:]
    prompt_kind = "built-in pass-key document (plain text)" if builtin else ("chat template" if chat else "plain text")
    print(
        format_columns(None, [
            ("prompt tokens", f"{n} ({prompt_kind})"),
            ("decoding", "greedy" if temperature == 0 else
             f"sampling: temperature {temperature:g}, top-p {top_p:g}, seed {'random' if seed is None else seed}"),
            ("tokens on device / offloaded (per layer)", f"{stats[0].device_tokens} / {stats[0].offloaded_tokens}"),
            ("index", f"{config.index} -> {stats[0].index} (top_k {config.top_k})"),
            ("prefill seconds", f"{prefill_s:.2f}" if prefill_s is not None
             else f"{time.perf_counter() - start:.2f} (interrupted after {prefilled} of {n} tokens)"),
            ("first decode step seconds" + (" (waits for the indexes)" if not args.serve_while_building else ""),
             f"{step_seconds[0]:.2f}" if step_seconds else "-"),
            ("seconds per decoded token (after the first)", f"{sum(later) / len(later):.4f}" if later else "-"),
            ("keys scanned per step (all layers, heads)", f"{sum(scanned) / max(len(scanned), 1):.0f}"),
            ("keys scanned per query head (mean fraction)",
             f"{sum(s.keys_scanned_fraction for s in stats) / layers:.3f}"),
            ("CPU / device MiB (all layers)",
             f"{sum(s.cpu_bytes for s in stats) / 2**20:.1f} / {sum(s.device_bytes for s in stats) / 2**20:.1f}"),
            ("planned device / CPU GiB (weights included)",
             f"{cache.memory_plan.device_total / 2**30:.2f} / {cache.memory_plan.cpu_total / 2**30:.2f}"),
        ])
    )
    if telemetry and step_seconds:
        from ..evaluation.report import format_telemetry_table, plot_telemetry

        rows = cache.telemetry_summary()
        print(f"\ntelemetry: recall@{config.top_k} and attention mass held, per layer, over {len(step_seconds)} "
              "decode steps")
        print(format_telemetry_table(rows))
        print(f"plot: {plot_telemetry({config.index: rows}, png, 'generate', config.top_k)}")
    return _interrupted() if interrupted else 0


def add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    """The options of ``generate``."""
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: the built-in pass-key document)")
    src.add_argument("--prompt-file", metavar="FILE", help="UTF-8 text file holding the prompt")
    gen.add_argument("--no-chat-template", action="store_true",
                     help="feed --prompt/--prompt-file as plain text, not in the model's chat template "
                          "(the built-in document is always plain text)")
    gen.add_argument("--model", default=None, metavar="GGUF_OR_FOLDER",
                     help="GGUF file or transformers folder (default: the embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=None, metavar="T",
                     help="sampling temperature; 0 is greedy (default: 0, or 1 with --top-p)")
    gen.add_argument("--top-p", type=float, default=None, metavar="P",
                     help="sample from the smallest set of tokens holding probability P (implies sampling)")
    gen.add_argument("--seed", type=int, default=None, metavar="N", help="seed of the sampling draws (default: random)")
    gen.add_argument("--device", default="cpu", help="torch device of the model: cpu, cuda or cuda:N")
    gen.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="weight dtype")
    gen.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                     help="prompt tokens per prefill forward pass")
    add_retrieval_flags(gen, DECODING)
    gen.add_argument("--telemetry-png", default=None, metavar="FILE",
                     help=f"where the telemetry plot goes; implies --telemetry (default: {TELEMETRY_PNG})")
