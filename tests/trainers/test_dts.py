"""DTS pair building: strategy parser, the mixed-correctness rule, token accounting on a scripted sampler, the
sampling peer, a real ChatSampler, an unchanged DPOTrainer on the pairs, errors."""

import copy
import random

import pytest
import torch

pytest.importorskip("trl")

from hf_fastslow.trainers.dts import (  # noqa: E402
    ChatSampler,
    DTSConfig,
    build_dts_pairs,
    build_sampling_pairs,
    parse_strategies,
    select_pair,
    solution_diversity,
)
from tests.conftest import byte_tokenizer, tiny_llama  # noqa: E402


class ScriptedSampler:
    """Replies by prompt kind; token count = number of words + 1 (EOS)."""

    def __init__(self, think_reply, solutions):
        self.think_reply, self.solutions, self.calls = think_reply, solutions, []

    def __call__(self, prompts, temperature, max_new_tokens, num_samples=1):
        self.calls.append((len(prompts), temperature, max_new_tokens, num_samples))
        out = []
        for p in prompts:
            if "List" in p:
                texts = [self.think_reply]
            else:
                key = p.split("strategy: ")[1].split("\n")[0] if "strategy: " in p else "plain"
                texts = self.solutions[key] if num_samples > 1 else [self.solutions[key][0]]
            out.append([(t, len(t.split()) + 1) for t in texts][:max(num_samples, 1)])
        return out


PROBLEMS = [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "7"},
            {"question": "What is 2 times 5?", "answer": "#### 10"}]


def test_parse_strategies_handles_lists_and_garbage():
    text = "Here are ideas:\n1. Add the numbers\n2) Count up from 3\n- Draw a picture\n* add the numbers.\n\n3: Guess"
    assert parse_strategies(text, 4) == ["Add the numbers", "Count up from 3", "Draw a picture", "Guess"]
    assert parse_strategies(text, 2) == ["Add the numbers", "Count up from 3"]
    assert parse_strategies("just think hard\nand check", 3) == ["just think hard", "and check"]
    for garbage in ["", "\n\n", "1.\n2.", None, "@@@"]:
        assert len(parse_strategies(garbage, 3)) <= 1


def test_pair_rule_is_mixed_correctness_and_seeded():
    rng = random.Random(0)
    assert select_pair(["a", "b"], [True, True], rng) is None
    assert select_pair(["a", "b"], [False, False], rng) is None
    picks = {select_pair(["a", "b", "c", "d"], [True, False, True, False], random.Random(s)) for s in range(20)}
    assert all(c in (0, 2) and r in (1, 3) for c, r in picks) and len(picks) > 1
    assert select_pair("abcd", [True, False, True, False], random.Random(3)) == \
        select_pair("abcd", [True, False, True, False], random.Random(3))


def test_dts_builder_pairs_and_token_accounting():
    sols = {"Add": ["3 + 4 = 7. The answer is 7."], "Count": ["3, 4, 5, 6. The answer is 6."],
            "plain": ["The answer is 10.", "I think 11."]}
    sampler = ScriptedSampler("1. Add\n2. Count\n3. Add", sols)
    pairs, report = build_dts_pairs(None, None, PROBLEMS, DTSConfig(num_strategies=3, seed=1), sampler=sampler)
    # Problem 1: strategies Add, Count (the duplicate dropped) + 1 plain top-up -> 7 / 6 / 10: one pair.
    # Problem 2: the same strategies -> answers 7 / 6 / 10, gold 10: one pair (the plain top-up is the correct one).
    assert report["pairs"] == 2 and len(pairs) == 2
    assert report["strategy_shortfall"] == 2
    assert pairs[0]["prompt"] == [{"role": "user", "content": PROBLEMS[0]["question"]}]  # no strategy in the prompt
    assert "The answer is 7" in pairs[0]["chosen"][0]["content"]
    assert "The answer is 7" not in pairs[0]["rejected"][0]["content"]
    think_tokens = 2 * (len("1. Add\n2. Count\n3. Add".split()) + 1)
    solve_tokens = 2 * sum(len(t.split()) + 1 for t in [sols["Add"][0], sols["Count"][0], sols["plain"][0]])
    assert report["think_tokens"] == think_tokens and report["solve_tokens"] == solve_tokens
    assert report["generated_tokens"] == think_tokens + solve_tokens
    assert report["solutions"] == 6 and report["correct_solutions"] == 2


def test_sampling_peer_uses_the_same_rule_and_counts_tokens():
    sols = {"plain": ["The answer is 7.", "The answer is 8.", "The answer is 7."]}
    sampler = ScriptedSampler("", sols)
    pairs, report = build_sampling_pairs(None, None, PROBLEMS[:1], DTSConfig(num_strategies=3), sampler=sampler)
    assert report["pairs"] == 1 and report["think_tokens"] == 0
    assert report["generated_tokens"] == sum(len(t.split()) + 1 for t in sols["plain"])
    assert sampler.calls == [(1, 0.7, 256, 3)]
    _, none = build_sampling_pairs(None, None, PROBLEMS[:1], DTSConfig(num_strategies=2),
                                   sampler=ScriptedSampler("", {"plain": ["The answer is 7."] * 2}))
    assert none["pairs"] == 0 and none["all_correct"] == 1


def test_solution_diversity():
    same = solution_diversity(["a b c", "a b c"], ["1", "1"])
    assert same == {"distinct_answers": 1.0, "jaccard": 1.0}
    diff = solution_diversity(["a b", "c d", "a d"], ["1", "2", None])
    assert diff["distinct_answers"] == 3 and diff["jaccard"] == pytest.approx((0 + 1 / 3 + 1 / 3) / 3)


def test_chat_sampler_counts_tokens_to_eos_on_a_real_model():
    model, tok = tiny_llama(vocab=259), byte_tokenizer()
    model.generation_config.eos_token_id = 1
    torch.manual_seed(0)
    out = ChatSampler(model, tok, batch_size=2)(["hi", "hello there", "x"], temperature=1.0, max_new_tokens=5,
                                                num_samples=2)
    assert len(out) == 3 and all(len(r) == 2 for r in out)
    assert all(1 <= n <= 5 for r in out for _, n in r)


def test_unchanged_dpo_trainer_trains_on_the_pairs(tmp_path):
    from trl import DPOConfig, DPOTrainer

    sols = {"Add": ["The answer is 7."], "Count": ["The answer is 6."], "plain": ["The answer is 10."]}
    pairs, _ = build_dts_pairs(None, None, PROBLEMS, DTSConfig(num_strategies=2), sampler=ScriptedSampler(
        "1. Add\n2. Count", sols))
    model, tok = tiny_llama(vocab=259), byte_tokenizer()
    before = [p.detach().clone() for p in model.parameters()]
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, max_steps=2,
                     per_device_train_batch_size=1, report_to=[], save_strategy="no", learning_rate=1e-3)
    # The reference model is passed in: trl would otherwise reload it by name, and a model built from a config has none.
    trainer = DPOTrainer(model, ref_model=copy.deepcopy(model), args=args, train_dataset=pairs, processing_class=tok)
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_errors():
    with pytest.raises(ValueError, match="num_strategies"):
        DTSConfig(num_strategies=1)
    with pytest.raises(ValueError, match="temperature"):
        DTSConfig(think_temperature=0)
    with pytest.raises(ValueError, match="answer"):
        build_dts_pairs(None, None, [{"question": "q"}], sampler=ScriptedSampler("", {}))
