"""V1-Infer: budgeted, uncertainty-guided pairwise tournament over N candidates (Singh, Li et al., "V1: Unifying
Generation and Self-Verification for Parallel Reasoners", arXiv 2603.04304).

One model samples N candidate solutions, then judges them two at a time. `PairwiseTournament` schedules the
comparisons (random round, min-degree coverage, Swiss refinement), spends at most `budget` judge calls and picks the
candidate with the highest uncertainty-weighted win rate. The baselines it is measured against ship beside it and
take the same candidates: `majority_vote` (self-consistency), `PointwiseSelector` (one 1-10 self-rating per
candidate), `round_robin` (all N(N-1)/2 pairs) and `random_pick`.

Judges are backends with one method, `complete(prompts) -> texts`: `HFJudge` (a local transformers model, one
left-padded batched `generate` per scheduling round) and `EndpointJudge` (any OpenAI-compatible `/chat/completions`
server, e.g. vLLM or TGI, called concurrently with the standard library only).
"""

from __future__ import annotations

import math
import random
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..endpoints import chat_completions_url, post_chat_completion

__all__ = [
    "MATH_JUDGE_TEMPLATE",
    "MATH_POINTWISE_TEMPLATE",
    "CallableJudge",
    "EndpointJudge",
    "HFJudge",
    "Judge",
    "PairwiseTournament",
    "PointwiseSelector",
    "Selection",
    "extract_answer",
    "majority_vote",
    "pair_outcome",
    "parse_pair_ratings",
    "parse_rating",
    "random_pick",
    "round_robin",
    "v1_generate",
]

MATH_JUDGE_TEMPLATE = (
    "You are grading two solutions to the same math problem. Check each solution's reasoning and final answer.\n\n"
    "Problem:\n{problem}\n\n"
    "Solution A:\n{solution_a}\n\n"
    "Solution B:\n{solution_b}\n\n"
    "Give each solution an integer score from 1 (certainly wrong) to 10 (certainly correct). Answer in exactly "
    "this format, replacing X and Y by the two scores, and write nothing else:\n"
    "Rating A: X\n"
    "Rating B: Y"
)

MATH_POINTWISE_TEMPLATE = (
    "You are grading a solution to a math problem. Check its reasoning and final answer.\n\n"
    "Problem:\n{problem}\n\n"
    "Solution:\n{solution}\n\n"
    "Give the solution an integer score from 1 (certainly wrong) to 10 (certainly correct). Answer in exactly "
    "this format, replacing X by the score, and write nothing else:\n"
    "Rating: X"
)

