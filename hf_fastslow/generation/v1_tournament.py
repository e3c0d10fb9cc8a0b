"""V1-Infer's pairwise selectors: the budgeted, uncertainty-guided `PairwiseTournament` and its all-pairs upper
bound `round_robin`, with the `Selection` every selector returns."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .v1_judges import Judge
from .v1_verdicts import MATH_JUDGE_TEMPLATE, pair_outcome, parse_pair_ratings


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
