import re

import pytest
import torch

from hf_fastslow.generation.v1_infer import (
    CallableJudge,
    EndpointJudge,
    HFJudge,
    PairwiseTournament,
    PointwiseSelector,
    extract_answer,
    majority_vote,
    pair_outcome,
    parse_pair_ratings,
    parse_rating,
    random_pick,
    round_robin,
    v1_generate,
)
from hf_fastslow.generation.v1_tournament import _Standings
from tests.chat_server import ScriptedChatServer
from tests.conftest import byte_tokenizer, tiny_llama

torch.set_num_threads(1)


_SOL_RE = re.compile(r"Solution A:\n(.*?)\n\nSolution B:\n(.*?)\n\n", re.DOTALL)


def quality(solution: str) -> int:
    return int(re.search(r"q=(\d+)", solution).group(1))


def half_quality(solution: str) -> float:
    return 1 + quality(solution) / 2  # keeps qualities up to 18 distinct inside the [1, 10] rating scale


def scripted_pair_judge(rate=half_quality):
    """Rates each shown solution by `rate(solution)`; records every prompt it sees."""
    seen = []

    def fn(prompt):
        a, b = _SOL_RE.search(prompt).groups()
        seen.append((a, b))
        return f"Rating A: {rate(a)}\nRating B: {rate(b)}"

    judge = CallableJudge(fn)
    judge.seen = seen
    return judge


def candidates_with_qualities(qualities):
    return [f"candidate {i} q={q}" for i, q in enumerate(qualities)]


# ------------------------------------------------------------------------------------------------ parsing / scoring
def test_parse_pair_ratings_clamps_and_rejects_ambiguous():
    assert parse_pair_ratings("Rating A: 7\nRating B: 3") == (7.0, 3.0)
    assert parse_pair_ratings("rating for solution a = 12, Rating B: 0") == (10.0, 1.0)
    assert parse_pair_ratings("Rating A: 7") is None
    assert parse_pair_ratings("Rating A: 7\nRating B: 3\nRating A: 9") is None
    assert parse_pair_ratings("A is better, 9 vs 2") is None
    assert parse_pair_ratings(None) is None


def test_parse_rating():
    assert parse_rating("Rating: 8") == 8.0
    assert parse_rating("Rating: 42") == 10.0
    assert parse_rating("I think 8") is None
    assert parse_rating("Rating: 8 Rating: 2") is None


def test_pair_outcome_mapping_and_weight_floor():
    assert pair_outcome(9, 2) == (1.0, 7 / 9)
    assert pair_outcome(2, 9) == (0.0, 7 / 9)
    assert pair_outcome(5, 5, tau=0.1) == (0.5, 0.1)
    assert pair_outcome(5, 6, tau=0.3) == (0.0, 0.3)


def test_standings_hand_computed_three_nodes():
    board = _Standings(3, tau=0.1)
    assert [board.mu(i) for i in range(3)] == [0.5, 0.5, 0.5]  # no comparisons yet
    board.record(0, 1, 10, 1)  # w = 1, 0 wins
    board.record(1, 2, 4, 4)  # tie: w = tau, half credit each
    board.record(2, 0, 7, 4)  # w = 1/3, 2 wins
    assert board.mu(0) == pytest.approx(1.0 / (1 + 1 / 3))
    assert board.mu(1) == pytest.approx(0.05 / 1.1)
    assert board.mu(2) == pytest.approx((0.05 + 1 / 3) / (0.1 + 1 / 3))
    assert board.best() == 2  # 0.885 > 0.75: its one win was weighted 1/3 against a tau-weighted tie
    assert board.mean_rating(0) == pytest.approx(7.0)


def test_extract_answer_forms():
    assert extract_answer("so 3+4 = 7\n#### 1,234") == "1234"
    assert extract_answer("The answer is $18.") == "18"
    assert extract_answer("we get \\boxed{42.0}") == "42"
    assert extract_answer("first 3 then 5") == "5"
    assert extract_answer("no digits") is None


