"""DTS, Diversified-ThinkSolve preference pairs for DPO (Dokmeci et al., arXiv 2507.02173).

"Think": the model lists K distinct strategies for a problem; "solve": one solution per strategy; every solution is
scored against the reference answer with the package's one numeric extractor; a correct and an incorrect solution
of the same problem form a (chosen, rejected) pair (mixed-correctness rule). The pair's prompt is the problem
alone (the strategy that conditioned the solution is not shown to DPO), so an unchanged `trl.DPOTrainer` trains on
the result. `build_sampling_pairs` is the peer: K temperature samples of the problem, the same pair rule and the
same token accounting.

    pairs, report = build_dts_pairs(model, tok, [{"question": q, "answer": "42"}, ...], DTSConfig(num_strategies=4))
    DPOTrainer(model, ref_model=copy.deepcopy(model), train_dataset=pairs, processing_class=tok,
               args=DPOConfig(output_dir="out", bf16=False, use_cpu=True, gradient_checkpointing=False)).train()
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..evaluation.answers import extract_answer
from ..evaluation.prompts import encode_chat
from ..generation.padding import cut_at_eos

__all__ = ["DTSConfig", "build_dts_pairs", "build_sampling_pairs", "parse_strategies", "select_pair",
           "solution_diversity", "ChatSampler"]

THINK_PROMPT = ("{question}\n\nDo not solve the problem yet. List {k} different strategies that could solve it, "
                "one short line each, numbered 1 to {k}.")
SOLVE_PROMPT = "{question}\n\nSolve the problem using this strategy: {strategy}\nEnd with 'The answer is <number>.'"
SAMPLE_PROMPT = "{question}\n\nSolve the problem. End with 'The answer is <number>.'"

_LIST_MARKER = re.compile(r"^\s*(?:\(?\d+[\.\):]|[-*\u2022]|step\s*\d+\s*[:.)-]|strategy\s*\d+\s*[:.)-])\s*",
                          re.IGNORECASE)


@dataclass
class DTSConfig:
    """Pair-building settings (package defaults; the paper's exact values were not retrievable, see docs).

    Args:
        num_strategies: K, strategies (DTS) or samples (sampling peer) per problem; >= 2.
        think_temperature, solve_temperature: sampling temperatures of the two calls (the peer uses the solve one).
        max_think_tokens, max_solve_tokens: generation budgets.
        batch_size: prompts per `generate` call.
        seed: seeds generation and the choice among equally good/bad solutions.
        system: system message for every chat prompt (keep it identical across arms).
        answer_fn: reply -> answer string (the package's `extract_answer` by default).
    """

    num_strategies: int = 4
    think_temperature: float = 0.7
    solve_temperature: float = 0.7
    max_think_tokens: int = 128
    max_solve_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    system: str | None = None
    answer_fn: Callable[[str], str | None] = field(default=extract_answer, repr=False)

    def __post_init__(self):
        if self.num_strategies < 2:
            raise ValueError(f"num_strategies must be >= 2 (a pair needs two solutions), got {self.num_strategies}.")
        for name in ("think_temperature", "solve_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        if min(self.max_think_tokens, self.max_solve_tokens, self.batch_size) < 1:
            raise ValueError("max_think_tokens, max_solve_tokens and batch_size must be >= 1.")


class ChatSampler:
    """Batched chat sampling with a transformers model: prompts -> (completion text, generated tokens) per sample,
    tokens counted up to and including the first EOS."""

    def __init__(self, model, tokenizer, system: str | None = None, batch_size: int = 8):
        self.model, self.tokenizer, self.system, self.batch_size = model, tokenizer, system, batch_size

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], temperature: float, max_new_tokens: int,
                 num_samples: int = 1) -> list[list[tuple[str, int]]]:
        out: list[list[tuple[str, int]]] = []
        eos = self.model.generation_config.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start:start + self.batch_size])
            enc = encode_chat(self.tokenizer, chunk, system=self.system)
            enc = {k: v.to(self.model.device) for k, v in enc.items()}
            gen = self.model.generate(**enc, do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                                      num_return_sequences=num_samples, pad_token_id=pad)
            new = gen[:, enc["input_ids"].shape[1]:].tolist()
            for i in range(len(chunk)):
                rows = [cut_at_eos(new[i * num_samples + j], eos) for j in range(num_samples)]
                out.append([(self.tokenizer.decode(r, skip_special_tokens=True), len(r)) for r in rows])
        return out


def parse_strategies(text: str, k: int) -> list[str]:
    """Up to k distinct strategies from a think reply: numbered or bulleted lines, else non-empty lines; markers and
    duplicates (case/space-insensitive) removed. Never raises; may return fewer than k."""
    if not isinstance(text, str):
        return []
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    marked = [_LIST_MARKER.sub("", line).strip() for line in lines if _LIST_MARKER.match(line)]
    candidates = marked or lines
    seen, out = set(), []
    for item in candidates:
        key = " ".join(item.lower().split()).rstrip(".")
        if len(key) < 3 or key in seen:
            continue
        seen.add(key)
        out.append(item)
        if len(out) == k:
            break
    return out


def select_pair(solutions: Sequence[str], correct: Sequence[bool], rng: random.Random) -> tuple[int, int] | None:
    """The mixed-correctness rule: (index of a correct solution, index of an incorrect one), each drawn uniformly
    among its kind; None when all are correct or all wrong."""
    right = [i for i, c in enumerate(correct) if c]
    wrong = [i for i, c in enumerate(correct) if not c]
    if not right or not wrong:
        return None
    return rng.choice(right), rng.choice(wrong)


def solution_diversity(solutions: Sequence[str], answers: Sequence[str | None]) -> dict[str, float]:
    """Distinct final answers (extraction failures count as one kind) and mean pairwise token-level Jaccard
    similarity of the solutions (lower = more diverse)."""
    tokens = [set(s.lower().split()) for s in solutions]
    sims = [len(a & b) / len(a | b) for i, a in enumerate(tokens) for b in tokens[i + 1:] if a | b]
    return {"distinct_answers": float(len(set(answers))), "jaccard": sum(sims) / len(sims) if sims else 1.0}


def _problems(problems) -> list[dict[str, Any]]:
    rows = [dict(p) for p in problems]
    for i, row in enumerate(rows):
        question = row.get("question", row.get("prompt"))
        if not isinstance(question, str) or "answer" not in row:
            raise ValueError(f"problem {i} needs a `question` (or string `prompt`) and an `answer`; got keys "
                             f"{sorted(row)}.")
        row["question"] = question
    return rows


def _assemble(rows, solutions, config, report, rng):
    """Score every problem's solutions, apply the pair rule, fill the report; returns the DPO dataset."""
    from datasets import Dataset

    pairs = {"prompt": [], "chosen": [], "rejected": [], "answer": []}
    distinct, jaccard = [], []
    for row, sols in zip(rows, solutions):
        texts = [text for text, _ in sols]
        answers = [config.answer_fn(t) for t in texts]
        gold = config.answer_fn(str(row["answer"]))
        correct = [a is not None and a == gold for a in answers]
        report["solutions"] += len(texts)
        report["correct_solutions"] += sum(correct)
        div = solution_diversity(texts, answers)
        distinct.append(div["distinct_answers"])
        jaccard.append(div["jaccard"])
        picked = select_pair(texts, correct, rng)
        if picked is None:
            report["all_correct" if all(correct) else "all_wrong"] += 1
            continue
        user = [{"role": "user", "content": row["question"]}]
        if config.system is not None:
            user = [{"role": "system", "content": config.system}] + user
        pairs["prompt"].append(user)
        pairs["chosen"].append([{"role": "assistant", "content": texts[picked[0]]}])
        pairs["rejected"].append([{"role": "assistant", "content": texts[picked[1]]}])
        pairs["answer"].append(str(row["answer"]))
    report["pairs"] = len(pairs["prompt"])
    report["mean_distinct_answers"] = sum(distinct) / len(distinct) if distinct else 0.0
    report["mean_jaccard"] = sum(jaccard) / len(jaccard) if jaccard else 0.0
    return Dataset.from_dict(pairs)


def _new_report(method: str, n: int) -> dict[str, Any]:
    return {"method": method, "problems": n, "solutions": 0, "correct_solutions": 0, "all_correct": 0,
            "all_wrong": 0, "think_tokens": 0, "solve_tokens": 0, "strategy_shortfall": 0}


def build_dts_pairs(model, tokenizer, problems, config: DTSConfig | None = None, sampler: Callable | None = None):
    """DTS pairs: returns (`datasets.Dataset` with `prompt`/`chosen`/`rejected` conversations and `answer`, report).

    `problems`: rows with `question` (or a string `prompt`) and `answer`. Problems whose think reply yields fewer
    than K strategies are topped up with plain samples (counted in `strategy_shortfall`). `sampler` replaces the
    model for tests (same call signature as `ChatSampler`). The report holds pairs kept, all-correct/all-wrong
    groups, think/solve token counts and the diversity figures.
    """
    config = config or DTSConfig()
    rows = _problems(problems)
    sampler = sampler or ChatSampler(model, tokenizer, config.system, config.batch_size)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    report = _new_report("dts", len(rows))
    k = config.num_strategies
    thinks = sampler([THINK_PROMPT.format(question=r["question"], k=k) for r in rows], config.think_temperature,
                     config.max_think_tokens)
    solve_prompts, owners = [], []
    for i, (row, reply) in enumerate(zip(rows, thinks)):
        text, n_tokens = reply[0]
        report["think_tokens"] += n_tokens
        strategies = parse_strategies(text, k)
        report["strategy_shortfall"] += k - len(strategies)
        prompts = [SOLVE_PROMPT.format(question=row["question"], strategy=s) for s in strategies]
        prompts += [SAMPLE_PROMPT.format(question=row["question"])] * (k - len(strategies))
        solve_prompts += prompts
        owners += [i] * k
    solved = sampler(solve_prompts, config.solve_temperature, config.max_solve_tokens)
    solutions: list[list[tuple[str, int]]] = [[] for _ in rows]
    for owner, reply in zip(owners, solved):
        solutions[owner].append(reply[0])
        report["solve_tokens"] += reply[0][1]
    report["generated_tokens"] = report["think_tokens"] + report["solve_tokens"]
    return _assemble(rows, solutions, config, report, rng), report


def build_sampling_pairs(model, tokenizer, problems, config: DTSConfig | None = None, sampler: Callable | None = None):
    """The temperature-sampling peer: K samples of each problem at `solve_temperature`, the same pair rule, the same
    report (no think tokens). Returns (dataset, report)."""
    config = config or DTSConfig()
    rows = _problems(problems)
    sampler = sampler or ChatSampler(model, tokenizer, config.system, config.batch_size)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    report = _new_report("sampling", len(rows))
    solutions = sampler([SAMPLE_PROMPT.format(question=r["question"]) for r in rows], config.solve_temperature,
                        config.max_solve_tokens, num_samples=config.num_strategies)
    report["solve_tokens"] = sum(n for sols in solutions for _, n in sols)
    report["generated_tokens"] = report["solve_tokens"]
    return _assemble(rows, solutions, config, report, rng), report