# Strict: a rating must be labelled; free numbers elsewhere in the reply (e.g. quoted arithmetic) never count.
_PAIR_RE = {
    "a": re.compile(r"rating\s*(?:for\s*)?(?:solution\s*)?a\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE),
    "b": re.compile(r"rating\s*(?:for\s*)?(?:solution\s*)?b\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE),
}
_POINT_RE = re.compile(r"rating\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def _clamp_rating(value: str) -> float:
    return min(10.0, max(1.0, float(value)))


def parse_pair_ratings(text: str) -> tuple[float, float] | None:
    """`(r_a, r_b)` from a judge reply, each clamped to [1, 10]; None when a rating is missing or given twice.

    A reply that rates A (or B) more than once is ambiguous, so it is rejected rather than guessed at.
    """
    if not isinstance(text, str):
        return None
    found_a = _PAIR_RE["a"].findall(text)
    found_b = _PAIR_RE["b"].findall(text)
    if len(found_a) != 1 or len(found_b) != 1:
        return None
    return _clamp_rating(found_a[0]), _clamp_rating(found_b[0])


def parse_rating(text: str) -> float | None:
    """The single 1-10 rating of a pointwise reply (clamped); None when absent or given more than once."""
    if not isinstance(text, str):
        return None
    found = _POINT_RE.findall(text)
    if len(found) != 1:
        return None
    return _clamp_rating(found[0])


def pair_outcome(r_a: float, r_b: float, tau: float = 0.1) -> tuple[float, float]:
    """`(v, w)`: A's outcome (1 win, 0.5 tie, 0 loss) and the comparison's confidence weight max(|r_a-r_b|/9, tau).

    The paper's main text states the outcome mapping reversed; this is the mapping of its appendix and code.
    """
    v = 1.0 if r_a > r_b else (0.5 if r_a == r_b else 0.0)
    return v, max(abs(r_a - r_b) / 9.0, tau)


_NUM_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalize_number(s: str) -> str:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return s
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str) -> str | None:
    """Final numeric answer of a math solution: `#### x`, `\\boxed{x}`, "answer is x", else the last number."""
    if not isinstance(text, str):
        return None
    for pattern in (r"####\s*([^\n]+)", r"\\boxed\{([^}]*)\}", r"answer\s*(?:is|:)\s*\$?\s*(-?[\d,]+(?:\.\d+)?)"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found:
            nums = _NUM_RE.findall(found[-1])
            if nums:
                return _normalize_number(nums[-1])
    nums = _NUM_RE.findall(text)
    return _normalize_number(nums[-1]) if nums else None


# ----------------------------------------------------------------------------------------------------------------
# Judge backends
# ----------------------------------------------------------------------------------------------------------------
class Judge(Protocol):
    """A judge backend: one reply per prompt. `calls` and `tokens` are running totals kept for cost accounting."""

    calls: int
    tokens: int

    def complete(self, prompts: Sequence[str]) -> list[str]: ...


class CallableJudge:
    """Wraps `fn(prompt) -> reply` (scripted judges in tests, or any custom client) as a `Judge`."""

    def __init__(self, fn: Callable[[str], str]):
        if not callable(fn):
            raise TypeError("CallableJudge needs a callable fn(prompt: str) -> str.")
        self.fn = fn
        self.calls = 0
        self.tokens = 0

    def complete(self, prompts: Sequence[str]) -> list[str]:
        self.calls += len(prompts)
        return [self.fn(p) for p in prompts]


class HFJudge:
    """A local transformers causal LM as judge: each `complete` is one left-padded batched `generate`
    (chunked by `batch_size`), the prompt wrapped in the tokenizer's chat template when it has one.

    Greedy by default so that the same pair always gets the same verdict (the tournament never re-asks a pair).
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        system_prompt: str | None = None,
        max_prompt_tokens: int | None = None,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.calls = 0
        self.tokens = 0
        self.truncated_prompts = 0

    def _render(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt

    @torch.no_grad()
    def complete(self, prompts: Sequence[str]) -> list[str]:
        replies: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            replies.extend(self._complete_batch([self._render(p) for p in prompts[start : start + self.batch_size]]))
        return replies

    def _complete_batch(self, texts: list[str]) -> list[str]:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"  # decoder-only batching: the new tokens must follow every prompt directly
        try:
            # Chat templates already carry the BOS/special tokens; adding them again would double them.
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        if self.max_prompt_tokens is not None and enc["input_ids"].shape[1] > self.max_prompt_tokens:
            # Keep the tail: it holds the rating instructions and the generation prompt.
            self.truncated_prompts += int((enc["attention_mask"].sum(1) > self.max_prompt_tokens).sum())
            enc = {k: v[:, -self.max_prompt_tokens :] for k, v in enc.items()}
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gen_kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "pad_token_id": pad_id}
        if self.do_sample:
            gen_kwargs.update(temperature=self.temperature, top_p=self.top_p)
        out = self.model.generate(**enc, **gen_kwargs)
        new = out[:, enc["input_ids"].shape[1] :]
        eos = tok.eos_token_id
        replies = []
        for row in new:
            ids = row.tolist()
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos) + 1]
            while ids and ids[-1] == pad_id and pad_id != eos:
                ids.pop()
            self.tokens += len(ids)
            replies.append(tok.decode(ids, skip_special_tokens=True))
        self.tokens += int(enc["attention_mask"].sum())
        self.calls += len(texts)
        return replies


class EndpointJudge:
    """An OpenAI-compatible chat endpoint (vLLM, TGI, llama.cpp server, hosted APIs) as judge.

    `base_url` is the API root, e.g. `http://127.0.0.1:8000/v1`; each prompt becomes one POST to
    `{base_url}/chat/completions`, up to `max_workers` in flight at once. Token counts come from the server's
    `usage` field when it reports one.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        timeout: float = 120.0,
        max_workers: int = 8,
        system_prompt: str | None = None,
        extra_body: dict | None = None,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL such as 'http://127.0.0.1:8000/v1', got {base_url!r}.")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}.")
        self.url = chat_completions_url(base_url)
        self.model = model
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.timeout = timeout
        self.max_workers = max_workers
        self.system_prompt = system_prompt
        self.extra_body = dict(extra_body or {})
        self.calls = 0
        self.tokens = 0
        self._lock = threading.Lock()

    def _post(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            **self.extra_body,
        }
        content, payload = post_chat_completion(self.url, body, api_key=self.api_key, timeout=self.timeout,
                                                what="Judge endpoint")
        usage = payload.get("usage") or {}
        with self._lock:
            self.calls += 1
            self.tokens += int(usage.get("total_tokens", 0) or 0)
        return content

    def complete(self, prompts: Sequence[str]) -> list[str]:
        if len(prompts) <= 1 or self.max_workers == 1:
            return [self._post(p) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(prompts))) as pool:
            return list(pool.map(self._post, prompts))


# ----------------------------------------------------------------------------------------------------------------
# Selectors
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """Outcome of a selector: the chosen candidate `index` and what it cost.

    `scores` is the per-candidate score the pick maximised (mu for pairwise, rating for pointwise, vote count for
    majority); `comparisons` lists `(i, j, r_i, r_j)` in judging order (ratings None when the reply did not parse).
    """

    index: int
    method: str
    scores: list[float] = field(default_factory=list)
    mean_ratings: list[float] = field(default_factory=list)
    comparisons: list[tuple[int, int, float | None, float | None]] = field(default_factory=list)
    calls: int = 0
    judge_tokens: int = 0
    parse_failures: int = 0


def _check_candidates(candidates: Sequence[str]) -> list[str]:
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError("candidates must be a sequence of strings (one per sampled solution).")
    if len(candidates) == 0:
        raise ValueError("candidates is empty: sample at least one solution before selecting.")
    bad = [i for i, c in enumerate(candidates) if not isinstance(c, str)]
    if bad:
        raise TypeError(f"candidates must be strings; entries {bad[:5]} are not.")
    return list(candidates)


class _Standings:
    """Running weighted-win sums and received ratings of a tournament."""

    def __init__(self, n: int, tau: float):
        self.n = n
        self.tau = tau
        self.win = [0.0] * n
        self.weight = [0.0] * n
        self.rating_sum = [0.0] * n
        self.rating_count = [0] * n
        self.opponents: list[set[int]] = [set() for _ in range(n)]
        self.pair_count: Counter = Counter()

    def mu(self, i: int) -> float:
        return self.win[i] / self.weight[i] if self.weight[i] > 0 else 0.5

    def mean_rating(self, i: int) -> float:
        return self.rating_sum[i] / self.rating_count[i] if self.rating_count[i] else 0.0

    def degree(self, i: int) -> int:
        return len(self.opponents[i])

    def record(self, i: int, j: int, r_i: float | None, r_j: float | None) -> None:
        if r_i is None or r_j is None:
            # An unparseable verdict carries no preference: count it as a tie at the floor weight.
            v, w = 0.5, self.tau
        else:
            v, w = pair_outcome(r_i, r_j, self.tau)
            self.rating_sum[i] += r_i
            self.rating_sum[j] += r_j
            self.rating_count[i] += 1
            self.rating_count[j] += 1
        self.win[i] += w * v
        self.weight[i] += w
        self.win[j] += w * (1.0 - v)
        self.weight[j] += w
        self.opponents[i].add(j)
        self.opponents[j].add(i)
        self.pair_count[(min(i, j), max(i, j))] += 1

    def best(self) -> int:
        return max(range(self.n), key=lambda i: (self.mu(i), self.mean_rating(i), -i))


class _PairJudging:
    """Shared by the tournament and round robin: renders pair prompts, randomises A/B order, parses verdicts."""

    def __init__(self, judge: Judge, template: str, position: str, rng: random.Random):
        if position not in ("random", "fixed", "both"):
            raise ValueError(f"position must be 'random', 'fixed' or 'both', got {position!r}.")
        for key in ("{problem}", "{solution_a}", "{solution_b}"):
            if key not in template:
                raise ValueError(f"judge template must contain {key}.")
        self.judge, self.template, self.position, self.rng = judge, template, position, rng
        self.calls = 0
        self.parse_failures = 0

    @property
    def calls_per_pair(self) -> int:
        return 2 if self.position == "both" else 1

    def judge_pairs(self, problem: str, candidates: list[str], pairs: list[tuple[int, int]]):
        """[(i, j, r_i, r_j)] for each pair, one batched `complete` for the whole round."""
        jobs = []  # (pair index, first shown, second shown)
        for k, (i, j) in enumerate(pairs):
            if self.position == "both":
                jobs += [(k, i, j), (k, j, i)]
            elif self.position == "random" and self.rng.random() < 0.5:
                jobs.append((k, j, i))
            else:
                jobs.append((k, i, j))
        prompts = [
            self.template.format(problem=problem, solution_a=candidates[a], solution_b=candidates[b])
            for _, a, b in jobs
        ]
        replies = self.judge.complete(prompts)
        if len(replies) != len(prompts):
            raise RuntimeError(f"judge returned {len(replies)} replies for {len(prompts)} prompts.")
        self.calls += len(prompts)
        sums: dict[int, list] = {}
        for (k, a, _), reply in zip(jobs, replies):
            parsed = parse_pair_ratings(reply)
            if parsed is None:
                self.parse_failures += 1
                continue
            i, _ = pairs[k]
            r_i, r_j = (parsed[0], parsed[1]) if a == i else (parsed[1], parsed[0])
            acc = sums.setdefault(k, [0.0, 0.0, 0])
            acc[0] += r_i
            acc[1] += r_j
            acc[2] += 1
        results = []
        for k, (i, j) in enumerate(pairs):
            if k in sums:
                r_i, r_j, c = sums[k]
                results.append((i, j, r_i / c, r_j / c))
            else:
                results.append((i, j, None, None))
        return results


class PairwiseTournament:
    """Budgeted, uncertainty-guided Swiss tournament (V1-Infer).

    Args:
        judge: a `Judge` backend (`HFJudge`, `EndpointJudge`, `CallableJudge`).
        budget: maximum judge calls per `select`; defaults to `budget_multiplier * N`. Never exceeded.
        budget_multiplier: m in B = m * N when `budget` is None (the paper uses m in {1, 2, 3}).
        min_degree: d_min, distinct opponents every candidate should meet in the coverage phase.
        window: W, how far down the standings a Swiss pairing may look for an opponent.
        tau: floor of the confidence weight, so that ties and near-ties still count.
        position: "random" (A/B order drawn per comparison against position bias), "fixed" (schedule order), or
            "both" (each comparison judged in both orders and averaged; costs two calls).
        allow_repeats: judge a pair again once every pair within the Swiss window has been seen. Only useful with
            a sampling judge; a greedy judge repeats its verdict, so by default the tournament stops early instead.
        template: the pairwise judge prompt with `{problem}`, `{solution_a}`, `{solution_b}`.
        seed: seeds the random round and A/B draws; the same seed gives the same schedule and pick.
    """

    def __init__(
        self,
        judge: Judge,
        budget: int | None = None,
        budget_multiplier: float = 2.0,
        min_degree: int = 2,
        window: int = 8,
        tau: float = 0.1,
        position: str = "random",
        allow_repeats: bool = False,
        template: str = MATH_JUDGE_TEMPLATE,
        seed: int = 0,
    ):
        if not hasattr(judge, "complete"):
            raise TypeError("judge must have a complete(prompts) -> list[str] method (e.g. HFJudge, EndpointJudge).")
        if budget is not None and (not isinstance(budget, int) or budget < 0):
            raise ValueError(f"budget must be a non-negative int or None, got {budget!r}.")
        if budget_multiplier <= 0:
            raise ValueError(f"budget_multiplier must be > 0, got {budget_multiplier}.")
        if min_degree < 0:
            raise ValueError(f"min_degree must be >= 0, got {min_degree}.")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}.")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau}.")
        self.judge = judge
        self.budget = budget
        self.budget_multiplier = budget_multiplier
        self.min_degree = min_degree
        self.window = window
        self.tau = tau
        self.position = position
        self.allow_repeats = allow_repeats
        self.template = template
        self.seed = seed
        _PairJudging(judge, template, position, random.Random(0))  # validate template/position eagerly

    def budget_for(self, n: int) -> int:
        return self.budget if self.budget is not None else math.floor(self.budget_multiplier * n)

    def select(self, problem: str, candidates: Sequence[str]) -> Selection:
        candidates = _check_candidates(candidates)
        n = len(candidates)
        rng = random.Random(self.seed)
        judging = _PairJudging(self.judge, self.template, self.position, rng)
        tokens_before = getattr(self.judge, "tokens", 0)
        board = _Standings(n, self.tau)
        comparisons: list = []
        budget = self.budget_for(n)
        per_pair = judging.calls_per_pair

        def room() -> int:
            return (budget - judging.calls) // per_pair

        def play(pairs: list[tuple[int, int]]) -> None:
            for i, j, r_i, r_j in judging.judge_pairs(problem, candidates, pairs):
                board.record(i, j, r_i, r_j)
                comparisons.append((i, j, r_i, r_j))

        if n >= 2:
            # P0: a random perfect matching gives every candidate a first score cheaply.
            order = list(range(n))
            rng.shuffle(order)
            pairs = [(order[k], order[k + 1]) for k in range(0, n - 1, 2)][: max(room(), 0)]
            if pairs:
                play(pairs)

            # P1: coverage, so that no candidate's mu rests on a single (possibly noisy) verdict.
            while room() > 0:
                deficient = sorted(
                    (i for i in range(n) if board.degree(i) < self.min_degree and board.degree(i) < n - 1),
                    key=lambda i: (board.degree(i), i),
                )
                if not deficient:
                    break
                used: set[int] = set()
                pairs = []
                for i in deficient:
                    if len(pairs) >= room():
                        break
                    if i in used:
                        continue
                    options = [j for j in range(n) if j != i and j not in used and j not in board.opponents[i]]
                    if not options:
                        continue
                    j = min(options, key=lambda j: (abs(board.mu(i) - board.mu(j)), board.degree(j), j))
                    pairs.append((i, j))
                    used.update((i, j))
                if not pairs:
                    break
                play(pairs)

            # P2: Swiss refinement spends the rest of the budget where the standings are closest.
            while room() > 0:
                ranked = sorted(range(n), key=lambda i: (-board.mu(i), -board.mean_rating(i), i))
                paired: set[int] = set()
                pairs = []
                for pos, i in enumerate(ranked):
                    if len(pairs) >= room():
                        break
                    if i in paired:
                        continue
                    options = [j for j in ranked[pos + 1 : pos + 1 + self.window] if j not in paired]
                    if not self.allow_repeats:
                        options = [j for j in options if j not in board.opponents[i]]
                    if not options:
                        continue
                    j = min(
                        options,
                        key=lambda j: (
                            j in board.opponents[i],
                            abs(board.mu(i) - board.mu(j)),
                            board.pair_count[(min(i, j), max(i, j))],
                            ranked.index(j),
                        ),
                    )
                    pairs.append((i, j))
                    paired.update((i, j))
                if not pairs:
                    break
                play(pairs)

        return Selection(
            index=board.best(),
            method="v1_tournament",
            scores=[board.mu(i) for i in range(n)],
            mean_ratings=[board.mean_rating(i) for i in range(n)],
            comparisons=comparisons,
            calls=judging.calls,
            judge_tokens=getattr(self.judge, "tokens", 0) - tokens_before,
            parse_failures=judging.parse_failures,
        )


