"""Needle-in-a-haystack prompts generated on the fly (RULER-style), and the needle grid of an eval.

Tasks, deterministic under a seed: ``passkey`` (a 5-digit key in repeated noise sentences),
``number`` (a 5-digit "special magic number" for a word, in sentences of the shipped book),
``multikey`` (the same needle plus ``MULTIKEY_DISTRACTORS`` needles with other words and numbers at
random depths, in noise; the question asks for one). The context of each cell is ``length`` tokens
(header, haystack, needles; the question comes after), the asked needle starts at ``depth`` of it.

Where the approximation acts: retrieval-attn is exact during prefill; only decode steps retrieve. So
``run_needle`` prefills the context once per method (``methods.Methods``), then feeds the question
**one token per decode step** and decodes the answer greedily: every token that reads the needle
reads it through retrieval. A sample is correct if the answer's digits appear in the output;
``needle_cells`` gives the accuracy per (task, length, depth, method), ``plot_needle`` a heatmap per
method.

This module knows tokenizers and the ``Methods`` runner, not how a method attends.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checks import check_int, check_number
from .methods import Methods
from .report import Interrupted, pyplot
from .settings import TASKS, EvalSettings
from .texts import book_text, token_ids

__all__ = ["NeedleSample", "make_needle", "run_needle", "needle_cells", "plot_needle"]

MULTIKEY_DISTRACTORS = 3
HEADER = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
WORDS = (
    "apple", "river", "candle", "forest", "violin", "harbor", "pepper", "marble", "falcon", "lantern",
    "meadow", "copper", "saddle", "thunder", "orchid", "compass", "glacier", "walnut", "ribbon", "anchor",
)


@dataclass(frozen=True)
class NeedleSample:
    """One needle-in-a-haystack prompt, as token ids.

    context_ids : the ``length``-or-fewer context tokens (header, haystack, needles), prefilled.
    question_ids : the question, fed one decode step per token after the context.
    answer : the digits the greedy output must contain.
    needle_start : index in ``context_ids`` of the first token of the asked needle.
    """

    task: str
    length: int
    depth: float
    seed: int
    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    answer: str
    needle_start: int


def _book_sentences() -> list[str]:
    return [s for s in re.split(r"(?<=[.!?'])\s+", book_text().replace("\n", " ")) if s.strip()]


def make_needle(tokenizer: Any, task: str, length: int, depth: float, seed: int) -> NeedleSample:
    """A deterministic needle prompt of at most ``length`` context tokens with its needle at ``depth``.

    Parameters
    ----------
    tokenizer : a transformers tokenizer; pieces (sentences) are tokenized one by one and their ids
        concatenated, so the length and the needle's position are exact in tokens.
    task : one of ``TASKS``.
    length : context tokens (the question comes after), >= 64.
    depth : where the asked needle starts, as a fraction of the haystack, in [0, 1].
    seed : the same seed gives the same sample; the key, the words, the distractors' depths and the
        book offset are drawn from ``random.Random`` seeded with (seed, task, length, depth).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    check_int("", "length", length, 64)
    check_number("", "depth", depth, 0.0, 1.0)
    rng = random.Random(f"{seed}:{task}:{length}:{depth}")
    answer = str(rng.randint(10000, 99999))
    if task == "passkey":
        needle = f"The pass key is {answer}. Remember it. {answer} is the pass key."
        question = "What is the pass key? The pass key is"
        distractors: list[str] = []
    else:
        word, *others = rng.sample(WORDS, 1 + MULTIKEY_DISTRACTORS)
        needle = f"One of the special magic numbers for {word} is: {answer}."
        question = f"What is the special magic number for {word} mentioned in the provided text? " \
                   f"The special magic number for {word} mentioned in the provided text is"
        distractors = [
            f"One of the special magic numbers for {w} is: {rng.randint(10000, 99999)}." for w in others
        ] if task == "multikey" else []
    header = token_ids(tokenizer, HEADER)
    needle_ids = token_ids(tokenizer, " " + needle)
    extra = [(token_ids(tokenizer, " " + d), rng.random()) for d in distractors]  # (ids, depth)
    budget = length - len(header) - len(needle_ids) - sum(len(d) for d, _ in extra)
    if budget < 1:
        raise ValueError(f"length {length} is too short for task {task!r}: the needles alone take {length - budget}")
    if task == "number":
        sentences = _book_sentences()
        source = itertools.islice(itertools.cycle(sentences), rng.randrange(len(sentences)), None)
    else:
        source = itertools.cycle(NOISE)
    filler: list[list[int]] = []  # one id list per sentence
    used = 0
    for sentence in source:
        piece = token_ids(tokenizer, " " + sentence)
        if used + len(piece) > budget:
            break
        filler.append(piece)
        used += len(piece)
    ends = [0]  # token offset after each sentence: where a needle may go
    for piece in filler:
        ends.append(ends[-1] + len(piece))
    slots = [(min(range(len(ends)), key=lambda i: abs(ends[i] - d * used)), ids) for ids, d in extra]
    target = min(range(len(ends)), key=lambda i: abs(ends[i] - depth * used))
    slots.append((target, needle_ids))
    inserted: dict[int, list[list[int]]] = {}
    for slot, ids in slots:
        inserted.setdefault(slot, []).append(ids)
    context = list(header)
    needle_start = -1
    for i in range(len(filler) + 1):
        for ids in inserted.get(i, []):
            if ids is needle_ids:
                needle_start = len(context)
            context += ids
        if i < len(filler):
            context += filler[i]
    return NeedleSample(task, length, depth, seed, tuple(context), tuple(token_ids(tokenizer, " " + question)), answer,
                        needle_start)