# ------------------------------------------------------------------------------------------------ tournament
@pytest.mark.parametrize("n", [6, 8, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tournament_picks_best_of_known_order(n, seed):
    qualities = list(range(1, n + 1))
    import random

    random.Random(seed).shuffle(qualities)
    cands = candidates_with_qualities(qualities)
    judge = scripted_pair_judge()
    pick = PairwiseTournament(judge, budget_multiplier=2, seed=seed).select("p", cands)
    assert quality(cands[pick.index]) == n
    assert pick.calls == judge.calls <= 2 * n


def test_round_robin_ranking_matches_known_order():
    qualities = [3, 9, 1, 7, 5, 8]
    cands = candidates_with_qualities(qualities)
    judge = scripted_pair_judge()
    pick = round_robin(judge, "p", cands)
    assert pick.calls == 15
    by_mu = sorted(range(6), key=lambda i: -pick.scores[i])
    assert [qualities[i] for i in by_mu] == sorted(qualities, reverse=True)
    assert pick.index == 1


@pytest.mark.parametrize("position", ["random", "fixed", "both"])
@pytest.mark.parametrize("n", [2, 5, 8])
def test_budget_never_exceeded(position, n):
    for budget in range(n * (n - 1) // 2 + 6):
        judge = scripted_pair_judge()
        pick = PairwiseTournament(judge, budget=budget, position=position, allow_repeats=True).select(
            "p", candidates_with_qualities(range(n))
        )
        assert pick.calls <= budget
        assert judge.calls == pick.calls
        # the whole budget is used when repeats are allowed (up to a whole number of calls per pair)
        per_pair = 2 if position == "both" else 1
        assert pick.calls == (budget // per_pair) * per_pair


def test_no_repeats_and_min_degree_coverage():
    n, d_min = 9, 2
    budget = -(-n * d_min // 2) + n // 2  # ceil(N*d_min/2) + floor(N/2)
    judge = scripted_pair_judge()
    pick = PairwiseTournament(judge, budget=budget, min_degree=d_min, seed=3).select(
        "p", candidates_with_qualities([4] * n)
    )
    pairs = [(min(i, j), max(i, j)) for i, j, _, _ in pick.comparisons]
    assert len(pairs) == len(set(pairs)) == pick.calls <= budget
    degree = [sum(i in p for p in pairs) for i in range(n)]
    assert min(degree) >= d_min


def test_greedy_judge_stops_when_all_pairs_seen():
    judge = scripted_pair_judge()
    pick = PairwiseTournament(judge, budget=100, window=8).select("p", candidates_with_qualities([1, 2, 3, 4]))
    assert pick.calls == 6  # all pairs once, no repeats, budget not padded out


def test_ties_give_half_credit_and_lowest_index():
    judge = scripted_pair_judge(rate=lambda s: 5)
    pick = PairwiseTournament(judge, budget_multiplier=2).select("p", candidates_with_qualities([1] * 6))
    assert pick.scores == [0.5] * 6
    assert pick.index == 0


def test_malformed_verdicts_are_ties_not_errors():
    judge = CallableJudge(lambda p: "I cannot decide.")
    pick = PairwiseTournament(judge, budget=5).select("p", ["x", "y", "z", "w"])
    assert pick.parse_failures == pick.calls == 5
    assert pick.scores == [0.5] * 4 and pick.index == 0


def test_oracle_judge_beats_saturated_pointwise():
    # (10,3) correct vs wrong, (9,9) both correct, (4,4) both wrong; pointwise always says 10.
    def rate_pair(prompt):
        a, b = _SOL_RE.search(prompt).groups()
        ca, cb = "correct" in a, "correct" in b
        if ca and cb:
            return "Rating A: 9\nRating B: 9"
        if not ca and not cb:
            return "Rating A: 4\nRating B: 4"
        return "Rating A: 10\nRating B: 3" if ca else "Rating A: 3\nRating B: 10"

    for n in (6, 8, 16):
        for seed in range(3):
            cands = [f"sol {i} " + ("correct" if i in (n - 1, n // 2) else "wrong") for i in range(n)]
            point = PointwiseSelector(CallableJudge(lambda p: "Rating: 10")).select("p", cands)
            assert point.index == 0 and point.calls == n
            pick = PairwiseTournament(CallableJudge(rate_pair), budget_multiplier=2, seed=seed).select("p", cands)
            assert "correct" in cands[pick.index]


def test_same_seed_same_schedule_and_pick():
    cands = candidates_with_qualities([3, 1, 4, 1, 5, 9, 2, 6])
    a = PairwiseTournament(scripted_pair_judge(), seed=7).select("p", cands)
    b = PairwiseTournament(scripted_pair_judge(), seed=7).select("p", cands)
    assert a.comparisons == b.comparisons and a.index == b.index


def test_positions_are_randomised_and_both_orders_average():
    judge = scripted_pair_judge()
    PairwiseTournament(judge, budget=28, position="random", seed=0).select("p", candidates_with_qualities(range(8)))
    first_shown = [quality(a) < quality(b) for a, b in judge.seen]
    assert any(first_shown) and not all(first_shown)

    biased = CallableJudge(lambda p: "Rating A: 8\nRating B: 2")  # always prefers whatever is shown first
    pick = PairwiseTournament(biased, budget=12, position="both").select("p", ["u", "v", "w", "x"])
    assert all(r_i == r_j == 5.0 for _, _, r_i, r_j in pick.comparisons)  # the bias cancels


def test_single_candidate_costs_nothing():
    judge = scripted_pair_judge()
    pick = PairwiseTournament(judge).select("p", ["only q=1"])
    assert pick.index == 0 and pick.calls == 0 and judge.calls == 0


# ------------------------------------------------------------------------------------------------ baselines
def test_majority_vote():
    cands = ["... #### 5", "... #### 7", "answer is 7", "so 5", "#### 7"]
    pick = majority_vote(cands)
    assert pick.index == 1 and pick.calls == 0 and pick.scores == [2.0, 3.0, 3.0, 2.0, 3.0]
    assert majority_vote(["no", "numbers"]).index == 0
    assert majority_vote(["#### 5", "#### 7"]).index == 0  # tie -> first


def test_pointwise_selector():
    ratings = {"a": "Rating: 3", "b": "Rating: 9", "c": "garbled", "d": "Rating: 9"}
    judge = CallableJudge(lambda p: ratings[p.split("Solution:\n")[1][0]])
    pick = PointwiseSelector(judge).select("p", ["a", "b", "c", "d"])
    assert pick.index == 1 and pick.calls == 4 and pick.parse_failures == 1
    assert pick.scores == [3.0, 9.0, 0.0, 9.0]


def test_random_pick_is_seeded():
    assert random_pick(list("abcdef"), seed=1).index == random_pick(list("abcdef"), seed=1).index


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_errors():
    judge = scripted_pair_judge()
    tour = PairwiseTournament(judge)
    with pytest.raises(ValueError, match="empty"):
        tour.select("p", [])
    with pytest.raises(TypeError, match="sequence of strings"):
        tour.select("p", "abc")
    with pytest.raises(TypeError, match="strings"):
        tour.select("p", ["a", 3])
    with pytest.raises(ValueError, match="budget"):
        PairwiseTournament(judge, budget=-1)
    with pytest.raises(ValueError, match="tau"):
        PairwiseTournament(judge, tau=0.0)
    with pytest.raises(ValueError, match="position"):
        PairwiseTournament(judge, position="left")
    with pytest.raises(ValueError, match="solution_b"):
        PairwiseTournament(judge, template="{problem} {solution_a}")
    with pytest.raises(TypeError, match="complete"):
        PairwiseTournament(lambda p: p)
    with pytest.raises(ValueError, match="base_url"):
        EndpointJudge("127.0.0.1:8000", model="m")
    with pytest.raises(ValueError, match="empty"):
        majority_vote([])
    with pytest.raises(ValueError, match="n must be"):
        v1_generate(None, None, "p", n=0)


def test_judge_returning_wrong_count_is_an_error():
    class Short:
        calls = tokens = 0

        def complete(self, prompts):
            return prompts[:-1]

    with pytest.raises(RuntimeError, match="replies"):
        PairwiseTournament(Short(), budget=4).select("p", ["a", "b", "c", "d"])


# ------------------------------------------------------------------------------------------------ endpoint backend
def _judge_reply(status=200):
    def respond(body):
        if status != 200:
            return status
        a, b = _SOL_RE.search(body["messages"][-1]["content"]).groups()
        return f"Rating A: {half_quality(a)}\nRating B: {half_quality(b)}"

    return respond


_USAGE = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}


def test_endpoint_judge_drives_tournament():
    with ScriptedChatServer(_judge_reply(), usage=_USAGE) as srv:
        judge = EndpointJudge(srv.url, model="judge-model", api_key="k", max_tokens=16, max_workers=4)
        cands = candidates_with_qualities([2, 8, 5, 1, 7, 3])
        pick = PairwiseTournament(judge, budget_multiplier=2).select("What is 2+2?", cands)
    assert quality(cands[pick.index]) == 8
    assert pick.calls == len(srv.requests) == judge.calls <= 12
    assert pick.judge_tokens == 12 * pick.calls
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k"
    assert req["body"]["model"] == "judge-model" and req["body"]["max_tokens"] == 16
    assert "What is 2+2?" in req["body"]["messages"][-1]["content"]


def test_endpoint_http_error_is_reported():
    with ScriptedChatServer(_judge_reply(status=503), usage=_USAGE) as srv:
        judge = EndpointJudge(srv.url, model="m")
        with pytest.raises(RuntimeError, match="HTTP 503"):
            PairwiseTournament(judge, budget=2).select("p", ["a", "b"])


# ------------------------------------------------------------------------------------------------ local HF backend
def test_hf_judge_batched_generate_and_tournament():
    tok = byte_tokenizer()
    model = tiny_llama(vocab=len(tok), seed=0)
    judge = HFJudge(model, tok, max_new_tokens=4, batch_size=3)
    replies = judge.complete(["one", "two two", "three three three", "four"])
    assert len(replies) == 4 and all(isinstance(r, str) for r in replies)
    assert judge.calls == 4 and judge.tokens > 0
    # Batched replies equal one-at-a-time replies: left padding does not change greedy outputs.
    prompts = ["one", "two two", "three three three", "four"]
    single = HFJudge(model, tok, max_new_tokens=4, batch_size=1).complete(prompts)
    assert single == replies
    pick = PairwiseTournament(judge, budget=5).select("p", ["a", "b", "c", "d", "e"])
    assert 0 <= pick.index < 5 and pick.calls <= 5 and pick.judge_tokens > 0
    point = PointwiseSelector(judge).select("p", ["a", "b"])
    assert point.calls == 2


def test_v1_generate_samples_n_candidates():
    tok = byte_tokenizer()
    model = tiny_llama(vocab=len(tok), seed=1)
    torch.manual_seed(0)
    cands = v1_generate(model, tok, "2+2?", n=3, max_new_tokens=5)
    assert len(cands) == 3 and all(isinstance(c, str) for c in cands)