def round_robin(
    judge: Judge,
    problem: str,
    candidates: Sequence[str],
    tau: float = 0.1,
    position: str = "random",
    template: str = MATH_JUDGE_TEMPLATE,
    seed: int = 0,
) -> Selection:
    """All N(N-1)/2 pairs judged in one round and aggregated like the tournament: the pairwise upper bound."""
    candidates = _check_candidates(candidates)
    n = len(candidates)
    judging = _PairJudging(judge, template, position, random.Random(seed))
    tokens_before = getattr(judge, "tokens", 0)
    board = _Standings(n, tau)
    comparisons = []
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if pairs:
        for i, j, r_i, r_j in judging.judge_pairs(problem, candidates, pairs):
            board.record(i, j, r_i, r_j)
            comparisons.append((i, j, r_i, r_j))
    return Selection(
        index=board.best(),
        method="round_robin",
        scores=[board.mu(i) for i in range(n)],
        mean_ratings=[board.mean_rating(i) for i in range(n)],
        comparisons=comparisons,
        calls=judging.calls,
        judge_tokens=getattr(judge, "tokens", 0) - tokens_before,
        parse_failures=judging.parse_failures,
    )


class PointwiseSelector:
    """Pointwise self-verification: one 1-10 rating per candidate, argmax (first index on ties, as in the paper).

    A reply without a parseable rating scores 0, below any valid rating.
    """

    def __init__(self, judge: Judge, template: str = MATH_POINTWISE_TEMPLATE):
        if not hasattr(judge, "complete"):
            raise TypeError("judge must have a complete(prompts) -> list[str] method.")
        for key in ("{problem}", "{solution}"):
            if key not in template:
                raise ValueError(f"pointwise template must contain {key}.")
        self.judge = judge
        self.template = template

    def select(self, problem: str, candidates: Sequence[str]) -> Selection:
        candidates = _check_candidates(candidates)
        tokens_before = getattr(self.judge, "tokens", 0)
        replies = self.judge.complete([self.template.format(problem=problem, solution=c) for c in candidates])
        if len(replies) != len(candidates):
            raise RuntimeError(f"judge returned {len(replies)} replies for {len(candidates)} prompts.")
        ratings = [parse_rating(r) for r in replies]
        scores = [r if r is not None else 0.0 for r in ratings]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return Selection(
            index=best,
            method="pointwise",
            scores=scores,
            mean_ratings=scores,
            calls=len(candidates),
            judge_tokens=getattr(self.judge, "tokens", 0) - tokens_before,
            parse_failures=sum(r is None for r in ratings),
        )