def run_needle(methods: Methods, tokenizer: Any, settings: EvalSettings, progress: bool) -> list[dict[str, Any]]:
    """One row per (task, length, depth, sample, method): the greedy output and whether it holds the answer.

    Ctrl-C raises ``report.Interrupted`` holding the rows of the samples every method finished.
    """
    rows: list[dict[str, Any]] = []
    cells = [(t, n, d, s) for t in settings.tasks for n in settings.lengths for d in settings.depths
             for s in range(settings.samples)]
    try:
        for task, length, depth, s in tqdm(cells, desc="needle", unit="cell", disable=not progress):
            sample = make_needle(tokenizer, task, length, depth, settings.seed + s)
            answer_tokens = len(token_ids(tokenizer, " " + sample.answer)) + 2
            decoders = methods.start(torch.tensor([sample.context_ids]))
            done = []
            for m, decoder in decoders.items():
                for token in sample.question_ids:  # the question through the cache, one decode step per token
                    logits = methods.step(m, decoder, token)
                generated = methods.greedy(m, decoder, logits, answer_tokens, stop=(tokenizer.eos_token_id,))
                text = tokenizer.decode(generated, skip_special_tokens=True)
                done.append({"task": task, "length": len(sample.context_ids), "target_length": length,
                             "depth": depth, "sample": s, "method": m, "answer": sample.answer,
                             "output": text.strip(), "correct": int(sample.answer in text)})
            methods.finish(decoders)
            rows += done
    except KeyboardInterrupt:
        raise Interrupted(rows) from None
    return rows


def needle_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy per (task, length, depth, method), over the samples of ``run_needle``'s rows."""
    cells: dict[tuple, list[int]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["target_length"], r["depth"], r["method"]), []).append(r["correct"])
    return [{"task": t, "length": n, "depth": d, "method": m, "samples": len(v), "accuracy": sum(v) / len(v)}
            for (t, n, d, m), v in cells.items()]


def _file_name(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", method)


def plot_needle(cells: list[dict[str, Any]], settings: EvalSettings, folder: Path) -> list[Path]:
    """needle_<method>.png in ``folder``: accuracy heatmaps (depth x length), one panel per task, each
    cell labelled with its accuracy, one colour scale; sized so the labels and title never clip."""
    plt = pyplot()
    out = []
    s = settings
    panel = (max(2.8, 0.9 * len(s.lengths) + 1.3), max(2.6, 0.5 * len(s.depths) + 1.6))  # inches per task
    for m in s.methods:
        fig, axes = plt.subplots(1, len(s.tasks), figsize=(panel[0] * len(s.tasks) + 1.0, panel[1]), squeeze=False,
                                 layout="constrained")
        image = None
        for ax, task in zip(axes[0], s.tasks):
            acc = {(c["length"], c["depth"]): c["accuracy"] for c in cells if c["method"] == m and c["task"] == task}
            grid = [[acc.get((n, d), float("nan")) for n in s.lengths] for d in s.depths]  # rows: depth; cols: length
            image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(j, i, "-" if v != v else f"{v:.0%}", ha="center", va="center", fontsize=10)
            ax.set_xticks(range(len(s.lengths)), [str(n) for n in s.lengths])
            ax.set_yticks(range(len(s.depths)), [f"{d:.0%}" for d in s.depths])
            ax.set_xlabel("context tokens")
            ax.set_title(task)
        axes[0][0].set_ylabel("needle depth")
        fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", fraction=0.05)
        fig.suptitle(f"needle accuracy: {m}")
        path = folder / f"needle_{_file_name(m)}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.15)
        plt.close(fig)
        out.append(path)
    return out
