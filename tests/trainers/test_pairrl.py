import math

import pytest
import torch
from datasets import Dataset

from hf_fastslow.trainers import PairRLConfig, PairRLTrainer, VerifiableTask
from hf_fastslow.trainers.pairrl_trainer import VERIFY_ROLE, PairwiseVerificationReward, SolverReward
from tests.conftest import byte_tokenizer, tiny_llama

torch.set_num_threads(1)


class ParityTask(VerifiableTask):
    """Solved when the completion's first character has an even code point: about half of a random model's samples."""

    def score(self, prompt, completion, **columns):
        if not completion:
            return 0.0, "empty"
        ok = ord(completion[0]) % 2 == 0
        return float(ok), "even first character" if ok else "odd first character"


def make_dataset(n=8):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"task {i}"}] for i in range(n)]})


def make_args(tmp_path, **kw):
    base = {
        "output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "report_to": "none", "save_strategy": "no",
        "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 6, "max_steps": 2,
        "learning_rate": 1e-3, "logging_steps": 1, "seed": 0, "max_solution_tokens": 8,
    }
    base.update(kw)
    return PairRLConfig(**base)


def make_trainer(tmp_path, seed=0, **kw):
    tok = byte_tokenizer()
    return PairRLTrainer(
        model=tiny_llama(vocab=len(tok), seed=seed), reward_funcs=ParityTask(), args=make_args(tmp_path, **kw),
        train_dataset=make_dataset(), processing_class=tok,
    )


# ------------------------------------------------------------------------------------------------ end to end
def test_train_end_to_end_updates_weights_and_logs_both_roles(tmp_path):
    trainer = make_trainer(tmp_path)
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    changed = any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
    assert changed
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    keys = set().union(*logs)
    assert "rewards/ParityTask/mean" in keys  # solver phase
    assert "verifier/rewards/pairwise_verification/mean" in keys  # judge phase, moved under verifier/
    assert "verifier/judge_rows" in keys and "verifier/parse_failure_rate" in keys
    assert max(h["verifier/judge_rows"] for h in logs) > 0  # the judge phase really ran
    assert not any(isinstance(v, float) and math.isnan(v) for h in logs for v in h.values())