def majority_vote(
    candidates: Sequence[str], extract: Callable[[str], str | None] = extract_answer
) -> Selection:
    """Self-consistency: the first candidate whose extracted answer is the most frequent one (no model calls).

    Candidates without an extractable answer do not vote; if none has one, the first candidate is returned.
    """
    candidates = _check_candidates(candidates)
    answers = [extract(c) for c in candidates]
    counts = Counter(a for a in answers if a is not None)
    scores = [float(counts[a]) if a is not None else 0.0 for a in answers]
    if not counts:
        return Selection(index=0, method="majority_vote", scores=scores)
    top = max(counts.values())
    index = next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)
    return Selection(index=index, method="majority_vote", scores=scores)


def random_pick(candidates: Sequence[str], seed: int = 0) -> Selection:
    """Uniformly random candidate: the floor every selector must beat."""
    candidates = _check_candidates(candidates)
    return Selection(index=random.Random(seed).randrange(len(candidates)), method="random")


@torch.no_grad()
def v1_generate(
    model,
    tokenizer,
    problem: str,
    n: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 0.95,
    system_prompt: str | None = None,
) -> list[str]:
    """Sample `n` candidate solutions for `problem` in one batched `generate` (the candidates V1-Infer ranks)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": problem}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(problem, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        **enc,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        num_return_sequences=n,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
    )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