def test_verifier_weight_zero_equals_grpo(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    tok = byte_tokenizer()
    pair = PairRLTrainer(
        model=tiny_llama(vocab=len(tok), seed=0), reward_funcs=ParityTask(),
        args=make_args(tmp_path / "p", verifier_weight=0.0), train_dataset=make_dataset(), processing_class=tok,
    )
    grpo_args = GRPOConfig(
        output_dir=str(tmp_path / "g"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        per_device_train_batch_size=4, num_generations=2, max_completion_length=6, max_steps=2,
        learning_rate=1e-3, logging_steps=1, seed=0,
    )
    grpo = GRPOTrainer(
        model=tiny_llama(vocab=len(tok), seed=0), reward_funcs=ParityTask(), args=grpo_args,
        train_dataset=make_dataset(), processing_class=tok,
    )
    # Both runs start from the same global RNG state (sampling draws from it).
    torch.manual_seed(0)
    pair.train()
    torch.manual_seed(0)
    grpo.train()
    pl = [h["loss"] for h in pair.state.log_history if "loss" in h]
    gl = [h["loss"] for h in grpo.state.log_history if "loss" in h]
    assert pl == pytest.approx(gl, abs=1e-6)
    for (n1, p1), (_, p2) in zip(pair.model.named_parameters(), grpo.model.named_parameters()):
        assert torch.allclose(p1, p2, atol=1e-6), n1


def test_callers_config_is_left_unchanged(tmp_path):
    # The trainer appends the verification reward's weight to reward_weights: on its own copy, never the caller's.
    args = make_args(tmp_path, reward_weights=[2.0], max_steps=1)
    before = args.to_dict()
    tok = byte_tokenizer()
    trainer = PairRLTrainer(model=tiny_llama(vocab=len(tok)), reward_funcs=ParityTask(), args=args,
                            train_dataset=make_dataset(), processing_class=tok)
    assert trainer.args.reward_weights == [2.0, 1.0] and args.reward_weights == [2.0]
    trainer.train()
    assert args.to_dict() == before
    # The same config builds a second trainer (with the old in-place append it had 2 weights for 1 task function).
    again = PairRLTrainer(model=tiny_llama(vocab=len(tok)), reward_funcs=ParityTask(), args=args,
                          train_dataset=make_dataset(), processing_class=tok)
    assert again.args.reward_weights == [2.0, 1.0] and args.to_dict() == before


# ------------------------------------------------------------------------------------------------ reward contract
def test_solver_reward_is_none_on_judge_rows():
    calls = []

    def exact(prompts, completions, **kw):
        calls.append(list(completions))
        return [1.0 if c == "7" else 0.0 for c in completions]

    wrapped = SolverReward(exact)
    assert wrapped.__name__ == "exact"
    assert wrapped(["p", "p"], ["7", "3"]) == [1.0, 0.0]
    roles = ["solve", VERIFY_ROLE, "solve"]
    assert wrapped(["p"] * 3, ["7", "x", "3"], role=roles, answer=["7", "7", "7"]) == [1.0, None, 0.0]
    assert calls[-1] == ["7", "3"]  # the judge row never reached the task
    assert wrapped(["p"], ["x"], role=[VERIFY_ROLE]) == [None]


def test_verification_reward_tolerance_and_parse_failures():
    logged = {}
    fn = PairwiseVerificationReward(tolerance=0.2)
    replies = ["Rating A: 10\nRating B: 1", "Rating A: 9\nRating B: 2", "Rating A: 8\nRating B: 3",
               "Rating A: 10\nRating B: 5", "no verdict", "Rating A: 9\nRating B: 9"]
    labels = [[1, 0]] * 5 + [[1, 1]]
    out = fn(["p"] * 6, replies, role=[VERIFY_ROLE] * 6, pair_labels=labels,
             log_metric=lambda k, v: logged.setdefault(k, v))
    assert out == [1.0, 1.0, 0.0, 0.5, 0.0, 1.0]
    assert logged["parse_failure_rate"] == pytest.approx(1 / 6)
    assert logged["pair_accuracy"] == pytest.approx(4 / 4)  # the 4 parsed mixed pairs all rank the correct one higher
    strict = PairwiseVerificationReward(tolerance=0.2, require_both=True)
    assert strict(["p"], ["Rating A: 10\nRating B: 5"], role=[VERIFY_ROLE], pair_labels=[[1, 0]]) == [0.0]
    # Not applicable to solver rows (no role column, or another role).
    assert fn(["p", "p"], ["a", "b"]) == [None, None]
    assert fn(["p"], ["Rating A: 10\nRating B: 1"], role=["solve"], pair_labels=[[1, 0]]) == [None]


# ------------------------------------------------------------------------------------------------ pairing rules
def _batch(scores, g, prompt="q"):
    n = len(scores)
    inputs = [{"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": f"{prompt}{i // g}"}],
               "answer": str(i // g)} for i in range(n)]
    return {
        "inputs": inputs,
        "prompts": [x["prompt"] for x in inputs],
        "completions": [[{"role": "assistant", "content": f"sol{i}"}] for i in range(n)],
        "rewards_per_func": torch.tensor([[s, float("nan")] for s in scores]),
    }


def test_judge_rows_never_pair_two_wrong_solutions(tmp_path):
    trainer = make_trainer(tmp_path, num_generations=4, per_device_train_batch_size=4, pairs_per_problem=2)
    # group 0: one correct (sol1); group 1: none correct; group 2: all correct
    scores = [0, 1, 0, 0] + [0, 0, 0, 0] + [1, 1, 1, 1]
    rows = trainer._build_judge_rows(_batch(scores, 4))
    assert len(rows) == 3 * 2 * 4  # groups x pairs_per_problem x num_generations: the batch size is fixed
    for start in range(0, len(rows), 4):
        group = rows[start:start + 4]
        assert all(r == group[0] for r in group)  # one pair, judged num_generations times
    for row in rows:
        assert row["role"] == VERIFY_ROLE
        assert max(row["pair_labels"]) == 1.0  # never incorrect-incorrect
        text = row["prompt"][-1]["content"]
        assert row["prompt"][0] == {"role": "system", "content": "sys"}  # the solver's system turn is kept
        shown = [int(s) for s in __import__("re").findall(r"sol(\d+)", text)]
        assert len(shown) == 2 and all(i // 4 == int(row["answer"]) for i in shown)  # both from one problem
        assert not any(4 <= i < 8 for i in shown)  # the all-wrong problem builds no judge rows
        assert row["pair_labels"] == [float(scores[i] >= 1.0) for i in shown]


def test_a_pair_qualifies_whichever_member_is_correct(tmp_path):
    # Only the last rollout is correct: every qualifying pair has it as its *second* member (pairs are built in
    # rollout order), so a rule that looked only at the first member would build no judge rows at all.
    trainer = make_trainer(tmp_path, num_generations=4, per_device_train_batch_size=4, pairs_per_problem=3,
                           swap_positions=False)
    rows = trainer._build_judge_rows(_batch([0, 0, 0, 1], 4))
    assert len(rows) == 3 * 4
    pairs = set()
    for row in rows:
        shown = tuple(int(s) for s in __import__("re").findall(r"sol(\d+)", row["prompt"][-1]["content"]))
        pairs.add(shown)
        assert row["pair_labels"] == [0.0, 1.0]
    assert pairs == {(0, 3), (1, 3), (2, 3)}  # each eligible pair once before any repeats


def test_no_correct_solution_anywhere_skips_judge_phase(tmp_path):
    trainer = make_trainer(tmp_path)
    assert trainer._build_judge_rows(_batch([0, 0, 0, 0], 2)) == []


def test_solutions_are_truncated_in_judge_prompts(tmp_path):
    trainer = make_trainer(tmp_path, max_solution_tokens=3)
    batch = _batch([1, 0], 2)
    batch["completions"] = ["abcdefgh", "ijklmnop"]
    rows = trainer._build_judge_rows(batch)
    text = rows[0]["prompt"][-1]["content"]
    assert "abc\n" in text and "abcd" not in text and "ijk\n" in text


def test_verifier_weight_scales_judge_advantages_exactly(tmp_path, monkeypatch):
    from trl import GRPOTrainer

    trainer = make_trainer(tmp_path, verifier_weight=0.25)
    trainer.model.train()

    def fake_phase(self, inputs):
        n = len(inputs)
        verify = inputs[0].get("role") == VERIFY_ROLE
        if not verify:
            self._pairrl_solver_batch = _batch([1.0, 0.0] * (n // 2), 2)
        width = 5 if verify else 3
        return {
            "prompt_ids": torch.full((n, width), 7), "prompt_mask": torch.ones(n, width, dtype=torch.long),
            "completion_ids": torch.full((n, 2), 9), "completion_mask": torch.ones(n, 2, dtype=torch.long),
            "advantages": torch.full((n,), 2.0), "num_items_in_batch": torch.tensor(2 * n),
        }

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", fake_phase)
    out = trainer._generate_and_score_completions([{"prompt": "p"}] * 4)
    assert out["advantages"].tolist() == [2.0] * 4 + [0.5] * 4
    assert out["prompt_ids"].shape == (8, 5)
    assert out["prompt_mask"][:4].tolist() == [[0, 0, 1, 1, 1]] * 4  # solver prompts left-padded
    assert int(out["num_items_in_batch"]) == 16


# ------------------------------------------------------------------------------------------------ bad config
def test_bad_config_errors(tmp_path):
    with pytest.raises(ValueError, match="num_generations=1"):
        PairRLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, num_generations=1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bf16=True"):
            PairRLConfig(output_dir=str(tmp_path), bf16=True)
    with pytest.raises(ValueError, match="verifier_weight"):
        PairRLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, verifier_weight=-1.0)
    with pytest.raises(ValueError, match="reward_tolerance"):
        PairRLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, reward_tolerance=1.5)
    with pytest.raises(ValueError, match="solution_b"):
        PairRLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, judge_template="{problem} {solution_a}")
    with pytest.raises(ValueError, match="sum_then_normalize"):
        PairRLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False,
                     multi_objective_aggregation="normalize_then_sum")


def test_bad_trainer_inputs(tmp_path):
    from trl import GRPOConfig

    tok = byte_tokenizer()
    model = tiny_llama(vocab=len(tok))
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        PairRLTrainer(model, ParityTask(), args=args, train_dataset=Dataset.from_dict({"prompt": []}),
                      processing_class=tok)
    with pytest.raises(ValueError, match="'prompt' column"):
        PairRLTrainer(model, ParityTask(), args=args, train_dataset=Dataset.from_dict({"q": ["a"]}),
                      processing_class=tok)
    with pytest.raises(TypeError, match="reward models"):
        PairRLTrainer(model, "some/reward-model", args=args, train_dataset=make_dataset(), processing_class=tok)
    with pytest.raises(ValueError, match="reward_funcs"):
        PairRLTrainer(model, [], args=args, train_dataset=make_dataset(), processing_class=tok)
    with pytest.raises(TypeError, match="PairRLConfig"):
        PairRLTrainer(model, ParityTask(), args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False),
                      train_dataset=make_dataset(), processing_class=tok)
    with pytest.raises(ValueError, match="correctness_reward_index"):
        PairRLTrainer(model, ParityTask(), args=make_args(tmp_path, correctness_reward_index=3),
                      train_dataset=make_dataset(), processing_class=tok)
